"""SDC and DRUPI on the bundled digits: do the plug-ins help, and where?

    python -m benchmarks.plugins                 # full run (about 40-60 minutes on 2 CPU cores)
    python -m benchmarks.plugins --quick         # smoke run (a few minutes)
    python -m benchmarks.plugins --part sdc      # one table only (sdc | drupi)

SDC table. Gradient matching and trajectory matching distil digits at IPC 1 and 5 with the SDC
plug-in (synthetic mode) at weights 0 (the method alone), 1e-3, 1e-2, 1e-1 and 1; every run starts
from the same real images and draws the same networks (SDC's own draws use their own generator).
Reported per set: test accuracy (mean +- std over fresh students) and the mean difficulty of the
distilled samples (per-sample gradient norm of the cross-entropy) under 3 *independent* networks
trained on the real data (not the networks SDC penalised under).

DRUPI table. Fixed images (a DM-distilled set and a random real subset, both at IPC 4) get
attention labels F (32 values per image, the average-pooled last conv block), compared at equal
storage with IPC 6 without F (4 x (64 + 32) = 6 x 64 floats): learned F (gradient matching on F,
images fixed), the features of a pretrained network, the class-mean of those features, random F of
the same scale, and no F; students train on CE + weight x MSE(pool(E(x)), F), weight in
{0.01, 0.1, 1}.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]
DATA = dict(image_size=8, channels=1)
NET = dict(in_channels=1, num_classes=10, width=32, depth=2, image_size=8)
SDC_WEIGHTS = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
PARITY_IPC = 6  # IPC 4 with 32-value attention labels stores as many floats as IPC 6 of 8x8 images
DRUPI_WEIGHTS = (0.01, 0.1, 1.0)


def _trainer(iterations: int):
    return harness.quiet_trainer("auto", max_steps=iterations, default_root_dir=tempfile.mkdtemp())


def _net():
    from lightning_eff.models import ConvNet

    return ConvNet(**NET)


def distil(method: str, ipc: int, iterations: int, plugins: list, quick: bool):
    from lightning_eff.distill import DSA, DistributionMatching, GradientMatching, TrajectoryMatching

    if method == "gm":
        module = GradientMatching(_net(), ipc=ipc, batch_real=128, dsa=DSA(), plugins=plugins, seed=0)
    elif method == "mtt":
        module = TrajectoryMatching(
            _net(),
            ipc=ipc,
            expert_dir=EXPERT_DIR,
            syn_steps=20 if ipc == 1 else 10,
            expert_epochs=2,
            max_start_epoch=2 if quick else 10,
            dsa=DSA(),
            plugins=plugins,
            seed=0,
            image_optimizer=lambda p: torch.optim.SGD(p, lr=100.0, momentum=0.5),
        )
    elif method == "dm":
        module = DistributionMatching(_net(), ipc=ipc, batch_real=128, dsa=DSA(), plugins=plugins, seed=0)
    else:
        raise ValueError(method)
    t0 = time.perf_counter()
    _trainer(iterations).fit(module, datamodule=DM)
    return module.synthetic_set(), time.perf_counter() - t0


def evaluate(synset, args, privileged_weight=None):
    from lightning_eff.distill import DSA, evaluate_synthetic

    res = evaluate_synthetic(
        synset,
        DM,
        num_students=args.students,
        epochs=args.eval_epochs,
        dsa=DSA(),
        seed=0,
        net=_net(),
        privileged_weight=privileged_weight,
    )
    return res.mean, res.std


def sdc_table(args, quick: bool) -> list[dict]:
    from lightning_eff.distill import SDC, sample_difficulty
    from lightning_eff.distill.base import train_reference_networks

    judges = train_reference_networks(DM, _net(), 3, 30, 0.1, seed=12345)

    def difficulty(synset) -> float:
        return statistics.mean(
            float(sample_difficulty(n, synset.images, synset.labels).mean()) for n in judges
        )

    iters = {"gm": 10 if quick else 60, "mtt": 10 if quick else 120}
    iters = {k: max(1, round(v * args.iters_scale)) for k, v in iters.items()}
    rows = []
    for method in ("gm", "mtt"):
        for ipc in (1, 5):
            for w in args.sdc_weights:
                plugins = [SDC(weight=w, num_nets=2, train_epochs=30, net_lr=0.1, seed=0)] if w > 0 else []
                synset, wall = distil(method, ipc, iters[method], plugins, quick)
                mean, std = evaluate(synset, args)
                row = {
                    "method": method,
                    "ipc": ipc,
                    "weight": w,
                    "acc_mean": mean,
                    "acc_std": std,
                    "difficulty": difficulty(synset),
                    "distill_s": wall,
                    "iterations": iters[method],
                }
                rows.append(row)
                print(
                    f"SDC {method:3s} IPC {ipc} weight {w:<6g} acc {100 * mean:5.1f} +- {100 * std:4.1f}   "
                    f"difficulty {row['difficulty']:.3f}   ({wall:.0f} s)",
                    flush=True,
                )
    return rows


def drupi_table(args, quick: bool) -> list[dict]:
    from lightning_eff.distill import DRUPI, StaticSet, SyntheticSet

    ipc = 4
    tmp = Path(tempfile.mkdtemp())
    dm_iters = max(1, round((40 if quick else 300) * args.iters_scale))
    sources = {}
    dm4, _ = distil("dm", ipc, dm_iters, [], quick)
    dm5, _ = distil("dm", PARITY_IPC, dm_iters, [], quick)
    sources["DM"] = (dm4, dm5)
    sources["random real"] = (
        SyntheticSet.random_subset(DM, ipc, seed=0),
        SyntheticSet.random_subset(DM, PARITY_IPC, seed=0),
    )
    learn_iters = max(1, round((10 if quick else 100) * args.iters_scale))
    rows = []

    def add(source, variant, weight, synset, wall=None):
        mean, std = evaluate(
            synset, args, privileged_weight=weight if synset.privileged is not None else None
        )
        row = {
            "images": source,
            "variant": variant,
            "weight": weight,
            "ipc": int(synset.ipc),
            "bytes": synset.nbytes,
            "acc_mean": mean,
            "acc_std": std,
            "learn_s": wall,
        }
        rows.append(row)
        print(
            f"DRUPI {source:11s} IPC {row['ipc']} {variant:16s} weight {weight:<5g} {row['bytes']:7d} B   "
            f"acc {100 * mean:5.1f} +- {100 * std:4.1f}",
            flush=True,
        )

    for source, (four, five) in sources.items():
        path = four.save(tmp / f"{source.replace(' ', '_')}.pt")
        add(source, "no F (IPC 4)", 0.0, four)
        add(source, f"no F (IPC {PARITY_IPC})", 0.0, five)
        for weight in DRUPI_WEIGHTS:
            for variant, init, learn in (
                ("learned F", "pretrained", True),
                ("pretrained F", "pretrained", False),
                ("class-mean F", "class_mean", False),
                ("random F", "random", False),
            ):
                drupi = DRUPI(
                    kind="attention",
                    pooling="avg",
                    weight=weight,
                    init=init,
                    learn=learn,
                    batch_real=128,
                    pretrain_epochs=1,
                    seed=0,
                )
                module = StaticSet(_net(), ipc=ipc, init=str(path), plugins=[drupi], seed=0)
                t0 = time.perf_counter()
                _trainer(learn_iters if learn else 1).fit(module, datamodule=DM)
                add(source, variant, weight, module.synthetic_set(), time.perf_counter() - t0)
    return rows


def main() -> None:
    global DM, EXPERT_DIR
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=("sdc", "drupi", "both"), default="both")
    parser.add_argument("--students", type=int, default=3)
    parser.add_argument(
        "--eval-epochs", type=int, default=None, help="student epochs (default 150; 20 with --quick)"
    )
    parser.add_argument(
        "--iters-scale", type=float, default=1.0, help="multiply every distillation's iterations"
    )
    parser.add_argument("--sdc-weights", type=float, nargs="+", default=list(SDC_WEIGHTS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--out", default="benchmarks/results/plugins.json")
    args = parser.parse_args()
    quick = args.quick
    args.eval_epochs = args.eval_epochs or (20 if quick else 150)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))

    from lightning_eff.data import DigitsDataModule
    from lightning_eff.distill import train_experts

    scale = "" if args.iters_scale == 1 else f" x {args.iters_scale} (--iters-scale)"
    protocol = {
        "data": f"sklearn digits, {DATA['image_size']} px, split 1258/180/359 (seed 0)",
        "networks": f"ConvNet-{NET['depth']} width {NET['width']} (instance norm), DSA, init from real images (seed 0)",
        "sdc": "synthetic mode, 2 SDC networks trained 30 epochs (SGD 0.1); GM 60 iterations (official loops, "
        "image lr 0.1), MTT 120 iterations (5 experts x 15 epochs, N = 20 / 10, M = 2, image lr 100)"
        + scale
        + "; difficulty "
        "= mean per-sample gradient norm under 3 independent networks (30 epochs, SGD 0.1)",
        "drupi": "attention labels (avg-pooled last conv block, 32 values), IPC 4 + F vs IPC 6 without (equal "
        "bytes); learned F: 100 iterations of DRUPI gradient matching (F SGD 0.1 momentum 0.5), images fixed; "
        "DM images: 300 iterations" + scale,
        "evaluation": f"{args.students} fresh ConvNet-2 width 32 students per set (the distillation architecture: F's layer "
        "must match), SGD 0.01 momentum 0.9, "
        f"{args.eval_epochs} epochs, DSA, final test accuracy on the 359 test images; same student seeds for every set",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "environment": harness.environment("cuda" if torch.cuda.is_available() else "cpu"),
    }
    if quick:
        protocol["note"] = "--quick: tiny budgets, numbers are a smoke test only"
    print("Protocol")
    for k, v in protocol.items():
        print(f"  {k}: {v}")
    DM = DigitsDataModule(**DATA)
    DM.setup("fit")
    EXPERT_DIR = tempfile.mkdtemp()
    results = {"protocol": protocol}
    if args.part in ("sdc", "both"):
        train_experts(
            DM, _net(), num_experts=2 if quick else 5, epochs=15, lr=0.01, seed=0, save_dir=EXPERT_DIR
        )
        results["sdc"] = sdc_table(args, quick)
        print(
            "\n| method | IPC | SDC weight | test acc (mean +- std) | difficulty of the distilled samples |"
        )
        print("| --- | --- | --- | --- | --- |")
        for r in results["sdc"]:
            print(
                f"| {r['method']} | {r['ipc']} | {r['weight']:g} | {100 * r['acc_mean']:.1f} +- "
                f"{100 * r['acc_std']:.1f} | {r['difficulty']:.3f} |"
            )
    if args.part in ("drupi", "both"):
        results["drupi"] = drupi_table(args, quick)
        print("\n| images | IPC | F | weight | bytes | test acc (mean +- std) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in results["drupi"]:
            print(
                f"| {r['images']} | {r['ipc']} | {r['variant']} | {r['weight']:g} | {r['bytes']} | "
                f"{100 * r['acc_mean']:.1f} +- {100 * r['acc_std']:.1f} |"
            )
    harness.write_json(args.out, results, indent=2)
    print(f"\nraw results: {args.out}")


DM = None
EXPERT_DIR = None

if __name__ == "__main__":
    sys.exit(main())
