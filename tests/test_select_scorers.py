"""lightning_eff.select scorers and the in-context task family: generator, tie-breaking, passes, the Scorer plug-ins
through the real CLI (class_path, cache hits), warnings, and a meta-trained scorer that learns in context."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from lightning_eff.llm import build_causal_lm, load_tokenizer
from lightning_eff.llm.icl_tasks import (
    LookupTask,
    generate_lookup_task,
    icl_meta_training_records,
    icl_task_template,
    icl_task_tokenizer,
    ideal_copier,
)
from lightning_eff.llm.metrics import extract_answer
from lightning_eff.select import (
    DataWhispererDataModule,
    DataWhispererScorer,
    RandomScorer,
    data_whisperer_scores,
    matched_share,
    plan_prompts,
    top_k,
)
from lightning_eff.select.data_whisperer import WhispererResult

ROOT = Path(__file__).resolve().parents[1]
SCORER_DIR = ROOT / "benchmarks" / "results" / "data_whisperer" / "scorer"
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 512}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# the task family
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("corruption", ["random", "systematic"])
def test_generator_is_seeded_with_the_asked_corruption_rate_and_right_flags(corruption):
    pool = generate_lookup_task(500, task_seed=7, seed=3, noise=0.3, corruption=corruption)
    assert pool == generate_lookup_task(500, task_seed=7, seed=3, noise=0.3, corruption=corruption)
    assert pool != generate_lookup_task(500, task_seed=7, seed=4, noise=0.3, corruption=corruption)
    assert sum(r["corrupted"] for r in pool) == 150  # exactly round(0.3 * 500)
    task = LookupTask.draw(7)
    assert {r["key"] for r in pool} == set(task.keys)
    for r in pool:
        value = int(extract_answer(r["answer"]))
        assert r["question"] == f"Code of {r['key']}?"
        assert (value == task.mapping[r["key"]]) == (not r["corrupted"])  # the flag is exactly "the answer is wrong"
        if r["corrupted"] and corruption == "systematic":
            assert value == task.confusion[r["key"]]
    if corruption == "random":  # random corruption uses several wrong values per key
        wrong = {}
        for r in pool:
            if r["corrupted"]:
                wrong.setdefault(r["key"], set()).add(r["answer"])
        assert max(len(v) for v in wrong.values()) > 1
    clean = generate_lookup_task(50, task_seed=7, seed=3)
    assert not any(r["corrupted"] for r in clean)
    # another task maps the same keys differently
    other = [LookupTask.draw(s) for s in range(20)]
    assert len({tuple(sorted(t.mapping.items())) for t in other}) == 20


def test_generator_bad_arguments():
    with pytest.raises(ValueError, match="noise"):
        generate_lookup_task(5, noise=1.5)
    with pytest.raises(ValueError, match="corruption"):
        generate_lookup_task(5, noise=0.1, corruption="swap")
    with pytest.raises(ValueError, match="num_keys"):
        generate_lookup_task(5, num_keys=27)
    with pytest.raises(ValueError, match="num_examples"):
        generate_lookup_task(-1)


def test_meta_training_records_are_dw_prompts_of_unseen_tasks():
    docs = icl_meta_training_records(20, seed=1, n_demos=5, n_queries=3)
    t = icl_task_template()
    for d in docs:
        assert d["question"].startswith(t.instruction) and d["question"].endswith(t.response_header)
        assert d["question"].count(" #### ") == 5  # five demonstrations with answers
        assert re.fullmatch(r"(Q\d: Code of (\w)\? \2(\d) #### \3\n?){3}", d["answer"])
    # the queries' answers are the episode's own mapping: a demonstration of the same key shows the same value
    for d in docs:
        demos = dict(re.findall(r"Code of (\w)\? \w\d #### (\d)", d["question"]))
        keys = re.findall(r"Q\d: Code of (\w)\?", d["question"])
        values = re.findall(r"#### (\d)", d["answer"])
        for k, v in zip(keys, values):
            if k in demos:
                assert demos[k] == v


# ------------------------------------------------------------------------------------------------
# tie-breaking and passes
# ------------------------------------------------------------------------------------------------
def test_ties_are_broken_at_random_with_a_seed():
    scores = torch.tensor([0.0] * 50 + [1.0, 2.0] + [0.0] * 48)
    picks = [top_k(scores, 10, seed=s) for s in range(5)]
    for p in picks:
        assert p[:2] == [51, 50]  # real differences keep their order
        assert len(set(p)) == 10
    assert top_k(scores, 10, seed=3) == picks[3]  # reproducible
    assert len({tuple(p[2:]) for p in picks}) == 5  # the tied part differs by seed
    assert not all(p[2:] == list(range(8)) for p in picks)  # not index order
    tied = torch.stack([torch.tensor(sorted(p[2:])) for p in picks]).float()
    assert float(tied.mean()) > 20  # spread over the data, not the first indices
    assert top_k(scores, 10) == [51, 50, *range(8)]  # seed=None: the documented index order


def test_passes_score_each_example_once_per_pass_and_report_agreement():
    plans = plan_prompts(20, 5, 3, seed=1, num_query_records=6, passes=3)
    for p in range(3):
        demos = sorted(i for plan in plans if plan.pass_index == p for i in plan.demos)
        assert demos == list(range(20))
    assert [pl.demos for pl in plans[:4]] != [pl.demos for pl in plans[4:8]]  # a new assignment
    r = WhispererResult(torch.tensor([[1.0, 2.0, 3.0, 0.0], [1.0, 2.0, 3.0, 5.0]]),
                        torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]), 2, 0)  # fmt: skip
    assert r.scores.tolist() == [1.0, 2.0, 3.0, 5.0]  # averaged over the passes that scored each example
    perfect = WhispererResult(torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]]), torch.ones(2, 3), 2, 0)
    assert perfect.pass_agreement() == pytest.approx(1.0)
    reverse = WhispererResult(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), torch.ones(2, 3), 2, 0)
    assert reverse.pass_agreement() == pytest.approx(-1.0)


def _oracle(records, right):
    gold = {r["question"]: extract_answer(r["answer"]) for r in records}

    def predict(texts, n_answers):
        out = []
        for text in texts:
            qs = re.findall(r"Q\d+: (Code of \w\?)", text)
            out.append("".join(f"Q{k}: #### {gold[q] if right(q) else '-1'}\n" for k, q in enumerate(qs, 1)))
        return out

    return predict


def test_passes_through_the_functional_entry_point():
    tok = icl_task_tokenizer()
    torch.manual_seed(0)
    lm = build_causal_lm(TINY, tok).eval()
    pool = generate_lookup_task(20, task_seed=2, seed=1)
    val = generate_lookup_task(6, task_seed=2, seed=2)
    kw = dict(template=icl_task_template(), layer=1, progress=False, predict_fn=_oracle(val, lambda q: True))
    one = data_whisperer_scores(lm, tok, pool, val, seed=3, **kw)
    two = data_whisperer_scores(lm, tok, pool, val, seed=3, passes=2, **kw)
    assert one.scores.shape == (20,) and two.score_sum.shape == (2, 20)
    assert torch.allclose(two.pass_scores[0], one.scores)  # pass 0 is the official schedule
    assert two.num_prompts == 2 * one.num_prompts and -1.0 <= two.pass_agreement() <= 1.0


# ------------------------------------------------------------------------------------------------
# matched queries: one query per demonstration, asking its key
# ------------------------------------------------------------------------------------------------
def test_matched_queries_ask_the_key_of_every_demonstration():
    pool = generate_lookup_task(41, task_seed=5, seed=1, num_keys=6)
    val = generate_lookup_task(30, task_seed=5, seed=2, num_keys=6)
    dk, qk = [r["key"] for r in pool], [r["key"] for r in val]
    assert set(qk) == set(LookupTask.draw(5, 6).keys)  # every key has validation queries
    plans = plan_prompts(41, 5, 5, seed=0, num_query_records=30, passes=2, demo_keys=dk, query_keys=qk)
    for p in range(2):  # every example is a demonstration exactly once per pass
        assert sorted(i for pl in plans if pl.pass_index == p for i in pl.demos) == list(range(41))
    for pl in plans:
        assert len(pl.queries) == len(pl.demos) and pl.external_queries
        assert sorted(qk[q] for q in pl.queries) == sorted(dk[d] for d in pl.demos)
    assert matched_share(plans, dk, qk) == 1.0
    # n_queries = 1: one prompt per demonstration, the same demonstrations, together asking every key once
    single = plan_prompts(41, 5, 1, seed=0, num_query_records=30, demo_keys=dk, query_keys=qk)
    assert len(single) == 41 and all(len(pl.queries) == 1 for pl in single)
    by_batch = {}
    for pl in single:
        by_batch.setdefault(pl.demos, []).append(qk[pl.queries[0]])
    assert len(by_batch) == 9 and all(sorted(ks) == sorted(dk[d] for d in demos) for demos, ks in by_batch.items())
    # the official cycle of 3 queries per prompt asks the key of only some demonstrations (counted by hand here)
    official = plan_prompts(41, 5, 3, seed=0, num_query_records=30)
    hits = sum(dk[d] in {qk[q] for q in pl.queries} for pl in official for d in pl.demos)
    assert matched_share(official, dk, qk) == hits / 41 < 1.0
    # a key without a validation query falls back to the plain cycle (and is not matched)
    few = [r for r in val if r["key"] != dk[0]]
    fk = [r["key"] for r in few]
    plans = plan_prompts(41, 5, 5, seed=0, num_query_records=len(few), demo_keys=dk, query_keys=fk)
    assert all(len(pl.queries) == len(pl.demos) for pl in plans) and matched_share(plans, dk, fk) < 1.0
    with pytest.raises(ValueError, match="both"):
        plan_prompts(41, 5, 3, num_query_records=30, demo_keys=dk)
    with pytest.raises(ValueError, match="num_query_records"):
        plan_prompts(41, 5, 3, demo_keys=dk, query_keys=qk)
    with pytest.raises(ValueError, match="entries"):
        plan_prompts(41, 5, 3, num_query_records=30, demo_keys=dk[:-1], query_keys=qk)


def _auroc(scores, clean):
    pairs = (scores[clean][:, None] > scores[~clean][None, :]).double()
    return float((pairs + 0.5 * (scores[clean][:, None] == scores[~clean][None, :]).double()).mean())


def test_matched_queries_let_the_score_see_each_demonstrations_own_correctness():
    """With an ideal copier, a corrupted demonstration makes exactly the query of its key wrong. Matched queries
    always ask that key, so Data Whisperer's scores rank clean above corrupted better than the official cycle,
    whose queries ask a demonstration's key only sometimes."""
    tok = icl_task_tokenizer()
    torch.manual_seed(0)
    lm = build_causal_lm(TINY, tok).eval()
    pool = generate_lookup_task(150, task_seed=4, seed=1, num_keys=6, noise=0.3, corruption="systematic")
    val = generate_lookup_task(30, task_seed=4, seed=2, num_keys=6)
    clean = torch.tensor([not r["corrupted"] for r in pool])
    kw = dict(template=icl_task_template(), layer=1, progress=False, predict_fn=ideal_copier, prompt_batch_size=30)
    matched = data_whisperer_scores(lm, tok, pool, val, query_match="key", passes=3, **kw)
    cycle = data_whisperer_scores(lm, tok, pool, val, passes=3, **kw)
    assert matched.num_queries == 3 * 150  # one query per demonstration and pass
    assert _auroc(matched.scores, clean) > _auroc(cycle.scores, clean) + 0.05
    assert _auroc(matched.scores, clean) > 0.75
    with pytest.raises(ValueError, match="query_match.*query_records"):
        data_whisperer_scores(lm, tok, pool, None, query_match="key", **kw)
    with pytest.raises(ValueError, match="not a field"):
        data_whisperer_scores(lm, tok, pool, val, query_match="topic", **kw)


