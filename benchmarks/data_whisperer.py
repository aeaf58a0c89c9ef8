"""Data Whisperer vs random / EL2N / GraNd / full-set fine-tuning on generated GSM8K-style arithmetic.

Protocol (printed at start):

1. Base model. A small Llama (random init from a config) is trained on a clean arithmetic corpus
   (question -> worked answer, plus Data Whisperer-format few-shot prompts with their answers), so that
   its in-context answers are better than chance. This stands in for the instruction-tuned LLM of the
   paper. Its test exact match and in-context accuracy are reported.
2. Selection pool. ``--pool`` new problems whose answers carry ``--noise`` label noise (wrong final
   results). Each selector keeps ``--ratio`` of the pool: Data Whisperer (training-free, the base model
   scores in context), random, EL2N and GraNd (each after a ``--warmup-steps`` fine-tuning pass).
   Selection times are medians over ``--select-repeats`` runs, interleaved across selectors.
3. Fine-tuning. From the base model, ``--epochs`` epochs of AdamW on each subset and on the full pool,
   for ``--seeds`` seeds, interleaved (full, DW, random, EL2N, GraNd, full, DW, ...); exact match of the
   greedy answer on ``--test`` held-out clean problems.
4. Table: mean +- std of test exact match over seeds, difference to random, selection time, STR =
   selection time / median full fine-tuning time (the paper's selection-to-tuning ratio), and the
   fraction of noisy examples in each subset.

    python benchmarks/data_whisperer.py --quick            # smoke run, < 1 min of compute after imports
    python benchmarks/data_whisperer.py                    # CPU default (reduced size, about 15 min on 2 cores)
    python benchmarks/data_whisperer.py --device cuda --pool 8000 --seeds 5 --size base   # GPU
"""

from __future__ import annotations

import os
import sys

# This file is named like the standard library's `select` module, which Python would otherwise import from
# here (the script's folder is sys.path[0]): take the folder off the path before anything imports `select`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2},  # fmt: skip
    "small": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2},  # fmt: skip
    "base": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 8,
             "num_key_value_heads": 4},  # fmt: skip
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run with tiny sizes")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--pretrain-qa", type=int, default=6000, help="question/answer documents of the base corpus")
    p.add_argument("--pretrain-icl", type=int, default=600, help="few-shot documents of the base corpus")
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--max-operand", type=int, default=9, help="largest operand of the problems")
    p.add_argument("--max-steps", type=int, default=1, choices=[1, 2], help="calculation steps per problem")
    p.add_argument("--pool", type=int, default=1500, help="examples in the selection pool")
    p.add_argument("--noise", type=float, default=0.3, help="label-noise fraction of the pool")
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (same for every subset)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup-steps", type=int, default=30, help="fine-tuning steps before EL2N / GraNd")
    p.add_argument("--select-repeats", type=int, default=1)
    p.add_argument("--prompt-batch-size", type=int, default=8)
    p.add_argument("--methods", default="data_whisperer,random,el2n,grand,full")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (1 avoids oversubscription)")
    p.add_argument("--workdir", default=None, help="where the base model is written (default: a temp dir)")
    p.add_argument("--out", default="outputs/benchmarks/select.json")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.pretrain_qa, args.pretrain_icl, args.pretrain_epochs = "tiny", 400, 40, 1
        args.pool, args.test, args.seeds, args.epochs, args.warmup_steps = 100, 40, 2, 1, 3
        args.ratio = max(args.ratio, 0.1)
    return args


def trainer_kwargs(args):
    return {
        "accelerator": "gpu" if args.device == "cuda" else "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "gradient_clip_val": 1.0,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
    }


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n")


def base_corpus(args):
    """Clean QA documents plus Data Whisperer-format few-shot documents with their answers."""
    import random

    from lightning_eff.llm import DEFAULT_PROMPT, generate_arithmetic
    from lightning_eff.select import ICLTemplate, build_icl_prompt

    template = ICLTemplate()
    kw = {"max_operand": args.max_operand, "max_steps": args.max_steps}
    qa = generate_arithmetic(args.pretrain_qa, seed=100, **kw)
    docs = [{"question": DEFAULT_PROMPT.format(question=r["question"]), "answer": r["answer"]} for r in qa]
    rng = random.Random(101)
    pool = generate_arithmetic(max(50, args.pretrain_icl * 2), seed=102, **kw)
    for _ in range(args.pretrain_icl):
        picked = rng.sample(pool, 8)
        demos, queries = picked[:5], picked[5:]
        prompt = build_icl_prompt(demos, queries, template).text
        docs.append({"question": prompt, "answer": template.format_answers([q["answer"] for q in queries]).rstrip("\n")})
    rng.shuffle(docs)
    return docs


class _ShuffledBatches:
    """Fixed batches of similar-length examples, in a new random order at every epoch."""

    def __init__(self, batches, seed=0):
        self.batches, self.epoch, self.seed = batches, 0, seed

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        import random

        order = list(self.batches)
        random.Random(self.seed + self.epoch).shuffle(order)
        self.epoch += 1
        return iter(order)


