"""Baseline selectors: random pruning, FastV-style attention importance, and pooling.

* :class:`Random` - uniform random subset of the span (the position paper, arXiv 2505.19147 Sec. 4, and the
  DART paper, Tab. 1, report it as a strong baseline).
* :class:`FastV` - Chen et al., "An Image is Worth 1/2 Tokens After Layer 2" (ECCV 2024, arXiv 2403.06764),
  Sec. 4: keep the image tokens with the largest attention at layer K-1, averaged over heads. The official
  code (pkunlp-icler/FastV, ``fastv_kvcache`` path) ranks by the attention the *last* token pays
  (``query="last"``, default); ``query="mean"`` ranks by the mean attention received from all valid tokens
  as the paper's text describes. It needs the attention weights, so the decoder must run with
  ``attn_implementation="eager"``: FlashAttention/SDPA never materialise them. That is the practical argument
  of the DART paper against importance-based pruning.
* :class:`Pool` - merging baseline: the span is average-pooled (1-D, or 2-D when the span is an ``h x w``
  grid) to the budget; each pooled token takes the position of the centre token of its window.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_eff.tokens.api import Selection, SelectionContext, TokenSelector, ceil_div, factor_pair

__all__ = ["Random", "FastV", "Pool", "pool_matrix"]


class Random(TokenSelector):
    """Uniform random subset of the span, drawn independently for every sequence.

    Args:
        num_kept: tokens kept (exclusive with ``keep_ratio``).
        keep_ratio: fraction kept.
        seed: seed of the selector's own generator (reproducible across runs); None draws from torch's
            global generator.

    Example::

        >>> ctx = SelectionContext(torch.zeros(2, 10, 4), torch.tensor([2, 2]), 6, torch.ones(2, 10, dtype=torch.bool))
        >>> Random(num_kept=3, seed=0).select(ctx).indices.shape
        torch.Size([2, 3])
    """

    def __init__(
        self, num_kept: int | None = None, keep_ratio: float | None = None, seed: int | None = 0
    ) -> None:
        super().__init__(num_kept=num_kept, keep_ratio=keep_ratio)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"Random: `seed` must be an int or None, got {seed!r}.")
        self.seed = seed
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)

    def select(self, ctx: SelectionContext) -> Selection:
        k = self.check_span(ctx.span_len)
        noise = torch.rand(ctx.batch_size, ctx.span_len, generator=self._generator)
        rel = noise.topk(k, dim=1).indices.sort(dim=1).values.to(ctx.hidden.device)
        return Selection(ctx.span_start.reshape(-1, 1) + rel)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}"


class FastV(TokenSelector):
    """Attention-importance selector in the style of FastV (needs eager attention; see the module docstring).

    Args:
        num_kept: tokens kept (exclusive with ``keep_ratio``).
        keep_ratio: fraction kept.
        query: ``"last"`` (official code: attention paid by the last valid token) or ``"mean"`` (mean attention
            received from all valid query tokens).

    Example::

        >>> attn = torch.zeros(1, 1, 5, 5); attn[0, 0, -1] = torch.tensor([0.0, 0.5, 0.1, 0.4, 0.0])
        >>> ctx = SelectionContext(torch.zeros(1, 5, 2), torch.tensor([1]), 3, torch.ones(1, 5, dtype=torch.bool),
        ...                        attentions=attn)
        >>> FastV(num_kept=2).select(ctx).indices.tolist()
        [[1, 3]]
    """

    needs_attentions = True

    def __init__(
        self,
        num_kept: int | None = None,
        keep_ratio: float | None = None,
        query: Literal["last", "mean"] = "last",
    ) -> None:
        super().__init__(num_kept=num_kept, keep_ratio=keep_ratio)
        if query not in ("last", "mean"):
            raise ValueError(f"FastV: `query` must be 'last' or 'mean', got {query!r}.")
        self.query = query

    def select(self, ctx: SelectionContext) -> Selection:
        k = self.check_span(ctx.span_len)
        if ctx.attentions is None:
            raise ValueError(
                "FastV: no attention weights were captured at layer K-1; FastV needs the model to run with "
                "attn_implementation='eager' (SDPA/FlashAttention do not return attention maps)."
            )
        attn = ctx.attentions.float().mean(1)  # [B, Lq, Lk], mean over heads
        valid = ctx.valid.to(attn.device)
        if self.query == "last":
            pos = torch.arange(ctx.seq_len, device=attn.device).expand(ctx.batch_size, -1)
            last = torch.where(valid, pos, torch.full_like(pos, -1)).max(1).values  # last valid query
            score = attn.gather(1, last.view(-1, 1, 1).expand(-1, 1, attn.shape[-1])).squeeze(1)
        else:
            w = valid.float().unsqueeze(-1)
            score = (attn * w).sum(1) / w.sum(1).clamp_min(1.0)
        span = ctx.span_index()
        rel = score.gather(1, span).topk(k, dim=1).indices.sort(dim=1).values
        return Selection(span.gather(1, rel))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, query={self.query!r}"


def _windows(n: int, k: int) -> list[tuple[int, int]]:
    """Adaptive pooling windows of ``n`` items into ``k`` cells (as ``torch.nn.AdaptiveAvgPool1d``)."""
    return [((i * n) // k, ceil_div((i + 1) * n, k)) for i in range(k)]


def pool_matrix(span_len: int, kept: int, grid: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Averaging matrix ``W [kept, span_len]`` and the representative span positions ``[kept]``.

    Windows follow ``AdaptiveAvgPool1d`` (or ``AdaptiveAvgPool2d`` over the ``grid`` with an output grid whose
    aspect is closest to the input's); a pooled token sits at the centre token of its window.

    Example::

        >>> w, rep = pool_matrix(4, 2)
        >>> w.tolist(), rep.tolist()
        ([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]], [0, 2])
    """
    if grid is None:
        cells = [([j for j in range(a, b)], (a + b - 1) // 2) for a, b in _windows(span_len, kept)]
    else:
        gh, gw = grid
        if gh * gw != span_len:
            raise ValueError(f"Pool: grid {grid} has {gh * gw} cells but the span has {span_len} tokens.")
        oh, ow = factor_pair(kept, gh / gw)
        if oh > gh or ow > gw:
            raise ValueError(f"Pool: cannot pool a {gh}x{gw} grid to {kept} = {oh}x{ow} cells.")
        cells = []
        for ra, rb in _windows(gh, oh):
            for ca, cb in _windows(gw, ow):
                members = [r * gw + c for r in range(ra, rb) for c in range(ca, cb)]
                cells.append((members, ((ra + rb - 1) // 2) * gw + (ca + cb - 1) // 2))
    w = torch.zeros(kept, span_len)
    for i, (members, _) in enumerate(cells):
        w[i, members] = 1.0 / len(members)
    rep = torch.tensor([c for _, c in cells], dtype=torch.long)
    return w, rep


class Pool(TokenSelector):
    """Average pooling of the span to the budget (a merging baseline; no attention maps, no model state).

    Args:
        num_kept: pooled tokens (exclusive with ``keep_ratio``).
        keep_ratio: fraction kept.
        grid: ``(h, w)`` image grid of the span for 2-D pooling; None pools along the sequence (or uses the
            applier's grid, e.g. a ViT's patch grid).

    Example::

        >>> h = torch.arange(8.0).view(1, 4, 2)
        >>> sel = Pool(num_kept=2).select(SelectionContext(h, torch.tensor([0]), 4, torch.ones(1, 4, dtype=torch.bool)))
        >>> sel.indices.tolist(), sel.values.tolist()
        ([[0, 2]], [[[1.0, 2.0], [5.0, 6.0]]])
    """

    def __init__(
        self,
        num_kept: int | None = None,
        keep_ratio: float | None = None,
        grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(num_kept=num_kept, keep_ratio=keep_ratio)
        if grid is not None:
            grid = tuple(grid)
            if len(grid) != 2 or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
                raise ValueError(f"Pool: `grid` must be None or two ints >= 1 (h, w), got {grid!r}.")
        self.grid = grid
        self._cache: dict = {}

    def select(self, ctx: SelectionContext) -> Selection:
        k = self.check_span(ctx.span_len)
        grid = self.grid if self.grid is not None else ctx.grid
        key = (ctx.span_len, k, grid)
        if key not in self._cache:
            self._cache[key] = pool_matrix(ctx.span_len, k, grid)
        w, rep = self._cache[key]
        span = ctx.span_index()
        d = ctx.hidden.shape[-1]
        x = ctx.hidden.gather(1, span.unsqueeze(-1).expand(-1, -1, d))  # [B, S, D]
        values = torch.matmul(w.to(device=x.device, dtype=x.dtype), x)  # [B, k, D]
        idx = ctx.span_start.reshape(-1, 1) + rep.to(x.device)
        return Selection(idx, values)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grid={self.grid}"