# ------------------------------------------------------------------------------------------------
# warnings
# ------------------------------------------------------------------------------------------------
def test_a_scorer_that_never_answers_right_warns_and_names_the_cause(monkeypatch):
    real = data_whisperer_scores

    def wrong(model, tok, recs, *a, **kw):
        kw["predict_fn"] = lambda texts, ns: ["".join(f"Q{k}: #### -1\n" for k in range(1, n + 1)) for n in ns]
        return real(model, tok, recs, *a, **kw)

    monkeypatch.setattr("lightning_eff.select.data_whisperer.data_whisperer_scores", wrong)
    dm = DataWhispererDataModule(scorer=DataWhispererScorer(attention_layer=1), ratio=0.2, scorer_model=TINY,
                                 num_train=20, num_val=3, num_test=2, progress=False, selection_seed=0)  # fmt: skip
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"none of the \d+ parsed in-context queries correctly \(accuracy 0\)"):
        dm.setup("fit")
    assert dm.selection_stats["icl_accuracy"] == 0.0 and dm.selection_stats["unparsed_share"] == 0.0
    assert dm.selection_stats["tied_at_cutoff"] == 20  # all tied: the top-k is a seeded random draw
    assert dm.selected_indices != list(range(4))


def test_missing_validation_split_warns_about_noisy_queries(monkeypatch):
    real = data_whisperer_scores

    def ok(model, tok, recs, *a, **kw):
        kw["predict_fn"] = lambda texts, ns: ["".join(f"#### {k}\n" for k in range(n)) for n in ns]
        return real(model, tok, recs, *a, **kw)

    monkeypatch.setattr("lightning_eff.select.data_whisperer.data_whisperer_scores", ok)
    dm = DataWhispererDataModule(scorer=DataWhispererScorer(attention_layer=1), ratio=0.2, scorer_model=TINY,
                                 num_train=10, num_val=0, num_test=2, progress=False)  # fmt: skip
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="no validation records"):
        dm.setup("fit")


