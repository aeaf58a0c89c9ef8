"""load_agent / save_agent: a trained Think2Drive comes back as a greedy policy plus its environment's arguments."""

from __future__ import annotations

import lightning as L
import pytest
import torch

pytest.importorskip("highway_env")

from lightning_eff.rl import AgentPolicy, DrivingDataModule, Think2Drive, load_agent, save_agent  # noqa: E402
from lightning_eff.rl.envs import HighwayBEVEnv  # noqa: E402

TABLE = [[-1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, -0.3], [0.0, 0.3]]
ENV_KWARGS = {"action_table": TABLE, "history_stride": 2, "stall_seconds": 7.0}
MODEL = dict(num_actions=5, bev_channels=10, bev_size=16, vec_dim=4, deter=16, units=16, mlp_layers=1, cnn_depth=4,
             stoch_groups=2, stoch_classes=4, bins=15, horizon=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agent")
    L.seed_everything(0, verbose=False)
    dm = DrivingDataModule(scenarios=["merge"], bev_size=16, resolution=4.0, env_kwargs=ENV_KWARGS, num_envs=1,
                           parallel=False, batch_size=2, sequence_length=4, train_ratio=8.0, replay_capacity=256,
                           prefill_steps=8, warmup_steps=0, env_steps_per_epoch=16, save_replay=False)
    model = Think2Drive(**MODEL, rollout_images=False)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tmp)
    trainer.fit(model, datamodule=dm)
    assert model.wm_updates > 0
    full, light = tmp / "full.ckpt", tmp / "weights.ckpt"
    trainer.save_checkpoint(full)
    trainer.save_checkpoint(light, weights_only=True)
    return model, dm, tmp, (full, light)


def _greedy_actions(module: Think2Drive, env, seed: int, steps: int) -> list[int]:
    policy = AgentPolicy(module, greedy=True)
    obs, _ = env.reset(seed=seed)
    policy.reset(env)
    actions = []
    for _ in range(steps):
        a = policy.act(obs, env)
        actions.append(a)
        obs, _, terminated, truncated, _ = env.step(a)
        if terminated or truncated:
            break
    return actions


@pytest.mark.parametrize("which", [0, 1])
def test_load_agent_round_trip_from_a_lightning_checkpoint(trained, which):
    model, dm, _, paths = trained
    policy, env_kwargs = load_agent(paths[which])
    assert isinstance(policy, AgentPolicy) and policy.greedy and not policy.module.training
    assert env_kwargs == dm.env_kwargs and policy.env_name == "highway-bev"
    assert env_kwargs["action_table"] == TABLE and env_kwargs["bev_size"] == 16 and env_kwargs["resolution"] == 4.0
    for (name, a), b in zip(model.state_dict().items(), policy.module.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert policy.module.wm_updates == model.wm_updates
    env = HighwayBEVEnv(["merge"], **env_kwargs)  # the training environment, rebuilt
    assert env.observation_space["bev"].shape == (10, 16, 16) and env.action_space.n == len(TABLE)
    # the loaded policy drives it, and acts as the trained module does
    loaded = _greedy_actions(policy.module, env, seed=2**31, steps=12)
    original = _greedy_actions(model, HighwayBEVEnv(["merge"], **env_kwargs), seed=2**31, steps=12)
    assert len(loaded) > 0 and loaded == original
    assert all(0 <= a < len(TABLE) for a in loaded)


def test_save_agent_small_file_round_trip(trained):
    model, dm, tmp, _ = trained
    path = save_agent(model, tmp / "agent.pt")
    policy, env_kwargs = load_agent(path, greedy=False)
    assert env_kwargs == dm.env_kwargs and not policy.greedy
    env = HighwayBEVEnv(["merge"], **env_kwargs)
    obs, _ = env.reset(seed=1)
    policy.reset(env)
    assert 0 <= policy.act(obs, env) < len(TABLE)
    # without a data module, env_kwargs must be given
    bare = Think2Drive(**MODEL)
    with pytest.raises(ValueError, match="pass env_kwargs"):
        save_agent(bare, tmp / "bare.pt")
    p2 = save_agent(bare, tmp / "bare.pt", env_kwargs={"bev_size": 16, "resolution": 4.0})
    assert load_agent(p2)[1] == {"bev_size": 16, "resolution": 4.0}


def test_load_agent_clear_errors(trained, tmp_path):
    _, _, _, paths = trained
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_agent(tmp_path / "missing.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_agent(junk)
    other = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not a Think2Drive checkpoint"):
        load_agent(other)
    ckpt = torch.load(paths[1], weights_only=True)
    ckpt["think2drive"].pop("env_kwargs")
    ckpt.pop("datamodule_hyper_parameters")
    no_env = tmp_path / "no_env.ckpt"
    torch.save(ckpt, no_env)
    with pytest.raises(ValueError, match="does not record the environment"):
        load_agent(no_env)
    ckpt = torch.load(paths[1], weights_only=True)
    ckpt["hyper_parameters"]["deter"] = 32
    wrong = tmp_path / "wrong.ckpt"
    torch.save(ckpt, wrong)
    with pytest.raises(ValueError, match="do not match Think2Drive"):
        load_agent(wrong)
