"""Benchmark of KO, the kinetics-inspired optimizer (``lightning_eff.optim.KO``), on CPU.

Three measurements, each against the same base optimizer without collisions:

1. **Condensation.** A two-layer tanh network ``f(x) = a . tanh(W [x, 1])`` with 64 hidden units and
   small initialisation (every weight ~ N(0, 1e-3^2)) trained full batch on ``y = sin(3x) + noise``. In
   this regime the first-layer rows collapse onto one direction ("condensation"). The row of neuron k
   is ``[w_k | b_k]`` (first-layer weight together with its bias): the network keeps them as one
   ``(64, 2)`` parameter, so KO's collision and the measure both act on these rows. Reported at the
   end of training: mean and max ``|cos|`` between distinct rows, the effective rank of ``[W | b]``
   (``condensation_stats``) and the final training MSE, mean +- std over seeds.
2. **Accuracy.** ConvNet-3 on the bundled digits (16 px), Adam vs KO(Adam) and SGD (momentum 0.9) vs
   KO(SGD), same epochs and learning rate inside each pair; the seed sets initialisation, data order
   and KO's noise, the data split is fixed. Test accuracy mean +- std, the paired difference
   KO - base and how many seeds KO wins.
3. **Cost.** Median wall time of a whole training step (zero_grad, forward, backward, step) of KO(Adam)
   over Adam, steps interleaved (ABAB), on ConvNet-3 (width 128, 3 x 32 x 32, batch 256) and on an MLP
   3072 -> 1024 -> 1024 -> 10 (batch 256, also with ``collision_every`` 4 and 10).

Plain PyTorch loops (no Trainer), so that the numbers measure the optimizer and not the framework.

Usage::

    python -m benchmarks.ko                      # full run (about 6 min on 2 CPU cores)
    python -m benchmarks.ko --quick              # smoke run (< 1 min)
    python -m benchmarks.ko --seeds 5 --out outputs/benchmarks/ko_5seeds.json

It prints the protocol, per-run progress, and a markdown summary; all raw numbers go to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_eff
from benchmarks.harness import cpu_name, environment, load_average, write_json
from lightning_eff.data import DigitsDataModule
from lightning_eff.models import MLP, ConvNet
from lightning_eff.optim import KO, collide, condensation_stats

# KO hyper-parameters used everywhere: the method's defaults (soft collision, gamma 0.1, "wg_i",
# sigma 1e-4, threshold 0, a collision every step).
KO_DEFAULTS: dict[str, Any] = dict(
    collision="soft", collision_rate=0.1, variant="wg_i", noise_scale=1e-4, threshold=0.0, collision_every=1
)


# --------------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------------
def settings(quick: bool, seeds: int | None, cond_seeds: int | None) -> dict[str, Any]:
    """Every setting of the three sections (``quick`` shrinks steps, epochs and seeds)."""
    return {
        "condensation": {
            "model": "f(x) = a . tanh(W [x, 1]), W: (m, 2) = [w | b] (first-layer weight with its bias), a: (1, m), no output bias",
            "activation": "tanh",
            "hidden": 64,
            "init_std": 1e-3,
            "data": "x = 64 points evenly spaced in [-1, 1], y = sin(3x) + 0.01 N(0, 1) (noise fixed, seed 1234)",
            "n_points": 64,
            "noise_std": 0.01,
            "loss": "mean squared error, full batch",
            "steps": 1000 if quick else 5000,
            "checkpoints": "0, 10%, 20%, 50%, 100% of steps",
            "seeds": cond_seeds if cond_seeds is not None else (2 if quick else 5),
            "optimizers": {
                "Adam": {"base": "adam", "lr": 3e-3},
                "SGD": {"base": "sgd", "lr": 0.125, "momentum": 0.0},
            },
            "ko": KO_DEFAULTS,
        },
        "accuracy": {
            "model": "ConvNet(in_channels=1, num_classes=10, width=32, depth=3, norm='instance', activation='relu', pooling='avg', image_size=16)",
            "width": 32,
            "data": "DigitsDataModule(image_size=16, channels=1, val_fraction=0.1, test_fraction=0.2, seed=0): 1258 train / 180 val (unused) / 359 test",
            "batch_size": 64,
            "epochs": 2 if quick else 15,
            "seeds": seeds if seeds is not None else (2 if quick else 10),
            "evaluation": "test accuracy after the last epoch (no early stopping, no schedule, no weight decay)",
            "optimizers": {
                "Adam": {"base": "adam", "lr": 1e-3},
                "SGD": {"base": "sgd", "lr": 0.01, "momentum": 0.9},
            },
            "ko": KO_DEFAULTS,
        },
        "cost": {
            "batch_size": 256,
            "warmup_steps": 1 if quick else 5,
            "timed_steps": 3 if quick else 30,
            "min_cycles": 2 if quick else 10,
            "base": "Adam(lr=1e-3)",
            "ko": "KO(base='adam', lr=1e-3) with the defaults above",
            "models": {
                "ConvNet-3": "ConvNet(in_channels=3, num_classes=10, width=128, depth=3, image_size=32), input 256 x 3 x 32 x 32",
                "MLP": "MLP(in_channels=3, image_size=32, num_classes=10, hidden_sizes=(1024, 1024)): 3072 -> 1024 -> 1024 -> 10, input 256 x 3 x 32 x 32",
            },
            "collision_every": {"ConvNet-3": [1], "MLP": [1, 4, 10]},
            "protocol": (
                "two copies of the network with the same initial weights and the same random batch; "
                "steps alternate Adam, KO, Adam, KO, ..., each timed on its own; warm-up and timed steps "
                "are whole cycles of collision_every steps (timed: at least min_cycles cycles when "
                "collision_every > 1); reported: median Adam step, median KO step (collision_every > 1: "
                "amortised, (median collision step + (collision_every - 1) median plain step) / "
                "collision_every) and their ratio"
            ),
        },
    }


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    values = list(values)
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: Sequence[float], digits: int = 3, scale: float = 1.0, sci: bool = False) -> str:
    m, s = mean_std([v * scale for v in values])
    return f"{m:.{digits}e} ± {s:.{digits - 1}e}" if sci else f"{m:.{digits}f} ± {s:.{digits}f}"


def paired_t(diffs: Sequence[float]) -> tuple[float, float]:
    """t statistic and two-sided p-value of a paired t-test of ``diffs`` against 0."""
    m, s = mean_std(diffs)
    n = len(diffs)
    if n < 2:
        return float("nan"), float("nan")
    if s == 0:
        return (0.0, 1.0) if m == 0 else (math.copysign(math.inf, m), 0.0)
    t = m / (s / math.sqrt(n))
    try:
        from scipy.stats import t as student_t

        p = float(2 * student_t.sf(abs(t), df=n - 1))
    except ImportError:  # scipy comes with scikit-learn; without it, no p-value
        p = float("nan")
    return t, p


def make_optimizer(params, base: str, lr: float, ko: bool, seed: int, momentum: float = 0.0, **ko_overrides):
    """The base optimizer (``torch.optim.Adam`` / ``SGD``) or KO over the same base."""
    if ko:
        kwargs = {**KO_DEFAULTS, **ko_overrides}
        if base == "sgd":
            return KO(params, lr=lr, base="sgd", momentum=momentum, seed=seed, **kwargs)
        return KO(params, lr=lr, base=base, seed=seed, **kwargs)
    if base == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return torch.optim.Adam(params, lr=lr)


def collision_size(weights: dict[str, Tensor]) -> dict[str, float]:
    """``||R||_F / ||G||_F``: how much KO's soft collision (the defaults) would change each gradient.

    ``R`` is the collision term (``G_new = G - R``, noise left out), computed from the weights and the
    gradients currently in ``.grad``; near 0 the collision is inactive, above 1 it reverses the gradient.
    """
    out = {}
    for name, p in weights.items():
        if p.grad is None or p.ndim < 2 or p.shape[0] < 2:
            continue
        new = collide(
            p, p.grad, KO_DEFAULTS["collision_rate"], KO_DEFAULTS["variant"], KO_DEFAULTS["threshold"]
        )
        out[name] = float(
            torch.linalg.vector_norm(new - p.grad) / torch.linalg.vector_norm(p.grad).clamp_min(1e-30)
        )
    return out


def section(title: str) -> None:
    print(f"\n{'=' * 100}\n{title}\n{'=' * 100}", flush=True)


# --------------------------------------------------------------------------------------------------
# 1. condensation
# --------------------------------------------------------------------------------------------------
def condensation_run(
    cfg: dict[str, Any], base: str, ko: bool, seed: int, x: Tensor, y: Tensor
) -> dict[str, Any]:
    opt_cfg = cfg["optimizers"]["Adam" if base == "adam" else "SGD"]
    X = torch.cat([x, torch.ones_like(x)], dim=1)  # [x, 1]: the bias is the second column of W
    torch.manual_seed(seed)
    W = nn.Parameter(torch.randn(cfg["hidden"], 2) * cfg["init_std"])  # rows [w_k | b_k]
    a = nn.Parameter(torch.randn(1, cfg["hidden"]) * cfg["init_std"])
    opt = make_optimizer([W, a], base, opt_cfg["lr"], ko, seed, momentum=opt_cfg.get("momentum", 0.0))
    steps = cfg["steps"]
    checkpoints = sorted({0, steps // 10, steps // 5, steps // 2, steps})
    trajectory = []
    for t in range(steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = ((torch.tanh(X @ W.T) @ a.T - y) ** 2).mean()
        loss.backward()
        if t in checkpoints:  # measured before the step, on this step's full-batch gradient
            size = collision_size({"W": W})["W"]
            trajectory.append(
                {"step": t, "mse": loss.item(), **condensation_stats(W), "collision_size": size}
            )
        if t == steps:
            break
        opt.step()
    final = trajectory[-1]
    return {
        "seed": seed,
        "final": final,
        "trajectory": trajectory,
        "diverged": not math.isfinite(final["mse"]),
    }


def run_condensation(cfg: dict[str, Any]) -> dict[str, Any]:
    section("1. Condensation: 2-layer tanh net, small init, 1-D regression (full batch)")
    g = torch.Generator().manual_seed(1234)
    x = torch.linspace(-1.0, 1.0, cfg["n_points"]).unsqueeze(1)
    y = torch.sin(3 * x) + cfg["noise_std"] * torch.randn(x.shape, generator=g)
    results: dict[str, list[dict[str, Any]]] = {}
    names = [
        ("Adam", "adam", False),
        ("KO(Adam)", "adam", True),
        ("SGD", "sgd", False),
        ("KO(SGD)", "sgd", True),
    ]
    for seed in range(cfg["seeds"]):
        t0 = time.perf_counter()
        parts = []
        for name, base, ko in names:
            r = condensation_run(cfg, base, ko, seed, x, y)
            results.setdefault(name, []).append(r)
            f = r["final"]
            parts.append(
                f"{name} cos {f['mean_abs_cos']:.3f} rank {f['effective_rank']:.3f} mse {f['mse']:.1e}"
            )
        print(f"  seed {seed}: " + " | ".join(parts) + f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    init = [r["trajectory"][0] for r in results["Adam"]]
    keys = ("mean_abs_cos", "max_abs_cos", "effective_rank", "mse", "collision_size")
    summary = {"init": {k: [s[k] for s in init] for k in keys}}
    for name, runs in results.items():
        summary[name] = {k: [r["final"][k] for r in runs] for k in keys}
    return {"runs": results, "summary": summary}


# --------------------------------------------------------------------------------------------------
# 2. accuracy
# --------------------------------------------------------------------------------------------------
def accuracy_run(
    cfg: dict[str, Any], data: dict[str, Tensor], base: str, ko: bool, seed: int
) -> dict[str, Any]:
    opt_cfg = cfg["optimizers"]["Adam" if base == "adam" else "SGD"]
    torch.manual_seed(seed)
    net = ConvNet(in_channels=1, num_classes=10, width=cfg["width"], depth=3, norm="instance", image_size=16)
    opt = make_optimizer(
        net.parameters(), base, opt_cfg["lr"], ko, seed, momentum=opt_cfg.get("momentum", 0.0)
    )
    order = torch.Generator().manual_seed(seed)
    x_train, y_train = data["x_train"], data["y_train"]
    n, bs = len(x_train), cfg["batch_size"]
    weights = {name: p for name, p in net.named_parameters() if p.ndim >= 2}

    def full_batch_collision_size() -> dict[str, float]:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x_train), y_train).backward()
        size = collision_size(weights)
        net.zero_grad(set_to_none=True)
        return size

    size_init = full_batch_collision_size()
    t0 = time.perf_counter()
    net.train()
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(n, generator=order)
        total, count = 0.0, 0
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
    seconds = time.perf_counter() - t0
    size_end = full_batch_collision_size()
    net.eval()
    with torch.no_grad():
        acc = float((net(data["x_test"]).argmax(1) == data["y_test"]).float().mean())
    cond = {name: condensation_stats(p)["mean_abs_cos"] for name, p in weights.items()}
    return {
        "seed": seed,
        "test_acc": acc,
        "last_epoch_train_loss": total / count,
        "mean_abs_cos_per_layer": cond,
        "mean_abs_cos_avg": statistics.fmean(cond.values()),
        "collision_size_init": size_init,
        "collision_size_end": size_end,
        "collision_size_init_avg": statistics.fmean(size_init.values()),
        "collision_size_end_avg": statistics.fmean(size_end.values()),
        "train_seconds": seconds,
    }


def run_accuracy(cfg: dict[str, Any]) -> dict[str, Any]:
    section(f"2. Accuracy: ConvNet-3 (width {cfg['width']}) on digits 16 px, {cfg['seeds']} seeds")
    dm = DigitsDataModule(image_size=16, channels=1, val_fraction=0.1, test_fraction=0.2, seed=0)
    dm.setup()
    x_train, y_train = dm.train_set.tensors
    x_test, y_test = dm.test_set.tensors
    data = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    print(
        f"  data: {len(x_train)} train, {len(x_test)} test images of shape {tuple(x_train.shape[1:])}",
        flush=True,
    )
    pairs = {"Adam": "adam", "SGD": "sgd"}
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in range(cfg["seeds"]):
        t0 = time.perf_counter()
        parts = []
        for name, base in pairs.items():
            for ko in (False, True):
                label = f"KO({name})" if ko else name
                r = accuracy_run(cfg, data, base, ko, seed)
                runs.setdefault(label, []).append(r)
                parts.append(f"{label} {r['test_acc']:.4f}")
        print(f"  seed {seed}: " + " | ".join(parts) + f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    summary = {}
    for name in pairs:
        base_acc = [r["test_acc"] for r in runs[name]]
        ko_acc = [r["test_acc"] for r in runs[f"KO({name})"]]
        diffs = [k - b for k, b in zip(ko_acc, base_acc)]
        t, p = paired_t(diffs)
        summary[name] = {
            "base_acc": base_acc,
            "ko_acc": ko_acc,
            "diff": diffs,
            "ko_wins": sum(d > 0 for d in diffs),
            "ties": sum(d == 0 for d in diffs),
            "ko_losses": sum(d < 0 for d in diffs),
            "paired_t": t,
            "paired_p": p,
            "base_mean_abs_cos": [r["mean_abs_cos_avg"] for r in runs[name]],
            "ko_mean_abs_cos": [r["mean_abs_cos_avg"] for r in runs[f"KO({name})"]],
            "ko_collision_size_init": [r["collision_size_init_avg"] for r in runs[f"KO({name})"]],
            "ko_collision_size_end": [r["collision_size_end_avg"] for r in runs[f"KO({name})"]],
            "base_train_loss": [r["last_epoch_train_loss"] for r in runs[name]],
            "ko_train_loss": [r["last_epoch_train_loss"] for r in runs[f"KO({name})"]],
            "base_seconds": [r["train_seconds"] for r in runs[name]],
            "ko_seconds": [r["train_seconds"] for r in runs[f"KO({name})"]],
        }
    return {"runs": runs, "summary": summary, "n_train": len(x_train), "n_test": len(x_test)}


# --------------------------------------------------------------------------------------------------
# 3. cost
# --------------------------------------------------------------------------------------------------
def flop_estimate(net: nn.Module, x: Tensor) -> dict[str, float]:
    """Rough FLOPs: forward + backward of the conv / linear layers (3 x forward) and one soft collision.

    A collision on an ``N x D`` matrix is three ``N x N x D`` matrix products (the two cosine matrices
    and ``S @ G``): ``6 N^2 D`` FLOPs. Norms, activations and the Adam update are left out.
    """
    macs: list[float] = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            macs.append(output.numel() * module.in_channels // module.groups * k)
        else:
            macs.append(output.numel() * module.in_features)

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    fwd_bwd = 3 * 2 * sum(macs)
    collision = sum(6 * p.shape[0] ** 2 * p[0].numel() for p in net.parameters() if p.ndim >= 2)
    return {"forward_backward": float(fwd_bwd), "collision": float(collision)}


def time_pair(net: nn.Module, x: Tensor, y: Tensor, every: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Interleaved timing of Adam and KO(Adam) on two copies of ``net`` (see the cost protocol)."""
    net_base, net_ko = copy.deepcopy(net), copy.deepcopy(net)
    opt_base = torch.optim.Adam(net_base.parameters(), lr=1e-3)
    opt_ko = KO(
        net_ko.parameters(), lr=1e-3, base="adam", seed=0, **{**KO_DEFAULTS, "collision_every": every}
    )

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    # Whole cycles of collision_every steps, so that KO collides on timed steps 0, every, 2 every, ...
    warm = math.ceil(cfg["warmup_steps"] / every) * every
    timed = math.ceil(max(cfg["timed_steps"], every * cfg["min_cycles"] if every > 1 else 1) / every) * every
    times: dict[str, list[float]] = {"base": [], "ko": []}
    for i in range(warm + timed):  # A B A B ...: load from other jobs hits both alike
        t_base = step(net_base, opt_base)
        t_ko = step(net_ko, opt_ko)
        if i >= warm:
            times["base"].append(t_base)
            times["ko"].append(t_ko)
    med_base = statistics.median(times["base"])
    out: dict[str, Any] = {"collision_every": every, "timed_steps": timed, "step_times_s": times}
    if every == 1:
        med_ko = statistics.median(times["ko"])
    else:
        # Amortised: (median collision step + (every - 1) median plain step) / every. Robust to bursts
        # of load, which a mean over the cycle is not.
        collide_steps = times["ko"][::every]
        plain_steps = [t for j, t in enumerate(times["ko"]) if j % every]
        out["median_ko_collision_step_s"] = statistics.median(collide_steps)
        out["median_ko_plain_step_s"] = statistics.median(plain_steps)
        med_ko = (out["median_ko_collision_step_s"] + (every - 1) * out["median_ko_plain_step_s"]) / every
    out.update(
        median_base_s=med_base,
        median_ko_s=med_ko,
        ratio=med_ko / med_base,
        mean_base_s=statistics.fmean(times["base"]),
        mean_ko_s=statistics.fmean(times["ko"]),
    )
    return out


