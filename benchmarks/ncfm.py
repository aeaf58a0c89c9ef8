"""NCFM on the bundled digits: accuracy against its packed-real start, random real (equal storage and count) and DM,
on the distillation ConvNet and on two other students; cost against trajectory matching.

    python -m benchmarks.ncfm                   # full run (CPU: tens of minutes on 2 idle cores)
    python -m benchmarks.ncfm --quick           # smoke run (< 1 min of distillation, tiny evaluation)
    python -m benchmarks.ncfm --device cuda     # the same on a GPU (memory: torch.cuda peak allocation)
    python -m benchmarks.ncfm --skip accuracy   # only the cost section (or --skip cost)

Accuracy (per IPC, 1 and 10 by default): every set below is evaluated with the same protocol (fresh
students trained on the set, tested on the real test split; mean +- std over the students):

* random real, IPC images per class (equal *storage*; a new subset per student);
* random real, 4 IPC images per class (equal *count*: NCFM's factor 2 decodes each stored image into
  4 training images; a new subset per student);
* NCFM's starting point, packed real: IPC stored images per class, each packing 4 real digits
  downsampled 2x (the factor-2 multi-formation initialisation, decoded to 4 IPC images);
* DM (IPC images per class), NCFM with N(0, I) frequencies and NCFM with the sampling network psi
  (the minmax), both stored at IPC and decoded to 4 IPC.

The 16x16 digits are bilinear upsamples of sklearn's 8x8 digits, so the 2x downsampling in a packed
image loses almost nothing: the packed start is a strong baseline here, stronger than it would be on
natively high-resolution images.

Students (``--archs``): ``convnet`` (ConvNet-3, instance norm: the architecture NCFM and DM distil
with; the standard distillation protocol, lr 0.01, no choice made), and two architectures the sets
were *not* distilled with: ``mlp`` (MLP 256-256 on the flattened image) and ``lenet_bn`` (LeNet-5
with BatchNorm after each convolution). Their learning rate is chosen per IPC from ``--cross-lrs`` on
the validation split (180 images), with students trained on a separate random real subset of the
equal-count size (not on any distilled set), then fixed for every set; the test split is only used
for the reported numbers.

Cost (IPC 10): seconds per distillation iteration (median) and the peak memory of an iteration
(above the memory held before it) for NCFM, NCFM with psi, NCFM memory-efficient and trajectory
matching (MTT), each alternative in its own subprocess, in interleaved rounds (A B C D A B C D) so
load from other jobs hits all alike. CPU memory: the process's VmHWM, reset (``/proc/self/clear_refs``)
after the warm-up iterations, minus the RSS at the reset; GPU: ``torch.cuda.max_memory_allocated``
minus the allocation at the reset.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]
DATA = dict(image_size=16, channels=1)


def net_config(width: int) -> dict:
    return dict(in_channels=1, num_classes=10, width=width, depth=3, image_size=16)


# ------------------------------------------------------------------------------------------------ students
class LeNetBN(torch.nn.Module):
    """LeNet-5 with BatchNorm after each convolution (a student the sets were not distilled with).

    conv 5x5 (6, padding 2) - BN - ReLU - max pool 2 - conv 5x5 (16) - BN - ReLU - max pool 2 - 120 - 84 - classes.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 16) -> None:
        super().__init__()
        nn = torch.nn
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = (image_size // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"LeNetBN: image_size={image_size} is too small (needs >= 12)")
        self.feature_dim = 16 * side * side
        self.head = nn.Sequential(nn.Linear(self.feature_dim, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU())
        self.classifier = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.encoder(x).flatten(1)))


def student_net(arch: str, width: int) -> torch.nn.Module:
    from lightning_eff.models import MLP, ConvNet

    if arch == "convnet":
        return ConvNet(1, 10, width=width, depth=3, image_size=DATA["image_size"])
    if arch == "mlp":
        return MLP(in_channels=1, image_size=DATA["image_size"], num_classes=10, hidden_sizes=(256, 256))
    if arch == "lenet_bn":
        return LeNetBN(1, 10, image_size=DATA["image_size"])
    raise ValueError(f"unknown student architecture {arch!r}")


