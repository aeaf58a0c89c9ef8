"""Think2Drive benchmark: baselines, a PPO peer at equal environment steps, the learning curve, the held-out
driving score and the update speed.

Protocol (printed at the start of every run):

1. (``--throughput``) Environment throughput: ``HighwayBEVEnv`` against the stock highway-env scene with
   its ``OccupancyGrid`` observation, interleaved rounds, medians, ratio.
2. Update speed: one Think2Drive update (world model + actor-critic, one backward pass) on a fixed
   ``[B, T]`` batch at the benchmark's model size, planner ratio 1 and 4, medians of interleaved rounds.
   With ``--update-baseline-root DIR`` the same probe also runs on the code in ``DIR`` (e.g. the
   checkout before the speed work), alternating the two in separate processes: before/after ratio.
3. Baselines on the held-out suite (``--eval-episodes`` per scenario, seeds ``2**31 + i``, never used
   for training or for choices): uniformly random actions; the best constant action of the table,
   chosen on validation seeds (``2**31 + 100000 + i``; ``benchmarks/rl_constant.py`` does the same
   scan, ``--constant-scan FILE`` reuses its choice); highway-env's IDM/MOBIL driver.
4. PPO peer (stable-baselines3): the same ``HighwayBEVEnv`` (observation, action table, reward), a small
   CNN features extractor, ``--num-envs`` environments, trained for the same ``--env-steps``, evaluated on
   the same curve points and held-out suite, greedy and sampled.
5. Think2Drive trained through Lightning (``DrivingDataModule`` + ``Think2Drive``) for ``--env-steps``,
   warm-up on light traffic, planner reset (brick 1), learning curve every ``--eval-every`` steps on the
   first ``--curve-episodes`` held-out seeds per scenario, then the full held-out suite, greedy and
   sampled. Checkpoints (with the replay) go to ``--work-dir``; rerunning the same command resumes
   each unfinished part (finished parts are read back from ``<work-dir>/<out name>.partial.json``), and
   ``--parts`` runs some parts only (e.g. the baselines and PPO while the agent code is still changing);
   parts run in parallel processes need their own ``--work-dir``, and ``--merge-partials`` gathers them.

Every evaluation also reports the fraction of steps spent on the policy's most frequent action
(1.0: the policy has collapsed to a constant action).

Usage::

    python -m benchmarks.rl --quick                      # smoke run, a few minutes
    python -m benchmarks.rl --env-steps 12000 --out benchmarks/results/rl_cpu.json   # the README's CPU run
    python -m benchmarks.rl --device cuda --num-envs 8 --env-steps 500000 --model paper --bev-size 128 \
        --resolution 1.0 --ego-row 96 --train-ratio 128 --batch-size 16 --sequence-length 64   # GPU protocol
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


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
        venv.step(rng.integers(int(venv.single_action_space.n), size=num_envs))
        n += num_envs
    rows.append({"scenario": f"vector x{num_envs} ({'+'.join(scenarios)})", "ours": n / (time.perf_counter() - t),
                 "stock": float("nan")})
    venv.close()
    return rows



DEFAULT_ACCELERATIONS = (-1.0, -0.4, 0.0, 0.4, 1.0)
DEFAULT_STEERINGS = (-1.0, -0.3, -0.08, 0.0, 0.08, 0.3, 1.0)


def small_model_kwargs(bev_size: int) -> dict:
    return dict(num_actions=35, bev_channels=10, bev_size=bev_size, vec_dim=4, deter=128, units=128, mlp_layers=1,
                cnn_depth=8, stoch_groups=8, stoch_classes=8, bins=255, horizon=15,
                world_model_lr=3e-4, actor_lr=1e-4, critic_lr=1e-4)


def paper_model_kwargs(bev_size: int) -> dict:
    """Think2Drive's sizes (GRU 512, dense 512 x 2, CNN multiplier 96, 32 x 32 latents): for a GPU."""
    return dict(num_actions=35, bev_channels=10, bev_size=bev_size, vec_dim=4, deter=512, units=512, mlp_layers=2,
                cnn_depth=96, stoch_groups=32, stoch_classes=32, bins=255, horizon=15)


