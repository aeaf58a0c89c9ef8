# ruff: noqa: E402, E701, E702
# One-off probe of the issue-17 audit (kept as run; see benchmarks/rl_audit.py for the maintained measurements).
"""How fast does a reward head of Think2Drive's form learn on fixed (frozen) features of the committed agent?
Train on features of training-seed episodes (agent sampled + random), test on held-out validation episodes."""
import copy
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(1)
from lightning_eff.rl import load_agent
from lightning_eff.rl.dreamer import DreamerMLP, symexp, symlog, twohot_decode, twohot_encode
from lightning_eff.rl.envs import HighwayBEVEnv
from lightning_eff.rl.policies import RandomPolicy

policy, env_kwargs = load_agent("benchmarks/results/think2drive_cpu.ckpt")
m = policy.module
env = HighwayBEVEnv(["highway", "merge"], **env_kwargs)

def episode(drv, scen, seed):
    obs, _ = env.reset(seed=seed, options={"scenario": scen}); drv.reset(env)
    rows = [(obs["bev"], obs["vec"], -1, 0.0, 0.0)]; done = False
    while not done:
        a = drv.act(obs, env); obs, r, te, tr, info = env.step(a); done = te or tr
        rows.append((obs["bev"], obs["vec"], int(a), float(r), float(te)))
    return rows

@torch.no_grad()
def feats(ep):
    T = len(ep)
    b = {"bev": torch.as_tensor(np.stack([r[0] for r in ep]))[None], "vec": torch.as_tensor(np.stack([r[1] for r in ep]))[None],
         "action": torch.tensor([r[2] for r in ep])[None], "reward": torch.tensor([r[3] for r in ep])[None].float(),
         "terminal": torch.tensor([r[4] for r in ep])[None], "is_first": torch.zeros(1, T)}
    b["is_first"][0, ::32] = 1; b["action"][0, ::32] = -1  # 32-step chunks from a fresh state, as in training
    _, post, _ = m.world_model_loss(b)
    return post.feat()[:, 0], b["reward"][0]

t0 = time.time()
tr_f, tr_r, n, i = [], [], 0, 0
while n < int(sys.argv[1]):
    drv = (RandomPolicy(seed=i) if i % 2 else policy); policy.greedy = False
    f, r = feats(episode(drv, ("highway", "merge")[(i // 2) % 2], 5000 + i)); tr_f.append(f); tr_r.append(r); n += len(r); i += 1
te_f, te_r = [], []
for mode in ("greedy", "sampled"):
    policy.greedy = mode == "greedy"
    for scen in ("highway", "merge"):
        for j in range(2):
            f, r = feats(episode(policy, scen, 2**31 + 100000 + j)); te_f.append(f); te_r.append(r)
Xtr, Ytr, Xte, Yte = torch.cat(tr_f), torch.cat(tr_r), torch.cat(te_f), torch.cat(te_r)
print(f"data {len(Ytr)} train / {len(Yte)} test rows, {time.time()-t0:.0f}s", flush=True)
keep = Yte.abs() < 5  # non-terminal steps
def score(pred):
    p, y = pred[keep].numpy(), Yte[keep].numpy()
    return {"corr": round(float(np.corrcoef(p, y)[0, 1]), 3), "mae": round(float(np.abs(p - y).mean()), 3), "bias": round(float((p - y).mean()), 3)}
out = {"rows": [len(Ytr), len(Yte)], "agent_head": score(symexp(twohot_decode(m.reward_head(Xte).softmax(-1), m.bins)).detach())}
print("agent's own reward head", out["agent_head"], flush=True)
bins = m.bins
for name, lr, kind in (("twohot_zero_init_lr3e-4", 3e-4, "twohot"), ("twohot_zero_init_lr1e-3", 1e-3, "twohot"),
                       ("agent_head_continued_lr3e-4", 3e-4, "agent"), ("mse_symlog_lr3e-4", 3e-4, "mse")):
    torch.manual_seed(0)
    head = copy.deepcopy(m.reward_head) if kind == "agent" else DreamerMLP(Xtr.shape[1], 128, 1, out_dim=len(bins) if kind != "mse" else 1, zero_init=True)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    curve = []
    for step in range(1, 2501):
        idx = torch.randint(0, len(Ytr), (512,))
        x, y = Xtr[idx], Ytr[idx]
        if kind == "mse":
            loss = ((head(x)[:, 0] - symlog(y)) ** 2).mean()
        else:
            loss = -(twohot_encode(symlog(y), bins) * F.log_softmax(head(x), -1)).sum(-1).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        if step in (50, 100, 250, 500, 1000, 2500):
            with torch.no_grad():
                pr = symexp(head(Xte)[:, 0]) if kind == "mse" else symexp(twohot_decode(head(Xte).softmax(-1), bins))
            curve.append({"steps": step, **score(pr)})
    out[name] = curve
    print(name, curve, flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=1)