STUDENT_NAMES = {"convnet": "ConvNet-3 (distillation net)", "mlp": "MLP 256-256", "lenet_bn": "LeNet-BN"}


class ValidationSplit:
    """The validation split of a DataModule presented as its test split (for choices made before testing)."""

    def __init__(self, datamodule) -> None:
        self.datamodule = datamodule
        self.test_set = datamodule.val_set

    def test_dataloader(self):
        return self.datamodule.val_dataloader()


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
    return harness.quiet_trainer(
        device, max_steps=max_steps, callbacks=list(callbacks), default_root_dir=root or tempfile.mkdtemp()
    )


# ------------------------------------------------------------------------------------------------ cost (child)
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
                    state["base"] = harness.rss_mb()
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
        peak = harness.cuda_peak_mb() - state["base"]
    else:
        peak = harness.rss_mb("VmHWM") - state["base"]
    harness.write_json(out, {
        "method": method, "ipc": ipc, "s_per_iter": statistics.median(times), "peak_mb": peak,
        "wall_s": time.perf_counter() - t0,
    }, indent=None)


# ------------------------------------------------------------------------------------------------ accuracy
SET_ORDER = ("random real (equal storage)", "random real (equal count)", "packed real (NCFM init)", "dm", "ncfm",
             "ncfm+psi")


def _save(args, protocol, pretrain_s, rows, cost_rows, partial: bool) -> None:
    harness.write_json(args.out, {"protocol": protocol, "pretrain_s": pretrain_s, "partial": partial,
                                  "accuracy": rows, "cost": cost_rows}, indent=2)


def choose_lrs(args, dm, ipc: int) -> dict[str, dict]:
    """Each cross-architecture student's lr for this IPC, chosen on the validation split.

    Students are trained on random real subsets of the equal-count size (seeds 900, 901: not the evaluated
    subsets, not a distilled set) and scored on the validation split; the best mean wins (ties: the first).
    """
    from lightning_eff.distill import DSA, SyntheticSet, evaluate_synthetic

    val = ValidationSplit(dm)
    choices = {}
    for arch in args.archs:
        if arch == "convnet":
            continue
        scores = {}
        for lr in args.cross_lrs:
            accs = []
            for k in range(args.tune_subsets):
                subset = SyntheticSet.random_subset(dm, 4 * ipc, seed=900 + k)
                accs += evaluate_synthetic(subset, val, net=student_net(arch, args.student_width), num_students=1,
                                           epochs=args.eval_epochs, lr=lr, dsa=DSA(), seed=900 + k,
                                           device=args.device).accuracies
            scores[lr] = statistics.mean(accs)
        best = max(args.cross_lrs, key=lambda lr: scores[lr])
        choices[arch] = {"lr": best, "val_acc": {str(k): v for k, v in scores.items()}}
        print(f"IPC {ipc:2d} {STUDENT_NAMES[arch]}: lr {best} chosen on validation "
              f"({', '.join(f'{k}: {100 * v:.1f}' for k, v in scores.items())})", flush=True)
    return choices


