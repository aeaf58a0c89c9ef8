"""Reference drivers and the evaluation loop shared by the agent, the baselines and the benchmark.

* :class:`RandomPolicy`: uniform over the action table.
* :class:`ConstantPolicy`: one action of the table at every step (the "best constant action" baseline
  is the best of these on a validation suite).
* :class:`IDMPolicy`: highway-env's rule-based driver (IDM car following + MOBIL lane changes + its
  lateral lane-keeping controller) driving the *ego* vehicle along our route. It is privileged (it
  reads the simulator, like the traffic it was written for) and drives with continuous commands by
  default; ``quantize=True`` snaps them to the nearest action of the table, which is the agent's
  interface.
* :func:`run_episode` / :func:`evaluate_policy`: one episode / a held-out suite, returning per-episode
  records with route completion, infractions and driving scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["Policy", "RandomPolicy", "ConstantPolicy", "IDMPolicy", "run_episode", "evaluate_policy", "summarize"]


class Policy:
    """A driver: ``reset(env)`` at the start of an episode, then ``act(obs, env)`` at each step.

    Example::

        >>> class Straight(Policy):
        ...     def act(self, obs, env):
        ...         return 17  # no acceleration, no steering in the default table
        >>> from lightning_eff.rl.envs import HighwayBEVEnv
        >>> env = HighwayBEVEnv("highway_easy", bev_size=16, resolution=4.0)
        >>> env.action_table[Straight().act(None, env)].tolist()
        [0.0, 0.0]
    """

    def reset(self, env: Any) -> None:
        pass

    def act(self, obs: dict[str, np.ndarray], env: Any) -> int | np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class RandomPolicy(Policy):
    """Uniformly random actions from the table.

    Example::

        >>> from lightning_eff.rl.envs import HighwayBEVEnv
        >>> env = HighwayBEVEnv("merge", bev_size=16, resolution=4.0)
        >>> obs, _ = env.reset(seed=0)
        >>> 0 <= RandomPolicy(seed=0).act(obs, env) < len(env.action_table)
        True
    """

    def __init__(self, seed: int | None = None) -> None:
        self.rng = np.random.default_rng(seed)

    def act(self, obs: dict[str, np.ndarray], env: Any) -> int:
        return int(self.rng.integers(len(env.action_table)))


class ConstantPolicy(Policy):
    """The same action of the table at every step.

    A policy that has collapsed to one action scores what the best of these scores; the benchmark
    reports the best constant action (chosen on validation seeds) as a baseline.

    Example::

        >>> from lightning_eff.rl.envs import HighwayBEVEnv
        >>> env = HighwayBEVEnv("highway_easy", bev_size=16, resolution=4.0)
        >>> rec = run_episode(env, ConstantPolicy(10), seed=0)  # brake gently, straight
        >>> [round(float(x), 2) for x in env.action_table[10]], rec["timeout"], rec["route_completion"] < 0.3
        ([-0.4, 0.0], 1.0, True)
    """

    def __init__(self, action: int) -> None:
        if isinstance(action, bool) or not isinstance(action, (int, np.integer)) or action < 0:
            raise ValueError(f"ConstantPolicy: action must be a non-negative int index, got {action!r}.")
        self.action = int(action)

    def act(self, obs: dict[str, np.ndarray], env: Any) -> int:
        if self.action >= len(env.action_table):
            raise ValueError(f"ConstantPolicy: action {self.action} out of range [0, {len(env.action_table)}).")
        return self.action


class IDMPolicy(Policy):
    """highway-env's IDM/MOBIL driver on the ego vehicle of a :class:`~lightning_eff.rl.envs.HighwayBEVEnv`.

    A shadow ``IDMVehicle`` is synchronised with the ego at every step (position, heading, speed,
    lane), takes the ego's place in the road for the neighbour search, and its command is applied to
    the ego. Its desired speed is Think2Drive's target (0.8 x the lane's limit) and its route is ours.

    Args:
        quantize: snap the command to the nearest action of the table (the agent's action space).
        enable_lane_change: let MOBIL change lanes.

    Example::

        >>> from lightning_eff.rl.envs import HighwayBEVEnv
        >>> env = HighwayBEVEnv("highway_easy", bev_size=16, resolution=4.0)
        >>> record = run_episode(env, IDMPolicy(), seed=3)
        >>> record["completed"], record["collision"]
        (1.0, 0.0)
    """

    def __init__(self, quantize: bool = False, enable_lane_change: bool = True) -> None:
        self.quantize = bool(quantize)
        self.enable_lane_change = bool(enable_lane_change)
        self._driver: Any = None

    def reset(self, env: Any) -> None:
        from highway_env.vehicle.behavior import IDMVehicle

        sim = getattr(env.unwrapped, "sim", None)
        if sim is None:
            raise TypeError(f"IDMPolicy drives highway-env scenes only; got {type(env.unwrapped).__name__}.")
        ego = sim.vehicle
        route = [(a, b, None) for a, b in env.unwrapped.route_edges]
        route[0] = ego.lane_index
        self._driver = IDMVehicle(
            sim.road,
            ego.position.copy(),
            heading=ego.heading,
            speed=ego.speed,
            target_lane_index=ego.lane_index,
            target_speed=0.8 * (ego.lane.speed_limit or 20.0),
            route=route,
            enable_lane_change=self.enable_lane_change,
        )

    def act(self, obs: dict[str, np.ndarray], env: Any) -> int | np.ndarray:
        if self._driver is None:
            self.reset(env)
        base = env.unwrapped
        sim = base.sim
        ego, d = sim.vehicle, self._driver
        d.position = ego.position.copy()
        d.heading, d.speed = ego.heading, ego.speed
        d.lane_index, d.lane = ego.lane_index, ego.lane
        d.target_speed = 0.8 * (ego.lane.speed_limit or 20.0)
        if d.target_lane_index[:2] not in {tuple(e) for e in base.route_edges} and d.lane_index[:2] in {
            tuple(e) for e in base.route_edges
        }:
            d.target_lane_index = d.lane_index
        vehicles = sim.road.vehicles
        idx = vehicles.index(ego)
        vehicles[idx] = d  # the driver sees the traffic exactly as the ego would
        try:
            d.crashed = False
            d.act()
        finally:
            vehicles[idx] = ego
        d.timer += base.dt
        acc_lo, acc_hi = base.acceleration_range
        acc = float(d.action["acceleration"])
        acc_n = (acc - acc_lo) / (acc_hi - acc_lo) * 2.0 - 1.0
        limit = base.steering_limit() if hasattr(base, "steering_limit") else base.steering_range
        steer_n = float(d.action["steering"]) / limit
        command = np.clip(np.array([acc_n, steer_n], dtype=np.float32), -1.0, 1.0)
        if not self.quantize:
            return command
        return int(np.argmin(((base.action_table - command) ** 2).sum(axis=1)))


def run_episode(
    env: Any,
    policy: Policy | Callable[[dict[str, np.ndarray], Any], Any],
    scenario: str | None = None,
    seed: int | None = None,
    record_frames: bool = False,
    max_steps: int = 10_000,
    penalties: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Drive one episode and return its record.

    Returns:
        ``scenario``, ``seed``, ``return``, ``length``, ``route_completion``, one count per infraction kind,
        one flag per event kind, ``collision`` (any collision), ``scenario_timeout`` (blocked: the
        leaderboard 2.0 scenario time-out), ``min_speed_infractions`` and ``min_speed_percentages``
        (:attr:`~lightning_eff.rl.envs.DrivingEnv.min_speed_percentages`), ``driving_score`` and
        ``weighted_driving_score`` (leaderboard 2.0 penalties, or ``penalties``), ``driving_score_lb1``
        (the 1.0 set: no time-related penalty); with ``record_frames``, ``frames`` (the BEV stacks,
        ``uint8 [T, C, H, W]``).

    Example::

        >>> from lightning_eff.rl.envs import HighwayBEVEnv
        >>> env = HighwayBEVEnv("merge", bev_size=16, resolution=4.0)
        >>> rec = run_episode(env, RandomPolicy(seed=0), seed=1, record_frames=True)
        >>> rec["frames"].shape[1:], rec["driving_score"] <= rec["route_completion"]
        ((10, 16, 16), True)
    """
    from lightning_eff.rl.envs.base import EVENT_KINDS, INFRACTION_KINDS
    from lightning_eff.rl.metrics import LEADERBOARD_1_PENALTIES, driving_score

    options = {"scenario": scenario} if scenario is not None else None
    obs, info = env.reset(seed=seed, options=options)
    act = policy.act if isinstance(policy, Policy) else policy
    if isinstance(policy, Policy):
        policy.reset(env)
    frames = [obs["bev"]] if record_frames else None
    total, steps = 0.0, 0
    for _ in range(max_steps):
        obs, reward, terminated, truncated, info = env.step(act(obs, env))
        total += reward
        steps += 1
        if record_frames:
            frames.append(obs["bev"])
        if terminated or truncated:
            break
    record: dict[str, Any] = {
        "scenario": env.unwrapped.scenario,
        "seed": seed,
        "return": total,
        "length": steps,
        "route_completion": float(info["route_completion"]),
    }
    record.update({k: float(info[k]) for k in INFRACTION_KINDS})
    record.update({k: float(info[k]) for k in EVENT_KINDS})
    record["collision"] = float(any(info[k] > 0 for k in INFRACTION_KINDS if k.startswith("collision")))
    record["scenario_timeout"] = float(info["timeout"])
    min_speed = [float(q) for q in getattr(env.unwrapped, "min_speed_percentages", [])]
    record["min_speed_infractions"] = float(len(min_speed))
    record["min_speed_percentages"] = min_speed
    counts = {k: info[k] for k in INFRACTION_KINDS}
    counts["scenario_timeout"] = record["scenario_timeout"]
    rc = record["route_completion"]
    record["driving_score"] = float(driving_score(rc, counts, penalties, min_speed_percentages=min_speed))
    record["weighted_driving_score"] = float(
        driving_score(rc, counts, penalties, scenario_density=info["scenario_density"], min_speed_percentages=min_speed)
    )
    record["driving_score_lb1"] = float(driving_score(rc, counts, LEADERBOARD_1_PENALTIES))
    if record_frames:
        record["frames"] = np.stack(frames)
    return record


def evaluate_policy(
    env: Any,
    policy: Policy | Callable[[dict[str, np.ndarray], Any], Any],
    episodes: Sequence[tuple[str, int]],
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Run ``policy`` on each ``(scenario, seed)`` of ``episodes`` (a held-out suite).

    Example::

        >>> from lightning_eff.rl.envs import HighwayBEVEnv
        >>> env = HighwayBEVEnv(["merge", "highway_easy"], bev_size=16, resolution=4.0)
        >>> recs = evaluate_policy(env, RandomPolicy(seed=0), [("merge", 5), ("highway_easy", 5)])
        >>> [r["scenario"] for r in recs]
        ['merge', 'highway_easy']
    """
    iterator: Any = episodes
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(episodes, desc="evaluate", leave=False)
    return [run_episode(env, policy, scenario, seed) for scenario, seed in iterator]


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Means over episodes: driving score, weighted DS, route completion, collision rate, return, ...

    Example::

        >>> summarize([{"driving_score": 0.5, "route_completion": 1.0, "collision": 0.0, "return": 3.0},
        ...            {"driving_score": 0.1, "route_completion": 0.2, "collision": 1.0, "return": -1.0}])["driving_score"]
        0.3
    """
    if not records:
        return {}
    keys = [k for k, v in records[0].items() if isinstance(v, (int, float)) and k != "seed"]
    return {k: float(np.mean([r[k] for r in records])) for k in keys}