def _length_grouped_module():
    from torch.utils.data import DataLoader

    from lightning_eff.llm import InstructionDataModule
    from lightning_eff.llm.data import InstructionDataset

    class LengthGrouped(InstructionDataModule):
        """Training batches of similar length (the few-shot documents are ~8x longer than the QA ones)."""

        def train_dataloader(self):
            recs = self.train_records
            order = sorted(range(len(recs)), key=lambda i: len(recs[i]["question"]) + len(recs[i]["answer"]))
            batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            return DataLoader(InstructionDataset(recs), batch_sampler=_ShuffledBatches(batches, self.seed),
                              collate_fn=self.collator)  # fmt: skip

    return LengthGrouped


def _epoch_printer():
    import lightning as L

    class EpochPrinter(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            loss = trainer.callback_metrics.get("train/loss_epoch", float("nan"))
            print(f"  base epoch {trainer.current_epoch}: loss {float(loss):.3f} "
                  f"({time.perf_counter() - self.t0:.0f} s)", flush=True)  # fmt: skip

    return EpochPrinter


def main(argv=None):
    args = parse_args(argv)
    import lightning as L
    import torch
    import transformers

    from lightning_eff.llm import CausalLMModule, InstructionDataModule
    from lightning_eff.select import DataWhispererDataModule

    LengthGrouped, EpochPrinter = _length_grouped_module(), _epoch_printer()

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="select-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    model_cfg = {"model_type": "llama", **SIZES[args.size], "max_position_embeddings": 1024, "tie_word_embeddings": True}
    print("# Data Whisperer selection benchmark")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, device={args.device}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, threads={torch.get_num_threads()}")  # fmt: skip
    print(f"model: Llama {SIZES[args.size]} (random init, arithmetic BPE tokenizer)")
    print(f"base corpus: {args.pretrain_qa} QA + {args.pretrain_icl} few-shot documents, {args.pretrain_epochs} epochs")
    print(f"problems: operands <= {args.max_operand}, {args.max_steps} step(s); pool: {args.pool} problems, "
          f"{args.noise:.0%} label noise; test: {args.test} clean problems; ratio {args.ratio}")  # fmt: skip
    print(f"fine-tuning: {args.epochs} epochs, AdamW lr {args.lr}, batch {args.batch_size}, seeds {args.seeds}; "
          f"EL2N/GraNd warm-up {args.warmup_steps} steps; DW n_d=5, n_q=3")  # fmt: skip
    print(f"methods: {methods}")
    sys.stdout.flush()

    # ------------------------------------------------------------------ 1. base model
    base_dir = workdir / "base"
    base_settings = {k: getattr(args, k) for k in ("size", "pretrain_qa", "pretrain_icl", "pretrain_epochs",
                                                   "max_operand", "max_steps", "device")}  # fmt: skip
    marker = workdir / "base.json"
    if marker.is_file() and json.loads(marker.read_text())["settings"] == base_settings:
        base_seconds = json.loads(marker.read_text())["seconds"]
        print(f"\nreusing the base model in {base_dir} (same settings; trained in {base_seconds:.0f} s)")
    else:
        corpus = workdir / "base_corpus.jsonl"
        write_jsonl(corpus, base_corpus(args))
        L.seed_everything(0, verbose=False)
        base_dm = LengthGrouped(data_path=str(corpus), num_train=None, num_val=0, num_test=0,
                                prompt_template="{question}", max_length=1024, batch_size=32)  # fmt: skip
        base = CausalLMModule(model_cfg, tokenizer="arithmetic-bpe", optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3))
        t0 = time.perf_counter()
        L.Trainer(max_epochs=args.pretrain_epochs, callbacks=[EpochPrinter()], **trainer_kwargs(args)).fit(
            base, datamodule=base_dm
        )
        base_seconds = time.perf_counter() - t0
        base.save_pretrained(base_dir)
        marker.write_text(json.dumps({"settings": base_settings, "seconds": base_seconds}))
        print(f"\nbase model trained in {base_seconds:.0f} s -> {base_dir}")

    def data_module(method, seed=0, **kw):
        return DataWhispererDataModule(
            method=method, ratio=args.ratio, num_train=args.pool, num_val=8, num_test=args.test, noise=args.noise,
            max_operand=args.max_operand, max_steps=args.max_steps,
            seed=1, batch_size=args.batch_size, eval_batch_size=64, max_length=1024, scorer_model=str(base_dir),
            prompt_batch_size=args.prompt_batch_size, warmup_steps=args.warmup_steps, warmup_lr=args.lr,
            selection_seed=seed, device="cuda" if args.device == "cuda" else "cpu", progress=False, **kw,
        )  # fmt: skip

    def evaluate(module, dm):
        out = L.Trainer(**trainer_kwargs(args)).test(module, datamodule=dm, verbose=False)
        return float(out[0]["test/exact_match"])

    probe = data_module("full")
    probe.setup("fit")
    base_em = evaluate(CausalLMModule(str(base_dir), max_new_tokens=48), probe)
    pool = probe.train_records
    noisy = [bool(r["corrupted"]) for r in pool]
    print(f"base model test exact match: {base_em:.3f}")

    # ------------------------------------------------------------------ 2. selections (interleaved repeats)
    selectors = [m for m in methods if m != "full"]
    sel_times: dict[str, list[float]] = {m: [] for m in selectors}
    selections: dict[str, dict[int, list[int]]] = {m: {} for m in selectors}
    sel_stats: dict[str, dict] = {}
    for rep in range(args.select_repeats):
        for m in selectors:
            seeds = range(args.seeds) if (m == "random" and rep == 0) else [0]
            for s in seeds:
                dm = data_module(m, seed=s)
                dm.setup("fit")
                if s == 0:
                    sel_times[m].append(dm.selection_stats["scoring_seconds"])
                selections[m][s] = list(dm.selected_indices)
                sel_stats[m] = dict(dm.selection_stats)
            print(f"selection {m:>15} repeat {rep}: {sel_times[m][-1]:7.1f} s", flush=True)
    if "data_whisperer" in sel_stats:
        st = sel_stats["data_whisperer"]
        print(f"base model in-context score on the pool queries: {st.get('icl_score', float('nan')):.3f} "
              f"({int(st.get('skipped_prompts', 0))}/{int(st.get('prompts', 0))} prompts unparsable)")  # fmt: skip

    # ------------------------------------------------------------------ 3. fine-tuning (interleaved)
    class Fixed(InstructionDataModule):
        def __init__(self, indices, **kw):
            super().__init__(**kw)
            self.indices = indices

        def train_indices(self):
            return self.indices

    results: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in range(args.seeds):
        for m in methods:
            idx = list(range(len(pool))) if m == "full" else selections[m].get(seed, selections[m][0])
            dm = Fixed(idx, num_train=args.pool, num_val=8, num_test=args.test, noise=args.noise, seed=1,
                       max_operand=args.max_operand, max_steps=args.max_steps,
                       batch_size=args.batch_size, eval_batch_size=64, max_length=1024)  # fmt: skip
            L.seed_everything(1000 + seed, verbose=False)
            module = CausalLMModule(str(base_dir), max_new_tokens=48,
                                    optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr))  # fmt: skip
            t0 = time.perf_counter()
            L.Trainer(max_epochs=args.epochs, **trainer_kwargs(args)).fit(module, datamodule=dm)
            fit_s = time.perf_counter() - t0
            em = evaluate(module, dm)
            frac_noisy = sum(noisy[i] for i in idx) / len(idx)
            results[m].append({"seed": seed, "exact_match": em, "fit_seconds": fit_s, "noisy_fraction": frac_noisy})
            print(f"seed {seed} {m:>15}: {len(idx):5d} examples, fit {fit_s:6.1f} s, test EM {em:.3f}, "
                  f"noisy {frac_noisy:.2f}", flush=True)  # fmt: skip

    # ------------------------------------------------------------------ 4. table
    full_t = statistics.median(r["fit_seconds"] for r in results["full"]) if "full" in results else float("nan")
    rand = [r["exact_match"] for r in results.get("random", [])]
    rand_mean = statistics.mean(rand) if rand else float("nan")
    print(f"\nbase model (no fine-tuning): test EM {base_em:.3f}")
    print("\n| method | examples | test EM (mean +- std) | vs random | selection s | STR | noisy in subset |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    summary = {}
    for m in methods:
        ems = [r["exact_match"] for r in results[m]]
        mean, std = statistics.mean(ems), (statistics.stdev(ems) if len(ems) > 1 else 0.0)
        sel = statistics.median(sel_times[m]) if m in sel_times else 0.0
        str_ = sel / full_t if m != "full" else float("nan")
        n = len(pool) if m == "full" else len(selections[m][0])
        noisy_frac = statistics.mean(r["noisy_fraction"] for r in results[m])
        summary[m] = {"exact_match": ems, "mean": mean, "std": std, "selection_seconds": sel_times.get(m, []),
                      "str": str_, "examples": n, "noisy_fraction": noisy_frac, "runs": results[m]}  # fmt: skip
        vs = "" if m == "random" else f"{mean - rand_mean:+.3f}"
        str_txt = "-" if m == "full" else f"{str_:.3f}"
        sel_txt = "-" if m == "full" else f"{sel:.1f}"
        print(f"| {m} | {n} | {mean:.3f} +- {std:.3f} | {vs} | {sel_txt} | {str_txt} | {noisy_frac:.2f} |")
    print(f"\nfull fine-tuning time (median over seeds): {full_t:.1f} s; STR = selection s / that.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump({"args": vars(args), "base_em": base_em, "base_seconds": base_seconds,
                   "full_finetune_seconds": full_t, "dw_stats": sel_stats.get("data_whisperer"),
                   "summary": summary}, f, indent=1)  # fmt: skip
    print(f"raw numbers: {out}")


if __name__ == "__main__":
    main()