def run_cost(cfg: dict[str, Any], threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    section(f"3. Cost: step time of KO(Adam) / Adam, interleaved, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    bs = cfg["batch_size"]
    x = torch.randn(bs, 3, 32, 32)
    y = torch.randint(0, 10, (bs,))
    models: dict[str, Callable[[], nn.Module]] = {
        "ConvNet-3": lambda: ConvNet(in_channels=3, num_classes=10, width=128, depth=3, image_size=32),
        "MLP": lambda: MLP(in_channels=3, image_size=32, num_classes=10, hidden_sizes=(1024, 1024)),
    }
    results: dict[str, Any] = {}
    for name, build in models.items():
        torch.manual_seed(0)
        net = build()
        flops = flop_estimate(net, x)
        predicted = 1 + flops["collision"] / flops["forward_backward"]
        for every in cfg["collision_every"][name]:
            t0 = time.perf_counter()
            r = time_pair(net, x, y, every, cfg)
            r["flops"] = flops
            r["flop_ratio_estimate"] = 1 + (predicted - 1) / every
            key = f"{name}" if every == 1 else f"{name} every={every}"
            results[key] = r
            extra = ""
            if every > 1:
                extra = (
                    f", KO collision step {r['median_ko_collision_step_s'] * 1e3:.1f} ms,"
                    f" plain step {r['median_ko_plain_step_s'] * 1e3:.1f} ms"
                )
            print(
                f"  {key:<18} Adam {r['median_base_s'] * 1e3:8.1f} ms  KO(Adam) {r['median_ko_s'] * 1e3:8.1f} ms  "
                f"ratio {r['ratio']:.3f} (FLOP estimate {r['flop_ratio_estimate']:.2f}){extra}"
                f"  ({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
    return results


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def summary_markdown(
    cfg: dict[str, Any],
    cond: dict[str, Any],
    acc: dict[str, Any],
    cost: dict[str, Any],
    threads: int,
    cost_load: list[float] | None = None,
) -> str:
    c, a = cfg["condensation"], cfg["accuracy"]
    lines = [
        f"**KO benchmark** (torch {torch.__version__}, {cpu_name()}, {os.cpu_count()} CPU cores; "
        f"`python -m benchmarks.ko{' --quick' if cfg['quick'] else ''}`). Mean ± std (ddof=1) over seeds.",
        "",
        f"*Condensation*: 2-layer tanh net, 1 -> {c['hidden']} -> 1, init N(0, {c['init_std']:g}²), "
        f"y = sin(3x) + noise on {c['n_points']} points, {c['steps']} full-batch steps, {c['seeds']} seeds; "
        "rows of [W | b] (first-layer weight with its bias). Adam lr "
        f"{c['optimizers']['Adam']['lr']:g}, SGD lr {c['optimizers']['SGD']['lr']:g} (no momentum); KO defaults. "
        "Collision ‖R‖/‖G‖: how much KO's collision changes the full-batch gradient of [W | b] at those weights "
        "(0: inactive, > 1: reversed). MSE noise floor 1e-4.",
        "",
        "| optimizer | mean abs cos | max abs cos | effective rank (max 2) | final train MSE | collision ‖R‖/‖G‖ |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("init", "Adam", "KO(Adam)", "SGD", "KO(SGD)"):
        s = cond["summary"][name]
        lines.append(
            f"| {'at init' if name == 'init' else name} | {fmt(s['mean_abs_cos'])} | {fmt(s['max_abs_cos'], 4)} | "
            f"{fmt(s['effective_rank'])} | {fmt(s['mse'], 2, sci=True)} | {fmt(s['collision_size'], 2)} |"
        )
    lines += [
        "",
        f"*Accuracy*: ConvNet-3 (width {a['width']}, instance norm) on digits 16 px ({acc['n_train']} train / "
        f"{acc['n_test']} test, fixed split), batch {a['batch_size']}, {a['epochs']} epochs, {a['seeds']} seeds "
        f"(init + data order + KO noise). Adam lr {a['optimizers']['Adam']['lr']:g}; SGD lr "
        f"{a['optimizers']['SGD']['lr']:g}, momentum 0.9. Test accuracy in %; mean abs cos and the "
        "collision ‖R‖/‖G‖ of the KO run (full training-set gradient, at init -> after training) averaged over "
        "the 4 weight layers.",
        "",
        "| pair | base acc | KO acc | KO - base (pp) | KO wins / ties / losses | paired t-test p "
        "| mean abs cos base / KO | collision ‖R‖/‖G‖ |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in acc["summary"].items():
        lines.append(
            f"| {name} vs KO({name}) | {fmt(s['base_acc'], 2, 100)} | {fmt(s['ko_acc'], 2, 100)} | "
            f"{fmt(s['diff'], 2, 100)} | {s['ko_wins']} / {s['ties']} / {s['ko_losses']} | {s['paired_p']:.2f} | "
            f"{statistics.fmean(s['base_mean_abs_cos']):.3f} / {statistics.fmean(s['ko_mean_abs_cos']):.3f} | "
            f"{statistics.fmean(s['ko_collision_size_init']):.3f} -> {statistics.fmean(s['ko_collision_size_end']):.3f} |"
        )
    k = cfg["cost"]
    lines += [
        "",
        f"*Cost*: median per-step time (zero_grad + forward + backward + step), Adam and KO(Adam) interleaved, "
        f"5-min load average after the section {cost_load[1] if cost_load else 'n/a'} on {os.cpu_count()} cores, "
        f"batch {k['batch_size']}, {threads} threads, {k['warmup_steps']} warm-up + {k['timed_steps']} timed steps "
        f"(collision_every > 1: at least {k['min_cycles']} cycles; KO time amortised as (median collision step + "
        "(every - 1) median plain step) / every). FLOP estimate: 1 + 6 N² D per weight matrix / forward-backward "
        "FLOPs of the conv and linear layers (/ every).",
        "",
        "| model | collision_every | Adam (ms) | KO(Adam) (ms) | ratio | FLOP estimate |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, r in cost.items():
        model = key.split(" every=")[0]
        desc = "ConvNet-3, w128, 3x32x32" if model == "ConvNet-3" else "MLP 3072-1024-1024-10"
        lines.append(
            f"| {desc} | {r['collision_every']} | {r['median_base_s'] * 1e3:.1f} | {r['median_ko_s'] * 1e3:.1f} | "
            f"{r['ratio']:.2f}x | {r['flop_ratio_estimate']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: few steps, epochs and seeds (< 1 min)"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds of the accuracy section (default 10; quick 2)"
    )
    parser.add_argument(
        "--cond-seeds", type=int, default=None, help="seeds of the condensation section (default 5; quick 2)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/benchmarks/ko.json"), help="JSON file for all raw numbers"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads for the cost section (default: the CPU core count)",
    )
    parser.add_argument(
        "--train-threads",
        type=int,
        default=1,
        help="torch threads for the training sections 1-2 (default 1: these nets are small, and "
        "one thread is not slowed down by other jobs on a shared machine)",
    )
    parser.add_argument(
        "--cost-timed-steps",
        type=int,
        default=None,
        help="timed steps of the cost section (default 30; quick 3), for a machine too loaded for the full count",
    )
    parser.add_argument(
        "--cost-min-cycles",
        type=int,
        default=None,
        help="least timed collision cycles when collision_every > 1 (default 10; quick 2)",
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["condensation", "accuracy", "cost"],
        help="sections to leave out",
    )
    args = parser.parse_args(argv)
    for flag in ("seeds", "cond_seeds", "threads", "train_threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")

    cfg = settings(args.quick, args.seeds, args.cond_seeds)
    cfg["quick"] = args.quick
    for flag, key in (("cost_timed_steps", "timed_steps"), ("cost_min_cycles", "min_cycles")):
        value = getattr(args, flag)
        if value is not None:
            if value < 1:
                parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
            cfg["cost"][key] = value
    start = time.perf_counter()
    machine = {
        **{k: v for k, v in environment().items() if k != "threads"},  # threads: the two below
        "lightning_eff": lightning_eff.__version__,
        "threads_training": args.train_threads,
        "threads_cost": args.threads,
        "interop_threads": torch.get_num_interop_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_1_5_15min": load_average(),
    }
    section("KO benchmark: protocol")
    for key, value in machine.items():
        print(f"  {key}: {value}")
    for name, sub in cfg.items():
        if isinstance(sub, dict):
            print(f"  [{name}]")
            for key, value in sub.items():
                print(f"    {key}: {value}")
    print(
        "  notes: std is the sample std (ddof=1); in section 1 the rows live in R^2, so with 64 of them"
        " some pair is always nearly parallel (max abs cos ~ 1 for any spread) and random rows give mean"
        " abs cos 2/pi = 0.637: mean abs cos and effective rank are the informative figures.",
        flush=True,
    )

    results: dict[str, Any] = {"machine": machine, "settings": cfg, "seconds": {}, "load_average_after": {}}
    torch.set_num_threads(args.train_threads)
    if "condensation" not in args.skip:
        t0 = time.perf_counter()
        results["condensation"] = run_condensation(cfg["condensation"])
        results["seconds"]["condensation"] = time.perf_counter() - t0
        results["load_average_after"]["condensation"] = load_average()
    if "accuracy" not in args.skip:
        t0 = time.perf_counter()
        results["accuracy"] = run_accuracy(cfg["accuracy"])
        results["seconds"]["accuracy"] = time.perf_counter() - t0
        results["load_average_after"]["accuracy"] = load_average()
    if "cost" not in args.skip:
        t0 = time.perf_counter()
        results["cost"] = run_cost(cfg["cost"], args.threads)
        results["seconds"]["cost"] = time.perf_counter() - t0
        results["load_average_after"]["cost"] = load_average()
    results["seconds"]["total"] = time.perf_counter() - start

    section("Summary (markdown)")
    if not args.skip:
        table = summary_markdown(
            cfg,
            results["condensation"],
            results["accuracy"],
            results["cost"],
            args.threads,
            results["load_average_after"].get("cost"),
        )
        results["summary_markdown"] = table
        print(table)
    else:
        print("  (summary table only for a run of all three sections)")
    secs = results["seconds"]
    print("\n  wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items()), flush=True)
    loads = {"start": machine["load_average_1_5_15min"], **results["load_average_after"]}
    print(
        f"  load average (1, 5, 15 min) on {os.cpu_count()} cores: "
        + ", ".join(f"{k} {v}" for k, v in loads.items()),
        flush=True,
    )

    write_json(args.out, results, indent=1, default=float)
    print(f"  raw numbers: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