def model_kwargs(args) -> dict:
    kw = (paper_model_kwargs if args.model == "paper" else small_model_kwargs)(args.bev_size)
    kw["num_actions"] = len(args.accelerations) * len(args.steerings)
    if args.bins:
        kw["bins"] = args.bins
    if args.imagine_last:
        kw["imagine_last"] = args.imagine_last
    return kw


# The update-speed probe runs in a fresh process on a given code root (before/after the speed work), so
# it only uses the public API both versions share.
UPDATE_PROBE = r"""
import json, statistics, sys, time, torch
torch.set_num_threads(int(sys.argv[5]))
from lightning_eff.rl import Think2Drive
from lightning_eff.rl.dreamer import RSSMState
kw, device, batch, seq, rounds = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[6])
torch.manual_seed(0)
model = Think2Drive(**kw).to(device)
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
size, ch = kw["bev_size"], kw["bev_channels"]
g = torch.Generator().manual_seed(0)
data = {"bev": torch.randint(0, 2, (batch, seq, ch, size, size), dtype=torch.uint8, generator=g),
        "vec": torch.randn(batch, seq, 4, generator=g), "action": torch.randint(0, kw["num_actions"], (batch, seq), generator=g),
        "reward": torch.randn(batch, seq, generator=g), "terminal": torch.zeros(batch, seq), "is_first": torch.zeros(batch, seq)}
data = {k: v.to(device) for k, v in data.items()}
def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()
def update(extra):
    sync(); t = time.perf_counter()
    loss, post, _ = model.world_model_loss(data)
    start = RSSMState(post.deter.flatten(0, 1), post.stoch.flatten(0, 1), post.logits.flatten(0, 1)).detach()
    cont = torch.ones(batch * seq, device=device)
    a, c, _ = model.behaviour_losses(start, cont)
    opt.zero_grad(); (loss + a + c).backward(); opt.step()
    for _ in range(extra):
        a, c, _ = model.behaviour_losses(start, cont)
        opt.zero_grad(); (a + c).backward(); opt.step()
    sync()
    return time.perf_counter() - t
update(0); update(3)
r1, r4 = [], []
for _ in range(rounds):
    r1.append(update(0)); r4.append(update(3))
print("PROBE" + json.dumps({"ratio1_s": r1, "ratio4_s": r4, "params": sum(p.numel() for p in model.parameters())}))
"""


def _probe(root: str, args, rounds: int) -> dict:
    import subprocess

    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-c", UPDATE_PROBE, json.dumps(model_kwargs(args)), args.device, str(args.batch_size),
           str(args.sequence_length), str(args.threads), str(rounds)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
    line = [x for x in out.stdout.splitlines() if x.startswith("PROBE")]
    if out.returncode != 0 or not line:
        raise RuntimeError(f"update probe failed on {root}:\n{out.stderr[-3000:]}")
    return json.loads(line[-1][5:])


def bench_updates(args, rounds: int) -> dict:
    """Median seconds per update on this checkout and (``--update-baseline-root``) on another, alternating."""
    roots = {"after": str(ROOT)}
    if args.update_baseline_root:
        roots = {"before": str(Path(args.update_baseline_root).resolve()), **roots}
    times: dict[str, dict[str, list[float]]] = {k: {"ratio1_s": [], "ratio4_s": []} for k in roots}
    params = {}
    for _ in range(rounds):
        for name, root in roots.items():
            res = _probe(root, args, rounds=2)
            times[name]["ratio1_s"] += res["ratio1_s"]
            times[name]["ratio4_s"] += res["ratio4_s"]
            params[name] = res["params"]
    out = {name: {"ratio1_s": statistics.median(t["ratio1_s"]), "ratio4_s": statistics.median(t["ratio4_s"]),
                  "params": params[name], "samples": t} for name, t in times.items()}
    if "before" in out:
        out["speedup_ratio1"] = out["before"]["ratio1_s"] / out["after"]["ratio1_s"]
        out["speedup_ratio4"] = out["before"]["ratio4_s"] / out["after"]["ratio4_s"]
    return out


class Counting:
    """Wraps a policy and counts its actions (to see whether it collapsed to one action)."""

    def __init__(self, policy) -> None:
        from lightning_eff.rl.policies import Policy

        self.policy, self.counts = policy, {}
        self.is_policy = isinstance(policy, Policy)

    def reset(self, env) -> None:
        if self.is_policy:
            self.policy.reset(env)

    def act(self, obs, env):
        a = self.policy.act(obs, env) if self.is_policy else self.policy(obs, env)
        key = int(a) if np.ndim(a) == 0 else "continuous"
        self.counts[key] = self.counts.get(key, 0) + 1
        return a


