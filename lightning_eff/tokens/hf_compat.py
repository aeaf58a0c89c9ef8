"""What :class:`~lightning_eff.tokens.DecoderTokenPruner` needs to know about ``transformers`` model classes.

Three things differ between the model classes users prune (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL)
and between ``transformers`` versions (tested range: see ``pyproject.toml``; 4.49 and 5.x are run in CI):

* **Where the decoder is.** :func:`find_decoder` finds the Llama-layout decoder stack inside any module
  (the language model of a multimodal class, a ``*ForCausalLM``, a ``LightningModule`` that holds one).
* **Where the token ids are.** The multimodal classes merge the image features into the embeddings
  themselves and call their language model with ``inputs_embeds``. The ids are seen by the outer model
  (``LlavaForConditionalGeneration.forward(input_ids=...)``); :func:`id_carriers` lists the modules between
  the model a pruner is attached to and its decoder whose ``forward`` takes ``input_ids``, so that the pruner
  can read them there.
* **Which token is the image token.** :func:`config_image_token` reads it from those modules' configs
  (``image_token_id``, or ``image_token_index`` in older LLaVA configs).
* **M-RoPE.** Qwen2-VL's rotary embedding has three position components (time, height, width). In
  ``transformers`` 5.x the rotary module merges them, and the layers receive ordinary ``[B, L, d]`` cos/sin.
  In 4.x the layers receive ``position_ids`` of shape ``[3, B, L]`` and cos/sin of shape ``[3, B, L, d]``,
  merged inside the attention by ``apply_multimodal_rotary_pos_emb`` with the config's ``mrope_section``;
  :func:`gather_positions` slices either layout along the sequence axis and :func:`merge_mrope` reproduces
  the merge for the key states DART reads.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["config_image_token", "find_decoder", "gather_positions", "id_carriers", "merge_mrope"]


def _is_decoder(m: nn.Module) -> bool:
    layers = getattr(m, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return False
    attn = getattr(layers[0], "self_attn", None)
    return (
        attn is not None
        and isinstance(getattr(attn, "k_proj", None), nn.Linear)
        and isinstance(getattr(m, "norm", None), nn.Module)
        and getattr(m, "config", None) is not None
    )


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        if part.isdigit() and isinstance(obj, (nn.ModuleList, nn.Sequential, list, tuple)):
            obj = obj[int(part)]
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            raise ValueError(f"`model_path`={path!r}: {type(obj).__name__} has no attribute {part!r}.")
    return obj


def find_decoder(module: nn.Module, path: str | None = None) -> nn.Module:
    """The decoder stack (``LlamaModel``-like: ``.layers[i].self_attn.k_proj``, ``.norm``, ``.config``).

    Args:
        module: a ``transformers`` model, or any module (e.g. a ``LightningModule``) that contains one.
        path: optional attribute path from ``module`` (``"model"``, ``"net.model"``); a ``*ForCausalLM``
            found there is unwrapped to its decoder.

    Raises:
        ValueError: nothing with that structure (e.g. GPT-2, which has ``.h`` and fused ``c_attn``).

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                                   num_hidden_layers=2, num_attention_heads=2))
        >>> type(find_decoder(lm)).__name__
        'LlamaModel'
    """
    root = _get_path(module, path) if path else module
    if not isinstance(root, nn.Module):
        raise ValueError(f"`model_path`={path!r} points to a {type(root).__name__}, not an nn.Module.")
    for m in root.modules():
        if _is_decoder(m):
            return m
    raise ValueError(
        f"unsupported architecture {type(root).__name__}: no decoder with the Llama/Qwen2/Mistral layout "
        f"(`.layers[i].self_attn.k_proj`, `.norm`, `.config`) was found"
        + (f" at model_path={path!r}" if path else "")
        + ". Supported: transformers Llama, Qwen2, Qwen3, Mistral (and models with the same layout)."
    )


def _path_to(root: nn.Module, target: nn.Module) -> list[nn.Module]:
    """Modules from ``root`` (included) down to ``target`` (excluded)."""
    for name, m in root.named_modules():
        if m is target:
            chain, obj = [root], root
            for part in name.split(".") if name else []:
                obj = getattr(obj, part) if not part.isdigit() else obj[int(part)]
                chain.append(obj)
            return chain[:-1]
    return []


def _takes_input_ids(m: nn.Module) -> bool:
    try:
        return "input_ids" in inspect.signature(m.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def id_carriers(root: nn.Module, decoder: nn.Module) -> list[nn.Module]:
    """The ``transformers`` models between ``root`` and ``decoder`` whose ``forward`` takes ``input_ids``.

    For ``LlavaForConditionalGeneration`` these are the outer model (and ``LlavaModel`` in 5.x, or
    ``LlamaForCausalLM`` in 4.x); for a plain ``LlamaForCausalLM`` the outer model. A ``LightningModule`` that
    wraps the model is skipped (it has no ``config``).
    """
    return [m for m in _path_to(root, decoder) if getattr(m, "config", None) is not None and _takes_input_ids(m)]


def config_image_token(modules: list[nn.Module]) -> int | None:
    """The image token id from the first config among ``modules`` that declares one, else None.

    Example::

        >>> from transformers import LlavaConfig, LlavaForConditionalGeneration
        >>> cfg = LlavaConfig(text_config=dict(model_type="llama", vocab_size=64, hidden_size=16,
        ...     intermediate_size=32, num_hidden_layers=2, num_attention_heads=2),
        ...     vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4), image_token_index=63)
        >>> config_image_token([LlavaForConditionalGeneration(cfg)])
        63
    """
    for m in modules:
        cfg = getattr(m, "config", None)
        for key in ("image_token_id", "image_token_index"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def gather_positions(t: Tensor, keep: Tensor, seq_dim: int) -> Tensor:
    """Slice a position tensor at the kept positions along its sequence axis.

    Args:
        t: ``position_ids`` (``[B|1, L]``, or ``[3, B|1, L]`` for 4.x M-RoPE; ``seq_dim=-1``) or one of the
            rotary ``cos``/``sin`` (``[B|1, L, d]`` or ``[3, B|1, L, d]``; ``seq_dim=-2``).
        keep: ``[B, L']`` kept positions.
        seq_dim: ``-1`` or ``-2``.

    Example::

        >>> pos = torch.arange(5).expand(3, 1, 5)               # 4.x M-RoPE position ids
        >>> gather_positions(pos, torch.tensor([[0, 3], [1, 4]]), -1)[0].tolist()
        [[0, 3], [1, 4]]
    """
    b, n = keep.shape
    if seq_dim == -1:
        shape = (*t.shape[:-2], b, t.shape[-1])
        idx = keep.expand(*t.shape[:-2], b, n)
        return t.expand(shape).gather(-1, idx)
    shape = (*t.shape[:-3], b, t.shape[-2], t.shape[-1])
    idx = keep.unsqueeze(-1).expand(*t.shape[:-3], b, n, t.shape[-1])
    return t.expand(shape).gather(-2, idx)


def _mrope_section(attn: nn.Module, config: Any) -> list[int]:
    for src in (attn, config):
        for key in ("rope_scaling", "rope_parameters"):
            rs = getattr(src, key, None)
            if isinstance(rs, dict) and rs.get("mrope_section"):
                return list(rs["mrope_section"])
    raise ValueError(
        "DecoderTokenPruner: the model passes 3-component (M-RoPE) rotary embeddings to its layers but its config "
        "declares no `mrope_section`; this model class is not supported."
    )


def merge_mrope(cos: Tensor, sin: Tensor, attn: nn.Module, config: Any) -> tuple[Tensor, Tensor]:
    """Merge 4.x M-RoPE cos/sin ``[3, B, L, d]`` into ``[B, L, d]`` as ``apply_multimodal_rotary_pos_emb`` does.

    Qwen2-VL (arXiv 2409.12191, Sec. 2.1, M-RoPE): the rotary dimensions are split into ``mrope_section`` (time,
    height, width) chunks, repeated for the two halves; chunk ``i`` takes its angles from component ``i mod 3``.
    Tensors that are already merged (``dim() == 3``, ``transformers`` 5.x) are returned as they are.
    """
    if cos.dim() == 3:
        return cos, sin
    section = _mrope_section(attn, config) * 2

    def merge(t: Tensor) -> Tensor:
        return torch.cat([m[i % 3] for i, m in enumerate(t.split(section, dim=-1))], dim=-1)

    return merge(cos), merge(sin)
