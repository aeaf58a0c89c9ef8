"""lightning_eff.select: Data Whisperer math, the attention re-run, scoring, the DataModule, caching, baselines."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lightning_eff.llm import InstructionCollator, build_causal_lm, generate_arithmetic, load_tokenizer
from lightning_eff.llm.metrics import extract_answer
from lightning_eff.select import (
    DataWhispererDataModule,
    DataWhispererScorer,
    EL2NScorer,
    GraNdScorer,
    ICLTemplate,
    RandomScorer,
    build_icl_prompt,
    data_whisperer_scores,
    default_attention_layer,
    demonstration_weights,
    el2n_from_logits,
    grand_scores,
    layer_attention,
    load_selection,
    plan_prompts,
    query_scores,
    token_spans,
    top_k,
)
from lightning_eff.select import datamodule as dm_module
from lightning_eff.select.data_whisperer import split_answers

ROOT = Path(__file__).resolve().parents[1]
SELECT_CONFIG = ROOT / "configs" / "select" / "arithmetic.yaml"
TINY = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "initializer_range": 0.3,  # peaked attention, so that demonstration weights differ clearly
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("arithmetic-bpe")


@pytest.fixture(scope="module")
def lm(tok):
    torch.manual_seed(0)
    return build_causal_lm(TINY, tok).eval()


@pytest.fixture(scope="module")
def records():
    return generate_arithmetic(23, seed=5)


def oracle(records, right=lambda q: len(q) % 3 != 0):
    """A stub for generation: answers each query of a prompt, correctly iff ``right(question)``."""
    gold = {r["question"]: extract_answer(r["answer"]) for r in records}

    def predict(texts, n_answers):
        out = []
        for text, n in zip(texts, n_answers):
            qs = re.findall(r'Question \d+: "(.*?)"', text)
            assert len(qs) == n
            out.append(
                "".join(
                    f"Question {k} Answer: #### {gold[q] if right(q) else '-1'}\n"
                    for k, q in enumerate(qs, 1)
                )
            )
        return out

    return predict


# ------------------------------------------------------------------------------------------------
# pure math
# ------------------------------------------------------------------------------------------------
def test_demonstration_weights_hand_computed():
    A = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.2, 0.8, 0.0, 0.0, 0.0, 0.0],
            [0.1, 0.2, 0.7, 0.0, 0.0, 0.0],
            [0.1, 0.1, 0.3, 0.5, 0.0, 0.0],
            [0.1, 0.2, 0.1, 0.2, 0.4, 0.0],
            [0.3, 0.1, 0.1, 0.1, 0.2, 0.2],
        ]
    )
    # demos: columns [1, 3) and [3, 4); response rows [4, 6)
    a1 = (0.2 + 0.1 + 0.1 + 0.1) / (2 * 2)  # rows 4,5 x cols 1,2
    a2 = (0.2 + 0.1) / (1 * 2)  # rows 4,5 x col 3
    w = demonstration_weights(A, [(1, 3), (3, 4)], (4, 6))
    assert w.tolist() == pytest.approx([a1 / (a1 + a2), a2 / (a1 + a2)])
    assert float(w.sum()) == pytest.approx(1.0)
    assert demonstration_weights(torch.zeros(3, 3), [(0, 1), (1, 2)], (2, 3)).tolist() == [0.5, 0.5]


def test_demonstration_weights_bad_inputs():
    A = torch.rand(4, 4)
    with pytest.raises(ValueError, match="2-D"):
        demonstration_weights(torch.rand(1, 4, 4), [(0, 1)], (2, 4))
    with pytest.raises(ValueError, match="demo span 1"):
        demonstration_weights(A, [(0, 1), (2, 9)], (2, 4))
    with pytest.raises(ValueError, match="response_span"):
        demonstration_weights(A, [(0, 1)], (3, 3))
    with pytest.raises(ValueError, match="empty"):
        demonstration_weights(A, [], (2, 4))


def test_plan_prompts_is_the_official_two_fold_schedule():
    from sklearn.model_selection import KFold

    plans = plan_prompts(23, n_demos=5, n_queries=3, seed=42)
    folds = list(KFold(n_splits=2, shuffle=True, random_state=42).split(range(23)))
    expected = []
    for demo_pool, query_pool in folds:
        demos = [demo_pool[i : i + 5].tolist() for i in range(0, len(demo_pool), 5)]
        queries = [query_pool[i : i + 3].tolist() for i in range(0, len(query_pool), 3)]
        expected += [(d, queries[b % len(queries)]) for b, d in enumerate(demos)]
    assert [(list(p.demos), list(p.queries)) for p in plans] == expected
    assert sorted(i for p in plans for i in p.demos) == list(range(23))  # every example a demo once
    ext = plan_prompts(7, 2, 2, num_query_records=3)
    assert [p.queries for p in ext] == [(0, 1), (2,), (0, 1), (2,)] and all(p.external_queries for p in ext)
    with pytest.raises(ValueError, match="at least 2"):
        plan_prompts(1)


def test_query_scores_and_answer_splitting():
    assert query_scores(["5", "7", "9"], ["#### 5", "3 + 4 = 7\n#### 7"]) == [1.0, 1.0]
    assert query_scores(["5"], ["#### 5", "#### 7"]) is None
    text = "Question 1 Answer: the cat sat\nQuestion 2 Answer: on the mat\n"
    assert split_answers(text, 2, ICLTemplate(), "rouge_l") == ["the cat sat", "on the mat"]
    assert query_scores(
        ["the cat sat", "on a mat"], ["the cat sat", "on the mat"], "rouge_l"
    ) == pytest.approx([1.0, 2 / 3])
    assert default_attention_layer(Qwen2Config(num_hidden_layers=36)) == 16
    assert default_attention_layer(LlamaConfig(num_hidden_layers=32)) == 13


# ------------------------------------------------------------------------------------------------
# spans and the attention re-run
# ------------------------------------------------------------------------------------------------
def test_token_spans_match_the_tokenizer_offsets(tok, records):
    prompt = build_icl_prompt(records[:5], records[5:8])
    enc = tok(prompt.text, return_offsets_mapping=True, return_special_tokens_mask=True)
    offsets = enc["offset_mapping"]
    spans = token_spans(offsets, [*prompt.demo_spans, prompt.response_span], enc["special_tokens_mask"])
    n_tokens = len(enc["input_ids"])
    for (cs, ce), (ts, te) in zip([*prompt.demo_spans, prompt.response_span], spans):
        # first token starts the part (the tokenizer's own char -> token map agrees), and the text of the
        # part is exactly the text of its tokens
        assert enc.char_to_token(cs) == ts
        assert offsets[ts][0] == cs and (te == n_tokens or offsets[te][0] == ce)
        assert tok.decode(enc["input_ids"][ts:te]) == prompt.text[cs:ce]
    # the parts tile the prompt after the instruction, with no gaps
    assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1)) and spans[-1][1] == n_tokens


def test_token_spans_with_merges_across_boundaries():
    # byte-level BPE trained so that "x\n" + "Q" merges: a token straddling the boundary goes to the span its
    # first character is in, and the next span starts at the first token that starts inside it
    from lightning_eff.llm import train_bpe_tokenizer

    t = train_bpe_tokenizer(["ab\nQcd\nQ"] * 50, vocab_size=270, individual_digits=False)
    text = "ab\nQcd\nQ"
    enc = t(text, return_offsets_mapping=True, add_special_tokens=False)
    spans = token_spans(enc["offset_mapping"], [(0, 3), (3, 7)])
    for (cs, ce), (ts, te) in zip([(0, 3), (3, 7)], spans):
        assert all(cs <= enc["offset_mapping"][i][0] < ce for i in range(ts, te))
    with pytest.raises(ValueError, match="no token"):
        token_spans([(0, 4)], [(1, 3)])


@pytest.mark.parametrize(
    "config_cls,model_cls", [(LlamaConfig, LlamaForCausalLM), (Qwen2Config, Qwen2ForCausalLM)]
)
def test_rerun_equals_output_attentions_of_a_plain_forward(config_cls, model_cls):
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    model = model_cls(cfg).eval()
    ids = torch.randint(1, 64, (3, 17))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[2, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    for layer in range(3):
        full = layer_attention(model, ids, mask, layer)
        assert torch.allclose(full, ref[layer].sum(1), atol=1e-5)
        rows = layer_attention(model, ids, mask, layer, last_rows=6)
        assert torch.allclose(rows, ref[layer].sum(1)[:, -6:], atol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored


def test_rerun_stops_after_layer_L(lm):
    calls = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
        for k, layer in enumerate(lm.model.layers)
    ]
    try:
        layer_attention(lm, torch.randint(3, 100, (1, 9)), torch.ones(1, 9, dtype=torch.long), layer=1)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0]  # layer 1 raised inside its attention; layer 2 never ran


class _NoAttentionLM(torch.nn.Module):
    """A causal LM that returns logits only (no attention weights, no AttentionInterface)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(
            logits=self.inner(input_ids=input_ids, attention_mask=attention_mask).logits
        )


