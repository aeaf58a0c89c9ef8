"""Applying a selector inside a ``transformers`` decoder (Llama, Qwen2, Mistral families) with forward hooks.

DART paper (arXiv 2502.11494) Sec. 3.3 / official ``modeling_llama_self.py``: at layer K the hidden states, the
attention mask and the position ids are sliced to the kept tokens; the position ids keep their original
values, so RoPE positions have gaps; layers >= K (and their KV cache) see the shorter sequence.

The official code forks the modeling file (pinned to an old ``transformers``) and asserts batch size 1. Here
nothing is copied: :class:`DecoderTokenPruner` registers

* a pre/post hook on the decoder model (``LlamaModel``/``Qwen2Model``/``MistralModel``, or the language model
  of LLaVA / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL) to see the call's ``input_ids`` and 2-D ``attention_mask``
  (padding) and to time the prefill, and pre/post hooks on the ``transformers`` models between the attached
  model and the decoder, whose ``input_ids`` are used when the decoder is called with ``inputs_embeds``
  (see :mod:`lightning_eff.tokens.hf_compat`);
* hooks on layer K-1 to capture what the selector needs (key states from ``k_proj``, RoPE'd here;
  attention weights for FastV);
* a pre-hook on every layer >= K that replaces the hidden states (layer K only), ``position_ids``,
  ``position_embeddings`` (cos/sin gathered at the kept positions) and the attention mask.

KV cache: layers < K cache all ``L`` tokens, layers >= K cache ``L'``. The cache's reported length (layer 0)
stays ``L``, so ``generate`` keeps numbering new tokens from the original positions. In later calls
(decoding) the 4-D mask the model builds for ``L + t`` keys is re-indexed for layers >= K to the kept
prefix columns plus the new ones (the pruning record is stored per cache object). This works for eager and
SDPA attention, for padded batches (left or right padding; sequences with different span lengths are padded
with masked filler slots, see :mod:`lightning_eff.tokens.batching`) and for the ``DynamicCache`` that
``generate`` and ``forward(use_cache=True)`` use.

Not supported (clear errors): FlashAttention/flex attention (they take no 4-D mask), static or
sliding-window caches beyond the window, beam search with a non-deterministic selector (:class:`Random`)
because beams of one prompt would keep different tokens.
"""

from __future__ import annotations

import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.tokens.api import Selection, SelectionContext, TokenSelector, build_keep_index
from lightning_eff.tokens.batching import causal_mask, mask_columns, pad_keep_rows
from lightning_eff.tokens.hf_compat import (
    _get_path,
    config_image_token,
    find_decoder,
    gather_positions,
    id_carriers,
    merge_mrope,
)
from lightning_eff.tokens.pruner import HookedPruner, PruneRecord
from lightning_eff.utils.checks import check_int

__all__ = ["DecoderTokenPruner", "PruneRecord", "find_decoder", "SUPPORTED_ATTENTION"]

SUPPORTED_ATTENTION = ("eager", "sdpa")
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class _State:
    """Per-cache record of a pruned prefill: which cache slots layers >= K hold."""

    kept_cols: Tensor  # [B, past + L'] slot indices (layer-0 coordinates) held by layers >= K
    end: int  # first slot after the pruned call
    masked: Tensor | None = None  # [B, past + L'] True at filler slots (mixed span lengths), never attended


@dataclass
class _Call:
    input_ids: Tensor | None
    mask2d: Tensor | None
    t0: float | None = None
    captured: dict = field(default_factory=dict)
    sub: dict | None = None
    hidden: Tensor | None = None
    record: PruneRecord | None = None


