"""Termination-priority replay: sampling probabilities (statistical), ring buffers, checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_eff.rl.replay import TerminationPriorityReplay

SHAPE = (1, 2, 4)


def _fill(rb: TerminationPriorityReplay, env: int, episodes: list[tuple[int, bool]]) -> None:
    """Episodes of given lengths; ``True`` = ends in a termination, ``False`` = truncated.

    ``vec[0]`` stores the absolute row number, so that tests can check time order.
    """
    for length, terminates in episodes:
        for t in range(length):
            row = int(rb.count[env])
            rb.add(env, np.zeros(SHAPE, np.uint8), np.array([row, env], np.float32), -1 if t == 0 else 1,
                   0.0, terminates and t == length - 1, t == 0)


def _window_starts(rb: TerminationPriorityReplay, seq: int) -> list[set[int]]:
    """Brute force: absolute starts of the sequences that end at a termination still in the buffer, per environment."""
    out = []
    for env in range(rb.num_envs):
        oldest = max(int(rb.count[env]) - rb.per_env, 0)
        out.append({e - seq + 1 for e in rb.terminations[env] if e - seq + 1 >= oldest})
    return out


@pytest.mark.parametrize("fraction", [0.5, 0.2])
def test_termination_windows_are_sampled_with_the_configured_probability(fraction):
    seq = 6
    rb = TerminationPriorityReplay(2 * 400, 2, SHAPE, 2, termination_fraction=fraction, seed=3)
    _fill(rb, 0, [(50, True), (30, False), (80, True), (40, False)])
    _fill(rb, 1, [(120, False), (25, True), (60, False)])
    windows = _window_starts(rb, seq)
    # probability that a *uniform* sequence lies in a window, by enumeration of all valid starts
    uniform = [set(range(max(int(rb.count[e]) - rb.per_env, 0), int(rb.count[e]) - seq + 1)) for e in range(2)]
    total = sum(len(u) for u in uniform)
    q = sum(len(u & w) for u, w in zip(uniform, windows)) / total
    expected = fraction + (1 - fraction) * q
    n = 6000
    envs, starts, prio = rb.sample_indices(n, seq)
    hit = np.array([s in windows[e] for e, s in zip(envs, starts)])
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert abs(hit.mean() - expected) < 4 * sigma, (hit.mean(), expected)
    assert abs(prio.mean() - fraction) < 4 * np.sqrt(fraction * (1 - fraction) / n)
    assert hit[prio].all()  # every priority draw lies in a window
    # each termination window is chosen equally often among priority draws (3 terminations)
    ends = [(e, min(t for t in rb.terminations[e] if t >= s)) for e, s in zip(envs[prio], starts[prio])]
    _, counts = np.unique(np.array(ends), axis=0, return_counts=True)
    assert len(counts) == 3 and counts.min() > 0.8 * counts.mean()


def test_no_terminations_means_uniform():
    rb = TerminationPriorityReplay(100, 1, SHAPE, 2, termination_fraction=1.0, seed=0)
    _fill(rb, 0, [(40, False)])
    envs, starts, prio = rb.sample_indices(500, 5)
    assert not prio.any() and starts.min() >= 0 and starts.max() <= 35
    assert len(np.unique(starts)) > 25


def test_ring_buffer_sequences_stay_in_time_order():
    rb = TerminationPriorityReplay(2 * 50, 2, SHAPE, 2, termination_fraction=0.5, termination_window=8, seed=1)
    _fill(rb, 0, [(37, True), (44, True), (23, False)])  # 104 rows into a ring of 50
    _fill(rb, 1, [(20, True)])
    assert len(rb) == 50 + 20
    assert list(rb.terminations[0]) == [80]  # the termination at row 36 left the buffer
    batch = rb.sample(300, 8)
    rows = batch["vec"][..., 0]
    env = batch["vec"][..., 1]
    assert torch.all(rows[:, 1:] - rows[:, :-1] == 1)  # consecutive rows, never across the write pointer
    assert torch.all(env == env[:, :1])  # never mixes environments
    assert torch.all(rows[env[:, 0] == 0] >= 104 - 50)
    assert torch.all(batch["is_first"][:, 0] == 1)
    assert batch["bev"].dtype == torch.uint8 and batch["bev"].shape == (300, 8, *SHAPE)


def test_bits_round_trip_and_checkpoint():
    rng = np.random.default_rng(0)
    rb = TerminationPriorityReplay(64, 1, (3, 5, 7), 1, seed=0)
    frames = rng.integers(0, 2, size=(20, 3, 5, 7)).astype(np.uint8)
    for t in range(20):
        rb.add(0, frames[t], np.array([t], np.float32), t - 1, float(t), t == 19, t == 0)
    batch = rb.sample(4, 5)
    for b in range(4):
        for t in range(5):
            row = int(batch["vec"][b, t, 0])
            np.testing.assert_array_equal(batch["bev"][b, t].numpy(), frames[row])
            assert batch["reward"][b, t] == row and batch["action"][b, t] == row - 1
    state = rb.state_dict()
    buf = __import__("io").BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored = TerminationPriorityReplay(64, 1, (3, 5, 7), 1, seed=0)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    rb.rng = np.random.default_rng(9)
    restored.rng = np.random.default_rng(9)
    a, b = rb.sample(6, 5), restored.sample(6, 5)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    with pytest.raises(ValueError, match="storage"):
        TerminationPriorityReplay(32, 1, (3, 5, 7), 1).load_state_dict(state)


def test_replay_bad_arguments():
    with pytest.raises(ValueError, match="termination_fraction must be in"):
        TerminationPriorityReplay(100, 1, SHAPE, 2, termination_fraction=1.5)
    with pytest.raises(ValueError, match="`termination_window` must be an int >= 1"):
        TerminationPriorityReplay(100, 1, SHAPE, 2, termination_window=0)
    with pytest.raises(ValueError, match="capacity"):
        TerminationPriorityReplay(3, 2, SHAPE, 2)
    rb = TerminationPriorityReplay(100, 1, SHAPE, 2)
    with pytest.raises(RuntimeError, match="no environment has 4 rows"):
        rb.sample(2, 4)


def test_termination_window_defaults_to_the_sequence_length_and_sequences_hold_the_terminal_step():
    """Every priority sequence holds its episode's terminal step (as its last row), for the default window and any
    window up to the sequence length; the data module's default window is its sequence length."""
    for window in (None, 5, 9):
        rb = TerminationPriorityReplay(2 * 300, 2, SHAPE, 2, termination_fraction=1.0, termination_window=window, seed=4)
        _fill(rb, 0, [(40, True), (25, False), (33, True)])
        _fill(rb, 1, [(50, False), (12, True), (30, False)])
        assert rb.termination_window == window
        batch = rb.sample(400, 9)
        prio = batch["from_termination"]
        assert prio.all()
        assert torch.all(batch["terminal"][:, -1] == 1) and torch.all(batch["terminal"][:, :-1].sum(1) == 0)
        ends = {(int(e), int(r)) for e, r in zip(batch["vec"][:, -1, 1], batch["vec"][:, -1, 0])}
        assert ends == {(0, 39), (0, 97), (1, 61)}  # all three terminations, each as the last row

    from lightning_eff.rl.data import DrivingDataModule

    pytest.importorskip("highway_env")
    assert DrivingDataModule(scenarios=["merge"], sequence_length=24).termination_window == 24
    assert DrivingDataModule(scenarios=["merge"], sequence_length=24, termination_window=16).termination_window == 16


def test_termination_window_longer_than_the_sequence_is_an_error():
    rb = TerminationPriorityReplay(100, 1, SHAPE, 2, termination_window=12, seed=0)
    _fill(rb, 0, [(40, True)])
    rb.sample(2, 12)  # equal: fine
    with pytest.raises(ValueError, match="termination_window=12 is longer than the sequence length 8"):
        rb.sample(2, 8)
    from lightning_eff.rl.data import DrivingDataModule

    pytest.importorskip("highway_env")
    with pytest.raises(ValueError, match="termination_window=64 is longer than sequence_length=32"):
        DrivingDataModule(scenarios=["merge"], sequence_length=32, termination_window=64)
