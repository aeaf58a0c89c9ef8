"""Driving environments: the interface (:class:`DrivingEnv`), the BEV rasteriser and highway-env scenes.

``make_env(name, **kwargs)`` builds a registered environment; register another engine (CARLA, ...)
with :func:`register_env` so that the data module and the benchmark can use it by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning_eff.rl.envs import base
from lightning_eff.rl.envs.base import *  # noqa: F403  (the interface: the names of base.__all__)
from lightning_eff.rl.envs.base import DrivingEnv
from lightning_eff.rl.envs.bev import BEVRasterizer, Segments, colorize, polyline_segments
from lightning_eff.rl.envs.highway import SCENARIO_SPECS, HighwayBEVEnv, ScenarioSpec
from lightning_eff.rl.envs.tiny import TinyCorridorEnv

__all__ = [
    "BEVRasterizer",
    "Segments",
    "colorize",
    "polyline_segments",
    "HighwayBEVEnv",
    "ScenarioSpec",
    "SCENARIO_SPECS",
    "TinyCorridorEnv",
    "ENV_REGISTRY",
    "register_env",
    "make_env",
]
__all__ += base.__all__

#: name -> factory returning a :class:`DrivingEnv`.
ENV_REGISTRY: dict[str, Callable[..., DrivingEnv]] = {"highway-bev": HighwayBEVEnv, "tiny-corridor": TinyCorridorEnv}


def register_env(name: str, factory: Callable[..., DrivingEnv]) -> None:
    """Make ``factory`` available as ``make_env(name, ...)`` (e.g. a CARLA adapter).

    Example::

        >>> register_env("highway-bev-small", lambda **kw: HighwayBEVEnv(bev_size=16, resolution=4.0, **kw))
        >>> make_env("highway-bev-small", scenarios="merge").bev_shape
        (10, 16, 16)
    """
    if not callable(factory):
        raise TypeError(f"register_env: factory must be callable, got {factory!r}.")
    ENV_REGISTRY[name] = factory


def make_env(name: str = "highway-bev", **kwargs: Any) -> DrivingEnv:
    """Build a registered driving environment.

    Example::

        >>> env = make_env("highway-bev", scenarios="merge", bev_size=16, resolution=4.0)
        >>> env.observation_space["bev"].shape
        (10, 16, 16)
    """
    if name not in ENV_REGISTRY:
        raise ValueError(f"make_env: unknown environment {name!r}; registered: {sorted(ENV_REGISTRY)}.")
    return ENV_REGISTRY[name](**kwargs)
