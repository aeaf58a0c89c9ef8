"""Dataset distillation baselines on the bundled digits: random real vs DM vs gradient matching vs MTT.

    python -m benchmarks.distill            # full run (about 10-15 minutes on 2 CPU cores)
    python -m benchmarks.distill --quick    # smoke run (a few minutes)

For IPC 1 and 10, each method distils a synthetic set (each in its own subprocess, so that its peak
memory is its own), then every set — and random real subsets of equal size, the baseline — is
evaluated with the same protocol (printed below): fresh ConvNet-3 students trained on the set,
tested on the real test split. Trajectory matching learns its students' learning rate alongside
the images (MTT's ``syn_lr``; the official code evaluates at it): its set is evaluated at that learned
lr (row "mtt (learned lr)") and, for comparison, at the protocol's lr 0.01 (row "mtt").
Reported: accuracy mean +- std over the students, the median
seconds per distillation iteration and the peak memory of the distillation (peak RSS of the
process above its RSS before ``fit`` on the CPU; ``torch.cuda.max_memory_allocated`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]
DATA = dict(image_size=16, channels=1)
NET = dict(in_channels=1, num_classes=10, width=64, depth=3, image_size=16)


def _build(method: str, ipc: int, quick: bool):
    from lightning_eff.distill import DSA, DistributionMatching, GradientMatching, TrajectoryMatching
    from lightning_eff.models import ConvNet

    net = ConvNet(**NET)
    if method == "dm":
        return DistributionMatching(net, ipc=ipc, batch_real=128, dsa=DSA(), seed=0)
    if method == "gm":
        return GradientMatching(net, ipc=ipc, batch_real=128, dsa=DSA(), seed=0)
    if method == "mtt":
        experts = 2 if quick else 5
        return TrajectoryMatching(
            net, ipc=ipc, num_experts=experts, expert_train_epochs=15, syn_steps=20 if ipc == 1 else 10,
            expert_epochs=2, max_start_epoch=10, dsa=DSA(), seed=0,
            image_optimizer=lambda p: torch.optim.SGD(p, lr=100.0, momentum=0.5),
        )
    raise ValueError(method)


def run_one(method: str, ipc: int, iterations: int, out: str, quick: bool, threads: int | None = None) -> None:
    """Distil one set (child process): writes the set and a JSON of timings and memory."""
    import lightning as L

    from lightning_eff.data import DigitsDataModule

    # on a shared machine use --threads 1: oversubscribed intra-op threads slowed GM 20x in one run
    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
    cuda = torch.cuda.is_available()
    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self._t)

    dm = DigitsDataModule(**DATA, batch_size=256)
    module = _build(method, ipc, quick)
    trainer = harness.quiet_trainer(
        "auto", max_steps=iterations, callbacks=[Timer()], default_root_dir=tempfile.mkdtemp()
    )
    rss_before = harness.rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - t0
    peak = harness.cuda_peak_mb() if cuda else harness.peak_rss_mb() - rss_before
    module.synthetic_set().save(out + ".pt")
    harness.write_json(out + ".json", {
        "method": method, "ipc": ipc, "iterations": iterations, "wall_s": wall,
        "s_per_iter_median": statistics.median(times[1:] or times), "peak_mem_mb": peak,
        "memory_kind": "cuda max_memory_allocated" if cuda else "peak RSS above RSS before fit",
    }, indent=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--students", type=int, default=5)
    parser.add_argument("--eval-epochs", type=int, default=None, help="student epochs (default 300; 60 with --quick)")
    parser.add_argument("--iters-scale", type=float, default=1.0, help="multiply every method's iterations")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: all cores)")
    parser.add_argument("--ipcs", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--methods", nargs="+", default=["dm", "gm", "mtt"], choices=["dm", "gm", "mtt"])
    parser.add_argument("--out", default="benchmarks/results/distill.json")
    parser.add_argument("--work", default=None, help="keep the distilled sets here (default: a temporary folder)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --out and reuse the sets already in --work")
    parser.add_argument("--one", nargs=4, metavar=("METHOD", "IPC", "ITERS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one[0], int(args.one[1]), int(args.one[2]), args.one[3], args.quick, args.threads)
        return

    from lightning_eff.data import DigitsDataModule
    from lightning_eff.distill import DSA, SyntheticSet
    from lightning_eff.distill.evaluate import evaluate_synthetic

    quick = args.quick
    iters = {"dm": 40 if quick else 400, "gm": 10 if quick else 100, "mtt": 20 if quick else 200}
    iters = {k: max(1, round(v * args.iters_scale)) for k, v in iters.items()}
    eval_epochs = args.eval_epochs or (60 if quick else 300)
    protocol = {
        "data": f"sklearn digits, {DATA['image_size']} px, 1 channel, split 1258/180/359 (seed 0)",
        "distillation": f"ConvNet-3 width {NET['width']} (instance norm), DSA siamese augmentation, "
        f"iterations {iters}, init from real images (seed 0)",
        "dm": "SGD lr 1.0 momentum 0.5 on images, 128 real images per class",
        "gm": "DC distance 'ours', SGD lr 0.1 momentum 0.5, outer/inner loops from the official table, net lr 0.01",
        "mtt": f"{2 if quick else 5} experts x 15 epochs (SGD 0.01), N = 20 (IPC 1) / 10 (IPC 10) student steps, "
        "M = 2, start epoch < 10, image lr 100, lr lr 1e-5 (initial lr 0.01); evaluated at the learned lr and at 0.01",
        "evaluation": f"{args.students} fresh ConvNet-3 (width 128) students per set, SGD lr 0.01 (mtt: also its learned lr) momentum 0.9 "
        f"wd 5e-4, batch 256, {eval_epochs} epochs, lr x0.1 at half, DSA, final-epoch test accuracy "
        f"on the 359 test images; random real: a new subset per student seed",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{'cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}",
        "environment": harness.environment("cuda" if torch.cuda.is_available() else "cpu"),
    }
    print("Protocol")
    for k, v in protocol.items():
        print(f"  {k}: {v}")

    dm = DigitsDataModule(**DATA)
    dm.setup("fit")
    rows = []
    tmp = args.work or tempfile.mkdtemp()
    Path(tmp).mkdir(parents=True, exist_ok=True)
    if args.resume and Path(args.out).exists():
        rows = json.loads(Path(args.out).read_text())["rows"]
        print(f"resuming: {len(rows)} rows from {args.out}", flush=True)

    def save(partial: bool) -> None:  # after every row: a run cut short keeps what it measured
        harness.write_json(args.out, {"protocol": protocol, "partial": partial, "rows": rows}, indent=2)

    def have(method: str, ipc: int) -> bool:
        return any(r["method"] == method and r["ipc"] == ipc for r in rows)

    if args.threads:
        torch.set_num_threads(args.threads)
    for ipc in args.ipcs:
        for method in args.methods:
            out = os.path.join(tmp, f"{method}_{ipc}")
            if have(method, ipc) and (method != "mtt" or have("mtt (learned lr)", ipc)):
                continue
            if args.resume and os.path.exists(out + ".pt") and os.path.exists(out + ".json"):
                cmd = None
            else:
                cmd = [sys.executable, "-m", "benchmarks.distill", "--one", method, str(ipc), str(iters[method]), out]
            if cmd is not None:
                if quick:
                    cmd.append("--quick")
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"distilling {method} at IPC {ipc} failed:\n{proc.stderr[-3000:]}")
            info = json.loads(Path(out + ".json").read_text())
            synset = SyntheticSet.load(out + ".pt")
            if method == "mtt" and not have("mtt (learned lr)", ipc):
                # the lr it learned (what the official code evaluates at); the same students' seeds as at 0.01
                res = evaluate_synthetic(synset, dm, num_students=args.students, epochs=eval_epochs, lr="synset",
                                         dsa=DSA(), seed=0)
                rows.append({**info, "method": "mtt (learned lr)", "eval_lr": synset.lr, "acc_mean": res.mean,
                             "acc_std": res.std, "accuracies": res.accuracies})
                save(True)
                print(f"IPC {ipc:2d} mtt at its learned lr {synset.lr:.4g}: acc {res.mean:.3f} +- {res.std:.3f}",
                      flush=True)
            if not have(method, ipc):
                res = evaluate_synthetic(synset, dm, num_students=args.students, epochs=eval_epochs, dsa=DSA(), seed=0)
                rows.append({**info, "eval_lr": 0.01, "acc_mean": res.mean, "acc_std": res.std,
                             "accuracies": res.accuracies})
                save(True)
                print(f"IPC {ipc:2d} {method:11s}  acc {res.mean:.3f} +- {res.std:.3f}   "
                      f"{info['s_per_iter_median']:.3f} s/iter   peak {info['peak_mem_mb']:.0f} MB", flush=True)

        # the baseline (after the methods, so that a run cut short keeps them): random real subsets, one per
        # student (redrawn per run)
        if not have("random real", ipc):
            accs = []
            for s in range(args.students):
                res = evaluate_synthetic(SyntheticSet.random_subset(dm, ipc, seed=100 + s), dm, num_students=1,
                                         epochs=eval_epochs, dsa=DSA(), seed=s)
                accs.extend(res.accuracies)
            rows.append({"method": "random real", "ipc": ipc, "acc_mean": statistics.mean(accs),
                         "acc_std": statistics.pstdev(accs), "s_per_iter_median": None, "peak_mem_mb": None})
            save(True)
            print(f"IPC {ipc:2d} random real  acc {rows[-1]['acc_mean']:.3f} +- {rows[-1]['acc_std']:.3f}", flush=True)
    print("\n| IPC | method | test acc (mean +- std) | s / iteration (median) | peak memory (MB) | beats random by > spread |")
    print("| --- | --- | --- | --- | --- | --- |")
    for ipc in args.ipcs:
        base = next(r for r in rows if r["ipc"] == ipc and r["method"] == "random real")
        for r in (r for r in rows if r["ipc"] == ipc):
            spread = max(r["acc_std"], base["acc_std"])
            beats = "" if r is base else ("yes" if r["acc_mean"] - base["acc_mean"] > spread else "no")
            sec = "" if r["s_per_iter_median"] is None else f"{r['s_per_iter_median']:.3f}"
            mem = "" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
            print(f"| {ipc} | {r['method']} | {100 * r['acc_mean']:.1f} +- {100 * r['acc_std']:.1f} | {sec} | {mem} | {beats} |")
    save(False)
    print(f"\nraw results: {args.out}")


if __name__ == "__main__":
    main()