def test_model_without_attention_outputs_is_a_clear_error(lm, tok, records):
    with pytest.raises(ValueError, match="returns no attention weights"):
        layer_attention(
            _NoAttentionLM(lm), torch.randint(3, 100, (1, 5)), torch.ones(1, 5, dtype=torch.long), 1
        )
    with pytest.raises(ValueError, match="returns no attention weights"):
        data_whisperer_scores(
            _NoAttentionLM(lm), tok, records, layer=1, progress=False, predict_fn=oracle(records)
        )
    with pytest.raises(ValueError, match="layer"):
        layer_attention(lm, torch.randint(3, 100, (1, 5)), torch.ones(1, 5, dtype=torch.long), 3)


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------
def _reference_scores(lm, tok, records, layer, right, n_demos=5, n_queries=3):
    """Independent re-computation: one prompt at a time, a plain eager forward, char_to_token spans and the
    formulas written out."""
    total = torch.zeros(len(records), dtype=torch.float64)
    count = torch.zeros(len(records), dtype=torch.float64)
    lm.set_attn_implementation("eager")
    try:
        for plan in plan_prompts(len(records), n_demos, n_queries):
            demos, queries = [records[i] for i in plan.demos], [records[i] for i in plan.queries]
            p = build_icl_prompt(demos, queries)
            enc = tok(p.text, return_tensors="pt")
            with torch.no_grad():
                A = lm(**enc, output_attentions=True).attentions[layer][0].sum(0)
            n = enc["input_ids"].shape[1]
            starts = [enc.char_to_token(s) for s, _ in p.demo_spans] + [
                enc.char_to_token(p.response_span[0]),
                n,
            ]
            r0, r1 = starts[-2], starts[-1]
            a = [float(A[r0:r1, starts[j] : starts[j + 1]].sum()) / ((starts[j + 1] - starts[j]) * (r1 - r0))
                 for j in range(len(demos))]  # fmt: skip
            s = [1.0 if right(q["question"]) else 0.0 for q in queries]
            for j, i in enumerate(plan.demos):
                total[i] += a[j] / sum(a) * sum(s)
                count[i] += len(s)
    finally:
        lm.set_attn_implementation("sdpa")
    return total / count


