"""The decoder applier: pruned logits equal a manual reference that drops the same tokens at layer K (eager and
SDPA; Llama, Qwen2, Mistral), cached greedy decoding equals recomputation without a cache, a padded batch equals
single runs, the model is bit-identical after detaching, and bad inputs raise clear errors."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from lightning_eff.tokens import DART, DecoderTokenPruner, FastV, Indices, Pool, Random, dart_keep_indices
from lightning_eff.tokens.baselines import pool_matrix

pytestmark = pytest.mark.transformers_compat

IMG = 63  # image token id
VOCAB = 64
K = 2
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def make_lm(impl="sdpa", family="llama", seed=0):
    torch.manual_seed(seed)
    cfg_cls, lm_cls = FAMILIES[family]
    lm = lm_cls(cfg_cls(**SIZES, attn_implementation=impl)).eval()
    # larger random weights than the default init, so that tokens differ and pruning changes the logits
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return lm


def prompt(seed=0, prefix=7, n_img=40, n_txt=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat(
        [
            torch.randint(1, IMG, (prefix,), generator=g),
            torch.full((n_img,), IMG),
            torch.randint(1, IMG, (n_txt,), generator=g),
        ]
    )
    return ids.unsqueeze(0)


def _mask(impl, n, dtype):
    if impl == "sdpa":
        return None  # SDPA's is_causal path
    return torch.full((n, n), torch.finfo(dtype).min).triu(1)[None, None]


def _out(x):
    return x[0] if isinstance(x, tuple) else x  # transformers 4.x layers return a tuple


@torch.no_grad()
def manual_reference(lm, ids, layer, span, choose):
    """Runs the decoder layer by layer, drops tokens at ``layer`` and returns (logits, keep).

    ``choose(normed_hidden [L, D], keys [L, H*d], hidden [1, L, D])`` returns the kept image positions (and
    optionally replacement hidden states). Keys are computed with transformers' own RoPE and repeat_kv.
    """
    dec = lm.model
    impl = lm.config._attn_implementation
    h = dec.embed_tokens(ids)
    n = ids.shape[1]
    pos = torch.arange(n)[None]
    pe = dec.rotary_emb(h, pos)
    keys = None
    for i in range(layer):
        if i == layer - 1:
            attn = dec.layers[i].self_attn
            x = dec.layers[i].input_layernorm(h)
            k = attn.k_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
            _, k = apply_rotary_pos_emb(k, k, *pe)
            keys = repeat_kv(k, attn.num_key_value_groups).transpose(1, 2).reshape(n, -1)
        h = _out(dec.layers[i](h, attention_mask=_mask(impl, n, h.dtype), position_ids=pos, position_embeddings=pe))
    out = choose(dec.norm(h)[0], keys, h)
    kept, values = out if isinstance(out, tuple) else (out, None)
    if values is not None:
        h = h.clone()
        h[0, kept] = values
    start, length = span
    keep = torch.tensor(sorted(set(range(n)) - set(range(start, start + length)) | set(kept.tolist())))
    h = h[:, keep]
    pos = keep[None]
    pe = dec.rotary_emb(h, pos)
    for i in range(layer, len(dec.layers)):
        h = _out(
            dec.layers[i](h, attention_mask=_mask(impl, len(keep), h.dtype), position_ids=pos, position_embeddings=pe)
        )
    return lm.lm_head(dec.norm(h)), keep


@pytest.mark.parametrize(
    "family,impl", [("llama", "eager"), ("llama", "sdpa"), ("qwen2", "sdpa"), ("mistral", "eager")]
)
def test_dart_logits_equal_manual_reference(family, impl):
    lm = make_lm(impl, family)
    ids = prompt()
    span = (7, 40)
    with torch.no_grad():
        full = lm(ids).logits
    with (
        DecoderTokenPruner(DART(num_kept=16), layer=K, image_token_id=IMG).attach(lm) as pruner,
        torch.no_grad(),
    ):
        got = lm(ids).logits
    want, keep = manual_reference(
        lm, ids, K, span, lambda hn, k, h: dart_keep_indices(hn, k, 7, 40, 4, 4, 16)
    )
    assert pruner.last_keep_index[0].tolist() == keep.tolist()
    assert got.shape == (1, 59 - 40 + 20, VOCAB)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the text logits really changed: the reference is not trivially the unpruned model
    assert (got[0, -1] - full[0, -1]).abs().max() > 1e-3


def test_pool_and_random_logits_equal_manual_reference():
    lm = make_lm("eager")
    ids = prompt(seed=1)
    w, rep = pool_matrix(40, 10)
    with DecoderTokenPruner(Pool(num_kept=10), layer=K, span=(7, 40)).attach(lm), torch.no_grad():
        got = lm(ids).logits

    def pooled(hn, k, h):
        return rep + 7, w @ h[0, 7:47]

    want, _ = manual_reference(lm, ids, K, (7, 40), pooled)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with (
        DecoderTokenPruner(Random(num_kept=9, seed=3), layer=K, image_token_id=IMG).attach(lm) as p,
        torch.no_grad(),
    ):
        got = lm(ids).logits
    kept = p.last_keep_index[0]
    kept_img = kept[(kept >= 7) & (kept < 47)]
    want, _ = manual_reference(lm, ids, K, (7, 40), lambda hn, k, h: kept_img)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fastv_uses_layer_k_minus_1_attention_and_needs_eager():
    lm = make_lm("eager")
    ids = prompt(seed=2)
    with torch.no_grad():
        attn = lm(ids, output_attentions=True).attentions[K - 1]  # [1, H, L, L]
    with DecoderTokenPruner(FastV(num_kept=8), layer=K, image_token_id=IMG).attach(lm) as p, torch.no_grad():
        got = lm(ids).logits
    score = attn[0].mean(0)[-1, 7:47]
    kept_img = torch.sort(torch.argsort(score, descending=True)[:8] + 7).values
    keep = p.last_keep_index[0]
    assert keep[(keep >= 7) & (keep < 47)].tolist() == kept_img.tolist()
    want, _ = manual_reference(lm, ids, K, (7, 40), lambda hn, k, h: kept_img)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        DecoderTokenPruner(FastV(num_kept=8), layer=K, image_token_id=IMG).attach(make_lm("sdpa"))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_cached_greedy_decoding_equals_recompute_without_cache(impl):
    lm = make_lm(impl, seed=1)
    ids = prompt(seed=3)
    steps = 6
    with DecoderTokenPruner(DART(num_kept=16), layer=K, image_token_id=IMG).attach(lm) as p, torch.no_grad():
        out = lm.generate(
            ids,
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    keep = p.records[0].keep_index[0]
    assert len(p.records) == 1  # only the prefill is pruned
    kept_rel = keep[(keep >= 7) & (keep < 47)] - 7
    # recompute: the whole sequence every step, no cache, dropping the same image tokens at layer K
    seq = ids.clone()
    with DecoderTokenPruner(Indices(kept_rel), layer=K, image_token_id=IMG).attach(lm), torch.no_grad():
        for t in range(steps):
            logits = lm(seq, use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, out.logits[t], atol=1e-4, rtol=1e-4)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(seq, out.sequences)
    # and pruning changed the generation compared with the unpruned model's logits
    with torch.no_grad():
        plain = lm.generate(
            ids,
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    assert not torch.allclose(plain.logits[0], out.logits[0], atol=1e-3)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_padded_batch_equals_single_runs(impl):
    lm = make_lm(impl, seed=2)
    a = prompt(seed=4, prefix=7, n_txt=12)  # 59 tokens
    b = prompt(seed=5, prefix=3, n_txt=9)  # 52 tokens
    pad = a.shape[1] - b.shape[1]
    batch = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], dim=1)])  # left padding
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    kw = dict(
        max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0
    )
    with DecoderTokenPruner(DART(num_kept=16), layer=K, image_token_id=IMG).attach(lm) as p, torch.no_grad():
        both = lm.generate(batch, attention_mask=mask, **kw)
        rec = p.records[-1]
        one = lm.generate(a, **kw)
        two = lm.generate(b, **kw)
    assert rec.batch_size == 2 and rec.kept_len == 59 - 40 + 20
    assert torch.equal(both.sequences[0, -5:], one.sequences[0, -5:])
    assert torch.equal(both.sequences[1, -5:], two.sequences[0, -5:])
    for t in range(5):
        torch.testing.assert_close(both.logits[t][0], one.logits[t][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(both.logits[t][1], two.logits[t][0], atol=1e-4, rtol=1e-4)


def test_right_padding_forward_matches_single_and_excludes_pads_from_text_pivots():
    lm = make_lm("sdpa", seed=3)
    a, b = prompt(seed=6, n_txt=12), prompt(seed=7, n_txt=8)
    pad = a.shape[1] - b.shape[1]
    batch = torch.cat([a, torch.cat([b, torch.zeros(1, pad, dtype=torch.long)], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, -pad:] = 0
    with DecoderTokenPruner(DART(num_kept=16), layer=K, image_token_id=IMG).attach(lm) as p, torch.no_grad():
        both = lm(batch, attention_mask=mask).logits
        keep_b = p.last_keep_index[1]
        single = lm(b).logits
        keep_single = p.last_keep_index[0]
    assert keep_b[: keep_single.numel()].tolist() == keep_single.tolist()
    torch.testing.assert_close(both[1, : single.shape[1]], single[0], atol=1e-4, rtol=1e-4)


def test_model_is_bit_identical_after_detach():
    lm = make_lm("sdpa")
    ids = prompt()
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    with torch.no_grad():
        ref = lm(ids).logits
    pruner = DecoderTokenPruner(DART(num_kept=16), layer=K, image_token_id=IMG).attach(lm)
    with torch.no_grad():
        assert lm(ids).logits.shape[1] < ids.shape[1]
        lm.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    pruner.detach()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in lm.modules())
    after = lm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, ref)


def test_span_by_positions_with_inputs_embeds_and_set_span():
    lm = make_lm("sdpa")
    ids = prompt()
    emb = lm.get_input_embeddings()(ids)
    with DecoderTokenPruner(DART(num_kept=16), layer=K, span=(7, 40)).attach(lm) as p, torch.no_grad():
        by_pos = lm(inputs_embeds=emb).logits
        p.set_span(7, 30)  # a shorter span: 10 more tokens survive
        assert lm(inputs_embeds=emb).logits.shape[1] == by_pos.shape[1] + 10
    with DecoderTokenPruner(DART(num_kept=16), layer=K, image_token_id=IMG).attach(lm), torch.no_grad():
        by_id = lm(ids).logits
    torch.testing.assert_close(by_pos, by_id)


def test_text_only_prompt_is_not_pruned():
    lm = make_lm("sdpa")
    ids = torch.randint(0, IMG, (1, 20))
    with DecoderTokenPruner(DART(num_kept=16), layer=K, image_token_id=IMG).attach(lm) as p, torch.no_grad():
        out = lm(ids).logits
    assert out.shape[1] == 20 and not p.records


def test_bad_inputs_raise_clear_errors():
    lm = make_lm("sdpa")
    ids = prompt()
    with pytest.raises(ValueError, match=r"`layer`=4 is beyond the decoder's depth: it has 4 layers"):
        DecoderTokenPruner(DART(num_kept=16), layer=4, image_token_id=IMG).attach(lm)
    with pytest.raises(ValueError, match="`layer` must be an int >= 1"):
        DecoderTokenPruner(DART(num_kept=16), layer=0, image_token_id=IMG)
    with pytest.raises(TypeError, match="`selector` must be a TokenSelector"):
        DecoderTokenPruner("dart", layer=2)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    )
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel"):
        DecoderTokenPruner(DART(num_kept=16), layer=1, image_token_id=IMG).attach(gpt2)
    with (
        DecoderTokenPruner(DART(num_kept=16), layer=K, span=(50, 40)).attach(lm),
        pytest.raises(ValueError, match=r"span \[50, 90\) is out of range for an input of 59 tokens"),
    ):
        lm(ids)
    split = ids.clone()
    split[0, 20] = 1
    with (
        DecoderTokenPruner(DART(num_kept=8), layer=K, image_token_id=IMG).attach(lm),
        pytest.raises(ValueError, match="not contiguous"),
    ):
        lm(split)
    with (
        DecoderTokenPruner(DART(num_kept=8), layer=K, image_token_id=IMG).attach(lm),
        pytest.raises(ValueError, match="needs `input_ids`, but the model was called with `inputs_embeds` only"),
    ):
        lm(inputs_embeds=lm.get_input_embeddings()(ids))
    flash = make_lm("sdpa")
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="'flash_attention_2' is not supported"):
        DecoderTokenPruner(DART(num_kept=8), layer=K, image_token_id=IMG).attach(flash)
    with pytest.raises(ValueError, match="not both"):
        DecoderTokenPruner(DART(num_kept=8), layer=K, image_token_id=IMG, span=(0, 4))
    # errors inside a call leave the model usable: the hooks are removed by the context manager
    with torch.no_grad():
        assert lm(ids).logits.shape[1] == ids.shape[1]
