"""Think2Drive module: CLI fit, resume, bad inputs, planner reset, world-model learning, agent policy."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("highway_env")

from lightning_eff.cli import LightningEffCLI  # noqa: E402
from lightning_eff.rl import DrivingDataModule, Think2Drive  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "rl" / "think2drive_tiny.yaml")
TINY_MODEL = dict(num_actions=35, bev_channels=10, bev_size=16, vec_dim=4, deter=16, units=16, mlp_layers=1,
                  cnn_depth=4, stoch_groups=2, stoch_classes=4, bins=15, horizon=3)


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-eff"])


def _cli(tmp_path, *extra: str) -> LightningEffCLI:
    return LightningEffCLI(
        args=["fit", "--config", TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_model_summary=false",
              *extra]
    )


def test_fit_fast_dev_run_through_the_cli(tmp_path):
    cli = _cli(tmp_path, "--trainer.fast_dev_run=1")
    model, dm = cli.model, cli.datamodule
    assert isinstance(model, Think2Drive) and isinstance(dm, DrivingDataModule)
    metrics = cli.trainer.callback_metrics
    assert model.wm_updates == 1 and model.planner_updates == 1  # ratio starts at 1
    for key in ("wm/loss", "wm/bev_loss", "wm/kl", "planner/actor_loss", "planner/critic_loss", "val/driving_score",
                "val/route_completion", "val/collision", "val/highway_easy/driving_score"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert 0.0 <= float(metrics["val/driving_score"]) <= float(metrics["val/route_completion"]) <= 1.0
    assert dm.env_steps >= dm.prefill_steps
    assert Path(model.last_rollout_path).exists()


def test_resume_continues_training_state(tmp_path):
    first = _cli(tmp_path / "a", "--trainer.limit_val_batches=0", "--data.init_args.num_envs=2",
                 "--data.init_args.parallel=true")
    ckpts = sorted((tmp_path / "a").rglob("*.ckpt"))
    assert ckpts, "no checkpoint written"
    saved = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    dm_state = saved["DrivingDataModule"]
    assert dm_state["env_steps"] == first.datamodule.env_steps == 24
    assert saved["think2drive"]["wm_updates"] == first.model.wm_updates > 0
    replay_rows = int(dm_state["replay"]["count"].sum())

    # load_from_checkpoint rebuilds the module from its plain hyperparameters
    loaded = Think2Drive.load_from_checkpoint(ckpts[-1], map_location="cpu")
    for (name, a), b in zip(first.model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)

    second = _cli(tmp_path / "b", "--trainer.limit_val_batches=0", "--data.init_args.num_envs=2",
                  "--data.init_args.parallel=true", "--trainer.max_epochs=2", f"--ckpt_path={ckpts[-1]}")
    assert second.datamodule.env_steps == 48  # continued from 24, not restarted
    assert second.model.wm_updates > first.model.wm_updates
    assert int(second.datamodule.replay.count.sum()) >= replay_rows + 24  # restored replay, then 24 new steps (+ resets)
    assert second.trainer.current_epoch == 2


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="`horizon` must be an int >= 1, got 0"):
        Think2Drive(**{**TINY_MODEL, "horizon": 0})
    with pytest.raises(ValueError, match="bev_size must be 4 \\* 2\\*\\*k"):
        Think2Drive(**{**TINY_MODEL, "bev_size": 24})
    with pytest.raises(ValueError, match=r"`gamma` must be in \[0.0, 1.0\]"):
        Think2Drive(**{**TINY_MODEL, "gamma": 1.5})
    with pytest.raises(ValueError, match="unknown scenario 'moon' in scenarios"):
        DrivingDataModule(scenarios=["moon"])
    with pytest.raises(TypeError, match="list of scenario names"):
        DrivingDataModule(scenarios="merge")
    with pytest.raises(ValueError, match=r"`train_ratio` must be in \(0.0, inf\]"):
        DrivingDataModule(train_ratio=0)
    with pytest.raises(ValueError, match="num_actions=25 but the environment's action table has 35 actions"):
        _cli(tmp_path, "--trainer.fast_dev_run=1", "--model.init_args.num_actions=25")
    with pytest.raises(ValueError, match=r"expects BEV stacks \(10, 32, 32\)"):
        _cli(tmp_path, "--trainer.fast_dev_run=1", "--model.init_args.bev_size=32")


def test_planner_reset_keeps_the_world_model():
    torch.manual_seed(0)
    model = Think2Drive(**TINY_MODEL)
    with torch.no_grad():
        for p in model.critic.parameters():
            p.add_(1.0)
        model.return_norm.update(torch.arange(100.0))
    wm_before = [p.clone() for p in model.world_model_parameters()]
    actor_before = [p.clone() for p in model.actor.parameters()]
    model.reset_planner()
    for a, b in zip(wm_before, model.world_model_parameters()):
        torch.testing.assert_close(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(actor_before, model.actor.parameters()))
    assert torch.all(model.critic[-1].weight == 0) and torch.all(model.critic[-1].bias == 0)
    for a, b in zip(model.critic.parameters(), model.slow_critic.parameters()):
        torch.testing.assert_close(a, b)
    assert not bool(model.return_norm.initialized) and model.planner_resets == 1


def test_planner_ratio_schedule():
    model = Think2Drive(**{**TINY_MODEL, "planner_ratio_start": 1.0, "planner_ratio_end": 4.0, "planner_ratio_steps": 100})
    model.wm_updates = 0
    assert model.planner_ratio() == 1.0
    model.wm_updates = 50
    assert model.planner_ratio() == pytest.approx(2.5)
    model.wm_updates = 1000
    assert model.planner_ratio() == 4.0


def _synthetic_batch(b: int = 4, t: int = 6) -> dict[str, torch.Tensor]:
    """A learnable world: a bright square moves one pixel per step; reward = its column / 4."""
    g = torch.Generator().manual_seed(0)
    bev = torch.zeros(b, t, 10, 16, 16, dtype=torch.uint8)
    start = torch.randint(0, 8, (b,), generator=g)
    for i in range(b):
        for j in range(t):
            c = int(start[i]) + j
            bev[i, j, 4, 6:10, c : c + 4] = 1
            bev[i, j, 0] = 1
    reward = (start[:, None] + torch.arange(t)[None]).float() / 4
    return {
        "bev": bev,
        "vec": torch.zeros(b, t, 4),
        "action": torch.full((b, t), 17, dtype=torch.long),
        "reward": reward,
        "terminal": torch.zeros(b, t),
        "is_first": torch.zeros(b, t).index_fill_(1, torch.tensor([0]), 1.0),
        "from_termination": torch.zeros(b, dtype=torch.bool),
    }


def test_world_model_fits_a_fixed_batch():
    torch.manual_seed(0)
    model = Think2Drive(**{**TINY_MODEL, "world_model_lr": 3e-3})
    opt = torch.optim.Adam(model.world_model_parameters(), lr=3e-3)
    batch = _synthetic_batch()
    losses, maes = [], []
    for _ in range(60):
        loss, _, metrics = model.world_model_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        maes.append(metrics["wm/reward_mae"].item())
    assert losses[-1] < 0.3 * losses[0]
    assert maes[-1] < 0.5 * maes[0]


def test_behaviour_losses_have_gradients_only_for_actor_and_critic():
    torch.manual_seed(0)
    model = Think2Drive(**TINY_MODEL)
    _, post, _ = model.world_model_loss(_synthetic_batch(2, 4))
    from lightning_eff.rl.dreamer import RSSMState

    start = RSSMState(post.deter.flatten(0, 1), post.stoch.flatten(0, 1), post.logits.flatten(0, 1))
    actor_loss, critic_loss, metrics = model.behaviour_losses(start, torch.ones(8))
    (actor_loss + critic_loss).backward()
    assert all(p.grad is None for p in model.world_model_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.actor.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.critic.parameters())
    assert float(metrics["planner/return_scale"]) >= 1.0


def test_policy_step_resets_state_at_episode_start():
    torch.manual_seed(0)
    model = Think2Drive(**TINY_MODEL).eval()
    obs = {"bev": np.random.default_rng(0).integers(0, 2, (3, 10, 16, 16)).astype(np.uint8),
           "vec": np.zeros((3, 4), np.float32)}
    _, state = model.policy_step(obs, None, np.ones(3, bool), explore=False)
    _, state2 = model.policy_step(obs, state, np.zeros(3, bool), explore=False)
    _, fresh = model.policy_step(obs, state2, np.array([True, False, False]), explore=False)
    torch.testing.assert_close(fresh[0].deter[0], state[0].deter[0])  # env 0 restarted: same as the first step
    assert not torch.allclose(fresh[0].deter[1], state[0].deter[1])


_DDP_SCRIPT = """
import sys, torch, lightning as L
from lightning_eff.rl import DrivingDataModule, Think2Drive