def test_scores_equal_w_times_mean_query_score(lm, tok, records):
    right = lambda q: len(q) % 3 != 0  # noqa: E731
    res = data_whisperer_scores(lm, tok, records, layer=2, progress=False, predict_fn=oracle(records, right))
    expected = _reference_scores(lm, tok, records, 2, right)
    assert res.num_skipped == 0 and res.num_prompts == len(plan_prompts(23))
    assert torch.allclose(res.scores, expected, atol=1e-6)
    assert res.scores.max() > 0


def test_ranking_is_invariant_to_prompt_batching(lm, tok, records):
    runs = [
        data_whisperer_scores(
            lm, tok, records, layer=1, prompt_batch_size=b, progress=False, predict_fn=oracle(records)
        )
        for b in (1, 3, 8)
    ]
    gaps = runs[0].scores.sort().values.diff()
    assert gaps[gaps > 0].min() > 1e-5  # distinct scores, so the ranking is a real check
    for r in runs[1:]:
        assert torch.allclose(r.scores, runs[0].scores, atol=1e-7)
        assert top_k(r.scores, 23) == top_k(runs[0].scores, 23)


def test_sharded_scores_add_up_to_the_full_run(lm, tok, records):
    full = data_whisperer_scores(lm, tok, records, layer=1, progress=False, predict_fn=oracle(records))
    parts = [data_whisperer_scores(lm, tok, records, layer=1, rank=r, world_size=2, progress=False,
                                   predict_fn=oracle(records)) for r in range(2)]  # fmt: skip
    assert parts[0].num_prompts + parts[1].num_prompts == full.num_prompts
    total = parts[0].score_sum + parts[1].score_sum
    count = parts[0].count + parts[1].count
    assert torch.allclose(total / count, full.scores, atol=1e-9)


