# ruff: noqa: E402, E701, E702
# One-off probe of the issue-17 audit (kept as run; see benchmarks/rl_audit.py for the maintained measurements).
"""Reward-head accuracy on held-out episodes when the RSSM filters whole episodes (as when acting) vs 32-step
chunks from a fresh state (as in training); and the actor's greedy action agreement between the two."""
import json
import sys

import numpy as np
import torch

torch.set_num_threads(1)
from lightning_eff.rl import load_agent
from lightning_eff.rl.dreamer import symexp, twohot_decode
from lightning_eff.rl.envs import HighwayBEVEnv

policy, env_kwargs = load_agent(sys.argv[1])
m = policy.module
env = HighwayBEVEnv(["highway", "merge"], **env_kwargs)
out = {}
for mode in ("greedy", "sampled"):
    policy.greedy = mode == "greedy"
    acc = {"full": [[], []], "chunk32": [[], []], "chunk16": [[], []]}
    agree, agree_late = [], []
    ent = {"full": [], "chunk32": []}
    for scen in ("highway", "merge"):
        for i in range(2):
            obs, _ = env.reset(seed=2**31 + 100000 + i, options={"scenario": scen})
            policy.reset(env)
            bevs, vecs, acts, rews, terms = [obs["bev"]], [obs["vec"]], [-1], [0.0], [0.0]
            done = False
            while not done:
                a = policy.act(obs, env)
                obs, r, te, tr, info = env.step(a)
                done = te or tr
                bevs.append(obs["bev"]); vecs.append(obs["vec"]); acts.append(a); rews.append(r); terms.append(float(te))
            T = len(rews)
            preds = {}
            for name, chunk in (("full", 10**9), ("chunk32", 32), ("chunk16", 16)):
                b = {"bev": torch.as_tensor(np.stack(bevs))[None], "vec": torch.as_tensor(np.stack(vecs))[None],
                     "action": torch.as_tensor(acts)[None], "reward": torch.tensor(rews)[None].float(),
                     "terminal": torch.tensor(terms)[None], "is_first": torch.zeros(1, T)}
                b["is_first"][0, ::chunk] = 1
                b["action"][0, ::chunk] = -1  # a sequence's first action is unknown in training too
                torch.manual_seed(0)
                with torch.no_grad():
                    _, post, _ = m.world_model_loss(b)
                    f = post.feat()[:, 0]
                    pr = symexp(twohot_decode(m.reward_head(f).softmax(-1), m.bins)).numpy()
                    lg = m.actor(f)
                    p = lg.softmax(-1)
                    if name in ent:
                        ent[name] += (-(p * p.log()).sum(-1)).tolist()
                preds[name] = lg.argmax(-1).numpy()
                acc[name][0] += pr[1:].tolist(); acc[name][1] += rews[1:]
            agree += (preds["full"] == preds["chunk32"]).tolist()
            agree_late += (preds["full"][64:] == preds["chunk32"][64:]).tolist()
    res = {}
    for name, (P, R) in acc.items():
        P, R = np.array(P), np.array(R)
        res[name] = {"corr": float(np.corrcoef(P, R)[0, 1]), "mae": float(np.abs(P - R).mean()), "bias": float((P - R).mean())}
    res["greedy_action_agreement_full_vs_chunk32"] = float(np.mean(agree))
    res["agreement_after_step_64"] = float(np.mean(agree_late)) if agree_late else None
    res["actor_entropy"] = {k: float(np.mean(v)) for k, v in ent.items()}
    out[mode] = res
    print(mode, res, flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=1)
