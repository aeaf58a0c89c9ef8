"""The README gallery: the pictures the demo and notebooks produce, regenerated at tiny budgets.

    python -m benchmarks.gallery                       # all sections, PNGs to docs/gallery/ (a few minutes on 2 CPU cores)
    python -m benchmarks.gallery --only dart,drive     # some sections (the others' captions are kept)
    python -m benchmarks.gallery --out /tmp/gallery    # somewhere else

Everything runs on the bundled scikit-learn digits, tiny models built from configs (random initialisation,
trained here for a few epochs) and the offline highway-env scenes; nothing is downloaded. The budgets are far
below the methods' real protocols: the pictures show what each component draws, not how well it can do (the
measured comparisons are the other scripts in ``benchmarks/``). Sections (names for ``--only``):

* ``distill``: NCFM distils the digits at IPC 10 (8x8 px, initialised from random real images, a few hundred
  iterations); the distilled grid beside the random real grid it started from (``SyntheticSet.to_image_grid``),
  and a DD-Ranking table (LRS / ARS, one run per score, short student training) as markdown.
* ``dart``: a tiny vision-language model (``TinyVLM``: every pixel is one image token of a 4-layer Llama decoder)
  trained for a few epochs; which of the 64 image tokens DART, Random and FastV keep at layer 2 (the plot of
  ``notebooks/dart.ipynb``), with each selector's test accuracy.
* ``shapley``: AutoGnothi on a tiny ViT with 16 players (2x2-pixel patches): the explainer's Shapley values in one
  forward pass over the exact Shapley values of its surrogate (all 2^16 subsets), drawn with
  ``lightning_eff.explain.plots.shapley_heatmap_figure``.
* ``drive``: Think2Drive's bird's-eye-view observation along one episode of the merge scene, driven by
  highway-env's IDM/MOBIL driver and by a random policy (no learned agent: training one is ``benchmarks/rl.py``),
  coloured with ``lightning_eff.rl.envs.colorize`` as in the model's rollout strips.

Every file is written atomically (temp file + rename). ``<out>/gallery.json`` keeps each section's captions,
settings, numbers and time; ``<out>/gallery.md`` shows the pictures with their captions.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import harness

SECTIONS = ("distill", "dart", "shapley", "drive")
FORMAT_VERSION = 1
#: the pictures are meant for a README: larger files are downscaled until they fit
MAX_PNG_BYTES = 300_000


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------
def _write_png(image, path: Path) -> Path:
    """Save a PIL image as PNG atomically, halving its size until it is under ``MAX_PNG_BYTES``."""
    from lightning_eff.utils.io import atomic_write_bytes

    while True:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= MAX_PNG_BYTES or min(image.size) < 64:
            return atomic_write_bytes(path, buffer.getvalue())
        image = image.resize((image.width // 2, image.height // 2))


def _figure_png(fig, path: Path, dpi: int = 100) -> Path:
    """A matplotlib figure as a PNG (through ``_write_png``), then closed."""
    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    buffer.seek(0)
    return _write_png(Image.open(buffer).convert("RGB"), path)


def _write_text(path: Path, text: str) -> Path:
    from lightning_eff.utils.io import atomic_write_bytes

    return atomic_write_bytes(path, text.encode())


def _readable(path: Path) -> None:
    """The atomic writes create 0600 files (``mkstemp``): give the published files the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _trainer(steps: int | None = None, epochs: int | None = None, **kw: Any):
    return harness.quiet_trainer("cpu", max_steps=-1 if steps is None else steps, max_epochs=epochs, **kw)


