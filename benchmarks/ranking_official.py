"""DD-Ranking: ``lightning_eff.ranking.DDRanking`` side by side with the official ``ddranking`` 0.2.0 package,
both run on the same local-folder digits, timed in the same run (interleaved, medians).

    python -m benchmarks.ranking_official                       # CPU, about 10 min on 2 loaded cores
    python -m benchmarks.ranking_official --quick               # smoke run
    python -m benchmarks.ranking_official --ddranking-python /work/ddr-venv/bin/python

``ddranking`` 0.2.0 pins ``numpy<2``, so it lives in its own environment (``--ddranking-python``; see
docs/methods/ddranking.md) and runs in a subprocess of this script (``--official-worker``).

What can run. The package reads only CIFAR-10/100 (torchvision files), TinyImageNet (200 classes), ImageNet-1K
and the ImageNet subsets (ImageNette, ...) from disk (``ddranking/utils/data.py`` l. 55-177). The bundled digits
are written as PNG files in the ImageNette layout (1000 class folders in ImageNet order; the ten ImageNette
folders hold the ten digits, each other folder one blank image that the package filters out), 8 x 8 RGB, and
the same files in a plain 10-class tree for ``ImageFolderDataModule``; both sides normalise with the package's
ImageNet mean/std, so every student sees the same tensors. Of the package's three metrics only the hard-label
LRS (``LabelRobustScoreHard``) runs on such a folder, with one configuration entry added at run time
(``REAL_DATA_TRAINING_CONFIG["ImageNette-ConvNet-3"]``, which the package has only for CIFAR, TinyImageNet and
ImageNet). ``LabelRobustScoreSoft`` and ``AugmentationRobustScore`` stop in their constructors on any folder
dataset of the ImageNet-subset kind (they read ``dataset.targets``, which a ``torch.utils.data.Subset`` does not
have, ``soft_label.py`` l. 185 / ``aug_robust.py`` l. 187), and with tensor inputs their random-subset helper is
called without its ``class_map`` argument (``soft_label.py`` l. 461, ``aug_robust.py`` l. 386); the worker
tries both and records the error.

Protocol of both sides (the package's defaults where it has them): student ConvNet-3 (width 128, instance norm,
ReLU, average pooling), SGD momentum 0.9, weight decay 5e-4, batch 256, lr x0.1 at half of the epochs, the lr
grid 0.001-0.1 (5 lrs) for the set and for a random real subset of equal IPC redrawn per run, best test
accuracy over checkpoints every 10 epochs (the package's ``test_interval`` of the hard-label LRS), DSA on the
set's and the random subset's trainings, the full-data student retrained in every run (``eval_full_data=True``
/ ``full_per_run=True``; lr 0.01, same epochs, not augmented). Ours is also timed with its default, one
full-data student shared by the runs (``full_per_run=False``). Several sets: the package needs one
``compute_metrics`` per set (each retrains the random subsets and the full data); ours ranks them in one call
and shares those trainings. The sets are random real subsets (the timing does not depend on what the set is).
Randomness differs (the package seeds from the wall clock), so the accuracies agree only up to run-to-run noise.
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

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the package's normalisation of ImageNet-layout folders (data.py l. 132-133)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENETTE = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)  # ddranking/utils/data.py l. 15
LR_GRID = (0.001, 0.005, 0.01, 0.05, 0.1)  # hard_label.py l. 169
DSA_PARAMS = dict(flip=0.5, rotate=15.0, saturation=2.0, brightness=1.0, contrast=0.5, scale=1.2, crop=0.125, cutout=0.5)


# ---------------------------------------------------------------------------------------------
# the official side (runs in the ddranking environment)
# ---------------------------------------------------------------------------------------------
def official_worker(config_path: str) -> None:
    """Run ``ddranking`` 0.2.0's hard-label LRS on every set; write wall times and results as JSON."""
    cfg = json.loads(Path(config_path).read_text())
    import torch

    torch.set_num_threads(cfg["threads"])
    out: dict = {"python": sys.executable}
    t_import = time.perf_counter()
    import ddranking
    import ddranking.metrics.hard_label as hard_label
    from ddranking.metrics import LabelRobustScoreHard
    from ddranking.utils import REAL_DATA_TRAINING_CONFIG

    # LabelRobustScoreHard.compute_metrics appends every run's LRS twice (hard_label.py l. 384 and 388), so the
    # CSV it writes at the end (l. 409) has columns of unequal length and pandas raises after all trainings:
    # save the CSV with each LRS once. (Its mean and std are not changed by the duplicates.)
    original_save = hard_label.save_results

    def save_results(results, save_path):
        results = dict(results)
        if len(results.get("lrs", [])) == 2 * len(results.get("hard_label_recovery", [])):
            results["lrs"] = results["lrs"][::2]
        return original_save(results, save_path)

    hard_label.save_results = save_results
    out["patched"] = "hard_label.save_results: the duplicated LRS entries dropped before the CSV (l. 384/388/409)"

    out["import_s"] = time.perf_counter() - t_import
    out["ddranking_file"] = ddranking.__file__
    import numpy

    out["numpy"] = numpy.__version__
    epochs = cfg["epochs"]
    # the package has a full-data recipe only for CIFAR / TinyImageNet / ImageNet (train_and_eval.py l. 20-98)
    REAL_DATA_TRAINING_CONFIG["ImageNette-ConvNet-3"] = {
        "optimizer": "sgd", "lr_scheduler": "step", "weight_decay": 0.0005, "momentum": 0.9, "num_epochs": epochs,
        "batch_size": 256, "lr": 0.01, "step_size": epochs // 2, "gamma": 0.1,
    }
    work = Path(cfg["workdir"])
    sets = torch.load(cfg["sets"], weights_only=True)
    common = dict(
        dataset="ImageNette", real_data_path=cfg["root"], ipc=cfg["ipc"], model_name="ConvNet-3",
        num_eval=cfg["runs"], im_size=(8, 8), num_epochs=epochs, real_batch_size=256, syn_batch_size=256,
        num_workers=0, device="cpu",
    )
    t0 = time.perf_counter()
    metric = LabelRobustScoreHard(
        **common, data_aug_func="dsa", aug_params=dict(DSA_PARAMS), optimizer="sgd", lr_scheduler="step",
        step_size=epochs // 2, weight_decay=0.0005, momentum=0.9, save_path=str(work / "official" / "obj.csv"),
        random_data_format="tensor", random_data_path=str(work / "official" / "random"), eval_full_data=True,
    )
    out["init_s"] = time.perf_counter() - t0
    out["sets"] = {}
    for name, s in sets.items():
        t1 = time.perf_counter()
        res = metric.compute_metrics(image_tensor=s["images"], hard_labels=s["labels"])
        out["sets"][name] = {"seconds": time.perf_counter() - t1, "result": {k: float(v) for k, v in res.items()}}
    out["total_s"] = time.perf_counter() - t0
    if cfg.get("try_others"):
        from ddranking.metrics import AugmentationRobustScore, LabelRobustScoreSoft

        out["others"] = {}
        for cls, kw in (
            (LabelRobustScoreSoft, dict(soft_label_mode="M", soft_label_criterion="sce", data_aug_func="cutmix",
                                       aug_params={"beta": 1.0}, teacher_model_names=["ConvNet-3"],
                                       teacher_dir=str(work / "teachers"), random_data_format="tensor",
                                       step_size=epochs // 2)),
            (AugmentationRobustScore, dict(label_type="hard", data_aug_func="dsa", aug_params=dict(DSA_PARAMS),
                                           random_data_format="tensor")),
        ):
            args = dict(common, **kw, save_path=str(work / "official" / f"{cls.__name__}.csv"))
            if cls is AugmentationRobustScore:  # one batch size instead of real/syn (aug_robust.py l. 23-30)
                args["batch_size"] = args.pop("real_batch_size")
                args.pop("syn_batch_size")
            try:
                cls(**args)
                out["others"][cls.__name__] = "constructed"
            except Exception as err:  # noqa: BLE001 - recorded: why the package cannot run here
                out["others"][cls.__name__] = f"{type(err).__name__}: {err}"
    Path(cfg["result"]).write_text(json.dumps(out, indent=1))


# ---------------------------------------------------------------------------------------------
# data: the digits as a folder in the package's ImageNette layout and as a plain 10-class tree
# ---------------------------------------------------------------------------------------------
def write_folders(root: Path) -> tuple[Path, Path]:
    """``root/digits`` (10 classes; train/ and test/) and ``root/imagenette`` (the package's layout, linked)."""
    import numpy as np
    import torch
    from PIL import Image

    from lightning_eff.data import DigitsDataModule

    plain, layout = root / "digits", root / "imagenette"
    if (root / "done").is_file():
        return plain, layout
    src = DigitsDataModule(image_size=8, channels=3, normalize=False)
    src.setup("fit")
    splits = {"train": [(src.class_images(c), c) for c in range(10)]}
    xs, ys = zip(*[(x, y) for x, y in src.test_dataloader()])
    x, y = torch.cat(xs), torch.cat(ys)
    splits["test"] = [(x[y == c], c) for c in range(10)]
    for split, per_class in splits.items():
        for images, c in per_class:
            folder = plain / split / f"{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(images):
                arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{i:04d}.png")
    blank = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    for split, target in (("train", "train"), ("val", "test")):
        for k in range(1000):
            folder = layout / split / f"n{k:05d}"  # ImageFolder's sorted order = ImageNet class index
            if k in IMAGENETTE:
                folder.parent.mkdir(parents=True, exist_ok=True)
                folder.symlink_to((plain / target / f"{IMAGENETTE.index(k)}").resolve(), target_is_directory=True)
            else:
                folder.mkdir(parents=True, exist_ok=True)
                blank.save(folder / "blank.png")
    (root / "done").write_text("ok\n")
    return plain, layout


# ---------------------------------------------------------------------------------------------
# our side
# ---------------------------------------------------------------------------------------------
def ours(dm, sets: dict, args, full_per_run: bool) -> tuple[float, object]:
    from lightning_eff.distill import StudentProtocol
    from lightning_eff.models import ConvNet
    from lightning_eff.ranking import DDRanking

    ranking = DDRanking(
        net=ConvNet(3, 10, width=128, depth=3, image_size=8),
        protocol=StudentProtocol(
            epochs=args.epochs,
            lr=list(LR_GRID),
            eval_every=10,
            batch_size=256,
            use_soft_labels=False,
            dsa=True,
            cutmix=None,
            vectorize=False,
        ),
        num_eval=args.runs,
        metrics=["lrs"],
        full_epochs=args.epochs,
        full_lr=0.01,
        full_batch_size=256,
        full_per_run=full_per_run,
        seed=0,
        device="cpu",
        use_cache=False,
        progress=False,
    )
    t0 = time.perf_counter()
    report = ranking.rank(sets, dm)
    return time.perf_counter() - t0, report


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--official-worker":
        official_worker(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ddranking-python", default=os.environ.get("DDRANKING_PYTHON", "/work/ddr-venv/bin/python"))
    parser.add_argument("--runs", type=int, default=2, help="num_eval")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--sets", type=int, default=2, help="sets ranked (random real subsets)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds (package, ours per run, ours shared)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="data folders and package outputs (default: a temp dir)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="outputs/benchmarks/ranking_official.json")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.epochs, args.sets, args.repeats = 1, 10, 1, 1
    import torch

    torch.set_num_threads(args.threads)
    from lightning_eff.data import ImageFolderDataModule
    from lightning_eff.distill import SyntheticSet

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ddr_official_"))
    work.mkdir(parents=True, exist_ok=True)
    plain, layout = write_folders(work / "data")
    dm = ImageFolderDataModule(
        root=plain, image_size=8, train_dir="train", val_dir=None, test_dir="test", mean=IMAGENET_MEAN,
        std=IMAGENET_STD, channels=3,
    )
    dm.setup("fit")
    sets = {f"random_{k}": SyntheticSet.random_subset(dm, args.ipc, seed=1000 + k) for k in range(args.sets)}
    torch.save({n: {"images": s.images, "labels": s.labels} for n, s in sets.items()}, work / "sets.pt")
    print("# DD-Ranking (hard-label LRS): lightning_eff vs ddranking 0.2.0 on the same digits folder")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {args.threads}; protocol: digits 8 px RGB (PNG folders, ImageNet mean/std), IPC {args.ipc}, "
        f"{args.runs} runs, 5-lr grid, {args.epochs} epochs, checkpoints every 10, DSA, ConvNet-3 width 128, full "
        f"data {args.epochs} epochs lr 0.01 batch 256; {args.sets} set(s); {args.repeats} interleaved round(s)"
    )
    times: dict[str, list[float]] = {"ddranking": [], "ours_full_per_run": [], "ours_shared_full": []}
    official_runs, reports = [], {}
    for r in range(args.repeats):
        cfg = {
            "workdir": str(work), "root": str(layout), "sets": str(work / "sets.pt"), "ipc": args.ipc,
            "runs": args.runs, "epochs": args.epochs, "threads": args.threads, "result": str(work / f"official_{r}.json"),
            "try_others": r == 0,
        }
        (work / "official_config.json").write_text(json.dumps(cfg))
        t0 = time.perf_counter()
        proc = subprocess.run(
            [args.ddranking_python, str(Path(__file__).resolve()), "--official-worker", str(work / "official_config.json")],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )
        wall = time.perf_counter() - t0
        (work / f"official_{r}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"the ddranking worker failed (log: {work / f'official_{r}.log'}):\n{proc.stderr[-3000:]}")
        res = json.loads(Path(cfg["result"]).read_text())
        res["subprocess_wall_s"] = wall
        official_runs.append(res)
        times["ddranking"].append(res["total_s"])
        print(f"  round {r}: ddranking {res['total_s']:.1f} s (init {res['init_s']:.1f} s, process {wall:.1f} s)", flush=True)
        for key, per_run in (("ours_full_per_run", True), ("ours_shared_full", False)):
            secs, rep = ours(dm, sets, args, per_run)
            times[key].append(secs)
            reports[key] = rep
            print(f"  round {r}: {key} {secs:.1f} s ({rep.stats['trainings']} trainings)", flush=True)
        write_json(args, times, official_runs, reports)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("\n## wall time (medians)\n")
    print("| evaluator | trainings | seconds | vs ddranking |")
    print("| --- | ---: | ---: | ---: |")
    n_official = args.sets * args.runs * (2 * len(LR_GRID) + 1)
    print(f"| ddranking 0.2.0 (LabelRobustScoreHard, eval_full_data=True) | {n_official} | {med['ddranking']:.1f} | 1.00x |")
    for key in ("ours_full_per_run", "ours_shared_full"):
        print(
            f"| lightning_eff DDRanking ({'full_per_run=True' if key.endswith('per_run') else 'default, shared full data'}) "
            f"| {reports[key].stats['trainings']} | {med[key]:.1f} | {med['ddranking'] / med[key]:.2f}x |"
        )
    print("\n## scores (percent, as the package reports them; ours from the last round)\n")
    last = official_runs[-1]["sets"]
    for name in sets:
        o = last[name]["result"]
        m = reports["ours_full_per_run"][name]
        print(
            f"  {name}: ddranking HLR {o['hard_label_recovery_mean']:.2f} IOR {o['improvement_over_random_mean']:.2f} | "
            f"ours HLR {100 * m.mean('hlr'):.2f} IOR {100 * m.mean('ior'):.2f}"
        )
    if "others" in official_runs[0]:
        print("\nother ddranking metrics on this folder:")
        for k, v in official_runs[0]["others"].items():
            print(f"  {k}: {v}")
    write_json(args, times, official_runs, reports)
    print(f"\nraw numbers: {args.out}")


def write_json(args, times: dict, official_runs: list, reports: dict) -> None:
    """All raw numbers so far (written after every round, so an interrupted run keeps its rounds)."""
    import torch

    from benchmarks import (
        harness,  # not at the top: the ddranking worker runs this file in its own environment
    )

    n_official = args.sets * args.runs * (2 * len(LR_GRID) + 1)
    harness.write_json(
        args.out,
        {
                "args": vars(args),
                "rounds_done": len(official_runs),
                "seconds": times,
                "medians": {k: statistics.median(v) for k, v in times.items() if v},
                "trainings": {"ddranking": n_official, **{k: r.stats["trainings"] for k, r in reports.items()}},
                "ddranking": official_runs,
                "ours": {k: r.to_dict() for k, r in reports.items()},
                "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
                "load_average_at_end": os.getloadavg(),
                "environment": harness.environment(),
        },
        indent=1,
        default=str,
    )


if __name__ == "__main__":
    main()