class DecoderTokenPruner(HookedPruner):
    """Prunes a span of tokens (image tokens) inside a ``transformers`` decoder at layer K.

    Args:
        selector: the :class:`~lightning_eff.tokens.TokenSelector` (DART, Random, FastV, Pool, ...).
        layer: K, the first layer that sees the pruned sequence (>= 1; DART default 2).
        image_token_id: the compressible span is the (contiguous) run of this token id in ``input_ids``.
            The ids are read from the decoder's own ``input_ids`` or, when a multimodal class
            (``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
            ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``) calls its language
            model with ``inputs_embeds``, from the outer model's ``input_ids``. Default (with no ``span``
            either): the image token of the attached model's config, if it declares one.
        span: ``(start, length)`` or ``([start_b, ...], length)``: the span by positions in the prefill call's
            input (needed when the model is called with ``inputs_embeds``).
        grid: ``(h, w)`` layout of the span for grid-aware selectors (:class:`Pool`).
        measure_latency: time every prefill call (synchronising CUDA), stored in ``PruneRecord.latency_ms``.

    The span can also be set per call with :meth:`set_span`. Use as a context manager or ``attach``/``detach``.

    Budget and span: when the budget keeps at least as many tokens as a sequence's span holds (a small image,
    a large ``num_kept``), that sequence keeps its whole span and a ``UserWarning`` is issued once per pruner.
    Sequences of one batch may hold different numbers of image tokens (LLaVA-NeXT images of different
    resolutions, a text-only prompt beside an image prompt): each is pruned with its own span and budget, and
    the shorter pruned sequences are left-padded with masked filler slots to the longest one, so layers >= K
    and the KV cache see one ``[B, L']`` batch (``PruneRecord.fillers`` marks the slots; the logits of a
    pruned call have ``L'`` positions, the last one being each sequence's last token, which is what
    ``generate`` reads).

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from lightning_eff.tokens import DART
        >>> _ = torch.manual_seed(0)
        >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
        ...                                   num_hidden_layers=4, num_attention_heads=4)).eval()
        >>> ids = torch.tensor([[1, 2] + [31] * 40 + [3, 4, 5, 6, 7]])
        >>> with DecoderTokenPruner(DART(num_kept=16), layer=2, image_token_id=31).attach(lm) as pruner:
        ...     out = lm(ids)
        >>> pruner.last_record.kept_len, out.logits.shape[1]   # 47 - 40 + (4 + 8 * 2)
        (27, 27)
    """

    def __init__(
        self,
        selector: TokenSelector,
        layer: int = 2,
        image_token_id: int | None = None,
        span: tuple[Any, int] | None = None,
        grid: tuple[int, int] | None = None,
        measure_latency: bool = False,
    ) -> None:
        if not isinstance(selector, TokenSelector):
            raise TypeError(
                f"DecoderTokenPruner: `selector` must be a TokenSelector (DART, Random, FastV, Pool, ...), "
                f"got {selector!r}."
            )
        check_int(layer, "layer", minimum=1, owner="DecoderTokenPruner")  # K
        if image_token_id is not None and span is not None:
            raise ValueError("DecoderTokenPruner: give `image_token_id` or `span`, not both.")
        if image_token_id is not None and (
            isinstance(image_token_id, bool) or not isinstance(image_token_id, int)
        ):
            raise TypeError(f"DecoderTokenPruner: `image_token_id` must be an int, got {image_token_id!r}.")
        self.selector = selector
        self.layer = layer
        self.image_token_id = image_token_id
        self.span = None
        if span is not None:
            self.set_span(*span)
        self.grid = None if grid is None else tuple(grid)
        self.measure_latency = bool(measure_latency)
        self.records: list[PruneRecord] = []
        self.prefill_ms: list[float] = []
        self.decoder: nn.Module | None = None
        self._handles: list[Any] = []
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._call: _Call | None = None
        self._carriers: list[nn.Module] = []
        self._outer: list[tuple[Tensor | None, Tensor | None]] = []
        self._token_id: int | None = image_token_id
        self._warned_full = False

    # ------------------------------------------------------------------------------------------ span
    def set_span(self, start: Any, length: int) -> None:
        """Set the span by positions: ``start`` an int or one int per sequence, ``length`` an int >= 1."""
        check_int(length, "length", minimum=1, owner="DecoderTokenPruner.set_span")
        starts = torch.as_tensor(start, dtype=torch.long).reshape(-1)
        if starts.numel() == 0 or bool((starts < 0).any()):
            raise ValueError(f"DecoderTokenPruner: span start must be >= 0, got {start!r}.")
        self.span = (starts, length)

    # ------------------------------------------------------------------------------------------ attach
    def attach(self, model: nn.Module, model_path: str | None = None) -> DecoderTokenPruner:
        """Register the hooks on the decoder found in ``model`` (see :func:`find_decoder`)."""
        if self.attached:
            raise RuntimeError("DecoderTokenPruner: already attached; call detach() first.")
        decoder = find_decoder(model, model_path)
        n = len(decoder.layers)
        if self.layer >= n:
            raise ValueError(
                f"DecoderTokenPruner: `layer`={self.layer} is beyond the decoder's depth: it has {n} layers, "
                f"so K must be in [1, {n - 1}]."
            )
        self._check_attention(decoder)
        self.decoder = decoder
        root = _get_path(model, model_path) if model_path else model
        self._carriers = id_carriers(root, decoder)
        self._token_id = self.image_token_id
        if self._token_id is None and self.span is None:
            self._token_id = config_image_token(self._carriers)
        h = self._handles
        for m in self._carriers:
            h.append(m.register_forward_pre_hook(self._outer_pre, with_kwargs=True))
            h.append(m.register_forward_hook(self._outer_post, with_kwargs=True, always_call=True))
        h.append(decoder.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        h.append(decoder.register_forward_hook(self._model_post, with_kwargs=True, always_call=True))
        prev = decoder.layers[self.layer - 1]
        if self.selector.needs_keys:
            h.append(prev.self_attn.register_forward_pre_hook(self._capture_rope, with_kwargs=True))
            h.append(prev.self_attn.k_proj.register_forward_hook(self._capture_keys))
        if self.selector.needs_attentions:
            h.append(prev.self_attn.register_forward_hook(self._capture_attn))
        for i in range(self.layer, n):
            h.append(decoder.layers[i].register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True))
        return self

    def detach(self) -> None:
        """Remove every hook; the model is exactly as before :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._call = None
        self.decoder = None
        self._carriers, self._outer = [], []
        self._states = weakref.WeakKeyDictionary()

    @property
    def resolved_image_token_id(self) -> int | None:
        """The image token id in use: ``image_token_id``, or the attached model's config's (None if neither)."""
        return self._token_id

    def _check_attention(self, decoder: nn.Module) -> None:
        impl = getattr(decoder.config, "_attn_implementation", None) or "eager"
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"DecoderTokenPruner: attention implementation {impl!r} is not supported; use one of "
                f"{SUPPORTED_ATTENTION} (FlashAttention and flex attention take no 4-D mask to re-index)."
            )
        if self.selector.needs_attentions and impl != "eager":
            raise ValueError(
                f"DecoderTokenPruner: {type(self.selector).__name__} needs attention weights, which only "
                f"attn_implementation='eager' returns (the model uses {impl!r}); load it with "
                f"attn_implementation='eager' or use an attention-free selector such as DART."
            )

    # ------------------------------------------------------------------------------------------ records
    @property
    def last_keep_index(self) -> Tensor | None:
        """``[B, L']`` positions (in the pruned call's input) that the last pruned call kept."""
        return self.records[-1].keep_index if self.records else None

    # ------------------------------------------------------------------------------------------ hooks
    def _outer_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self._outer.append(
            (
                ids if isinstance(ids, Tensor) and ids.dim() == 2 else None,
                mask if isinstance(mask, Tensor) and mask.dim() == 2 else None,
            )
        )

    def _outer_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._outer:
            self._outer.pop()

    def _model_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        input_ids = input_ids if isinstance(input_ids, Tensor) else None
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() != 2:
            mask = None
        if input_ids is None or mask is None:  # a multimodal class called its language model with embeddings
            for ids, m in reversed(self._outer):
                input_ids = ids if input_ids is None else input_ids
                mask = m if mask is None else mask
        self._call = _Call(input_ids, mask)
        embeds = kwargs.get("inputs_embeds")
        q = (
            input_ids.shape[1]
            if isinstance(input_ids, Tensor)
            else (embeds.shape[1] if embeds is not None else 0)
        )
        if self.measure_latency and q > 1:
            self._sync()
            self._call.t0 = time.perf_counter()

    def _model_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call, self._call = self._call, None
        if call is None or call.t0 is None:
            return
        self._sync()
        ms = (time.perf_counter() - call.t0) * 1e3
        self.prefill_ms.append(ms)
        if call.record is not None:
            call.record.latency_ms = ms

    def _sync(self) -> None:
        if self.decoder is not None and torch.cuda.is_available():
            p = next(self.decoder.parameters(), None)
            if p is not None and p.is_cuda:
                torch.cuda.synchronize(p.device)

    def _capture_rope(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._call is not None:
            self._call.captured["rope"] = kwargs.get("position_embeddings")
            self._call.captured["attn_module"] = module

    def _capture_keys(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self._call is not None:
            self._call.captured["k_proj"] = output

    def _capture_attn(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._call is not None and isinstance(output, tuple) and len(output) > 1:
            self._call.captured["attn"] = output[1]

    def _make_layer_hook(self, idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            call = self._call
            if call is None:
                return None
            if idx == self.layer:
                hidden = args[0] if args else kwargs["hidden_states"]
                self._at_layer_k(call, hidden, kwargs)
            if not call.sub:
                return None
            kwargs = {**kwargs, **call.sub}
            if idx == self.layer and call.hidden is not None:
                if args:
                    args = (call.hidden, *args[1:])
                else:
                    kwargs["hidden_states"] = call.hidden
            return args, kwargs

        return hook

    # ------------------------------------------------------------------------------------------ layer K
    def _at_layer_k(self, call: _Call, hidden: Tensor, kwargs: dict) -> None:
        call.sub, call.hidden = {}, None
        cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
        self._check_cache(cache)
        b, q = hidden.shape[:2]
        past = int(cache.get_seq_length(0)) - q if cache is not None else 0
        mask = kwargs.get("attention_mask")
        if mask is not None and not isinstance(mask, Tensor):
            raise ValueError(f"DecoderTokenPruner: unsupported attention mask type {type(mask).__name__}.")
        if mask is not None and mask.shape[-1] != past + q:
            raise ValueError(
                f"DecoderTokenPruner: the attention mask covers {mask.shape[-1]} keys but the cache holds "
                f"{past + q}; only DynamicCache is supported."
            )
        self._check_window(past + q)
        state = self._states.get(cache) if cache is not None else None
        if state is not None:  # decoding after a pruned prefill: re-index the mask for layers >= K
            new = torch.arange(state.end, past + q, device=hidden.device).expand(b, -1)
            cols = torch.cat([state.kept_cols, new], dim=1)
            if mask is not None:
                m = self._gather_mask(mask, b, None, cols)
            elif q > 1 or state.masked is not None:
                qpos = torch.arange(past, past + q, device=hidden.device).expand(b, -1)
                m = causal_mask(qpos, cols, self._bool_mask(), hidden.dtype)
            else:
                return
            if state.masked is not None:
                m = mask_columns(m, torch.cat([state.masked, torch.zeros_like(new, dtype=torch.bool)], dim=1))
            call.sub["attention_mask"] = m
            return
        if q == 1:
            return
        span = self._resolve_span(call, b, q, hidden.device)
        if span is None:
            return
        starts, lens = span
        keep, kept_counts, h, fillers = self._select(call, hidden, starts, lens, past, q)
        n = len(self.decoder.layers)
        lens_t, kept_t = tuple(int(v) for v in lens.tolist()), tuple(kept_counts)
        record = PruneRecord(
            b, q, int(keep.shape[1]), max(lens_t), max(kept_t), self.layer, n, keep,
            span_lens=lens_t, span_kepts=kept_t, fillers=fillers,
        )  # fmt: skip
        call.record = record
        self.records.append(record)
        if h is None:  # every sequence keeps its whole span: nothing to prune
            return
        call.hidden = h.gather(1, keep.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        pos_ids = kwargs.get("position_ids")
        if pos_ids is not None:
            call.sub["position_ids"] = gather_positions(pos_ids, keep, -1)
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            call.sub["position_embeddings"] = tuple(gather_positions(t, keep, -2) for t in pe)
        cache_pos = kwargs.get("cache_position")
        if cache_pos is not None:
            # transformers 4.x passes cache_position to the layers, where only static caches use it (for the
            # slots to write); DynamicCache (the only cache allowed here) ignores it, so the first row will do.
            call.sub["cache_position"] = cache_pos[keep[0]]
        cols = torch.cat([torch.arange(past, device=hidden.device).expand(b, -1), keep + past], dim=1)
        masked = None
        if fillers is not None:
            masked = torch.cat([torch.zeros(b, past, dtype=torch.bool, device=hidden.device), fillers], dim=1)
        if mask is not None:
            m = self._gather_mask(mask, b, keep, cols)
        elif masked is not None:
            m = causal_mask(keep + past, cols, self._bool_mask(), hidden.dtype)
        else:
            m = None
        if m is not None and masked is not None:
            m = mask_columns(m, masked)
        call.sub["attention_mask"] = m
        if cache is not None:
            self._states[cache] = _State(kept_cols=cols, end=past + q, masked=masked)

    def _select(
        self, call: _Call, hidden: Tensor, starts: Tensor, lens: Tensor, past: int, q: int
    ) -> tuple[Tensor, list[int], Tensor | None, Tensor | None]:
        """Run the selector; return (keep ``[B, L']``, kept span tokens per sequence, hidden to gather from
        (None: nothing pruned), filler flags ``[B, L']`` or None)."""
        b = hidden.shape[0]
        lens_l = [int(v) for v in lens.tolist()]
        budgets = [self.selector.num_kept_for(n) if n > 0 else 0 for n in lens_l]
        whole = [n == 0 or k >= n for n, k in zip(lens_l, budgets)]
        if any(n > 0 and k > n for n, k in zip(lens_l, budgets)) and not self._warned_full:
            self._warned_full = True
            big = max((n, k) for n, k in zip(lens_l, budgets) if n > 0 and k > n)
            warnings.warn(
                f"{type(self.selector).__name__}: the budget keeps {big[1]} tokens but a sequence's span holds only "
                f"{big[0]}; such sequences keep their whole span (warned once per pruner).",
                UserWarning,
                stacklevel=2,
            )
        if all(whole):
            return torch.arange(q, device=hidden.device).expand(b, -1), lens_l, None, None
        full = self._context(call, hidden, starts, lens_l[0], past, q)
        if len(set(lens_l)) == 1:  # the common case: one span length, one batched selection
            sel = self.selector.select(full)
            kept = self._check_selection(sel, b, starts, lens_l[0])
            keep = build_keep_index(starts, lens_l[0], q, kept)
            h = self._merge(hidden, kept, sel.values)
            return keep, [int(kept.shape[1])] * b, h, None
        rows, counts, h = [], [], hidden
        for i, (n, all_kept) in enumerate(zip(lens_l, whole)):
            if all_kept:
                row = torch.arange(q, device=hidden.device)
                counts.append(n)
            else:
                ctx = self._row_context(full, i, n)
                sel = self.selector.select(ctx)
                kept = self._check_selection(sel, 1, starts[i : i + 1], n)
                row = build_keep_index(starts[i : i + 1], n, q, kept)[0]
                counts.append(int(kept.shape[1]))
                if sel.values is not None:
                    h = h.clone() if h is hidden else h
                    h[i : i + 1] = self._merge(h[i : i + 1], kept, sel.values)
            # the sequence's own padding is never attended: drop it too (the rows are re-padded with fillers)
            valid_row = row[full.valid[i, row]]
            rows.append(valid_row if valid_row.numel() else row[-1:])
        keep, fillers = pad_keep_rows(rows)
        return keep, counts, h, fillers

    @staticmethod
    def _merge(hidden: Tensor, kept: Tensor, values: Tensor | None) -> Tensor:
        if values is None:
            return hidden
        return hidden.scatter(1, kept.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]), values.to(hidden.dtype))

    @staticmethod
    def _row_context(full: SelectionContext, i: int, n: int) -> SelectionContext:
        def row(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[i : i + 1]

        return SelectionContext(
            hidden=full.hidden[i : i + 1],
            span_start=full.span_start[i : i + 1],
            span_len=n,
            valid=full.valid[i : i + 1],
            normed=row(full.normed),
            keys=row(full.keys),
            attentions=row(full.attentions),
            grid=full.grid,
        )

    def _bool_mask(self) -> bool:
        return getattr(self.decoder.config, "_attn_implementation", "eager") == "sdpa"

    def _check_cache(self, cache: Any) -> None:
        if cache is None:
            return
        from transformers.cache_utils import DynamicCache

        if not isinstance(cache, DynamicCache):
            raise TypeError(
                f"DecoderTokenPruner: the KV cache is a {type(cache).__name__}; only DynamicCache (the default "
                f"of generate and forward) is supported, since layers >= K hold fewer tokens."
            )

    def _check_window(self, total: int) -> None:
        cfg = self.decoder.config
        window = getattr(cfg, "sliding_window", None)
        if window and getattr(cfg, "use_sliding_window", True) and total > window:
            raise NotImplementedError(
                f"DecoderTokenPruner: the sequence ({total} tokens) exceeds the sliding window ({window}); "
                f"pruning with sliding-window attention beyond the window is not supported."
            )

    def _resolve_span(self, call: _Call, b: int, q: int, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """``(starts [B], lengths [B])`` of the compressible span of each sequence, or None (no span tokens)."""
        token = self._token_id
        if token is not None:
            ids = call.input_ids
            if ids is None:
                raise ValueError(
                    "DecoderTokenPruner: `image_token_id` needs `input_ids`, but the model was called with "
                    "`inputs_embeds` only; give the span by positions (`span=` or set_span())."
                )
            if ids.shape[0] != b or ids.shape[1] < q:
                raise ValueError(
                    f"DecoderTokenPruner: the `input_ids` seen ({tuple(ids.shape)}) do not cover the decoder's "
                    f"input ({b} x {q} tokens); give the span by positions (`span=` or set_span())."
                )
            is_img = ids[:, -q:] == token
            counts = is_img.sum(1)
            if int(counts.max()) == 0:
                return None
            starts = is_img.to(torch.int8).argmax(1)
            # contiguity: the last image position of each sequence is start + count - 1
            pos = torch.arange(q, device=ids.device).expand(b, -1)
            last = torch.where(is_img, pos, torch.full_like(pos, -1)).max(1).values
            bad = (counts > 0) & (last != starts + counts - 1)
            if bool(bad.any()):
                raise ValueError(
                    f"DecoderTokenPruner: the image tokens (id {token}) of sequence {int(bad.nonzero()[0])} are not "
                    f"contiguous (several images?); DART needs one span per sequence."
                )
            return starts.to(device), counts.to(device)
        if self.span is None:
            raise ValueError(
                "DecoderTokenPruner: no span: give `image_token_id`, `span=(start, length)` or call set_span()."
            )
        starts, length = self.span
        if starts.numel() == 1:
            starts = starts.expand(b)
        elif starts.numel() != b:
            raise ValueError(f"DecoderTokenPruner: {starts.numel()} span starts for a batch of {b}.")
        if int(starts.max()) + length > q:
            raise ValueError(
                f"DecoderTokenPruner: span [{int(starts.max())}, {int(starts.max()) + length}) is out of range "
                f"for an input of {q} tokens."
            )
        return starts.to(device), torch.full((b,), length, device=device)

    def _context(
        self, call: _Call, hidden: Tensor, starts: Tensor, length: int, past: int, q: int
    ) -> SelectionContext:
        b = hidden.shape[0]
        valid = torch.ones(b, q, dtype=torch.bool, device=hidden.device)
        if call.mask2d is not None:
            valid = call.mask2d[:, -q:].to(device=hidden.device, dtype=torch.bool)
        ctx = SelectionContext(hidden=hidden, span_start=starts, span_len=length, valid=valid, grid=self.grid)
        if self.selector.needs_normed:
            ctx.normed = self.decoder.norm(hidden)
        if self.selector.needs_keys:
            ctx.keys = self._keys(call, b, q)
        if self.selector.needs_attentions:
            attn = call.captured.get("attn")
            if attn is None:
                raise ValueError(
                    f"{type(self.selector).__name__}: layer K-1 returned no attention weights; run the model "
                    f"with attn_implementation='eager'."
                )
            if attn.shape[-1] != past + q:
                raise ValueError("DecoderTokenPruner: unexpected attention shape at layer K-1.")
            ctx.attentions = attn[..., past:]
        return ctx

    def _keys(self, call: _Call, b: int, q: int) -> Tensor:
        """Key states of layer K-1 after RoPE and repeat_kv, heads concatenated: ``[B, q, H*d]``."""
        k = call.captured.get("k_proj")
        attn = call.captured.get("attn_module")
        if k is None or attn is None:
            raise RuntimeError("DecoderTokenPruner: the key states of layer K-1 were not captured.")
        cfg = self.decoder.config
        d = attn.head_dim
        k = k.view(b, q, -1, d)  # [B, q, Hkv, d]
        if hasattr(attn, "k_norm"):  # Qwen3 normalises keys per head before RoPE
            k = attn.k_norm(k)
        rope = call.captured.get("rope")
        if rope is None:
            raise RuntimeError(
                "DecoderTokenPruner: layer K-1 received no `position_embeddings` (rotary cos/sin), so DART's "
                "pivots would come from keys without RoPE. transformers before 4.45 computes RoPE inside the "
                "attention; upgrade transformers (supported: see pyproject.toml)."
            )
        cos, sin = merge_mrope(*rope, attn, cfg)  # [B|1, q, d] (4.x Qwen2-VL: merged from [3, B, q, d])
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        k = k * cos + _rotate_half(k) * sin
        n_rep = cfg.num_attention_heads // getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=2)
        return k.reshape(b, q, -1)

    def _check_selection(self, sel: Selection, b: int, starts: Tensor, length: int) -> Tensor:
        kept = sel.indices
        expected = self.selector.num_kept_for(length)
        if (
            not isinstance(sel, Selection)
            or kept.dim() != 2
            or kept.shape[0] != b
            or kept.shape[1] != expected
        ):
            raise ValueError(
                f"{type(self.selector).__name__}.select returned indices of shape {tuple(kept.shape)}; "
                f"expected [{b}, {expected}]."
            )
        rel = kept - starts.reshape(-1, 1)
        if bool(((rel < 0) | (rel >= length)).any()) or (
            kept.shape[1] > 1 and bool((kept.diff(dim=1) <= 0).any())
        ):
            raise ValueError(
                f"{type(self.selector).__name__}.select must return sorted, distinct positions inside the span."
            )
        return kept

    @staticmethod
    def _gather_mask(mask: Tensor, b: int, rows: Tensor | None, cols: Tensor) -> Tensor:
        m = mask.expand(b, -1, -1, -1)
        if rows is not None:
            m = m.gather(2, rows[:, None, :, None].expand(-1, m.shape[1], -1, m.shape[3]))
        return m.gather(3, cols[:, None, None, :].expand(-1, m.shape[1], m.shape[2], -1))
