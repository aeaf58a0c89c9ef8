"""``HighwayBEVEnv``: the driving interface on highway-env (PyPI ``highway-env``; runs offline, headless).

highway-env simulates kinematic bicycle vehicles on lane graphs with IDM/MOBIL traffic. We use its
scenes and traffic, drive the ego with its ``ContinuousAction`` (acceleration, steering), and replace
its observation and reward by Think2Drive's (:mod:`lightning_eff.rl.envs.base`): our own BEV
rasteriser draws the lanes, lines, route, ego and vehicle footprints (highway-env's ``OccupancyGrid``
only marks vehicle centres and lane centrelines).

Scenarios (``HighwayBEVEnv.SCENARIOS``), one scene type per route as in Think2Drive's CornerCaseRepo:

=================  ==========================================================================
``highway_easy``   3 lanes, light traffic: the warm-up curriculum's scene
``highway``        3 lanes, 15 vehicles, 800 m route
``highway_dense``  4 lanes, 35 vehicles at double density (dense traffic)
``cut_in``         3 lanes, aggressive drivers that change lanes into small gaps (cut-ins)
``merge``          highway with vehicles merging from an on-ramp, 700 m route (road extended)
``roundabout``     two-lane roundabout, exit at the north branch
``intersection``   unsignalised four-way crossing with priority traffic, random turn
=================  ==========================================================================

Infractions recorded: vehicle collision, static collision (merge's ramp-end obstacle), leaving the
route or the road, being blocked, route timeout, and route completion (``info``).

Departures from the stock scenes: only collisions that involve the ego are checked (as highway-env's
"-fast" variants); full steering is capped at 7 m/s^2 of lateral acceleration (the kinematic bicycle
has no tyre limit, and one action table must steer gently at 25 m/s and sharply at 8 m/s); the ego
cannot reverse (speed in [0, 40] m/s).
"""

from __future__ import annotations

import functools
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_eff.rl.envs.base import DrivingEnv, DrivingState
from lightning_eff.rl.envs.bev import BEVRasterizer, Segments, polyline_segments

__all__ = ["HighwayBEVEnv", "ScenarioSpec", "SCENARIO_SPECS"]


@dataclass(frozen=True)
class ScenarioSpec:
    """How one scenario is built from a highway-env scene.

    Attributes:
        env_class: highway-env class name in ``highway_env.envs``.
        config: overrides of that class's ``default_config()``.
        time_limit: seconds before the route times out (truncation).
        route_length: route length [m] for straight highways and the merge (whose road is extended
            past its stock 460 m end when the route needs it); roundabout and intersection routes
            follow the lane graph.
        density: scenario density for the weighted driving score.

    Example::

        >>> SCENARIO_SPECS["merge"].env_class, SCENARIO_SPECS["highway_dense"].density
        ('MergeEnv', 2.0)
    """

    env_class: str
    config: dict[str, Any] = field(default_factory=dict)
    time_limit: float = 30.0
    route_length: float = 400.0
    density: float = 1.0


# Route lengths: long enough that braking to a standstill completes little of them (from the highway's
# 25 m/s start, gentle braking at 2 m/s^2 stops after 156 m; from the merge's 30 m/s, after 225 m), time
# limits that let a car at about 60 % of the 24 m/s (highway) / 16 m/s (merge) target finish.
SCENARIO_SPECS: dict[str, ScenarioSpec] = {
    "highway_easy": ScenarioSpec(
        "HighwayEnv", {"lanes_count": 3, "vehicles_count": 5, "vehicles_density": 0.5}, time_limit=60.0,
        route_length=800.0,
    ),
    "highway": ScenarioSpec(
        "HighwayEnv", {"lanes_count": 3, "vehicles_count": 15, "vehicles_density": 1.0}, time_limit=60.0,
        route_length=800.0,
    ),
    "highway_dense": ScenarioSpec(
        "HighwayEnv", {"lanes_count": 4, "vehicles_count": 35, "vehicles_density": 2.0}, time_limit=70.0, density=2.0,
        route_length=800.0,
    ),
    "cut_in": ScenarioSpec(
        "HighwayEnv",
        {
            "lanes_count": 3,
            "vehicles_count": 20,
            "vehicles_density": 1.5,
            "other_vehicles_type": "highway_env.vehicle.behavior.AggressiveVehicle",
        },
        time_limit=70.0,
        density=1.5,
        route_length=800.0,
    ),
    "merge": ScenarioSpec("MergeEnv", {}, time_limit=70.0, route_length=700.0),
    "roundabout": ScenarioSpec("RoundaboutEnv", {}, time_limit=25.0),
    "intersection": ScenarioSpec("IntersectionEnv", {"destination": None}, time_limit=25.0),
}