def test_skipped_prompts_and_real_generation(lm, tok, records):
    # a response with fewer answers than queries skips the prompt (its demos keep count 0 -> score 0)
    res = data_whisperer_scores(
        lm, tok, records, layer=1, progress=False, predict_fn=lambda t, n: ["#### 1"] * len(t)
    )
    assert res.num_skipped == res.num_prompts and (res.scores == 0).all()
    # real greedy generation runs end to end (a random model answers nothing right)
    res = data_whisperer_scores(
        lm, tok, records[:8], n_demos=2, n_queries=2, max_new_tokens=6, progress=False
    )
    assert res.num_prompts == 4 and (res.scores == 0).all()


# ------------------------------------------------------------------------------------------------
# the DataModule
# ------------------------------------------------------------------------------------------------
_DW_KEYS = ("n_demos", "n_queries", "attention_layer", "max_new_tokens", "prompt_batch_size", "queries_from_val",
            "passes")  # fmt: skip


def _dm(tmp_path=None, method="data_whisperer", **kw):
    """A DataModule on 23 arithmetic examples; scorer settings in ``kw`` go to the scorer of ``method``."""
    args = dict(scorer_model=TINY, num_train=23, num_val=4, num_test=4, progress=False, seed=5)
    if tmp_path is not None:
        args["cache_dir"] = str(tmp_path / "cache")
    if method == "data_whisperer":
        dw = {"attention_layer": 1, "max_new_tokens": 6, **{k: kw.pop(k) for k in _DW_KEYS if k in kw}}
        args["scorer"] = DataWhispererScorer(**dw)
    elif method in ("el2n", "grand"):
        warm = {k: kw.pop(k) for k in ("warmup_steps", "warmup_lr") if k in kw}
        args["scorer"] = (EL2NScorer if method == "el2n" else GraNdScorer)(**warm)
    else:
        args["method"] = method
    args.update(kw)
    return DataWhispererDataModule(**args)


def _stub_scores(monkeypatch, records):
    calls = []
    real = data_whisperer_scores

    def fake(model, tokenizer, recs, *a, **kw):
        calls.append(1)
        queries = a[0] if a else kw.get("query_records")
        kw["predict_fn"] = oracle(list(recs) + list(queries or []))
        return real(model, tokenizer, recs, *a, **kw)

    monkeypatch.setattr("lightning_eff.select.data_whisperer.data_whisperer_scores", fake)
    return calls


def test_datamodule_selects_top_ratio_and_serves_it(monkeypatch, tmp_path):
    torch.manual_seed(0)
    calls = _stub_scores(monkeypatch, None)
    dm = _dm(tmp_path, ratio=0.2)
    dm.setup("fit")
    assert calls == [1]
    k = math.ceil(0.2 * 23)
    assert len(dm.selected_indices) == k == 5
    assert dm.selected_indices == top_k(dm.scores, k, seed=dm.selection_seed)
    served = {int(i) for b in dm.train_dataloader() for i in b["index"]}
    assert served == set(dm.selected_indices)
    rest = sorted(set(range(23)) - set(dm.selected_indices))
    assert dm.scores[dm.selected_indices].min() >= dm.scores[rest].max() and dm.scores.max() > 0
    exported = load_selection(dm.selection_file)
    assert exported["indices"] == dm.selected_indices and exported["num_examples"] == 23
    assert [e["question"] for e in exported["examples"]] == [
        dm.train_records[i]["question"] for i in dm.selected_indices
    ]
    assert dm.selection_stats["num_selected"] == 5 and dm.selection_stats["cache_hit"] == 0.0
    # validation/test are untouched
    assert len(dm.val_dataloader().dataset) == len(dm.val_records)


