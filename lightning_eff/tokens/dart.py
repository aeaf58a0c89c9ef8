"""DART: duplication-aware reduction of (vision) tokens.

Paper: Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More" (EMNLP 2025, arXiv 2502.11494), Sec. 3 (Eq. 1-4). Official code: ZichenWen1/DART
(``llava/model/language_model/modeling_llama_self.py``, ``get_retained_image_token``).

At decoder layer K (default 2), from the outputs of layer K-1:

* **Pivots** (Sec. 3.2): the ``p_img`` image tokens and the ``p_txt`` text tokens (tokens after the image
  span) with the largest L1 norm of their key states ``K^{(K-1)}`` (after RoPE and ``repeat_kv``, heads
  concatenated).
* **Duplication** (Eq. 2): cosine similarity ``cos(h_pivot, h_j)`` of the final-normed hidden states
  ``h = norm(x^{(K-1)})`` between each pivot and each candidate image token.
* **Selection** (Eq. 3-4): for each pivot in turn, the ``TOPK = max_kept // (p_img + p_txt)`` candidates with
  the *lowest* similarity are kept and removed from the candidates (image pivots are never candidates).
  Kept image tokens = image pivots + selected, i.e. ``p_img + (p_img + p_txt) * TOPK`` tokens (132 for
  LLaVA-1.5's default ``max_kept=128``).

Departures from the official code (all documented, none changes the rule):

* Pivots are visited in ascending position order. The official code iterates a Python ``set`` of positions,
  whose order depends on hashing (``pos mod table size``), so its result depends on an implementation detail.
* Batches: the official code asserts batch size 1 and indexes ``[0]``; :func:`dart_select` runs the rule for
  every sequence at once on the device (one ``topk`` per pivot, no host synchronisation), with per-sequence
  image spans and padding excluded from the text pivots.
* Cosine similarities are computed in float32 as a normalised matrix product instead of one
  ``F.cosine_similarity`` call per pivot (same values up to rounding).
* A ``keep_ratio`` budget gives ``max_kept = max(1, round(keep_ratio * L_img))`` (the official code floors
  ``L_img * (1 - reduction_ratio) // 8`` as a float).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_eff.tokens.api import Selection, SelectionContext, TokenSelector, span_positions
from lightning_eff.utils.checks import check_int

__all__ = ["DART", "dart_keep_indices", "dart_select", "dart_num_kept"]


def dart_num_kept(max_kept: int, num_image_pivots: int = 4, num_text_pivots: int = 4) -> int:
    """Number of image tokens DART keeps: ``p_img + (p_img + p_txt) * (max_kept // (p_img + p_txt))``.

    Example::

        >>> dart_num_kept(128), dart_num_kept(64)
        (132, 68)
    """
    p = num_image_pivots + num_text_pivots
    return num_image_pivots + p * (max_kept // p)


def _check_pivots(owner: str, num_image_pivots: int, num_text_pivots: int, max_kept: int) -> None:
    for name, v in (("num_image_pivots", num_image_pivots), ("num_text_pivots", num_text_pivots)):
        check_int(v, name, minimum=0, owner=owner)
    if num_image_pivots + num_text_pivots < 1:
        raise ValueError(f"{owner}: need at least one pivot, got num_image_pivots=0 and num_text_pivots=0.")
    check_int(max_kept, "max_kept", minimum=1, owner=owner)


def dart_select(
    normed: Tensor,
    keys: Tensor,
    span_start: Tensor,
    span_len: int,
    valid: Tensor | None = None,
    num_image_pivots: int = 4,
    num_text_pivots: int = 4,
    max_kept: int = 128,
) -> Tensor:
    """DART's rule for a batch: ``[B, k]`` sorted absolute positions of the kept image tokens.

    Args:
        normed: ``[B, L, D]`` hidden states of layer K-1 after the model's final norm.
        keys: ``[B, L, H*d]`` key states of layer K-1 (after RoPE and ``repeat_kv``).
        span_start: ``[B]`` first image position of each sequence.
        span_len: image tokens per sequence.
        valid: ``[B, L]`` bool, False at padding (never a text pivot); None means all valid.
        num_image_pivots: ``p_img``.
        num_text_pivots: ``p_txt``, taken among the valid tokens after the image span.
        max_kept: ``M``; ``TOPK = M // (p_img + p_txt)``.

    Returns:
        ``[B, p_img + (p_img + p_txt) * TOPK]`` long tensor.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> h, k = torch.randn(2, 20, 8, generator=g), torch.randn(2, 20, 8, generator=g)
        >>> dart_select(h, k, torch.tensor([2, 3]), 12, num_image_pivots=2, num_text_pivots=2, max_kept=4).shape
        torch.Size([2, 6])
    """
    _check_pivots("dart_select", num_image_pivots, num_text_pivots, max_kept)
    b, seq_len, _ = normed.shape
    device = normed.device
    p_all = num_image_pivots + num_text_pivots
    topk = max_kept // p_all
    kept = num_image_pivots + p_all * topk
    if kept > span_len:
        raise ValueError(
            f"DART: the budget keeps {kept} image tokens (p_img + (p_img + p_txt) * TOPK with max_kept={max_kept}) "
            f"but the image span has only {span_len}; lower max_kept."
        )
    span_start = span_start.to(device=device, dtype=torch.long).reshape(b)
    img_pos = span_positions(span_start, span_len)  # [B, S]
    key_l1 = keys.float().abs().sum(-1)  # [B, L]   (Sec. 3.2: pivots by L1 norm of K)
    img_l1 = key_l1.gather(1, img_pos)
    img_piv = img_l1.topk(num_image_pivots, dim=1).indices  # span-relative, [B, p_img]
    pivots = [img_pos.gather(1, img_piv)]
    if num_text_pivots:
        pos = torch.arange(seq_len, device=device).expand(b, -1)
        text = pos >= (span_start + span_len).reshape(-1, 1)
        if valid is not None:
            text = text & valid.to(device)
        counts = text.sum(1)
        if bool((counts < num_text_pivots).any()):
            raise ValueError(
                f"DART: num_text_pivots={num_text_pivots} but a sequence has only {int(counts.min())} (valid) "
                f"tokens after its image span; lower num_text_pivots."
            )
        txt_piv = key_l1.masked_fill(~text, float("-inf")).topk(num_text_pivots, dim=1).indices
        pivots.append(txt_piv)
    pivots = torch.sort(torch.cat(pivots, dim=1), dim=1).values  # ascending position order
    unit = F.normalize(normed.float(), dim=-1, eps=1e-8)
    piv_h = unit.gather(1, pivots.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))  # [B, P, D]
    img_h = unit.gather(1, img_pos.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))  # [B, S, D]
    sim = torch.bmm(piv_h, img_h.transpose(1, 2))  # [B, P, S]  (Eq. 2)
    available = torch.ones(b, span_len, dtype=torch.bool, device=device)
    available.scatter_(1, img_piv, False)
    if topk > 0:
        neg_inf = torch.tensor(float("-inf"), device=device)
        for i in range(p_all):  # Eq. 3-4: least similar candidates of each pivot, removed as they are taken
            score = torch.where(available, -sim[:, i], neg_inf)
            available.scatter_(1, score.topk(topk, dim=1).indices, False)
    order = torch.argsort(available.to(torch.int8), dim=1, stable=True)[:, :kept]
    return img_pos.gather(1, order)


def dart_keep_indices(
    hidden: Tensor,
    keys: Tensor,
    image_start: int,
    image_len: int,
    num_image_pivots: int = 4,
    num_text_pivots: int = 4,
    max_kept: int = 128,
) -> Tensor:
    """DART's kept image tokens for one sequence (the pure rule; see the module docstring).

    Args:
        hidden: ``[L, D]`` hidden states of layer K-1, already final-normed.
        keys: ``[L, H*d]`` key states of layer K-1 (after RoPE and ``repeat_kv``, heads concatenated).
        image_start: position of the first image token.
        image_len: number of image tokens.
        num_image_pivots: ``p_img`` (default 4).
        num_text_pivots: ``p_txt`` (default 4), among the tokens after the image span.
        max_kept: ``M`` (default 128, LLaVA-1.5's ``max_num_trunction``); ``TOPK = M // (p_img + p_txt)``.

    Returns:
        Sorted absolute positions of the kept image tokens, ``p_img + (p_img + p_txt) * TOPK`` of them.

    Raises:
        ValueError: span out of range, budget larger than the span, too few text tokens, bad shapes.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> h, k = torch.randn(30, 16, generator=g), torch.randn(30, 16, generator=g)
        >>> idx = dart_keep_indices(h, k, image_start=3, image_len=20, max_kept=8)
        >>> len(idx), bool((idx >= 3).all() and (idx < 23).all()), idx.tolist() == sorted(idx.tolist())
        (12, True, True)
    """
    if hidden.dim() != 2 or keys.dim() != 2 or hidden.shape[0] != keys.shape[0]:
        raise ValueError(
            f"dart_keep_indices: expected hidden [L, D] and keys [L, H*d] with the same L, got "
            f"{tuple(hidden.shape)} and {tuple(keys.shape)}."
        )
    seq_len = hidden.shape[0]
    for name, v in (("image_start", image_start), ("image_len", image_len)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"dart_keep_indices: `{name}` must be an int, got {v!r}.")
    if image_start < 0 or image_len < 1 or image_start + image_len > seq_len:
        raise ValueError(
            f"dart_keep_indices: image span [{image_start}, {image_start + image_len}) is out of range for a "
            f"sequence of {seq_len} tokens."
        )
    out = dart_select(
        hidden.unsqueeze(0),
        keys.unsqueeze(0),
        torch.tensor([image_start], device=hidden.device),
        image_len,
        None,
        num_image_pivots,
        num_text_pivots,
        max_kept,
    )
    return out[0]


class DART(TokenSelector):
    """DART as a selector (duplication-aware; needs the key states of layer K-1, not attention maps).

    The budget is DART's ``max_kept`` (``M``), given as a count (``num_kept``) or as a fraction of the image
    span (``keep_ratio``); DART then keeps ``p_img + (p_img + p_txt) * (M // (p_img + p_txt))`` tokens.

    Args:
        num_kept: ``M`` (LLaVA-1.5 default 128; 64 is the paper's 88.9% setting).
        keep_ratio: ``M = round(keep_ratio * L_img)`` instead.
        num_image_pivots: ``p_img`` (default 4).
        num_text_pivots: ``p_txt`` (default 4); use 0 where no text follows the span (ViT encoders).

    Example::

        >>> sel = DART(num_kept=128)
        >>> sel.num_kept_for(576)
        132
    """

    needs_keys = True
    needs_normed = True

    def __init__(
        self,
        num_kept: int | None = None,
        keep_ratio: float | None = None,
        num_image_pivots: int = 4,
        num_text_pivots: int = 4,
    ) -> None:
        super().__init__(num_kept=num_kept, keep_ratio=keep_ratio)
        _check_pivots("DART", num_image_pivots, num_text_pivots, 1)
        self.num_image_pivots = num_image_pivots
        self.num_text_pivots = num_text_pivots

    def num_kept_for(self, span_len: int) -> int:
        return dart_num_kept(self.budget_for(span_len), self.num_image_pivots, self.num_text_pivots)

    def select(self, ctx: SelectionContext) -> Selection:
        if ctx.keys is None:
            raise ValueError("DART: the selection context has no key states (the applier must capture them).")
        normed = ctx.normed if ctx.normed is not None else ctx.hidden
        idx = dart_select(
            normed,
            ctx.keys,
            ctx.span_start,
            ctx.span_len,
            ctx.valid,
            self.num_image_pivots,
            self.num_text_pivots,
            self.budget_for(ctx.span_len),
        )
        return Selection(idx)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_image_pivots={self.num_image_pivots}, num_text_pivots={self.num_text_pivots}"