#: Routes through the lane graph: (start edge..., destination node) and the distance driven on the exit.
_EXIT_DISTANCE = {"roundabout": 30.0, "intersection": 25.0}


def _highway_env():
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    try:
        import highway_env.envs as hw_envs
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError(
            "HighwayBEVEnv needs highway-env: pip install 'lightning-eff[rl]' (or pip install highway-env==1.12.1)."
        ) from err
    return hw_envs


@functools.cache
def _quiet_class(name: str) -> type:
    """A highway-env scene class whose own reward/observation/termination are switched off (we compute ours)."""
    base = getattr(_highway_env(), name)

    def _info(self, obs, action=None):
        return {}

    return type(
        f"_Quiet{name}",
        (base,),
        {
            "_info": _info,
            "_reward": lambda self, action: 0.0,
            "_rewards": lambda self, action: {},
            "_is_terminated": lambda self: False,
            "_is_truncated": lambda self: False,
            "render": lambda self: None,
        },
    )


def _lane_segments(lane: Any, s_from: float = 0.0, s_to: float | None = None, tolerance: float = 0.1) -> Segments:
    """Straight segments of one highway-env lane between two longitudinal coordinates."""
    from highway_env.road.lane import StraightLane

    s_to = lane.length if s_to is None else min(s_to, lane.length)
    s_from = max(s_from, 0.0)
    if s_to <= s_from:
        return Segments.empty()
    lines = tuple(int(t) for t in lane.line_types)
    half = float(lane.width_at(0.0)) / 2
    if type(lane) is StraightLane:
        pts = np.stack([lane.position(s_from, 0.0), lane.position(s_to, 0.0)])
        return Segments(pts[:1], pts[1:], half, s_from, np.asarray(lines))
    n = max(int(np.ceil((s_to - s_from) / 1.0)), 1)
    s = np.linspace(s_from, s_to, n + 1)
    pts = np.stack([lane.position(x, 0.0) for x in s])
    return polyline_segments(pts, half, lines, tolerance=tolerance, s_start=s_from)


