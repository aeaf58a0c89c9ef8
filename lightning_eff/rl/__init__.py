"""Think2Drive: Dreamer-style world-model reinforcement learning for driving.

* :class:`Think2Drive`: the ``LightningModule`` (world model, actor, critic; manual optimisation).
* :func:`load_agent` / :func:`save_agent`: a trained agent as a greedy policy plus the keyword arguments of
  the environment it was trained in.
* :class:`DrivingDataModule`: vectorised environments inside Lightning's loop, termination-priority
  replay, the held-out evaluation suite.
* :mod:`lightning_eff.rl.envs`: the driving-environment interface, the BEV rasteriser and
  ``HighwayBEVEnv`` on highway-env (imported on first use: it needs the ``rl`` extra).
* :mod:`lightning_eff.rl.dreamer`: ``symlog``, ``symexp``, ``twohot_encode``, ``twohot_decode``,
  ``lambda_returns`` and the networks. :mod:`lightning_eff.rl.metrics`: ``driving_score``.
* :mod:`lightning_eff.rl.policies`: random and IDM reference drivers, the evaluation loop.
"""

from __future__ import annotations

import importlib

from lightning_eff.rl.agent_io import load_agent, save_agent
from lightning_eff.rl.data import DrivingDataModule, ExperienceStream
from lightning_eff.rl.dreamer import lambda_returns, symexp, symlog, twohot_decode, twohot_encode
from lightning_eff.rl.metrics import CARLA_PENALTIES, driving_score
from lightning_eff.rl.replay import TerminationPriorityReplay
from lightning_eff.rl.think2drive import AgentPolicy, Think2Drive

_LAZY = {
    "HighwayBEVEnv": "lightning_eff.rl.envs",
    "DrivingEnv": "lightning_eff.rl.envs",
    "make_env": "lightning_eff.rl.envs",
    "RandomPolicy": "lightning_eff.rl.policies",
    "IDMPolicy": "lightning_eff.rl.policies",
    "run_episode": "lightning_eff.rl.policies",
    "evaluate_policy": "lightning_eff.rl.policies",
}

__all__ = [
    "Think2Drive",
    "AgentPolicy",
    "load_agent",
    "save_agent",
    "DrivingDataModule",
    "ExperienceStream",
    "TerminationPriorityReplay",
    "driving_score",
    "CARLA_PENALTIES",
    "symlog",
    "symexp",
    "twohot_encode",
    "twohot_decode",
    "lambda_returns",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
