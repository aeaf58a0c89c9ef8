"""Efficiency metrics of token compression as ``torchmetrics.Metric`` s (summed states, so they reduce across
DDP ranks): kept-token ratio, estimated FLOPs saved, KV-cache bytes saved, prefill latency.

FLOPs are estimated per layer as in FastV (arXiv 2403.06764, Sec. 4.3), written for grouped-query attention
and gated MLPs: for ``n`` tokens, hidden size ``d``, ``H`` query and ``H_kv`` key/value heads of size
``d_h`` and MLP width ``m``::

    2 n d (2 H d_h + 2 H_kv d_h)   +   2 * 2 n^2 H d_h   +   2 n d m (3 gated | 2 plain)

(projections, ``QK^T`` and ``AV`` over the full ``n x n`` square as FastV counts them, and the MLP). The
position paper (arXiv 2505.19147) asks for accuracy *and* real cost; the latency metric measures the latter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "KeptTokenRatio",
    "FLOPsSaved",
    "KVCacheSaved",
    "PrefillLatency",
    "decoder_flops",
    "layer_flops",
    "config_dims",
    "kv_cache_bytes",
]


def layer_flops(
    n: int,
    hidden: int,
    intermediate: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    gated: bool = True,
) -> float:
    """Estimated FLOPs of one transformer layer on ``n`` tokens (see the module docstring).

    Example::

        >>> layer_flops(1, hidden=2, intermediate=4, num_heads=1, num_kv_heads=1, head_dim=2, gated=False)
        72.0
    """
    proj = 2.0 * n * hidden * (2 * num_heads * head_dim + 2 * num_kv_heads * head_dim)
    attn = 4.0 * n * n * num_heads * head_dim
    mlp = 2.0 * n * hidden * intermediate * (3 if gated else 2)
    return proj + attn + mlp


def config_dims(config: Any, gated: bool = True) -> dict[str, Any]:
    """Sizes for :func:`layer_flops` from a ``transformers`` config (gated MLP: Llama/Qwen2/Mistral; ViT: not)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "hidden": config.hidden_size,
        "intermediate": config.intermediate_size,
        "num_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "gated": gated,
    }


def decoder_flops(seq_lens: Sequence[int], **dims: Any) -> float:
    """Total estimated FLOPs over layers that see ``seq_lens[i]`` tokens each.

    Example::

        >>> dims = dict(hidden=64, intermediate=128, num_heads=4, num_kv_heads=2, head_dim=16)
        >>> full, pruned = decoder_flops([100] * 4, **dims), decoder_flops([100, 100, 30, 30], **dims)
        >>> round(1 - pruned / full, 3)
        0.377
    """
    return float(sum(layer_flops(n, **dims) for n in seq_lens))


def _float64_sum(value: float | Tensor, device: torch.device) -> Tensor:
    """``value`` summed in float64 on ``device`` (a number, or a tensor of per-sample values)."""
    return torch.as_tensor(value, dtype=torch.float64, device=device).sum()


def _saved_fraction(full: Tensor, pruned: Tensor) -> Tensor:
    """``1 - pruned / full`` as float32; ``0`` when nothing was counted (``full == 0``)."""
    if float(full) == 0.0:
        return torch.tensor(0.0)
    return (1.0 - pruned / full).float()


class _SummedMetric(Metric):
    """A metric whose states ``_sums`` are float64 scalars summed over updates and across DDP ranks."""

    full_state_update = False
    _sums: tuple[str, ...] = ()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in self._sums:
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _accumulate(self, **values: float | Tensor) -> None:
        """Add each value's sum to the state of the same name (in place, like ``state += x``)."""
        for name, value in values.items():
            getattr(self, name).add_(_float64_sum(value, self.device))


class KeptTokenRatio(_SummedMetric):
    """Fraction of the compressible (image) tokens that survive: ``sum kept / sum span``.

    Example::

        >>> m = KeptTokenRatio(); m.update(64, 576); m.update(128, 576)
        >>> round(float(m.compute()), 4)
        0.1667
    """

    higher_is_better = False
    _sums = ("kept", "total")

    def update(self, kept: float | Tensor, total: float | Tensor) -> None:
        self._accumulate(kept=kept, total=total)

    def compute(self) -> Tensor:
        return (self.kept / self.total.clamp_min(1.0)).float()


class FLOPsSaved(_SummedMetric):
    """Estimated fraction of prefill FLOPs saved: ``1 - sum FLOPs(pruned) / sum FLOPs(full)``.

    Example::

        >>> m = FLOPsSaved(); m.update(full=100.0, pruned=40.0)
        >>> float(m.compute())
        0.6000000238418579
    """

    higher_is_better = True
    _sums = ("full", "pruned")

    def update(self, full: float | Tensor, pruned: float | Tensor) -> None:
        self._accumulate(full=full, pruned=pruned)

    def compute(self) -> Tensor:
        return _saved_fraction(self.full, self.pruned)


def kv_cache_bytes(seq_lens: Sequence[int], num_kv_heads: int, head_dim: int, element_size: int) -> int:
    """Bytes of a KV cache whose layers hold ``seq_lens[i]`` tokens: keys and values, ``H_kv * d_h`` each.

    The position paper (arXiv 2505.19147, Sec. 2) names KV-cache memory as the cost that grows with the
    token count; a pruned prefill leaves layers >= K holding ``L'`` instead of ``L`` tokens.

    Example::

        >>> kv_cache_bytes([10, 10, 4, 4], num_kv_heads=2, head_dim=8, element_size=2)  # 2 * 2 * 8 * 2 * 28
        1792
    """
    return int(2 * num_kv_heads * head_dim * element_size * sum(seq_lens))


class KVCacheSaved(_SummedMetric):
    """KV-cache memory saved by pruning: :meth:`compute` is the mean number of bytes saved per sequence;
    :meth:`ratio` the fraction of the unpruned cache saved.

    Example::

        >>> m = KVCacheSaved(); m.update(full=1000, pruned=400, sequences=2)
        >>> float(m.compute()), round(float(m.ratio()), 2)
        (300.0, 0.6)
    """

    higher_is_better = True
    _sums = ("full", "pruned", "sequences")

    def update(self, full: float | Tensor, pruned: float | Tensor, sequences: int | Tensor) -> None:
        self._accumulate(full=full, pruned=pruned, sequences=sequences)

    def compute(self) -> Tensor:
        return ((self.full - self.pruned) / self.sequences.clamp_min(1.0)).float()

    def ratio(self) -> Tensor:
        return _saved_fraction(self.full, self.pruned)


class PrefillLatency(_SummedMetric):
    """Mean prefill latency in milliseconds.

    Example::

        >>> m = PrefillLatency(); m.update(10.0); m.update(20.0)
        >>> float(m.compute())
        15.0
    """

    higher_is_better = False
    _sums = ("total_ms", "count")

    def update(self, ms: float | Tensor) -> None:
        ms = torch.as_tensor(ms, dtype=torch.float64, device=self.device).reshape(-1)
        self.total_ms += ms.sum()
        self.count += ms.numel()

    def compute(self) -> Tensor:
        return (self.total_ms / self.count.clamp_min(1.0)).float()