def evaluate(env, policy, episodes) -> dict:
    from lightning_eff.rl.policies import Policy, run_episode, summarize

    counter = Counting(policy)

    class _P(Policy):
        def reset(self, env):
            counter.reset(env)

        def act(self, obs, env):
            return counter.act(obs, env)

    records = [run_episode(env, _P(), scenario, seed) for scenario, seed in episodes]
    out = {"all": summarize(records)}
    for scenario in sorted({r["scenario"] for r in records}):
        out[scenario] = summarize([r for r in records if r["scenario"] == scenario])
    total = sum(counter.counts.values())
    top = max(counter.counts.items(), key=lambda kv: kv[1]) if counter.counts else (None, 0)
    out["actions"] = {"top_action": top[0], "top_fraction": top[1] / max(total, 1), "distinct": len(counter.counts)}
    out["episodes"] = [{k: v for k, v in r.items() if k in ("scenario", "seed", "driving_score", "route_completion",
                                                           "collision", "return", "length")} for r in records]
    return out


def _row(res: dict) -> str:
    a = res["all"]
    return (f"DS {a['driving_score']:.3f}  RC {a['route_completion']:.3f}  coll {a['collision']:.2f}  "
            f"return {a['return']:7.1f}  top action {res['actions']['top_fraction']:.2f}")


def make_eval_env(args):
    from lightning_eff.rl.envs import make_env

    return make_env("highway-bev", scenarios=args.eval_scenarios, **env_kwargs(args))


def env_kwargs(args) -> dict:
    kw = {"bev_size": args.bev_size, "resolution": args.resolution, "ego_row": args.ego_row}
    if (tuple(args.accelerations), tuple(args.steerings)) != (DEFAULT_ACCELERATIONS, DEFAULT_STEERINGS):
        from lightning_eff.rl.envs import default_action_table

        kw["action_table"] = default_action_table(args.accelerations, args.steerings).tolist()
    if args.lateral_resolution:
        kw["lateral_resolution"] = args.lateral_resolution
    return kw


def suites(args) -> tuple[list, list, list]:
    from lightning_eff.rl.data import EVAL_SEED_OFFSET

    val_offset = EVAL_SEED_OFFSET + 100_000
    # --suite validation: a probe for design choices, scored on validation seeds only (never the test seeds)
    offset = val_offset if args.suite == "validation" else EVAL_SEED_OFFSET
    test = [(s, offset + i) for s in args.eval_scenarios for i in range(args.eval_episodes)]
    curve = [(s, offset + i) for s in args.eval_scenarios for i in range(args.curve_episodes)]
    val = [(s, val_offset + i) for s in args.eval_scenarios for i in range(args.val_episodes)]
    return test, curve, val


def run_baselines(args) -> dict:
    from lightning_eff.rl.policies import ConstantPolicy, IDMPolicy, RandomPolicy

    test, _, val = suites(args)
    env = make_eval_env(args)
    out: dict = {}
    if args.constant_scan:
        with open(args.constant_scan) as f:
            scan = json.load(f)
        best, source = int(scan["best_action"]), args.constant_scan
    else:
        scan = {"val_scan": []}
        for a in range(len(env.action_table)):
            res = evaluate(env, ConstantPolicy(a), val)
            scan["val_scan"].append({"action": a, "driving_score": res["all"]["driving_score"]})
        best, source = max(scan["val_scan"], key=lambda r: r["driving_score"])["action"], "validation scan (this run)"
    print(f"  best constant action: {best} {env.action_table[best].round(2).tolist()} (chosen by {source})", flush=True)
    for name, policy in (("random", RandomPolicy(seed=0)), ("best_constant", ConstantPolicy(best)), ("idm", IDMPolicy())):
        t = time.perf_counter()
        out[name] = evaluate(env, policy, test)
        out[name]["eval_s"] = time.perf_counter() - t
        print(f"  {name:14s} {_row(out[name])}", flush=True)
    out["best_constant"]["action"] = best
    out["best_constant"]["command"] = env.action_table[best].tolist()
    out["best_constant"]["val_scan"] = scan["val_scan"]
    env.close()
    return out


