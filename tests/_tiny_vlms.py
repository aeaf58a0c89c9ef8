"""Tiny random multimodal ``transformers`` models built from configs (no download), for the token tests.

Works with the oldest supported ``transformers`` (4.49) and with 5.x: the config layouts differ (flat text
keys and ``rope_scaling`` in 4.x, ``text_config`` and ``rope_parameters`` in 5.x) and so does the way the
inputs are built (5.x Qwen2-VL needs ``mm_token_type_ids`` for its M-RoPE index).
"""

from __future__ import annotations

import inspect
import sys

import torch
import transformers
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

V5 = int(transformers.__version__.split(".")[0]) >= 5
VOCAB, IMG, VS, VE, VID = 128, 120, 121, 122, 123
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
CLIP = dict(
    model_type="clip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=4,
)
QWEN2_VIS = dict(
    depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=2, spatial_merge_size=2,
    temporal_patch_size=2, in_channels=3, in_chans=3,
)  # fmt: skip
QWEN25_VIS = dict(
    depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=2,
    spatial_merge_size=2, temporal_patch_size=2, in_channels=3, in_chans=3, window_size=8,
    fullatt_block_indexes=[0],
)  # fmt: skip
PINPOINTS = [[32, 64], [64, 32], [64, 64]]
FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")


