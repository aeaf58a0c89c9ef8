"""Data Whisperer vs random / EL2N / GraNd / the full pool on a held-out in-context lookup task (CPU scale).

Protocol (printed at start; see ``lightning_eff.llm.icl_tasks`` for the task family):

1. Scorer. A small Llama (random init) is meta-trained on ``--meta-steps`` x ``--meta-batch`` episodes of fresh
   lookup tasks written as Data Whisperer prompts (5 demonstrations, 3 queries, answers
   ``Q<k>: Code of K? K7 #### 7``),
   so that it answers *in context*: it can answer a query only by finding its key among the demonstrations.
   It stands in for the instruction-tuned LLM of the paper and is also the model every selector's subset
   fine-tunes. Saved with its tokenizer to ``benchmarks/results/data_whisperer/scorer/``.
2. Held-out task (``--task-seed``, never seen in meta-training). Pool: ``--pool`` records, ``--noise`` of them
   corrupted (``--corruption``: ``systematic`` = the task's fixed wrong digit per key); validation: ``--val``
   clean records, the Data Whisperer queries (``queries.jsonl``); test: ``--test`` clean records.
3. In-context accuracy of the scorer on clean queries, with clean demonstrations and with the pool's, and the
   share of prompts with no parsed answer, reported separately.
4. Selection at ``--ratio`` through ``DataWhispererDataModule`` with each scorer (class_path plug-ins); a new
   selection per fine-tuning seed (``selection_seed``: random draw, EL2N/GraNd warm-up order, tie-breaking;
   Data Whisperer's scores are read from the cache after the first seed and re-ranked with the seed).
   AUROC of each selector's score for telling clean (positive) from corrupted pool examples.
5. Fine-tuning from the scorer's weights, ``--epochs`` epochs of AdamW (same recipe for every subset and for
   the full pool), ``--seeds`` seeds, interleaved by seed; exact match on the test set.
6. STR = selection time / median time of fine-tuning on the full pool with the same recipe, measured in this run.

Settings were fixed before looking at test numbers; ``--choose-epochs`` picks the fine-tuning epochs from
``--epoch-grid`` by validation exact match of random-subset fine-tuning (validation only).

    python -m benchmarks.data_whisperer --quick      # smoke run (a few minutes on 2 cores)
    python -m benchmarks.data_whisperer              # the committed CPU run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

SIZES = {
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    "small": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run with tiny sizes")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--meta-steps", type=int, default=1200, help="meta-training steps (one fresh task per episode)")
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--meta-lr", type=float, default=3e-3)
    p.add_argument("--num-keys", type=int, default=6, help="keys per task")
    p.add_argument("--task-seed", type=int, default=0, help="the held-out task")
    p.add_argument("--pool", type=int, default=300)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--corruption", default="systematic", choices=["random", "systematic"])
    p.add_argument("--val", type=int, default=60, help="clean validation records (the Data Whisperer queries)")
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs (same for every subset and the pool)")
    p.add_argument("--no-choose-epochs", dest="choose_epochs", action="store_false",
                   help="use --epochs instead of picking it from --epoch-grid on validation")
    p.add_argument("--epoch-grid", default="5,10,20")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=20, help="fine-tuning steps before EL2N / GraNd")
    p.add_argument("--n-demos", type=int, default=5)
    p.add_argument("--n-queries", type=int, default=3)
    p.add_argument("--passes", type=int, default=10,
                   help="prompt assignments averaged by the data_whisperer selector (data_whisperer_cycle: 1)")
    p.add_argument("--prompt-batch-size", type=int, default=64)
    p.add_argument("--meta-queries", type=int, default=None,
                   help="queries per meta-training episode (default: --n-demos with --query-match, else --n-queries)")
    p.add_argument("--matched-n-queries", type=int, default=5,
                   help="queries per prompt with matched queries (the official cycle uses --n-queries)")
    p.add_argument("--val-matched-n-queries", default="1,5", help="--matched-n-queries compared by --validate")
    p.add_argument("--query-match", default="key", help="record field of matched queries ('' = official cycle)")
    p.add_argument("--validate", action="store_true",
                   help="only the validation sweep of the Data Whisperer settings (validation tasks, no test data)")
    p.add_argument("--val-tasks", default="1,2", help="task seeds of the validation sweep (the test task is --task-seed)")
    p.add_argument("--val-passes", default="1,3,5", help="passes compared by --validate")
    p.add_argument("--val-layers", default="", help="attention layers compared by --validate (default: the default)")
    p.add_argument("--diagnose", action="store_true",
                   help="after a run: per-key composition of each subset and per-key Data Whisperer scores / AUROC, "
                        "from --out and the run's score cache in --workdir; writes --diagnosis-out")
    p.add_argument("--diagnosis-out", default="benchmarks/results/data_whisperer_diagnosis.json")
    p.add_argument("--scorer-dir", default="", help="use this meta-trained scorer instead of <artefacts>/scorer")
    p.add_argument("--val-out", default="benchmarks/results/data_whisperer_validation.json")
    p.add_argument("--methods", default="data_whisperer,data_whisperer_1pass,data_whisperer_cycle,random,el2n,grand,full",
                   help="data_whisperer: --query-match assignment with --passes; data_whisperer_1pass: the same with 1 "
                        "pass; data_whisperer_cycle: the official query cycle, 1 pass")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (1 avoids oversubscription)")
    p.add_argument("--workdir", default="outputs/benchmarks/data_whisperer")
    p.add_argument("--artefacts", default="benchmarks/results/data_whisperer", help="scorer/, pool.jsonl, queries.jsonl")
    p.add_argument("--out", default="benchmarks/results/data_whisperer.json")
    args = p.parse_args(argv)
    if args.meta_queries is None:
        args.meta_queries = args.n_demos if args.query_match else args.n_queries
    if args.quick:
        args.size, args.meta_steps, args.pool, args.val, args.test = "tiny", 60, 80, 12, 40
        args.seeds, args.epochs, args.warmup_steps, args.epoch_grid = 2, 2, 2, "1,2"
        args.artefacts = os.path.join(args.workdir, "quick_artefacts")
        if args.out == "benchmarks/results/data_whisperer.json":
            args.out = os.path.join(args.workdir, "quick.json")
    return args


def trainer_kwargs(args):
    return {"accelerator": "gpu" if args.device == "cuda" else "cpu", "devices": 1, "logger": False,
            "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
            "gradient_clip_val": 1.0, "limit_val_batches": 0, "num_sanity_val_steps": 0}  # fmt: skip


def write_jsonl(path, records, keys=("question", "answer", "corrupted", "key")):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({k: r[k] for k in keys if k in r}) + "\n")


def auroc(scores, positive):
    """Area under the ROC curve of ``scores`` for ``positive`` (Mann-Whitney U with ties counted 1/2)."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return float("nan")
    import torch

    allv = torch.tensor(pos + neg, dtype=torch.float64)
    order = torch.argsort(allv, stable=True)
    ranks = torch.empty_like(allv)
    ranks[order] = torch.arange(1, len(allv) + 1, dtype=torch.float64)
    sv = allv[order]
    i = 0
    while i < len(sv):  # average ranks of ties
        j = i
        while j + 1 < len(sv) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i : j + 1]] = ranks[order[i : j + 1]].mean()
        i = j + 1
    u = float(ranks[: len(pos)].sum()) - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def validate(args, scorer_dir):
    """Validation sweep: AUROC / ICL accuracy / matched share of Data Whisperer settings on validation tasks.

    Validation tasks are other ``task_seed``s of the family (held out from meta-training, never the test task);
    each gets a corrupted pool and clean queries of its own. Nothing of the test task is read.
    """
    from lightning_eff.llm import build_causal_lm, load_tokenizer
    from lightning_eff.llm.icl_tasks import generate_lookup_task, icl_task_template
    from lightning_eff.select import data_whisperer_scores
    from lightning_eff.select.data_whisperer import WhispererResult, matched_share, plan_prompts

    template = icl_task_template()
    lm = build_causal_lm(str(scorer_dir)).eval()
    tok = load_tokenizer(str(scorer_dir))
    n_layers = lm.config.num_hidden_layers
    layers = [int(v) for v in args.val_layers.split(",") if v.strip()] or [None]
    max_passes = max(int(v) for v in args.val_passes.split(","))
    rows = []
    for task_seed in (int(v) for v in args.val_tasks.split(",")):
        if task_seed == args.task_seed:
            raise SystemExit(f"--val-tasks must not contain the test task {args.task_seed}")
        kw = {"task_seed": task_seed, "num_keys": args.num_keys}
        pool = generate_lookup_task(args.pool, seed=11, noise=args.noise, corruption=args.corruption, **kw)
        clean = generate_lookup_task(args.pool, seed=11, **kw)
        queries = generate_lookup_task(args.val, seed=12, **kw)
        positive = [not r["corrupted"] for r in pool]
        dk, qk = [r["key"] for r in pool], [r["key"] for r in queries]
        variants = [(None, args.n_queries)] + [("key", int(v)) for v in args.val_matched_n_queries.split(",")]
        for match, nq in variants:
            plans = plan_prompts(len(pool), args.n_demos, nq, 42, len(queries), 1,
                                 **({"demo_keys": dk, "query_keys": qk} if match else {}))  # fmt: skip
            share = matched_share(plans, dk, qk)
            common = dict(n_demos=args.n_demos, n_queries=nq, template=template, query_match=match,
                          prompt_batch_size=args.prompt_batch_size, progress=False)  # fmt: skip
            clean_res = data_whisperer_scores(lm, tok, clean, queries, **common)
            clean_acc = clean_res.query_score_sum / max(clean_res.num_queries, 1)
            for layer in layers:
                t0 = time.perf_counter()
                res = data_whisperer_scores(lm, tok, pool, queries, passes=max_passes, layer=layer, **common)
                seconds = time.perf_counter() - t0
                for p in (int(v) for v in args.val_passes.split(",")):
                    sub = WhispererResult(res.score_sum[:p], res.count[:p], res.num_prompts, res.num_skipped)
                    row = {"task_seed": task_seed, "assignment": f"matched, {nq} per prompt" if match else "cycle",
                           "n_queries": nq, "passes": p,
                           "layer": layer if layer is not None else n_layers // 2, "auroc": auroc(sub.scores.tolist(), positive),
                           "icl_accuracy_clean": clean_acc,
                           "icl_accuracy_pool": res.query_score_sum / max(res.num_queries, 1),
                           "unparsed_share": res.num_skipped / max(res.num_prompts, 1), "matched_share": share,
                           "pass_agreement": sub.pass_agreement() if p > 1 else None,
                           "seconds_per_pass": seconds / max_passes}  # fmt: skip
                    rows.append(row)
                    print(f"task {task_seed} {row['assignment']:>7} layer {row['layer']} passes {p}: AUROC "
                          f"{row['auroc']:.3f}, ICL acc clean {clean_acc:.3f} / pool {row['icl_accuracy_pool']:.3f}, "
                          f"matched share {share:.3f}, {row['seconds_per_pass']:.1f} s/pass", flush=True)  # fmt: skip
    return rows


