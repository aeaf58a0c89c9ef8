"""Think2Drive update speed on the CPU: updates per second before and after the speed work, interleaved.

Protocol: the small configuration's model (``configs/rl/think2drive_small.yaml``: 32x32x10 BEV, GRU 128,
dense 128, 8 x 8 latents, 255 bins, horizon 15) trained by a Lightning ``Trainer`` (manual optimisation,
three Adam optimisers, gradient clipping, logging on) on a fixed synthetic replay batch ``[16, 32]``
(sparse binary BEV masks, a few terminations), 1 thread. One *update* is one ``training_step``: one
world-model update plus ``planner_ratio`` actor-critic updates (1 and 4 are measured: the planner ratio
rises from 1 to 4 in the small config). The "before" code is the package at ``--base``, the "after" code the
package at ``--after`` (git revisions, extracted to a temporary folder; ``--after tree``: the working tree). The two alternate in separate processes
(``--rounds`` rounds, each timing ``--steps`` updates after ``--warmup``), so that the load of the
machine hits both alike; reported: the median seconds per update of each side, the ratio of the medians
and the ratio per round.

Run: ``python -m benchmarks.rl_update_speed --base 07e3277 --out benchmarks/results/rl_update_speed_cpu.json``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SMALL = dict(num_actions=35, bev_channels=10, bev_size=32, vec_dim=4, deter=128, units=128, mlp_layers=1,
             cnn_depth=8, stoch_groups=8, stoch_classes=8, bins=255, horizon=15, world_model_lr=3e-4,
             actor_lr=1e-4, critic_lr=1e-4)


def synthetic_batch(b: int = 16, t: int = 32, size: int = 32, seed: int = 0):
    """A replay-like batch: sparse binary BEV (about 10 % ones), terminations in a quarter of the sequences."""
    import torch

    g = torch.Generator().manual_seed(seed)
    bev = (torch.rand(b, t, 10, size, size, generator=g) < 0.1).to(torch.uint8)
    term = torch.zeros(b, t)
    term[: b // 4, -1] = 1.0
    is_first = torch.zeros(b, t)
    is_first[:, 0] = 1.0
    return {
        "bev": bev,
        "vec": torch.randn(b, t, 4, generator=g),
        "action": torch.randint(0, 35, (b, t), generator=g),
        "reward": torch.randn(b, t, generator=g),
        "terminal": term,
        "is_first": is_first,
        "from_termination": torch.zeros(b, dtype=torch.bool),
    }


def worker(steps: int, warmup: int, ratio: float, seed: int, overrides: dict) -> dict:
    import lightning as L
    import torch

    torch.set_num_threads(1)
    from lightning_eff.rl import Think2Drive

    L.seed_everything(seed, verbose=False)
    model = Think2Drive(**{**SMALL, **overrides}, planner_ratio_start=ratio, planner_ratio_end=ratio)
    batch = synthetic_batch()

    class Loader:
        def __iter__(self):
            while True:
                yield batch

    times: list[float] = []
    cpu: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, module, b, i):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, module, out, b, i):
            times.append(time.perf_counter() - self.t0)
            cpu.append(time.process_time() - self.c0)

    # not benchmarks.harness.quiet_trainer: the worker runs this file against an extracted old lightning_eff
    # (PYTHONPATH=<that tree>), where the benchmarks package is not importable
    trainer = L.Trainer(max_epochs=1, limit_train_batches=steps + warmup, accelerator="cpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[Timer()])
    trainer.fit(model, train_dataloaders=Loader())
    return {"times": times[warmup:], "cpu": cpu[warmup:], "wm_updates": model.wm_updates, "planner_updates": model.planner_updates}


def flops(overrides: dict, seed: int) -> dict:
    """Matmul/convolution GFLOP of one world-model update and of one actor-critic update (forward + backward),
    counted by ``torch.utils.flop_counter`` on the side's own code: independent of the machine's load."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    from lightning_eff.rl import Think2Drive
    from lightning_eff.rl.dreamer import RSSMState

    model = Think2Drive(**{**SMALL, **overrides})
    batch = synthetic_batch()
    with FlopCounterMode(display=False) as wm_count:
        wm_loss, post, _ = model.world_model_loss(batch)
        wm_loss.backward()
    if hasattr(model, "imagination_starts"):
        start, cont = model.imagination_starts(post, batch["terminal"])
    else:  # before imagine_last: every step of the batch
        start = RSSMState(post.deter.flatten(0, 1), post.stoch.flatten(0, 1), post.logits.flatten(0, 1)).detach()
        cont = 1.0 - batch["terminal"].transpose(0, 1).flatten()
    with FlopCounterMode(display=False) as ac_count:
        actor_loss, critic_loss, _ = model.behaviour_losses(start, cont)
        (actor_loss + critic_loss).backward()
    return {"world_model_gflop": wm_count.get_total_flops() / 1e9, "actor_critic_gflop": ac_count.get_total_flops() / 1e9}


