"""Audit of Think2Drive's actor-critic and data conventions against independent references (issue 17).

* ``behaviour_losses`` against DreamerV3's imagination loss written out step by step in float64 (danijar/dreamerv3
  ``imag_loss`` / sheeprl ``dreamer_v3.py``): the reward and continuation of the transition ``t -> t+1`` are read
  at the imagined state ``t+1``, the first weight is the *real* continuation of the start state, the
  lambda-return bootstraps from the critic at the last imagined state, advantages are divided by
  ``max(1, P95 - P5)`` of the returns, REINFORCE uses the log-probability of the action actually taken at ``t``.
* ``DrivingDataModule`` rows against a log of every environment call: row ``t`` holds ``o_t``, the action that
  led to it, the reward received on arriving at it and its termination flag, across autoresets.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

from lightning_eff.rl import DrivingDataModule, Think2Drive  # noqa: E402
from lightning_eff.rl.dreamer import RSSMState  # noqa: E402
from lightning_eff.rl.envs import TinyCorridorEnv  # noqa: E402

SMALL = dict(num_actions=5, bev_channels=3, bev_size=16, vec_dim=4, deter=12, units=12, mlp_layers=1, cnn_depth=4,
             stoch_groups=2, stoch_classes=3, bins=31, horizon=4, gamma=0.9, lambda_=0.8, entropy_coef=0.05)


def _symexp(x):
    return np.sign(x) * np.expm1(np.abs(x))


def _symlog(x):
    return np.sign(x) * np.log1p(np.abs(x))


def _twohot(y, bins):
    """Two-hot of scalar ``y`` (already in symlog space) over ``bins``, written directly from DreamerV3 Eq. 10."""
    out = np.zeros(len(bins))
    y = min(max(y, bins[0]), bins[-1])
    k = max(min(int(np.searchsorted(bins, y, side="right")), len(bins) - 1), 1)
    w = (y - bins[k - 1]) / (bins[k] - bins[k - 1])
    out[k - 1] += 1 - w
    out[k] += w
    return out


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_behaviour_losses_match_dreamerv3_written_out():
    torch.manual_seed(0)
    model = Think2Drive(**SMALL)
    # give the zero-initialised heads some weights, so that rewards, values and continuations vary
    for head in (model.reward_head, model.critic, model.slow_critic, model.continue_head):
        torch.nn.init.normal_(head[-1].weight, std=0.5)
    n = 6
    start = RSSMState(torch.randn(n, 12), torch.nn.functional.one_hot(torch.randint(0, 3, (n, 2)), 3).float(),
                      torch.randn(n, 2, 3))
    start_cont = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])  # two starts are terminal states
    ref = copy.deepcopy(model)
    torch.manual_seed(1)
    actor_loss, critic_loss, _ = model.behaviour_losses(start, start_cont)
    torch.manual_seed(1)  # the same imagined trajectory (same action draws)
    with torch.no_grad():
        feats, actions, logits = ref.imagine(start, SMALL["horizon"])
        f = feats.double()
        bins = ref.bins.double().numpy()
        head = lambda net: net.double()(f).numpy()  # noqa: E731
        reward_logits, cont_logits = head(ref.reward_head), head(ref.continue_head)[..., 0]
        critic_logits, slow_logits = head(ref.critic), head(ref.slow_critic)
        actor_logits = head(ref.actor)
    H, g, lam, eta, mix = SMALL["horizon"], SMALL["gamma"], SMALL["lambda_"], SMALL["entropy_coef"], 0.01
    a = actions.numpy()
    exp_actor, exp_critic = 0.0, 0.0
    rets = np.zeros((H, n))
    for i in range(n):
        r = [_symexp(_softmax(reward_logits[t + 1, i]) @ bins) for t in range(H)]  # transition t -> t+1
        c = [1 / (1 + np.exp(-cont_logits[t + 1, i])) for t in range(H)]
        v = [_symexp(_softmax(critic_logits[t, i]) @ bins) for t in range(H + 1)]
        ret = [0.0] * H
        nxt = v[H]
        for t in reversed(range(H)):
            ret[t] = r[t] + g * c[t] * ((1 - lam) * v[t + 1] + lam * nxt)
            nxt = ret[t]
        rets[:, i] = ret
    lo, hi = np.quantile(rets.ravel(), [0.05, 0.95])
    scale = max(1.0, hi - lo)
    for i in range(n):
        c = [1 / (1 + np.exp(-cont_logits[t + 1, i])) for t in range(H)]
        w = float(start_cont[i])  # the real continuation of the start state
        for t in range(H):
            v_t = _symexp(_softmax(critic_logits[t, i]) @ bins)
            probs = (1 - mix) * _softmax(actor_logits[t, i]) + mix / SMALL["num_actions"]
            logp, ent = np.log(probs[a[t, i]]), -(probs * np.log(probs)).sum()
            exp_actor += -w * (logp * (rets[t, i] - v_t) / scale + eta * ent)
            log_q = np.log(_softmax(critic_logits[t, i]))
            slow = _symexp(_softmax(slow_logits[t, i]) @ bins)
            exp_critic += w * (-(_twohot(_symlog(rets[t, i]), bins) @ log_q) - _twohot(_symlog(slow), bins) @ log_q)
            w *= g * c[t]
    exp_actor /= H * n
    exp_critic /= H * n
    assert actor_loss.item() == pytest.approx(exp_actor, rel=1e-4, abs=1e-6)
    assert critic_loss.item() == pytest.approx(exp_critic, rel=1e-4, abs=1e-6)


def test_replay_rows_follow_the_environment(monkeypatch):
    log = []
    step, reset = TinyCorridorEnv.step, TinyCorridorEnv.reset

    def logged_step(self, action):
        out = step(self, action)
        log.append((int(action), out[0]["vec"].copy(), out[1], bool(out[2]), False))
        return out

    def logged_reset(self, **kwargs):
        out = reset(self, **kwargs)
        log.append((-1, out[0]["vec"].copy(), 0.0, False, True))
        return out

    monkeypatch.setattr(TinyCorridorEnv, "step", logged_step)
    monkeypatch.setattr(TinyCorridorEnv, "reset", logged_reset)
    dm = DrivingDataModule(env_name="tiny-corridor", scenarios=["corridor"], bev_size=16, num_envs=1, parallel=False,
                           batch_size=2, sequence_length=8, replay_capacity=2000, prefill_steps=10**6,
                           warmup_scenarios=[], env_steps_per_epoch=300, val_episodes_per_scenario=0, seed=0)
    dm.setup("fit")
    log.clear()
    dm._reset_envs()
    for _ in range(300):
        dm._env_step()
    rb = dm.replay
    rows = int(rb.count[0])
    assert rows == len(log) and sum(e[4] for e in log) > 5  # several episodes, so several autoresets
    for i, (action, vec, reward, terminal, first) in enumerate(log):
        assert int(rb.action[0, i]) == action
        np.testing.assert_allclose(rb.vec[0, i], vec)
        assert float(rb.reward[0, i]) == pytest.approx(reward)
        assert bool(rb.terminal[0, i]) == terminal and bool(rb.is_first[0, i]) == first
    dm.teardown("fit")