class Dump(L.Callback):
    def on_train_end(self, trainer, module):
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()},
                   f"{sys.argv[1]}/rank{trainer.global_rank}.pt")

if __name__ == "__main__":
    L.seed_everything(0)
    dm = DrivingDataModule(scenarios=["highway_easy", "merge"], bev_size=16, resolution=4.0, num_envs=1,
                           parallel=False, batch_size=2, sequence_length=4, train_ratio=8.0, replay_capacity=512,
                           prefill_steps=8, env_steps_per_epoch=24,
                           val_episodes_per_scenario=1)
    model = Think2Drive(bev_size=16, deter=16, units=16, mlp_layers=1, cnn_depth=4, stoch_groups=2,
                        stoch_classes=4, bins=15, horizon=3, planner_ratio_end=float(sys.argv[2]),
                        planner_ratio_steps=2)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy=sys.argv[3], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[Dump()], default_root_dir=sys.argv[1])
    trainer.fit(model, datamodule=dm)
    if trainer.is_global_zero:
        print("VAL_DS", float(trainer.callback_metrics["val/driving_score"]),
              "EPISODES", int(trainer.callback_metrics["val/episodes"]))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("planner_ratio_end", "strategy"), [(1.0, "ddp"), (3.0, "ddp_find_unused_parameters_true")])