class HighwayBEVEnv(DrivingEnv):
    """Think2Drive-style driving on highway-env scenes: BEV + vector observation, discrete actions.

    Args:
        scenarios: scenario name(s) (:data:`SCENARIO_SPECS`) sampled at each reset.
        scenario_weights: sampling weights.
        bev_size: BEV height/width in pixels.
        resolution: metres per BEV pixel.
        ego_row: BEV row of the ego's centre, in pixels from the top (default ``0.75 * bev_size``: three
            times more range ahead than behind; ``bev_size / 2`` centres the ego).
        lateral_resolution: metres per BEV column (default ``resolution``). At 3 m/pixel a 4 m lane is 1.3
            pixels wide and the ego's offset in its lane is invisible: behaviour cloning of IDM from the
            observation then fails to keep the lane (``benchmarks/rl_diagnose.py``); 1 m/column resolves it.
        history: vehicle frames in the BEV (current + past).
        history_stride: policy steps between two history frames.
        action_table: ``[A, 2]`` normalised (acceleration, steering) pairs.
        acceleration_range: m/s^2 of the normalised acceleration -1 and +1.
        steering_range: radians of the normalised steering +-1 (at low speed).
        max_lateral_acceleration: m/s^2 reached at full steering; above the speed where ``steering_range``
            would exceed it, full steering is reduced to this lateral acceleration (``None``: never).
        simulation_frequency: physics steps per second (collisions are checked at each).
        policy_frequency: decisions per second.
        reward, max_route_deviation, stall_seconds, render_mode: see :class:`DrivingEnv`.

    Example::

        >>> env = HighwayBEVEnv("highway_easy", bev_size=32, resolution=2.0)
        >>> obs, info = env.reset(seed=0)
        >>> obs["bev"].shape, obs["vec"].shape, int(env.action_space.n)
        ((10, 32, 32), (4,), 35)
        >>> obs, reward, terminated, truncated, info = env.step(17)  # no acceleration, straight
        >>> 0.0 <= info["route_completion"] <= 1.0
        True
    """

    SCENARIOS = tuple(SCENARIO_SPECS)
    DENSITY = {k: v.density for k, v in SCENARIO_SPECS.items()}

    def __init__(
        self,
        scenarios: str | list[str] = "highway",
        scenario_weights: list[float] | None = None,
        bev_size: int = 64,
        resolution: float = 1.0,
        ego_row: float | None = None,
        lateral_resolution: float | None = None,
        history: int = 4,
        history_stride: int = 1,
        action_table: list[list[float]] | np.ndarray | None = None,
        acceleration_range: tuple[float, float] = (-5.0, 5.0),
        steering_range: float = 0.5,
        max_lateral_acceleration: float | None = 7.0,
        simulation_frequency: int = 10,
        policy_frequency: int = 5,
        reward: dict[str, float] | None = None,
        max_route_deviation: float = 4.0,
        stall_seconds: float = 10.0,
        render_mode: str | None = None,
        min_speed_checkpoints: int = 4,
    ) -> None:
        super().__init__(
            scenarios,
            scenario_weights,
            action_table,
            reward,
            max_route_deviation=max_route_deviation,
            stall_seconds=stall_seconds,
            policy_frequency=policy_frequency,
            render_mode=render_mode,
            min_speed_checkpoints=min_speed_checkpoints,
        )
        if not (isinstance(simulation_frequency, int) and simulation_frequency >= policy_frequency > 0):
            raise ValueError(
                f"HighwayBEVEnv: simulation_frequency must be an int >= policy_frequency={policy_frequency}, got "
                f"{simulation_frequency!r}."
            )
        if not (len(acceleration_range) == 2 and acceleration_range[0] < acceleration_range[1]):
            raise ValueError(f"HighwayBEVEnv: acceleration_range must be (low, high) with low < high, got {acceleration_range!r}.")
        if not steering_range > 0:
            raise ValueError(f"HighwayBEVEnv: steering_range must be > 0 radians, got {steering_range!r}.")
        if max_lateral_acceleration is not None and not max_lateral_acceleration > 0:
            raise ValueError(
                f"HighwayBEVEnv: max_lateral_acceleration must be None or > 0 m/s^2, got {max_lateral_acceleration!r}."
            )
        self.max_lateral_acceleration = max_lateral_acceleration
        if ego_row is None:
            ego_row = 0.75 * bev_size
        self.rasterizer = BEVRasterizer(
            size=bev_size, resolution=resolution, history=history, history_stride=history_stride, ego_row=ego_row,
            lateral_resolution=lateral_resolution,
        )
        self.bev_channels = self.rasterizer.channels
        self.bev_shape = (len(self.bev_channels), bev_size, bev_size)
        self._build_spaces()
        self.acceleration_range = tuple(float(a) for a in acceleration_range)
        self.steering_range = float(steering_range)
        self.simulation_frequency = simulation_frequency
        self._sims: dict[str, Any] = {}
        self.sim: Any = None

    # -- simulator ------------------------------------------------------------------------------------
    def _make_sim(self, scenario: str) -> Any:
        spec = SCENARIO_SPECS[scenario]
        config = {
            "observation": {"type": "AttributesObservation", "attributes": ["time"]},
            "action": {
                "type": "ContinuousAction",
                "acceleration_range": list(self.acceleration_range),
                "steering_range": [-self.steering_range, self.steering_range],
                "speed_range": [0.0, 40.0],
            },
            "simulation_frequency": self.simulation_frequency,
            "policy_frequency": int(self.policy_frequency),
            "duration": 10_000,
            "offscreen_rendering": True,
            **spec.config,
        }
        return _quiet_class(spec.env_class)(config=config)

    def _sim_reset(self, scenario: str, seed: int) -> None:
        if scenario not in self._sims:
            self._sims[scenario] = self._make_sim(scenario)
        self.sim = self._sims[scenario]
        self.sim.reset(seed=seed)
        spec = SCENARIO_SPECS[scenario]
        if scenario == "merge":
            self._extend_merge(spec)
        # As highway-env's "-fast" variants: only collisions that involve the ego are checked.
        for v in self.sim.road.vehicles:
            if v is not self.sim.vehicle:
                v.check_collisions = False
        self.time_limit = spec.time_limit
        ego = self.sim.vehicle
        self._plan_route(scenario, spec)
        self._road_segments = self._network_segments()
        self._route_segments = self._route_segments_build()
        reach = self.rasterizer.view_radius + self.max_route_deviation + 10.0
        pts = np.concatenate([self._route_segments.start, self._route_segments.end, ego.position[None]])
        lo, hi = pts.min(axis=0) - reach, pts.max(axis=0) + reach
        self._static = self.rasterizer.prepare(self._road_segments, self._route_segments, (*lo, *hi))
        self._frames: deque[np.ndarray] = deque(maxlen=self.rasterizer.frames_needed)
        self._frames.appendleft(self._vehicle_boxes())
        self._obstacles = self._object_boxes()
        self._edge_idx = 0
        self._crashed_before = bool(ego.crashed)

    def _extend_merge(self, spec: ScenarioSpec) -> None:
        """Continue the merge's two highway lanes straight past their stock end (x = 460 m) when the route
        (``route_length`` from the ego's start) needs it, plus 100 m so the BEV never sees the road end."""
        from highway_env.road.lane import LineType, StraightLane

        net = self.sim.road.network
        end = float(net.get_lane(("c", "d", 0)).end[0])
        start = float(self.sim.vehicle.position[0])
        extra = start + spec.route_length + 100.0 - end
        if extra <= 0 or "d" in net.graph:
            return
        c, s, n = LineType.CONTINUOUS_LINE, LineType.STRIPED, LineType.NONE
        for i, lines in enumerate(([c, s], [n, c])):
            y = float(net.get_lane(("c", "d", i)).end[1])
            net.add_lane("d", "e", StraightLane([end, y], [end + extra, y], line_types=lines))

    def _plan_route(self, scenario: str, spec: ScenarioSpec) -> None:
        """The route as a list of graph edges, with the start and end coordinates on the first/last edge."""
        net = self.sim.road.network
        ego = self.sim.vehicle
        start_edge = ego.lane_index[:2]
        s_start = float(ego.lane.local_coordinates(ego.position)[0])
        if scenario.startswith("highway") or scenario == "cut_in":
            edges = [start_edge]
            s_end = s_start + spec.route_length
        elif scenario == "merge":
            edges = [("a", "b"), ("b", "c"), ("c", "d")]
            x_end = float(ego.position[0]) + spec.route_length
            if "d" in net.graph:
                edges.append(("d", "e"))
            s_end = x_end - float(net.get_lane(edges[-1] + (0,)).start[0])
        else:
            if scenario == "roundabout":
                destination = "nxs"
            else:
                destination = "o" + str(int(self.sim.np_random.integers(1, 4)))
            path = net.shortest_path(start_edge[1], destination)
            edges = [start_edge] + [(path[i], path[i + 1]) for i in range(len(path) - 1)]
            exits = list(net.graph[destination].keys()) if destination in net.graph else []
            if scenario == "roundabout" and exits:
                edges.append((destination, exits[0]))
            s_end = _EXIT_DISTANCE[scenario]
        self.route_edges = edges
        self.route_lanes = [[net.get_lane((a, b, i)) for i in range(len(net.graph[a][b]))] for a, b in edges]
        ref_lengths = [lanes[0].length for lanes in self.route_lanes]
        ref_lengths[-1] = min(ref_lengths[-1], s_end) if len(edges) > 1 else s_end
        self._route_cum = np.concatenate([[0.0], np.cumsum(ref_lengths)])
        self._s_start = s_start
        self._s_end = s_end
        self._route_total = float(self._route_cum[-1] - s_start)

    def _network_segments(self) -> Segments:
        return Segments.concat([_lane_segments(lane) for lane in self.sim.road.network.lanes_list()])

    def _route_segments_build(self) -> Segments:
        parts = []
        last = len(self.route_lanes) - 1
        for k, lanes in enumerate(self.route_lanes):
            for lane in lanes:
                s_from = self._s_start if k == 0 else 0.0
                s_to = self._s_end if k == last else None
                if k == last and last > 0:
                    s_to = self._s_end * lane.length / max(self.route_lanes[k][0].length, 1e-6)
                parts.append(_lane_segments(lane, s_from, s_to, tolerance=0.2))
        return Segments.concat(parts)

    @staticmethod
    def _box(obj: Any) -> list[float]:
        return [float(obj.position[0]), float(obj.position[1]), float(obj.heading), float(obj.LENGTH), float(obj.WIDTH)]

    def _vehicle_boxes(self) -> np.ndarray:
        ego = self.sim.vehicle
        boxes = [self._box(v) for v in self.sim.road.vehicles if v is not ego]
        return np.asarray(boxes, dtype=np.float64).reshape(-1, 5)

    def _object_boxes(self) -> np.ndarray:
        return np.asarray([self._box(o) for o in self.sim.road.objects], dtype=np.float64).reshape(-1, 5)

    def steering_limit(self) -> float:
        """Radians of full steering at the ego's current speed.

        highway-env's kinematic bicycle has no tyres: 0.5 rad at 25 m/s would turn at 60 m/s^2. Full
        steering is capped at the angle that gives ``max_lateral_acceleration`` (with the model's
        slip angle ``beta = atan(tan(delta) / 2)``, lateral acceleration ``v^2 sin(beta) / (L / 2)``), so
        the same action table steers gently on highways and sharply in intersections.
        """
        if self.max_lateral_acceleration is None or self.sim is None:
            return self.steering_range
        ego = self.sim.vehicle
        v = max(abs(float(ego.speed)), 1.0)
        sin_beta = min(self.max_lateral_acceleration * ego.LENGTH / (2.0 * v * v), 1.0)
        delta = float(np.arctan(2.0 * np.tan(np.arcsin(sin_beta))))
        return min(self.steering_range, delta)

    def _sim_step(self, acceleration: float, steering: float) -> None:
        scaled = steering * self.steering_limit() / self.steering_range
        self.sim.step(np.array([acceleration, scaled], dtype=np.float32))
        self._frames.appendleft(self._vehicle_boxes())
        self._obstacles = self._object_boxes()

    def _route_position(self) -> tuple[float, float]:
        """(progress along the route [m], distance to the closest route lane centre [m])."""
        ego = self.sim.vehicle
        best = (np.inf, None, None)
        lo = max(self._edge_idx - 1, 0)
        hi = min(self._edge_idx + 3, len(self.route_lanes))
        for k in range(lo, hi):
            ref = self.route_lanes[k][0].length
            for lane in self.route_lanes[k]:
                s, lat = lane.local_coordinates(ego.position)
                if -2.0 <= s <= lane.length + 2.0 and abs(lat) < best[0]:
                    best = (abs(float(lat)), k, float(np.clip(s, 0.0, lane.length)) * ref / max(lane.length, 1e-6))
        deviation, k, s_ref = best
        if k is None:
            return self._last_progress, float("inf")
        self._edge_idx = max(self._edge_idx, k)
        progress = float(self._route_cum[k] + s_ref - self._s_start)
        return progress, deviation

    def _sim_state(self) -> DrivingState:
        ego = self.sim.vehicle
        progress, deviation = self._route_position()
        collision = None
        if ego.crashed and not self._crashed_before:
            hit_static = any(getattr(o, "crashed", False) or getattr(o, "hit", False) for o in self.sim.road.objects)
            collision = "collision_static" if hit_static else "collision_vehicle"
        self._crashed_before = bool(ego.crashed)
        front, _ = self.sim.road.neighbour_vehicles(ego, ego.lane_index)
        lead = float(ego.lane_distance_to(front)) if front is not None else float("inf")
        limit = ego.lane.speed_limit if ego.lane is not None and ego.lane.speed_limit else 20.0
        others = [float(v.speed) for v in self.sim.road.vehicles if v is not ego]
        extras = {"traffic_speed": float(np.mean(others))} if others else {}
        return DrivingState(
            speed=float(ego.speed),
            speed_limit=float(limit),
            lead_distance=lead if lead > 0 else float("inf"),
            progress=progress,
            route_length=self._route_total,
            route_deviation=deviation,
            on_road=bool(ego.on_road),
            collision=collision,
            extras=extras,
        )

    def _render_bev(self) -> np.ndarray:
        ego = self.sim.vehicle
        return self.rasterizer.render(
            ego=np.asarray(self._box(ego)),
            road=self._road_segments,
            route=self._route_segments,
            vehicles=list(self._frames),
            obstacles=self._obstacles,
            static=self._static,
        )

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self._last_progress = 0.0
        return super().reset(seed=seed, options=options)

    def close(self) -> None:
        for sim in self._sims.values():
            sim.close()
        self._sims.clear()
        self.sim = None