# ---------------------------------------------------------------------------------------------------------------
# sections: each returns {"images": {file: caption}, "files": {...}, "settings": {...}, "numbers": {...}}
# ---------------------------------------------------------------------------------------------------------------
def section_distill(args: argparse.Namespace, out: Path, work: Path) -> dict[str, Any]:
    from lightning_eff.data import DigitsDataModule
    from lightning_eff.distill import NCFM, SyntheticSet
    from lightning_eff.models import ConvNet
    from lightning_eff.ranking import DEFAULT_PROTOCOL, DDRanking

    dm = DigitsDataModule(image_size=8)
    dm.setup("fit")

    def net() -> ConvNet:
        return ConvNet(in_channels=1, num_classes=10, width=32, depth=2, image_size=8)

    settings = dict(method="NCFM", ipc=args.ipc, factor=1, iterations=args.ncfm_iters, image_size=8, init="real",
                    num_freqs=256, num_feature_nets=2, pretrain_epochs=3, net="ConvNet-2 width 32", seed=args.seed)
    ncfm = NCFM(net(), ipc=args.ipc, factor=1, batch_real=64, num_freqs=256, num_feature_nets=2, pretrain_epochs=3,
                save_dir=str(work / "ncfm"), seed=args.seed)
    print(f"[distill] NCFM on digits, IPC {args.ipc}, {args.ncfm_iters} iterations", flush=True)
    _trainer(steps=args.ncfm_iters, default_root_dir=str(work)).fit(ncfm, datamodule=dm)
    ncfm_set = ncfm.synthetic_set()
    # NCFM starts from SyntheticSet.from_real(dm, ipc, seed): the random real set of the same seed is its start
    real = SyntheticSet.random_subset(dm, args.ipc, seed=args.seed)
    ncfm_set.to_image_grid(out / "distill_ncfm_digits_ipc10.png")
    real.to_image_grid(out / "distill_random_real_digits_ipc10.png")
    change = float((ncfm_set.images - real.images).abs().mean() / real.images.abs().mean())
    images = {
        "distill_ncfm_digits_ipc10.png": (
            f"NCFM-distilled digits, IPC {args.ipc} (one row per class, 8x8 px shown at 4x): "
            f"{args.ncfm_iters} NCFM iterations from the random real images beside it, 2 ConvNet feature networks "
            f"pretrained 3 epochs (pixels moved by {100 * change:.0f}% of their mean magnitude); a tiny budget, far "
            f"below the method's published protocol."
        ),
        "distill_random_real_digits_ipc10.png": (
            f"Random real digits, IPC {args.ipc} (seed {args.seed}): the same-size baseline, and NCFM's starting point."
        ),
    }
    files: dict[str, str] = {}
    numbers: dict[str, Any] = {"mean_abs_change_vs_init": round(change, 4)}
    if not args.no_ranking:
        print("[distill] DD-Ranking of the NCFM set", flush=True)
        rank_settings = dict(num_eval=2, epochs=50, lrs=[0.01, 0.05], eval_every=10, augmentation="dsa",
                             metrics=["lrs", "ars"], full_epochs=20)
        r = rank_settings
        protocol = DEFAULT_PROTOCOL.replace(epochs=r["epochs"], lr=r["lrs"], eval_every=r["eval_every"], dsa=True,
                                            cutmix=None)  # augmentation="dsa"
        ranking = DDRanking(net=net(), protocol=protocol, num_eval=r["num_eval"], metrics=r["metrics"],
                            full_epochs=r["full_epochs"], device="cpu", progress=False, use_cache=False, seed=args.seed)
        report = ranking.rank({f"NCFM ({args.ncfm_iters} it.)": ncfm_set}, dm)
        caption = (
            f"DD-Ranking of the NCFM set above (digits, IPC {args.ipc}): LRS / ARS against random real images of the "
            f"same size, {rank_settings['num_eval']} runs per score (mean +- std), ConvNet-2 students trained "
            f"{rank_settings['epochs']} epochs over the lr grid {rank_settings['lrs']}, full-data reference "
            f"{rank_settings['full_epochs']} epochs. Tiny budgets: the numbers illustrate the table, they do not rank "
            f"the method (see `benchmarks/ranking.py`)."
        )
        _write_text(out / "distill_dd_ranking.md", f"# DD-Ranking (gallery)\n\n{caption}\n\n{report.table()}\n")
        files["distill_dd_ranking.md"] = caption
        numbers["dd_ranking"] = {m: report.results[0].metrics[m]["mean"] for m in report.results[0].metrics}
        settings["dd_ranking"] = rank_settings
        numbers["dd_ranking_table"] = report.table()
    return {"images": images, "files": files, "settings": settings, "numbers": numbers}