# ------------------------------------------------------------------------------------------------
# the Scorer plug-ins through the real CLI
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "scorer, init_args",
    [
        ("lightning_eff.select.RandomScorer", {}),
        ("lightning_eff.select.EL2NScorer", {"warmup_steps": 1}),
        ("lightning_eff.select.GraNdScorer", {"warmup_steps": 1}),
        ("lightning_eff.select.DataWhispererScorer", {"max_new_tokens": 3, "attention_layer": 1, "passes": 2}),
    ],
)
def test_scorers_by_class_path_through_the_cli_hit_their_cache(tmp_path, monkeypatch, scorer, init_args):
    from lightning_eff.cli import LightningEffCLI

    monkeypatch.setattr(sys, "argv", ["lightning-eff"])
    config = ROOT / "configs" / "select" / "arithmetic.yaml"
    tiny = json.dumps({**TINY, "num_hidden_layers": 2})
    args = ["--config", str(config), f"--model.init_args.model={tiny}", f"--data.init_args.scorer={scorer}",
            "--data.init_args.num_train=16", "--data.init_args.num_val=3", "--data.init_args.num_test=2",
            "--data.init_args.ratio=0.25", f"--data.init_args.cache_dir={tmp_path / 'cache'}",
            f"--data.init_args.scorer_model={tiny}",
            "--data.init_args.progress=false", "--trainer.logger=false"]  # fmt: skip
    args += [f"--data.init_args.scorer.init_args.{k}={v}" for k, v in init_args.items()]
    picked = []
    for run in range(2):
        torch.manual_seed(0)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PL_GLOBAL_SEED", "0")
            cli = LightningEffCLI(args=args, run=False)
        dm = cli.datamodule
        assert type(dm.scorer).__name__ == scorer.rsplit(".", 1)[1]
        for k, v in init_args.items():
            assert getattr(dm.scorer, k) == v
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an untrained Data Whisperer scorer warns that it cannot answer
            dm.setup("fit")
        assert dm.cache_hit == (run == 1) and len(dm.selected_indices) == 4
        picked.append(dm.selected_indices)
    assert picked[0] == picked[1]
    files = list((tmp_path / "cache").glob(f"scores-{dm.method}-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["settings"]["scorer_class"].endswith(
        scorer.rsplit(".", 1)[1]
    )


def test_a_new_selection_seed_gives_a_new_random_and_warmup_selection_but_reuses_dw_scores(monkeypatch, tmp_path):
    def dm(scorer, seed):
        return DataWhispererDataModule(scorer=scorer, ratio=0.25, scorer_model=TINY, num_train=16, num_val=3,
                                       num_test=2, progress=False, selection_seed=seed, cache_dir=str(tmp_path))  # fmt: skip

    a, b = dm(RandomScorer(), 0), dm(RandomScorer(), 1)
    a.setup("fit")
    b.setup("fit")
    assert a.selected_indices != b.selected_indices and not b.cache_hit
    assert "selection_seed" in a.settings() and "selection_seed" not in dm(DataWhispererScorer(), 0).settings()


# ------------------------------------------------------------------------------------------------
# a meta-trained scorer learns in context and ranks clean demonstrations first
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not SCORER_DIR.is_dir(), reason="the committed benchmark scorer is missing")
def test_meta_trained_scorer_answers_in_context_and_ranks_clean_above_corrupted():
    """The committed CI-sized scorer (benchmarks/results/data_whisperer/scorer, meta-trained on the lookup family)
    on a task it never saw (task 123; the benchmark's is 0): in-context accuracy above 0.3 (chance 1/10), and
    Data Whisperer's scores put clean demonstrations above corrupted ones more often than not (AUROC > 0.6)."""
    torch.manual_seed(0)
    lm = build_causal_lm(str(SCORER_DIR)).eval()
    tok = load_tokenizer(str(SCORER_DIR))
    pool = generate_lookup_task(120, task_seed=123, seed=1, num_keys=6, noise=0.3, corruption="systematic")
    val = generate_lookup_task(24, task_seed=123, seed=2, num_keys=6)
    res = data_whisperer_scores(lm, tok, pool, val, template=icl_task_template(), prompt_batch_size=24, passes=2,
                                query_match="key", n_queries=5, progress=False)  # fmt: skip
    accuracy = res.query_score_sum / res.num_queries
    # measured with the committed scorer (matched queries, 5 per prompt, as in the benchmark): accuracy 0.388 over
    # 240 queries, no unparsed prompt (chance 0.1; 0.3 is about 3 binomial sd below the measurement)
    assert res.num_skipped / res.num_prompts < 0.1 and accuracy > 0.3
    scores, clean = res.scores, torch.tensor([not r["corrupted"] for r in pool])
    pairs = (scores[clean][:, None] > scores[~clean][None, :]).double() + 0.5 * (
        scores[clean][:, None] == scores[~clean][None, :]
    ).double()
    assert float(pairs.mean()) > 0.6  # AUROC of clean vs corrupted; measured 0.688 (0.5: no signal)