def extract(base: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    data = subprocess.run(["git", "archive", base, "lightning_eff"], cwd=ROOT, check=True, capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(dest, filter="data")


def run_side(path: Path, steps: int, warmup: int, ratio: float, overrides: dict, count: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": str(path), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, "--worker", "--steps", str(steps), "--warmup", str(warmup), "--ratio", str(ratio),
           "--overrides", json.dumps(overrides)] + (["--flops"] if count else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=path)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--base", default="07e3277", help="git revision of the 'before' code")
    p.add_argument("--after", default="HEAD", help="git revision of the 'after' code ('tree': the working tree)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ratio", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--overrides", default="{}", help="(worker) JSON model overrides")
    p.add_argument("--after-model", nargs="*", default=[],
                   help='JSON model overrides of further sides "after_model", "after_model2", ... (the after code with '
                        'changed settings)')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flops", action="store_true", help="(worker) count FLOPs instead of timing")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.worker and args.flops:
        print(json.dumps(flops(json.loads(args.overrides), args.seed)))
        return
    if args.worker:
        print(json.dumps(worker(args.steps, args.warmup, args.ratio[0], args.seed, json.loads(args.overrides))))
        return
    from benchmarks import harness  # here, not at the top: the workers run this file outside the package

    rev = subprocess.run(["git", "rev-parse", "HEAD" if args.after == "tree" else args.after], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.strip()
    dirty = args.after == "tree" and bool(subprocess.run(["git", "status", "--porcelain", "lightning_eff"], cwd=ROOT,
                                                         capture_output=True, text=True).stdout.strip())
    base = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    sides = {"before": ("before", {}), "after": ("after", {})}
    for i, overrides in enumerate(args.after_model):
        sides["after_model" + (str(i + 1) if i else "")] = ("after", json.loads(overrides))
    print(f"protocol: small config {SMALL}, batch [16, 32], 1 thread, {args.rounds} interleaved rounds x "
          f"{args.steps} timed updates (after {args.warmup} warm-up) per side; before = {base[:10]}, after = "
          f"{'working tree at ' if args.after == 'tree' else ''}{rev[:10]}{' (modified)' if dirty else ''}; sides {[(k, v[1]) for k, v in sides.items()]}")
    print("Primary figure: CPU time of the (single-threaded) training process per update (time.process_time), "
          "less sensitive than wall time to the other jobs on this shared machine; wall time is reported too.")
    result = {"protocol": {"model": SMALL, "batch": [16, 32], "threads": 1, "rounds": args.rounds,
                           "steps_per_round": args.steps, "warmup": args.warmup, "before": base,
                           "after": rev + ("+modified" if dirty else ""),
                           "sides": {k: v[1] for k, v in sides.items()},
                           "load_average_at_start": os.getloadavg(), "cpu_count": os.cpu_count(),
                           "machine": platform.machine(), "command": " ".join(sys.argv),
                           "timer": "per training_step (one world-model update + planner_ratio actor-critic updates), "
                                    "Lightning callback on_train_batch_start/end; cpu = time.process_time",
                           "environment": harness.environment()},
              "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"before": Path(tmp) / "before", "after": ROOT if args.after == "tree" else Path(tmp) / "after"}
        extract(base, dirs["before"])
        if args.after != "tree":
            extract(rev, dirs["after"])
        result["flops"] = {}
        for side, (path, overrides) in sides.items():
            result["flops"][side] = run_side(dirs[path], 0, 0, 1.0, overrides, count=True)
        for side, f in result["flops"].items():
            for r in args.ratio:
                f[f"gflop_per_update_ratio_{r:g}"] = f["world_model_gflop"] + r * f["actor_critic_gflop"]
            print(f"{side}: world model {f['world_model_gflop']:.2f} GFLOP, actor-critic {f['actor_critic_gflop']:.2f} "
                  f"GFLOP per update (matmul + conv, forward + backward)", flush=True)
        for side, f in result["flops"].items():
            if side != "before":
                for r in args.ratio:
                    key = f"gflop_per_update_ratio_{r:g}"
                    f[f"flop_reduction_ratio_{r:g}"] = result["flops"]["before"][key] / f[key]
                    print(f"{side}: {result['flops']['before'][key]:.2f} -> {f[key]:.2f} GFLOP per update at planner "
                          f"ratio {r:g} ({f[f'flop_reduction_ratio_{r:g}']:.2f}x fewer)")
        if args.out:
            harness.write_json(args.out, result, indent=1)
        for ratio in args.ratio if args.rounds > 0 else []:  # --rounds 0: FLOP counts only
            rows = {k: {"cpu": [], "wall": []} for k in sides}
            for r in range(args.rounds):
                order = list(sides) if r % 2 == 0 else list(sides)[::-1]
                for side in order:
                    path, overrides = sides[side]
                    res = run_side(dirs[path], args.steps, args.warmup, ratio, overrides)
                    rows[side]["cpu"].append(statistics.median(res["cpu"]))
                    rows[side]["wall"].append(statistics.median(res["times"]))
                print(f"ratio {ratio:g} round {r}: " + ", ".join(
                    f"{k} {v['cpu'][-1] * 1e3:.0f} ms cpu / {v['wall'][-1] * 1e3:.0f} ms wall" for k, v in rows.items()),
                    flush=True)
            entry = {}
            for k, v in rows.items():
                entry[k] = {"cpu_s_per_update": v["cpu"], "wall_s_per_update": v["wall"],
                            "median_cpu_s": statistics.median(v["cpu"]), "median_wall_s": statistics.median(v["wall"]),
                            "updates_per_s_cpu": 1.0 / statistics.median(v["cpu"]),
                            "updates_per_s_wall": 1.0 / statistics.median(v["wall"])}
            for k in sides:
                if k == "before":
                    continue
                entry[f"speedup_{k}"] = {
                    "cpu_of_medians": entry["before"]["median_cpu_s"] / entry[k]["median_cpu_s"],
                    "wall_of_medians": entry["before"]["median_wall_s"] / entry[k]["median_wall_s"],
                    "cpu_per_round": [b / a for b, a in zip(rows["before"]["cpu"], rows[k]["cpu"])],
                    "wall_per_round": [b / a for b, a in zip(rows["before"]["wall"], rows[k]["wall"])],
                }
                print(f"planner ratio {ratio:g}, {k}: before {entry['before']['median_cpu_s'] * 1e3:.0f} ms cpu/update "
                      f"({entry['before']['updates_per_s_cpu']:.2f}/s), {k} {entry[k]['median_cpu_s'] * 1e3:.0f} ms "
                      f"({entry[k]['updates_per_s_cpu']:.2f}/s): speed-up {entry[f'speedup_{k}']['cpu_of_medians']:.2f}x "
                      f"cpu, {entry[f'speedup_{k}']['wall_of_medians']:.2f}x wall")
            result["results"][f"planner_ratio_{ratio:g}"] = entry
            if args.out:  # partial results survive an interrupted run
                harness.write_json(args.out, result, indent=1)
    if args.out:
        print("wrote", args.out)


if __name__ == "__main__":
    main()
