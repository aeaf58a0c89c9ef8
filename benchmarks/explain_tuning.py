"""Tuning runs of AutoGnothi's stage 2 on digits: one explainer setting per call, fidelity on validation images.

How the digits settings of ``benchmarks/explain.py`` are chosen (table in ``docs/methods/autognothi.md``).
Settings are scored on the **validation split** and reported by ``benchmarks/explain.py`` on the test split,
which tuning never reads. ``DigitsDataModule(seed=0)`` draws the 359 test images first (stratified), then 180
validation images from the rest (``val_fraction=0.1``); the remaining 1,258 images train the classifier, the
surrogate and the explainer. The validation images are used by no training step (Lightning's validation loop
only logs their loss; nothing is selected on it).

Protocol, printed with the result:

* the frozen classifier and the stage-1 surrogate are those of ``benchmarks/explain.py`` (``--backbone-from``:
  its ``classifier.ckpt`` or any AutoGnothi checkpoint; ``--surrogate``: its ``surrogate.ckpt``), so the tuned
  explainer explains the same value function the benchmark reports on; without ``--surrogate`` one is trained
  per side ratio (AdamW 2e-3, cosine, ``--surrogate-epochs``) and cached under ``--work``;
* the exact Shapley values of that surrogate for the first ``--images`` images of ``--split`` (all 2^16
  subsets) are cached per image (``--exact-cache``; ``--only-exact`` only fills it, and several processes
  fill it together), so a further setting costs only its training;
* stage 2 is trained with the given side ratio, paired masks per image, epochs, learning rate (AdamW, cosine),
  head width and depth, batch size; the line ``RESULT {...}`` gives its training time, validation loss and the
  median / mean Pearson r of phi against the exact values on the predicted class; it is appended to
  ``<work>/results.jsonl``.

Usage::

    python -m benchmarks.explain --stop-after surrogate          # classifier.ckpt, surrogate.ckpt
    python -m benchmarks.explain_tuning --side-ratio 1 --mask-samples 8 --epochs 45 --lr 2e-3
    python -m benchmarks.explain_tuning --side-ratio 1 --mask-samples 32 --epochs 15 --lr 1e-3

With 32 images the median moves by about 0.01 between seeds: use it to rank settings, and
``benchmarks/explain.py`` (100 test images) for the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks import explain as bench  # the same stage-1/stage-2 training, trainer and Pearson r


def main(argv: list[str] | None = None) -> dict:
    import lightning as L

    from lightning_eff.data import DigitsDataModule
    from lightning_eff.explain import AutoGnothi
    from lightning_eff.models import ImageClassifier

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--backbone-from",
        default="benchmarks/results/explain_cpu_runs/classifier.ckpt",
        help="the frozen classifier: an ImageClassifier checkpoint (explain.py's classifier.ckpt) or an "
        "AutoGnothi checkpoint (its backbone)",
    )
    p.add_argument(
        "--surrogate",
        default=None,
        help="a stage-1 checkpoint, e.g. explain.py's surrogate.ckpt (default: train and cache one)",
    )
    p.add_argument("--surrogate-epochs", type=int, default=40)
    p.add_argument("--side-ratio", type=int, default=1)
    p.add_argument("--mask-samples", type=int, default=8)
    p.add_argument("--epochs", type=int, default=45)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--hidden", type=int, default=256, help="explainer MLP width")
    p.add_argument("--head-layers", type=int, default=1, help="side blocks in the explainer head")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=32, help="images of --split scored")
    p.add_argument(
        "--split",
        choices=("val", "test"),
        default="val",
        help="images scored: val (choose settings here) or test (only to check a choice afterwards)",
    )
    p.add_argument("--exact-cache", default=None, help="folder of cached exact values (default <work>/exact)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="outputs/benchmarks/explain_tuning")
    p.add_argument(
        "--score-ckpt",
        default=None,
        help="score this stage-2 checkpoint (written by an earlier call) instead of training one; give the "
        "setting's flags too, so that the result line names it",
    )
    p.add_argument(
        "--only-exact",
        action="store_true",
        help="cache the exact values of the scored images and stop (run once before parallel settings)",
    )
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not os.path.isfile(args.backbone_from):
        raise SystemExit(
            f"--backbone-from {args.backbone_from!r} does not exist: run python -m benchmarks.explain first "
            "(it writes <out>_runs/classifier.ckpt; --stop-after surrogate is enough) or point to another "
            "ImageClassifier or AutoGnothi checkpoint."
        )
    if args.split == "test":
        warnings.warn(
            "explain_tuning.py --split test scores settings on the reported test images: use it only to check a "
            "choice made on --split val, never to make one.",
            stacklevel=1,
        )
    print("protocol: " + json.dumps(vars(args)), flush=True)
    state = torch.load(args.backbone_from, map_location="cpu", weights_only=False)["state_dict"]
    if any(k.startswith("surrogate_branch.") for k in state):
        vit = AutoGnothi.load_from_checkpoint(args.backbone_from, map_location="cpu").backbone
    else:
        vit = ImageClassifier.load_from_checkpoint(args.backbone_from, map_location="cpu").net
    dm = DigitsDataModule(image_size=8, channels=1, batch_size=args.batch_size, seed=0)
    dm.setup()

    def trainer(epochs: int, **kw):
        return bench.trainer(SimpleNamespace(quick=False, accelerator="cpu"), epochs, str(work), **kw)

    side = {"side_ratio": args.side_ratio, "attention_masking": "exclude", "player_grid": None}
    L.seed_everything(args.seed, verbose=False)
    s_path = args.surrogate or str(work / f"surrogate_ratio{args.side_ratio}_e{args.surrogate_epochs}.ckpt")
    if not os.path.isfile(s_path):
        surrogate = bench.make_surrogate(vit, args.surrogate_epochs, side)
        t = trainer(args.surrogate_epochs)
        start = time.perf_counter()
        t.fit(surrogate, dm)
        t.save_checkpoint(s_path)
        print(f"surrogate: {time.perf_counter() - start:.0f} s -> {s_path}", flush=True)
    model = bench.make_explainer(
        vit,
        s_path,
        args.epochs,
        side,
        hidden=args.hidden,
        mask_samples=args.mask_samples,
        lr=args.lr,
        head_layers=args.head_layers,
        weight_decay=args.weight_decay,
        num_heatmaps=0,
    )
    model.ensure_loaded()
    split = dm.val_set if args.split == "val" else dm.test_set
    x = split.tensors[0][: args.images]
    cache = Path(args.exact_cache or work / "exact")

    def exact_values():  # computed (with any other process filling the same cache) after the training
        return bench.exact_values(model, x, args.split, 8192, cache, lambda m: print(m, flush=True))

    if args.only_exact:
        return {"exact": list(exact_values().shape)}

    tag = (
        f"ratio{args.side_ratio}_m{args.mask_samples}_e{args.epochs}_lr{args.lr:g}_h{args.hidden}"
        f"_l{args.head_layers}_b{args.batch_size}_s{args.seed}"
    )
    ckpt = Path(args.score_ckpt) if args.score_ckpt else work / f"explainer_{tag}.ckpt"
    if args.score_ckpt:  # score a setting trained earlier (its training time and val loss are in its log)
        model = AutoGnothi.load_from_checkpoint(args.score_ckpt, map_location="cpu")
        train_s, val_loss = float("nan"), float("nan")
    else:
        t = trainer(args.epochs, check_val_every_n_epoch=args.epochs)
        start = time.perf_counter()
        t.fit(model, dm)
        train_s = time.perf_counter() - start
        val_loss = float(t.callback_metrics.get("explainer/val_loss", float("nan")))
        t.save_checkpoint(str(ckpt))  # the chosen setting's model can be reported as is (--explainer-ckpt)
    exact = exact_values()
    model.eval()
    with torch.no_grad():
        out = model(x)
    rs = [
        bench.pearson(out.phi[i][:, pred], exact[i][:, pred])
        for i, pred in enumerate(out.logits.argmax(-1).tolist())
    ]
    result = {
        **vars(args),
        "surrogate": s_path,
        "explainer_ckpt": str(ckpt),
        "train_s": round(train_s, 1),
        "val_loss": val_loss,
        "r_median": statistics.median(rs),
        "r_mean": statistics.fmean(rs),
    }
    print("RESULT " + json.dumps(result), flush=True)
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