def section_dart(args: argparse.Namespace, out: Path, work: Path) -> dict[str, Any]:
    import lightning as L
    import matplotlib.pyplot as plt

    from lightning_eff.data import DigitsDataModule
    from lightning_eff.tokens import DART, FastV, Random, TinyVLM, TokenCompression, dart_num_kept

    L.seed_everything(args.seed, verbose=False)
    dm = DigitsDataModule(image_size=8, batch_size=64)
    # eager attention: FastV needs attention maps
    model = TinyVLM(image_size=8, patch_size=1, attn_implementation="eager",
                    decoder={"hidden_size": 32, "intermediate_size": 64})
    print(f"[dart] TinyVLM on digits, {args.vlm_epochs} epochs", flush=True)
    _trainer(epochs=args.vlm_epochs, default_root_dir=str(work)).fit(model, dm)
    budget, layer = 14, 2
    selectors = [("DART", DART(num_kept=budget, num_image_pivots=2, num_text_pivots=2)),
                 ("Random", Random(num_kept=budget, seed=args.seed)),
                 ("FastV", FastV(num_kept=budget))]
    accuracy = {"none": float(_trainer().test(model, dm, verbose=False)[0]["test/acc"])}
    for name, sel in selectors:
        res = _trainer(callbacks=[TokenCompression(sel, layer=layer)]).test(model, dm, verbose=False)[0]
        accuracy[name] = float(res["test/acc"])

    # the kept-token maps of notebooks/dart.ipynb
    x, _ = next(iter(dm.test_dataloader()))
    x = x[: args.dart_images]
    start, n = model.token_span
    cols = [("image", None), *selectors]
    fig, axes = plt.subplots(len(x), len(cols), figsize=(1.5 * len(cols), 1.5 * len(x)), squeeze=False)
    kept_counts: dict[str, list[int]] = {}
    for col, (name, sel) in enumerate(cols):
        if sel is None:
            maps = x[:, 0]
        else:
            cb = TokenCompression(sel, layer=layer)
            with cb.attached_to(model), torch.no_grad():
                model.eval()(x)
            keep = cb.pruner.last_keep_index
            maps = torch.zeros(len(x), n)
            for b in range(len(x)):
                k = keep[b][(keep[b] >= start) & (keep[b] < start + n)] - start
                maps[b, k] = 1.0
            kept_counts[name] = maps.sum(1).int().tolist()
            maps = maps.view(-1, 8, 8)
        for row in range(len(x)):
            axes[row, col].imshow(maps[row], cmap="gray")
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
        title = name if sel is None else f"{name}\nacc {100 * accuracy[name]:.0f}%"
        axes[0, col].set_title(title, fontsize=8)
    axes[0, 0].set_title(f"digit (no pruning:\nacc {100 * accuracy['none']:.0f}%)", fontsize=8)
    fig.suptitle(f"tokens kept at layer {layer} (white), budget {budget}", fontsize=8)
    fig.tight_layout()
    _figure_png(fig, out / "dart_kept_tokens.png")
    caption = (
        f"Kept-token maps at layer {layer} of a 4-layer TinyVLM (every pixel of an 8x8 digit is one of {n} image "
        f"tokens; trained {args.vlm_epochs} epochs here): white = kept by DART (2 image + 2 text pivots, budget "
        f"{dart_num_kept(budget, 2, 2)} tokens), Random and FastV at the "
        f"same budget. Test accuracy on the real digits: no pruning {100 * accuracy['none']:.0f}%, "
        + ", ".join(f"{name} {100 * accuracy[name]:.0f}%" for name, _ in selectors)
        + ". Tiny model and training budget."
    )
    return {
        "images": {"dart_kept_tokens.png": caption},
        "files": {},
        "settings": dict(model="TinyVLM hidden 32, 4 layers, eager attention", epochs=args.vlm_epochs, layer=layer,
                         budget=budget, images=len(x), seed=args.seed),
        "numbers": {"test_accuracy": accuracy, "image_tokens": n, "image_tokens_kept": kept_counts},
    }


