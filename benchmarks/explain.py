"""Benchmark of AutoGnothi (``lightning_eff.explain.AutoGnothi``) on digits with 16 Shapley players.

Protocol (every setting is printed at the start of a run):

0. **Setup.** A tiny torchvision ViT (``TinyViT``: 8x8 grey digits, 2x2-pixel patches = 16 tokens = 16 players,
   4 layers, width 64, 4 heads) is trained on the bundled digits, then frozen. AutoGnothi stage 1 (surrogate
   side branch, width 64 = side ratio 1: the paper's ratio 8 would leave 8 channels for this 64-wide ViT, its
   ViT-B/16 side branches are 96 wide) and stage 2 (explainer side branch + head) are trained with the Lightning Trainer.
   ``--classifier-ckpt`` / ``--surrogate-ckpt`` / ``--explainer-ckpt`` reuse earlier runs instead.
1. **Fidelity.** For each of the first ``--images`` test images, the ground truth is ``exact_shapley`` of the
   surrogate's value function ``v(m)`` (class probabilities with the removed players excluded from attention;
   all 2^16 = 65,536 subsets). Compared on the predicted class (and on all 10 classes): AutoGnothi's ``phi``
   (one forward pass; ``--players 4`` uses a 2x2 grid of players instead), KernelSHAP from the ``shap`` package (``KernelExplainer``, ``--kernel-samples`` = 512
   evaluations of the same ``v``), our own paired-sampling ``kernel_shap`` (512 evaluations). Pearson r and MSE
   per image (medians), the efficiency gap ``|sum phi - (v(1) - v(0))|``, insertion/deletion AUC of ``v`` for
   the predicted class against a random order (and against the exact values, the best a ranking can do).
2. **Speed.** Time to explain one image: AutoGnothi (a batch of one) against shap's KernelExplainer and our
   kernel_shap at 512 evaluations, interleaved image by image (A, B, C, A, B, C, ...), medians and ratios;
   AutoGnothi also per image in one batch of all ``--images`` (KernelSHAP batches its evaluations of one image,
   so both run batched model passes). Then our kernel_shap at ``--kernel-budgets`` evaluations per image: the
   smallest budget whose median r reaches AutoGnothi's gives the speed-up at equal correlation, one image at a
   time. Like for like with AutoGnothi batched over the images: KernelSHAP with all images' evaluations in one
   batched pass (same masks per image, so the same estimates), at that budget and at ``--kernel-samples``, in
   ``--batched-repeats`` interleaved rounds with AutoGnothi's batch (``batched_kernel_shap`` in the JSON).
3. **Cost.** Inference of the final model (logits + phi, one pass) against the plain classifier, batch 256,
   ABAB-interleaved, median and ratio. Training memory of one explainer step: AutoGnothi's side branch (frozen
   backbone run without autograd) against fine-tuning a full copy of the backbone as the explainer (ViT-Shapley
   style, same head and loss): trainable parameters, bytes of tensors autograd saves for backward, parameter +
   gradient + Adam state bytes, and on CUDA the peak allocated memory of the step. The surrogate targets
   (identical for both) are computed beforehand and are not part of the step.
4. **Scale check** (``--vit-b``, default on CUDA): the same cost measurements with a random-initialised
   torchvision ViT-B/16 (224 px, 196 players, side ratio 8, explainer MLP 3072) at batch 64 / 16.

Splits: the images explained are test images; settings are chosen on validation images by
``benchmarks/explain_tuning.py`` (same classifier and surrogate: ``--stop-after surrogate`` writes them), and
the exact values of both are cached per image (``--exact-cache``). ``--speed-only`` times the explanations only
(no exact values; an untrained explainer of the same shape times the same); ``--reanalyse JSON`` recomputes the
report of an earlier run without its first ``--skip-images`` images; ``--only-vit-b`` runs step 4 alone.

Usage::

    python -m benchmarks.explain --quick                 # smoke run, < 1 min on CPU
    python -m benchmarks.explain                         # full run (CPU: slow; about 5 min on one GPU)
    python -m benchmarks.explain --device cuda           # GPU, includes the ViT-B/16 scale check

Raw numbers go to ``--out`` (JSON, default ``outputs/benchmarks/explain.json``); heatmaps of the explainer's
validation epochs go next to it.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks import harness
from benchmarks.harness import sync, timed, timed_round  # noqa: F401 (this module's helpers, used by explain_tuning)
from lightning_eff.data import DigitsDataModule
from lightning_eff.explain import (
    AutoGnothi,
    ExplainerHead,
    TinyViT,
    exact_shapley,
    insertion_deletion_auc,
    kernel_shap,
    kernel_shap_from_samples,
    normalize_efficiency,
    shapley_kernel_masks,
    shapley_regression_loss,
)
from lightning_eff.models import ImageClassifier

VIT = {
    "image_size": 8,
    "patch_size": 2,
    "num_layers": 4,
    "num_heads": 4,
    "hidden_dim": 64,
    "mlp_dim": 128,
    "num_classes": 10,
    "in_channels": 1,
}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def batched_runs(model: AutoGnothi, x_all: Tensor, budgets, device: torch.device) -> dict:
    """AutoGnothi on all images in one batch, and KernelSHAP at each budget with all images' evaluations in one pass."""
    runs = {"autognothi": lambda: model(x_all).phi}
    for b in budgets:
        runs[f"ks{b}"] = functools.partial(kernel_shap_batched, model, x_all, b, device)
    return runs


def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten().cpu(), b.double().flatten().cpu()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


med = harness.median  # nan for no values


def trainer(args, epochs: int, root: str, **kw):
    if args.quick:
        kw.setdefault("limit_train_batches", 3)
        kw.setdefault("limit_val_batches", 2)
    return harness.quiet_trainer(args.accelerator, max_epochs=epochs, default_root_dir=root, **kw)


def cosine(epochs: int):
    return functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=max(1, epochs))


# --------------------------------------------------------------------------------------------------
# 0. training
# --------------------------------------------------------------------------------------------------
def make_surrogate(backbone: nn.Module, epochs: int, side: dict) -> AutoGnothi:
    """Stage 1 as this benchmark trains it: AdamW 2e-3, weight decay 0.01, cosine over ``epochs``."""
    return AutoGnothi(
        backbone,
        stage="surrogate",
        num_heatmaps=0,
        lr_scheduler=cosine(epochs),
        optimizer=functools.partial(torch.optim.AdamW, lr=2e-3, weight_decay=0.01),
        **side,
    )


