"""A tiny driving task with the interface of :class:`~lightning_eff.rl.envs.HighwayBEVEnv`, cheap to step.

``TinyCorridorEnv`` is for tests that need many environment steps in seconds (the test that
Think2Drive's actor-critic improves a policy, ``tests/test_rl_learning.py``). It has the same
observation (``{"bev": uint8 [C, S, S] in {0, 1}, "vec": float32 [4]}``, ``vec = (speed / 30,
speed_limit / 30, last acceleration, last steering)``), a discrete action table of normalised
``(acceleration, steering)`` pairs, the same ``info`` keys (route completion, infraction counts and
events, episode return) and ``set_scenarios``, so that :class:`~lightning_eff.rl.DrivingDataModule`,
:class:`~lightning_eff.rl.AgentPolicy` and ``run_episode`` drive it unchanged (``make_env("tiny-corridor")``).

The task: a straight corridor ``2 * half_width`` metres wide, ``route_length`` metres long. A side wind
pushes the car sideways by ``drift`` metres per step (a constant of random sign in each episode), the
steering moves it by ``steer_gain * steering``, the acceleration changes the speed by
``accel_gain * acceleration`` m/s per step (speed clipped to ``[0, max_speed]``). Reward per step::

    r = 1 - |v - v_target| / v_target - lateral_weight * |y| / half_width      (v_target = 0.8 * limit)

touching a wall ends the episode with ``-crash_penalty`` (a ``collision_static``); reaching the end of the
route ends it with ``+1``; ``time_limit`` steps truncate it. Keeping to the centre needs feedback on the
lateral position (the BEV shows it), so no constant action does well: the random driver and every
constant action hit a wall within about ten steps, a driver that steers against the drift and holds
the target speed earns about one per step.

BEV (``bev_size`` pixels square, ``4 * half_width / bev_size`` metres per pixel laterally, fixed to the
corridor): channel 0 the drivable corridor, channel 1 lane-marking dashes that scroll with the distance
travelled (so the speed is visible), channel 2 the ego's footprint.

Example::

    >>> env = TinyCorridorEnv()
    >>> obs, info = env.reset(seed=0)
    >>> obs["bev"].shape, obs["vec"].shape, int(env.action_space.n)
    ((3, 16, 16), (4,), 9)
    >>> obs, reward, terminated, truncated, info = env.step(4)  # (0, 0): coast straight
    >>> sorted(k for k in ("route_completion", "collision_static", "episode_return") if k in info)
    ['collision_static', 'episode_return', 'route_completion']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from lightning_eff.rl.envs.base import EVENT_KINDS, INFRACTION_KINDS, default_action_table

__all__ = ["TinyCorridorEnv"]


class TinyCorridorEnv(gym.Env):
    """A corridor with a side wind (see the module docstring).

    Args:
        scenarios: ``"corridor"`` (the only scenario; kept for the interface).
        bev_size: BEV side in pixels (``4 * 2**k``, >= 8).
        action_table: ``[A, 2]`` normalised ``(acceleration, steering)`` pairs (default: ``{-1, 0, 1}^2``,
            9 actions).
        half_width, route_length: corridor geometry (metres).
        speed_limit: the limit (m/s); the target speed is 0.8 of it.
        drift, steer_gain, accel_gain: side wind and control gains per step.
        lateral_weight, crash_penalty: reward terms.
        time_limit: steps before truncation.
        policy_frequency: decisions per second.
    """

    metadata = {"render_modes": []}
    SCENARIOS: tuple[str, ...] = ("corridor",)
    DENSITY: dict[str, float] = {}

    def __init__(
        self,
        scenarios: str | Sequence[str] = "corridor",
        bev_size: int = 16,
        action_table: Sequence[Sequence[float]] | np.ndarray | None = None,
        half_width: float = 1.5,
        route_length: float = 100.0,
        speed_limit: float = 7.5,
        max_speed: float = 10.0,
        drift: float = 0.15,
        steer_gain: float = 0.35,
        accel_gain: float = 1.5,
        lateral_weight: float = 0.5,
        crash_penalty: float = 2.0,
        time_limit: int = 60,
        policy_frequency: float = 2.0,
        **_: Any,
    ) -> None:
        super().__init__()
        names = [scenarios] if isinstance(scenarios, str) else list(scenarios)
        for s in names:
            if s not in self.SCENARIOS:
                raise ValueError(f"TinyCorridorEnv: unknown scenario {s!r}; available scenarios are {list(self.SCENARIOS)}.")
        if not isinstance(bev_size, int) or bev_size < 8 or bev_size % 4:
            raise ValueError(f"TinyCorridorEnv: bev_size must be an int >= 8 divisible by 4, got {bev_size!r}.")
        for name, value in (("half_width", half_width), ("route_length", route_length), ("speed_limit", speed_limit),
                            ("max_speed", max_speed), ("steer_gain", steer_gain), ("accel_gain", accel_gain),
                            ("policy_frequency", policy_frequency)):
            if not value > 0:
                raise ValueError(f"TinyCorridorEnv: {name} must be > 0, got {value!r}.")
        if not isinstance(time_limit, int) or time_limit < 1:
            raise ValueError(f"TinyCorridorEnv: time_limit must be an int >= 1, got {time_limit!r}.")
        table = default_action_table((-1.0, 0.0, 1.0), (-1.0, 0.0, 1.0)) if action_table is None else np.asarray(
            action_table, dtype=np.float32)
        if table.ndim != 2 or table.shape[1] != 2 or len(table) < 1 or np.abs(table).max() > 1.0:
            raise ValueError(f"TinyCorridorEnv: action_table must be [A >= 1, 2] pairs in [-1, 1], got shape {table.shape}.")
        self.scenarios = names
        self.scenario = names[0]
        self.action_table = table
        self.bev_size = bev_size
        self.bev_channels = ("road", "markings", "ego")
        self.bev_shape = (3, bev_size, bev_size)
        self.half_width, self.route_length = float(half_width), float(route_length)
        self.speed_limit, self.max_speed = float(speed_limit), float(max_speed)
        self.drift_size, self.steer_gain, self.accel_gain = float(drift), float(steer_gain), float(accel_gain)
        self.lateral_weight, self.crash_penalty = float(lateral_weight), float(crash_penalty)
        self.time_limit_steps = time_limit
        self.dt = 1.0 / float(policy_frequency)
        self.px = 4.0 * self.half_width / bev_size  # metres per pixel (lateral): the corridor spans half the image
        self.action_space = gym.spaces.Discrete(len(table))
        self.observation_space = gym.spaces.Dict({
            "bev": gym.spaces.Box(0, 1, shape=self.bev_shape, dtype=np.uint8),
            "vec": gym.spaces.Box(-np.inf, np.inf, shape=(4,), dtype=np.float32),
        })
        self._road = np.zeros((bev_size, bev_size), np.uint8)
        lo, hi = bev_size // 4, bev_size - bev_size // 4
        self._road[:, lo:hi] = 1
        self._walls = (lo, hi - 1)
        self.y = self.v = self.x = 0.0
        self.drift = 0.0
        self._reset_episode_counters()

    @property
    def target_speed(self) -> float:
        return 0.8 * self.speed_limit

    def set_scenarios(self, scenarios: Sequence[str], weights: Sequence[float] | None = None) -> None:
        """Interface of :meth:`DrivingEnv.set_scenarios` (one scenario here)."""
        for s in scenarios:
            if s not in self.SCENARIOS:
                raise ValueError(f"TinyCorridorEnv: unknown scenario {s!r}; available: {list(self.SCENARIOS)}.")
        self.scenarios = list(scenarios)

    def decode_action(self, action: Any) -> np.ndarray:
        arr = np.asarray(action)
        if arr.ndim == 0 and np.issubdtype(arr.dtype, np.integer):
            if not 0 <= int(arr) < len(self.action_table):
                raise ValueError(f"TinyCorridorEnv: action index {int(arr)} out of range [0, {len(self.action_table)}).")
            return self.action_table[int(arr)]
        if arr.shape == (2,) and np.issubdtype(arr.dtype, np.floating):
            return np.clip(arr, -1.0, 1.0).astype(np.float32)
        raise TypeError(f"TinyCorridorEnv: action must be an int index or an (acceleration, steering) pair, got {action!r}.")

    def _bev(self) -> np.ndarray:
        s = self.bev_size
        bev = np.zeros(self.bev_shape, np.uint8)
        bev[0] = self._road
        period = 4  # pixels; dashes of 2 pixels scroll down by the distance travelled
        shift = int(self.x / self.px) % period
        rows = (np.arange(s) + shift) % period < 2
        bev[1, rows, self._walls[0]] = 1
        bev[1, rows, self._walls[1]] = 1
        col = s / 2 + self.y / self.px  # ego centre, in pixels
        c0, c1 = int(np.floor(col - 1)), int(np.floor(col + 1))
        r0 = s - s // 4 - 2
        bev[2, r0 : r0 + 3, max(c0, 0) : max(min(c1, s), 0)] = 1
        return bev

    def _obs(self) -> dict[str, np.ndarray]:
        vec = np.array([self.v / 30.0, self.speed_limit / 30.0, self.last_action[0], self.last_action[1]], np.float32)
        return {"bev": self._bev(), "vec": vec}

    def _info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "scenario_id": 0,
            "route_completion": float(min(max(self.x / self.route_length, 0.0), 1.0)),
            "progress": self.x,
            "speed": self.v,
            "lateral_offset": self.y,
            "elapsed": self.steps * self.dt,
            "episode_return": self.episode_return,
            "scenario_density": 1.0,
        }
        info.update({k: float(v) for k, v in self.counts.items()})
        info.update({k: float(v) for k, v in self.events.items()})
        return info

    def _reset_episode_counters(self) -> None:
        """Step count, last action, return and the infraction/event counts of a fresh episode."""
        self.steps = 0
        self.last_action = np.zeros(2, np.float32)
        self.episode_return = 0.0
        self.counts = {k: 0 for k in INFRACTION_KINDS}
        self.events = {k: 0 for k in EVENT_KINDS}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        scenario = (options or {}).get("scenario") or self.scenarios[0]
        if scenario not in self.SCENARIOS:
            raise ValueError(f"TinyCorridorEnv: unknown scenario {scenario!r}; available: {list(self.SCENARIOS)}.")
        self.scenario = scenario
        rng = self.np_random
        self.y = float(rng.uniform(-0.3, 0.3)) * self.half_width
        self.v = float(rng.uniform(0.0, 0.5)) * self.target_speed
        self.drift = self.drift_size * (1.0 if rng.random() < 0.5 else -1.0)
        self.x = 0.0
        self._reset_episode_counters()
        return self._obs(), self._info()

    def step(self, action):
        acc, steer = (float(c) for c in self.decode_action(action))
        self.v = float(np.clip(self.v + self.accel_gain * acc, 0.0, self.max_speed))
        self.y += self.steer_gain * steer + self.drift
        self.x += self.v * self.dt
        self.steps += 1
        self.last_action = np.array([acc, steer], np.float32)
        target = self.target_speed
        reward = 1.0 - abs(self.v - target) / target - self.lateral_weight * min(abs(self.y) / self.half_width, 1.0)
        terminated = truncated = False
        if abs(self.y) > self.half_width:
            self.counts["collision_static"] += 1
            reward = -self.crash_penalty
            terminated = True
        elif self.x >= self.route_length:
            self.events["completed"] = 1
            reward = 1.0
            terminated = True
        elif self.steps >= self.time_limit_steps:
            self.events["route_timeout"] = 1
            truncated = True
        self.episode_return += reward
        return self._obs(), float(reward), terminated, truncated, self._info()

    def close(self) -> None:
        pass