def diagnose(args):
    """Per key of the test task: how many clean / corrupted examples each subset holds, and, for every cached Data
    Whisperer score vector of the run, the mean score of clean and corrupted examples and the AUROC within the key."""
    import glob

    run = json.loads(Path(args.out).read_text())
    pool = [json.loads(line) for line in open(Path(args.artefacts) / "pool.jsonl", encoding="utf-8")]
    keys = sorted({r["key"] for r in pool})
    out = {"pool": {k: {"clean": sum(r["key"] == k and not r["corrupted"] for r in pool),
                        "corrupted": sum(r["key"] == k and r["corrupted"] for r in pool)} for k in keys},
           "subsets": {}, "scores": []}  # fmt: skip
    for m, by_seed in run["selections"].items():
        out["subsets"][m] = {seed: {k: {"clean": sum(pool[i]["key"] == k and not pool[i]["corrupted"] for i in idx),
                                        "corrupted": sum(pool[i]["key"] == k and pool[i]["corrupted"] for i in idx)}
                                    for k in keys} for seed, idx in by_seed.items()}  # fmt: skip
    for path in sorted(glob.glob(str(Path(args.workdir) / "cache" / "scores-data_whisperer-*.json"))):
        data = json.loads(Path(path).read_text())
        scores, settings = data["scores"], data.get("settings", {})
        row = {"file": Path(path).name, "settings": settings, "stats": data.get("stats", {}),
               "auroc": auroc(scores, [not r["corrupted"] for r in pool]), "per_key": {}}  # fmt: skip
        for k in keys:
            idx = [i for i, r in enumerate(pool) if r["key"] == k]
            clean = [scores[i] for i in idx if not pool[i]["corrupted"]]
            bad = [scores[i] for i in idx if pool[i]["corrupted"]]
            row["per_key"][k] = {"mean_clean": statistics.mean(clean), "mean_corrupted": statistics.mean(bad),
                                 "auroc": auroc([scores[i] for i in idx], [not pool[i]["corrupted"] for i in idx])}  # fmt: skip
        row["mean_within_key_auroc"] = statistics.mean(v["auroc"] for v in row["per_key"].values())
        out["scores"].append(row)
        print(f"{row['file']}: AUROC {row['auroc']:.3f}, mean within-key AUROC {row['mean_within_key_auroc']:.3f}; "
              + ", ".join(f"{k} {v['mean_clean']:.3f}/{v['mean_corrupted']:.3f}" for k, v in row["per_key"].items())
              + " (mean score clean/corrupted)")  # fmt: skip
    for m, by_seed in out["subsets"].items():
        first = next(iter(by_seed.values()))
        print(f"{m} (seed 0): " + ", ".join(f"{k} {v['clean']}+{v['corrupted']}" for k, v in first.items())
              + " (clean+corrupted per key)")  # fmt: skip
    Path(args.diagnosis_out).write_text(json.dumps(out, indent=1))
    print(f"diagnosis: {args.diagnosis_out}")


