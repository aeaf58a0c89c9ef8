"""Ideal in-context copier on the validation tasks (the ceiling of the query assignment): run from the repository
root after the benchmark, `python benchmarks/results/data_whisperer/ideal_copier.py`; writes
benchmarks/results/data_whisperer_validation_ideal_copier.json."""

import json

import torch

from lightning_eff.llm import build_causal_lm, load_tokenizer
from lightning_eff.llm.icl_tasks import generate_lookup_task, icl_task_template, ideal_copier
from lightning_eff.select import data_whisperer_scores
from lightning_eff.select.data_whisperer import WhispererResult


def auroc(s, clean):
    p = (s[clean][:, None] > s[~clean][None, :]).double() + 0.5 * (
        s[clean][:, None] == s[~clean][None, :]
    ).double()
    return float(p.mean())


d = "benchmarks/results/data_whisperer/scorer"
lm = build_causal_lm(d).eval()
tok = load_tokenizer(d)
rows = []
for ts in (1, 2, 3, 4):
    pool = generate_lookup_task(300, task_seed=ts, seed=11, num_keys=6, noise=0.3, corruption="systematic")
    val = generate_lookup_task(60, task_seed=ts, seed=12, num_keys=6)
    clean = torch.tensor([not r["corrupted"] for r in pool])
    for m, nq in ((None, 3), ("key", 5)):
        r = data_whisperer_scores(
            lm,
            tok,
            pool,
            val,
            template=icl_task_template(),
            query_match=m,
            n_queries=nq,
            passes=10,
            predict_fn=ideal_copier,
            prompt_batch_size=64,
            progress=False,
        )
        a = {
            p: auroc(WhispererResult(r.score_sum[:p], r.count[:p], 1, 0).scores, clean) for p in (1, 3, 5, 10)
        }
        rows.append(
            {
                "task_seed": ts,
                "assignment": "matched, 5 per prompt" if m else "cycle",
                "auroc_by_passes": a,
                "accuracy": r.query_score_sum / r.num_queries,
            }
        )
        print(rows[-1], flush=True)
json.dump(
    {
        "what": "ideal in-context copier (answers each query with the value its prompt's demonstrations give its key) with the meta-trained scorer's attention weights; validation tasks",
        "rows": rows,
    },
    open("benchmarks/results/data_whisperer_validation_ideal_copier.json", "w"),
    indent=1,
)
