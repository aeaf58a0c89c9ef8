"""The soft-label teacher of DD-Ranking, read from a checkpoint or a ``state_dict``."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["load_teacher"]


def load_teacher(path: str | os.PathLike, template: nn.Module | None = None) -> nn.Module:
    """A teacher network from ``path`` (eval mode, CPU).

    Reads, with ``torch.load(weights_only=True)``:

    * a Lightning checkpoint of a module whose hyperparameters hold the net as a ``class_path`` /
      ``init_args`` config (as :class:`~lightning_eff.models.ImageClassifier` saves them): the net is
      rebuilt from the config and gets the checkpoint's ``net.*`` weights;
    * a Lightning checkpoint without such a config, or a plain ``state_dict``: the weights are loaded into
      a copy of ``template`` (the student architecture, as the official code builds teachers).

    Example::

        >>> import tempfile, os
        >>> from lightning_eff.models import ConvNet
        >>> net = ConvNet(1, 10, width=8, depth=1, image_size=8)
        >>> path = os.path.join(tempfile.mkdtemp(), "teacher.pt")
        >>> torch.save(net.state_dict(), path)
        >>> teacher = load_teacher(path, template=ConvNet(1, 10, width=8, depth=1, image_size=8))
        >>> all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), net.state_dict().values()))
        True
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DDRanking: no teacher checkpoint at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, or one that needs unpickling of arbitrary classes
        raise ValueError(
            f"DDRanking: cannot read the teacher checkpoint {path} (weights_only=True): {err}"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        state = obj["state_dict"]
        hparams = obj.get("hyper_parameters") or {}
        prefix = "net." if any(k.startswith("net.") for k in state) else ""
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        config = hparams.get("net") if isinstance(hparams, dict) else None
        if isinstance(config, dict) and "class_path" in config:
            import importlib

            module_name, _, cls_name = config["class_path"].rpartition(".")
            cls = getattr(importlib.import_module(module_name), cls_name)
            net = cls(**dict(config.get("init_args") or {}))
        elif template is not None:
            net = copy.deepcopy(template)
        else:
            raise ValueError(
                f"DDRanking: the checkpoint {path} has no `net` config in its hyperparameters; pass the teacher "
                f"architecture as `net` (the student template) or give an nn.Module as `teacher`."
            )
    elif isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        if template is None:
            raise ValueError(
                f"DDRanking: {path} is a plain state_dict; a template network is needed to load it."
            )
        net, state = copy.deepcopy(template), obj
    else:
        raise ValueError(
            f"DDRanking: {path} is neither a Lightning checkpoint nor a state_dict (got {type(obj).__name__})."
        )
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"DDRanking: the teacher weights in {path} do not fit {type(net).__name__}: {err}"
        ) from None
    return net.eval()
