"""Why do the learners collapse to a constant action? Reward signal, observation sufficiency, action table.

Three probes on *validation* seeds (``2**31 + 100000 + i``: neither the training seeds nor the held-out
test seeds ``2**31 + i`` that ``benchmarks/rl.py`` reports):

``returns``
    Mean undiscounted and discounted return per episode (gamma 0.997 of Think2Drive and 0.99 of the PPO
    peer) and the driving score of reference drivers: IDM/MOBIL (continuous and snapped to the action
    table), the best constant action, random, and scripted drivers that keep their lane with IDM's
    lateral controller: at the target speed whatever is ahead (``keep_lane``), the same but braking
    hard when the lead is closer than 2 s (``keep_lane_brake``), and one that brakes to a standstill
    (``stop``). If the reward is aligned with the driving score, the returns rank like the scores and
    IDM's is clearly the highest.
``bc``
    Behaviour cloning of IDM snapped to the table, from the observation only (BEV + ego vector), with a
    small CNN, trained for ``--bc-grad-steps`` on ``--bc-steps`` transitions of training seeds with DAgger-
    style relabelling (the clone drives, IDM labels); driving score of the clone on validation seeds.
    If the clone drives, the observation holds what is needed.
``ppo`` (see ``benchmarks/rl.py --parts ppo``) is the fast probe of the action table and exploration.

Usage::

    python -m benchmarks.rl_diagnose --parts returns --out benchmarks/results/rl_diagnose_returns.json
    python -m benchmarks.rl_diagnose --parts bc --out benchmarks/results/rl_diagnose_bc.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

VAL_SEED_OFFSET = 2**31 + 100_000
TRAIN_SEED_OFFSET = 10_000  # training seeds of the BC data (the data module draws its own from args.seed)


def _idm_policy():
    from lightning_eff.rl.policies import IDMPolicy

    return IDMPolicy


class KeepLane:
    """IDM's lateral controller (lane keeping, no lane change) with a scripted longitudinal rule.

    ``mode``: ``"target"`` drives at the target speed (0.8 x limit) whatever is ahead; ``"brake"`` does the
    same but brakes fully while the lead is closer than ``headway`` seconds; ``"stop"`` brakes to a standstill.
    ``quantize`` snaps the command to the action table.
    """

    def __init__(self, mode: str, quantize: bool = True, headway: float = 2.0) -> None:
        self.inner = _idm_policy()(quantize=False, enable_lane_change=False)
        self.mode, self.quantize, self.headway = mode, quantize, headway

    def reset(self, env) -> None:
        self.inner.reset(env)

    def act(self, obs, env):
        base = env.unwrapped
        command = np.asarray(self.inner.act(obs, env), dtype=np.float32).copy()
        ego = base.sim.vehicle
        target = 0.8 * (ego.lane.speed_limit or 20.0)
        lo, hi = base.acceleration_range
        acc = float(np.clip(1.0 * (target - ego.speed), lo, hi))
        if self.mode == "brake":
            front, _ = base.sim.road.neighbour_vehicles(ego, ego.lane_index)
            if front is not None and ego.lane_distance_to(front) < self.headway * max(ego.speed, 1.0):
                acc = lo
        elif self.mode == "stop":
            acc = 0.4 * lo
        command[0] = np.clip((acc - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0)
        if not self.quantize:
            return command
        return int(np.argmin(((base.action_table - command) ** 2).sum(axis=1)))


def _episode(env, policy, scenario, seed, gammas, record=None):
    """One episode: the run_episode record plus discounted returns; ``record(obs, env)`` sees each observation."""
    from lightning_eff.rl.policies import Policy, run_episode

    rewards: list[float] = []

    class Wrapped(Policy):
        def reset(self, env):
            if hasattr(policy, "reset"):
                policy.reset(env)

        def act(self, obs, env):
            if record is not None:
                record(obs, env)
            return policy.act(obs, env) if hasattr(policy, "act") else policy(obs, env)

    step = env.step

    def spy(action):
        out = step(action)
        rewards.append(out[1])
        return out

    env.step = spy
    try:
        rec = run_episode(env, Wrapped(), scenario, seed)
    finally:
        del env.step
    for g in gammas:
        rec[f"return_g{g}"] = float(sum(r * g**t for t, r in enumerate(rewards)))
    return rec


def _summary(records, gammas):
    keys = ["driving_score", "driving_score_lb1", "route_completion", "collision", "timeout", "route_deviation",
            "return", "length", *[f"return_g{g}" for g in gammas]]
    out = {"all": {k: float(np.mean([r[k] for r in records])) for k in keys}}
    for s in sorted({r["scenario"] for r in records}):
        sub = [r for r in records if r["scenario"] == s]
        out[s] = {k: float(np.mean([r[k] for r in sub])) for k in keys}
    return out


def run_returns(args, env) -> dict:
    from lightning_eff.rl.policies import ConstantPolicy, IDMPolicy, RandomPolicy

    gammas = args.gammas
    val = [(s, VAL_SEED_OFFSET + i) for s in args.scenarios for i in range(args.episodes)]
    policies = {
        "idm": IDMPolicy(),
        "idm_quantized": IDMPolicy(quantize=True),
        "keep_lane_brake": KeepLane("brake"),
        "keep_lane": KeepLane("target"),
        "stop": KeepLane("stop"),
        "random": RandomPolicy(seed=0),
    }
    for a in args.constants:
        policies[f"constant_{a}"] = ConstantPolicy(a)
    if args.policies:
        policies = {k: v for k, v in policies.items() if k in args.policies}
    out = {}
    for name, pol in policies.items():
        t = time.perf_counter()
        recs = [_episode(env, pol, s, seed, gammas) for s, seed in val]
        out[name] = _summary(recs, gammas)
        a = out[name]["all"]
        print(f"  {name:16s} DS {a['driving_score']:.3f} RC {a['route_completion']:.3f} coll {a['collision']:.2f} "
              f"blocked {a['timeout']:.2f} off {a['route_deviation']:.2f} len {a['length']:6.1f} return "
              f"{a['return']:8.1f} " + " ".join(f"G{g} {a[f'return_g{g}']:7.1f}" for g in gammas)
              + f"  [{time.perf_counter() - t:.0f} s]", flush=True)
    return out


class SmallCNN(torch.nn.Module):
    """The PPO peer's features extractor (3 convolutions + the ego vector) with a linear action head."""

    def __init__(self, channels: int, size: int, vec_dim: int, actions: int) -> None:
        super().__init__()
        nn = torch.nn
        self.cnn = nn.Sequential(nn.Conv2d(channels, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
                                 nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            n = self.cnn(torch.zeros(1, channels, size, size)).shape[1]
        self.head = nn.Sequential(nn.Linear(n + vec_dim, 256), nn.ReLU(), nn.Linear(256, actions))

    def forward(self, bev, vec):
        return self.head(torch.cat([self.cnn(bev.float()), vec.float()], dim=1))


def run_bc(args, env) -> dict:
    """DAgger on IDM (snapped to the table): the clone drives after the first round, IDM labels every state."""
    from lightning_eff.rl.policies import IDMPolicy

    torch.manual_seed(0)
    c, h, w = env.observation_space["bev"].shape
    n_act = len(env.action_table)
    net = SmallCNN(c, h, 4, n_act)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    teacher = IDMPolicy(quantize=True)
    bevs, vecs, labels = [], [], []
    rng = np.random.default_rng(0)

    class Clone:
        def __init__(self, beta):
            self.beta = beta

        def reset(self, env):
            teacher.reset(env)

        def act(self, obs, env):
            label = teacher.act(obs, env)
            bevs.append(obs["bev"].copy())
            vecs.append(obs["vec"].copy())
            labels.append(label)
            if rng.random() < self.beta:
                return label
            with torch.no_grad():
                logits = net(torch.as_tensor(obs["bev"][None]), torch.as_tensor(obs["vec"][None]))
            return int(logits.argmax())

    def train(grad_steps):
        x = torch.as_tensor(np.stack(bevs))
        v = torch.as_tensor(np.stack(vecs))
        y = torch.as_tensor(np.asarray(labels))
        t, steps, losses = time.perf_counter(), 0, []
        while steps < grad_steps:
            idx = torch.randint(len(y), (64,))
            loss = torch.nn.functional.cross_entropy(net(x[idx], v[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            steps += 1
        with torch.no_grad():
            acc = float((net(x[-2000:], v[-2000:]).argmax(1) == y[-2000:]).float().mean())
        return {"grad_steps": steps, "train_s": time.perf_counter() - t, "loss": float(np.mean(losses[-50:])), "train_acc_last2000": acc,
                "transitions": len(y)}

    rounds = []
    seed = TRAIN_SEED_OFFSET
    per_round = args.bc_steps // args.bc_rounds
    gammas = args.gammas
    val = [(s, VAL_SEED_OFFSET + i) for s in args.scenarios for i in range(args.episodes)]
    for r in range(args.bc_rounds):
        beta = 1.0 if r == 0 else 0.0
        t = time.perf_counter()
        start = len(labels)
        while len(labels) - start < per_round:
            s = args.scenarios[seed % len(args.scenarios)]
            _episode(env, Clone(beta), s, seed, gammas)
            seed += 1
        collect_s = time.perf_counter() - t
        info = train(args.bc_grad_steps // args.bc_rounds)
        bevs_n = len(labels)
        recs = [_episode(env, _Greedy(net), s, sd, gammas) for s, sd in val]
        del bevs[bevs_n:], vecs[bevs_n:], labels[bevs_n:]
        summ = _summary(recs, gammas)
        rounds.append({"round": r, "beta": beta, "collect_s": collect_s, **info, "val": summ})
        a = summ["all"]
        print(f"  BC round {r}: {info['transitions']} transitions, {info['grad_steps']} steps, loss {info['loss']:.3f}, "
              f"acc {info['train_acc_last2000']:.2f} -> val DS {a['driving_score']:.3f} RC {a['route_completion']:.3f} "
              f"coll {a['collision']:.2f} off {a['route_deviation']:.2f} return {a['return']:.1f}", flush=True)
    return {"rounds": rounds, "final": rounds[-1]["val"]}


def run_world_model(args) -> dict:
    """Does the trained agent's world model foresee what a constant action does?

    From the first observation of each validation episode, the agent's world model imagines ``--wm-horizon``
    steps of each constant action (open loop: the same action at every step) and predicts their reward sum
    and the probability that the episode is still running; the simulator then drives the same action from
    the same reset. An actor trained in imagination exploits the actions whose predicted value exceeds their
    real one.
    """
    import torch.nn.functional as F

    from lightning_eff.rl import load_agent
    from lightning_eff.rl.dreamer.functional import symexp, twohot_decode
    from lightning_eff.rl.envs import make_env

    policy, env_kwargs = load_agent(args.agent)
    model = policy.module
    env = make_env(policy.env_name, scenarios=args.scenarios, **env_kwargs)
    n_act = len(env.action_table)
    h = args.wm_horizon
    pred_sum = np.zeros((n_act,))
    pred_alive = np.zeros((n_act,))
    real_sum = np.zeros((n_act,))
    real_alive = np.zeros((n_act,))
    episodes = [(s, VAL_SEED_OFFSET + i) for s in args.scenarios for i in range(args.episodes)]
    for scenario, seed in episodes:
        obs, _ = env.reset(seed=seed, options={"scenario": scenario})
        with torch.no_grad():
            bev, vec = model._obs_tensors(obs["bev"][None], obs["vec"][None])
            latent = model.rssm.observe_step(model.rssm.initial(1, model.device),
                                             torch.zeros(1, n_act), model.encoder(bev, vec), sample=False)
            state = type(latent)(*(x.expand(n_act, *x.shape[1:]) for x in (latent.deter, latent.stoch, latent.logits)))
            alive = torch.ones(n_act)
            total = torch.zeros(n_act)
            actions = torch.arange(n_act)
            for _ in range(h):
                state = model.rssm.imagine_step(state, actions, sample=False)
                feat = state.feat()
                reward = symexp(twohot_decode(model.reward_head(feat).softmax(-1), model.bins))
                total += alive * reward
                alive = alive * torch.sigmoid(model.continue_head(feat).squeeze(-1))
        pred_sum += total.numpy() / len(episodes)
        pred_alive += alive.numpy() / len(episodes)
        for a in range(n_act):
            env.reset(seed=seed, options={"scenario": scenario})
            ret, done = 0.0, False
            for _ in range(h):
                _, r, term, trunc, _ = env.step(a)
                ret += r
                if term or trunc:
                    done = True
                    break
            real_sum[a] += ret / len(episodes)
            real_alive[a] += (not done) / len(episodes)
    del F
    rank_pred = np.argsort(-pred_sum)
    rows = [{"action": int(a), "command": env.action_table[a].tolist(), "pred_reward_sum": float(pred_sum[a]),
             "real_reward_sum": float(real_sum[a]), "pred_alive": float(pred_alive[a]),
             "real_alive": float(real_alive[a])} for a in range(n_act)]
    corr = float(np.corrcoef(pred_sum, real_sum)[0, 1])
    print(f"  agent {args.agent}: {model.wm_updates} world-model updates; {h}-step open-loop constant actions, "
          f"{len(episodes)} validation starts; corr(predicted, real reward sum) {corr:.2f}")
    for a in rank_pred[:5]:
        r = rows[a]
        print(f"  predicted best: action {a} {np.round(r['command'], 2).tolist()}: predicted {r['pred_reward_sum']:.1f} "
              f"(alive {r['pred_alive']:.2f}), real {r['real_reward_sum']:.1f} (alive {r['real_alive']:.2f})")
    best_real = int(np.argmax(real_sum))
    print(f"  real best: action {best_real}: real {real_sum[best_real]:.1f}, predicted {pred_sum[best_real]:.1f}")
    return {"agent": args.agent, "wm_updates": int(model.wm_updates), "horizon": h, "starts": len(episodes),
            "corr_pred_real": corr, "actions": rows}


class _Greedy:
    def __init__(self, net):
        self.net = net

    def act(self, obs, env):
        with torch.no_grad():
            return int(self.net(torch.as_tensor(obs["bev"][None]), torch.as_tensor(obs["vec"][None])).argmax())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["returns"], choices=["returns", "bc", "wm"])
    p.add_argument("--scenarios", nargs="+", default=["highway", "merge"])
    p.add_argument("--episodes", type=int, default=5, help="validation episodes per scenario")
    p.add_argument("--gammas", nargs="+", type=float, default=[0.997, 0.99])
    p.add_argument("--constants", nargs="*", type=int, default=[17, 10, 9],
                   help="constant actions to score (17: coast straight, 10: brake gently, 9: PPO's collapse)")
    p.add_argument("--bev-size", type=int, default=32)
    p.add_argument("--resolution", type=float, default=3.0)
    p.add_argument("--ego-row", type=float, default=26.0)
    p.add_argument("--env-kwargs", default="{}", help="extra HighwayBEVEnv keyword arguments (JSON)")
    p.add_argument("--policies", nargs="*", default=[], help="returns part: only these drivers (default: all)")
    p.add_argument("--steerings", nargs="*", type=float, default=[],
                   help="action table's steerings (x the default 5 accelerations; default: the 35-action table)")
    p.add_argument("--bc-steps", type=int, default=6000, help="transitions labelled by IDM over all BC rounds")
    p.add_argument("--bc-rounds", type=int, default=3, help="DAgger rounds (the first one is driven by IDM)")
    p.add_argument("--bc-grad-steps", type=int, default=600, help="gradient steps (batch 64) over all rounds")
    p.add_argument("--agent", default="benchmarks/results/think2drive_cpu.ckpt", help="agent of the wm part")
    p.add_argument("--wm-horizon", type=int, default=15, help="imagined steps (Think2Drive's horizon)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from lightning_eff.rl.envs import HighwayBEVEnv

    kw = {"bev_size": args.bev_size, "resolution": args.resolution, "ego_row": args.ego_row,
          **json.loads(args.env_kwargs)}
    if args.steerings:
        from lightning_eff.rl.envs import default_action_table

        kw["action_table"] = default_action_table(steerings=args.steerings).tolist()
    env = HighwayBEVEnv(args.scenarios, **kw)
    print(f"Think2Drive diagnosis on validation seeds 2**31 + 100000 + i ({args.episodes} per scenario of "
          f"{args.scenarios}); env {kw}; reward {env.reward_weights}")
    results: dict = {"args": vars(args), "env_kwargs": kw, "reward": dict(vars(env.reward_weights))}
    if "returns" in args.parts:
        print("\n[returns] mean per episode (undiscounted and discounted) and driving score")
        results["returns"] = run_returns(args, env)
    if "bc" in args.parts:
        print(f"\n[bc] DAgger behaviour cloning of IDM (snapped to the table), {args.bc_steps} transitions, "
              f"{args.bc_grad_steps} gradient steps of batch 64")
        results["bc"] = run_bc(args, env)
    if "wm" in args.parts:
        print("\n[wm] the agent's world model against the simulator, constant actions")
        results["wm"] = run_world_model(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