def accuracy_section(args, dm, feature_path: str, protocol: dict, pretrain_s: float) -> list[dict]:
    """Distil, then evaluate every set on every student architecture; rows are checkpointed to ``--out``."""
    from lightning_eff.distill import DSA, SyntheticSet, evaluate_synthetic
    from lightning_eff.distill.ncfm import decode_synthetic_set, multi_formation_init

    rows: list[dict] = []
    lr_choices: dict[int, dict] = {}
    if args.resume and Path(args.out).exists():
        old = json.loads(Path(args.out).read_text())
        rows = [r for r in old.get("accuracy", []) if "arch" in r]
        lr_choices = {int(k): v for k, v in old.get("protocol", {}).get("cross_lrs_chosen", {}).items()}
        print(f"resuming: {len(rows)} rows from {args.out}", flush=True)
    if args.lrs_from:
        chosen = json.loads(Path(args.lrs_from).read_text())["protocol"].get("cross_lrs_chosen", {})
        lr_choices.update({int(k): v for k, v in chosen.items()})
    done = {(r["ipc"], r["set"], r["arch"]) for r in rows}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    def record(row):
        rows.append(row)
        done.add((row["ipc"], row["set"], row["arch"]))
        protocol["cross_lrs_chosen"] = {str(k): v for k, v in lr_choices.items()}
        _save(args, protocol, pretrain_s, rows, [], partial=True)
        print(f"IPC {row['ipc']:2d} {row['set']:28s} {STUDENT_NAMES[row['arch']]:28s} lr {row['lr']:<6g} "
              f"acc {row['mean']:.3f} +- {row['std']:.3f}", flush=True)

    def lr_of(ipc, arch):
        return 0.01 if arch == "convnet" else lr_choices[ipc][arch]["lr"]

    for ipc in args.ipcs:
        # in order of importance (a run cut short keeps the main comparisons): NCFM, its packed-real start,
        # random real at equal count and at equal storage (a new subset per student: seeds 200+s and 100+s),
        # DM, NCFM + psi. Distilled sets are saved in --work and reused by --resume.
        order = [("ncfm", "distil", args.iters), ("packed real (NCFM init)", "packed", None),
                 ("random real (equal count)", 4 * ipc, 200), ("random real (equal storage)", ipc, 100),
                 ("dm", "distil", args.dm_iters), ("ncfm+psi", "distil", args.iters)]
        for name, kind, extra in order:
            if args.sets and name not in args.sets:
                continue
            todo = [a for a in args.archs if (ipc, name, a) not in done]
            if not todo:
                continue
            if any(a != "convnet" for a in todo) and ipc not in lr_choices:
                lr_choices[ipc] = choose_lrs(args, dm, ipc)
            if isinstance(kind, int):  # random real
                for arch in todo:
                    accs = []
                    for s in range(args.students):
                        accs += evaluate_synthetic(
                            SyntheticSet.random_subset(dm, kind, seed=extra + s), dm,
                            net=student_net(arch, args.student_width), num_students=1, epochs=args.eval_epochs,
                            lr=lr_of(ipc, arch), dsa=DSA(), seed=s, device=args.device,
                        ).accuracies
                    record({"ipc": ipc, "set": name, "stored_per_class": kind, "images_per_class": kind,
                            "arch": arch, "lr": lr_of(ipc, arch), "acc": accs, "mean": statistics.mean(accs),
                            "std": statistics.pstdev(accs), "distill_s": None})
                continue
            path = work / f"{name.split(' ')[0]}_ipc{ipc}.pt"
            secs, iters = None, extra
            if kind == "packed":  # NCFM's start: the same draw as NCFM(seed=0)'s initialisation
                synset = decode_synthetic_set(multi_formation_init(dm, ipc, factor=2, seed=0))
            elif path.exists() and args.resume:
                synset = SyntheticSet.load(path)
                secs = synset.metadata.get("benchmark_distill_s")
            else:
                module = build(name, ipc, args, feature_path)
                t = time.perf_counter()
                _trainer(iters, args.device).fit(module, datamodule=dm)
                secs = time.perf_counter() - t
                synset = module.synthetic_set()
                synset.metadata["benchmark_distill_s"] = secs
                synset.save(path)
                print(f"IPC {ipc:2d} {name}: {iters} iterations in {secs:.0f} s", flush=True)
            for arch in todo:
                res = evaluate_synthetic(synset, dm, net=student_net(arch, args.student_width),
                                         num_students=args.students, epochs=args.eval_epochs, lr=lr_of(ipc, arch),
                                         dsa=DSA(), seed=0, device=args.device)
                record({"ipc": ipc, "set": name, "stored_per_class": ipc, "images_per_class": synset.ipc,
                        "arch": arch, "lr": lr_of(ipc, arch), "acc": res.accuracies, "mean": res.mean,
                        "std": res.std, "distill_s": secs, "iterations": iters})
    protocol["cross_lrs_chosen"] = {str(k): v for k, v in lr_choices.items()}
    return rows