@pytest.mark.slow
def test_meta_training_from_scratch_teaches_in_context_lookup(tmp_path):
    """The meta-training recipe learns: a small Llama trained on 300 x 32 episodes of fresh tasks answers queries of
    an unseen task from the demonstrations better than chance (1/10), through the Lightning modules."""
    import lightning as L

    from lightning_eff.llm import CausalLMModule, InstructionDataModule

    tok_dir = tmp_path / "tok"
    icl_task_tokenizer().save_pretrained(tok_dir)
    docs = icl_meta_training_records(300 * 32, seed=0, num_keys=6)
    corpus = tmp_path / "meta.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    L.seed_everything(0, verbose=False)
    dm = InstructionDataModule(data_path=str(corpus), num_train=None, num_val=0, num_test=0,
                               prompt_template="{question}", tokenizer=str(tok_dir), max_length=256, batch_size=32)  # fmt: skip
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
           "num_attention_heads": 4, "max_position_embeddings": 256, "tie_word_embeddings": True}  # fmt: skip
    module = CausalLMModule(cfg, tokenizer=str(tok_dir), generate_eval=False,
                            optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0))  # fmt: skip
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, gradient_clip_val=1.0, limit_val_batches=0).fit(module, datamodule=dm)  # fmt: skip
    pool = generate_lookup_task(60, task_seed=77, seed=1, num_keys=6)
    val = generate_lookup_task(30, task_seed=77, seed=2, num_keys=6)
    res = data_whisperer_scores(module.model.eval(), module.tokenizer, pool, val, template=icl_task_template(),
                                prompt_batch_size=12, progress=False)  # fmt: skip
    assert res.num_skipped / res.num_prompts < 0.2
    assert res.query_score_sum / res.num_queries > 0.2  # chance: 0.1
