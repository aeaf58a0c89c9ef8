"""Stage-1 (surrogate) checkpoints of :class:`~lightning_eff.explain.AutoGnothi`: the format and the checked loading.

Stage 2 loads the surrogate side branch and head that stage 1 trained (official AutoGnothi:
``scripts/train_explainer.py`` reads the surrogate checkpoint). :func:`load_surrogate_parts` refuses a file that is
not an AutoGnothi checkpoint of this format, holds no surrogate, has other side sizes, or was trained on another
backbone (every backbone tensor is compared), with a message that says what to change.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

__all__ = ["CHECKPOINT_FORMAT_VERSION", "load_surrogate_parts"]

#: Stored as ``checkpoint["autognothi_format"]``; checked when a surrogate checkpoint is loaded.
CHECKPOINT_FORMAT_VERSION = 1


def load_surrogate_parts(path: str, parts: dict[str, nn.Module], backbone: nn.Module) -> None:
    """Load each module of ``parts`` (state-dict prefix -> module) from the stage-1 checkpoint at ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the checkpoint has no surrogate, different side sizes, or a backbone other than ``backbone``.
    """
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"AutoGnothi: `surrogate_checkpoint`={path!r} does not exist; train stage 1 first "
            f"(lightning-eff fit --config <surrogate config>) and point to its checkpoint."
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    version = ckpt.get("autognothi_format", CHECKPOINT_FORMAT_VERSION) if isinstance(ckpt, dict) else None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or version != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"AutoGnothi: {path!r} is not an AutoGnothi checkpoint (format {CHECKPOINT_FORMAT_VERSION})."
        )
    for prefix, module in parts.items():
        sub = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        if not sub:
            raise ValueError(
                f"AutoGnothi: {path!r} holds no `{prefix}`; is it a stage 'surrogate' checkpoint?"
            )
        own = module.state_dict()
        bad = [k for k in own if k not in sub or sub[k].shape != own[k].shape]
        if bad or len(sub) != len(own):
            raise ValueError(
                f"AutoGnothi: the `{prefix}` in {path!r} does not match this model (first mismatch: "
                f"{(bad or sorted(set(sub) - set(own)))[0]!r}); use the same backbone, side_ratio and side_heads "
                f"as stage 1."
            )
    backbone_state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    if backbone_state:
        own = backbone.state_dict()
        differs = [
            k
            for k, v in own.items()
            if k not in backbone_state or not torch.equal(backbone_state[k].to(v.device), v)
        ]
        if differs:
            raise ValueError(
                f"AutoGnothi: the surrogate in {path!r} was trained on a different backbone (first differing "
                f"tensor: {differs[0]!r}); stage 2 must explain the same frozen classifier as stage 1."
            )
    else:
        rank_zero_warn(
            f"AutoGnothi: {path!r} stores no backbone weights; cannot check it matches this backbone."
        )
    for prefix, module in parts.items():
        module.load_state_dict(
            {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        )