def make_explainer(
    backbone: nn.Module,
    surrogate_checkpoint: str,
    epochs: int,
    side: dict,
    *,
    hidden: int,
    mask_samples: int,
    lr: float,
    head_layers: int = 1,
    weight_decay: float = 0.01,
    num_heatmaps: int = 8,
) -> AutoGnothi:
    """Stage 2 as this benchmark trains it: AdamW (``lr``, ``weight_decay``), cosine over ``epochs``."""
    return AutoGnothi(
        backbone,
        stage="explainer",
        surrogate_checkpoint=surrogate_checkpoint,
        explainer_hidden_dim=hidden,
        explainer_layers=head_layers,
        num_mask_samples=mask_samples,
        num_heatmaps=num_heatmaps,
        lr_scheduler=cosine(epochs),
        optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay),
        **side,
    )


def train_all(args, cfg: dict, out_dir: Path, log) -> tuple[ImageClassifier, AutoGnothi, dict]:
    import lightning as L

    info: dict[str, Any] = {}
    dm = DigitsDataModule(image_size=8, channels=1, batch_size=64, seed=0)
    dm.setup()
    L.seed_everything(args.seed, verbose=False)
    if args.classifier_ckpt:
        clf = ImageClassifier.load_from_checkpoint(args.classifier_ckpt, map_location="cpu")
        log(f"classifier: loaded {args.classifier_ckpt}")
    else:
        clf = ImageClassifier(
            TinyViT(**cfg["vit"]),
            optimizer=functools.partial(torch.optim.AdamW, lr=2e-3, weight_decay=0.05),
            lr_scheduler=cosine(cfg["epochs_classifier"]),
            label_smoothing=0.1,
        )
        t = trainer(args, cfg["epochs_classifier"], str(out_dir))
        start = time.perf_counter()
        t.fit(clf, dm)
        info["classifier_train_s"] = time.perf_counter() - start
        t.save_checkpoint(str(out_dir / "classifier.ckpt"))
        log(
            f"classifier: trained {cfg['epochs_classifier']} epochs in {info['classifier_train_s']:.0f} s -> "
            f"{out_dir / 'classifier.ckpt'}"
        )
    res = trainer(args, 1, str(out_dir)).test(clf, dm, verbose=False)
    info["classifier_test_acc"] = float(res[0]["test/acc"])
    log(f"classifier: test accuracy {info['classifier_test_acc']:.4f}")

    side = {
        "side_ratio": cfg["side_ratio"],
        "attention_masking": "exclude",
        "player_grid": None if cfg["players"] == 16 else 2,
    }
    if args.explainer_ckpt:
        model = AutoGnothi.load_from_checkpoint(args.explainer_ckpt, map_location="cpu")
        log(f"explainer: loaded {args.explainer_ckpt}")
        return clf, model, info
    if args.surrogate_ckpt:
        s_path = args.surrogate_ckpt
        log(f"surrogate: using {s_path}")
        info["surrogate_ckpt"] = s_path
        if args.stop_after:
            return clf, AutoGnothi.load_from_checkpoint(s_path, map_location="cpu"), info
    else:
        surrogate = make_surrogate(clf.net, cfg["epochs_surrogate"], side)
        t = trainer(args, cfg["epochs_surrogate"], str(out_dir))
        start = time.perf_counter()
        t.fit(surrogate, dm)
        info["surrogate_train_s"] = time.perf_counter() - start
        s_path = str(out_dir / "surrogate.ckpt")
        t.save_checkpoint(s_path)
        metrics = t.validate(surrogate, dm, verbose=False)[0]
        info["surrogate_val_kl"] = float(metrics["surrogate/val_kl"])
        info["surrogate_val_agreement"] = float(metrics["surrogate/val_agreement"])
        info["surrogate_val_masked_agreement"] = float(metrics["surrogate/val_masked_agreement"])
        info["surrogate_ckpt"] = s_path
        log(
            f"surrogate: trained {cfg['epochs_surrogate']} epochs in {info['surrogate_train_s']:.0f} s; val KL "
            f"{info['surrogate_val_kl']:.4f}, agreement with the classifier {info['surrogate_val_agreement']:.3f} "
            f"(full input), {info['surrogate_val_masked_agreement']:.3f} (random masks)"
        )
        if args.stop_after:
            return clf, surrogate, info
    model = make_explainer(
        clf.net,
        s_path,
        cfg["epochs_explainer"],
        side,
        hidden=cfg["explainer_hidden"],
        mask_samples=cfg["mask_samples"],
        lr=cfg["explainer_lr"],
    )
    if getattr(args, "speed_only", False):  # timing only: the cost of a pass does not depend on the weights
        model.ensure_loaded()
        log("explainer: untrained, same shape (timing only)")
        return clf, model, info
    t = trainer(
        args,
        cfg["epochs_explainer"],
        str(out_dir),
        check_val_every_n_epoch=max(1, cfg["epochs_explainer"] // 4),
    )
    start = time.perf_counter()
    t.fit(model, dm)
    info["explainer_train_s"] = time.perf_counter() - start
    t.save_checkpoint(str(out_dir / "explainer.ckpt"))
    info["heatmap"] = model.last_heatmap_path
    log(
        f"explainer: trained {cfg['epochs_explainer']} epochs in {info['explainer_train_s']:.0f} s; last heatmap "
        f"{model.last_heatmap_path}"
    )
    return clf, model, info


# --------------------------------------------------------------------------------------------------
# exact Shapley values (cached) and KernelSHAP over many images in one batched pass
# --------------------------------------------------------------------------------------------------
def surrogate_fingerprint(model: AutoGnothi) -> str:
    """Hash of the weights that define the value function ``v`` (frozen backbone and surrogate side branch)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.startswith(("backbone.", "surrogate_branch.", "surrogate_head.")):
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _drop_stale_lock(lock: Path) -> None:
    """Remove a claim whose process (pid in the file, same machine) no longer runs."""
    try:
        pid = int(lock.read_text() or "0")
        if pid:
            os.kill(pid, 0)
    except ProcessLookupError:
        lock.unlink(missing_ok=True)
    except (OSError, ValueError):
        pass


def exact_values(
    model: AutoGnothi, x: Tensor, split: str, chunk: int, cache_dir: Path, log, wait: bool = True
) -> Tensor | None:
    """``exact_shapley`` of the surrogate for each image of ``x`` ``[K, N, C]`` (float32, CPU).

    The values depend only on the surrogate and the image, so each image's are cached in its own file,
    ``cache_dir/<split>_<surrogate fingerprint>/<index>.pt`` (:func:`surrogate_fingerprint`). Several processes
    may fill one cache together: each claims the next image without a file (an ``O_EXCL`` lock file), so runs
    that tune (validation images) and that report (test images) share the work and resume after an
    interruption. With ``wait=False`` the call returns ``None`` when other processes still hold claims.
    """
    folder = cache_dir / f"{split}_{surrogate_fingerprint(model)}"
    folder.mkdir(parents=True, exist_ok=True)
    start, computed = time.perf_counter(), 0
    model = model.eval()
    while True:
        missing = [i for i in range(len(x)) if not (folder / f"{i}.pt").is_file()]
        if not missing:
            break
        claimed = None
        for i in missing:
            lock = folder / f"{i}.lock"
            _drop_stale_lock(lock)
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            claimed = i
            break
        if claimed is None:  # the rest is being computed by other processes
            if not wait:
                return None
            time.sleep(5)
            continue
        try:
            with torch.no_grad():
                fn = model.value_function(x[claimed : claimed + 1])
                phi = exact_shapley(fn, model.num_players, chunk_size=chunk).float().cpu()
            tmp = folder / f"{claimed}.tmp.{os.getpid()}"
            torch.save(phi, tmp)
            os.replace(tmp, folder / f"{claimed}.pt")
        finally:
            (folder / f"{claimed}.lock").unlink(missing_ok=True)
        computed += 1
        log(
            f"  exact Shapley values: {split} image {claimed} ({len(missing) - 1} of {len(x)} left; "
            f"{computed} here in {time.perf_counter() - start:.0f} s)"
        )
    return torch.stack([torch.load(folder / f"{i}.pt") for i in range(len(x))])


def kernel_shap_batched(model: AutoGnothi, x: Tensor, budget: int, device: torch.device) -> Tensor:
    """KernelSHAP of every image of ``x`` with all ``K * (budget + 2)`` model evaluations in one batched pass.

    Image ``i`` gets the masks ``kernel_shap(..., generator=manual_seed(i))`` draws for it alone, so the estimates
    equal the per-image ones up to float rounding; only the batching of the model evaluations differs. The
    masked inputs go through the model in a single chunk (``masked_chunk_size`` raised for the call).
    """
    n = model.num_players
    masks = torch.cat(
        [
            shapley_kernel_masks(
                1, n, budget, generator=torch.Generator(device=device).manual_seed(i), device=device
            )
            for i in range(len(x))
        ]
    )
    ends = torch.stack(
        [torch.zeros(n, dtype=torch.bool, device=device), torch.ones(n, dtype=torch.bool, device=device)]
    ).expand(len(x), 2, n)
    old = model.masked_chunk_size
    model.masked_chunk_size = len(x) * (budget + 2)
    try:
        values = model.surrogate_values(x, torch.cat([ends, masks], 1))
    finally:
        model.masked_chunk_size = old
    return kernel_shap_from_samples(masks, values[:, 2:], values[:, 0], values[:, 1])


# --------------------------------------------------------------------------------------------------
# 1-2. fidelity and speed
# --------------------------------------------------------------------------------------------------
def shap_explainer(fn, target: int, num_players: int, nsamples: int):
    import numpy as np
    import shap

    def f(z):
        masks = torch.as_tensor(np.asarray(z) > 0.5)
        return fn(masks)[:, target].double().cpu().numpy()

    explainer = shap.KernelExplainer(f, np.zeros((1, num_players)), silent=True)

    def run():
        values = explainer.shap_values(np.ones((1, num_players)), nsamples=nsamples, silent=True)
        return torch.as_tensor(np.asarray(values)).reshape(num_players)

    return run


def fidelity_and_speed(args, cfg: dict, model: AutoGnothi, device: torch.device, log) -> dict:
    dm = DigitsDataModule(image_size=8, channels=1, seed=0)
    dm.setup()
    x_all = dm.test_set.tensors[0][: cfg["images"]].to(device)
    model = model.to(device).eval()
    n = model.num_players
    rows: list[dict[str, float]] = []
    times: dict[str, list[float]] = {"autognothi": [], "shap_kernel": [], "kernel_shap": []}
    has_shap = True
    try:
        import shap  # noqa: F401
    except ImportError:
        has_shap = False
        log("shap is not installed: the shap KernelExplainer column is skipped (pip install shap)")
    gen = torch.Generator().manual_seed(1)
    exact_all = exact_values(model, x_all, "test", cfg["exact_chunk"], Path(cfg["exact_cache"]), log)
    with torch.no_grad():
        batch_out = model(x_all)
        for i in range(len(x_all)):
            x = x_all[i : i + 1]
            fn = model.value_function(x)
            pred = int(batch_out.logits[i].argmax())
            exact = exact_all[i]
            # the timed alternatives, in rotating order (A B C, B C A, ...)
            runs = {
                "autognothi": lambda x=x: model(x).phi[0],
                "kernel_shap": lambda fn=fn, i=i: kernel_shap(
                    fn,
                    n,
                    cfg["kernel_samples"],
                    generator=torch.Generator(device=device).manual_seed(i),
                    device=device,
                ),
            }
            if has_shap:
                runs["shap_kernel"] = shap_explainer(fn, pred, n, cfg["kernel_samples"])
            results = timed_round(runs, device, i, times)
            phi = results["autognothi"].float().cpu()
            full = fn(torch.ones(1, n, dtype=torch.bool, device=device))[0].cpu()
            empty = fn(torch.zeros(1, n, dtype=torch.bool, device=device))[0].cpu()
            row = {
                "pred": pred,
                "ag_r": pearson(phi[:, pred], exact[:, pred]),
                "ag_mse": float((phi[:, pred] - exact[:, pred]).pow(2).mean()),
                "ag_r_all": pearson(phi, exact),
                "ag_eff_gap": float((phi.sum(0) - (full - empty)).abs().max()),
                "ks_r": pearson(results["kernel_shap"][:, pred].float().cpu(), exact[:, pred]),
                "ks_mse": float(
                    (results["kernel_shap"][:, pred].float().cpu() - exact[:, pred]).pow(2).mean()
                ),
                "ks_r_all": pearson(results["kernel_shap"].float().cpu(), exact),
                "exact_scale": float(exact[:, pred].abs().mean()),
            }
            if has_shap:
                sk = results["shap_kernel"].float()
                row["shap_r"] = pearson(sk, exact[:, pred])
                row["shap_mse"] = float((sk - exact[:, pred]).pow(2).mean())
            rankings = {
                "autognothi": phi[:, pred],
                "exact": exact[:, pred],
                "kernel_shap": results["kernel_shap"][:, pred].float().cpu(),
                "random": torch.rand(n, generator=gen),
            }
            if has_shap:
                rankings["shap_kernel"] = results["shap_kernel"].float()
            for name, attr in rankings.items():
                res = insertion_deletion_auc(fn, attr.to(device), target=pred)
                row[f"ins_{name}"], row[f"del_{name}"] = res.insertion_auc, res.deletion_auc
            # KernelSHAP at smaller budgets: where does it reach AutoGnothi's correlation, and at what time?
            for budget in cfg["kernel_budgets"]:
                dt, est = timed(
                    lambda fn=fn, i=i, budget=budget: kernel_shap(
                        fn, n, budget, generator=torch.Generator(device=device).manual_seed(i), device=device
                    ),
                    device,
                )
                row[f"ks{budget}_r"] = pearson(est[:, pred].float().cpu(), exact[:, pred])
                row[f"ks{budget}_s"] = dt
            rows.append(row)
            if (i + 1) % max(1, len(x_all) // 5) == 0:
                log(
                    f"  explained {i + 1}/{len(x_all)} images (r AutoGnothi so far: median {med([r['ag_r'] for r in rows]):.3f})"
                )
        # batched explanation throughput
        reps = []
        for _ in range(cfg["repeats"]):
            dt, _ = timed(lambda: model(x_all), device)
            reps.append(dt / len(x_all))
        batched_ks = batched_comparison(cfg, model, x_all, exact_all, rows, device, log)
    return {
        "rows": rows,
        "times": times,
        "batched_per_image_s": med(reps),
        "batched_kernel_shap": batched_ks,
        "has_shap": has_shap,
    }


def batched_comparison(
    cfg: dict, model: AutoGnothi, x_all: Tensor, exact_all: Tensor, rows: list, device, log
) -> dict:
    """AutoGnothi over all images in one batch against KernelSHAP with all images' evaluations in one pass.

    KernelSHAP at its equal-correlation budget (the smallest per-image budget whose median r reaches
    AutoGnothi's) and at ``kernel_samples``; interleaved rounds (rotating order), medians of the per-image time.
    """
    ag_r = med([row["ag_r"] for row in rows])
    equal = [b for b in cfg["kernel_budgets"] if med([row[f"ks{b}_r"] for row in rows]) >= ag_r]
    budgets = sorted({*equal[:1], cfg["kernel_samples"]})
    k = len(x_all)
    runs = batched_runs(model, x_all, budgets, device)
    times: dict[str, list[float]] = {}
    for rep in range(cfg["batched_repeats"]):
        last = timed_round(runs, device, rep, times, per=k)
    ag_s = med(times["autognothi"])
    out: dict[str, Any] = {
        "images": k,
        "repeats": cfg["batched_repeats"],
        "autognothi_per_image_s": ag_s,
        "equal_correlation_budget": equal[0] if equal else None,
        "kernel_shap": {},
    }
    for b in budgets:
        est = last[f"ks{b}"].float().cpu()
        key = f"ks{b}_r" if b in cfg["kernel_budgets"] else "ks_r"
        r = [pearson(est[i][:, row["pred"]], exact_all[i][:, row["pred"]]) for i, row in enumerate(rows)]
        out["kernel_shap"][str(b)] = {
            "evaluations_per_image": b + 2,
            "per_image_s": med(times[f"ks{b}"]),
            "speedup_of_autognothi": med(times[f"ks{b}"]) / ag_s,
            "median_r": med(r),
            "max_abs_r_diff_vs_per_image": max(abs(a - row[key]) for a, row in zip(r, rows)),
        }
        log(
            f"  batched over {k} images: KernelSHAP {b + 2} evaluations {med(times[f'ks{b}']) * 1e3:.3f} ms/image "
            f"(median r {med(r):.3f}), AutoGnothi {ag_s * 1e3:.3f} ms/image: {med(times[f'ks{b}']) / ag_s:.1f}x"
        )
    return out


def speed_only(cfg: dict, model: AutoGnothi, device: torch.device, log) -> dict:
    """Time to explain each of the first ``images`` test images, one at a time and all batched (no fidelity).

    The cost of an AutoGnothi pass and of a KernelSHAP evaluation does not depend on the weights, so this
    needs no exact values. Per image, interleaved in rotating order: AutoGnothi (batch of one) and our
    ``kernel_shap`` at each of ``speed_budgets``. Then, in ``batched_repeats`` interleaved rounds, AutoGnothi on
    all images in one batch and KernelSHAP with all images' evaluations in one pass (:func:`kernel_shap_batched`,
    the same masks as the per-image runs, whose estimates it must reproduce). Medians per image.
    """
    dm = DigitsDataModule(image_size=8, channels=1, seed=0)
    dm.setup()
    x_all = dm.test_set.tensors[0][: cfg["images"]].to(device)
    model = model.to(device).eval()
    n, k = model.num_players, len(x_all)
    budgets = cfg["speed_budgets"]
    single: dict[str, list[float]] = {"autognothi": [], **{f"ks{b}": [] for b in budgets}}
    per_image_est: dict[int, list[Tensor]] = {b: [] for b in budgets}
    with torch.no_grad():
        model(x_all[:2])  # warm-up
        for i in range(k):
            x = x_all[i : i + 1]
            fn = model.value_function(x)
            runs = {"autognothi": lambda x=x: model(x).phi[0]}
            for b in budgets:
                runs[f"ks{b}"] = functools.partial(
                    kernel_shap,
                    fn,
                    n,
                    b,
                    generator=torch.Generator(device=device).manual_seed(i),
                    device=device,
                )
            est = timed_round(runs, device, i, single)
            for b in budgets:
                per_image_est[b].append(est[f"ks{b}"].float().cpu())
        runs = batched_runs(model, x_all, budgets, device)
        batched: dict[str, list[float]] = {}
        for rep in range(cfg["batched_repeats"]):
            last = timed_round(runs, device, rep, batched, per=k)
    ag1, agb = med(single["autognothi"]), med(batched["autognothi"])
    out: dict[str, Any] = {
        "images": k,
        "batched_repeats": cfg["batched_repeats"],
        "autognothi": {"batch1_s": ag1, "batched_per_image_s": agb},
        "kernel_shap": {},
        "raw": {"single": single, "batched": batched},
    }
    for b in budgets:
        same = torch.stack(per_image_est[b])
        ks1, ksb = med(single[f"ks{b}"]), med(batched[f"ks{b}"])
        out["kernel_shap"][str(b)] = {
            "evaluations_per_image": b + 2,
            "batch1_s": ks1,
            "batched_per_image_s": ksb,
            "speedup_of_autognothi_one_at_a_time": ks1 / ag1,
            "speedup_of_autognothi_both_batched": ksb / agb,
            "speedup_mixed_autognothi_batched_vs_kernelshap_one_image": ks1 / agb,
            "max_abs_diff_batched_vs_per_image_phi": float((last[f"ks{b}"].float().cpu() - same).abs().max()),
        }
        log(
            f"  KernelSHAP {b + 2} evaluations: one image at a time {ks1 * 1e3:.2f} ms vs AutoGnothi {ag1 * 1e3:.2f} ms "
            f"({ks1 / ag1:.1f}x); both batched over {k} images {ksb * 1e3:.3f} ms vs {agb * 1e3:.3f} ms per image "
            f"({ksb / agb:.1f}x); mixed (the old headline's pairing) {ks1 / agb:.0f}x"
        )
    return out


# --------------------------------------------------------------------------------------------------
# 3. cost
# --------------------------------------------------------------------------------------------------
def inference_cost(
    final: AutoGnothi, classifier: nn.Module, x: Tensor, repeats: int, device: torch.device
) -> dict:
    final, classifier = final.to(device).eval(), classifier.to(device).eval()
    a, b = [], []
    with torch.no_grad():
        for _ in range(3):  # warm-up
            classifier(x)
            final(x)
        for r in range(repeats):
            order = [("a", classifier), ("b", final)] if r % 2 == 0 else [("b", final), ("a", classifier)]
            for name, fn in order:
                dt, _ = timed(lambda fn=fn: fn(x), device)
                (a if name == "a" else b).append(dt)
    return {"classifier_s": med(a), "final_s": med(b), "ratio": med(b) / med(a)}


class FullCopyExplainer(nn.Module):
    """ViT-Shapley-style explainer: a trainable copy of the backbone, the same explainer head on its last layer."""

    def __init__(self, model: AutoGnothi, hidden_dim: int, head_dim: int) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(model.backbone).requires_grad_(True).train()
        self.adapter, self.layout = model.adapter, model.layout
        self.norm = nn.LayerNorm(hidden_dim)
        self.head = ExplainerHead(
            hidden_dim, model.adapter.num_heads, model.num_classes, head_dim, num_layers=1
        )

    def forward(self, x: Tensor) -> Tensor:
        _, hiddens = self.adapter.run(self.backbone, x)
        return self.layout.pool(self.head(self.norm(hiddens[-1]))[:, 1:])


def step_memory(forward_loss, params: list[nn.Parameter], device: torch.device) -> dict:
    """Bytes autograd saves for backward, parameter+grad+Adam bytes, and the CUDA peak of one training step."""
    saved = {"bytes": 0}
    seen: set[int] = set()

    def pack(t: Tensor):
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            saved["bytes"] += t.untyped_storage().nbytes()
        return t

    opt = torch.optim.Adam(params, lr=1e-4)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward_loss()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    out = {
        "trainable_params": sum(p.numel() for p in params),
        "saved_activation_bytes": saved["bytes"],
        "param_grad_adam_bytes": sum(p.numel() * p.element_size() for p in params) * 4,
    }
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    del opt
    return out


def training_memory(
    model: AutoGnothi, x: Tensor, mask_samples: int, head_dim: int, device: torch.device
) -> dict:
    model = model.to(device).train()
    b = x.shape[0]
    n = model.num_players
    with torch.no_grad():
        masks = shapley_kernel_masks(
            b, n, mask_samples, generator=torch.Generator(device=device).manual_seed(0), device=device
        )
        values = model.surrogate_values(x, masks)
        null = model.null_value(x)
        _, hiddens = model.adapter.run(model.backbone, x)
        grand = model._surrogate(hiddens, None).softmax(-1)
    valid = torch.ones(b, n, dtype=torch.bool, device=device)

    def side_loss():
        _, h = model._run_backbone(x)  # no autograd through the frozen backbone
        phi = model._explain(h, None, valid, grand, x)
        return shapley_regression_loss(phi, masks, values, null)

    side_params = [p for p in model.parameters() if p.requires_grad]
    side = step_memory(side_loss, side_params, device)
    full_model = FullCopyExplainer(model, model.adapter.hidden_dim, head_dim).to(device)

    def full_loss():
        phi = normalize_efficiency(full_model(x), grand, null)
        return shapley_regression_loss(phi, masks, values, null)

    copy_ = step_memory(full_loss, [p for p in full_model.parameters() if p.requires_grad], device)
    return {"autognothi": side, "full_copy": copy_}


def vit_b_scale(args, device: torch.device, log) -> dict:
    """Cost at the paper's scale with a random-initialised torchvision ViT-B/16 (timing and memory only)."""
    from torchvision.models import vit_b_16

    torch.manual_seed(0)
    if args.vit_b_tiny:  # wiring check only (benchmarks/gpu_suite.py --tiny): same code path, tiny ViT
        from torchvision.models import VisionTransformer

        backbone = VisionTransformer(
            32, 8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10
        )
    else:
        backbone = vit_b_16(weights=None, num_classes=10)
    nn.init.normal_(backbone.heads.head.weight, std=0.02)
    stage1 = AutoGnothi(backbone, side_ratio=8, num_heatmaps=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.ckpt")
        ckpt = {"state_dict": stage1.state_dict()}
        stage1.on_save_checkpoint(ckpt)
        torch.save(ckpt, path)
        final = AutoGnothi(
            backbone,
            stage="explainer",
            surrogate_checkpoint=path,
            side_ratio=8,
            explainer_hidden_dim=3072,
            num_mask_samples=32,
            masked_chunk_size=512,
            num_heatmaps=0,
        )
        final.ensure_loaded()
    side = 32 if args.vit_b_tiny else 224
    x = torch.randn(args.vit_b_batch, 3, side, side, device=device)
    cost = inference_cost(final, backbone, x, args.repeats_vit_b, device)
    log(
        f"  ViT-B/16 inference: classifier {cost['classifier_s'] * 1e3:.1f} ms, final {cost['final_s'] * 1e3:.1f} ms "
        f"(batch {args.vit_b_batch}), ratio {cost['ratio']:.3f}"
    )
    mem = training_memory(final, x[: args.vit_b_train_batch], 32, 3072, device)
    return {
        "inference": cost,
        "memory": mem,
        "players": final.num_players,
        "batch": args.vit_b_batch,
        "train_batch": args.vit_b_train_batch,
    }


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def mib(v: float) -> str:
    return f"{v / 2**20:.1f} MiB"


def report(result: dict, log) -> None:
    rows = result["fidelity"]["rows"]
    has_shap = result["fidelity"]["has_shap"]
    times = result["fidelity"]["times"]
    k = len(rows)
    log("")
    log(
        f"### Fidelity against exact Shapley values of the surrogate ({k} test images, {result['settings']['players']} players, predicted class)"
    )
    log("")
    log(
        "| explainer | model evaluations | median Pearson r | mean r | share r >= 0.9 | median MSE | median r (all 10 classes) |"
    )
    log("| --- | --- | --- | --- | --- | --- | --- |")
    methods = [("AutoGnothi (one forward)", "ag", "0 (amortised)")]
    if has_shap:
        methods.append(
            ("KernelSHAP, shap.KernelExplainer", "shap", str(result["settings"]["kernel_samples"]))
        )
    methods.append(("KernelSHAP, ours (paired)", "ks", str(result["settings"]["kernel_samples"] + 2)))
    for name, key, evals in methods:
        r = [row[f"{key}_r"] for row in rows]
        mse = [row[f"{key}_mse"] for row in rows]
        r_all = f"{med([row[f'{key}_r_all'] for row in rows]):.3f}" if f"{key}_r_all" in rows[0] else "-"
        log(
            f"| {name} | {evals} | {med(r):.3f} | {statistics.fmean(r):.3f} | {sum(v >= 0.9 for v in r) / k:.2f} | "
            f"{med(mse):.2e} | {r_all} |"
        )
    log("")
    log(
        f"Efficiency gap of AutoGnothi |sum phi - (v(1) - v(0))|: max {max(row['ag_eff_gap'] for row in rows):.1e} "
        f"(mean |exact phi| of the predicted class: {statistics.fmean(row['exact_scale'] for row in rows):.3f})"
    )
    log("")
    log("### Insertion / deletion AUC of v (predicted class; higher insertion and lower deletion are better)")
    log("")
    log("| ranking | insertion AUC (mean) | deletion AUC (mean) |")
    log("| --- | --- | --- |")
    for name in ["exact", "autognothi", *(["shap_kernel"] if has_shap else []), "kernel_shap", "random"]:
        log(
            f"| {name} | {statistics.fmean(row[f'ins_{name}'] for row in rows):.4f} | "
            f"{statistics.fmean(row[f'del_{name}'] for row in rows):.4f} |"
        )
    log("")
    log("### Time to explain one image (medians, interleaved)")
    log("")
    log("| method | median time | AutoGnothi speed-up |")
    log("| --- | --- | --- |")
    ag = med(times["autognothi"])
    log(f"| AutoGnothi, batch of 1 | {ag * 1e3:.2f} ms | 1x |")
    batched = result["fidelity"]["batched_per_image_s"]
    log(
        f"| AutoGnothi, batch of {result['fidelity'].get('batched_images', k)} (per image) | {batched * 1e3:.3f} ms | "
        f"{ag / batched:.1f}x |"
    )
    if has_shap:
        sk = med(times["shap_kernel"])
        log(f"| shap.KernelExplainer, 512 evaluations | {sk * 1e3:.1f} ms | {sk / ag:.0f}x |")
    ks = med(times["kernel_shap"])
    log(f"| our kernel_shap, 514 evaluations | {ks * 1e3:.2f} ms | {ks / ag:.1f}x |")
    bks = result["fidelity"].get("batched_kernel_shap")
    if bks:
        log("")
        log(
            f"### Both batched over the {bks['images']} images (AutoGnothi: one batch; KernelSHAP: all images' "
            f"evaluations in one pass; {bks['repeats']} interleaved rounds, medians)"
        )
        log("")
        log("| method | model evaluations per image | median r | time per image | AutoGnothi speed-up |")
        log("| --- | --- | --- | --- | --- |")
        ag_b = bks["autognothi_per_image_s"]
        ag_rb = med([row["ag_r"] for row in rows])
        log(
            f"| AutoGnothi, batch of {bks['images']} | 0 (amortised) | {ag_rb:.3f} | {ag_b * 1e3:.3f} ms | 1x |"
        )
        for b, v in bks["kernel_shap"].items():
            eq = " (equal correlation)" if bks["equal_correlation_budget"] == int(b) else ""
            log(
                f"| KernelSHAP, batched{eq} | {v['evaluations_per_image']} | {v['median_r']:.3f} | "
                f"{v['per_image_s'] * 1e3:.3f} ms | {v['speedup_of_autognothi']:.1f}x |"
            )
    budgets = result["settings"].get("kernel_budgets") or []
    if budgets:
        ag_r = med([row["ag_r"] for row in rows])
        log("")
        log(
            f"### KernelSHAP (ours, paired) by budget, against AutoGnothi's median r {ag_r:.3f} (batch of 1: {ag * 1e3:.2f} ms)"
        )
        log("")
        log("| model evaluations | median r | median time | time / AutoGnothi's |")
        log("| --- | --- | --- | --- |")
        for b in [*budgets, result["settings"]["kernel_samples"]]:
            key_r, key_s = (f"ks{b}_r", f"ks{b}_s") if b in budgets else ("ks_r", None)
            r_b = med([row[key_r] for row in rows])
            t_b = med([row[key_s] for row in rows]) if key_s else ks
            log(f"| {b + 2} | {r_b:.3f} | {t_b * 1e3:.2f} ms | {t_b / ag:.1f}x |")
        equal = [b for b in budgets if med([row[f"ks{b}_r"] for row in rows]) >= ag_r]
        if equal:
            b = equal[0]
            t_b = med([row[f"ks{b}_s"] for row in rows])
            both = (bks or {}).get("kernel_shap", {}).get(str(b))
            log(
                f"\nAt equal correlation (KernelSHAP's smallest budget with median r >= AutoGnothi's: {b + 2} "
                f"evaluations) AutoGnothi is {t_b / ag:.1f}x faster one image at a time"
                + (
                    f", {both['speedup_of_autognothi']:.1f}x with both batched over the images."
                    if both
                    else "."
                )
            )
        else:
            log("\nNo smaller budget reaches AutoGnothi's median r; compare at 514 evaluations above.")
    log("")
    log("### Cost")
    log("")
    inf = result["cost"]["inference"]
    log(
        f"Inference, batch 256 digits: classifier {inf['classifier_s'] * 1e3:.2f} ms, final model (logits + phi, one pass) "
        f"{inf['final_s'] * 1e3:.2f} ms: **{inf['ratio']:.2f}x**"
    )
    sections = [
        (f"tiny ViT (digits, batch 32, {result['settings']['mask_samples']} masks)", result["cost"]["memory"])
    ]
    if "vit_b" in result:
        vb = result["vit_b"]["inference"]
        log(
            f"Inference, ViT-B/16 batch {result['vit_b']['batch']} (224 px, 196 players): classifier {vb['classifier_s'] * 1e3:.1f} ms, final "
            f"{vb['final_s'] * 1e3:.1f} ms: **{vb['ratio']:.2f}x**"
        )
        sections.append(
            (f"ViT-B/16 (batch {result['vit_b']['train_batch']}, 32 masks)", result["vit_b"]["memory"])
        )
    log("")
    log("| explainer training step | trainable params | saved activations | params+grads+Adam | CUDA peak |")
    log("| --- | --- | --- | --- | --- |")
    for label, mem in sections:
        for name, key in (
            ("AutoGnothi side branch", "autognothi"),
            ("full backbone copy (ViT-Shapley style)", "full_copy"),
        ):
            m = mem[key]
            peak = mib(m["cuda_peak_bytes"]) if "cuda_peak_bytes" in m else "-"
            log(
                f"| {label}: {name} | {m['trainable_params'] / 1e6:.3f} M | {mib(m['saved_activation_bytes'])} | "
                f"{mib(m['param_grad_adam_bytes'])} | {peak} |"
            )
        a, b = mem["autognothi"], mem["full_copy"]
        tot_a = a["saved_activation_bytes"] + a["param_grad_adam_bytes"]
        tot_b = b["saved_activation_bytes"] + b["param_grad_adam_bytes"]
        extra = (
            f", CUDA peak {b['cuda_peak_bytes'] / a['cuda_peak_bytes']:.2f}x"
            if "cuda_peak_bytes" in a
            else ""
        )
        log(
            f"| {label}: full copy / side branch | {b['trainable_params'] / a['trainable_params']:.1f}x | "
            f"{b['saved_activation_bytes'] / max(1, a['saved_activation_bytes']):.1f}x | (activations + params) "
            f"{tot_b / tot_a:.2f}x | {extra.lstrip(', ') or '-'} |"
        )


def reanalyse(path: str, skip: int, out: str, log) -> dict:
    """The report of an earlier run's JSON restricted to its test images from index ``skip`` on.

    For a run whose settings were chosen on its first ``skip`` test images (the sweep of
    ``explain_tuning.py`` before it scored validation images), the remaining images were never used to choose
    anything: their figures are held out. Per-image rows and times are sliced; AutoGnothi's batched time (one
    pass over all images of the run) is kept as measured. Writes the summary to ``out``.
    """
    result = json.loads(Path(path).read_text())
    fid = result["fidelity"]
    rows = fid["rows"][skip:]
    if not rows:
        raise SystemExit(
            f"--reanalyse: {path} has {len(fid['rows'])} images; --skip-images {skip} leaves none"
        )
    sub = {
        **result,
        "fidelity": {
            **fid,
            "rows": rows,
            "times": {k: v[skip:] for k, v in fid["times"].items()},
            "batched_images": len(fid["rows"]),
        },
    }
    sub.pop("vit_b", None)
    log(
        f"# {path}: test images {skip}..{len(fid['rows']) - 1} ({len(rows)} images; the first {skip} are left out)"
    )
    report(sub, log)
    budgets = result["settings"].get("kernel_budgets") or []
    ag_r = med([row["ag_r"] for row in rows])
    summary = {
        "source": path,
        "skipped_first_images": skip,
        "images": len(rows),
        "autognothi": {
            "median_r": ag_r,
            "mean_r": statistics.fmean(row["ag_r"] for row in rows),
            "batch1_s": med(sub["fidelity"]["times"]["autognothi"]),
        },
        "kernel_shap_by_budget": {
            str(b + 2): {
                "median_r": med([row[f"ks{b}_r"] for row in rows]),
                "batch1_s": med([row[f"ks{b}_s"] for row in rows]),
            }
            for b in budgets
        },
        "kernel_shap_514": {
            "median_r": med([row["ks_r"] for row in rows]),
            "batch1_s": med(sub["fidelity"]["times"]["kernel_shap"]),
        },
    }
    equal = [b for b in budgets if med([row[f"ks{b}_r"] for row in rows]) >= ag_r]
    summary["equal_correlation_evaluations"] = equal[0] + 2 if equal else None
    if fid.get("has_shap"):
        summary["shap_kernel_explainer_512"] = {
            "median_r": med([row["shap_r"] for row in rows]),
            "batch1_s": med(sub["fidelity"]["times"]["shap_kernel"]),
        }
    harness.write_json(out, summary, indent=1)
    log(f"\nsummary -> {out}")
    return summary


# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (< 1 min on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--images", type=int, default=None, help="test images explained (default 100, quick 4)")
    p.add_argument("--kernel-samples", type=int, default=512)
    p.add_argument(
        "--kernel-budgets",
        type=int,
        nargs="*",
        default=[8, 16, 32, 64, 96, 128, 192, 256, 384],
        help="smaller KernelSHAP budgets (even) measured per image to find its budget at AutoGnothi's correlation",
    )
    p.add_argument(
        "--players", type=int, choices=(4, 16), default=None, help="4 (2x2 grid) or 16 (default; quick: 4)"
    )
    p.add_argument(
        "--epochs", type=int, nargs=3, default=None, metavar=("CLASSIFIER", "SURROGATE", "EXPLAINER")
    )
    p.add_argument("--classifier-ckpt", default=None)
    p.add_argument("--surrogate-ckpt", default=None)
    p.add_argument("--explainer-ckpt", default=None)
    p.add_argument(
        "--stop-after",
        choices=("surrogate", "exact"),
        default=None,
        help="stop after training (or loading) the classifier and surrogate, or after also caching the exact "
        "Shapley values of the test images (so that tuning runs and the benchmark share them); writes no JSON",
    )
    p.add_argument(
        "--exact-cache",
        default=None,
        help="folder of cached exact Shapley values, keyed by split, count and surrogate weights "
        "(default <out>_runs/exact)",
    )
    p.add_argument(
        "--batched-repeats",
        type=int,
        default=None,
        help="interleaved rounds of the both-batched comparison (default 5, quick 2)",
    )
    p.add_argument(
        "--vit-b",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ViT-B/16 scale check (default: on CUDA)",
    )
    p.add_argument(
        "--only-vit-b",
        action="store_true",
        help="run only the ViT-B/16 scale check (no digits training; benchmarks/gpu_suite.py)",
    )
    p.add_argument("--vit-b-tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--speed-only",
        action="store_true",
        help="only the time per explanation, one image at a time and batched over --images test images, for "
        "AutoGnothi and KernelSHAP at --speed-budgets (no exact values, no fidelity); needs --surrogate-ckpt "
        "and --classifier-ckpt (an untrained explainer of the same shape times the same) or --explainer-ckpt",
    )
    p.add_argument("--speed-budgets", type=int, nargs="+", default=[192, 512])
    p.add_argument(
        "--reanalyse",
        default=None,
        metavar="JSON",
        help="no run: the report of an earlier run's JSON without its first --skip-images test images (summary to --out)",
    )
    p.add_argument("--skip-images", type=int, default=16)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--repeats-vit-b", type=int, default=20)
    p.add_argument("--vit-b-batch", type=int, default=64, help="inference batch of the ViT-B/16 scale check")
    p.add_argument(
        "--vit-b-train-batch", type=int, default=16, help="training batch of the ViT-B/16 memory check"
    )
    p.add_argument("--width", type=int, default=64, help="ViT width (hidden_dim)")
    p.add_argument("--layers", type=int, default=4, help="ViT layers")
    p.add_argument("--heads", type=int, default=4, help="ViT heads")
    p.add_argument(
        "--mask-samples",
        type=int,
        default=None,
        help="paired masks per image in stage 2 (default 8: at equal training time, fewer masks and more "
        "epochs fit the explainer better on digits)",
    )
    p.add_argument("--side-ratio", type=int, default=1, help="side width = width / side ratio")
    p.add_argument("--explainer-hidden", type=int, default=256, help="width of the explainer head's MLP")
    p.add_argument("--explainer-lr", type=float, default=2e-3, help="AdamW learning rate of stage 2 (cosine)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/benchmarks/explain.json")
    args = p.parse_args(argv)
    if args.reanalyse:
        return reanalyse(args.reanalyse, args.skip_images, args.out, lambda m: print(m, flush=True))
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", ".*has no `get_config\\(\\)`.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if (args.device == "auto" and torch.cuda.is_available())
        else ("cpu" if args.device == "auto" else args.device)
    )
    args.accelerator = "gpu" if device.type == "cuda" else "cpu"
    epochs = args.epochs or ([2, 2, 2] if args.quick else [60, 40, 90])
    cfg = {
        "epochs_classifier": epochs[0],
        "epochs_surrogate": epochs[1],
        "epochs_explainer": epochs[2],
        "images": args.images or (4 if args.quick else 100),
        "players": args.players or (4 if args.quick else 16),
        "kernel_samples": args.kernel_samples,
        "kernel_budgets": [b for b in args.kernel_budgets if b < args.kernel_samples],
        "side_ratio": args.side_ratio,
        "vit": {
            **VIT,
            "hidden_dim": args.width,
            "mlp_dim": 2 * args.width,
            "num_layers": args.layers,
            "num_heads": args.heads,
        },
        "explainer_hidden": args.explainer_hidden,
        "explainer_lr": args.explainer_lr,
        "mask_samples": args.mask_samples or 8,
        "repeats": args.repeats or (5 if args.quick else 30),
        "exact_chunk": 65536 if device.type == "cuda" else 8192,
        "batched_repeats": args.batched_repeats or (2 if args.quick else 5),
        "speed_budgets": args.speed_budgets,
        "device": str(device),
        "seed": args.seed,
        "vit_b": bool(args.vit_b if args.vit_b is not None else device.type == "cuda"),
    }
    out_path = Path(args.out)
    out_dir = out_path.parent / (out_path.stem + "_runs")
    if not args.only_vit_b:
        out_dir.mkdir(parents=True, exist_ok=True)
    cfg["exact_cache"] = args.exact_cache or str(out_dir / "exact")

    def log(msg: str) -> None:
        print(msg, flush=True)

    log("# AutoGnothi benchmark (lightning_eff.explain)")
    env = harness.environment(str(device))
    log(harness.environment_line(env) + f", {env['platform']}")
    log("protocol: " + json.dumps(cfg))
    log(
        "backbone: TinyViT "
        + json.dumps(cfg["vit"])
        + f"; AutoGnothi side width {args.width}/{args.side_ratio} = {args.width // args.side_ratio}, explainer MLP {cfg['explainer_hidden']}, "
        + f"{cfg['mask_samples']} paired "
        "kernel masks per image, attention masking 'exclude' (-inf); Adam-W with cosine schedules"
    )
    result: dict[str, Any] = {"settings": cfg, "environment": env}
    t0 = time.perf_counter()
    if args.only_vit_b:
        log("ViT-B/16 scale check only" + (" (tiny ViT: wiring check)" if args.vit_b_tiny else "") + " ...")
        result["settings"] = {
            "only_vit_b": True,
            "vit_b_tiny": args.vit_b_tiny,
            "device": str(device),
            "repeats_vit_b": args.repeats_vit_b,
            "vit_b_batch": args.vit_b_batch,
            "vit_b_train_batch": args.vit_b_train_batch,
            "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor(),
        }
        result["vit_b"] = vit_b_scale(args, device, log)
        result["wall_s"] = time.perf_counter() - t0
        harness.write_json(out_path, result, indent=1, default=str)
        log(f"total wall time {result['wall_s']:.0f} s; raw numbers in {out_path}")
        return result
    if args.speed_only:
        args.stop_after = None
        if not args.explainer_ckpt and not (args.classifier_ckpt and args.surrogate_ckpt):
            raise SystemExit("--speed-only needs --explainer-ckpt, or --classifier-ckpt and --surrogate-ckpt")
    clf, model, info = train_all(args, cfg, out_dir, log)
    result["training"] = info
    if args.speed_only:
        result["settings"]["speed_only"] = True
        result["settings"]["explainer_weights"] = args.explainer_ckpt or "untrained (timing only)"
        log("speed only (no fidelity) ...")
        result["speed"] = speed_only(cfg, model, device, log)
        result["wall_s"] = time.perf_counter() - t0
        harness.write_json(out_path, result, indent=1, default=str)
        log(f"total wall time {result['wall_s']:.0f} s; raw numbers in {out_path}")
        return result
    if args.stop_after:
        if args.stop_after == "exact":
            dm = DigitsDataModule(image_size=8, channels=1, seed=0)
            dm.setup()
            x = dm.test_set.tensors[0][: cfg["images"]].to(device)
            exact_values(model.to(device), x, "test", cfg["exact_chunk"], Path(cfg["exact_cache"]), log)
        log(f"stopped after {args.stop_after} ({time.perf_counter() - t0:.0f} s); no JSON written")
        return result
    log("fidelity and speed ...")
    result["fidelity"] = fidelity_and_speed(args, cfg, model, device, log)
    log("cost ...")
    dm = DigitsDataModule(image_size=8, channels=1, seed=0)
    dm.setup()
    x = dm.test_set.tensors[0][:256].to(device)
    result["cost"] = {
        "inference": inference_cost(model, clf.net, x, cfg["repeats"], device),
        "memory": training_memory(model, x[:32], cfg["mask_samples"], cfg["explainer_hidden"], device),
    }
    if cfg["vit_b"]:
        log("ViT-B/16 scale check ...")
        result["vit_b"] = vit_b_scale(args, device, log)
    result["wall_s"] = time.perf_counter() - t0
    report(result, log)
    log("")
    log(f"total wall time {result['wall_s']:.0f} s; raw numbers in {out_path}")
    harness.write_json(out_path, result, indent=1, default=str)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