def print_accuracy_table(rows: list[dict], args) -> None:
    archs = [a for a in args.archs if any(r["arch"] == a for r in rows)]
    print("\n| IPC | set | stored / class | images / class | " + " | ".join(STUDENT_NAMES[a] for a in archs) + " |")
    print("| --- " * (4 + len(archs)) + "|")
    for ipc in args.ipcs:
        for name in SET_ORDER:
            cells = {r["arch"]: r for r in rows if r["ipc"] == ipc and r["set"] == name}
            if not cells:
                continue
            first = next(iter(cells.values()))
            accs = " | ".join(f"{100 * cells[a]['mean']:.1f} +- {100 * cells[a]['std']:.1f}" if a in cells else ""
                              for a in archs)
            print(f"| {ipc} | {name} | {first['stored_per_class']} | {first['images_per_class']} | {accs} |")
    print("\nNCFM minus each baseline (points; '>' when the gap exceeds the larger std):")
    for ipc in args.ipcs:
        for name in SET_ORDER[:4]:
            parts = []
            for a in archs:
                n = next((r for r in rows if r["ipc"] == ipc and r["set"] == "ncfm" and r["arch"] == a), None)
                b = next((r for r in rows if r["ipc"] == ipc and r["set"] == name and r["arch"] == a), None)
                if n and b:
                    diff = n["mean"] - b["mean"]
                    mark = ">" if abs(diff) > max(n["std"], b["std"]) else "~"
                    parts.append(f"{STUDENT_NAMES[a]} {100 * diff:+.1f} {mark}")
            if parts:
                print(f"  IPC {ipc} vs {name}: " + "; ".join(parts))


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
    parser.add_argument("--archs", nargs="+", default=["convnet", "mlp", "lenet_bn"],
                        choices=["convnet", "mlp", "lenet_bn"], help="student architectures of the accuracy section")
    parser.add_argument("--cross-lrs", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1],
                        help="lr grid of the mlp / lenet_bn students, chosen per IPC on the validation split")
    parser.add_argument("--tune-subsets", type=int, default=2, help="random real subsets (1 student each) per lr")
    parser.add_argument("--out", default="outputs/benchmarks/ncfm.json")
    parser.add_argument("--work", default="outputs/benchmarks/ncfm_work", help="distilled sets kept for --resume")
    parser.add_argument("--resume", action="store_true", help="keep the rows in --out and the sets in --work")
    parser.add_argument("--sets", nargs="+", default=None, choices=list(SET_ORDER),
                        help="only these sets (default: all); lets several processes share one IPC")
    parser.add_argument("--lrs-from", default=None,
                        help="take the validation-chosen lrs of the cross-architecture students from this JSON")
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
    from lightning_eff.distill.ncfm import (
        pretrain_feature_networks,
    )
    from lightning_eff.models import ConvNet

    torch.set_num_threads(args.threads)
    protocol = {
        "data": f"sklearn digits, {DATA['image_size']} px (bilinear upsamples of the 8x8 originals), 1 channel, "
        "split 1258/180/359 (seed 0)",
        "budget": "IPC stored 16x16 images per class for every method",
        "distillation net": f"ConvNet-3 width {args.width}, instance norm",
        "ncfm": f"factor 2 (4 IPC decoded images per class), {args.iters} iterations, real batch {args.batch_real} "
        f"per class (digits have ~126), {args.num_freqs} frequencies, alpha 0.5, scale 300, calibration 1, "
        f"{args.feature_nets} feature nets x {args.pretrain_epochs} epochs (SGD 0.01 m 0.9 wd 5e-4, batch 64, DSA, "
        f"CutMix 0.5), AdamW lr {args.ncfm_lr} wd 5e-4, DSA color_crop_cutout (siamese), psi: SGD lr 1e-3 m 0.5",
        "dm": f"{args.dm_iters} iterations, SGD lr 1 m 0.5, 128 real per class, DSA",
        "mtt (cost only)": f"1 expert, N = {' and '.join(map(str, args.mtt_syn_steps))} student steps on the whole "
        f"set (N = 30 is MTT's official CIFAR-10 IPC 10 unroll), M = 2, DSA",
        "evaluation": f"{args.students} fresh students per set and architecture, SGD m 0.9 wd 5e-4, batch 256, "
        f"{args.eval_epochs} epochs, lr x0.1 at half, DSA, final-epoch accuracy on the 359 test images; students: "
        f"{', '.join(STUDENT_NAMES[a] for a in args.archs)}; ConvNet-3 width {args.student_width} at lr 0.01 (the "
        f"distillation protocol, no choice made); MLP / LeNet-BN lr chosen per IPC from {args.cross_lrs} on the 180 "
        f"validation images ({args.tune_subsets} random real equal-count subsets, seeds 900+, 1 student each); "
        f"random real: a new subset per student",
        "sets": "random real (equal storage): IPC real images per class; random real (equal count): 4 IPC per class; "
        "packed real (NCFM init): the factor-2 multi-formation start, IPC stored images each packing 4 real digits "
        "(area-downsampled 2x), decoded to 4 IPC; dm: IPC per class; ncfm, ncfm+psi: IPC stored, decoded to 4 IPC",
        "cost": f"{args.rounds} interleaved rounds x {args.cost_iters} timed iterations after 1 warm-up, each "
        f"alternative in its own process, {args.threads} torch threads",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{'cuda ' + torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, load average "
        f"{os.getloadavg()[0]:.1f} at start",
        "environment": harness.environment(args.device),
    }
    print("Protocol")
    for k, v in protocol.items():
        print(f"  {k}: {v}")
    sys.stdout.flush()

    dm = DigitsDataModule(**DATA)
    dm.setup("fit")
    tmp = tempfile.mkdtemp()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    feature_path = os.path.join(args.work, "feature_networks.pt")
    pretrain_s = None
    if args.resume and os.path.exists(feature_path):  # seeded: the same networks as a fresh pretraining
        print(f"feature networks: reused {feature_path}", flush=True)
    else:
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
    if "accuracy" not in args.skip:
        rows = accuracy_section(args, dm, feature_path, protocol, pretrain_s)

    cost_rows: list[dict] = []
    if "cost" not in args.skip:
        methods = ["ncfm", "ncfm+psi", "ncfm+mem"] + [f"mtt@{n}" for n in args.mtt_syn_steps]
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for r in range(args.rounds):
            for m in methods:
                out = os.path.join(tmp, f"cost_{m}_{r}.json")
                cmd = [sys.executable, "-m", "benchmarks.ncfm", "--child", m, "10", str(args.cost_iters), "1", out,
                       "--device", args.device, "--width", str(args.width), "--batch-real", str(args.batch_real),
                       "--num-freqs", str(args.num_freqs), "--feature-nets", str(args.feature_nets),
                       "--threads", str(args.threads), "--feature-path", feature_path]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
                runs[m].append(json.loads(Path(out).read_text()))
                print(f"cost round {r + 1} {m:9s} {runs[m][-1]['s_per_iter']:.3f} s/iter, "
                      f"peak {runs[m][-1]['peak_mb']:.1f} MB", flush=True)
        for m in methods:
            cost_rows.append({"method": m, "s_per_iter": statistics.median(x["s_per_iter"] for x in runs[m]),
                              "peak_mb": statistics.median(x["peak_mb"] for x in runs[m]), "runs": runs[m]})

    if rows:
        print_accuracy_table(rows, args)
    if cost_rows:
        mtts = [r for r in cost_rows if r["method"].startswith("mtt")]
        head = " | ".join(f"s x {m['method']} | memory x {m['method']}" for m in mtts)
        print(f"\n| IPC 10, {args.device} | s / iteration (median) | peak memory / iteration (MB) | {head} |")
        print("| --- " * (3 + 2 * len(mtts)) + "|")
        for r in cost_rows:
            ratios = " | ".join(f"{r['s_per_iter'] / m['s_per_iter']:.2f} | {r['peak_mb'] / max(m['peak_mb'], 1e-9):.2f}"
                                for m in mtts)
            print(f"| {r['method']} | {r['s_per_iter']:.3f} | {r['peak_mb']:.1f} | {ratios} |")
    _save(args, protocol, pretrain_s, rows, cost_rows, partial=False)
    print(f"\nraw results: {args.out}")


if __name__ == "__main__":
    main()
