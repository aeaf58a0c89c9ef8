"""Think2Drive benchmark: simulator throughput, update speed, a learning curve and the held-out driving score.

Protocol (printed at the start of every run):

1. Environment throughput. ``HighwayBEVEnv`` (our BEV rasteriser + Think2Drive reward) against the
   stock highway-env scene with its ``OccupancyGrid`` observation and ``DiscreteAction`` (the
   baseline), same physics rates (10 Hz simulation, 5 Hz decisions), random actions, one process.
   Runs are interleaved A, B, A, B, ...; medians of the rounds are reported with the ratio. Then the
   vectorised environments (``AsyncVectorEnv``, ``--num-envs`` processes).
2. Update speed. One Think2Drive update (world model + actor-critic, one backward pass) on a
   ``[B, T]`` batch at the *small* size (GRU 128, dense 128, 8x8 latents, 32x32 BEV), interleaved
   with an update at planner ratio 4 (brick 6: three extra actor-critic updates), medians.
3. Learning. Think2Drive trained through Lightning (``DrivingDataModule`` + ``Think2Drive``) for
   ``--env-steps`` environment steps on highway + merge (warm-up on light traffic), evaluated on the
   held-out suite (seeds never seen in training) every ``--eval-every`` steps: the learning curve.
   Final table: Think2Drive vs a uniformly random driver vs highway-env's IDM/MOBIL driver on the
   held-out suite (driving score, route completion, collision rate per scenario).

Usage::

    python benchmarks/rl.py --quick                      # < 1 min smoke run
    python benchmarks/rl.py --env-steps 25000 --eval-episodes 10   # CPU: 57 min on 2 cores shared with other
                                                                   # jobs (the README's figures)
    python benchmarks/rl.py --device cuda --num-envs 12 --env-steps 200000 --train-ratio 64
"""

from __future__ import annotations

import sys
from pathlib import Path

# ``python benchmarks/rl.py`` puts benchmarks/ first on sys.path, where a sibling script named like a
# standard module (benchmarks/select.py) would shadow it: drop that entry, add the repository root.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _stock_env(scenario: str):
    from lightning_eff.rl.envs.highway import SCENARIO_SPECS, _highway_env

    spec = SCENARIO_SPECS[scenario]
    cls = getattr(_highway_env(), spec.env_class)
    config = {
        "observation": {"type": "OccupancyGrid", "grid_size": [[-32, 32], [-32, 32]], "grid_step": [2, 2],
                        "features": ["presence", "on_road"], "align_to_vehicle_axes": True},
        "action": {"type": "DiscreteAction", "actions_per_axis": 5},
        "simulation_frequency": 10,
        "policy_frequency": 5,
        **spec.config,
    }
    return cls(config=config)


def _rate(env, steps: int, rng: np.random.Generator, seed: int) -> float:
    env.reset(seed=seed)
    n_actions = int(env.action_space.n)
    t = time.perf_counter()
    for _ in range(steps):
        _, _, term, trunc, _ = env.step(int(rng.integers(n_actions)))
        if term or trunc:
            env.reset()
    return steps / (time.perf_counter() - t)


