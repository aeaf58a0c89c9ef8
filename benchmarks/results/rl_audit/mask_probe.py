# ruff: noqa: E402, E701, E702
# One-off probe of the issue-17 audit (kept as run; see benchmarks/rl_audit.py for the maintained measurements).
"""Greedy committed agent with and without its +-1 steering actions (actor logits masked at act time)."""
import json
import sys

import numpy as np
import torch

torch.set_num_threads(1)
from lightning_eff.rl import load_agent
from lightning_eff.rl.envs import HighwayBEVEnv
from lightning_eff.rl.policies import run_episode


class Masked(torch.nn.Module):
    def __init__(self, actor, mask):
        super().__init__(); self.actor, self.mask = actor, mask
    def forward(self, x):
        return self.actor(x).masked_fill(self.mask, -1e9)

policy, env_kwargs = load_agent("benchmarks/results/think2drive_cpu.ckpt")
m = policy.module
env = HighwayBEVEnv(["highway", "merge"], **env_kwargs)
full = m.actor
mask = torch.as_tensor(np.abs(env.action_table[:, 1]) > 0.5)
out = {}
for name in ("all_35_actions", "without_full_steering_25"):
    m.actor = full if name.startswith("all") else Masked(full, mask)
    recs = [run_episode(env, policy, s, 2**31 + 100000 + i) for s in ("highway", "merge") for i in range(int(sys.argv[1]))]
    keys = ("driving_score", "route_completion", "collision", "return", "length", "route_timeout", "timeout", "route_deviation")
    out[name] = {k: float(np.mean([r[k] for r in recs])) for k in keys}
    print(name, {k: round(v, 3) for k, v in out[name].items()}, flush=True)
m.actor = full
json.dump(out, open(sys.argv[2], "w"), indent=1)