def test_cache_hit_skips_scoring_and_a_ratio_sweep_reuses_it(monkeypatch, tmp_path):
    calls = _stub_scores(monkeypatch, None)
    torch.manual_seed(0)
    first = _dm(tmp_path, ratio=0.2)
    first.setup("fit")
    torch.manual_seed(0)  # same scorer weights -> same key
    second = _dm(tmp_path, ratio=0.5)
    second.setup("fit")
    assert calls == [1] and second.cache_hit
    assert torch.equal(second.scores, first.scores)
    assert second.selected_indices[:5] == first.selected_indices and len(second.selected_indices) == 12
    assert second.selection_stats["scoring_seconds"] == pytest.approx(
        first.selection_stats["scoring_seconds"]
    )
    torch.manual_seed(1)  # different weights -> different key -> scored again
    _dm(tmp_path, ratio=0.2).setup("fit")
    assert calls == [1, 1]
    torch.manual_seed(0)
    _dm(tmp_path, ratio=0.2, n_queries=2).setup("fit")  # a different setting -> scored again
    assert len(calls) == 3
    # a corrupted cache file is ignored (and rewritten)
    for f in (tmp_path / "cache").glob("scores-*.json"):
        f.write_text("{not json")
    torch.manual_seed(0)
    again = _dm(tmp_path, ratio=0.2)
    with pytest.warns(UserWarning, match="unreadable"):
        again.setup("fit")
    assert len(calls) == 4 and not again.cache_hit
    stored = json.loads(Path(again.cache_file).read_text())
    assert stored["format_version"] == dm_module.FORMAT_VERSION and stored["key"] == again.cache_key
    assert stored["scores"] == again.scores.tolist()


def test_selection_file_format_is_checked(tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps({"format_version": 99, "kind": "selection"}))
    with pytest.raises(ValueError, match="format version"):
        load_selection(bad)


def test_datamodule_bad_arguments(tmp_path):
    for ratio in (0, 0.0, 1.5, -0.1, float("nan")):
        with pytest.raises((ValueError, TypeError), match="ratio"):  # NaN: TypeError of utils.checks.check_float
            DataWhispererDataModule(ratio=ratio)
    with pytest.raises(ValueError, match="method"):
        DataWhispererDataModule(method="less")
    with pytest.raises(ValueError, match="num_selected"):
        DataWhispererDataModule(num_selected=0)
    with pytest.raises(ValueError, match="n_demos.*settings of the scorer"):
        DataWhispererDataModule(n_demos=5)  # moved to DataWhispererScorer: a message says where
    with pytest.raises(ValueError, match="n_demos"):
        DataWhispererScorer(n_demos=0)
    with pytest.raises(ValueError, match="passes"):
        DataWhispererScorer(passes=0)
    with pytest.raises(ValueError, match="icl_template"):
        DataWhispererScorer(icl_template={"demonstration": "no fields"})
    with pytest.raises(ValueError, match="warmup_lr"):
        EL2NScorer(warmup_lr=0)
    with pytest.raises(ValueError, match="not both"):
        DataWhispererDataModule(scorer=RandomScorer(), method="random")
    with pytest.raises(TypeError, match="scorer"):
        DataWhispererDataModule(scorer="random")
    with pytest.raises(ValueError, match="num_selected"):
        _dm(num_selected=50, method="random").setup("fit")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="too few|empty"):
        DataWhispererDataModule(data_path=str(empty), num_val=0, num_test=0).setup("fit")
    missing = tmp_path / "m.jsonl"
    missing.write_text('{"question": "q", "solution": "a"}\n' * 5)
    with pytest.raises(ValueError, match="no field 'answer'"):
        DataWhispererDataModule(data_path=str(missing), num_val=1, num_test=1, scorer_model=TINY).setup("fit")
    with pytest.raises(ValueError, match="scorer_model"):
        DataWhispererDataModule(num_train=4, num_val=1, num_test=1).setup("fit")  # no trainer, no scorer


