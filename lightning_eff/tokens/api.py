"""The token-compression API: a *selector* decides which tokens of a span survive, an *applier* acts on a model.

Position paper: "Shifting AI Efficiency From Model-Centric to Data-Centric Compression" (arXiv 2505.19147),
Sec. 3: a token-compression method is characterised by *where* it acts (here: inside a decoder at layer K,
or at the input of a ViT block K), *how* (pruning, or merging as in :class:`~lightning_eff.tokens.Pool`),
*which criterion* (duplication, attention importance, random, pooling) and the *budget*.

A selector is a plain object with one method, :meth:`TokenSelector.select`, that maps a
:class:`SelectionContext` (the hidden states entering layer K for a batch, optionally the final-normed hidden
states, the key states and the attention weights of layer K-1, and the compressible span of each sequence) to
a :class:`Selection`: for every sequence the sorted absolute positions of the span tokens to keep (the same
number for every sequence), and optionally replacement hidden states for them (merging). Everything outside
the span is always kept. The appliers (:class:`~lightning_eff.tokens.DecoderTokenPruner`,
:class:`~lightning_eff.tokens.ViTTokenPruner`) gather the surviving tokens and keep everything else of the
model consistent.

The budget is either a kept count (``num_kept``) or a kept fraction of the span (``keep_ratio``; the papers'
"pruning ratio" r is ``1 - keep_ratio``, so DART's 88.9% is ``keep_ratio=0.111`` on 576 tokens, i.e. 64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_eff.utils.checks import check_float, check_optional_int

__all__ = ["SelectionContext", "Selection", "TokenSelector", "Indices", "build_keep_index", "span_positions"]


@dataclass
class SelectionContext:
    """What a selector may look at, for a batch of ``B`` sequences of length ``L`` at the pruning layer K.

    Attributes:
        hidden: ``[B, L, D]`` hidden states entering layer K (the output of layer K-1).
        span_start: ``[B]`` long tensor, absolute position of the first compressible token of each sequence.
        span_len: number of compressible tokens (the same for every sequence).
        valid: ``[B, L]`` bool, False at padding positions.
        normed: ``[B, L, D]`` ``hidden`` after the model's final norm (DART's similarity space), or None.
        keys: ``[B, L, H*d]`` key states of layer K-1 (after RoPE and ``repeat_kv``, heads concatenated) when
            the selector declares ``needs_keys``, else None.
        attentions: ``[B, H, L, L]`` attention weights of layer K-1 when the selector declares
            ``needs_attentions`` (eager attention only), else None.
        grid: ``(h, w)`` layout of the span when it is an image grid (used by :class:`Pool`), else None.
    """

    hidden: Tensor
    span_start: Tensor
    span_len: int
    valid: Tensor
    normed: Tensor | None = None
    keys: Tensor | None = None
    attentions: Tensor | None = None
    grid: tuple[int, int] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.hidden.shape[1])

    def span_index(self) -> Tensor:
        """``[B, span_len]`` absolute positions of the span tokens."""
        return span_positions(self.span_start, self.span_len)


class Selection(NamedTuple):
    """A selector's answer.

    Attributes:
        indices: ``[B, k]`` long, sorted absolute positions of the span tokens that are kept.
        values: optional ``[B, k, D]`` hidden states that replace those tokens' states (merging); None to keep
            the states as they are (pruning).
    """

    indices: Tensor
    values: Tensor | None = None


def span_positions(span_start: Tensor, span_len: int) -> Tensor:
    """``[B, span_len]`` absolute positions ``span_start[b] + j``.

    Example::

        >>> span_positions(torch.tensor([1, 3]), 2).tolist()
        [[1, 2], [3, 4]]
    """
    return span_start.reshape(-1, 1) + torch.arange(span_len, device=span_start.device)


def _check_budget(owner: str, num_kept: int | None, keep_ratio: float | None) -> None:
    if (num_kept is None) == (keep_ratio is None):
        raise ValueError(
            f"{owner}: give exactly one of `num_kept` (tokens kept from the span) and `keep_ratio` "
            f"(fraction kept, in (0, 1]); got num_kept={num_kept!r}, keep_ratio={keep_ratio!r}."
        )
    check_optional_int(num_kept, "num_kept", minimum=1, owner=owner)
    if keep_ratio is not None:
        check_float(keep_ratio, "keep_ratio", low=0.0, high=1.0, low_open=True, owner=owner)


class TokenSelector:
    """Base class of selectors: which tokens of the compressible span survive.

    Subclasses implement :meth:`select` and, when the count they keep is not the budget itself (DART),
    :meth:`num_kept_for`. Class attributes ``needs_keys`` / ``needs_attentions`` / ``needs_normed`` tell the
    applier what to capture at layer K-1.

    Args:
        num_kept: tokens kept from the span (exclusive with ``keep_ratio``).
        keep_ratio: fraction of the span kept, in ``(0, 1]``; the count is ``max(1, round(keep_ratio * n))``.

    Example::

        >>> Indices([0, 2]).num_kept_for(5)
        2
    """

    needs_keys: bool = False
    needs_attentions: bool = False
    needs_normed: bool = False

    def __init__(self, num_kept: int | None = None, keep_ratio: float | None = None) -> None:
        _check_budget(type(self).__name__, num_kept, keep_ratio)
        self.num_kept = num_kept
        self.keep_ratio = None if keep_ratio is None else float(keep_ratio)

    def budget_for(self, span_len: int) -> int:
        """The nominal budget (kept count) for a span of ``span_len`` tokens."""
        if self.num_kept is not None:
            return self.num_kept
        return max(1, round(self.keep_ratio * span_len))

    def num_kept_for(self, span_len: int) -> int:
        """How many span tokens :meth:`select` keeps for a span of ``span_len`` tokens."""
        return self.budget_for(span_len)

    def check_span(self, span_len: int) -> int:
        """Raise ``ValueError`` if the budget does not fit a span of ``span_len`` tokens; return the kept count."""
        kept = self.num_kept_for(span_len)
        if kept > span_len:
            raise ValueError(
                f"{type(self).__name__}: the budget keeps {kept} tokens but the compressible span has only "
                f"{span_len}; lower `num_kept`/`keep_ratio`."
            )
        return kept

    def select(self, ctx: SelectionContext) -> Selection:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not implement select().")

    def extra_repr(self) -> str:
        budget = f"num_kept={self.num_kept}" if self.num_kept is not None else f"keep_ratio={self.keep_ratio}"
        return budget

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class Indices(TokenSelector):
    """Keeps fixed span-relative indices (e.g. a selection computed elsewhere, or for reproducing a run).

    Args:
        indices: span-relative positions to keep (a list or a 1-D tensor), or ``[B, k]`` per sequence.

    Example::

        >>> ctx = SelectionContext(torch.zeros(1, 6, 4), torch.tensor([1]), 4, torch.ones(1, 6, dtype=torch.bool))
        >>> Indices([3, 0]).select(ctx).indices.tolist()
        [[1, 4]]
    """

    def __init__(self, indices) -> None:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.dim() not in (1, 2) or idx.numel() == 0:
            raise ValueError(
                f"Indices: `indices` must be a non-empty 1-D or 2-D list/tensor, got {indices!r}."
            )
        if bool((idx < 0).any()):
            raise ValueError(f"Indices: `indices` must be >= 0 (span-relative), got {idx.tolist()}.")
        super().__init__(num_kept=int(idx.shape[-1]))
        self.indices = torch.sort(idx, dim=-1).values

    def select(self, ctx: SelectionContext) -> Selection:
        if int(self.indices.max()) >= ctx.span_len:
            raise ValueError(
                f"Indices: index {int(self.indices.max())} is outside the span of {ctx.span_len} tokens."
            )
        idx = self.indices.to(ctx.hidden.device)
        if idx.dim() == 1:
            idx = idx.expand(ctx.batch_size, -1)
        elif idx.shape[0] != ctx.batch_size:
            raise ValueError(f"Indices: {idx.shape[0]} index rows for a batch of {ctx.batch_size}.")
        return Selection(ctx.span_start.reshape(-1, 1) + idx)

    def extra_repr(self) -> str:
        return f"indices={self.indices.tolist()}"


def build_keep_index(span_start: Tensor, span_len: int, seq_len: int, kept: Tensor) -> Tensor:
    """``[B, seq_len - span_len + k]`` sorted positions kept: everything outside the span plus ``kept``.

    Args:
        span_start: ``[B]`` first span position of each sequence.
        span_len: span length (same for every sequence).
        seq_len: sequence length ``L``.
        kept: ``[B, k]`` absolute positions kept inside the span.

    Example::

        >>> build_keep_index(torch.tensor([1]), 3, 6, torch.tensor([[2]])).tolist()
        [[0, 2, 4, 5]]
    """
    b = kept.shape[0]
    pos = torch.arange(seq_len, device=kept.device).expand(b, -1)
    start = span_start.reshape(-1, 1)
    outside = (pos < start) | (pos >= start + span_len)
    keep = outside.clone()
    keep.scatter_(1, kept, True)
    n = seq_len - span_len + kept.shape[1]
    # stable sort of "not kept" puts the kept positions first, in ascending order (no host sync)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    return order[:, :n]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def factor_pair(n: int, aspect: float) -> tuple[int, int]:
    """``(h, w)`` with ``h * w == n`` and ``h / w`` closest to ``aspect`` (for pooling a grid to ``n`` cells).

    Example::

        >>> factor_pair(12, 1.0)
        (3, 4)
    """
    best, best_err = (1, n), math.inf
    for h in range(1, n + 1):
        if n % h == 0:
            err = abs(math.log(h / (n // h)) - math.log(aspect))
            if err < best_err - 1e-9:  # ties go to the smaller h
                best, best_err = (h, n // h), err
    return best