def run_ppo(args, state: dict, save) -> dict:
    """stable-baselines3 PPO on the same HighwayBEVEnv, observation, action table and reward."""
    import functools

    import torch.nn as nn
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
    from stable_baselines3.common.vec_env import DummyVecEnv

    from lightning_eff.rl.envs import make_env

    class BEVExtractor(BaseFeaturesExtractor):
        """3 convolutions on the BEV masks (as read, in {0, 1}) + the ego vector, then one dense layer."""

        def __init__(self, space, features_dim: int = 256) -> None:
            super().__init__(space, features_dim)
            c, h, w = space["bev"].shape
            self.cnn = nn.Sequential(
                nn.Conv2d(c, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
                nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(), nn.Flatten(),
            )
            with torch.no_grad():
                n = self.cnn(torch.zeros(1, c, h, w)).shape[1]
            self.head = nn.Sequential(nn.Linear(n + space["vec"].shape[0], features_dim), nn.ReLU())

        def forward(self, obs):
            return self.head(torch.cat([self.cnn(obs["bev"].float()), obs["vec"].float()], dim=1))

    test, curve_suite, _ = suites(args)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "ppo_last.zip"
    fns = [functools.partial(make_env, "highway-bev", scenarios=args.train_scenarios, **env_kwargs(args))
           for _ in range(args.num_envs)]
    venv = DummyVecEnv(fns)
    venv.seed(args.seed)
    if args.ppo_normalize_reward:
        # rewards scaled by a running std of the discounted return (SB3's VecNormalize): the value loss of
        # returns of ~100 and crashes of -30 otherwise dominates the features extractor shared with the policy
        from stable_baselines3.common.vec_env import VecNormalize

        stats = work / "ppo_vecnormalize.pkl"
        venv = VecNormalize.load(str(stats), venv) if stats.exists() and ckpt.exists() else VecNormalize(
            venv, norm_obs=False, norm_reward=True, gamma=args.ppo_gamma)
    eval_env = make_eval_env(args)
    curve = state.setdefault("curve", [])
    if ckpt.exists():
        model = PPO.load(ckpt, env=venv, device="cpu")
        print(f"  resumed PPO at {model.num_timesteps} env steps from {ckpt}", flush=True)
    else:
        model = PPO("MultiInputPolicy", venv, n_steps=args.ppo_n_steps, batch_size=args.ppo_batch_size, n_epochs=10,
                    learning_rate=3e-4, gamma=args.ppo_gamma, gae_lambda=0.95, clip_range=0.2,
                    ent_coef=args.ppo_ent_coef, seed=args.seed, device="cpu", verbose=0,
                    policy_kwargs={"features_extractor_class": BEVExtractor, "normalize_images": False})
    start = time.perf_counter() - state.get("train_wall_s", 0.0)

    def greedy(m):
        return lambda obs, env: int(m.predict(obs, deterministic=True)[0])

    class Curve(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps >= (len(curve) + 1) * args.eval_every:
                t0 = time.perf_counter()
                res = evaluate(eval_env, greedy(self.model), curve_suite)
                row = {"env_steps": self.num_timesteps, "wall_s": time.perf_counter() - start,
                       "eval_s": time.perf_counter() - t0,
                       **{k: res["all"][k] for k in ("driving_score", "route_completion", "collision", "return")},
                       "top_action_fraction": res["actions"]["top_fraction"]}
                curve.append(row)
                print(f"  PPO env steps {row['env_steps']:7d}  DS {row['driving_score']:.3f}  "
                      f"coll {row['collision']:.2f}  return {row['return']:7.1f}  top action "
                      f"{row['top_action_fraction']:.2f}  [{row['wall_s'] / 60:.1f} min]", flush=True)
                self.model.save(ckpt)
                self.model.save(work / f"ppo_{self.num_timesteps}.zip")  # PPO at equal steps to a shorter run
                if args.ppo_normalize_reward:
                    venv.save(str(work / "ppo_vecnormalize.pkl"))
                state["train_wall_s"] = time.perf_counter() - start
                save()
            return True

    remaining = args.env_steps - model.num_timesteps
    if remaining > 0:
        model.learn(remaining, callback=Curve(), reset_num_timesteps=False)
        model.save(ckpt)
        if args.ppo_normalize_reward:
            venv.save(str(work / "ppo_vecnormalize.pkl"))
    state["train_wall_s"] = time.perf_counter() - start
    state["env_steps"] = int(model.num_timesteps)
    state["greedy"] = evaluate(eval_env, greedy(model), test)
    state["sampled"] = evaluate(eval_env, lambda obs, env: int(model.predict(obs, deterministic=False)[0]), test)
    print(f"  PPO greedy  {_row(state['greedy'])}\n  PPO sampled {_row(state['sampled'])}", flush=True)
    venv.close()
    eval_env.close()
    return state


def run_think2drive(args, state: dict, save) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from lightning_eff.rl import AgentPolicy, DrivingDataModule, Think2Drive

    test, curve_suite, _ = suites(args)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    eval_env = make_eval_env(args)
    L.seed_everything(args.seed, workers=True)
    steps_per_epoch = args.eval_every
    epochs = max(args.env_steps // steps_per_epoch, 1)
    expected_updates = int(max(args.env_steps - args.prefill, 0) * args.train_ratio / (args.batch_size * args.sequence_length))
    reset_every = args.planner_reset_interval
    if reset_every < 0:  # auto: one reset, half-way through the expected world-model updates
        reset_every = max(expected_updates // 2, 1)
    dm = DrivingDataModule(
        scenarios=args.train_scenarios, eval_scenarios=args.eval_scenarios, bev_size=args.bev_size,
        resolution=args.resolution,
        env_kwargs={k: v for k, v in env_kwargs(args).items() if k not in ("bev_size", "resolution")}, num_envs=args.num_envs,
        parallel=args.num_envs > 1, batch_size=args.batch_size, sequence_length=args.sequence_length,
        train_ratio=args.train_ratio, replay_capacity=args.replay_capacity or max(args.env_steps + 1000, 4096),
        prefill_steps=args.prefill,
        termination_window=args.sequence_length, warmup_scenarios=["highway_easy"], warmup_steps=args.warmup,
        env_steps_per_epoch=steps_per_epoch, val_episodes_per_scenario=0, save_replay=True, seed=args.seed,
    )
    model = Think2Drive(**{**model_kwargs(args), "planner_ratio_end": args.planner_ratio,
                           "planner_ratio_steps": args.planner_ratio_steps, "planner_reset_interval": reset_every})
    curve = state.setdefault("curve", [])
    state["planner_reset_interval"] = reset_every
    state["expected_wm_updates"] = expected_updates
    start = time.perf_counter() - state.get("train_wall_s", 0.0)

    class Curve(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            t0 = time.perf_counter()
            res = evaluate(eval_env, AgentPolicy(pl_module, greedy=True), curve_suite)
            row = {"env_steps": dm.env_steps, "wm_updates": pl_module.wm_updates,
                   "planner_resets": getattr(pl_module, "planner_resets", 0),
                   "wall_s": time.perf_counter() - start, "eval_s": time.perf_counter() - t0,
                   **{k: res["all"][k] for k in ("driving_score", "route_completion", "collision", "return")},
                   "top_action_fraction": res["actions"]["top_fraction"]}
            curve.append(row)
            print(f"  T2D env steps {row['env_steps']:7d}  updates {row['wm_updates']:6d}  DS {row['driving_score']:.3f}  "
                  f"coll {row['collision']:.2f}  return {row['return']:7.1f}  top action "
                  f"{row['top_action_fraction']:.2f}  [{row['wall_s'] / 60:.1f} min]", flush=True)
            state["train_wall_s"] = time.perf_counter() - start

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            save()  # the curve rows are saved with each checkpoint

    # one file, overwritten at every epoch end (save_top_k=0 would write no per-epoch "last" checkpoint)
    ckpt_cb = ModelCheckpoint(dirpath=work, filename="last", save_top_k=1, save_last=False, every_n_epochs=1,
                              enable_version_counter=False)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Curve(), ckpt_cb],
    )
    last = work / "last.ckpt"
    if args.evaluate_checkpoint:
        # training stopped early (time budget): evaluate the last epoch's checkpoint as it is
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["state_dict"])
        model.on_load_checkpoint(ckpt)
        dm.load_state_dict(ckpt[type(dm).__qualname__])
        state["stopped_early"] = True
        print(f"  evaluating {last} ({dm.env_steps} env steps): training not finished", flush=True)
    else:
        if last.exists():
            print(f"  resuming Think2Drive from {last}", flush=True)
        trainer.fit(model, datamodule=dm, ckpt_path=str(last) if last.exists() else None)
        state["train_wall_s"] = time.perf_counter() - start
    state["env_steps"] = dm.env_steps
    state["wm_updates"] = model.wm_updates
    state["greedy"] = evaluate(eval_env, AgentPolicy(model, greedy=True), test)
    state["sampled"] = evaluate(eval_env, AgentPolicy(model, greedy=False), test)
    print(f"  T2D greedy  {_row(state['greedy'])}\n  T2D sampled {_row(state['sampled'])}", flush=True)
    # the final agent, without the replay (weights, hyper-parameters and the environment's keyword arguments)
    final = work / "think2drive_final.ckpt"
    try:
        from lightning_eff.rl.agent_io import save_agent
    except ImportError:  # before agent_io: the parts of a Lightning checkpoint that load_agent reads
        torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                    "datamodule_hyper_parameters": dict(dm.hparams)}, final)
    else:
        save_agent(model, final, env_kwargs=dict(dm.env_kwargs), env_name=dm.env_name)
    state["final_ckpt"] = str(final)
    state["final_ckpt_mb"] = final.stat().st_size / 2**20
    if args.agent_out and state["final_ckpt_mb"] <= 10.0:
        import shutil

        shutil.copyfile(final, args.agent_out)
        state["agent_out"] = args.agent_out
    eval_env.close()
    return state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run at tiny budgets")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=["small", "paper"], default="small")
    p.add_argument("--bins", type=int, default=0, help="two-hot bins (0: the model size's 255)")
    p.add_argument("--imagine-last", type=int, default=0,
                   help="imagination starts from the last K steps of each sequence (0: all, DreamerV3's default)")
    p.add_argument("--parts", nargs="+", default=["updates", "baselines", "ppo", "think2drive"],
                   choices=["updates", "baselines", "ppo", "think2drive", "report"],
                   help="parts to run (report: none, only gather and print what the partial files hold)")
    p.add_argument("--env-steps", type=int, default=12_000, help="environment steps of Think2Drive and of PPO")
    p.add_argument("--eval-every", type=int, default=3_000)
    p.add_argument("--eval-episodes", type=int, default=20, help="held-out test episodes per scenario")
    p.add_argument("--curve-episodes", type=int, default=5, help="held-out episodes per scenario at each curve point")
    p.add_argument("--val-episodes", type=int, default=5, help="validation episodes per scenario (constant scan)")
    p.add_argument("--suite", choices=["test", "validation"], default="test",
                   help="seeds of the curve and of the final evaluation: the held-out test seeds 2**31 + i, or "
                        "(a probe for design choices) the validation seeds 2**31 + 100000 + i")
    p.add_argument("--constant-scan", default=None, help="JSON of benchmarks/rl_constant.py to take the action from")
    p.add_argument("--num-envs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sequence-length", type=int, default=32)
    p.add_argument("--train-ratio", type=float, default=32.0)
    p.add_argument("--planner-ratio", type=float, default=4.0)
    p.add_argument("--planner-ratio-steps", type=int, default=1000)
    p.add_argument("--planner-reset-interval", type=int, default=-1,
                   help="world-model updates between planner resets (0: never; -1: one reset half-way)")
    p.add_argument("--prefill", type=int, default=1000)
    p.add_argument("--replay-capacity", type=int, default=0,
                   help="transitions kept (0: env steps + 1000); keep it when resuming with more --env-steps")
    p.add_argument("--warmup", type=int, default=2000)
    p.add_argument("--bev-size", type=int, default=32)
    p.add_argument("--resolution", type=float, default=3.0)
    p.add_argument("--ego-row", type=float, default=26.0, help="BEV row of the ego (26 of 32 at 3 m/px: 78 m ahead)")
    p.add_argument("--lateral-resolution", type=float, default=1.0,
                   help="metres per BEV column (0: --resolution, square pixels); 1 m resolves the lane offset")
    p.add_argument("--ppo-n-steps", type=int, default=512, help="PPO rollout length per environment")
    p.add_argument("--ppo-batch-size", type=int, default=64)
    p.add_argument("--ppo-normalize-reward", type=int, default=1, choices=[0, 1],
                   help="1: SB3 VecNormalize(norm_reward=True) (0 in the runs before rl_cpu_v2)")
    p.add_argument("--accelerations", nargs="+", type=float, default=list(DEFAULT_ACCELERATIONS),
                   help="action table: normalised accelerations (x --steerings)")
    p.add_argument("--steerings", nargs="+", type=float, default=list(DEFAULT_STEERINGS),
                   help="action table: normalised steerings (default: the 35-action table)")
    p.add_argument("--ppo-gamma", type=float, default=0.99)
    p.add_argument("--ppo-ent-coef", type=float, default=0.01,
                   help="PPO entropy bonus (0.0 in the runs before rl_cpu_v2: PPO collapsed to one action)")
    p.add_argument("--train-scenarios", nargs="+", default=["highway", "merge"])
    p.add_argument("--eval-scenarios", nargs="+", default=["highway", "merge"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on the shared CPU machine)")
    p.add_argument("--throughput", action="store_true", help="also measure environment steps/s against stock")
    p.add_argument("--update-baseline-root", default=None, help="code root to time updates against (before)")
    p.add_argument("--update-rounds", type=int, default=3)
    p.add_argument("--work-dir", default="benchmarks/.rl_work", help="checkpoints (resume) and the final agent")
    p.add_argument("--agent-out", default=None, help="copy the final agent here if it is at most 10 MB")
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.add_argument("--evaluate-checkpoint", action="store_true",
                   help="do not train: evaluate Think2Drive's last checkpoint (a run stopped by the time budget)")
    p.add_argument("--merge-partials", nargs="*", default=[],
                   help="partial JSONs of parts run in other processes (other --work-dir) to include")
    args = p.parse_args()
    if args.quick:
        args.env_steps, args.eval_every, args.eval_episodes, args.curve_episodes, args.val_episodes = 300, 150, 1, 1, 1
        args.prefill, args.warmup, args.batch_size, args.sequence_length = 48, 48, 4, 8
        args.planner_ratio_steps, args.train_ratio, args.ppo_n_steps, args.update_rounds = 10, 8.0, 64, 1
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.set_num_threads(max(args.threads, min(4, os.cpu_count() or 1)))

    print("Think2Drive benchmark")
    print(f"  torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"  model {args.model}: {model_kwargs(args)}")
    print(f"  BEV {args.bev_size}x{args.bev_size} at {args.resolution} m/px, ego row {args.ego_row}: "
          f"{args.ego_row * args.resolution:.0f} m ahead, {(args.bev_size - args.ego_row) * args.resolution:.0f} m behind; "
          f"{args.lateral_resolution or args.resolution} m per column")
    print(f"  training: {args.env_steps} env steps on {args.train_scenarios} ({args.num_envs} envs) for Think2Drive "
          f"and for PPO; T2D batch {args.batch_size}x{args.sequence_length}, train ratio {args.train_ratio}, planner "
          f"ratio 1 -> {args.planner_ratio}, prefill {args.prefill}, warm-up {args.warmup} on highway_easy")
    seeds = ("VALIDATION seeds 2**31 + 100000 + i (a probe)" if args.suite == "validation"
             else "seeds 2**31 + i (never trained on)")
    print(f"  action table: {len(args.accelerations)} accelerations {args.accelerations} x {len(args.steerings)} "
          f"steerings {args.steerings}; PPO ent_coef {args.ppo_ent_coef}, reward normalisation {args.ppo_normalize_reward}")
    print(f"  evaluation suite: {args.eval_episodes} episodes x {args.eval_scenarios}, {seeds}; curve: first {args.curve_episodes} per scenario every {args.eval_every} env steps; greedy and sampled")
    print("  driving score: CARLA leaderboard 2.0 penalties incl. min speed and scenario time-out (0.7 each); "
          "DS_lb1 = the 1.0 set")

    partial_path = str(Path(args.work_dir) / (Path(args.out or "rl.json").name + ".partial.json"))
    results: dict = {"args": vars(args)}
    if os.path.exists(partial_path):
        with open(partial_path) as f:
            saved = json.load(f)
        results = {**saved, "args": vars(args), "args_of_saved_parts": saved.get("args")}
        print(f"  resuming: parts already in {partial_path}: {sorted(k for k in results if k != 'args')}")

    for other in args.merge_partials:
        with open(other) as f:
            extra = json.load(f)
        for key, value in extra.items():
            if key != "args" and key not in results:
                results[key] = value
        results.setdefault("args_of_merged_parts", {})[other] = extra.get("args")
        print(f"  merged parts {sorted(k for k in extra if k != 'args')} from {other}")

    def save() -> None:
        os.makedirs(os.path.dirname(partial_path) or ".", exist_ok=True)
        tmp = partial_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1, default=float)
        os.replace(tmp, partial_path)

    if args.throughput and "envs" not in results:
        rounds, steps = (2, 30) if args.quick else (5, 150)
        print(f"\n[1] environment steps/s (random actions, one process, median of {rounds} interleaved rounds)")
        rows = bench_envs(["highway", "merge"], rounds, steps, args.num_envs)
        for r in rows:
            print(f"  {r['scenario']:34s} {r['ours']:8.1f} vs stock {r['stock']:8.1f}")
        results["envs"] = rows
        save()
    if "updates" in args.parts and "updates" not in results:
        print(f"\n[2] update speed on {args.device} ({args.update_rounds} alternating rounds, medians)", flush=True)
        upd = bench_updates(args, args.update_rounds)
        for name in ("before", "after"):
            if name in upd:
                u = upd[name]
                print(f"  {name:6s} {u['params'] / 1e6:.2f} M parameters: ratio 1 {u['ratio1_s'] * 1000:.0f} ms/update, "
                      f"ratio 4 {u['ratio4_s'] * 1000:.0f} ms/update", flush=True)
        if "speedup_ratio1" in upd:
            print(f"  speed-up: {upd['speedup_ratio1']:.2f}x (ratio 1), {upd['speedup_ratio4']:.2f}x (ratio 4)")
        results["updates"] = upd
        save()
    if "baselines" in args.parts and "baselines" not in results:
        print("\n[3] baselines on the held-out suite", flush=True)
        results["baselines"] = run_baselines(args)
        save()
    if "ppo" in args.parts and not results.get("ppo", {}).get("greedy"):
        print(f"\n[4] PPO peer (stable-baselines3), {args.env_steps} env steps", flush=True)
        results["ppo"] = run_ppo(args, results.setdefault("ppo", {}), save)
        save()
    if "think2drive" in args.parts and not results.get("think2drive", {}).get("greedy"):
        print(f"\n[5] Think2Drive, {args.env_steps} env steps", flush=True)
        results["think2drive"] = run_think2drive(args, results.setdefault("think2drive", {}), save)
        save()

    tables = {}
    for name, key in (("random", ("baselines", "random")), ("best constant", ("baselines", "best_constant")),
                      ("IDM", ("baselines", "idm")), ("PPO", ("ppo", "greedy")), ("PPO sampled", ("ppo", "sampled")),
                      ("Think2Drive", ("think2drive", "greedy")), ("T2D sampled", ("think2drive", "sampled"))):
        table = results.get(key[0], {}).get(key[1])
        if table:
            tables[name] = table
    if tables:
        steps = {k: results.get(k, {}).get("env_steps") for k in ("ppo", "think2drive")}
        print(f"\nheld-out driving ({args.eval_episodes} episodes per scenario; env steps: PPO {steps['ppo']}, "
              f"Think2Drive {steps['think2drive']})")
        print(f"  {'scenario':10s} {'policy':14s} {'DS':>6s} {'DS_lb1':>6s} {'RC':>6s} {'coll':>6s} {'off-route':>9s} "
              f"{'blocked':>8s} {'time-out':>8s} {'minspd':>6s} {'return':>8s}")
        for scenario in [*args.eval_scenarios, "all"]:
            for name, table in tables.items():
                row = table[scenario]
                print(f"  {scenario:10s} {name:14s} {row['driving_score']:6.3f} {row['driving_score_lb1']:6.3f} "
                      f"{row['route_completion']:6.3f} {row['collision']:6.2f} {row['route_deviation']:9.2f} "
                      f"{row['timeout']:8.2f} {row['route_timeout']:8.2f} {row['min_speed_infractions']:6.2f} "
                      f"{row['return']:8.1f}")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1, default=float)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
