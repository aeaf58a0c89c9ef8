"""Speed of the distillation evaluation protocol: students trained together vs one after the other.

``lightning_eff.distill.evaluate_synthetic`` trains fresh students on a synthetic set and tests them on
the real test split. Three ways to run the same students (the tests check they agree to 2e-5):

* ``loop`` (``vectorize=False``): one student after the other with ``torch.optim.SGD`` — the way the
  official DC/DSA/DM/MTT code evaluates, minus its DataLoader overhead (the baseline);
* ``vmap`` (``vectorize="vmap"``): stacked parameters, ``torch.func.vmap(functional_call)``, a
  per-student-lr SGD (any network);
* ``stacked`` (``vectorize=True``, the default on accelerators for a ConvNet): the same step with the
  students' channels side by side, grouped convs and fused group norms, no vmap.

Protocol per setting: the random-real set of ``ipc`` images per class from the bundled digits
(``DigitsDataModule``), default student ConvNet (width 128, instance norm, depth 3 at 16/32 px), SGD
lr 0.01 (or the DD-Ranking grid 0.001..0.1 repeated), momentum 0.9, wd 5e-4, batch 256, lr x0.1 at
half, DSA (per-sample parameters), test on the 359 digits test images. One short untimed warm-up of
each mode, then ``repeats`` interleaved timed runs (loop, vmap, stacked, loop, ...); medians and the
speed-ups over the loop are reported, with the final accuracies (mean +- std over students).

Usage::

    python -m benchmarks.distill_eval --device cuda                  # GPU: full protocol (300 epochs)
    python -m benchmarks.distill_eval --device cpu --epochs 10       # CPU: reduced epochs
    python -m benchmarks.distill_eval --quick                        # smoke run (about 1 min on CPU)
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks import harness
from lightning_eff.data import DigitsDataModule
from lightning_eff.distill.augment import DSA
from lightning_eff.distill.evaluate import evaluate_synthetic
from lightning_eff.distill.synthetic import SyntheticSet

GRID = [0.001, 0.005, 0.01, 0.05, 0.1]


def settings(args) -> list[dict]:
    base = [
        {"name": "digits 16px IPC10, 5 students", "size": 16, "channels": 1, "ipc": 10, "students": 5, "grid": False},
    ]
    if args.quick or (args.device == "cpu" and not args.all_settings):
        return base
    return base + [
        {"name": "digits 16px IPC10, lr grid 5 x 5 = 25 students", "size": 16, "channels": 1, "ipc": 10,
         "students": 25, "grid": True},
        {"name": "digits 32px RGB IPC50 (CIFAR-sized), 5 students", "size": 32, "channels": 3, "ipc": 50,
         "students": 5, "grid": False},
    ]


MODES = {"loop": False, "vmap": "vmap", "stacked": True}


def run(setting: dict, args, mode: str, epochs: int | None = None):
    dm = DigitsDataModule(image_size=setting["size"], channels=setting["channels"])
    dm.setup()
    synset = SyntheticSet.random_subset(dm, setting["ipc"], seed=0)
    lr = (GRID * (setting["students"] // len(GRID))) if setting["grid"] else 0.01
    return harness.timed(
        lambda: evaluate_synthetic(synset, dm, num_students=setting["students"], epochs=epochs or args.epochs, lr=lr,
                                   dsa=DSA() if not args.no_dsa else None, seed=0, device=args.device,
                                   vectorize=MODES[mode]),
        args.device,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=None, help="default 300 (GPU) / 10 (CPU) / 3 (--quick)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--modes", default="loop,vmap,stacked", help="comma-separated subset of loop,vmap,stacked")
    parser.add_argument("--no-dsa", action="store_true")
    parser.add_argument("--all-settings", action="store_true", help="on CPU too: the lr-grid and 32px settings")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="outputs/benchmarks/distill_eval.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    if "loop" not in modes or any(m not in MODES for m in modes):
        parser.error(f"--modes must include loop (the baseline) and name only {list(MODES)}")
    if args.epochs is None:
        args.epochs = 3 if args.quick else (300 if args.device != "cpu" else 10)
    if args.quick:
        args.repeats = 1
    env = harness.environment(args.device)
    print("# evaluate_synthetic: students trained together (vmap, stacked) vs one after the other (loop)")
    print(harness.environment_line(env))
    print(f"protocol: epochs {args.epochs}, batch 256, SGD momentum 0.9 wd 5e-4, lr x0.1 at half, "
          f"DSA {'off' if args.no_dsa else 'on (per-sample)'}, default ConvNet width 128; a 2-epoch warm-up of each "
          f"mode, then {args.repeats} interleaved timed runs ({', '.join(modes)}, ...), medians")
    rows, raw = [], []
    for setting in settings(args):
        for mode in modes:
            run(setting, args, mode, epochs=2)  # warm-up (CUDA context, cuDNN plans, caches)
        times: dict[str, list[float]] = {m: [] for m in modes}
        results = {}
        for _ in range(args.repeats):
            for mode in modes:
                t, res = run(setting, args, mode)
                times[mode].append(t)
                results[mode] = res
                print(f"  {setting['name']}: {mode} {t:.2f} s", flush=True)
        med = {m: statistics.median(times[m]) for m in modes}
        cells = []
        for m in modes:
            r = results[m]
            diff = max(abs(a - b) for a, b in zip(r.accuracies, results["loop"].accuracies))
            speed = "" if m == "loop" else f" ({med['loop'] / med[m]:.2f}x)"
            cells.append(f"{med[m]:.2f}{speed}")
            cells.append(f"{100 * r.mean:.1f} +- {100 * r.std:.1f}" + ("" if m == "loop" else f" (d {100 * diff:.2f})"))
        rows.append(f"| {setting['name']} | " + " | ".join(cells) + " |")
        raw.append({"setting": setting, "seconds": times, "accuracies": {m: results[m].accuracies for m in modes},
                    "protocol": results[modes[-1]].protocol})
    print()
    header = " | ".join(f"{m} s (speed-up) | {m} acc % (max diff, pt)" for m in modes)
    print(f"| setting | {header} |")
    print("| --- |" + " --- |" * (2 * len(modes)))
    print("\n".join(rows))
    harness.write_json(args.out, {"args": vars(args), "environment": env, "results": raw}, indent=1)


if __name__ == "__main__":
    main()
