# ruff: noqa: E402, E701, E702
# One-off probe of the issue-17 audit (kept as run; see benchmarks/rl_audit.py for the maintained measurements).
"""Causal check of the model-exploitation diagnosis: starting from the committed agent, collect fresh episodes of its
own policy (greedy and sampled) and of a random driver on training seeds, then
  arm A: N updates of world model + actor-critic (as training_step, planner ratio 1) on that replay;
  arm B (control): N actor-critic updates only, the world model frozen (same replay, same starts).
Greedy return / DS on validation seeds and the reward head's accuracy on the greedy episodes, before and after."""
import copy
import json
import sys
import time

import numpy as np
import torch

torch.set_num_threads(1)
from lightning_eff.rl import AgentPolicy, load_agent
from lightning_eff.rl.dreamer import symexp, twohot_decode
from lightning_eff.rl.envs import HighwayBEVEnv
from lightning_eff.rl.policies import RandomPolicy, run_episode
from lightning_eff.rl.replay import TerminationPriorityReplay

N, OUT = int(sys.argv[1]), sys.argv[2]
policy, env_kwargs = load_agent("benchmarks/results/think2drive_cpu.ckpt")
base = policy.module
env = HighwayBEVEnv(["highway", "merge"], **env_kwargs)

def collect(drv, scen, seed):
    obs, _ = env.reset(seed=seed, options={"scenario": scen}); drv.reset(env)
    rows = [(obs["bev"], obs["vec"], -1, 0.0, False, True)]; done = False
    while not done:
        a = drv.act(obs, env); obs, r, te, tr, _ = env.step(a); done = te or tr
        rows.append((obs["bev"], obs["vec"], int(a), float(r), bool(te), False))
    return rows

@torch.no_grad()
def reward_corr(model, eps):
    P, R = [], []
    for rows in eps:
        T = len(rows)
        b = {"bev": torch.as_tensor(np.stack([r[0] for r in rows]))[None], "vec": torch.as_tensor(np.stack([r[1] for r in rows]))[None],
             "action": torch.tensor([r[2] for r in rows])[None], "reward": torch.tensor([r[3] for r in rows])[None].float(),
             "terminal": torch.tensor([float(r[4]) for r in rows])[None], "is_first": torch.zeros(1, T)}
        b["is_first"][0, ::32] = 1; b["action"][0, ::32] = -1
        _, post, _ = model.world_model_loss(b)
        P += symexp(twohot_decode(model.reward_head(post.feat()[:, 0]).softmax(-1), model.bins))[1:].tolist()
        R += [r[3] for r in rows[1:]]
    P, R = np.array(P), np.array(R)
    keep = np.abs(R) < 5
    return {"corr": float(np.corrcoef(P[keep], R[keep])[0, 1]), "bias": float((P[keep] - R[keep]).mean())}

def evaluate(model):
    pol = AgentPolicy(model, greedy=True)
    recs, eps = [], []
    for s in ("highway", "merge"):
        for i in range(3):
            recs.append(run_episode(env, pol, s, 2**31 + 100000 + i))
            eps.append(collect(pol, s, 2**31 + 100000 + i))
    out = {k: float(np.mean([r[k] for r in recs])) for k in ("driving_score", "route_completion", "collision", "return", "length")}
    out["reward_head_on_greedy"] = reward_corr(model, eps)
    return out

t0 = time.time()
rb = TerminationPriorityReplay(capacity=20000, num_envs=1, bev_shape=env.observation_space["bev"].shape, vec_dim=4, seed=0)
n, i = 0, 0
while n < 4000:
    kind = i % 3
    if kind == 2: drv = RandomPolicy(seed=i)
    else: policy.greedy = kind == 0; drv = policy
    for r in collect(drv, ("highway", "merge")[(i // 3) % 2], 7000 + i):
        rb.add(0, *r); n += 1
    i += 1
res = {"n": N, "rows": n, "episodes": i, "collect_s": time.time() - t0, "before": evaluate(base)}
print("before", res["before"], flush=True)

def run_arm(update_wm):
    torch.manual_seed(0)
    m = copy.deepcopy(base).train()
    h = m.hparams
    wm_opt = torch.optim.Adam(m.world_model_parameters(), lr=h.world_model_lr, eps=h.adam_eps)
    a_opt = torch.optim.Adam(m.actor.parameters(), lr=h.actor_lr, eps=h.adam_eps)
    c_opt = torch.optim.Adam(m.critic.parameters(), lr=h.critic_lr, eps=h.adam_eps)
    t = time.time()
    for _ in range(N):
        batch = rb.sample(16, 32)
        wm_loss, post, _ = m.world_model_loss(batch)
        start, sc = m.imagination_starts(post, batch["terminal"])
        actor_loss, critic_loss, _ = m.behaviour_losses(start, sc)
        total = actor_loss + critic_loss + (wm_loss if update_wm else 0.0)
        for o in (wm_opt, a_opt, c_opt): o.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(m.actor.parameters(), h.actor_clip)
        torch.nn.utils.clip_grad_norm_(m.critic.parameters(), h.critic_clip)
        a_opt.step(); c_opt.step()
        if update_wm:
            torch.nn.utils.clip_grad_norm_(m.world_model_parameters(), h.world_model_clip); wm_opt.step()
        m._update_slow_critic()
    out = evaluate(m); out["train_s"] = time.time() - t
    return out

for name, wm in (("actor_critic_only_wm_frozen", False), ("world_model_and_actor_critic", True)):
    res[name] = run_arm(wm)
    print(name, res[name], flush=True)
    json.dump(res, open(OUT, "w"), indent=1)