def section_shapley(args: argparse.Namespace, out: Path, work: Path) -> dict[str, Any]:
    import lightning as L
    from PIL import Image

    from lightning_eff.data import DigitsDataModule
    from lightning_eff.explain import AutoGnothi, TinyViT, exact_shapley
    from lightning_eff.explain.plots import shapley_heatmap_figure
    from lightning_eff.models import ImageClassifier

    L.seed_everything(args.seed, verbose=False)
    epochs = dict(zip(("classifier", "surrogate", "explainer"), args.shapley_epochs))
    dm = DigitsDataModule(image_size=8, channels=1, batch_size=64)
    vit = TinyViT(image_size=8, patch_size=2, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10,
                  in_channels=1)
    classifier = ImageClassifier(vit, optimizer=functools.partial(torch.optim.AdamW, lr=2e-3, weight_decay=0.05),
                                 label_smoothing=0.1)
    print(f"[shapley] TinyViT classifier {epochs['classifier']} epochs", flush=True)
    trainer = _trainer(epochs=epochs["classifier"], default_root_dir=str(work))
    trainer.fit(classifier, dm)
    acc = float(trainer.test(classifier, dm, verbose=False)[0]["test/acc"])
    print(f"[shapley] surrogate {epochs['surrogate']} epochs", flush=True)
    surrogate = AutoGnothi(vit, stage="surrogate", side_ratio=4, optimizer=functools.partial(torch.optim.AdamW, lr=2e-3))
    trainer = _trainer(epochs=epochs["surrogate"], default_root_dir=str(work))
    trainer.fit(surrogate, dm)
    ckpt = str(work / "autognothi_surrogate.ckpt")
    trainer.save_checkpoint(ckpt)
    print(f"[shapley] explainer {epochs['explainer']} epochs", flush=True)
    model = AutoGnothi(vit, stage="explainer", surrogate_checkpoint=ckpt, side_ratio=4, explainer_hidden_dim=256,
                       num_mask_samples=32, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    _trainer(epochs=epochs["explainer"], default_root_dir=str(work), num_sanity_val_steps=0,
             limit_val_batches=0).fit(model, dm)

    model.eval()
    dm.setup("test")
    x = dm.test_set.tensors[0][: args.shapley_images]
    with torch.no_grad():
        explained = model(x)
        pred = explained.logits.argmax(-1)
        exact = torch.stack([exact_shapley(model.value_function(x[i : i + 1]), model.num_players)
                             for i in range(len(x))])
    pearson = [float(torch.corrcoef(torch.stack([explained.phi[i, :, c], exact[i, :, c]]))[0, 1])
               for i, c in enumerate(pred.tolist())]
    names = list(dm.class_names)
    grid = model.layout.grid
    top = shapley_heatmap_figure(x, explained.phi, grid, pred, names,
                                 title="AutoGnothi: phi of the predicted class, one forward pass (red +, blue -)")
    bottom = shapley_heatmap_figure(x, exact, grid, pred, names,
                                    title="exact Shapley values of the same surrogate (all 2^16 subsets)")
    panels = []
    for fig in (top, bottom):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        import matplotlib.pyplot as plt

        plt.close(fig)
        buffer.seek(0)
        panels.append(Image.open(buffer).convert("RGB"))
    canvas = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
    canvas.paste(panels[0], (0, 0))
    canvas.paste(panels[1], (0, panels[0].height))
    _write_png(canvas, out / "autognothi_shapley.png")
    caption = (
        f"AutoGnothi Shapley heatmaps on digits, 16 players (2x2-pixel patches) of a tiny 4-layer ViT "
        f"(test accuracy {100 * acc:.0f}%): top, the explainer's phi for the predicted class in one forward pass; "
        f"bottom, the exact Shapley values of its surrogate over all 65,536 subsets (Pearson r "
        f"{min(pearson):.2f}-{max(pearson):.2f} per image). Tiny training budget: classifier / surrogate / "
        f"explainer {epochs['classifier']} / {epochs['surrogate']} / {epochs['explainer']} epochs."
    )
    return {
        "images": {"autognothi_shapley.png": caption},
        "files": {},
        "settings": dict(backbone="TinyViT patch 2, 4 layers, hidden 64", epochs=epochs, side_ratio=4,
                         explainer_hidden_dim=256, images=len(x), seed=args.seed),
        "numbers": {"classifier_test_accuracy": acc, "pearson_r_vs_exact": [round(p, 4) for p in pearson]},
    }


def section_drive(args: argparse.Namespace, out: Path, work: Path) -> dict[str, Any]:
    from PIL import Image, ImageDraw

    from lightning_eff.rl.envs import HighwayBEVEnv, colorize
    from lightning_eff.rl.envs.base import EVENT_KINDS, INFRACTION_KINDS
    from lightning_eff.rl.policies import IDMPolicy, RandomPolicy, run_episode

    scenario, seed, frames_shown = "merge", 2**31 + args.seed, 10
    env = HighwayBEVEnv(scenario, bev_size=64, resolution=1.0)
    channels = tuple(env.bev_channels)
    rows, records = [], {}
    for name, policy in (("IDM/MOBIL driver", IDMPolicy()), ("random policy", RandomPolicy(seed=args.seed))):
        print(f"[drive] {name} on {scenario}", flush=True)
        rec = run_episode(env, policy, seed=seed, record_frames=True)
        frames = rec.pop("frames")
        records[name] = {k: rec[k] for k in ("length", "route_completion", "driving_score", "collision")}
        # the strip of Think2Drive._save_rollout_strip: evenly spaced frames, coloured, 2 px white gaps
        idx = np.linspace(0, len(frames) - 1, min(frames_shown, len(frames))).round().astype(int)
        tiles = [colorize(frames[i], channels) for i in idx]
        pad = np.full((tiles[0].shape[0], 2, 3), 255, np.uint8)
        strip = np.concatenate([p for t in tiles for p in (t, pad)][:-1], axis=1)
        strip = strip.repeat(2, 0).repeat(2, 1)
        ended = [k for k in (*INFRACTION_KINDS, *EVENT_KINDS) if rec.get(k)]
        records[name]["ended_by"] = ended
        label = (f"{name}: {rec['length']} steps of 0.2 s (frames {', '.join(map(str, idx))} shown), route "
                 f"completion {rec['route_completion']:.2f}, driving score {rec['driving_score']:.2f}; "
                 f"ended: {', '.join(ended) or 'time limit'}")
        rows.append((label, strip))
    width = max(s.shape[1] for _, s in rows)
    canvas = Image.new("RGB", (width, sum(s.shape[0] + 18 for _, s in rows)), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for label, strip in rows:
        draw.text((2, y + 3), label, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(strip), (0, y + 18))
        y += strip.shape[0] + 18
    _write_png(canvas, out / "think2drive_bev_rollout.png")
    caption = (
        f"Think2Drive's bird's-eye-view observation (64x64 px at 1 m, ego red and facing up, other vehicles green "
        f"fading with age, route blue) along one held-out episode of the highway-env {scenario} scene: top, "
        f"highway-env's IDM/MOBIL reference driver; bottom, a random policy. Not a learned agent: a trained "
        f"Think2Drive draws the same strip (`benchmarks/rl.py`)."
    )
    return {
        "images": {"think2drive_bev_rollout.png": caption},
        "files": {},
        "settings": dict(scenario=scenario, seed=seed, bev_size=64, resolution=1.0, frames_shown=frames_shown),
        "numbers": {"episodes": records},
    }


RUNNERS = {"distill": section_distill, "dart": section_dart, "shapley": section_shapley, "drive": section_drive}


# ---------------------------------------------------------------------------------------------------------------
# the index files
# ---------------------------------------------------------------------------------------------------------------
def _markdown(record: dict[str, Any]) -> str:
    lines = [
        "# Gallery",
        "",
        "Regenerate with `python -m benchmarks.gallery` (CPU; about "
        f"{sum(s['seconds'] for s in record['sections'].values()) / 60:.0f} min in the last run, "
        f"{record['protocol']['threads']} torch thread per process). Budgets are tiny: the pictures show what each "
        "component draws, not its best result.",
        "",
    ]
    for name in SECTIONS:
        section = record["sections"].get(name)
        if section is None:
            continue
        for file, caption in section["images"].items():
            lines += [f"![{name}]({file})", "", caption, ""]
        for file, caption in section["files"].items():
            lines += [f"[{file}]({file}): {caption}", ""]
        lines += [f"_{name}: {section['seconds']:.0f} s_", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/gallery", help="folder of the PNGs and index files")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--ipc", type=int, default=10, help="distill: images per class")
    parser.add_argument("--ncfm-iters", type=int, default=500, help="distill: NCFM iterations")
    parser.add_argument("--no-ranking", action="store_true", help="distill: skip the DD-Ranking table")
    parser.add_argument("--vlm-epochs", type=int, default=12, help="dart: TinyVLM training epochs")
    parser.add_argument("--dart-images", type=int, default=4, help="dart: digits shown")
    parser.add_argument("--shapley-epochs", type=int, nargs=3, default=[10, 5, 5], metavar=("CLS", "SUR", "EXP"),
                        help="shapley: classifier, surrogate and explainer epochs")
    parser.add_argument("--shapley-images", type=int, default=6, help="shapley: digits explained")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown or not only:
        parser.error(f"--only: unknown section(s) {unknown} (choose from {', '.join(SECTIONS)})")
    for name in ("ipc", "ncfm_iters", "vlm_epochs", "dart_images", "shapley_images", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.shapley_epochs) < 1:
        parser.error(f"--shapley-epochs must all be >= 1, got {args.shapley_epochs}")

    import matplotlib

    matplotlib.use("Agg")
    import logging
    import warnings

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    protocol = {**harness.environment("cpu"), "threads": args.threads, "args": vars(args)}
    print(f"gallery: sections {only} -> {out}/  (torch {torch.__version__}, {args.threads} thread(s))", flush=True)

    index = out / "gallery.json"
    record: dict[str, Any] = {"format_version": FORMAT_VERSION, "sections": {}}
    if index.is_file():
        try:
            old = json.loads(index.read_text())
            if old.get("format_version") == FORMAT_VERSION:
                record["sections"] = {k: v for k, v in old["sections"].items() if k in SECTIONS}
        except (ValueError, KeyError, AttributeError):
            print(f"gallery: ignoring unreadable {index}", flush=True)
    record["protocol"] = protocol
    total = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lightning_eff_gallery_") as tmp:
        for name in only:
            start = time.perf_counter()
            section = RUNNERS[name](args, out, Path(tmp) / name)
            section["seconds"] = round(time.perf_counter() - start, 1)
            record["sections"][name] = section
            for file, caption in {**section["images"], **section["files"]}.items():
                _readable(out / file)
                size = (out / file).stat().st_size
                print(f"[{name}] {out / file} ({size / 1024:.0f} KB): {caption}", flush=True)
            print(f"[{name}] {section['seconds']:.0f} s", flush=True)
            _write_text(index, json.dumps(record, indent=2, default=str) + "\n")
            _readable(index)
    _write_text(out / "gallery.md", _markdown(record))
    _readable(out / "gallery.md")
    print(f"gallery: done in {time.perf_counter() - total:.0f} s; index {out / 'gallery.md'}", flush=True)
    return record


if __name__ == "__main__":
    main()
