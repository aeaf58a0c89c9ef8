"""Applying a selector to the patch tokens of a ViT encoder at the input of block K.

The same selectors as in the decoder: DART runs on the patch tokens with image pivots only
(``num_text_pivots=0``, there is no text after the patches), keys from block K-1's key projection and
similarities of the encoder's final-LayerNorm'd states, as the DART authors' ViT classification script does
with ``--pivot-text-token 0``. The class token (position 0) is always kept. Later blocks simply see the
shorter sequence (ViT encoders have no cache and no causal mask).

Supported: ``torchvision.models.VisionTransformer`` (``encoder.layers``, ``ln_1``, fused
``self_attention.in_proj_weight``, ``encoder.ln``) and ``transformers`` ``ViTModel`` /
``ViTForImageClassification`` (``layers`` or ``encoder.layer``; ``attention.k_proj`` or
``attention.attention.key``; ``layernorm``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_eff.tokens.api import SelectionContext, TokenSelector, build_keep_index
from lightning_eff.tokens.pruner import HookedPruner, PruneRecord
from lightning_eff.utils.checks import check_int

__all__ = ["ViTTokenPruner", "find_vit"]


def find_vit(module: nn.Module) -> tuple[str, list[nn.Module], nn.Module, nn.Module]:
    """``(kind, blocks, final_norm, owner)`` of the first ViT encoder inside ``module``.

    Raises:
        ValueError: no torchvision or ``transformers`` ViT encoder found.
    """
    for m in module.modules():
        enc = getattr(m, "encoder", None)
        if isinstance(enc, nn.Module) and isinstance(getattr(enc, "layers", None), nn.Sequential):
            blocks = list(enc.layers)
            if (
                blocks
                and hasattr(blocks[0], "ln_1")
                and isinstance(getattr(blocks[0], "self_attention", None), nn.MultiheadAttention)
            ):
                return "torchvision", blocks, enc.ln, m
        layers = getattr(m, "layers", None)
        if layers is None and isinstance(enc, nn.Module):
            layers = getattr(enc, "layer", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "layernorm_before"):
            if isinstance(getattr(m, "layernorm", None), nn.Module):
                return "hf", list(layers), m.layernorm, m
    raise ValueError(
        f"unsupported architecture {type(module).__name__}: no torchvision VisionTransformer or transformers ViT "
        f"encoder found."
    )


def _hf_key_linear(block: nn.Module) -> nn.Linear:
    attn = block.attention
    if isinstance(getattr(attn, "k_proj", None), nn.Linear):
        return attn.k_proj
    return attn.attention.key


class ViTTokenPruner(HookedPruner):
    """Prunes (or pools) the patch tokens of a ViT encoder at the input of block K.

    Args:
        selector: a :class:`~lightning_eff.tokens.TokenSelector` (DART with ``num_text_pivots=0``, Random,
            Pool; FastV is not supported here).
        layer: K, the first block that sees the pruned sequence (>= 1).

    Example::

        >>> import torchvision
        >>> from lightning_eff.tokens import DART
        >>> vit = torchvision.models.VisionTransformer(image_size=16, patch_size=2, num_layers=4, num_heads=2,
        ...                                            hidden_dim=16, mlp_dim=32, num_classes=3).eval()
        >>> with ViTTokenPruner(DART(num_kept=8, num_image_pivots=4, num_text_pivots=0), layer=2).attach(vit) as p:
        ...     logits = vit(torch.randn(2, 3, 16, 16))
        >>> logits.shape, p.last_record.kept_len   # 1 class token + 4 pivots + 4 * 2
        (torch.Size([2, 3]), 13)
    """

    def __init__(self, selector: TokenSelector, layer: int = 2) -> None:
        if not isinstance(selector, TokenSelector):
            raise TypeError(f"ViTTokenPruner: `selector` must be a TokenSelector, got {selector!r}.")
        if selector.needs_attentions:
            raise ValueError(
                f"ViTTokenPruner: {type(selector).__name__} needs attention weights, which ViT encoders do not "
                f"expose to hooks; use DART, Random or Pool."
            )
        check_int(layer, "layer", minimum=1, owner="ViTTokenPruner")  # K
        self.selector = selector
        self.layer = layer
        self.records: list[PruneRecord] = []
        self.kind: str | None = None
        self.blocks: list[nn.Module] = []
        self.norm: nn.Module | None = None
        self.owner: nn.Module | None = None
        self._handles: list[Any] = []
        self._captured: dict[str, Tensor] = {}

    def attach(self, model: nn.Module, model_path: str | None = None) -> ViTTokenPruner:
        """Register the hooks on the ViT encoder inside ``model``."""
        if self.attached:
            raise RuntimeError("ViTTokenPruner: already attached; call detach() first.")
        if model_path:
            from lightning_eff.tokens.decoder import _get_path

            model = _get_path(model, model_path)
        kind, blocks, norm, owner = find_vit(model)
        if self.layer >= len(blocks):
            raise ValueError(
                f"ViTTokenPruner: `layer`={self.layer} is beyond the encoder's depth: it has {len(blocks)} blocks, "
                f"so K must be in [1, {len(blocks) - 1}]."
            )
        self.kind, self.blocks, self.norm, self.owner = kind, blocks, norm, owner
        prev = blocks[self.layer - 1]
        if self.selector.needs_keys:
            if kind == "torchvision":
                self._handles.append(prev.register_forward_pre_hook(self._capture_input))
            else:
                self._handles.append(_hf_key_linear(prev).register_forward_hook(self._capture_keys))
        self._handles.append(blocks[self.layer].register_forward_pre_hook(self._prune, with_kwargs=True))
        return self

    def detach(self) -> None:
        """Remove every hook; the model is exactly as before :meth:`attach`."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._captured = {}

    def _capture_input(self, module: nn.Module, args: tuple) -> None:
        self._captured["x"] = args[0]

    def _capture_keys(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._captured["keys"] = output

    def _keys(self) -> Tensor:
        if self.kind == "hf":
            return self._captured.pop("keys")
        block = self.blocks[self.layer - 1]
        x = block.ln_1(self._captured.pop("x"))
        mha: nn.MultiheadAttention = block.self_attention
        d = mha.embed_dim
        if mha.in_proj_weight is not None:
            w = mha.in_proj_weight[d : 2 * d]
        else:
            w = mha.k_proj_weight
        b = None if mha.in_proj_bias is None else mha.in_proj_bias[d : 2 * d]
        return F.linear(x, w, b)

    def _prune(self, module: nn.Module, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs["hidden_states"]
        bsz, n, dim = hidden.shape
        length = n - 1
        kept_n = self.selector.check_span(length)
        side = math.isqrt(length)
        ctx = SelectionContext(
            hidden=hidden,
            span_start=torch.ones(bsz, dtype=torch.long, device=hidden.device),
            span_len=length,
            valid=torch.ones(bsz, n, dtype=torch.bool, device=hidden.device),
            grid=(side, side) if side * side == length else None,
        )
        if self.selector.needs_normed:
            ctx.normed = self.norm(hidden)
        if self.selector.needs_keys:
            ctx.keys = self._keys()
        sel = self.selector.select(ctx)
        kept = sel.indices
        if kept.shape != (bsz, kept_n):
            raise ValueError(
                f"{type(self.selector).__name__}.select returned {tuple(kept.shape)}, expected ({bsz}, {kept_n})."
            )
        keep = build_keep_index(ctx.span_start, length, n, kept)
        h = hidden
        if sel.values is not None:
            h = hidden.scatter(1, kept.unsqueeze(-1).expand(-1, -1, dim), sel.values.to(hidden.dtype))
        h = h.gather(1, keep.unsqueeze(-1).expand(-1, -1, dim))
        self.records.append(
            PruneRecord(bsz, n, int(keep.shape[1]), length, kept_n, self.layer, len(self.blocks), keep)
        )
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    def flops_dims(self) -> dict[str, Any]:
        """Sizes for :func:`~lightning_eff.tokens.metrics.layer_flops` of this encoder."""
        if self.kind == "torchvision":
            block = self.blocks[0]
            mha = block.self_attention
            return {
                "hidden": mha.embed_dim,
                "intermediate": block.mlp[0].out_features,
                "num_heads": mha.num_heads,
                "num_kv_heads": mha.num_heads,
                "head_dim": mha.embed_dim // mha.num_heads,
                "gated": False,
            }
        from lightning_eff.tokens.metrics import config_dims

        return config_dims(self.owner.config, gated=False)
