"""``DrivingDataModule``: environment interaction inside Lightning's loop, and the held-out evaluation suite.

Training data is an ``IterableDataset`` (:class:`ExperienceStream`) that steps vectorised
environments (gymnasium ``AsyncVectorEnv``: one process per environment, Think2Drive's brick 7) with
the current agent (``trainer.lightning_module.policy_step``), writes every transition into a
:class:`~lightning_eff.rl.replay.TerminationPriorityReplay`, and yields a replayed ``[B, T]`` batch
each time the *train ratio* allows: ``train_ratio`` replayed steps per environment step (DreamerV3's
replay ratio), i.e. one batch every ``B * T / train_ratio`` environment steps. An "epoch" is
``env_steps_per_epoch`` environment steps, so ``max_epochs`` sets the interaction budget and the
held-out evaluation runs between epochs.

The first ``prefill_steps`` environment steps use uniformly random actions (no batches before). The
warm-up curriculum (Think2Drive's brick 5) samples only ``warmup_scenarios`` during the first
``warmup_steps`` environment steps, then the training scenarios.

Validation and test iterate over a held-out suite: ``(scenario, seed)`` pairs whose seeds
(``2**31 + i``) never occur in training (training episodes draw seeds below ``2**31 - 1``). Each item
is one whole episode, driven by the module's ``validation_step`` / ``test_step`` in a local
environment (:meth:`DrivingDataModule.eval_env`). Under DDP, Lightning shards the suite across ranks;
each rank owns its own environments and replay.

Checkpoints store the environment-step counter, the episode statistics and (``save_replay=True``) the
replay buffer, so a resumed run continues with the same data; running episodes are not restored (the
environments start new episodes on resume).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_eff.rl.replay import TerminationPriorityReplay
from lightning_eff.utils.checks import check_float, check_int

__all__ = ["DrivingDataModule", "ExperienceStream", "EVAL_SEED_OFFSET"]

#: Held-out evaluation seeds are ``EVAL_SEED_OFFSET + i``; training draws seeds below it.
EVAL_SEED_OFFSET = 2**31
DEFAULT_SCENARIOS = ("highway", "highway_dense", "cut_in", "merge", "roundabout", "intersection")
FORMAT_VERSION = 1

class ExperienceStream(IterableDataset):
    """Steps the data module's environments and yields replay batches (see the module docstring).

    Lightning iterates it in the training process (``num_workers=0``): acting needs the current model.

    Example::

        >>> dm = DrivingDataModule(scenarios=["merge"], bev_size=16, resolution=4.0, num_envs=1, parallel=False,
        ...                        batch_size=2, sequence_length=4, prefill_steps=8, env_steps_per_epoch=16)
        >>> dm.setup("fit")
        >>> batch = next(iter(ExperienceStream(dm)))
        >>> batch["bev"].shape, dm.env_steps
        (torch.Size([2, 4, 10, 16, 16]), 8)
        >>> dm.teardown("fit")
    """

    def __init__(self, datamodule: DrivingDataModule) -> None:
        super().__init__()
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.datamodule._generate()


class _EpisodeList(torch.utils.data.Dataset):
    def __init__(self, episodes: list[tuple[str, int]]) -> None:
        self.episodes = episodes

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, i: int) -> dict[str, Any]:
        scenario, seed = self.episodes[i]
        return {"scenario": scenario, "seed": seed, "index": i}


class DrivingDataModule(L.LightningDataModule):
    """Driving environments as a Lightning data module (see the module docstring).

    Args:
        env_name: a registered environment (:func:`lightning_eff.rl.envs.make_env`).
        scenarios: training scenarios.
        eval_scenarios: held-out evaluation scenarios (default: ``scenarios``).
        bev_size, resolution, history: BEV geometry (passed to the environment).
        env_kwargs: further environment arguments (``action_table``, ``reward``, frequencies, ...).
        num_envs: parallel environments (per rank).
        parallel: one process per environment (``AsyncVectorEnv``); ``False`` steps them in this process.
        batch_size, sequence_length: replayed batch shape ``[B, T]``.
        train_ratio: replayed steps per environment step.
        replay_capacity: replay rows (per rank).
        prefill_steps: random-action environment steps before training starts.
        termination_fraction, termination_window: termination-priority replay (``p``, ``k``); the window
            defaults to ``sequence_length`` (a priority sequence ends at the terminal step) and may not
            exceed it.
        warmup_scenarios, warmup_steps: the warm-up curriculum (0 steps: off).
        env_steps_per_epoch: environment steps per training epoch.
        val_episodes_per_scenario, test_episodes_per_scenario: size of the held-out suite.
        save_replay: store the replay in checkpoints (else it restarts empty on resume).
        seed: seed of the environments and of replay sampling.

    Example::

        >>> dm = DrivingDataModule(scenarios=["highway_easy"], bev_size=16, resolution=4.0, num_envs=1)
        >>> dm.val_episodes()[:2]
        [('highway_easy', 2147483648), ('highway_easy', 2147483649)]
    """

    def __init__(
        self,
        env_name: str = "highway-bev",
        scenarios: Sequence[str] = DEFAULT_SCENARIOS,
        eval_scenarios: Sequence[str] | None = None,
        bev_size: int = 64,
        resolution: float = 1.0,
        history: int = 4,
        env_kwargs: dict[str, Any] | None = None,
        num_envs: int = 2,
        parallel: bool = True,
        batch_size: int = 16,
        sequence_length: int = 64,
        train_ratio: float = 64.0,
        replay_capacity: int = 100_000,
        prefill_steps: int = 2_500,
        termination_fraction: float = 0.5,
        termination_window: int | None = None,
        warmup_scenarios: Sequence[str] = ("highway_easy",),
        warmup_steps: int = 0,
        env_steps_per_epoch: int = 10_000,
        val_episodes_per_scenario: int = 2,
        test_episodes_per_scenario: int = 10,
        save_replay: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        from lightning_eff.rl.envs import ENV_REGISTRY

        if env_name not in ENV_REGISTRY:
            raise ValueError(f"DrivingDataModule: unknown env_name {env_name!r}; registered: {sorted(ENV_REGISTRY)}.")
        known = getattr(ENV_REGISTRY[env_name], "SCENARIOS", None)
        for group, names in (("scenarios", scenarios), ("eval_scenarios", eval_scenarios or ()), ("warmup_scenarios", warmup_scenarios)):
            if isinstance(names, str):
                raise TypeError(f"DrivingDataModule: {group} must be a list of scenario names, got the string {names!r}.")
            for s in names:
                if known is not None and s not in known:
                    raise ValueError(f"DrivingDataModule: unknown scenario {s!r} in {group}; available: {list(known)}.")
        if not scenarios:
            raise ValueError("DrivingDataModule: scenarios must name at least one training scenario.")
        for name in ("num_envs", "batch_size", "sequence_length", "env_steps_per_epoch"):
            check_int(locals()[name], name, minimum=1, owner="DrivingDataModule")
        for name in ("prefill_steps", "warmup_steps", "val_episodes_per_scenario", "test_episodes_per_scenario"):
            check_int(locals()[name], name, minimum=0, owner="DrivingDataModule")
        check_int(
            replay_capacity,
            "replay_capacity",
            minimum=2 * num_envs * sequence_length,
            owner="DrivingDataModule",
        )
        if termination_window is not None:
            check_int(termination_window, "termination_window", minimum=1, owner="DrivingDataModule")
            if termination_window > sequence_length:
                raise ValueError(
                    f"DrivingDataModule: termination_window={termination_window} is longer than sequence_length="
                    f"{sequence_length}: most termination-priority sequences would miss the terminal step; set "
                    f"termination_window <= {sequence_length} or leave it unset (= sequence_length)."
                )
        check_float(train_ratio, "train_ratio", low=0.0, low_open=True, owner="DrivingDataModule")
        self.save_hyperparameters()
        self.env_name = env_name
        self.scenarios = list(scenarios)
        self.eval_scenarios = list(eval_scenarios or scenarios)
        self.env_kwargs = {"bev_size": bev_size, "resolution": resolution, "history": history, **(env_kwargs or {})}
        self.num_envs, self.parallel = num_envs, bool(parallel)
        self.batch_size, self.sequence_length = batch_size, sequence_length
        self.train_ratio = float(train_ratio)
        self.replay_capacity, self.prefill_steps = replay_capacity, prefill_steps
        self.termination_fraction = termination_fraction
        self.termination_window = sequence_length if termination_window is None else termination_window
        self.warmup_scenarios, self.warmup_steps = list(warmup_scenarios), warmup_steps
        self.env_steps_per_epoch = env_steps_per_epoch
        self.val_episodes_per_scenario = val_episodes_per_scenario
        self.test_episodes_per_scenario = test_episodes_per_scenario
        self.save_replay, self.seed = bool(save_replay), int(seed)
        # run state
        self.env_steps = 0
        self.episodes_done = 0
        self.replay: TerminationPriorityReplay | None = None
        self.envs: Any = None
        self._eval_env: Any = None
        self._obs: dict[str, np.ndarray] | None = None
        self._agent_state: Any = None
        self._credit = 0.0
        self._stage: str | None = None
        self.finished_episodes: list[dict[str, float]] = []
        self._probe: Any = None

    # -- spaces ---------------------------------------------------------------------------------------
    def _probe_env(self) -> Any:
        if self._probe is None:
            from lightning_eff.rl.envs import make_env

            self._probe = make_env(self.env_name, scenarios=self.scenarios, **self.env_kwargs)
        return self._probe

    @property
    def bev_shape(self) -> tuple[int, int, int]:
        return tuple(self._probe_env().observation_space["bev"].shape)

    @property
    def vec_dim(self) -> int:
        return int(self._probe_env().observation_space["vec"].shape[0])

    @property
    def num_actions(self) -> int:
        return int(self._probe_env().action_space.n)

    @property
    def bev_channels(self) -> tuple[str, ...]:
        return tuple(self._probe_env().bev_channels)

    # -- suites ---------------------------------------------------------------------------------------
    def _suite(self, per_scenario: int) -> list[tuple[str, int]]:
        return [(s, EVAL_SEED_OFFSET + i) for s in self.eval_scenarios for i in range(per_scenario)]

    def val_episodes(self) -> list[tuple[str, int]]:
        """The validation suite: ``val_episodes_per_scenario`` held-out seeds per evaluation scenario."""
        return self._suite(self.val_episodes_per_scenario)

    def test_episodes(self) -> list[tuple[str, int]]:
        """The test suite (the validation seeds plus more)."""
        return self._suite(self.test_episodes_per_scenario)

    def eval_env(self) -> Any:
        """The environment (in this process) that drives held-out episodes."""
        if self._eval_env is None:
            from lightning_eff.rl.envs import make_env

            self._eval_env = make_env(self.env_name, scenarios=self.eval_scenarios, **self.env_kwargs)
        return self._eval_env

    # -- Lightning hooks ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit" or self.envs is not None:
            return
        import gymnasium as gym

        from lightning_eff.rl.envs import make_env

        rank = self.trainer.global_rank if self.trainer is not None else 0
        fns = [
            functools.partial(make_env, self.env_name, scenarios=self.scenarios, **self.env_kwargs)
            for _ in range(self.num_envs)
        ]
        mode = gym.vector.AutoresetMode.SAME_STEP
        if self.parallel and self.num_envs > 1:
            self.envs = gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode)
        else:
            self.envs = gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)
        if self.replay is None:
            self.replay = TerminationPriorityReplay(
                self.replay_capacity,
                self.num_envs,
                self.bev_shape,
                self.vec_dim,
                self.termination_fraction,
                self.termination_window,
                seed=self.seed + 7919 * rank,
            )
        self._env_seed = self.seed * 1000 + 100 * rank

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self.envs is not None:
            self.envs.close()
            self.envs = None
            self._obs = None
        if self._eval_env is not None:
            self._eval_env.close()
            self._eval_env = None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ExperienceStream(self), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_EpisodeList(self.val_episodes()), batch_size=None, collate_fn=lambda x: x)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(_EpisodeList(self.test_episodes()), batch_size=None, collate_fn=lambda x: x)

    # -- interaction ----------------------------------------------------------------------------------
    def _set_stage(self) -> None:
        stage = "warmup" if self.env_steps < self.warmup_steps and self.warmup_scenarios else "main"
        if stage != self._stage:
            self.envs.call("set_scenarios", self.warmup_scenarios if stage == "warmup" else self.scenarios)
            self._stage = stage

    def _reset_envs(self) -> None:
        self._set_stage()
        seeds = [self._env_seed + i + 10_000 * self.episodes_done for i in range(self.num_envs)]
        obs, _ = self.envs.reset(seed=seeds)
        self._obs = obs
        for i in range(self.num_envs):
            self.replay.add(i, obs["bev"][i], obs["vec"][i], -1, 0.0, False, True)
        self._is_first = np.ones(self.num_envs, dtype=bool)
        self._agent_state = None

    def _act(self) -> np.ndarray:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if self.env_steps < self.prefill_steps or module is None or not hasattr(module, "policy_step"):
            return np.random.default_rng(self.seed + self.env_steps).integers(self.num_actions, size=self.num_envs)
        actions, self._agent_state = module.policy_step(self._obs, self._agent_state, self._is_first, explore=True)
        return actions

    def _env_step(self) -> None:
        self._set_stage()
        actions = self._act()
        obs, reward, terminated, truncated, info = self.envs.step(actions)
        done = terminated | truncated
        for i in range(self.num_envs):
            if done[i]:
                final = info["final_obs"][i]
                self.replay.add(i, final["bev"], final["vec"], int(actions[i]), float(reward[i]), bool(terminated[i]), False)
                fin = info["final_info"]
                self.finished_episodes.append(
                    {
                        "return": float(fin["episode_return"][i]),
                        "route_completion": float(fin["route_completion"][i]),
                        "collision": float(fin["collision_vehicle"][i] + fin["collision_static"][i] > 0),
                        "completed": float(fin["completed"][i]),
                        "length": float(fin["elapsed"][i]),
                    }
                )
                self.episodes_done += 1
                self.replay.add(i, obs["bev"][i], obs["vec"][i], -1, 0.0, False, True)
            else:
                self.replay.add(i, obs["bev"][i], obs["vec"][i], int(actions[i]), float(reward[i]), False, False)
        self._obs = obs
        self._is_first = done.copy()
        self.env_steps += self.num_envs

    def _generate(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.envs is None:
            raise RuntimeError("DrivingDataModule: call setup('fit') (the Trainer does) before iterating the stream.")
        if self._obs is None:
            self._reset_envs()
        per_batch = self.batch_size * self.sequence_length
        done_this_epoch = 0
        while done_this_epoch < self.env_steps_per_epoch:
            self._env_step()
            done_this_epoch += self.num_envs
            if self.env_steps < self.prefill_steps or not self.replay.can_sample(self.sequence_length):
                continue
            self._credit += self.num_envs * self.train_ratio / per_batch
            while self._credit >= 1.0:
                self._credit -= 1.0
                yield self.replay.sample(self.batch_size, self.sequence_length)

    def pop_finished_episodes(self) -> list[dict[str, float]]:
        out, self.finished_episodes = self.finished_episodes, []
        return out

    # -- checkpointing --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "env_steps": self.env_steps,
            "episodes_done": self.episodes_done,
            "credit": self._credit,
        }
        if self.save_replay and self.replay is not None:
            state["replay"] = self.replay.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"DrivingDataModule: unsupported checkpoint format {state.get('format_version')!r}.")
        self.env_steps = int(state["env_steps"])
        self.episodes_done = int(state["episodes_done"])
        self._credit = float(state["credit"])
        if "replay" in state:
            if self.replay is None:
                self.replay = TerminationPriorityReplay(
                    self.replay_capacity, self.num_envs, self.bev_shape, self.vec_dim,
                    self.termination_fraction, self.termination_window, seed=self.seed,
                )
            self.replay.load_state_dict(state["replay"])
        self._obs = None  # running episodes are not restored: start new ones
