"""Data Whisperer's scoring math (paper Eq. 4-6): demonstration weights, token spans, query scores, accumulation.

Pure functions of attention maps, offsets and answers (no model): see :mod:`lightning_eff.select.data_whisperer`
for the procedure and the paper (Wang et al., ACL 2025, arXiv:2505.12212).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_eff.llm.metrics import METRICS, extract_answer

__all__ = [
    "demonstration_weights",
    "token_spans",
    "query_scores",
    "accumulate_scores",
    "WhispererResult",
]


def demonstration_weights(
    attention: Tensor, demo_spans: Sequence[tuple[int, int]], response_span: tuple[int, int]
) -> Tensor:
    """Normalised attention weight ``w_j`` of each demonstration (paper Eq. 4-5).

    ``a_j = A[R, D_j].sum() / (|D_j| |R|)`` and ``w_j = a_j / sum_j' a_j'``, where ``A`` is the head-summed
    attention ``[query_len, key_len]``, ``D_j = [start_j, end_j)`` a demonstration's key (column) span and
    ``R = [start, end)`` the response block's query (row) span. If every ``a_j`` is 0 the weights are uniform.

    Args:
        attention: ``[query_len, key_len]`` attention summed over heads.
        demo_spans: ``[(start, end), ...]`` column spans, non-empty and inside ``key_len``.
        response_span: ``(start, end)`` row span, non-empty and inside ``query_len``.

    Returns:
        float tensor ``[len(demo_spans)]`` summing to 1.

    Example::

        >>> A = torch.tensor([[1., 0., 0., 0.], [.5, .5, 0., 0.], [.2, .2, .6, 0.], [.1, .3, .2, .4]])
        >>> demonstration_weights(A, [(0, 1), (1, 3)], (2, 4))  # a = (.3/2, 1.3/4)
        tensor([0.3158, 0.6842])
    """
    if not isinstance(attention, Tensor) or attention.ndim != 2:
        shape = tuple(attention.shape) if isinstance(attention, Tensor) else type(attention).__name__
        raise ValueError(
            f"demonstration_weights: `attention` must be a 2-D tensor [query_len, key_len], got {shape}."
        )
    n_rows, n_cols = attention.shape
    if len(demo_spans) == 0:
        raise ValueError("demonstration_weights: `demo_spans` must not be empty.")
    r0, r1 = (int(v) for v in response_span)
    if not 0 <= r0 < r1 <= n_rows:
        raise ValueError(
            f"demonstration_weights: `response_span` {tuple(response_span)} must satisfy 0 <= start < end <= "
            f"query_len={n_rows}."
        )
    rows = attention[r0:r1].to(torch.float64)
    a = []
    for j, span in enumerate(demo_spans):
        s, e = (int(v) for v in span)
        if not 0 <= s < e <= n_cols:
            raise ValueError(
                f"demonstration_weights: demo span {j} = {tuple(span)} must satisfy 0 <= start < end <= "
                f"key_len={n_cols}."
            )
        a.append(rows[:, s:e].sum() / ((e - s) * (r1 - r0)))
    a_t = torch.stack(a)
    total = a_t.sum()
    if not torch.isfinite(total):
        raise ValueError("demonstration_weights: the attention contains NaN or inf.")
    if total <= 0:
        return torch.full((len(a),), 1.0 / len(a), dtype=torch.float32)
    return (a_t / total).to(torch.float32)


def token_spans(
    offsets: Sequence[tuple[int, int]],
    char_spans: Sequence[tuple[int, int]],
    special_tokens_mask: Sequence[int] | None = None,
) -> list[tuple[int, int]]:
    """Map ``[start, end)`` character spans to ``[first, last + 1)`` token spans.

    A token belongs to the character span that contains its first character (``offsets[t][0]``); special
    tokens (``special_tokens_mask[t] == 1``) and zero-width tokens belong to none. Tokens of one span are
    contiguous because offsets increase.

    Args:
        offsets: per-token ``(char_start, char_end)`` from a fast tokenizer's ``return_offsets_mapping``.
        char_spans: character spans to map.
        special_tokens_mask: per-token 1 for special tokens (optional).

    Raises:
        ValueError: a span contains no token.

    Example::

        >>> token_spans([(0, 0), (0, 3), (3, 4), (4, 9), (9, 12)], [(0, 4), (4, 12)], [1, 0, 0, 0, 0])
        [(1, 3), (3, 5)]
    """
    starts = [
        (
            int(s)
            if int(e) > int(s) and not (special_tokens_mask is not None and special_tokens_mask[t])
            else -1
        )
        for t, (s, e) in enumerate(offsets)
    ]
    out = []
    for cs, ce in char_spans:
        members = [t for t, s in enumerate(starts) if s >= 0 and cs <= s < ce]
        if not members:
            raise ValueError(f"token_spans: no token starts inside the character span ({cs}, {ce}).")
        out.append((members[0], members[-1] + 1))
    return out


def query_scores(
    predictions: Sequence[str], references: Sequence[str], metric: str = "exact_match"
) -> list[float] | None:
    """Per-query scores ``s_k``, or ``None`` when there are fewer predictions than references (skipped prompt).

    Extra predictions are ignored (as in the official code). With ``exact_match`` the reference's final
    number is :func:`~lightning_eff.llm.metrics.extract_answer` of the gold answer.

    Example::

        >>> query_scores(["4", "6"], ["2 + 2 = 4\\n#### 4", "#### 5"])
        [1.0, 0.0]
        >>> query_scores(["4"], ["#### 4", "#### 5"]) is None
        True
    """
    if metric not in METRICS:
        raise ValueError(f"query_scores: `metric` must be one of {tuple(METRICS)}, got {metric!r}.")
    if len(predictions) < len(references):
        return None
    fn = METRICS[metric]
    if metric == "exact_match":
        return [fn(p, extract_answer(r)) for p, r in zip(predictions, references)]
    return [fn(p, r) for p, r in zip(predictions, references)]


def accumulate_scores(
    score_sum: Tensor, count: Tensor, demo_indices: Sequence[int], weights: Tensor, scores: Sequence[float]
) -> None:
    """Add one prompt's contribution in place (paper Eq. 6): ``score_sum[j] += w_j * sum_k s_k``,
    ``count[j] += n_q``; the final score is ``score_sum / count``.

    Example::

        >>> total, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        >>> accumulate_scores(total, count, [0, 2], torch.tensor([0.25, 0.75]), [1.0, 0.0, 1.0])
        >>> (total / count.clamp(min=1)).tolist()  # w_j * mean(s) = w_j * 2/3
        [0.16666666666666666, 0.0, 0.5]
    """
    if len(demo_indices) != len(weights):
        raise ValueError(f"accumulate_scores: {len(demo_indices)} demonstrations but {len(weights)} weights.")
    idx = torch.as_tensor(list(demo_indices), dtype=torch.long, device=score_sum.device)
    score_sum.index_add_(0, idx, weights.to(score_sum) * float(sum(scores)))
    count.index_add_(
        0, idx, torch.full((len(idx),), float(len(scores)), dtype=count.dtype, device=count.device)
    )


@dataclass
class WhispererResult:
    """Accumulated scores of a (shard of a) Data Whisperer run.

    ``score_sum`` and ``count`` are ``[N]`` (one pass) or ``[passes, N]``; a pass's score is ``score_sum / count``
    (0 where ``count == 0``) and :attr:`scores` averages the passes in which an example was scored.
    ``query_score_sum / num_queries`` is the scorer's in-context accuracy on the queries of the prompts that
    were not skipped; ``num_skipped / num_prompts`` is the share of prompts with too few parsed answers."""

    score_sum: Tensor
    count: Tensor
    num_prompts: int
    num_skipped: int
    query_score_sum: float = 0.0
    num_queries: int = 0

    @property
    def pass_scores(self) -> Tensor:
        """Per-pass scores ``[passes, N]``."""
        s, c = self.score_sum.reshape(-1, self.score_sum.shape[-1]), self.count.reshape(-1, self.count.shape[-1])
        return torch.where(c > 0, s / c.clamp(min=1), torch.zeros_like(s))

    @property
    def scores(self) -> Tensor:
        """Final per-example scores ``[N]``: the mean over the passes that scored the example (0 if none did)."""
        c = self.count.reshape(-1, self.count.shape[-1])
        scored = (c > 0).to(self.score_sum.dtype)
        n = scored.sum(0)
        return torch.where(n > 0, (self.pass_scores * scored).sum(0) / n.clamp(min=1), torch.zeros_like(n))

    def pass_agreement(self) -> float:
        """Mean pairwise Spearman rank correlation between the passes' scores (NaN with one pass or constant scores).

        Example::

            >>> r = WhispererResult(torch.tensor([[1., 2., 3.], [1., 3., 2.]]), torch.ones(2, 3), 2, 0)
            >>> round(r.pass_agreement(), 6)
            0.5
        """
        scores = self.pass_scores
        if scores.shape[0] < 2:
            return float("nan")
        ranks = torch.stack([_average_ranks(row) for row in scores])
        corr = []
        for i in range(len(ranks)):
            for j in range(i + 1, len(ranks)):
                a, b = ranks[i] - ranks[i].mean(), ranks[j] - ranks[j].mean()
                denom = float(a.norm() * b.norm())
                if denom > 0:
                    corr.append(float((a * b).sum()) / denom)
        return sum(corr) / len(corr) if corr else float("nan")


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks of ``x`` (0-based), ties sharing their mean rank (as ``scipy.stats.rankdata(method='average')``)."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    values = x[order]
    out = ranks.clone()
    start = 0
    for i in range(1, len(x) + 1):
        if i == len(x) or values[i] != values[start]:
            out[order[start:i]] = ranks[order[start:i]].mean()
            start = i
    return out