def test_random_and_full_methods(monkeypatch):
    a, b = _dm(method="random", ratio=0.3, selection_seed=0), _dm(method="random", ratio=0.3, selection_seed=0)
    a.setup("fit")
    b.setup("fit")
    assert a.selected_indices == b.selected_indices and len(a.selected_indices) == 7
    c = _dm(method="random", ratio=0.3, selection_seed=1)
    c.setup("fit")
    assert c.selected_indices != a.selected_indices
    full = _dm(method="full")
    full.setup("fit")
    assert full.selected_indices == list(range(23))
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")  # default: the seed_everything seed
    d = _dm(method="random", ratio=0.3)
    d.setup("fit")
    assert d.selection_seed == 1 and d.selected_indices == c.selected_indices


def test_el2n_against_the_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, 1, 3, -100], [-100, -100, -100, 2]])
    expected = []
    for b in range(2):
        errs = []
        for t in range(1, 4):
            if labels[b, t] != -100:
                p = torch.softmax(logits[b, t - 1], -1)
                errs.append(
                    float(torch.linalg.vector_norm(p - torch.nn.functional.one_hot(labels[b, t], 5).float()))
                )
        expected.append(sum(errs) / len(errs))
    assert el2n_from_logits(logits, labels).tolist() == pytest.approx(expected, rel=1e-5)


def test_grand_against_manual_per_example_gradients(tok, records):
    """GraNd = || grad of the answer-token cross-entropy || per example; the reference builds the tokens and the
    loss by hand (F.cross_entropy on the answer positions) and reads p.grad after backward."""
    torch.manual_seed(0)
    model = build_causal_lm({**TINY, "num_hidden_layers": 1, "max_position_embeddings": 128}, tok).eval()
    recs = records[:3]
    got = grand_scores(model, InstructionCollator(tok), recs, progress=False)
    for k, r in enumerate(recs):
        prompt = tok(f"Question: {r['question']}\nAnswer:\n")["input_ids"]
        answer = tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + answer])
        logits = model(input_ids=ids).logits[0]
        targets = torch.tensor(answer)
        loss = torch.nn.functional.cross_entropy(logits[len(prompt) - 1 : -1], targets)
        model.zero_grad()
        loss.backward()
        norm = math.sqrt(
            sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
        )
        assert float(got[k]) == pytest.approx(norm, rel=1e-4)
    model.zero_grad()


def test_el2n_and_grand_methods_select(monkeypatch):
    torch.manual_seed(0)
    for method in ("el2n", "grand"):
        dm = _dm(method=method, ratio=0.25, warmup_steps=2, num_train=12)
        dm.setup("fit")
        assert len(dm.selected_indices) == 3
        assert dm.selected_indices == top_k(dm.scores, 3, seed=dm.selection_seed) and float(dm.scores.min()) > 0


def test_checkpoint_state_restores_the_subset():
    dm = _dm(method="random", ratio=0.3)
    dm.setup("fit")
    state = dm.state_dict()
    other = _dm(method="random", ratio=0.3, selection_seed=3)
    other.setup("fit")
    with pytest.warns(UserWarning, match="differs"):
        other.load_state_dict(state)
    assert {int(i) for b in other.train_dataloader() for i in b["index"]} == set(dm.selected_indices)


