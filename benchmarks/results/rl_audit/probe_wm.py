# ruff: noqa: E402, E701, E702
# One-off probe of the issue-17 audit (kept as run; see benchmarks/rl_audit.py for the maintained measurements).
"""Is the world model's poor reward prediction a bug or too few updates?

1. Collect episodes on training seeds (the committed agent, sampled, and a random driver) into a
   TerminationPriorityReplay; held-out episodes on validation seeds (agent greedy + sampled).
2. Train a *fresh* world model of the same size (world-model loss only, batch 16 x 32, as online) and report
   the held-out reward prediction (corr, MAE, bias, regression on the reward terms) every --every updates.
3. Linear probe on the committed agent's frozen posterior features: can the reward be read from them?
"""
import argparse
import json
import time

import numpy as np
import torch

torch.set_num_threads(1)
from lightning_eff.rl import Think2Drive, load_agent
from lightning_eff.rl.dreamer import symexp, twohot_decode
from lightning_eff.rl.envs import HighwayBEVEnv
from lightning_eff.rl.policies import RandomPolicy
from lightning_eff.rl.replay import TerminationPriorityReplay

p = argparse.ArgumentParser()
p.add_argument("--agent", default="benchmarks/results/think2drive_cpu.ckpt")
p.add_argument("--train-steps", type=int, default=4000)
p.add_argument("--updates", type=int, default=1500)
p.add_argument("--every", type=int, default=250)
p.add_argument("--out", default="/tmp/i17c/probe_wm.json")
args = p.parse_args()

policy, env_kwargs = load_agent(args.agent)
agent = policy.module
env = HighwayBEVEnv(["highway", "merge"], **env_kwargs)

def episode(drv, scen, seed):
    obs, _ = env.reset(seed=seed, options={"scenario": scen})
    drv.reset(env)
    rows = [(obs["bev"], obs["vec"], -1, 0.0, False, True, None)]
    done = False
    while not done:
        a = drv.act(obs, env)
        obs, r, te, tr, info = env.step(a)
        done = te or tr
        rows.append((obs["bev"], obs["vec"], int(a), float(r), bool(te), False,
                     None if te else [info[f"reward_{k}"] for k in ("speed", "travel", "deviation", "steering")]))
    return rows

t0 = time.time()
train, n, i = [], 0, 0
while n < args.train_steps:
    kind = ("sampled", "random")[i % 2]
    if kind == "sampled":
        policy.greedy = False; drv = policy
    else:
        drv = RandomPolicy(seed=i)
    ep = episode(drv, ("highway", "merge")[(i // 2) % 2], 1000 + i)
    train.append(ep); n += len(ep); i += 1
held = []
for mode in ("greedy", "sampled"):
    policy.greedy = mode == "greedy"
    for scen in ("highway", "merge"):
        for j in range(2):
            held.append((mode, episode(policy, scen, 2**31 + 100000 + j)))
print(f"collected {n} train rows ({len(train)} episodes), {sum(len(e) for _, e in held)} held-out rows, {time.time()-t0:.0f}s", flush=True)

def batch_of(ep):
    T = len(ep)
    b = {"bev": torch.as_tensor(np.stack([r[0] for r in ep]))[None], "vec": torch.as_tensor(np.stack([r[1] for r in ep]))[None],
         "action": torch.tensor([r[2] for r in ep])[None], "reward": torch.tensor([r[3] for r in ep])[None].float(),
         "terminal": torch.tensor([float(r[4]) for r in ep])[None], "is_first": torch.zeros(1, T)}
    b["is_first"][0, 0] = 1
    return b

@torch.no_grad()
def evaluate(model):
    model.eval()
    out = {}
    for mode in ("greedy", "sampled"):
        X, P, R = [], [], []
        for m_, ep in held:
            if m_ != mode: continue
            _, post, _ = model.world_model_loss(batch_of(ep))
            pr = symexp(twohot_decode(model.reward_head(post.feat()[:, 0]).softmax(-1), model.bins)).numpy()
            for t in range(1, len(ep)):
                if ep[t][6] is not None:
                    X.append(ep[t][6]); P.append(pr[t]); R.append(ep[t][3])
        X, P, R = map(np.array, (X, P, R))
        A = np.c_[X, np.ones(len(X))]
        out[mode] = {"corr": float(np.corrcoef(P, R)[0, 1]), "mae": float(np.abs(P - R).mean()), "bias": float((P - R).mean()),
                     "coef(speed,travel,dev,steer,1)": np.linalg.lstsq(A, P, rcond=None)[0].round(3).tolist()}
    model.train()
    return out

results = {"args": vars(args), "train_rows": n, "agent_wm": evaluate(agent)}
print("agent WM", results["agent_wm"], flush=True)

# 3. linear probe on the agent's frozen features (train episodes -> held-out)
@torch.no_grad()
def feats(model, eps):
    F_, R_ = [], []
    for ep in eps:
        _, post, _ = model.world_model_loss(batch_of(ep))
        f = post.feat()[:, 0].numpy()
        for t in range(1, len(ep)):
            if ep[t][6] is not None:
                F_.append(f[t]); R_.append(ep[t][3])
    return np.array(F_), np.array(R_)
Ftr, Rtr = feats(agent, train)
w = np.linalg.lstsq(np.c_[Ftr, np.ones(len(Ftr))], Rtr, rcond=1e-6)[0]
probe = {}
for mode in ("greedy", "sampled"):
    Fh, Rh = feats(agent, [e for m_, e in held if m_ == mode])
    ph = np.c_[Fh, np.ones(len(Fh))] @ w
    probe[mode] = {"corr": float(np.corrcoef(ph, Rh)[0, 1]), "mae": float(np.abs(ph - Rh).mean())}
results["linear_probe_on_agent_features"] = probe
print("linear probe", probe, flush=True)

# 2. fresh world model
rb = TerminationPriorityReplay(capacity=n + 64, num_envs=1, bev_shape=env.observation_space["bev"].shape, vec_dim=4, seed=0)
for ep in train:
    for r in ep:
        rb.add(0, r[0], r[1], r[2], r[3], r[4], r[5])
torch.manual_seed(0)
fresh = Think2Drive(**{k: v for k, v in agent.hparams.items()})
opt = torch.optim.Adam(fresh.world_model_parameters(), lr=fresh.hparams.world_model_lr, eps=fresh.hparams.adam_eps)
curve = []
t0 = time.time()
for u in range(1, args.updates + 1):
    loss, _, met = fresh.world_model_loss(rb.sample(16, 32))
    opt.zero_grad(); loss.backward()
    torch.nn.utils.clip_grad_norm_(fresh.world_model_parameters(), fresh.hparams.world_model_clip)
    opt.step()
    if u % args.every == 0:
        ev = evaluate(fresh)
        curve.append({"updates": u, "train_reward_mae": float(met["wm/reward_mae"]), **ev, "s": time.time() - t0})
        print(curve[-1], flush=True)
        results["fresh_wm_curve"] = curve
        json.dump(results, open(args.out, "w"), indent=1)
json.dump(results, open(args.out, "w"), indent=1)