def test_ddp_two_cpu_processes(tmp_path, planner_ratio_end, strategy):
    """Two CPU ranks (gloo): each rank steps its own environments (different data), gradients are averaged
    so both ranks end with identical weights, and the held-out suite is sharded then gathered. Extra planner
    updates (ratio > 1) leave the world model out of their backward pass (DDP needs
    ``find_unused_parameters``; it still averages their gradients)."""
    import os
    import subprocess

    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(planner_ratio_end), strategy],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert "EPISODES 2" in proc.stdout  # one held-out episode per rank, gathered


def test_planner_reset_during_training_on_schedule():
    """Brick 1 inside the training loop: every ``planner_reset_interval`` world-model updates the actor, the critic
    and their optimiser states start afresh while the world model and its optimiser carry on."""
    import lightning as L

    L.seed_everything(0, verbose=False)
    dm = DrivingDataModule(env_name="tiny-corridor", scenarios=["corridor"], bev_size=16, num_envs=1, parallel=False,
                           batch_size=2, sequence_length=4, train_ratio=8.0, replay_capacity=256, prefill_steps=8,
                           warmup_scenarios=[], env_steps_per_epoch=24, val_episodes_per_scenario=0)
    model = Think2Drive(num_actions=9, bev_channels=3, bev_size=16, vec_dim=4, deter=16, units=16, mlp_layers=1,
                        cnn_depth=4, stoch_groups=2, stoch_classes=4, bins=15, horizon=3, planner_reset_interval=2,
                        rollout_images=False)
    seen = []

    class Check(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            wm_opt, actor_opt, critic_opt = (o.optimizer for o in module.optimizers())
            just_reset = module.wm_updates % 2 == 0
            seen.append((module.wm_updates, module.planner_resets, just_reset, len(actor_opt.state),
                         len(critic_opt.state), len(wm_opt.state),
                         bool(torch.all(module.critic[-1].weight == 0)), bool(module.return_norm.initialized)))

    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Check()])
    trainer.fit(model, datamodule=dm)
    assert len(seen) >= 4
    for wm_updates, resets, just_reset, actor_state, critic_state, wm_state, critic_zero, norm_init in seen:
        assert resets == wm_updates // 2
        assert wm_state > 0  # the world model's Adam moments are kept
        if just_reset:
            assert actor_state == critic_state == 0 and critic_zero and not norm_init
        else:
            assert actor_state > 0 and critic_state > 0 and not critic_zero and norm_init
