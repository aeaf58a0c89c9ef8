"""NCFM on the bundled digits: accuracy against random real / DM, and cost against trajectory matching.

    python benchmarks/ncfm.py                   # full run (CPU: tens of minutes on 2 idle cores)
    python benchmarks/ncfm.py --quick           # smoke run (< 1 min of distillation, tiny evaluation)
    python benchmarks/ncfm.py --device cuda     # the same on a GPU (memory: torch.cuda peak allocation)
    python benchmarks/ncfm.py --skip accuracy   # only the cost section (or --skip cost)

Accuracy (per IPC): random real subsets of IPC images per class (the baseline; a new subset per
student), the NCFM initialisation (IPC stored images, each packing 4 real images: 4 IPC decoded
images per class, the storage-matched multi-formation baseline), DM, NCFM with N(0, I) frequencies
and NCFM with the sampling network psi (the minmax) — every set evaluated with the same protocol
(fresh ConvNet students trained on the set, tested on the real test split; mean +- std over the
students). All methods store IPC images of 16x16 per class (the same budget).

Cost (IPC 10): seconds per distillation iteration (median) and the peak memory of an iteration
(above the memory held before it) for NCFM, NCFM with psi, NCFM memory-efficient and trajectory
matching (MTT), each alternative in its own subprocess, in interleaved rounds (A B C D A B C D) so
load from other jobs hits all alike. CPU memory: the process's VmHWM, reset (``/proc/self/clear_refs``)
after the warm-up iterations, minus the RSS at the reset; GPU: ``torch.cuda.max_memory_allocated``
minus the allocation at the reset.
"""

from __future__ import annotations

import os
import sys

# benchmarks/ holds scripts named like standard modules (select.py): when this file runs as a script,
# its folder comes first on sys.path and would shadow them.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402 (after the sys.path guard)
import ctypes
import gc
import json
import platform
import statistics
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

DATA = dict(image_size=16, channels=1)


def net_config(width: int) -> dict:
    return dict(in_channels=1, num_classes=10, width=width, depth=3, image_size=16)


# ------------------------------------------------------------------------------------------------ building
def build(method: str, ipc: int, args, feature_path: str | None):
    from lightning_eff.distill import DSA, DistributionMatching, TrajectoryMatching
    from lightning_eff.distill.ncfm import NCFM
    from lightning_eff.models import ConvNet

    net = ConvNet(**net_config(args.width))
    if method == "dm":
        return DistributionMatching(net, ipc=ipc, batch_real=128, dsa=DSA(), seed=0)
    if method.startswith("ncfm"):
        return NCFM(
            net, ipc=ipc, factor=2, batch_real=args.batch_real, num_freqs=args.num_freqs,
            use_sampling_net="psi" in method, memory_efficient="mem" in method, calib_weight=1.0,
            num_feature_nets=args.feature_nets, pretrain_epochs=args.pretrain_epochs, pretrain_batch_size=64,
            feature_nets_path=feature_path, plateau_patience=500,
            dsa=DSA(strategy="color_crop_cutout", mode="multiple"),
            image_optimizer=partial(torch.optim.AdamW, lr=args.ncfm_lr, weight_decay=5e-4), seed=0,
        )
    if method.startswith("mtt"):  # "mtt" or "mtt@N" (N student steps per iteration)
        cost_only = feature_path == "cost-only"
        steps = int(method.split("@")[1]) if "@" in method else (20 if ipc == 1 else 10)
        return TrajectoryMatching(
            net, ipc=ipc, num_experts=1 if cost_only else 5, expert_train_epochs=3 if cost_only else 15,
            max_start_epoch=1 if cost_only else 10, expert_epochs=2, syn_steps=steps, dsa=DSA(),
            seed=0, image_optimizer=lambda p: torch.optim.SGD(p, lr=100.0, momentum=0.5),
        )
    raise ValueError(method)


def _trainer(max_steps: int, device: str, callbacks=(), root: str | None = None):
    import lightning as L

    return L.Trainer(
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="gpu" if device == "cuda" else "cpu", devices=1,
        callbacks=list(callbacks), default_root_dir=root or tempfile.mkdtemp(),
    )


