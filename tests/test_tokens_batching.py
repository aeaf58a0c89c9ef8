"""Batches of real prompts: sequences holding different numbers of image tokens (or none) are pruned each with
its own span and budget and equal their single runs (prefill logits and cached greedy decoding, eager and
SDPA); a budget that covers a whole span keeps every token and warns once instead of raising."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_tokens_decoder import IMG, K, make_lm, prompt

from lightning_eff.tokens import DART, DecoderTokenPruner, Random

pytestmark = pytest.mark.transformers_compat

GEN = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)


def _left_pad(rows):
    n = max(r.shape[1] for r in rows)
    ids = torch.cat([torch.cat([torch.zeros(1, n - r.shape[1], dtype=torch.long), r], 1) for r in rows])
    mask = torch.cat([torch.cat([torch.zeros(1, n - r.shape[1]), torch.ones(1, r.shape[1])], 1) for r in rows])
    return ids, mask.long()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_mixed_image_token_counts_equal_single_runs(impl):
    lm = make_lm(impl, seed=4)
    rows = [
        prompt(seed=1, prefix=7, n_img=40, n_txt=12),
        prompt(seed=2, prefix=3, n_img=24, n_txt=9),
        torch.randint(1, IMG, (1, 15)),  # a text-only prompt in the same batch
        prompt(seed=3, prefix=2, n_img=12, n_txt=6),  # smaller than DART's 20 kept tokens: kept whole
    ]
    ids, mask = _left_pad(rows)
    with (
        DecoderTokenPruner(DART(num_kept=16), layer=K, image_token_id=IMG).attach(lm) as p,
        torch.no_grad(),
        pytest.warns(UserWarning, match="keep their whole span"),
    ):
        both = lm.generate(ids, attention_mask=mask, **GEN)
        rec = p.records[-1]
        singles = [lm.generate(r, **GEN) for r in rows]
    assert rec.span_lens == (40, 24, 0, 12) and rec.span_kepts == (20, 20, 0, 12)
    # each sequence keeps its own tokens (its padding dropped); the longest sets L', the others are
    # left-padded with masked fillers
    lens = [r.shape[1] - n + k for r, n, k in zip(rows, rec.span_lens, rec.span_kepts)]
    assert lens == [39, 32, 15, 20]
    assert rec.kept_len == 39 and rec.fillers.sum(1).tolist() == [0, 7, 24, 19]
    for i, one in enumerate(singles):
        assert torch.equal(both.sequences[i, -4:], one.sequences[0, -4:]), i
        for t in range(4):
            torch.testing.assert_close(both.logits[t][i], one.logits[t][0], atol=1e-4, rtol=1e-4)


def test_mixed_counts_forward_last_logits_equal_single_runs():
    lm = make_lm("sdpa", seed=5)
    rows = [prompt(seed=4, n_img=40), prompt(seed=5, prefix=4, n_img=30, n_txt=8)]
    ids, mask = _left_pad(rows)
    with DecoderTokenPruner(DART(num_kept=8), layer=K, image_token_id=IMG).attach(lm), torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp_min(0)  # what generate passes for a left-padded batch
        both = lm(ids, attention_mask=mask, position_ids=pos).logits
        singles = [lm(r).logits for r in rows]
    for i, one in enumerate(singles):
        torch.testing.assert_close(both[i, -1], one[0, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("selector", [DART(num_kept=200), Random(num_kept=41)], ids=["dart", "random"])
def test_budget_covering_the_span_keeps_everything_and_warns_once(selector):
    lm = make_lm("sdpa")
    ids = prompt()  # 40 image tokens
    with torch.no_grad():
        ref = lm(ids).logits
    with DecoderTokenPruner(selector, layer=K, image_token_id=IMG).attach(lm) as p, torch.no_grad():
        with pytest.warns(UserWarning, match=r"budget keeps \d+ tokens but a sequence's span holds only 40"):
            got = lm(ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per pruner: a second small image does not warn again
            again = lm.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    assert p.records[0].span_kept == 40 and p.records[0].kept_len == ids.shape[1]
    assert again.shape[1] == ids.shape[1] + 2