def test_cli_fit_on_the_selected_subset(tmp_path, monkeypatch):
    """The real CLI on configs/select/arithmetic.yaml: scores with the model being fine-tuned, trains on the
    top 10 %, logs STR."""
    from lightning_eff.cli import LightningEffCLI
    from lightning_eff.select import SelectionToTuningRatio

    monkeypatch.setattr(sys, "argv", ["lightning-eff"])
    tiny = json.dumps({**TINY, "num_hidden_layers": 2})
    args = [
        "fit",
        "--config",
        str(SELECT_CONFIG),
        f"--model.init_args.model={tiny}",
        "--data.init_args.num_train=30",
        "--data.init_args.num_val=4",
        "--data.init_args.num_test=4",
        "--data.init_args.scorer.init_args.max_new_tokens=4",
        "--data.init_args.full_finetune_seconds=10.0",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.progress=false",
        "--model.init_args.max_new_tokens=4",
        "--trainer.max_steps=2",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    with pytest.warns(UserWarning, match="every Data Whisperer score is 0.*random draw"):
        cli = LightningEffCLI(args=args)
    dm = cli.datamodule
    assert isinstance(dm, DataWhispererDataModule) and len(dm.selected_indices) == 3
    assert (
        len(dm.train_dataloader().dataset) == 3 and cli.trainer.num_training_batches == 1
    )  # 3 examples, batch 16
    assert dm.selection_stats["str"] == pytest.approx(dm.selection_stats["scoring_seconds"] / 10.0)
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, SelectionToTuningRatio)]
    assert dm.selection_stats["str_estimate"] > 0 and "test/exact_match" in cli.trainer.callback_metrics
    assert list((tmp_path / "cache").glob("selection-*.json"))


_DDP_WORKER = r"""
import json, os, re, sys
import torch
torch.set_num_threads(1)
import lightning as L
from lightning_eff.llm import CausalLMModule
from lightning_eff.llm.metrics import extract_answer
import lightning_eff.select.data_whisperer as dw
from lightning_eff.select import DataWhispererDataModule, DataWhispererScorer, EL2NScorer

model_dir, out_dir, method = sys.argv[1], sys.argv[2], sys.argv[3]
real = dw.data_whisperer_scores

def fake(model, tok, recs, *a, **kw):
    gold = {r["question"]: extract_answer(r["answer"]) for r in list(recs) + list((a[0] if a else None) or [])}
    def predict(texts, ns):
        outs = []
        for t in texts:
            qs = re.findall(r'Question \d+: "(.*?)"', t)
            outs.append("".join(f"#### {gold[q] if len(q) % 3 else -1}\n" for q in qs))
        return outs
    kw["predict_fn"] = predict
    return real(model, tok, recs, *a, **kw)

dw.data_whisperer_scores = fake
scorer = DataWhispererScorer(attention_layer=1) if method == "data_whisperer" else EL2NScorer(warmup_steps=2)
dm = DataWhispererDataModule(scorer=scorer, ratio=0.25, scorer_model=model_dir, num_train=23, num_val=4, num_test=4,
                             seed=5, progress=False, batch_size=4)
module = CausalLMModule(model_dir, max_new_tokens=2, generate_eval=False)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
trainer.fit(module, datamodule=dm)
with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
    json.dump({"indices": dm.selected_indices, "scores": dm.scores.tolist(), "world": trainer.world_size}, f)
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["data_whisperer", "el2n"])
def test_ddp_two_processes_select_the_same_subset_as_one(tmp_path, tok, monkeypatch, method):
    """Two CPU processes (gloo) shard the scoring, reduce, and end with the single-process subset."""
    import socket
    import subprocess

    torch.manual_seed(0)
    model_dir = tmp_path / "scorer"
    build_causal_lm(TINY, tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    _stub_scores(monkeypatch, None)
    scorer = DataWhispererScorer(attention_layer=1) if method == "data_whisperer" else EL2NScorer(warmup_steps=2)
    single = DataWhispererDataModule(scorer=scorer, ratio=0.25, scorer_model=str(model_dir), num_train=23, num_val=4,
                                     num_test=4, seed=5, progress=False, batch_size=4)  # fmt: skip
    single.setup("fit")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0", "PYTHONWARNINGS": "ignore"}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(script), str(model_dir), str(tmp_path), method], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world"] == 2 and ranks[0]["indices"] == ranks[1]["indices"]
    assert ranks[0]["indices"] == single.selected_indices
    assert torch.allclose(
        torch.tensor(ranks[0]["scores"], dtype=torch.float64), single.scores, rtol=1e-5, atol=1e-7
    )
