"""DART on the multimodal classes users prune, as they call them: LLaVA-1.5, LLaVA-NeXT (two resolutions, so
two image-token counts), Qwen2-VL and Qwen2.5-VL (M-RoPE), tiny and random, built from configs.

The pruner is given no span and no token id: it reads the image token from the model's config and the ids
from the outer model's ``input_ids`` (these classes call their language model with ``inputs_embeds``).
Checked against independent references: the logits of a by-hand layer loop that drops the same tokens at
layer K, and a no-cache recompute of greedy decoding that keeps the same image tokens."""

from __future__ import annotations

import pytest
import torch
from _tiny_vlms import (
    IMG,
    add_mm_types,
    build,
    inputs,
    manual_reference,
    reset_rope_deltas,
    text_decoder,
)

from lightning_eff.tokens import DART, DecoderTokenPruner, Indices, dart_keep_indices

pytestmark = pytest.mark.transformers_compat

K, M = 2, 16  # DART keeps 4 + 8 * (16 // 8) = 20 image tokens
CASES = [
    ("llava", None),
    ("llava_next", [32, 64]),  # 3 tiles
    ("llava_next", [64, 64]),  # 5 tiles: another image-token count
    ("qwen2_vl", (12, 16)),
    ("qwen2_5_vl", (8, 12)),
]
IDS = ["llava", "llava_next-32x64", "llava_next-64x64", "qwen2_vl", "qwen2_5_vl"]


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_logits_equal_manual_reference_with_the_config_image_token(family, variant):
    model = build(family)
    kw, start, n = inputs(model, family, variant)
    assert int((kw["input_ids"] == IMG).sum()) == n and n > 20
    with torch.no_grad():
        reset_rope_deltas(model)
        full = model(**kw).logits
    pruner = DecoderTokenPruner(DART(num_kept=M), layer=K)  # no image_token_id, no span
    with pruner.attach(model), torch.no_grad():
        reset_rope_deltas(model)
        got = model(**kw).logits
    assert pruner.resolved_image_token_id == IMG
    want, keep = manual_reference(
        model, kw, K, start, n, lambda hn, keys: dart_keep_indices(hn, keys, start, n, 4, 4, M)
    )
    rec = pruner.last_record
    assert rec.span_len == n and rec.span_kept == 20
    assert rec.keep_index[0].tolist() == keep.tolist()
    assert got.shape == (1, kw["input_ids"].shape[1] - n + 20, model.config.get_text_config().vocab_size)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got[0, -1] - full[0, -1]).abs().max() > 1e-3  # pruning really changed the answer


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_cached_generate_equals_recompute_keeping_the_same_image_tokens(family, variant):
    model = build(family, seed=1)
    kw, start, n = inputs(model, family, variant, seed=2)
    steps = 4
    gen = dict(max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with DecoderTokenPruner(DART(num_kept=M), layer=K).attach(model) as p, torch.no_grad():
        reset_rope_deltas(model)
        out = model.generate(**kw, **gen)
    assert len(p.records) == 1  # only the prefill is pruned
    keep = p.records[0].keep_index[0]
    kept_rel = keep[(keep >= start) & (keep < start + n)] - start
    assert kept_rel.numel() == 20
    seq = kw["input_ids"]
    with DecoderTokenPruner(Indices(kept_rel), layer=K, image_token_id=IMG).attach(model), torch.no_grad():
        for t in range(steps):
            step = {**kw, "input_ids": seq}
            add_mm_types(model, step)
            reset_rope_deltas(model)
            logits = model(**step).logits[:, -1]  # the whole sequence again (a fresh cache each step)
            torch.testing.assert_close(logits, out.logits[t], atol=1e-4, rtol=1e-4)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(seq, out.sequences)


def test_explicit_image_token_id_equals_config_default():
    model = build("llava")
    kw, _, _ = inputs(model, "llava")
    with DecoderTokenPruner(DART(num_kept=M), layer=K).attach(model), torch.no_grad():
        auto = model(**kw).logits
    with DecoderTokenPruner(DART(num_kept=M), layer=K, image_token_id=IMG).attach(model), torch.no_grad():
        given = model(**kw).logits
    torch.testing.assert_close(auto, given, atol=0, rtol=0)


def _pad_left(rows, pad_id=0):
    n = max(r.shape[1] for r in rows)
    ids = torch.cat([torch.cat([torch.full((1, n - r.shape[1]), pad_id), r], dim=1) for r in rows])
    mask = torch.cat([torch.cat([torch.zeros(1, n - r.shape[1]), torch.ones(1, r.shape[1])], 1) for r in rows])
    return ids, mask.long()


def test_llava_next_batch_with_two_resolutions_equals_single_runs():
    """Two images of different resolutions in one left-padded batch: each sequence is pruned with its own
    span and budget, and its logits and greedy tokens equal the single run's."""
    model = build("llava_next", seed=3)
    a, _, na = inputs(model, "llava_next", [32, 64], seed=4)
    b, _, nb = inputs(model, "llava_next", [64, 64], seed=5, text=14)
    assert na != nb
    ids, mask = _pad_left([a["input_ids"], b["input_ids"]])
    pa, pb = a["pixel_values"], b["pixel_values"]
    pv = torch.zeros(2, max(pa.shape[1], pb.shape[1]), *pa.shape[2:])
    pv[0, : pa.shape[1]], pv[1, : pb.shape[1]] = pa[0], pb[0]
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=torch.cat([a["image_sizes"], b["image_sizes"]]))
    gen = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with DecoderTokenPruner(DART(num_kept=M), layer=K).attach(model) as p, torch.no_grad():
        both = model.generate(**batch, **gen)
        rec = p.records[-1]
        one = model.generate(**a, **gen)
        two = model.generate(**b, **gen)
    assert rec.span_lens == (na, nb) and rec.span_kepts == (20, 20)
    # padding dropped, each keeps 5 + 20 + its text: 35 and 39 tokens; the first is left-padded with 4 fillers
    assert rec.kept_len == 39 and rec.fillers.sum(1).tolist() == [4, 0]
    assert torch.equal(both.sequences[0, -4:], one.sequences[0, -4:])
    assert torch.equal(both.sequences[1, -4:], two.sequences[0, -4:])
    for t in range(4):
        torch.testing.assert_close(both.logits[t][0], one.logits[t][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(both.logits[t][1], two.logits[t][0], atol=1e-4, rtol=1e-4)


def test_decoder_of_multimodal_class_is_the_language_model():
    for family in ("llava", "qwen2_vl"):
        model = build(family)
        p = DecoderTokenPruner(DART(num_kept=M), layer=K).attach(model)
        assert p.decoder is text_decoder(model)
        p.detach()
        assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
