"""Save and load a trained Think2Drive agent together with the environment it was trained in.

``load_agent(path) -> (policy, env_kwargs)`` rebuilds a greedy :class:`~lightning_eff.rl.AgentPolicy` and
the keyword arguments of the environment the agent was trained with, so that::

    policy, env_kwargs = load_agent("benchmarks/results/think2drive_cpu.ckpt")
    env = HighwayBEVEnv(["highway", "merge"], **env_kwargs)
    record = run_episode(env, policy, seed=2**31)

drives the agent in the environment it knows (same BEV geometry, action table, reward weights, ...).

Two file formats are read:

* a Lightning checkpoint of :class:`~lightning_eff.rl.Think2Drive` trained with a
  :class:`~lightning_eff.rl.DrivingDataModule` (``trainer.save_checkpoint``, with or without
  ``weights_only``; the ``ModelCheckpoint`` files of ``lightning-eff fit``): the module stores the data
  module's ``env_name`` and ``env_kwargs`` in its checkpoint (``checkpoint["think2drive"]``); older
  checkpoints fall back to the data module's saved hyperparameters;
* the small file of :func:`save_agent` (weights, hyperparameters, environment; no optimiser or replay).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from lightning_eff.utils.io import atomic_write_bytes

__all__ = ["load_agent", "save_agent", "agent_env_spec"]

AGENT_FORMAT = "think2drive-agent"


def _env_from_datamodule_hparams(hp: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    kwargs = {k: hp[k] for k in ("bev_size", "resolution", "history") if k in hp}
    kwargs.update(dict(hp.get("env_kwargs") or {}))
    return str(hp.get("env_name", "highway-bev")), kwargs


def agent_env_spec(checkpoint: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """``(env_name, env_kwargs)`` stored in a loaded checkpoint dictionary, or ``None`` if it has none."""
    state = checkpoint.get("think2drive") or {}
    if "env_kwargs" in state:
        return str(state.get("env_name", "highway-bev")), dict(state["env_kwargs"])
    hp = checkpoint.get("datamodule_hyper_parameters")
    if isinstance(hp, dict) and ("env_kwargs" in hp or "bev_size" in hp):
        return _env_from_datamodule_hparams(dict(hp))
    return None


def save_agent(module: Any, path: str | os.PathLike, env_kwargs: dict[str, Any] | None = None,
               env_name: str | None = None) -> Path:
    """Write a trained agent (weights, hyperparameters and its environment's keyword arguments) to ``path``.

    Args:
        module: a :class:`~lightning_eff.rl.Think2Drive`.
        path: output file (written atomically).
        env_kwargs: the environment's keyword arguments (default: those of the module's attached
            :class:`~lightning_eff.rl.DrivingDataModule`).
        env_name: registered environment name (default: the data module's, else ``"highway-bev"``).

    Returns:
        The path written. A few MB at the small size (no optimiser states, no replay).
    """
    from lightning_eff.rl.think2drive import Think2Drive

    if not isinstance(module, Think2Drive):
        raise TypeError(f"save_agent: module must be a Think2Drive, got {type(module).__name__}.")
    spec = module.environment_spec()
    if env_kwargs is None:
        if spec is None:
            raise ValueError("save_agent: pass env_kwargs (the module has no DrivingDataModule to take them from).")
        env_kwargs = spec[1]
    if env_name is None:
        env_name = spec[0] if spec is not None else "highway-bev"
    payload = {
        "format": AGENT_FORMAT,
        "format_version": 1,
        "hyper_parameters": dict(module.hparams),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "think2drive": {
            "format_version": 1,
            "wm_updates": module.wm_updates,
            "planner_updates": module.planner_updates,
            "planner_resets": module.planner_resets,
            "planner_credit": module._planner_credit,
            "env_name": env_name,
            "env_kwargs": dict(env_kwargs),
        },
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_agent(path: str | os.PathLike, greedy: bool = True, map_location: str | torch.device = "cpu"):
    """Load a trained Think2Drive agent: ``(AgentPolicy, env_kwargs)``.

    Args:
        path: a Lightning checkpoint of a :class:`~lightning_eff.rl.Think2Drive` trained with a
            :class:`~lightning_eff.rl.DrivingDataModule`, or a file of :func:`save_agent`.
        greedy: the policy takes the actor's most likely action (``False``: samples, as in training).
        map_location: device of the loaded weights.

    Returns:
        ``(policy, env_kwargs)``: a :class:`~lightning_eff.rl.AgentPolicy` (module in eval mode) and the
        keyword arguments of the training environment, so that ``HighwayBEVEnv(scenarios, **env_kwargs)``
        (or ``make_env(policy.env_name, scenarios=..., **env_kwargs)`` for another registered engine) rebuilds
        it. ``policy.env_name`` holds the registered environment name.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a Think2Drive checkpoint, or it does not record its environment.
    """
    from lightning_eff.rl.think2drive import AgentPolicy, Think2Drive

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_agent: no checkpoint at {str(path)!r}.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(f"load_agent: {str(path)!r} is not a readable torch checkpoint ({type(err).__name__}: {err}).") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ValueError(
            f"load_agent: {str(path)!r} is not a Think2Drive checkpoint (expected a Lightning checkpoint or a file "
            "of save_agent, with 'state_dict' and 'hyper_parameters')."
        )
    hp = dict(checkpoint["hyper_parameters"])
    hp.pop("_instantiator", None)
    hp.pop("_class_path", None)
    try:
        module = Think2Drive(**hp)
    except TypeError as err:
        raise ValueError(f"load_agent: {str(path)!r} does not hold Think2Drive hyperparameters ({err}).") from err
    try:
        missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
        problem = f"missing {missing[:5]}, unexpected {unexpected[:5]}" if missing or unexpected else None
    except RuntimeError as err:  # shape mismatches
        problem = str(err).splitlines()[-1].strip()
    if problem:
        raise ValueError(
            f"load_agent: the weights in {str(path)!r} do not match Think2Drive"
            f"({', '.join(f'{k}={v!r}' for k, v in hp.items())}): {problem}"
        )
    module.on_load_checkpoint(checkpoint)
    module.to(map_location).eval()
    spec = agent_env_spec(checkpoint)
    if spec is None:
        raise ValueError(
            f"load_agent: {str(path)!r} does not record the environment the agent was trained with (it was not "
            "trained with a DrivingDataModule); rebuild the environment by hand or re-save it with "
            "lightning_eff.rl.save_agent(module, path, env_kwargs=...)."
        )
    policy = AgentPolicy(module, greedy=greedy)
    policy.env_name = spec[0]
    return policy, spec[1]
