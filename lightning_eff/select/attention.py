"""Data Whisperer's attention read-out: the layer choice and the attention re-run of a prompt (paper Sec. 3.2).

See :mod:`lightning_eff.select.data_whisperer` for the procedure and the departures from the official code.
"""

from __future__ import annotations

import contextvars
import sys
from typing import Any

import torch
from torch import Tensor

from lightning_eff.utils.checks import check_int

__all__ = ["default_attention_layer", "layer_attention"]


#: The official layer choice (``predict_batch``) by (model_type, num_hidden_layers).
_OFFICIAL_LAYERS: dict[tuple[str, int], int] = {
    ("llama", 32): 13,  # Meta-Llama-3-8B-Instruct
    ("mistral", 40): 13,  # Mistral-Nemo-Instruct-2407
    ("qwen2", 36): 16,  # Qwen2.5-3B-Instruct
    ("qwen2", 28): 16,  # Qwen2.5-7B-Instruct
    ("mistral", 32): 10,  # Mistral-7B-Instruct-v0.2
}


def default_attention_layer(config: Any) -> int:
    """The attention layer Data Whisperer reads for a model config (see the module docstring).

    Example::

        >>> from types import SimpleNamespace as NS
        >>> default_attention_layer(NS(model_type="llama", num_hidden_layers=32))
        13
        >>> default_attention_layer(NS(model_type="gemma", num_hidden_layers=26)), default_attention_layer(
        ...     NS(model_type="llama", num_hidden_layers=4))
        (11, 2)
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(
            f"default_attention_layer: the config has no positive `num_hidden_layers` ({n_layers!r})."
        )
    model_type = getattr(text_config, "model_type", "") or getattr(config, "model_type", "")
    if (model_type, n_layers) in _OFFICIAL_LAYERS:
        return _OFFICIAL_LAYERS[(model_type, n_layers)]
    return 11 if n_layers > 11 else n_layers // 2


_PROBE_NAME = "lightning_eff_attention_probe"
_PROBE: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "lightning_eff_attention_probe", default=None
)


class _StopForward(Exception):
    """Raised by the probe once layer L's attention is captured, to skip the remaining layers."""


def _probe_attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, Any]:  # fmt: skip
    state = _PROBE.get()
    if state is not None and getattr(module, "layer_idx", None) == state["layer"]:
        modeling = sys.modules.get(type(module).__module__)
        eager = getattr(modeling, "eager_attention_forward", None)
        if eager is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward as eager
        rows = state["rows"]
        q = query if rows is None else query[:, :, -rows:]
        mask = attention_mask
        if mask is not None and rows is not None:
            mask = mask[:, :, -rows:, :]
        _, weights = eager(module, q, key, value, mask, scaling=scaling, dropout=0.0, **kwargs)
        state["attention"] = weights.float().sum(dim=1)
        raise _StopForward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


def _register_probe() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

    if _PROBE_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(_PROBE_NAME, _probe_attention)
        AttentionMaskInterface.register(_PROBE_NAME, eager_mask)


def _num_layers(model: Any) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


@torch.no_grad()
def layer_attention(
    model: Any, input_ids: Tensor, attention_mask: Tensor, layer: int, last_rows: int | None = None
) -> Tensor:
    """Head-summed attention of one layer for a (left-padded) batch of prompts: ``[B, rows, T]``.

    Equals ``model(..., output_attentions=True).attentions[layer].sum(1)`` of an eager forward (restricted to
    the last ``last_rows`` query rows when given), but runs eager attention at ``layer`` only, computes only
    the requested rows and skips the layers after ``layer``. Models that do not dispatch attention through
    ``transformers``' ``AttentionInterface`` fall back to a full forward with ``output_attentions=True``.

    Args:
        model: a ``transformers`` causal LM.
        input_ids: ``[B, T]`` token ids.
        attention_mask: ``[B, T]`` 1 for tokens, 0 for (left) padding.
        layer: 0-based decoder layer.
        last_rows: number of final query rows to compute (``None``: all ``T``).

    Raises:
        ValueError: ``layer`` out of range, or the model returns no attention weights.

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> _ = torch.manual_seed(0)
        >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
        ...                                   num_hidden_layers=2, num_attention_heads=2)).eval()
        >>> ids = torch.randint(0, 50, (1, 6))
        >>> A = layer_attention(lm, ids, torch.ones_like(ids), layer=1)
        >>> A.shape, torch.allclose(A.sum(-1), torch.full((1, 6), 2.0))  # 2 heads, rows sum to 1 each
        (torch.Size([1, 6, 6]), True)
    """
    n_layers = _num_layers(model)
    check_int(layer, "layer", minimum=0, maximum=n_layers - 1, owner="layer_attention")
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"layer_attention: `input_ids` and `attention_mask` must both be [B, T], got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}."
        )
    t = input_ids.shape[1]
    rows = None if last_rows is None or last_rows >= t else int(last_rows)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    _register_probe()
    previous = getattr(model.config, "_attn_implementation", None)
    state: dict[str, Any] = {"layer": layer, "rows": rows, "attention": None}
    token = _PROBE.set(state)
    try:
        import logging

        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity(logging.ERROR)  # a model that cannot switch only warns; we fall back below
        try:
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(_PROBE_NAME)
        finally:
            hf_logging.set_verbosity(verbosity)
        try:
            model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
        except _StopForward:
            pass
    finally:
        _PROBE.reset(token)
        if getattr(model.config, "_attn_implementation", None) != previous:
            model.set_attn_implementation(previous)
    if state["attention"] is not None:
        return state["attention"]
    # Fallback: a model that does not route attention through AttentionInterface.
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        output_attentions=True,
    )
    attentions = getattr(out, "attentions", None)
    if not attentions or len(attentions) <= layer or attentions[layer] is None:
        raise ValueError(
            f"layer_attention: {type(model).__name__} returns no attention weights for layer {layer} "
            f"(output_attentions=True gave {type(attentions).__name__}); Data Whisperer needs a model whose "
            f"attention goes through transformers' AttentionInterface or that returns `attentions`."
        )
    attn = attentions[layer].float().sum(dim=1)
    return attn if rows is None else attn[:, -rows:, :]
