"""Sequence replay with Think2Drive's termination-priority sampling.

Think2Drive (Sec. 3.3, "termination-priority replay"): terminations (collisions, leaving the route)
are rare but decisive, so each training sequence is drawn, with probability ``p`` (1/2 in the paper),
from the last ``k`` steps (64 in the paper) before an episode's termination, and uniformly over the
buffer otherwise.

Here the unit of replay is a sequence of ``T`` steps, so a priority sequence is the ``T`` steps that end
at the terminal step: the window ``k`` defaults to the sequence length (the paper's 64 steps are
DreamerV3's sequence length, so the two agree there). A window longer than the sequence is an error:
a sequence placed anywhere in it would usually miss the terminal step (with ``k = 64`` and ``T = 32``
only 1 start in 33 contains it), which defeats the purpose of the priority. A shorter window gives the
same sequences (those that end at the terminal step).

Storage: one ring buffer per environment (so that a sequence never mixes two environments), binary
BEV masks bit-packed (8x smaller), rows in Dreamer's convention: row ``t`` holds the observation
``o_t``, the action ``a_{t-1}`` that led to it (-1 at an episode's first row), the reward ``r_t``
received on arriving at ``o_t``, ``terminal_t`` and ``is_first_t``. A sequence may span an episode
boundary: ``is_first`` tells the world model where to reset its state.

Only true terminations (not time-limit truncations) anchor termination windows.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch

from lightning_eff.utils.checks import check_optional_int

__all__ = ["TerminationPriorityReplay"]

FORMAT_VERSION = 1


class TerminationPriorityReplay:
    """Per-environment ring buffers of transitions; samples ``[B, T]`` sequences.

    Args:
        capacity: total rows (split evenly over ``num_envs``).
        num_envs: number of environments writing (each has its own ring).
        bev_shape: ``(C, H, W)`` of the binary BEV.
        vec_dim: size of the vector observation.
        termination_fraction: probability that a sequence is drawn from a termination window (``p``).
        termination_window: steps before a termination that form its window (``k``); ``None`` (default):
            the sequence length of each :meth:`sample` call. Must not exceed the sequence length.
        seed: sampling seed.

    Example::

        >>> rb = TerminationPriorityReplay(capacity=100, num_envs=1, bev_shape=(2, 4, 4), vec_dim=3, seed=0)
        >>> for t in range(20):
        ...     rb.add(0, np.zeros((2, 4, 4), np.uint8), np.zeros(3), action=t % 4 if t else -1, reward=1.0,
        ...            terminal=t == 19, is_first=t == 0)
        >>> batch = rb.sample(batch_size=2, sequence_length=8)
        >>> batch["bev"].shape, batch["action"].shape, rb.num_terminations
        (torch.Size([2, 8, 2, 4, 4]), torch.Size([2, 8]), 1)
    """

    def __init__(
        self,
        capacity: int,
        num_envs: int,
        bev_shape: tuple[int, int, int],
        vec_dim: int,
        termination_fraction: float = 0.5,
        termination_window: int | None = None,
        seed: int | None = None,
    ) -> None:
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"TerminationPriorityReplay: num_envs must be an int >= 1, got {num_envs!r}.")
        if not isinstance(capacity, int) or capacity < num_envs * 2:
            raise ValueError(
                f"TerminationPriorityReplay: capacity must be an int >= 2 * num_envs = {2 * num_envs}, got {capacity!r}."
            )
        if not 0.0 <= termination_fraction <= 1.0:
            raise ValueError(
                f"TerminationPriorityReplay: termination_fraction must be in [0, 1], got {termination_fraction!r}."
            )
        check_optional_int(termination_window, "termination_window", minimum=1, owner="TerminationPriorityReplay")
        self.num_envs = num_envs
        self.per_env = capacity // num_envs
        self.capacity = self.per_env * num_envs
        self.bev_shape = tuple(int(s) for s in bev_shape)
        self.bev_size = int(np.prod(self.bev_shape))
        self.vec_dim = int(vec_dim)
        self.termination_fraction = float(termination_fraction)
        self.termination_window = termination_window
        self.rng = np.random.default_rng(seed)
        nbytes = (self.bev_size + 7) // 8
        self.bev = np.zeros((num_envs, self.per_env, nbytes), dtype=np.uint8)
        self.vec = np.zeros((num_envs, self.per_env, self.vec_dim), dtype=np.float32)
        self.action = np.zeros((num_envs, self.per_env), dtype=np.int16)
        self.reward = np.zeros((num_envs, self.per_env), dtype=np.float32)
        self.terminal = np.zeros((num_envs, self.per_env), dtype=np.uint8)
        self.is_first = np.zeros((num_envs, self.per_env), dtype=np.uint8)
        self.count = np.zeros(num_envs, dtype=np.int64)  # rows ever written per environment
        self.terminations: list[deque[int]] = [deque() for _ in range(num_envs)]  # absolute row numbers

    # -- writing --------------------------------------------------------------------------------------
    def add(
        self,
        env: int,
        bev: np.ndarray,
        vec: np.ndarray,
        action: int,
        reward: float,
        terminal: bool,
        is_first: bool,
    ) -> None:
        """Append one row to environment ``env``'s ring."""
        bev = np.asarray(bev)
        if bev.size != self.bev_size:
            raise ValueError(f"TerminationPriorityReplay.add: bev has {bev.size} values, expected shape {self.bev_shape}.")
        i = int(self.count[env] % self.per_env)
        self.bev[env, i] = np.packbits(bev.reshape(-1).astype(bool))
        self.vec[env, i] = vec
        self.action[env, i] = action
        self.reward[env, i] = reward
        self.terminal[env, i] = bool(terminal)
        self.is_first[env, i] = bool(is_first)
        if terminal:
            self.terminations[env].append(int(self.count[env]))
        self.count[env] += 1
        oldest = self.count[env] - self.per_env
        while self.terminations[env] and self.terminations[env][0] < oldest:
            self.terminations[env].popleft()

    def __len__(self) -> int:
        return int(np.minimum(self.count, self.per_env).sum())

    @property
    def num_terminations(self) -> int:
        return sum(len(t) for t in self.terminations)

    # -- sampling -------------------------------------------------------------------------------------
    def _oldest(self, env: int) -> int:
        return int(max(self.count[env] - self.per_env, 0))

    def uniform_starts(self, sequence_length: int) -> np.ndarray:
        """Number of valid uniform start rows per environment."""
        return np.maximum(np.minimum(self.count, self.per_env) - sequence_length + 1, 0)

    def check_window(self, sequence_length: int) -> None:
        """Raise if the termination window is longer than ``sequence_length`` (see the module docstring)."""
        k = self.termination_window
        if k is not None and k > sequence_length:
            raise ValueError(
                f"TerminationPriorityReplay: termination_window={k} is longer than the sequence length "
                f"{sequence_length}, so most termination-priority sequences would not contain the terminal step; "
                f"set termination_window <= {sequence_length} or None (= the sequence length)."
            )

    def termination_start_range(self, env: int, end: int, sequence_length: int) -> tuple[int, int] | None:
        """Inclusive range of absolute start rows of priority sequences for the termination at ``end``.

        With a window no longer than the sequence (enforced by :meth:`check_window`) this is the single
        sequence that ends at the terminal row; ``None`` if it is no longer wholly in the buffer.
        """
        self.check_window(sequence_length)
        start = end - sequence_length + 1
        if start < self._oldest(env):
            return None
        return start, start

    def _uniform(self, sequence_length: int) -> tuple[int, int]:
        starts = self.uniform_starts(sequence_length)
        env = int(self.rng.choice(self.num_envs, p=starts / starts.sum()))
        return env, self._oldest(env) + int(self.rng.integers(starts[env]))

    def _priority(self, sequence_length: int) -> tuple[int, int] | None:
        candidates = [
            (env, end) for env in range(self.num_envs) for end in self.terminations[env]
        ]
        if not candidates:
            return None
        order = self.rng.permutation(len(candidates))
        for j in order:
            env, end = candidates[j]
            rng = self.termination_start_range(env, end, sequence_length)
            if rng is not None:
                return env, int(self.rng.integers(rng[0], rng[1] + 1))
        return None

    def can_sample(self, sequence_length: int) -> bool:
        return bool(self.uniform_starts(sequence_length).sum() > 0)

    def sample_indices(self, batch_size: int, sequence_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(env [B], absolute start [B], from_termination [B] bool)`` of a batch of sequences."""
        self.check_window(sequence_length)
        if not self.can_sample(sequence_length):
            raise RuntimeError(
                f"TerminationPriorityReplay: no environment has {sequence_length} rows yet (rows: {self.count.tolist()})."
            )
        envs = np.zeros(batch_size, dtype=np.int64)
        starts = np.zeros(batch_size, dtype=np.int64)
        prio = np.zeros(batch_size, dtype=bool)
        for b in range(batch_size):
            pick = None
            if self.termination_fraction > 0 and self.rng.random() < self.termination_fraction:
                pick = self._priority(sequence_length)
                prio[b] = pick is not None
            if pick is None:
                pick = self._uniform(sequence_length)
            envs[b], starts[b] = pick
        return envs, starts, prio

    def sample(self, batch_size: int, sequence_length: int) -> dict[str, torch.Tensor]:
        """A batch of sequences as tensors (batch first).

        Returns:
            ``bev`` uint8 ``[B, T, C, H, W]``, ``vec`` float ``[B, T, D]``, ``action`` long ``[B, T]`` (-1 =
            none), ``reward``, ``terminal``, ``is_first`` float ``[B, T]`` (``is_first[:, 0] = 1``: each
            sequence starts from a fresh model state), ``from_termination`` bool ``[B]``.
        """
        envs, starts, prio = self.sample_indices(batch_size, sequence_length)
        rows = (starts[:, None] + np.arange(sequence_length)[None]) % self.per_env
        e = envs[:, None]
        bev = np.unpackbits(self.bev[e, rows], axis=-1, count=self.bev_size)
        is_first = self.is_first[e, rows].astype(np.float32)
        is_first[:, 0] = 1.0
        return {
            "bev": torch.from_numpy(bev.reshape(batch_size, sequence_length, *self.bev_shape)),
            "vec": torch.from_numpy(self.vec[e, rows]),
            "action": torch.from_numpy(self.action[e, rows].astype(np.int64)),
            "reward": torch.from_numpy(self.reward[e, rows]),
            "terminal": torch.from_numpy(self.terminal[e, rows].astype(np.float32)),
            "is_first": torch.from_numpy(is_first),
            "from_termination": torch.from_numpy(prio),
        }

    # -- checkpointing --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Contents as tensors and plain values (loads with ``torch.load(weights_only=True)``)."""
        return {
            "format_version": FORMAT_VERSION,
            "bev": torch.from_numpy(self.bev.copy()),
            "vec": torch.from_numpy(self.vec.copy()),
            "action": torch.from_numpy(self.action.copy()),
            "reward": torch.from_numpy(self.reward.copy()),
            "terminal": torch.from_numpy(self.terminal.copy()),
            "is_first": torch.from_numpy(self.is_first.copy()),
            "count": torch.from_numpy(self.count.copy()),
            "terminations": [list(t) for t in self.terminations],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"TerminationPriorityReplay: unsupported replay format {state.get('format_version')!r} "
                f"(this version reads {FORMAT_VERSION})."
            )
        if tuple(state["bev"].shape) != self.bev.shape:
            raise ValueError(
                f"TerminationPriorityReplay: saved replay has storage {tuple(state['bev'].shape)}, this one "
                f"{self.bev.shape} (capacity, num_envs or BEV shape differ)."
            )
        for name in ("bev", "vec", "action", "reward", "terminal", "is_first", "count"):
            getattr(self, name)[...] = state[name].numpy()
        self.terminations = [deque(int(x) for x in t) for t in state["terminations"]]