def meta_train(args, tok_dir, scorer_dir, model_cfg):
    import lightning as L
    import torch

    from lightning_eff.llm import CausalLMModule, InstructionDataModule
    from lightning_eff.llm.icl_tasks import icl_meta_training_records

    workdir = Path(args.workdir)
    corpus = workdir / "meta_corpus.jsonl"
    docs = icl_meta_training_records(args.meta_steps * args.meta_batch, seed=0, num_keys=args.num_keys,
                                     n_demos=args.n_demos, n_queries=args.meta_queries)  # fmt: skip
    write_jsonl(corpus, docs, keys=("question", "answer"))
    L.seed_everything(0, verbose=False)
    dm = InstructionDataModule(data_path=str(corpus), num_train=None, num_val=0, num_test=0, prompt_template="{question}",
                               tokenizer=str(tok_dir), max_length=256, batch_size=args.meta_batch)  # fmt: skip
    class MetaModule(CausalLMModule):
        """One-cycle learning rate stepped every optimizer step (10 % warm-up, cosine decay)."""

        def configure_optimizers(self):
            params = [p for p in self.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=args.meta_lr, weight_decay=0.0)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.meta_lr, total_steps=args.meta_steps,
                                                        pct_start=0.1)  # fmt: skip
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class Progress(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.t0, self.losses = time.perf_counter(), []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))
            if (batch_idx + 1) % 100 == 0:
                print(f"  meta-training step {batch_idx + 1}: loss {statistics.mean(self.losses[-100:]):.3f} "
                      f"({time.perf_counter() - self.t0:.0f} s)", flush=True)  # fmt: skip

    module = MetaModule(model_cfg, tokenizer=str(tok_dir), generate_eval=False)
    t0 = time.perf_counter()
    L.Trainer(max_epochs=1, callbacks=[Progress()], **trainer_kwargs(args)).fit(module, datamodule=dm)
    seconds = time.perf_counter() - t0
    module.save_pretrained(scorer_dir)
    return seconds


