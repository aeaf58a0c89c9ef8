"""The driving-environment interface: a gymnasium ``Env`` with Think2Drive's observation, actions and reward.

A simulator adapter (highway-env here, CARLA where it is installed) subclasses :class:`DrivingEnv`
and implements four methods:

* ``_sim_reset(scenario, seed) -> None``: build the scene and the ego route;
* ``_sim_step(acceleration, steering) -> None``: apply normalised commands in ``[-1, 1]`` for one
  policy period;
* ``_sim_state() -> DrivingState``: what the reward and the termination rules need (speed, speed
  limit, leading-vehicle distance, progress along the route, deviation from it, collisions, ...);
* ``_render_bev() -> np.ndarray``: the ``uint8 [C, H, W]`` BEV stack.

Everything else (the discrete action table, the vector observation, the Think2Drive reward, the
termination rules and the per-episode infraction record) lives here, so that every engine is
scored the same way.

Observation: ``{"bev": uint8 [C, H, W] in {0, 1}, "vec": float32 [4]}`` with ``vec = (speed / 30,
speed_limit / 30, last acceleration, last steering)`` (speed in m/s; the last command normalised to
``[-1, 1]``).

Reward (Think2Drive Sec. 3.2, structure and weights of the public reproduction jkli-2/CaRL, with the
scales changed as listed below)::

    r = w_speed * r_speed + w_travel * r_travel + w_dev * p_dev + w_steer * c_steer
    r_speed  = 1 - |v - v_target| / v_norm                   v_target = 0.8 * limit, lowered near a lead
    r_travel = (progress this step) / (v_norm * dt)           about v / v_norm
    p_dev    = -(distance to the route's lane centre) / max_deviation_norm
    c_steer  = -|steer_t - steer_{t-1}|                       (normalised steering)
    terminal: -1 on leaving the route or being blocked, +1 on completing the route,
              -C * (1 + v / v_norm) / 2 on a collision, a red light or a stop sign, with
              C = collision_seconds * policy_frequency * (w_speed + w_travel): the reward of
              ``collision_seconds`` seconds of driving at the target speed (-C at v = v_target).
    v_norm   = speed_tolerance if set, else 0.8 * the start lane's limit (the base target speed)

Defaults: w_speed 1, w_travel 0.5, w_dev 2, w_steer 0.5, collision_seconds 4 (-30 at the 24 m/s
target of the highway scenes at 5 Hz, where one step at the target earns 1.5).

What the sum does (free road, on the lane centre, no steering, ``v_target = v_norm``): ``(1 + w_travel) v /
v_norm`` below the target and ``1 + w_travel - (1 - w_travel) (v - v_target) / v_norm`` above it: the
reward rises with speed up to the target and falls above it (1.5 per step at the target, 1.25 at 1.5 x
the target, 0 standing still). Behind a close lead vehicle the target falls to 0 and the reward is
``1 - (1 - w_travel) v / v_norm``: slowing down pays.

Departures from CaRL's constants (its reward is sized for CARLA's urban routes at 10 Hz, whose limit is
always 30 km/h: base target 6.7 m/s, speed error divided by 7.5 m/s, travel in metres per tick,
collision ``-1 - v`` with v in m/s):

* speed error and travel are normalised by the base target speed instead of 7.5 m/s (at 24 m/s
  CaRL's constants give a speed term down to -2.2 per step and 5 per step of travel at 5 Hz);
* w_travel 0.5 instead of 1: with both terms normalised by ``v_norm``, w_travel 1 makes the speed
  and travel terms cancel above the target (the sum is flat in speed for ``v >= v_target``, and 1 at
  any speed behind a close lead). CaRL's travel term, in metres per 0.1 s tick against a speed error
  per 7.5 m/s, has a relative weight of 0.75 (7.5 x 0.1): its sum falls above the target, but by only
  0.25 / 7.5 per m/s. 0.5 makes it fall twice as steeply and keeps the slope below the target
  (1.5 / v_norm) three times the one above (0.5 / v_norm);
* the collision penalty is scaled to ``collision_seconds`` = 4 s of reward at the target speed (CaRL's
  ``-1 - v`` is -7.7 at its target, about 0.46 s of its reward at the target: a crash costs less than
  slowing down for a few seconds behind a slower car, and barely more than leaving the road). 4 s is
  our choice, not tuned: a crash costs clearly more than any few steps of reward (a step earns at
  most 1.5 + 0.5 x 16 / 24 at the 40 m/s cap) and 30 times leaving the route.
* the blocked time-out is ``stall_seconds`` = 10 s with less than 1 m of progress (CaRL: 100 s below 1 m/s),
  scaled to routes of a minute.

Termination: collision, red light, stop sign, leaving the route (farther than ``max_route_deviation``
from every route lane, or off the road), being blocked (less than 1 m of progress in
``stall_seconds``), or completing the route. Truncation: the scenario's time limit.

Minimum speed (CARLA leaderboard 2.0, scenario_runner's ``MinimumSpeedRouteTest``, for the driving
score): the route is cut into ``min_speed_checkpoints`` equal parts (the leaderboard uses 4); over each
part, the ego's speed and the reference speed are summed over the steps that have traffic, and when the
ego has driven a full part (or ends the episode beyond 95 % of the route) a ratio ``100 x ego /
reference`` below 100 is recorded in :attr:`DrivingEnv.min_speed_percentages`
(:func:`lightning_eff.rl.metrics.driving_score` turns each into a penalty factor). The leaderboard's
reference is the mean speed of the background traffic; ours is that mean capped at the base target
speed (0.8 x limit), because highway-env's traffic drives above its lanes' limits (the merge's cars at
30 m/s on a 20 m/s lane): a driver holding the target is not penalised for it. The engine reports the
traffic's mean speed as ``DrivingState.extras["traffic_speed"]``; without it no minimum-speed infraction
is recorded. As on the leaderboard, a car that stops before its first checkpoint gets no minimum-speed
infraction: being blocked (the stall rule) is recorded as a scenario time-out instead
(``events["timeout"]``, penalty 0.7 in the driving score; each route here is one scenario).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_eff.utils.checks import check_int

try:
    import gymnasium as gym
except ImportError as err:  # pragma: no cover - depends on the installation
    raise ImportError(
        "lightning_eff.rl.envs needs gymnasium and highway-env: pip install 'lightning-eff[rl]' "
        "(or pip install highway-env)."
    ) from err

__all__ = [
    "DrivingEnv",
    "DrivingState",
    "RewardWeights",
    "default_action_table",
    "INFRACTION_KINDS",
    "EVENT_KINDS",
]

#: Infractions counted per episode and multiplied into the driving score (keys of CARLA_PENALTIES).
INFRACTION_KINDS: tuple[str, ...] = ("collision_vehicle", "collision_static", "collision_pedestrian", "red_light", "stop_sign")
#: Episode-ending events that are not penalised in the driving score (route completion covers them).
EVENT_KINDS: tuple[str, ...] = ("route_deviation", "off_road", "timeout", "route_timeout", "completed")


def default_action_table(
    accelerations: Sequence[float] = (-1.0, -0.4, 0.0, 0.4, 1.0),
    steerings: Sequence[float] = (-1.0, -0.3, -0.08, 0.0, 0.08, 0.3, 1.0),
) -> np.ndarray:
    """All ``(acceleration, steering)`` combinations, normalised to ``[-1, 1]`` (35 actions by default).

    Think2Drive uses 30 (throttle, brake, steer) combinations; a kinematic simulator has one signed
    acceleration instead of throttle/brake. The uneven steering grid gives both the small angles that
    highway lane changes need and the large ones of intersection turns.

    Example::

        >>> table = default_action_table()
        >>> table.shape, table[0].tolist()
        ((35, 2), [-1.0, -1.0])
    """
    acc = np.asarray(accelerations, dtype=np.float32)
    steer = np.asarray(steerings, dtype=np.float32)
    return np.stack(np.meshgrid(acc, steer, indexing="ij"), axis=-1).reshape(-1, 2)


@dataclass
class RewardWeights:
    """Weights and scales of the Think2Drive reward (see the module docstring).

    Example::

        >>> RewardWeights().deviation
        2.0
    """

    speed: float = 1.0
    travel: float = 0.5
    deviation: float = 2.0
    steering: float = 0.5
    speed_tolerance: float | None = None
    max_deviation_norm: float = 8.0
    safety_distance: float = 8.0
    slowdown_time: float = 1.5
    collision_seconds: float = 4.0

    def __post_init__(self) -> None:
        for name in ("speed", "travel", "deviation", "steering", "collision_seconds"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"RewardWeights: {name} must be a number >= 0, got {value!r}.")


@dataclass
class DrivingState:
    """What a simulator adapter reports after each step (SI units).

    ``collision`` is ``None`` or an infraction kind (``"collision_vehicle"``, ``"collision_static"``,
    ``"collision_pedestrian"``). ``lead_distance`` is the centre distance to the leading vehicle in
    the ego's lane (``inf`` if none).

    Example::

        >>> s = DrivingState(speed=20.0, speed_limit=30.0, lead_distance=float("inf"), progress=50.0,
        ...                  route_length=400.0, route_deviation=0.3)
        >>> s.collision is None and s.on_road
        True
    """

    speed: float
    speed_limit: float
    lead_distance: float
    progress: float
    route_length: float
    route_deviation: float
    on_road: bool = True
    collision: str | None = None
    red_light: bool = False
    stop_sign: bool = False
    extras: dict[str, float] = field(default_factory=dict)


class DrivingEnv(gym.Env):
    """Base of every driving environment (gymnasium API; see the module docstring).

    Subclasses call ``super().__init__(...)`` and implement ``_sim_reset``, ``_sim_step``,
    ``_sim_state``, ``_render_bev`` and set ``self.bev_channels`` / ``self.bev_shape`` before the
    observation space is built (:meth:`_build_spaces`).

    Args:
        scenarios: scenario names this environment samples from at each reset.
        scenario_weights: sampling weights (default uniform).
        action_table: ``[A, 2]`` normalised ``(acceleration, steering)`` pairs (default
            :func:`default_action_table`).
        reward: :class:`RewardWeights` or a dict of its fields.
        max_route_deviation: metres from the route's lanes that end the episode.
        stall_seconds: seconds with less than 1 m of progress that end the episode (blocked).
        policy_frequency: decisions per second.
        min_speed_checkpoints: route parts of the minimum-speed test (the leaderboard uses 4).

    Example (a minimal engine: the ego drives along a straight 100 m route at its commanded speed)::

        >>> class Straight(DrivingEnv):
        ...     SCENARIOS = ("line",)
        ...     def __init__(self):
        ...         super().__init__("line")
        ...         self.bev_channels, self.bev_shape = ("ego",), (1, 4, 4)
        ...         self._build_spaces()
        ...     def _sim_reset(self, scenario, seed):
        ...         self.x, self.v = 0.0, 10.0
        ...     def _sim_step(self, acceleration, steering):
        ...         self.v = max(self.v + 5.0 * acceleration * self.dt, 0.0)
        ...         self.x += self.v * self.dt
        ...     def _sim_state(self):
        ...         return DrivingState(self.v, 20.0, float("inf"), self.x, 100.0, 0.0)
        ...     def _render_bev(self):
        ...         return np.zeros(self.bev_shape, np.uint8)
        >>> env = Straight()
        >>> obs, info = env.reset(seed=0)
        >>> done = False
        >>> while not done:
        ...     obs, reward, terminated, truncated, info = env.step(np.array([1.0, 0.0], np.float32))
        ...     done = terminated or truncated
        >>> info["completed"], info["route_completion"]
        (1.0, 1.0)
    """

    metadata = {"render_modes": ["rgb_array"]}
    #: Scenario names the subclass knows.
    SCENARIOS: tuple[str, ...] = ()
    #: Scenario density of each scenario, for the weighted driving score (default 1).
    DENSITY: dict[str, float] = {}

    def __init__(
        self,
        scenarios: str | Sequence[str],
        scenario_weights: Sequence[float] | None = None,
        action_table: Sequence[Sequence[float]] | np.ndarray | None = None,
        reward: RewardWeights | dict[str, float] | None = None,
        max_route_deviation: float = 4.0,
        stall_seconds: float = 10.0,
        policy_frequency: float = 5.0,
        render_mode: str | None = None,
        min_speed_checkpoints: int = 4,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(scenarios, str):
            scenarios = [scenarios]
        scenarios = list(scenarios)
        if not scenarios:
            raise ValueError(f"{name}: scenarios must name at least one scenario of {list(self.SCENARIOS)}.")
        for s in scenarios:
            if s not in self.SCENARIOS:
                raise ValueError(f"{name}: unknown scenario {s!r}; available scenarios are {list(self.SCENARIOS)}.")
        self.scenarios = scenarios
        if scenario_weights is None:
            weights = np.full(len(scenarios), 1.0 / len(scenarios))
        else:
            weights = np.asarray(scenario_weights, dtype=np.float64)
            if weights.shape != (len(scenarios),) or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError(
                    f"{name}: scenario_weights must be {len(scenarios)} non-negative numbers with a positive sum, "
                    f"got {scenario_weights!r}."
                )
            weights = weights / weights.sum()
        self.scenario_weights = weights
        table = default_action_table() if action_table is None else np.asarray(action_table, dtype=np.float32)
        if table.ndim != 2 or table.shape[1] != 2 or len(table) < 1 or np.abs(table).max() > 1.0:
            raise ValueError(
                f"{name}: action_table must be [A >= 1, 2] (acceleration, steering) pairs in [-1, 1], got "
                f"shape {table.shape}."
            )
        self.action_table = table
        if isinstance(reward, dict):
            reward = RewardWeights(**reward)
        self.reward_weights = reward or RewardWeights()
        if not max_route_deviation > 0:
            raise ValueError(f"{name}: max_route_deviation must be > 0 metres, got {max_route_deviation!r}.")
        if not stall_seconds > 0:
            raise ValueError(f"{name}: stall_seconds must be > 0, got {stall_seconds!r}.")
        if not policy_frequency > 0:
            raise ValueError(f"{name}: policy_frequency must be > 0 Hz, got {policy_frequency!r}.")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"{name}: render_mode must be None or 'rgb_array' (headless), got {render_mode!r}.")
        check_int(min_speed_checkpoints, "min_speed_checkpoints", minimum=1, owner=name)
        self.min_speed_checkpoints = min_speed_checkpoints
        self.render_mode = render_mode
        self.max_route_deviation = float(max_route_deviation)
        self.stall_seconds = float(stall_seconds)
        self.policy_frequency = float(policy_frequency)
        self.dt = 1.0 / self.policy_frequency
        self.action_space = gym.spaces.Discrete(len(table))
        self._np_random = np.random.default_rng()
        self.scenario: str = scenarios[0]
        self.time_limit = math.inf
        self._reset_episode_record()

    # -- subclass hooks -------------------------------------------------------------------------------
    def _sim_reset(self, scenario: str, seed: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _sim_step(self, acceleration: float, steering: float) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _sim_state(self) -> DrivingState:  # pragma: no cover - interface
        raise NotImplementedError

    def _render_bev(self) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    # -- spaces ---------------------------------------------------------------------------------------
    def _build_spaces(self) -> None:
        self.observation_space = gym.spaces.Dict(
            {
                "bev": gym.spaces.Box(0, 1, shape=tuple(self.bev_shape), dtype=np.uint8),
                "vec": gym.spaces.Box(-np.inf, np.inf, shape=(4,), dtype=np.float32),
            }
        )

    # -- episode bookkeeping --------------------------------------------------------------------------
    def _reset_episode_record(self) -> None:
        self.counts = {k: 0 for k in INFRACTION_KINDS}
        self.events = {k: 0 for k in EVENT_KINDS}
        self.last_action = np.zeros(2, dtype=np.float32)
        self.elapsed = 0.0
        self.episode_return = 0.0
        self.max_progress = 0.0
        self._progress_window: deque[float] = deque()
        #: Minimum-speed infractions of this episode: 100 x ego / traffic mean speed, one per route part.
        self.min_speed_percentages: list[float] = []
        self._checkpoint_start = 0.0
        self._ego_speed_sum = 0.0
        self._traffic_speed_sum = 0.0

    def decode_action(self, action: int | np.integer | np.ndarray | Sequence[float]) -> np.ndarray:
        """Action index -> ``(acceleration, steering)`` in ``[-1, 1]``.

        A length-2 float array is taken as a continuous command (reference controllers such as the IDM
        driver use it); agents use indices into :attr:`action_table`.
        """
        arr = np.asarray(action)
        if arr.ndim == 0 and np.issubdtype(arr.dtype, np.integer):
            idx = int(arr)
            if not 0 <= idx < len(self.action_table):
                raise ValueError(
                    f"{type(self).__name__}: action index {idx} out of range [0, {len(self.action_table)})."
                )
            return self.action_table[idx].astype(np.float32)
        if arr.shape == (2,) and np.issubdtype(arr.dtype, np.floating):
            return np.clip(arr, -1.0, 1.0).astype(np.float32)
        raise TypeError(
            f"{type(self).__name__}: action must be an int index into the {len(self.action_table)}-action table "
            f"or a float (acceleration, steering) pair, got {action!r}."
        )

    def _vec(self, state: DrivingState) -> np.ndarray:
        return np.array(
            [state.speed / 30.0, state.speed_limit / 30.0, self.last_action[0], self.last_action[1]], dtype=np.float32
        )

    def _observation(self, state: DrivingState) -> dict[str, np.ndarray]:
        return {"bev": self._render_bev(), "vec": self._vec(state)}

    def _info(self, state: DrivingState, terms: dict[str, float] | None = None) -> dict[str, Any]:
        rc = min(max(self.max_progress / max(state.route_length, 1e-6), 0.0), 1.0)
        info: dict[str, Any] = {
            "scenario_id": self.SCENARIOS.index(self.scenario),
            "route_completion": rc,
            "progress": state.progress,
            "speed": state.speed,
            "route_deviation_m": state.route_deviation,
            "elapsed": self.elapsed,
            "episode_return": self.episode_return,
            "scenario_density": float(self.DENSITY.get(self.scenario, 1.0)),
            "min_speed_infractions": float(len(self.min_speed_percentages)),
        }
        info.update({k: float(v) for k, v in self.counts.items()})
        info.update({k: float(v) for k, v in self.events.items()})
        if terms:
            info.update({f"reward_{k}": float(v) for k, v in terms.items()})
        return info

    # -- gymnasium API --------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is not None:
            self.np_random = np.random.default_rng(seed)
            self._np_random_seed = seed
        options = options or {}
        scenario = options.get("scenario")
        if scenario is None:
            scenario = self.scenarios[int(self.np_random.choice(len(self.scenarios), p=self.scenario_weights))]
        elif scenario not in self.SCENARIOS:
            raise ValueError(
                f"{type(self).__name__}: unknown scenario {scenario!r}; available scenarios are {list(self.SCENARIOS)}."
            )
        self.scenario = scenario
        sim_seed = int(self.np_random.integers(0, 2**31 - 1)) if seed is None else int(seed)
        self._reset_episode_record()
        self._sim_reset(scenario, sim_seed)
        state = self._sim_state()
        self._start_progress = state.progress
        self._checkpoint_start = max(state.progress, 0.0)
        self._ref_speed = max(0.8 * state.speed_limit, 1.0)
        self._last_progress = state.progress
        self._progress_window.append(state.progress)
        self.max_progress = max(state.progress, 0.0)
        self._last_obs = self._observation(state)
        return self._last_obs, self._info(state)

    def set_scenarios(self, scenarios: Sequence[str], weights: Sequence[float] | None = None) -> None:
        """Change the scenarios sampled at the next resets (the warm-up curriculum uses this)."""
        for s in scenarios:
            if s not in self.SCENARIOS:
                raise ValueError(f"{type(self).__name__}: unknown scenario {s!r}; available: {list(self.SCENARIOS)}.")
        self.scenarios = list(scenarios)
        w = np.ones(len(scenarios)) if weights is None else np.asarray(weights, dtype=np.float64)
        self.scenario_weights = w / w.sum()

    @property
    def speed_norm(self) -> float:
        """``v_norm`` of the reward: ``speed_tolerance`` if set, else the episode's base target speed."""
        tol = self.reward_weights.speed_tolerance
        return float(tol) if tol is not None else self._ref_speed

    def collision_penalty(self, speed: float) -> float:
        """Magnitude of the terminal penalty of a collision (or red light, stop sign) at ``speed`` m/s.

        ``C (1 + v / v_norm) / 2`` with ``C = collision_seconds * policy_frequency * (w_speed + w_travel)``,
        the reward of ``collision_seconds`` of driving at the target speed: CaRL's ``-1 - v`` shape
        (twice as costly at the target as standing still), scaled to seconds of reward.
        """
        w = self.reward_weights
        per_step = w.collision_seconds * self.policy_frequency * (w.speed + w.travel)
        return per_step * (1.0 + speed / self.speed_norm) / 2.0

    def target_speed(self, state: DrivingState) -> float:
        """Think2Drive's target speed: 0.8 x the speed limit, lowered linearly to 0 near a leading vehicle."""
        w = self.reward_weights
        base = 0.8 * state.speed_limit
        ramp = max(12.5, w.slowdown_time * base)
        factor = float(np.clip((state.lead_distance - w.safety_distance) / ramp, 0.0, 1.0))
        return base * factor

    def _close_min_speed_checkpoint(self) -> None:
        if self._traffic_speed_sum > 0:
            percentage = round(100.0 * self._ego_speed_sum / self._traffic_speed_sum, 2)
            if percentage < 100.0:
                self.min_speed_percentages.append(percentage)
        self._ego_speed_sum = self._traffic_speed_sum = 0.0

    def _track_min_speed(self, state: DrivingState, done: bool) -> None:
        """One step of the leaderboard's ``MinimumSpeedRouteTest`` (see the module docstring)."""
        part = max(state.route_length, 1e-6) / self.min_speed_checkpoints
        if self.max_progress - self._checkpoint_start > part:
            self._close_min_speed_checkpoint()
            self._checkpoint_start = self.max_progress
        traffic = state.extras.get("traffic_speed")
        if traffic is not None and np.isfinite(traffic) and traffic > 0:
            self._ego_speed_sum += max(state.speed, 0.0)
            self._traffic_speed_sum += min(float(traffic), self._ref_speed)
        if done and self.max_progress / max(state.route_length, 1e-6) > 0.95:
            self._close_min_speed_checkpoint()

    def step(self, action):
        command = self.decode_action(action)
        self._sim_step(float(command[0]), float(command[1]))
        self.elapsed += self.dt
        state = self._sim_state()
        w = self.reward_weights

        progress_delta = state.progress - self._last_progress
        self._last_progress = state.progress
        self.max_progress = max(self.max_progress, state.progress)
        target = self.target_speed(state)
        v_norm = self.speed_norm
        terms = {
            "speed": 1.0 - abs(state.speed - target) / v_norm,
            "travel": progress_delta / (v_norm * self.dt),
            "deviation": -min(state.route_deviation, w.max_deviation_norm) / w.max_deviation_norm,
            "steering": -abs(float(command[1]) - float(self.last_action[1])),
        }
        reward = w.speed * terms["speed"] + w.travel * terms["travel"] + w.deviation * terms["deviation"]
        reward += w.steering * terms["steering"]
        self.last_action = command

        # Blocked: less than 1 m of progress during the last `stall_seconds`.
        self._progress_window.append(state.progress)
        window = int(round(self.stall_seconds / self.dt))
        while len(self._progress_window) > window + 1:
            self._progress_window.popleft()
        stalled = len(self._progress_window) > window and (
            max(self._progress_window) - self._progress_window[0] < 1.0
        )
        terminated, truncated = False, False
        if state.collision is not None:
            self.counts[state.collision] += 1
            reward = -self.collision_penalty(state.speed)
            terminated = True
        elif state.red_light or state.stop_sign:
            self.counts["red_light" if state.red_light else "stop_sign"] += 1
            reward = -self.collision_penalty(state.speed)
            terminated = True
        elif not state.on_road or state.route_deviation > self.max_route_deviation:
            self.events["route_deviation"] = 1
            self.events["off_road"] = int(not state.on_road)
            reward = -1.0
            terminated = True
        elif stalled:
            self.events["timeout"] = 1
            reward = -1.0
            terminated = True
        elif state.progress >= state.route_length:
            self.events["completed"] = 1
            reward = 1.0
            terminated = True
        elif self.elapsed >= self.time_limit - 1e-9:
            self.events["route_timeout"] = 1
            truncated = True
        self._track_min_speed(state, terminated or truncated)
        self.episode_return += reward
        self._last_obs = self._observation(state)
        info = self._info(state, terms)
        info["target_speed"] = target
        return self._last_obs, float(reward), terminated, truncated, info

    def render(self) -> np.ndarray | None:
        """An RGB picture of the current BEV (``render_mode="rgb_array"``); nothing is ever displayed."""
        if self.render_mode != "rgb_array":
            return None
        from lightning_eff.rl.envs.bev import colorize

        return colorize(self._last_obs["bev"], self.bev_channels)

    def close(self) -> None:
        pass