# ------------------------------------------------------------------------------------------------ cost (child)
def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cost_child(method: str, ipc: int, iters: int, warmup: int, out: str, args) -> None:
    """One alternative in a fresh process: median s/iter and the peak memory of the timed iterations."""
    import lightning as L

    from lightning_eff.data import DigitsDataModule

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    times: list[float] = []
    state: dict[str, float] = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:  # reset the high-water mark after the warm-up iterations
                gc.collect()
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    state["base"] = torch.cuda.memory_allocated() / 2**20
                else:
                    try:
                        ctypes.CDLL("libc.so.6").malloc_trim(0)
                    except OSError:
                        pass
                    Path("/proc/self/clear_refs").write_text("5")
                    state["base"] = _rss_mb()
            if cuda:
                torch.cuda.synchronize()
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            if batch_idx >= warmup:
                times.append(time.perf_counter() - self._t)

    dm = DigitsDataModule(**DATA, batch_size=256)
    feature_path = args.feature_path if method.startswith("ncfm") else "cost-only"
    module = build(method, ipc, args, feature_path)
    t0 = time.perf_counter()
    _trainer(warmup + iters, args.device, [Probe()]).fit(module, datamodule=dm)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20 - state["base"]
    else:
        peak = _rss_mb("VmHWM") - state["base"]
    Path(out).write_text(json.dumps({
        "method": method, "ipc": ipc, "s_per_iter": statistics.median(times), "peak_mb": peak,
        "wall_s": time.perf_counter() - t0,
    }))


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ipcs", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--skip", nargs="*", default=[], choices=["accuracy", "cost"])
    parser.add_argument("--width", type=int, default=32, help="ConvNet-3 width of every distillation network")
    parser.add_argument("--iters", type=int, default=None, help="NCFM iterations (default 200; quick 10)")
    parser.add_argument("--dm-iters", type=int, default=None, help="DM iterations (default 400; quick 20)")
    parser.add_argument("--batch-real", type=int, default=256)
    parser.add_argument("--num-freqs", type=int, default=1024)
    parser.add_argument("--ncfm-lr", type=float, default=0.03)
    parser.add_argument("--feature-nets", type=int, default=None, help="K pretrained feature nets (5; quick 2)")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="their epochs (15; quick 2)")
    parser.add_argument("--students", type=int, default=None, help="students per set (5; quick 2)")
    parser.add_argument("--eval-epochs", type=int, default=None, help="student epochs (300; quick 20)")
    parser.add_argument("--student-width", type=int, default=None, help="student width (default: --width)")
    parser.add_argument("--cost-iters", type=int, default=None, help="timed iterations per cost run (5; quick 2)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved cost rounds (2; quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    parser.add_argument(
        "--mtt-syn-steps", type=int, nargs="+", default=[10, 30],
        help="trajectory matching's student steps per iteration in the cost rows (10: the reduced unroll of this "
        "project's digits runs; 30: the official MTT value for CIFAR-10 IPC 10)",
    )
    parser.add_argument("--out", default="outputs/benchmarks/ncfm.json")
    parser.add_argument("--child", nargs=5, metavar=("METHOD", "IPC", "ITERS", "WARMUP", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--feature-path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    q = args.quick
    args.iters = args.iters or (10 if q else 200)
    args.dm_iters = args.dm_iters or (20 if q else 400)
    args.feature_nets = args.feature_nets or (2 if q else 5)
    args.pretrain_epochs = args.pretrain_epochs or (2 if q else 15)
    args.students = args.students or (2 if q else 5)
    args.eval_epochs = args.eval_epochs or (20 if q else 300)
    args.student_width = args.student_width or args.width
    args.cost_iters = args.cost_iters or (2 if q else 5)
    args.rounds = args.rounds or (1 if q else 2)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.child:
        m, ipc, iters, warmup, out = args.child
        cost_child(m, int(ipc), int(iters), int(warmup), out, args)
        return

    from lightning_eff.data import DigitsDataModule
    from lightning_eff.distill import DSA, SyntheticSet, evaluate_synthetic
    from lightning_eff.distill.ncfm import (
        decode_synthetic_set,
        multi_formation_init,
        pretrain_feature_networks,
    )
    from lightning_eff.models import ConvNet

    torch.set_num_threads(args.threads)
    protocol = {
        "data": f"sklearn digits, {DATA['image_size']} px, 1 channel, split 1258/180/359 (seed 0)",
        "budget": "IPC stored 16x16 images per class for every method",
        "distillation net": f"ConvNet-3 width {args.width}, instance norm",
        "ncfm": f"factor 2 (4 IPC decoded images per class), {args.iters} iterations, real batch {args.batch_real} "
        f"per class (digits have ~126), {args.num_freqs} frequencies, alpha 0.5, scale 300, calibration 1, "
        f"{args.feature_nets} feature nets x {args.pretrain_epochs} epochs (SGD 0.01 m 0.9 wd 5e-4, batch 64, DSA, "
        f"CutMix 0.5), AdamW lr {args.ncfm_lr} wd 5e-4, DSA color_crop_cutout (siamese), psi: SGD lr 1e-3 m 0.5",
        "dm": f"{args.dm_iters} iterations, SGD lr 1 m 0.5, 128 real per class, DSA",
        "mtt (cost only)": f"1 expert, N = {' and '.join(map(str, args.mtt_syn_steps))} student steps on the whole "
        f"set (N = 30 is MTT's official CIFAR-10 IPC 10 unroll), M = 2, DSA",
        "evaluation": f"{args.students} fresh ConvNet-3 (width {args.student_width}) students per set, SGD lr 0.01 "
        f"m 0.9 wd 5e-4, batch 256, {args.eval_epochs} epochs, lr x0.1 at half, DSA, final-epoch accuracy on "
        f"the 359 test images; random real: a new subset per student",
        "cost": f"{args.rounds} interleaved rounds x {args.cost_iters} timed iterations after 1 warm-up, each "
        f"alternative in its own process, {args.threads} torch threads",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{'cuda ' + torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, load average "
        f"{os.getloadavg()[0]:.1f} at start",
    }
    print("Protocol")
    for k, v in protocol.items():
        print(f"  {k}: {v}")
    sys.stdout.flush()

    dm = DigitsDataModule(**DATA)
    dm.setup("fit")
    tmp = tempfile.mkdtemp()
    feature_path = os.path.join(tmp, "feature_networks.pt")
    t0 = time.perf_counter()
    nets = pretrain_feature_networks(
        dm, ConvNet(**net_config(args.width)), num_nets=args.feature_nets, epochs=args.pretrain_epochs,
        batch_size=64, device=args.device, save_path=feature_path,
    )
    pretrain_s = time.perf_counter() - t0
    print(f"feature networks: {len(nets)} in {pretrain_s:.0f} s, test accuracy "
          f"{statistics.mean(nets.metadata['test_acc']):.3f}", flush=True)
    args.feature_path = feature_path

    rows: list[dict] = []
    student = ConvNet(1, 10, width=args.student_width, depth=3, image_size=16)

    def evaluate(synset, seed=0):
        return evaluate_synthetic(synset, dm, net=student, num_students=args.students, epochs=args.eval_epochs,
                                  dsa=DSA(), seed=seed, device=args.device)

    if "accuracy" not in args.skip:
        for ipc in args.ipcs:
            accs = []
            for s in range(args.students):
                res = evaluate_synthetic(SyntheticSet.random_subset(dm, ipc, seed=100 + s), dm, net=student,
                                         num_students=1, epochs=args.eval_epochs, dsa=DSA(), seed=s,
                                         device=args.device)
                accs.extend(res.accuracies)
            rows.append({"ipc": ipc, "method": "random real", "images_per_class": ipc, "acc": accs,
                         "mean": statistics.mean(accs), "std": statistics.pstdev(accs), "distill_s": None})
            print(f"IPC {ipc:2d} {'random real':22s} acc {rows[-1]['mean']:.3f} +- {rows[-1]['std']:.3f}", flush=True)
            init = decode_synthetic_set(multi_formation_init(dm, ipc, factor=2, seed=0))  # NCFM's start
            res = evaluate(init)
            rows.append({"ipc": ipc, "method": "NCFM init (packed real)", "images_per_class": init.ipc,
                         "acc": res.accuracies, "mean": res.mean, "std": res.std, "distill_s": None})
            print(f"IPC {ipc:2d} {'NCFM init (packed real)':22s} acc {res.mean:.3f} +- {res.std:.3f}", flush=True)
            for method, iters in (("dm", args.dm_iters), ("ncfm", args.iters), ("ncfm+psi", args.iters)):
                module = build(method, ipc, args, feature_path)
                t = time.perf_counter()
                _trainer(iters, args.device).fit(module, datamodule=dm)
                secs = time.perf_counter() - t
                synset = module.synthetic_set()
                res = evaluate(synset)
                rows.append({"ipc": ipc, "method": method, "images_per_class": synset.ipc, "acc": res.accuracies,
                             "mean": res.mean, "std": res.std, "distill_s": secs, "iterations": iters})
                print(f"IPC {ipc:2d} {method:22s} acc {res.mean:.3f} +- {res.std:.3f}   ({iters} iterations, "
                      f"{secs:.0f} s)", flush=True)

    cost_rows: list[dict] = []
    if "cost" not in args.skip:
        methods = ["ncfm", "ncfm+psi", "ncfm+mem"] + [f"mtt@{n}" for n in args.mtt_syn_steps]
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for r in range(args.rounds):
            for m in methods:
                out = os.path.join(tmp, f"cost_{m}_{r}.json")
                cmd = [sys.executable, __file__, "--child", m, "10", str(args.cost_iters), "1", out,
                       "--device", args.device, "--width", str(args.width), "--batch-real", str(args.batch_real),
                       "--num-freqs", str(args.num_freqs), "--feature-nets", str(args.feature_nets),
                       "--threads", str(args.threads), "--feature-path", feature_path]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                runs[m].append(json.loads(Path(out).read_text()))
                print(f"cost round {r + 1} {m:9s} {runs[m][-1]['s_per_iter']:.3f} s/iter, "
                      f"peak {runs[m][-1]['peak_mb']:.1f} MB", flush=True)
        for m in methods:
            cost_rows.append({"method": m, "s_per_iter": statistics.median(x["s_per_iter"] for x in runs[m]),
                              "peak_mb": statistics.median(x["peak_mb"] for x in runs[m]), "runs": runs[m]})

    if rows:
        print("\n| IPC | set | images / class | test acc (mean +- std) | vs random real | vs DM |")
        print("| --- | --- | --- | --- | --- | --- |")
        for ipc in args.ipcs:
            base = next(r for r in rows if r["ipc"] == ipc and r["method"] == "random real")
            dmr = next(r for r in rows if r["ipc"] == ipc and r["method"] == "dm")
            for r in (r for r in rows if r["ipc"] == ipc):

                def verdict(other, r=r):
                    if r is other:
                        return ""
                    spread = max(r["std"], other["std"])
                    diff = r["mean"] - other["mean"]
                    return f"{100 * diff:+.1f} ({'beats by > spread' if diff > spread else 'within spread' if diff > -spread else 'worse'})"

                print(f"| {ipc} | {r['method']} | {r['images_per_class']} | {100 * r['mean']:.1f} +- "
                      f"{100 * r['std']:.1f} | {verdict(base)} | {verdict(dmr)} |")
    if cost_rows:
        mtts = [r for r in cost_rows if r["method"].startswith("mtt")]
        head = " | ".join(f"s x {m['method']} | memory x {m['method']}" for m in mtts)
        print(f"\n| IPC 10, {args.device} | s / iteration (median) | peak memory / iteration (MB) | {head} |")
        print("| --- " * (3 + 2 * len(mtts)) + "|")
        for r in cost_rows:
            ratios = " | ".join(f"{r['s_per_iter'] / m['s_per_iter']:.2f} | {r['peak_mb'] / max(m['peak_mb'], 1e-9):.2f}"
                                for m in mtts)
            print(f"| {r['method']} | {r['s_per_iter']:.3f} | {r['peak_mb']:.1f} | {ratios} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"protocol": protocol, "pretrain_s": pretrain_s, "accuracy": rows,
                                          "cost": cost_rows}, indent=2))
    print(f"\nraw results: {args.out}")


if __name__ == "__main__":
    main()