def main(argv=None):  # noqa: C901 - a linear script
    args = parse_args(argv)
    if args.diagnose:
        return diagnose(args)
    import logging
    import warnings

    import lightning as L
    import torch
    import transformers

    from lightning_eff.llm import CausalLMModule, InstructionDataModule, build_causal_lm, load_tokenizer
    from lightning_eff.llm.icl_tasks import generate_lookup_task, icl_task_template, icl_task_tokenizer
    from lightning_eff.select import (
        DataWhispererDataModule,
        DataWhispererScorer,
        EL2NScorer,
        GraNdScorer,
        RandomScorer,
        data_whisperer_scores,
    )

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    workdir, art = Path(args.workdir), Path(args.artefacts)
    workdir.mkdir(parents=True, exist_ok=True)
    art.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    template = icl_task_template()
    model_cfg = {"model_type": "llama", **SIZES[args.size], "max_position_embeddings": 256, "tie_word_embeddings": True}
    print("# Data Whisperer selection benchmark: held-out in-context lookup task")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, device={args.device}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, threads={torch.get_num_threads()}")  # fmt: skip
    print(f"scorer: Llama {SIZES[args.size]}, meta-trained {args.meta_steps} steps x {args.meta_batch} episodes, "
          f"lr {args.meta_lr}")  # fmt: skip
    print(f"task {args.task_seed}: {args.num_keys} keys; pool {args.pool} ({args.noise:.0%} corrupted, "
          f"{args.corruption}); {args.val} clean queries; test {args.test}; ratio {args.ratio}")  # fmt: skip
    print(f"fine-tuning: {args.epochs} epochs, AdamW lr {args.lr}, batch {args.batch_size}, {args.seeds} seeds; "
          f"EL2N/GraNd warm-up {args.warmup_steps} steps; DW n_d={args.n_demos}, n_q={args.n_queries}, "
          f"data_whisperer: queries matched on {args.query_match or '-'!r}, {args.matched_n_queries} per prompt, "
          f"{args.passes} pass(es); "
          f"data_whisperer_cycle: the official query cycle, 1 pass")  # fmt: skip
    print(f"methods: {methods}", flush=True)

    # ------------------------------------------------------------------ 1. scorer
    scorer_dir, tok_dir = art / "scorer", workdir / "tokenizer"
    tok = icl_task_tokenizer()
    tok.save_pretrained(tok_dir)
    settings = {k: getattr(args, k) for k in ("size", "meta_steps", "meta_batch", "meta_lr", "num_keys", "n_demos")}
    settings["n_queries"] = args.meta_queries
    settings["answer_format"] = "restated question, K7 #### 7"  # icl_meta_training_records(restate_question=True)
    marker = scorer_dir / "meta_training.json"
    if marker.is_file() and json.loads(marker.read_text())["settings"] == settings:
        meta_seconds = json.loads(marker.read_text())["seconds"]
        print(f"\nreusing the meta-trained scorer in {scorer_dir} (trained in {meta_seconds:.0f} s)")
    else:
        meta_seconds = meta_train(args, tok_dir, scorer_dir, model_cfg)
        marker.write_text(json.dumps({"settings": settings, "seconds": meta_seconds}, indent=1))
        print(f"\nscorer meta-trained in {meta_seconds:.0f} s -> {scorer_dir}")
    size_mb = sum(f.stat().st_size for f in scorer_dir.iterdir()) / 2**20
    print(f"scorer directory: {size_mb:.2f} MB")
    if args.validate:
        rows = validate(args, Path(args.scorer_dir) if args.scorer_dir else scorer_dir)
        table = {}
        for r in rows:
            table.setdefault((r["assignment"], r["layer"], r["passes"]), []).append(r)
        print("\n| assignment | layer | passes | AUROC (mean over validation tasks) | ICL acc clean | matched share |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for (a, layer, p), rs in table.items():
            print(f"| {a} | {layer} | {p} | {statistics.mean(r['auroc'] for r in rs):.3f} | "
                  f"{statistics.mean(r['icl_accuracy_clean'] for r in rs):.3f} | "
                  f"{statistics.mean(r['matched_share'] for r in rs):.3f} |")  # fmt: skip
        Path(args.val_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.val_out).write_text(json.dumps({"args": vars(args), "scorer_settings": settings, "rows": rows},
                                                 indent=1))  # fmt: skip
        print(f"raw numbers: {args.val_out}")
        return

    # ------------------------------------------------------------------ 2. data
    kw = {"task_seed": args.task_seed, "num_keys": args.num_keys}
    pool = generate_lookup_task(args.pool, seed=1, noise=args.noise, corruption=args.corruption, **kw)
    clean_pool = generate_lookup_task(args.pool, seed=1, **kw)
    val = generate_lookup_task(args.val, seed=2, **kw)
    test = generate_lookup_task(args.test, seed=3, **kw)
    write_jsonl(art / "pool.jsonl", pool)
    write_jsonl(art / "queries.jsonl", val)
    write_jsonl(workdir / "test.jsonl", test)
    corrupted = [bool(r["corrupted"]) for r in pool]

    # ------------------------------------------------------------------ 3. in-context accuracy
    scorer_lm = build_causal_lm(str(scorer_dir)).eval()
    scorer_tok = load_tokenizer(str(scorer_dir))
    from lightning_eff.select.data_whisperer import matched_share, plan_prompts

    icl = {}
    dk, qk = [r["key"] for r in pool], [r["key"] for r in val]
    for assignment, match in (("matched", args.query_match or None), ("cycle", None)):
        if assignment == "matched" and match is None:
            continue
        nq = args.matched_n_queries if match else args.n_queries
        plans = plan_prompts(len(pool), args.n_demos, nq, 42, len(val), 1,
                             **({"demo_keys": dk, "query_keys": qk} if match else {}))  # fmt: skip
        for name, demos in (("clean demonstrations", clean_pool), ("pool demonstrations", pool)):
            t0 = time.perf_counter()
            res = data_whisperer_scores(scorer_lm, scorer_tok, demos, val, n_demos=args.n_demos,
                                        n_queries=nq, template=template, query_match=match,
                                        prompt_batch_size=args.prompt_batch_size, progress=False)  # fmt: skip
            key = f"{assignment} queries, {name}"
            icl[key] = {"accuracy": res.query_score_sum / max(res.num_queries, 1),
                        "unparsed_share": res.num_skipped / max(res.num_prompts, 1), "prompts": res.num_prompts,
                        "matched_share": matched_share(plans, dk, qk), "seconds": time.perf_counter() - t0}  # fmt: skip
            print(f"in-context accuracy on clean queries, {key}: {icl[key]['accuracy']:.3f} (prompts with no parsed "
                  f"answer: {icl[key]['unparsed_share']:.3f} of {res.num_prompts}; share of demonstrations whose key "
                  f"a query of the prompt asks: {icl[key]['matched_share']:.3f})", flush=True)  # fmt: skip
    chance = 1 / 10

    # ------------------------------------------------------------------ 4. selections
    def scorer_for(m):
        if m.startswith("data_whisperer"):
            official = m == "data_whisperer_cycle"
            return DataWhispererScorer(n_demos=args.n_demos,
                                       n_queries=args.n_queries if official else args.matched_n_queries,
                                       passes=1 if official or m == "data_whisperer_1pass" else args.passes,
                                       query_match=None if official else (args.query_match or None),
                                       prompt_batch_size=args.prompt_batch_size, icl_template=template.__dict__)  # fmt: skip
        if m == "random":
            return RandomScorer()
        cls = EL2NScorer if m == "el2n" else GraNdScorer
        return cls(warmup_steps=args.warmup_steps, warmup_lr=args.lr)

    data_kw = dict(data_path=str(art / "pool.jsonl"), val_path=str(art / "queries.jsonl"),
                   test_path=str(workdir / "test.jsonl"), num_train=None, tokenizer=str(scorer_dir),
                   batch_size=args.batch_size, eval_batch_size=100, max_length=64)  # fmt: skip
    selectors = [m for m in methods if m != "full"]
    selections = {m: {} for m in selectors}
    sel_seconds = {m: [] for m in selectors}
    sel_stats, sel_auroc, sel_noisy = {}, {m: [] for m in selectors}, {m: [] for m in selectors}
    # Resumable: every selection and every fine-tuning run is written to progress.json as it finishes; a rerun with
    # the same settings (and scorer) reads them back instead of repeating them.
    from lightning_eff.utils.io import atomic_write_text

    signature = {k: v for k, v in vars(args).items() if k not in ("epochs", "out", "val_out")}
    signature["scorer"] = settings
    progress_path = workdir / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {}
    if progress.get("signature") != json.loads(json.dumps(signature)):
        progress = {"signature": signature, "selection": {}, "val_em": {}, "finetune": {}}
    else:
        print(f"resuming from {progress_path}")

    def save_progress():
        atomic_write_text(progress_path, json.dumps(progress))

    cache = workdir / "cache"
    if cache.exists() and not progress["selection"]:
        import shutil

        shutil.rmtree(cache)  # time every selector's first scoring in this run
    for seed in range(args.seeds):
        for m in selectors:
            done = progress["selection"].get(f"{m}|{seed}")
            if done is None:
                dm = DataWhispererDataModule(scorer=scorer_for(m), ratio=args.ratio, scorer_model=str(scorer_dir),
                                             selection_seed=seed, cache_dir=str(cache), progress=False,
                                             device="cuda" if args.device == "cuda" else "cpu", **data_kw)  # fmt: skip
                dm.setup("fit")
                idx = list(dm.selected_indices)
                done = {"idx": idx, "cache_hit": bool(dm.cache_hit), "stats": dict(dm.selection_stats),
                        "auroc": auroc(dm.scores.tolist(), [not c for c in corrupted]),
                        "noisy": sum(corrupted[i] for i in idx) / len(idx)}  # fmt: skip
                progress["selection"][f"{m}|{seed}"] = done
                save_progress()
            idx = done["idx"]
            selections[m][seed] = idx
            if not done["cache_hit"]:
                sel_seconds[m].append(done["stats"]["scoring_seconds"])
            sel_stats[m] = done["stats"]
            sel_auroc[m].append(done["auroc"])
            sel_noisy[m].append(done["noisy"])
            print(f"seed {seed} select {m:>15}: {len(idx)} examples, corrupted {sel_noisy[m][-1]:.2f}, "
                  f"AUROC {sel_auroc[m][-1]:.3f}, scoring {done['stats']['scoring_seconds']:.1f} s"
                  f"{' (cache)' if done['cache_hit'] else ''}", flush=True)  # fmt: skip
    if "data_whisperer" in sel_stats:
        st = sel_stats["data_whisperer"]
        print(f"Data Whisperer on the pool: ICL accuracy {st.get('icl_accuracy', float('nan')):.3f}, unparsed share "
              f"{st.get('unparsed_share', float('nan')):.3f}, tied at the cut-off {int(st.get('tied_at_cutoff', 0))}")

    # ------------------------------------------------------------------ 5. fine-tuning (interleaved)
    class Fixed(InstructionDataModule):
        def __init__(self, indices, **kw):
            super().__init__(**kw)
            self.indices = indices

        def train_indices(self):
            return self.indices

    def finetune(idx, seed, epochs, split="test"):
        key = f"{split}|{seed}|{epochs}|{','.join(map(str, idx))}"
        if key in progress["finetune"]:
            return tuple(progress["finetune"][key])
        out = _finetune(idx, seed, epochs, split)
        progress["finetune"][key] = list(out)
        save_progress()
        return out

    def _finetune(idx, seed, epochs, split):
        dm = Fixed(idx, **data_kw)
        L.seed_everything(1000 + seed, verbose=False)
        module = CausalLMModule(str(scorer_dir), max_new_tokens=6,
                                optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.0))  # fmt: skip
        t0 = time.perf_counter()
        L.Trainer(max_epochs=epochs, **trainer_kwargs(args)).fit(module, datamodule=dm)
        fit_s = time.perf_counter() - t0
        trainer = L.Trainer(**trainer_kwargs(args))
        if split == "val":
            dm.setup("fit")
            loader = torch.utils.data.DataLoader(dm.val_dataloader().dataset, batch_size=100,
                                                 collate_fn=dm.collator)  # fmt: skip
            out = trainer.test(module, dataloaders=loader, verbose=False)
        else:
            out = trainer.test(module, datamodule=dm, verbose=False)
        return float(out[0]["test/exact_match"]), fit_s

    chosen = None
    if args.choose_epochs:
        grid = [int(e) for e in args.epoch_grid.split(",")]
        val_em = {}
        for e in grid:
            val_em[e] = statistics.mean(finetune(selections["random"][s], s, e, "val")[0] for s in range(2))
            print(f"validation: random subset, {e} epochs -> EM {val_em[e]:.3f}", flush=True)
        args.epochs = chosen = max(grid, key=lambda e: (val_em[e], -e))
        print(f"chosen on validation: {args.epochs} epochs")

    results = {m: [] for m in methods}
    for seed in range(args.seeds):
        for m in methods:
            idx = list(range(len(pool))) if m == "full" else selections[m][seed]
            em, fit_s = finetune(idx, seed, args.epochs)
            noisy = sum(corrupted[i] for i in idx) / len(idx)
            results[m].append({"seed": seed, "exact_match": em, "fit_seconds": fit_s, "corrupted_fraction": noisy,
                               "examples": len(idx)})  # fmt: skip
            print(f"seed {seed} {m:>15}: {len(idx):4d} examples, fit {fit_s:6.1f} s, test EM {em:.3f}, "
                  f"corrupted {noisy:.2f}", flush=True)  # fmt: skip

    # ------------------------------------------------------------------ 6. table
    full_t = statistics.median(r["fit_seconds"] for r in results["full"]) if "full" in results else float("nan")
    rand = [r["exact_match"] for r in results.get("random", [])]
    rand_mean = statistics.mean(rand) if rand else float("nan")
    rand_std = statistics.stdev(rand) if len(rand) > 1 else 0.0
    print("\n| method | examples | test EM (mean +- std) | vs random | corrupted in subset | AUROC clean vs corrupted "
          "| selection s | STR |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    summary = {}
    for m in methods:
        ems = [r["exact_match"] for r in results[m]]
        mean, std = statistics.mean(ems), (statistics.stdev(ems) if len(ems) > 1 else 0.0)
        sel = statistics.median(sel_seconds[m]) if sel_seconds.get(m) else 0.0
        str_ = sel / full_t if m != "full" else float("nan")
        au = statistics.mean(sel_auroc[m]) if m in sel_auroc else float("nan")
        summary[m] = {"exact_match": ems, "mean": mean, "std": std, "selection_seconds": sel_seconds.get(m, []),
                      "selection_seconds_median": sel, "str": str_, "auroc": sel_auroc.get(m), "auroc_mean": au,
                      "corrupted_fraction": statistics.mean(r["corrupted_fraction"] for r in results[m]),
                      "runs": results[m], "stats": sel_stats.get(m)}  # fmt: skip
        vs = "" if m == "random" else f"{mean - rand_mean:+.3f}"
        print(f"| {m} | {results[m][0]['examples']} | {mean:.3f} +- {std:.3f} | {vs} | "
              f"{summary[m]['corrupted_fraction']:.2f} | {'-' if m == 'full' else f'{au:.3f}'} | "
              f"{'-' if m == 'full' else f'{sel:.1f}'} | {'-' if m == 'full' else f'{str_:.3f}'} |")  # fmt: skip
    print(f"\nfull-pool fine-tuning ({args.epochs} epochs): median {full_t:.1f} s; STR = selection s / that.")
    if "data_whisperer" in summary and rand:
        dw = summary["data_whisperer"]
        icl_key = next(k for k in icl if k.endswith("clean demonstrations"))  # matched first when there is one
        print(f"targets: DW - random = {dw['mean'] - rand_mean:+.3f} vs spread (max std) "
              f"{max(dw['std'], rand_std):.3f}; DW AUROC {dw['auroc_mean']:.3f} (>= 0.8); DW STR {dw['str']:.3f} (< 0.2); "
              f"ICL accuracy ({icl_key}) {icl[icl_key]['accuracy']:.3f} (>= 0.3, chance {chance:.2f})")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump({"args": vars(args), "chosen_epochs": chosen, "meta_training_seconds": meta_seconds,
                   "scorer_mb": size_mb, "icl": icl, "chance": chance, "full_finetune_seconds": full_t,
                   "summary": summary, "selections": selections,
                   "selection_auroc": sel_auroc}, f, indent=1)  # fmt: skip
    print(f"raw numbers: {out}")


if __name__ == "__main__":
    main()
