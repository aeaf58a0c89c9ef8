"""Batches whose sequences keep different numbers of tokens, and the attention-mask algebra of a pruned call.

A batch of real multimodal prompts does not hold the same number of image tokens in every sequence
(LLaVA-NeXT's any-resolution tiling gives each image its own count; a text-only prompt holds none). Each
sequence is then pruned with its own span and budget, so the pruned sequences have different lengths
``L'_b``. Layers >= K and the KV cache need one rectangular batch, so the shorter sequences are
**left-padded** to ``max_b L'_b`` with *filler* slots: copies of the sequence's first kept position whose
key/value columns are masked for every query (in the prefill and in every later decoding step). Left
padding keeps each sequence's last token at the last position, which is where ``generate`` reads the next
token's logits. Fillers cost compute and cache memory (they are counted in ``PruneRecord.kept_len``) but
never change a real token's output: a padded batch equals the single runs (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pad_keep_rows", "mask_columns", "causal_mask"]


def pad_keep_rows(rows: list[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Left-pad 1-D sorted keep rows to one ``[B, n_max]`` tensor; return it and the filler flags.

    Example::

        >>> keep, fill = pad_keep_rows([torch.tensor([0, 2, 3]), torch.tensor([1, 4])])
        >>> keep.tolist(), fill.tolist()
        ([[0, 2, 3], [1, 1, 4]], [[False, False, False], [True, False, False]])
    """
    n = max(int(r.numel()) for r in rows)
    if all(int(r.numel()) == n for r in rows):
        return torch.stack(rows), None
    out, fill = [], []
    for r in rows:
        pad = n - int(r.numel())
        out.append(torch.cat([r[:1].expand(pad), r]))
        f = torch.zeros(n, dtype=torch.bool, device=r.device)
        f[:pad] = True
        fill.append(f)
    return torch.stack(out), torch.stack(fill)


def mask_columns(mask: Tensor, masked: Tensor) -> Tensor:
    """Forbid attention to the key columns flagged in ``masked`` (``[B, K]``) of a 4-D mask ``[B, 1|H, q, K]``.

    Works for boolean masks (True = attend, SDPA) and additive float masks (eager).

    Example::

        >>> m = mask_columns(torch.ones(1, 1, 2, 3, dtype=torch.bool), torch.tensor([[True, False, False]]))
        >>> m[0, 0].tolist()
        [[False, True, True], [False, True, True]]
    """
    cols = masked[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & ~cols
    return mask.masked_fill(cols, torch.finfo(mask.dtype).min)


def causal_mask(qpos: Tensor, cols: Tensor, boolean: bool, dtype: torch.dtype) -> Tensor:
    """Materialised causal mask ``[B, 1, q, K]``: query at original position ``qpos[b, i]`` sees key ``cols[b, j]``
    iff ``cols[b, j] <= qpos[b, i]`` (positions in layer-0 coordinates, so gaps left by pruning are kept).

    Example::

        >>> causal_mask(torch.tensor([[2, 5]]), torch.tensor([[2, 5]]), True, torch.float32)[0, 0].tolist()
        [[True, False], [True, True]]
    """
    allowed = cols[:, None, None, :] <= qpos[:, None, :, None]
    if boolean:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=cols.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