def _sharpen(model):
    """Larger random weights than the default init, so that tokens differ and pruning changes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.08)
    return model


def build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "llava":
        cfg = LlavaConfig(
            text_config=dict(model_type="llama", **TEXT), vision_config=CLIP, image_token_index=IMG,
            vision_feature_layer=-1,
        )  # fmt: skip
        model = LlavaForConditionalGeneration(cfg)
    elif family == "llava_next":
        cfg = LlavaNextConfig(
            text_config=dict(model_type="llama", **TEXT), vision_config=CLIP, image_token_index=IMG,
            vision_feature_layer=-1, image_grid_pinpoints=PINPOINTS,
        )  # fmt: skip
        model = LlavaNextForConditionalGeneration(cfg)
    else:
        cls, mcls, vis = {
            "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, QWEN2_VIS),
            "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, QWEN25_VIS),
        }[family]
        ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
        if V5:
            text = dict(TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4})
            cfg = cls(text_config=text, vision_config=vis, **ids)
        else:
            cfg = cls(**TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, vision_config=vis, **ids)
        model = mcls(cfg)
    model = _sharpen(model.eval())
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _llava_next_count(model, pixel_values, image_sizes) -> list[int]:
    """Image tokens per image, from the model's own feature packing (what the processor computes)."""
    cfg = model.config
    m = model.model if hasattr(getattr(model, "model", None), "pack_image_features") else model
    with torch.no_grad():
        out = m.get_image_features(
            pixel_values,
            image_sizes,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(feats, torch.Tensor):  # one image, packed and concatenated
        feats = [feats]
    if feats[0].dim() == 3:  # 4.49: unpacked [tiles, tokens, dim] per image
        _, lens = m.pack_image_features(
            list(feats), image_sizes, cfg.vision_feature_select_strategy, image_newline=m.image_newline
        )
        return [int(v) for v in lens]
    return [int(f.shape[0]) for f in feats]


def inputs(model, family: str, variant=None, seed: int = 0, prefix: int = 5, text: int = 10):
    """One prompt ``prefix + <image tokens> + text`` with its image inputs.

    Returns ``(kwargs for model(...), image start, image token count)``. ``variant`` is the image size
    ``[h, w]`` for LLaVA-NeXT (the image-token count depends on it) and the patch grid ``(h, w)`` for Qwen.
    """
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(3, 100, (prefix,), generator=g).tolist()
    tail = torch.randint(3, 100, (text,), generator=g).tolist()
    kw: dict = {}
    if family == "llava":
        kw["pixel_values"] = torch.randn(1, 3, 32, 32, generator=g)
        n = 64
        body = [IMG] * n
    elif family == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        hw = list(variant or [32, 64])
        patches = image_size_to_num_patches(hw, PINPOINTS, 32)
        kw["pixel_values"] = torch.randn(1, patches, 3, 32, 32, generator=g)
        kw["image_sizes"] = torch.tensor([hw])
        n = _llava_next_count(model, kw["pixel_values"], kw["image_sizes"])[0]
        body = [IMG] * n
    else:
        h, w = variant or (12, 16)
        kw["pixel_values"] = torch.randn(h * w, 3 * 2 * 2 * 2, generator=g)
        kw["image_grid_thw"] = torch.tensor([[1, h, w]])
        n = h * w // 4
        body = [VS] + [IMG] * n + [VE]
        prefix += 1
    ids = torch.tensor([head + body + tail])
    kw["input_ids"] = ids
    add_mm_types(model, kw)
    return kw, prefix, n


def add_mm_types(model, kw) -> None:
    """5.x Qwen2-VL computes its M-RoPE index from ``mm_token_type_ids`` (1 at image tokens)."""
    inner = getattr(model, "model", None)
    rope_index = getattr(inner, "get_rope_index", None)
    if rope_index is not None and "mm_token_type_ids" in inspect.signature(rope_index).parameters:
        kw["mm_token_type_ids"] = (kw["input_ids"] == IMG).int()


def reset_rope_deltas(model) -> None:
    """Qwen2-VL caches its M-RoPE offsets between calls; a fresh no-cache recompute must not reuse them."""
    for m in (model, getattr(model, "model", None)):
        if m is not None and hasattr(m, "rope_deltas"):
            m.rope_deltas = None


def text_decoder(model):
    """The Llama-layout language model inside a multimodal class (found independently of the library)."""
    for m in model.modules():
        if hasattr(m, "embed_tokens") and hasattr(m, "layers") and hasattr(m, "norm"):
            return m
    raise AssertionError(f"no text decoder in {type(model).__name__}")


def _out(x):
    return x[0] if isinstance(x, tuple) else x


@torch.no_grad()
def manual_reference(model, kw, layer, start, n_img, choose):
    """Run the unpruned model to capture the language model's layer-0 inputs, then run its layers by hand,
    dropping the tokens ``choose(normed [L, D], keys [L, H*d])`` does not keep at ``layer`` (SDPA, no padding).

    Keys at ``layer - 1`` use transformers' own RoPE function of that model file (M-RoPE merge included).
    Returns ``(logits [1, L', V], keep)``.
    """
    dec = text_decoder(model)
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("hidden", args[0] if args else kwargs["hidden_states"])
        for k in ("attention_mask", "position_ids", "position_embeddings"):
            seen.setdefault(k, kwargs.get(k))

    handle = dec.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        reset_rope_deltas(model)
        model(**kw)  # (use_cache=False breaks Qwen2-VL in transformers 4.53)
    finally:
        handle.remove()
    assert seen["attention_mask"] is None or seen["attention_mask"].dim() == 4
    h, pe, pos = seen["hidden"], seen["position_embeddings"], seen["position_ids"]
    n = h.shape[1]
    common = dict(attention_mask=None, position_ids=pos, position_embeddings=pe)
    keys = None
    for i in range(layer):
        if i == layer - 1:
            attn = dec.layers[i].self_attn
            mod = sys.modules[type(attn).__module__]
            x = dec.layers[i].input_layernorm(h)
            k = attn.k_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
            cos, sin = pe
            if cos.dim() == 4:  # transformers 4.x M-RoPE
                _, k = mod.apply_multimodal_rotary_pos_emb(k, k, cos, sin, attn.rope_scaling["mrope_section"])
            else:
                _, k = mod.apply_rotary_pos_emb(k, k, cos, sin)
            keys = mod.repeat_kv(k, attn.num_key_value_groups).transpose(1, 2).reshape(n, -1)
        h = _out(dec.layers[i](h, **common))
    kept = choose(dec.norm(h)[0], keys)
    keep = sorted(set(range(n)) - set(range(start, start + n_img)) | set(kept.tolist()))
    keep = torch.tensor(keep)
    h = h[:, keep]
    pe = tuple(t[..., keep, :] for t in pe)
    pos = None if pos is None else pos[..., keep]
    for i in range(layer, len(dec.layers)):
        h = _out(dec.layers[i](h, attention_mask=None, position_ids=pos, position_embeddings=pe))
    return model.get_output_embeddings()(dec.norm(h)), keep


def cache_bytes(cache) -> int:
    """Bytes held by a ``DynamicCache`` (keys and values of every layer), across transformers versions."""
    if hasattr(cache, "layers"):
        ts = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    else:
        ts = list(cache.key_cache) + list(cache.value_cache)
    return int(sum(t.numel() * t.element_size() for t in ts))
