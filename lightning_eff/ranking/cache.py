"""DD-Ranking's result cache: the hashes that key it and its JSON files on disk.

The random-real and full-data trainings of :class:`~lightning_eff.ranking.DDRanking` do not depend on the
synthetic set, so their accuracies are kept (in memory and in ``cache_dir``) under a key that hashes
everything they depend on: the dataset (:func:`data_fingerprint`), the student (:func:`_describe_net`), the
teacher's weights (:func:`_state_fingerprint`), the setting and the seeds (:func:`_hash_json`). One file
``<key>.json`` per training, written atomically; a file of another format or protocol version is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.utils.io import atomic_write_text

__all__ = ["CACHE_FORMAT", "PROTOCOL_VERSION", "data_fingerprint", "read_cache_file", "write_cache_file"]

CACHE_FORMAT = "lightning-eff/ddranking-cache"
#: Bumped whenever a change would make cached accuracies differ from a fresh run.
PROTOCOL_VERSION = 1


def _default_cache_dir() -> Path:
    root = os.environ.get("LIGHTNING_EFF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lightning_eff"
    )
    return Path(root) / "ranking"


def _hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _hash_tensors(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def _describe_net(net: nn.Module) -> dict[str, Any]:
    get_config = getattr(net, "get_config", None)
    config = get_config() if callable(get_config) else None
    return {
        "class": f"{type(net).__module__}.{type(net).__qualname__}",
        "config": config if config is not None else repr(net),
    }


def _state_fingerprint(net: nn.Module) -> str:
    sd = net.state_dict()
    return _hash_tensors(*(sd[k].float() if sd[k].is_floating_point() else sd[k] for k in sorted(sd)))


def data_fingerprint(dm) -> dict[str, Any]:
    """What identifies a DataModule's data for the cache: its class, shape, training labels and test split."""
    from lightning_eff.distill.evaluation import load_test_tensors

    test_x, test_y = load_test_tensors(dm)
    return {
        "class": f"{type(dm).__module__}.{type(dm).__qualname__}",
        "num_classes": int(dm.num_classes),
        "image_shape": list(dm.image_shape),
        "train_targets": _hash_tensors(dm.train_targets.long()),
        "test": _hash_tensors(test_x.float(), test_y.long()),
    }


def read_cache_file(cache_dir: Path, key: str) -> dict[str, Any] | None:
    """The result stored under ``key`` in ``cache_dir`` (``None``: no file, or an unreadable, foreign or
    outdated one)."""
    path = cache_dir / f"{key}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        data.get("format") != CACHE_FORMAT
        or data.get("protocol_version") != PROTOCOL_VERSION
        or data.get("key") != key
    ):
        return None
    result = data.get("result")
    if not isinstance(result, dict) or "best" not in result or "lrs" not in result:
        return None
    return result


def write_cache_file(
    cache_dir: Path, key: str, description: dict[str, Any] | None, result: dict[str, Any]
) -> None:
    """Store ``result`` under ``key`` in ``cache_dir`` (atomically; a folder that cannot be written warns)."""
    payload = {
        "format": CACHE_FORMAT,
        "protocol_version": PROTOCOL_VERSION,
        "key": key,
        "description": description,
        "result": result,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        atomic_write_text(cache_dir / f"{key}.json", json.dumps(payload, indent=1, default=str) + "\n")
    except OSError as err:  # a read-only cache folder must not lose the ranking itself
        warnings.warn(f"DDRanking: could not write the cache file in {cache_dir}: {err}", stacklevel=3)
