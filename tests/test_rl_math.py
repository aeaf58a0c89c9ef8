"""Think2Drive math: symlog/symexp, two-hot, lambda-returns, KL balancing, return scale, driving score."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_eff.rl.dreamer import (
    ReturnNormalizer,
    kl_balance_loss,
    lambda_returns,
    symexp,
    symlog,
    twohot_decode,
    twohot_encode,
    unimix_logits,
)
from lightning_eff.rl.metrics import CARLA_PENALTIES, driving_score


def test_symlog_values_and_round_trip():
    x = torch.tensor([-1e4, -3.0, -0.5, 0.0, 0.5, 3.0, 1e4], dtype=torch.float64)
    expected = torch.tensor([math.copysign(math.log1p(abs(v)), v) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(symlog(x), expected)
    torch.testing.assert_close(symexp(symlog(x)), x, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(symlog(symexp(x[1:-1])), x[1:-1])
    assert symlog(torch.tensor(0.7)) < 0.7  # compresses: log(1 + x) < x for x > 0


def test_twohot_round_trip_and_expected_value():
    bins = torch.linspace(-20.0, 20.0, 255, dtype=torch.float64)
    x = torch.empty(1000, dtype=torch.float64).uniform_(-19.99, 19.99, generator=torch.Generator().manual_seed(0))
    enc = twohot_encode(x, bins)
    assert enc.shape == (1000, 255)
    torch.testing.assert_close(enc.sum(-1), torch.ones(1000, dtype=torch.float64))
    assert int((enc > 0).sum(-1).max()) <= 2
    # The expected bin value under the two-hot distribution is x itself (Eq. 10-11).
    torch.testing.assert_close((enc * bins).sum(-1), x)
    torch.testing.assert_close(twohot_decode(enc, bins), x)
    # The mass sits on the two neighbouring bins, split by distance (hand computation for one value).
    b = torch.tensor([0.0, 1.0, 2.0, 4.0])
    torch.testing.assert_close(twohot_encode(torch.tensor(3.5), b), torch.tensor([0.0, 0.0, 0.25, 0.75]))
    # Out of range values clamp to the end bins.
    torch.testing.assert_close(twohot_encode(torch.tensor([-9.0, 9.0]), b)[:, [0, 3]], torch.eye(2))


def test_twohot_decode_rejects_wrong_bins():
    with pytest.raises(ValueError, match="number of bins"):
        twohot_decode(torch.ones(3, 4) / 4, torch.linspace(0, 1, 5))


def _lambda_returns_recursive(r, v, c, boot, lam):
    """The recursion written out directly: R_t = r_t + c_t ((1 - lam) v_{t+1} + lam R_{t+1}), R_H = boot."""
    horizon = len(r)

    def ret(t):
        if t == horizon:
            return boot
        next_v = v[t + 1] if t + 1 < horizon else boot
        return r[t] + c[t] * ((1 - lam) * next_v + lam * ret(t + 1))

    return [ret(t) for t in range(horizon)]


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95, 1.0])
def test_lambda_returns_match_recursive_hand_computation(lam):
    rng = np.random.default_rng(1)
    horizon, n = 6, 3
    r, v = rng.normal(size=(horizon, n)), rng.normal(size=(horizon, n))
    c = rng.uniform(0.5, 1.0, size=(horizon, n))
    boot = rng.normal(size=n)
    got = lambda_returns(*(torch.tensor(a) for a in (r, v, c, boot)), lambda_=lam)
    for j in range(n):
        want = _lambda_returns_recursive(r[:, j], v[:, j], c[:, j], boot[j], lam)
        np.testing.assert_allclose(got[:, j].numpy(), want, rtol=1e-12)
    if lam == 0.0:  # one-step TD targets
        next_v = np.concatenate([v[1:], boot[None]])
        np.testing.assert_allclose(got.numpy(), r + c * next_v, rtol=1e-12)
    if lam == 1.0:  # discounted Monte-Carlo return with the bootstrap at the end
        mc = boot.copy()
        for t in reversed(range(horizon)):
            mc = r[t] + c[t] * mc
        np.testing.assert_allclose(got[0].numpy(), mc, rtol=1e-12)


def test_lambda_returns_bad_inputs():
    with pytest.raises(ValueError, match="lambda_ must be in"):
        lambda_returns(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.tensor(0.0), lambda_=1.5)
    with pytest.raises(ValueError, match="same shape"):
        lambda_returns(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.tensor(0.0))
    with pytest.raises(ValueError, match="bootstrap"):
        lambda_returns(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3))


def test_kl_balance_loss_matches_formula_and_free_bits():
    g = torch.Generator().manual_seed(0)
    post = torch.randn(5, 3, 4, generator=g, requires_grad=True)
    prior = torch.randn(5, 3, 4, generator=g, requires_grad=True)
    p, q = post.softmax(-1), prior.softmax(-1)
    kl = (p * (p.log() - q.log())).sum((-1, -2))
    dyn, rep, raw = kl_balance_loss(post, prior, free_bits=0.0)
    torch.testing.assert_close(raw, kl.detach())
    torch.testing.assert_close(dyn, kl)
    # stop-gradients: the dynamics loss trains only the prior, the representation loss only the posterior
    dyn.sum().backward()
    assert post.grad is None and prior.grad is not None
    dyn_fb, _, _ = kl_balance_loss(post, prior, free_bits=1.0)
    torch.testing.assert_close(dyn_fb, kl.detach().clamp(min=1.0))


def test_unimix_and_return_normalizer():
    probs = unimix_logits(torch.tensor([[10.0, -10.0, -10.0, -10.0]]), 0.2).softmax(-1)
    torch.testing.assert_close(probs, torch.tensor([[0.8 + 0.05, 0.05, 0.05, 0.05]]), atol=1e-5, rtol=0)
    norm = ReturnNormalizer(decay=0.5)
    a = torch.arange(201.0)
    b = torch.arange(201.0) * 3
    norm.update(a)
    s = norm.update(b)
    lo = 0.5 * np.percentile(a, 5) + 0.5 * np.percentile(b, 5)
    hi = 0.5 * np.percentile(a, 95) + 0.5 * np.percentile(b, 95)
    assert float(s) == pytest.approx(hi - lo)
    small = ReturnNormalizer(decay=0.0)
    assert float(small.update(torch.zeros(10) + 0.1)) == 1.0  # max(1, S)
    with pytest.raises(ValueError, match="decay"):
        ReturnNormalizer(decay=1.0)


def test_driving_score_hand_computation():
    assert float(driving_score(1.0)) == 1.0
    assert float(driving_score(0.75, {"collision_vehicle": 2, "red_light": 1})) == pytest.approx(0.75 * 0.6**2 * 0.7)
    rc = torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64)
    infr = {"collision_static": torch.tensor([0, 1, 3]), "stop_sign": torch.tensor([1, 0, 0])}
    want = [1.0 * 0.8, 0.5 * 0.65, 0.2 * 0.65**3]
    np.testing.assert_allclose(driving_score(rc, infr).numpy(), want, rtol=1e-12)
    # weighted form: counts divided by the scenario density
    dens = torch.tensor([2.0, 1.0, 3.0])
    want_w = [0.8**0.5, 0.5 * 0.65, 0.2 * 0.65]
    np.testing.assert_allclose(driving_score(rc, infr, scenario_density=dens).numpy(), want_w, rtol=1e-12)
    # custom penalties
    assert float(driving_score(1.0, {"lane_invasion": 1}, penalties={"lane_invasion": 0.9})) == pytest.approx(0.9)
    assert CARLA_PENALTIES["collision_pedestrian"] == 0.5 and CARLA_PENALTIES["scenario_timeout"] == 0.7


def test_driving_score_bad_inputs():
    with pytest.raises(ValueError, match="unknown infraction kind 'lane_invasion'"):
        driving_score(1.0, {"lane_invasion": 1})
    with pytest.raises(ValueError, match=r"route_completion must lie in \[0, 1\]"):
        driving_score(1.5)
    with pytest.raises(ValueError, match="scenario_density must be > 0"):
        driving_score(1.0, {}, scenario_density=0.0)
    with pytest.raises(ValueError, match="penalty for 'x'"):
        driving_score(1.0, {}, penalties={"x": 1.5})
