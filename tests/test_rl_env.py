"""Driving environments: the BEV rasteriser, HighwayBEVEnv (reward, infractions, scenarios), reference drivers."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("highway_env")

from matplotlib.path import Path as MplPath  # noqa: E402

from lightning_eff.rl.envs import (  # noqa: E402
    SCENARIO_SPECS,
    BEVRasterizer,
    HighwayBEVEnv,
    Segments,
    make_env,
    polyline_segments,
)
from lightning_eff.rl.policies import IDMPolicy, RandomPolicy, run_episode  # noqa: E402


# --------------------------------------------------------------------------------------------------
# rasteriser
# --------------------------------------------------------------------------------------------------
def _pixel_world_centres(r: BEVRasterizer, ego: np.ndarray) -> np.ndarray:
    """World coordinates of every pixel centre, from the documented convention (rows up = ahead,
    columns = the ego's right, i.e. its heading turned by +90 degrees)."""
    size, res = r.size, r.resolution
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    fwd = (r.ego_row - (i + 0.5)) * res
    rgt = (j + 0.5 - size / 2) * res
    h = ego[2]
    f = np.array([np.cos(h), np.sin(h)])
    rt = np.array([-np.sin(h), np.cos(h)])
    return ego[:2] + fwd[..., None] * f + rgt[..., None] * rt


def _box_polygon(box: np.ndarray) -> np.ndarray:
    x, y, h, length, width = box
    f = np.array([np.cos(h), np.sin(h)]) * length / 2
    s = np.array([-np.sin(h), np.cos(h)]) * width / 2
    c = np.array([x, y])
    return np.stack([c + f + s, c + f - s, c - f - s, c - f + s])


def _brute_force_box_mask(r: BEVRasterizer, ego: np.ndarray, box: np.ndarray) -> np.ndarray:
    pts = _pixel_world_centres(r, ego).reshape(-1, 2)
    return MplPath(_box_polygon(box)).contains_points(pts).reshape(r.size, r.size)


def test_bev_ego_footprint_at_the_centre():
    r = BEVRasterizer(size=32, resolution=0.5, history=1)
    for heading in (0.0, 0.7, -2.4):
        ego = np.array([100.0, -20.0, heading, 5.0, 2.0])
        bev = r.render(ego=ego)
        mask = bev[r.channels.index("ego")]
        rows, cols = np.nonzero(mask)
        assert mask.sum() == 10 * 4  # 5 m x 2 m at 0.5 m per pixel
        assert rows.mean() == pytest.approx(15.5) and cols.mean() == pytest.approx(15.5)


def test_bev_other_vehicles_where_they_are():
    r = BEVRasterizer(size=32, resolution=1.0, history=1)
    ego = np.array([50.0, 10.0, 0.4, 5.0, 2.0])
    f = np.array([np.cos(0.4), np.sin(0.4)])
    rt = np.array([-np.sin(0.4), np.cos(0.4)])
    ahead_right = np.r_[ego[:2] + 10.3 * f + 4.2 * rt, 0.4 + 0.3, 4.5, 1.9]  # 10.3 m ahead, 4.2 m right
    behind_left = np.r_[ego[:2] - 7.8 * f - 3.9 * rt, 0.4 - 1.1, 5.0, 2.0]
    bev = r.render(ego=ego, vehicles=[np.stack([ahead_right, behind_left])])
    got = bev[r.channels.index("vehicles_t-0")].astype(bool)
    want = _brute_force_box_mask(r, ego, ahead_right) | _brute_force_box_mask(r, ego, behind_left)
    assert want.sum() > 10
    np.testing.assert_array_equal(got, want)
    rows, cols = np.nonzero(_brute_force_box_mask(r, ego, ahead_right))
    assert rows.mean() == pytest.approx(15.5 - 10.3, abs=0.6) and cols.mean() == pytest.approx(15.5 + 4.2, abs=0.6)


def test_bev_is_invariant_to_a_rotation_of_the_world():
    r = BEVRasterizer(size=32, resolution=1.0, history=2)
    pts = np.stack([np.linspace(-60, 60, 121), 2.2 + 0.002 * np.linspace(-60, 60, 121) ** 2], axis=1)
    road = polyline_segments(pts, 2.0, lines=(1, 2))
    ego = np.array([0.3, 2.1, 0.05, 5.0, 2.0])
    cars = [np.array([[9.7, 3.3, 0.1, 5.0, 2.0]]), np.array([[8.1, 3.2, 0.1, 5.0, 2.0]])]

    def rotate(a: np.ndarray, angle: float) -> np.ndarray:
        c, s = np.cos(angle), np.sin(angle)
        return a @ np.array([[c, s], [-s, c]])

    angle = 1.1
    road_rot = Segments(rotate(road.start, angle), rotate(road.end, angle), road.half_width, road.s0, road.lines)

    def rot_box(b: np.ndarray) -> np.ndarray:
        out = b.copy()
        out[..., :2] = rotate(b[..., :2], angle)
        out[..., 2] += angle
        return out

    a = r.render(ego=ego, road=road, vehicles=cars)
    b = r.render(ego=rot_box(ego), road=road_rot, vehicles=[rot_box(c) for c in cars])
    assert (a != b).mean() < 0.002  # identical up to float ties at pixel-centre boundaries


def test_bev_history_channels_and_lanes():
    r = BEVRasterizer(size=16, resolution=1.0, history=3, history_stride=1)
    ego = np.array([0.0, 0.0, 0.0, 5.0, 2.0])
    now = np.array([[6.0, 0.0, 0.0, 2.0, 2.0]])
    before = np.array([[3.0, 0.0, 0.0, 2.0, 2.0]])
    bev = r.render(ego=ego, vehicles=[now, before])
    c0, c1, c2 = (bev[r.channels.index(f"vehicles_t-{k}")] for k in range(3))
    assert np.nonzero(c0)[0].mean() == pytest.approx(7.5 - 6.0, abs=0.5)
    assert np.nonzero(c1)[0].mean() == pytest.approx(7.5 - 3.0, abs=0.5)
    np.testing.assert_array_equal(c2, c1)  # missing older frames repeat the oldest one
    # A lane whose centreline runs 2 m to the ego's right: drivable columns right of the ego, solid lines
    # on both edges (lateral 0 m and 4 m), route channel empty.
    road = polyline_segments(np.array([[-50.0, 2.0], [50.0, 2.0]]), half_width=2.0, lines=(2, 2))
    bev = r.render(ego=ego, road=road)
    cols = np.nonzero(bev[r.channels.index("drivable")].any(0))[0]
    rgt = cols + 0.5 - 8
    assert rgt.min() >= 0.0 and rgt.max() <= 4.0
    solid_cols = np.nonzero(bev[r.channels.index("lane_solid")].all(0))[0] + 0.5 - 8
    assert set(np.round(solid_cols).tolist()) <= {-0.0, 0.0, 1.0, 3.0, 4.0} and len(solid_cols) >= 2
    assert bev[r.channels.index("route")].sum() == 0


def test_static_raster_matches_direct_drawing():
    r = BEVRasterizer(size=64, resolution=1.0, history=1)
    theta = np.linspace(0, 2 * np.pi, 400)
    circle = np.stack([30 * np.cos(theta), 30 * np.sin(theta)], axis=1)
    road = Segments.concat([polyline_segments(circle, 2.0, lines=(2, 1)), polyline_segments(circle * 1.14, 2.0, (1, 2))])
    route = polyline_segments(circle[:100], 2.0)
    static = r.prepare(road, route, (-80, -80, 80, 80))
    for k, ego in enumerate([np.array([30.0, 0.0, np.pi / 2, 5, 2]), np.array([0.0, 34.0, np.pi, 5, 2])]):
        direct = r.render(ego=ego, road=road, route=route)
        cached = r.render(ego=ego, static=static)
        for ch in ("drivable", "route"):
            i = r.channels.index(ch)
            assert (direct[i] != cached[i]).mean() < 0.03, (k, ch)
        assert direct[r.channels.index("drivable")].sum() > 300


def test_rasterizer_bad_arguments():
    with pytest.raises(ValueError, match="size must be an int >= 4"):
        BEVRasterizer(size=2)
    with pytest.raises(ValueError, match="resolution must be a positive number"):
        BEVRasterizer(resolution=0)
    with pytest.raises(ValueError, match="ego must be"):
        BEVRasterizer(size=8).render(ego=np.zeros(3))


# --------------------------------------------------------------------------------------------------
# HighwayBEVEnv
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def easy_env():
    env = HighwayBEVEnv("highway_easy", bev_size=32, resolution=1.0)
    yield env
    env.close()


def test_env_spaces_and_determinism(easy_env):
    obs, info = easy_env.reset(seed=5)
    assert easy_env.observation_space.contains(obs)
    assert obs["bev"].shape == (10, 32, 32) and set(np.unique(obs["bev"])) <= {0, 1}
    ego = obs["bev"][easy_env.bev_channels.index("ego")]
    rows, cols = np.nonzero(ego)
    assert abs(rows.mean() - 15.5) < 0.6 and abs(cols.mean() - 15.5) < 0.6
    assert obs["bev"][easy_env.bev_channels.index("drivable")][16, 16] == 1
    trace = [easy_env.step(a)[0] for a in (17, 22, 17)]
    easy_env.reset(seed=5)
    again = [easy_env.step(a)[0] for a in (17, 22, 17)]
    for x, y in zip(trace, again):
        np.testing.assert_array_equal(x["bev"], y["bev"])
        np.testing.assert_array_equal(x["vec"], y["vec"])
    assert info["route_completion"] == 0.0


def test_env_reward_terms(easy_env):
    easy_env.reset(seed=1)
    table = easy_env.action_table
    a = int(np.argmin(np.abs(table[:, 0] - 0.4) + np.abs(table[:, 1] - 0.08)))
    obs, reward, terminated, truncated, info = easy_env.step(a)
    assert not (terminated or truncated)
    w = easy_env.reward_weights
    # v_norm = 0.8 x the 30 m/s limit = 24 m/s (the base target speed)
    assert easy_env.speed_norm == pytest.approx(24.0)
    assert info["reward_speed"] == pytest.approx(1 - abs(info["speed"] - info["target_speed"]) / 24.0)
    assert info["reward_steering"] == pytest.approx(-0.08)  # |0.08 - 0| after a straight start
    assert info["reward_deviation"] == pytest.approx(-info["route_deviation_m"] / 8.0)
    # progress ~ speed * dt, normalised by 0.8 x limit (30 m/s) x dt
    assert info["reward_travel"] == pytest.approx(info["speed"] / 24.0, rel=0.1)
    total = (w.speed * info["reward_speed"] + w.travel * info["reward_travel"]
             + w.deviation * info["reward_deviation"] + w.steering * info["reward_steering"])
    assert reward == pytest.approx(total)
    np.testing.assert_allclose(obs["vec"], [info["speed"] / 30, 1.0, 0.4, 0.08], rtol=1e-5)
    # the reproduction's fixed normaliser, on request
    fixed = HighwayBEVEnv("highway_easy", bev_size=16, resolution=4.0, reward={"speed_tolerance": 7.5})
    fixed.reset(seed=1)
    _, _, _, _, info = fixed.step(a)
    assert info["reward_speed"] == pytest.approx(1 - abs(info["speed"] - info["target_speed"]) / 7.5)
    assert info["reward_travel"] == pytest.approx(info["speed"] / 7.5, rel=0.1)


def test_env_collision_is_an_infraction(easy_env):
    from highway_env.vehicle.objects import Obstacle

    easy_env.reset(seed=2)
    sim = easy_env.sim
    ego = sim.vehicle
    sim.road.objects.append(Obstacle(sim.road, ego.position + np.array([12.0, 0.0])))
    full = int(np.argmin(np.abs(easy_env.action_table[:, 0] - 1) + np.abs(easy_env.action_table[:, 1])))
    for _ in range(20):
        obs, reward, terminated, truncated, info = easy_env.step(full)
        if terminated:
            break
    assert terminated and info["collision_static"] == 1.0 and info["collision_vehicle"] == 0.0
    assert reward == pytest.approx(-1.0 - info["speed"] / 24.0)
    from lightning_eff.rl.metrics import driving_score

    assert float(driving_score(info["route_completion"], {"collision_static": 1})) == pytest.approx(
        info["route_completion"] * 0.65
    )


def test_env_leaving_the_road_ends_the_episode(easy_env):
    easy_env.reset(seed=3)
    hard_right = int(np.argmin(np.abs(easy_env.action_table[:, 0]) + np.abs(easy_env.action_table[:, 1] - 1)))
    for _ in range(30):
        obs, reward, terminated, truncated, info = easy_env.step(hard_right)
        if terminated:
            break
    assert terminated and info["route_deviation"] == 1.0 and reward == -1.0
    assert info["collision_vehicle"] == 0.0


@pytest.mark.parametrize("scenario", sorted(SCENARIO_SPECS))
def test_every_scenario_runs_headless(scenario):
    env = HighwayBEVEnv(scenario, bev_size=16, resolution=4.0, render_mode="rgb_array")
    obs, info = env.reset(seed=11)
    assert env.scenario == scenario and env._route_total > 20.0
    assert obs["bev"][env.bev_channels.index("route")].sum() > 0
    for _ in range(3):
        obs, reward, terminated, truncated, info = env.step(17)
        assert np.isfinite(reward)
        if terminated or truncated:
            break
    assert env.render().shape == (16, 16, 3)
    env.close()


def test_reference_drivers(easy_env):
    idm = run_episode(easy_env, IDMPolicy(), seed=21)
    rnd = run_episode(easy_env, RandomPolicy(seed=0), seed=21)
    assert idm["completed"] == 1.0 and idm["route_completion"] == 1.0 and idm["driving_score"] == 1.0
    assert rnd["driving_score"] < 0.5
    quant = IDMPolicy(quantize=True)
    easy_env.reset(seed=4)
    quant.reset(easy_env)
    a = quant.act(None, easy_env)
    assert isinstance(a, int) and 0 <= a < len(easy_env.action_table)


def test_env_bad_inputs(easy_env):
    with pytest.raises(ValueError, match="unknown scenario 'moon'"):
        HighwayBEVEnv("moon")
    with pytest.raises(ValueError, match="unknown scenario 'moon'"):
        easy_env.reset(options={"scenario": "moon"})
    with pytest.raises(ValueError, match=r"action_table must be \[A >= 1, 2\]"):
        HighwayBEVEnv("merge", action_table=[[0.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match="action_table"):
        HighwayBEVEnv("merge", action_table=[[2.0, 0.0]])
    easy_env.reset(seed=0)
    with pytest.raises(ValueError, match="action index 99 out of range"):
        easy_env.step(99)
    with pytest.raises(ValueError, match="unknown environment"):
        make_env("carla")
    with pytest.raises(ValueError, match="render_mode"):
        HighwayBEVEnv("merge", render_mode="human")


def test_full_steering_is_capped_by_lateral_acceleration(easy_env):
    easy_env.reset(seed=0)
    ego = easy_env.sim.vehicle
    for speed, capped in ((25.0, True), (5.0, False)):
        ego.speed = speed
        delta = easy_env.steering_limit()
        if capped:
            beta = np.arctan(np.tan(delta) / 2)
            assert speed**2 * np.sin(beta) / (ego.LENGTH / 2) == pytest.approx(7.0)
        else:
            assert delta == easy_env.steering_range
    free = HighwayBEVEnv("highway_easy", bev_size=16, resolution=4.0, max_lateral_acceleration=None)
    free.reset(seed=0)
    assert free.steering_limit() == free.steering_range
