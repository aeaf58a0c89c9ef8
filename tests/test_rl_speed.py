"""The speed work on Think2Drive's update is a pure optimisation: on a fixed batch and random seed the
world-model and behaviour losses, their metrics and their gradients equal those of the straightforward
implementation the module had before (``tests/_think2drive_reference.py``)."""

from __future__ import annotations

import _think2drive_reference as ref
import pytest
import torch

from lightning_eff.rl import Think2Drive
from lightning_eff.rl.dreamer import RSSMState

MODEL = dict(num_actions=35, bev_channels=10, bev_size=32, vec_dim=4, deter=32, units=32, mlp_layers=1,
             cnn_depth=4, stoch_groups=4, stoch_classes=4, bins=31, horizon=5)


def _batch(b: int = 4, t: int = 6, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    is_first = torch.zeros(b, t)
    is_first[:, 0] = 1.0
    is_first[1, 3] = 1.0  # an episode boundary inside a sequence
    action = torch.randint(0, 35, (b, t), generator=g)
    action[1, 3] = -1
    terminal = torch.zeros(b, t)
    terminal[1, 2] = 1.0
    return {
        "bev": (torch.rand(b, t, 10, size, size, generator=g) < 0.15).to(torch.uint8),
        "vec": torch.randn(b, t, 4, generator=g),
        "action": action,
        "reward": 3 * torch.randn(b, t, generator=g),
        "terminal": terminal,
        "is_first": is_first,
        "from_termination": torch.zeros(b, dtype=torch.bool),
    }


def _grads(model: Think2Drive) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("unimix", [0.01, 0.0])
def test_optimised_losses_equal_the_reference(unimix):
    torch.manual_seed(0)
    model = Think2Drive(**{**MODEL, "unimix": unimix})
    with torch.no_grad():  # a non-zero critic and reward head, so that values and rewards vary
        for p in (*model.critic[-1].parameters(), *model.reward_head[-1].parameters()):
            p.normal_(0, 0.3)
        model.slow_critic.load_state_dict(model.critic.state_dict())
    batch = _batch()
    rng_state = torch.get_rng_state()

    losses, metrics, grads = {}, {}, {}
    for side, wm_fn, beh_fn in (("ref", ref.world_model_loss, ref.behaviour_losses),
                                ("new", Think2Drive.world_model_loss, Think2Drive.behaviour_losses)):
        torch.set_rng_state(rng_state)
        model.return_norm.reset()
        wm_loss, post, m_wm = wm_fn(model, batch)
        wm_loss.backward()
        grads[side, "wm"] = _grads(model)
        start = RSSMState(post.deter.flatten(0, 1), post.stoch.flatten(0, 1), post.logits.flatten(0, 1)).detach()
        cont = 1.0 - batch["terminal"].transpose(0, 1).flatten()
        actor_loss, critic_loss, m_ac = beh_fn(model, start, cont)
        (actor_loss + critic_loss).backward()
        grads[side, "ac"] = _grads(model)
        losses[side] = torch.stack([wm_loss.detach(), actor_loss.detach(), critic_loss.detach()])
        metrics[side] = {**m_wm, **m_ac}

    torch.testing.assert_close(losses["new"], losses["ref"], rtol=1e-5, atol=1e-6)
    assert set(metrics["new"]) == set(metrics["ref"])
    for key in metrics["ref"]:
        torch.testing.assert_close(metrics["new"][key].float(), metrics["ref"][key].float(), rtol=1e-5, atol=1e-6,
                                   msg=key)
    for part in ("wm", "ac"):
        assert grads["new", part].keys() == grads["ref", part].keys() and grads["ref", part]
        for name, g in grads["ref", part].items():
            # relative to the gradient's norm: sums over many pixels are added in another order
            err = float((grads["new", part][name] - g).norm() / g.norm().clamp(min=1e-12))
            assert err < 1e-4, (part, name, err)
    # the behaviour gradients reach the actor and the critic only
    assert {n.split(".")[0] for n in grads["new", "ac"]} == {"actor", "critic"}


def test_imagine_last_starts_from_the_last_steps_of_each_sequence():
    torch.manual_seed(0)
    model = Think2Drive(**{**MODEL, "imagine_last": 2})
    batch = _batch(b=3, t=6)
    batch["terminal"][:, -1] = torch.tensor([1.0, 0.0, 1.0])
    _, post, _ = model.world_model_loss(batch)
    start, cont = model.imagination_starts(post, batch["terminal"])
    assert start.deter.shape == (2 * 3, MODEL["deter"]) and cont.shape == (6,)
    torch.testing.assert_close(start.deter, post.deter[-2:].flatten(0, 1))  # time-major: steps 4, 5 of b = 0, 1, 2
    assert cont.tolist() == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert not start.deter.requires_grad
    model.hparams.imagine_last = 0  # all steps
    start, cont = model.imagination_starts(post, batch["terminal"])
    assert start.deter.shape[0] == 18 and cont.shape == (18,)
    with pytest.raises(ValueError, match="`imagine_last` must be an int >= 0"):
        Think2Drive(**{**MODEL, "imagine_last": -1})