def bench_envs(scenarios: list[str], rounds: int, steps: int, num_envs: int) -> list[dict]:
    from lightning_eff.rl.envs import HighwayBEVEnv

    rows = []
    for scenario in scenarios:
        ours = HighwayBEVEnv(scenario, bev_size=32, resolution=2.0)
        stock = _stock_env(scenario)
        rng = np.random.default_rng(0)
        a, b = [], []
        for r in range(rounds):
            a.append(_rate(ours, steps, rng, seed=r))
            b.append(_rate(stock, steps, rng, seed=r))
        rows.append({"scenario": scenario, "ours": statistics.median(a), "stock": statistics.median(b)})
        ours.close()
        stock.close()
    # vectorised, in processes
    import functools

    import gymnasium as gym

    from lightning_eff.rl.envs import make_env

    fns = [functools.partial(make_env, "highway-bev", scenarios=scenarios, bev_size=32, resolution=2.0)
           for _ in range(num_envs)]
    venv = gym.vector.AsyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    venv.reset(seed=list(range(num_envs)))
    rng = np.random.default_rng(1)
    t = time.perf_counter()
    n = 0
    for _ in range(max(steps // 2, 10)):
        venv.step(rng.integers(35, size=num_envs))
        n += num_envs
    rows.append({"scenario": f"vector x{num_envs} ({'+'.join(scenarios)})", "ours": n / (time.perf_counter() - t),
                 "stock": float("nan")})
    venv.close()
    return rows


def small_model_kwargs(bev_size: int) -> dict:
    return dict(num_actions=35, bev_channels=10, bev_size=bev_size, vec_dim=4, deter=128, units=128, mlp_layers=1,
                cnn_depth=8, stoch_groups=8, stoch_classes=8, bins=255, horizon=15,
                world_model_lr=3e-4, actor_lr=1e-4, critic_lr=1e-4)


def bench_updates(device: str, batch: int, seq: int, rounds: int, bev_size: int) -> dict:
    from lightning_eff.rl import Think2Drive
    from lightning_eff.rl.dreamer import RSSMState

    torch.manual_seed(0)
    model = Think2Drive(**small_model_kwargs(bev_size)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = {
        "bev": torch.randint(0, 2, (batch, seq, 10, bev_size, bev_size), dtype=torch.uint8),
        "vec": torch.randn(batch, seq, 4),
        "action": torch.randint(0, 35, (batch, seq)),
        "reward": torch.randn(batch, seq),
        "terminal": torch.zeros(batch, seq),
        "is_first": torch.zeros(batch, seq),
    }
    data = {k: v.to(device) for k, v in data.items()}

    def update(extra_planner: int) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss, post, _ = model.world_model_loss(data)
        start = RSSMState(post.deter.flatten(0, 1), post.stoch.flatten(0, 1), post.logits.flatten(0, 1)).detach()
        cont = torch.ones(batch * seq, device=device)
        a, c, _ = model.behaviour_losses(start, cont)
        opt.zero_grad()
        (loss + a + c).backward()
        opt.step()
        for _ in range(extra_planner):
            a, c, _ = model.behaviour_losses(start, cont)
            opt.zero_grad()
            (a + c).backward()
            opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    update(0)
    update(3)  # warm-up
    r1, r4 = [], []
    for _ in range(rounds):
        r1.append(update(0))
        r4.append(update(3))
    params = sum(p.numel() for p in model.parameters())
    return {"ratio1_s": statistics.median(r1), "ratio4_s": statistics.median(r4), "params": params}


def evaluate(env, policy, episodes) -> dict:
    from lightning_eff.rl.policies import evaluate_policy, summarize

    records = evaluate_policy(env, policy, episodes)
    out = {"all": summarize(records)}
    for scenario in sorted({r["scenario"] for r in records}):
        out[scenario] = summarize([r for r in records if r["scenario"] == scenario])
    return out


def learn(args) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from lightning_eff.rl import AgentPolicy, DrivingDataModule, Think2Drive
    from lightning_eff.rl.data import EVAL_SEED_OFFSET
    from lightning_eff.rl.envs import make_env
    from lightning_eff.rl.policies import IDMPolicy, RandomPolicy

    bev = args.bev_size
    suite = [(s, EVAL_SEED_OFFSET + i) for s in args.eval_scenarios for i in range(args.eval_episodes)]
    eval_env = make_env("highway-bev", scenarios=args.eval_scenarios, bev_size=bev, resolution=args.resolution)

    print(f"\n[3] baselines on the held-out suite ({len(suite)} episodes)", flush=True)
    baselines = {
        "random": evaluate(eval_env, RandomPolicy(seed=0), suite),
        "idm": evaluate(eval_env, IDMPolicy(), suite),
    }
    for name, res in baselines.items():
        print(f"  {name:8s} DS {res['all']['driving_score']:.3f}  RC {res['all']['route_completion']:.3f}  "
              f"collisions {res['all']['collision']:.2f}", flush=True)

    L.seed_everything(args.seed, workers=True)
    steps_per_epoch = args.eval_every
    epochs = max(args.env_steps // steps_per_epoch, 1)
    dm = DrivingDataModule(
        scenarios=args.train_scenarios, eval_scenarios=args.eval_scenarios, bev_size=bev, resolution=args.resolution,
        num_envs=args.num_envs, parallel=args.num_envs > 1, batch_size=args.batch_size,
        sequence_length=args.sequence_length, train_ratio=args.train_ratio, replay_capacity=max(args.env_steps + 1000, 4096),
        prefill_steps=args.prefill, termination_window=64, warmup_scenarios=["highway_easy"],
        warmup_steps=args.warmup, env_steps_per_epoch=steps_per_epoch, val_episodes_per_scenario=0,
        save_replay=False, seed=args.seed,
    )
    model = Think2Drive(**{**small_model_kwargs(bev), "planner_ratio_end": args.planner_ratio,
                           "planner_ratio_steps": args.planner_ratio_steps})
    curve = []

    class Curve(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            t0 = time.perf_counter()
            res = evaluate(eval_env, AgentPolicy(pl_module, greedy=True), suite)
            row = {"env_steps": dm.env_steps, "wm_updates": pl_module.wm_updates,
                   "wall_s": time.perf_counter() - start_time, "eval_s": time.perf_counter() - t0,
                   **{k: res["all"][k] for k in ("driving_score", "route_completion", "collision", "return")},
                   "per_scenario": {s: res[s]["driving_score"] for s in res if s != "all"}}
            curve.append(row)
            print(f"  env steps {row['env_steps']:7d}  updates {row['wm_updates']:6d}  DS {row['driving_score']:.3f}  "
                  f"RC {row['route_completion']:.3f}  coll {row['collision']:.2f}  return {row['return']:7.1f}  "
                  f"[{row['wall_s'] / 60:.1f} min]", flush=True)
            self.final = res

    cb = Curve()
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[cb],
    )
    print(f"\n[3] Think2Drive learning curve ({args.env_steps} env steps, eval every {steps_per_epoch})", flush=True)
    start_time = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    train_wall = time.perf_counter() - start_time
    sampled = evaluate(eval_env, AgentPolicy(model, greedy=False), suite)
    eval_env.close()
    return {"baselines": baselines, "think2drive": cb.final, "think2drive_sampled": sampled, "curve": curve,
            "train_wall_s": train_wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="< 1 min smoke run at tiny budgets")
    p.add_argument("--device", default="cpu")
    p.add_argument("--env-steps", type=int, default=20_000)
    p.add_argument("--eval-every", type=int, default=2_500)
    p.add_argument("--eval-episodes", type=int, default=5, help="held-out episodes per evaluation scenario")
    p.add_argument("--num-envs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sequence-length", type=int, default=32)
    p.add_argument("--train-ratio", type=float, default=32.0)
    p.add_argument("--planner-ratio", type=float, default=4.0)
    p.add_argument("--planner-ratio-steps", type=int, default=1000)
    p.add_argument("--prefill", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=2000)
    p.add_argument("--bev-size", type=int, default=32)
    p.add_argument("--resolution", type=float, default=2.0)
    p.add_argument("--train-scenarios", nargs="+", default=["highway", "merge"])
    p.add_argument("--eval-scenarios", nargs="+", default=["highway", "merge"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args()
    if args.quick:
        args.env_steps, args.eval_every, args.eval_episodes = 160, 80, 1
        args.prefill, args.warmup, args.batch_size, args.sequence_length = 48, 48, 4, 8
        args.planner_ratio_steps, args.train_ratio = 10, 8.0
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)) if args.device.startswith("cuda") else 1)

    print("Think2Drive benchmark")
    print(f"  torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"  small model: GRU 128, dense 128 x1, CNN depth 8, latents 8x8, BEV {args.bev_size}x{args.bev_size} "
          f"at {args.resolution} m/px, batch {args.batch_size}x{args.sequence_length}, horizon 15")
    print(f"  training: {args.env_steps} env steps on {args.train_scenarios} ({args.num_envs} envs), train ratio "
          f"{args.train_ratio}, planner ratio 1 -> {args.planner_ratio}, prefill {args.prefill}, warm-up {args.warmup}")
    print(f"  held-out suite: {args.eval_episodes} episodes x {args.eval_scenarios}, seeds >= 2**31 (never trained on)")
    results: dict = {"args": vars(args)}

    if not args.skip_throughput:
        rounds, steps = (2, 30) if args.quick else (5, 150)
        scen = ["highway", "merge"] if args.quick else ["highway", "merge", "roundabout", "intersection"]
        print(f"\n[1] environment steps/s (random actions, one process, median of {rounds} interleaved rounds)")
        rows = bench_envs(scen, rounds, steps, args.num_envs)
        print(f"  {'scenario':34s} {'HighwayBEVEnv':>14s} {'stock+OccGrid':>14s} {'ratio':>7s}")
        for r in rows:
            print(f"  {r['scenario']:34s} {r['ours']:14.1f} {r['stock']:14.1f} {r['ours'] / r['stock']:7.2f}")
        results["envs"] = rows
        upd_rounds = 2 if args.quick else 5
        print(f"\n[2] update speed on {args.device} (median of {upd_rounds} interleaved rounds)")
        upd = bench_updates(args.device, args.batch_size, args.sequence_length, upd_rounds, args.bev_size)
        print(f"  {upd['params'] / 1e6:.2f} M parameters; planner ratio 1: {upd['ratio1_s'] * 1000:.0f} ms/update "
              f"({1 / upd['ratio1_s']:.2f}/s); ratio 4: {upd['ratio4_s'] * 1000:.0f} ms/update "
              f"({1 / upd['ratio4_s']:.2f}/s); ratio4/ratio1 = {upd['ratio4_s'] / upd['ratio1_s']:.2f}")
        results["updates"] = upd

    res = learn(args)
    results.update(res)
    print(f"\nheld-out driving after {args.env_steps} env steps ({res['train_wall_s'] / 60:.1f} min of training)")
    print(f"  {'scenario':14s} {'policy':12s} {'DS':>6s} {'RC':>6s} {'coll':>6s} {'off-route':>9s} {'blocked':>8s} "
          f"{'time-out':>8s} {'return':>8s}")
    print("  (Think2Drive: greedy actor; T2D sampled: actions sampled from the actor; coll / off-route / blocked /")
    print("   time-out: fraction of episodes ended by a collision, by leaving the route or the road, by standing")
    print("   still, by the scenario's time limit)")
    for scenario in [*args.eval_scenarios, "all"]:
        for name, table in (("random", res["baselines"]["random"]), ("IDM", res["baselines"]["idm"]),
                            ("Think2Drive", res["think2drive"]), ("T2D sampled", res["think2drive_sampled"])):
            row = table[scenario]
            print(f"  {scenario:14s} {name:12s} {row['driving_score']:6.3f} {row['route_completion']:6.3f} "
                  f"{row['collision']:6.2f} {row['route_deviation']:9.2f} {row['timeout']:8.2f} "
                  f"{row['route_timeout']:8.2f} {row['return']:8.1f}")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1, default=float)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
