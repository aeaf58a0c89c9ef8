"""KO: the collision math against the formula written out directly, and the optimizer contract."""

from __future__ import annotations

import copy
import itertools

import lightning as L
import pytest
import torch
from helpers import cpu_trainer
from torch import nn

from lightning_eff.optim import KO, collide, condensation_stats, hard_collide
from lightning_eff.utils.distributed import ProcessGroupCleanup


# ---------------------------------------------------------------- reference formulas, written out
def reference_collide(W, G, rate, variant, thres):
    """The method page's soft collision with explicit loops, in float64."""
    W = W.reshape(W.shape[0], -1).double()
    G = G.reshape(G.shape[0], -1).double()
    n = W.shape[0]
    S = torch.zeros(n, n, dtype=torch.float64)
    for i, j in itertools.product(range(n), range(n)):
        cw = W[i] @ W[j] / (W[i].norm() * W[j].norm())
        cg = G[i] @ G[j] / (G[i].norm() * G[j].norm())
        S[i, j] = cw * cg if cw * cg >= thres else 0.0
    if variant != "wg":  # S - I: no self-interaction
        S.fill_diagonal_(0.0)
    R = torch.zeros_like(G)
    for i in range(n):
        for j in range(n):
            R[i] += S[i, j] * G[j]
    if variant == "wg_e":
        R = R / (R.norm() + 1e-20) * G.norm() * rate
    else:
        R = R * rate
    return G - R


@pytest.mark.parametrize("variant", ["wg", "wg_i", "wg_e"])
@pytest.mark.parametrize("thres", [0.0, -1.0, 0.2])
@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 3, 3)])
def test_collide_matches_formula(variant, thres, shape):
    g = torch.Generator().manual_seed(1)
    W, G = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    want = reference_collide(W, G, 0.3, variant, thres).reshape(shape)
    got64 = collide(W.double(), G.double(), collision_rate=0.3, variant=variant, threshold=thres)
    torch.testing.assert_close(got64, want, rtol=1e-10, atol=1e-12)
    got = collide(W, G, collision_rate=0.3, variant=variant, threshold=thres)
    assert got.shape == G.shape and got.dtype == G.dtype
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


def test_collide_hand_computed():
    # Two parallel neurons with parallel gradients: S = [[1, 1], [1, 1]].
    W = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    G = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    # wg: R = 0.5 * S G = 0.5 * [[3, 0], [3, 0]]
    torch.testing.assert_close(collide(W, G, 0.5, "wg"), torch.tensor([[-0.5, 0.0], [0.5, 0.0]]))
    # wg_i: R = 0.5 * (S - I) G = 0.5 * [[2, 0], [1, 0]]
    torch.testing.assert_close(collide(W, G, 0.5, "wg_i"), torch.tensor([[0.0, 0.0], [1.5, 0.0]]))
    # Orthogonal neurons do not interact.
    W2 = torch.eye(2)
    torch.testing.assert_close(collide(W2, G, 0.5, "wg_i"), G)


def test_collide_chunked_equals_full():
    g = torch.Generator().manual_seed(0)
    W, G = torch.randn(37, 11, generator=g), torch.randn(37, 11, generator=g)
    for variant in ("wg", "wg_i", "wg_e"):
        full = collide(W, G, 0.2, variant, chunk_size=None)
        for chunk in (1, 5, 36, 37, 100):
            torch.testing.assert_close(collide(W, G, 0.2, variant, chunk_size=chunk), full, rtol=1e-5, atol=1e-6)


def test_collide_keeps_low_precision_dtype():
    W, G = torch.randn(4, 3).bfloat16(), torch.randn(4, 3).bfloat16()
    assert collide(W, G).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(collision_rate=-0.1), "collision_rate"),
        (dict(collision_rate=1.5), "collision_rate"),
        (dict(variant="wg_x"), "variant"),
        (dict(threshold=2.0), "threshold"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_collide_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        collide(torch.randn(3, 3), torch.randn(3, 3), **kwargs)


def test_collide_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        collide(torch.randn(3, 3), torch.randn(3, 4))
    with pytest.raises(ValueError, match="ndim >= 2"):
        collide(torch.randn(3), torch.randn(3))


# ---------------------------------------------------------------- hard collision
def test_hard_collision_is_elastic_and_physical():
    """One colliding pair: momentum and energy conserved; on average v_j -> v_cm (not away)."""
    W = torch.zeros(3, 2)  # both particles (columns) at the same position
    G = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, -1.0]])
    v_cm = G.mean(1)
    news = []
    for seed in range(400):
        new = hard_collide(W, G, collision_rate=0.5, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(new.sum(1), G.sum(1))  # momentum
        torch.testing.assert_close(new.pow(2).sum(), G.pow(2).sum())  # kinetic energy
        news.append(new)
    mean = torch.stack(news).mean(0)
    # E[v'] = v_cm for both particles: the physical sign. (The author's code moves them apart.)
    torch.testing.assert_close(mean[:, 0], v_cm, atol=0.12, rtol=0)
    torch.testing.assert_close(mean[:, 1], v_cm, atol=0.12, rtol=0)


def test_hard_collision_only_close_fast_pairs_collide():
    # Columns 0, 1 close with very different velocities -> collide; column 2 far away -> untouched.
    W = torch.tensor([[0.0, 0.0, 100.0], [0.0, 0.0, 100.0]])
    G = torch.tensor([[1.0, -1.0, 0.5], [0.5, 0.0, 0.0]])
    new = hard_collide(W, G, collision_rate=0.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(new[:, 2], G[:, 2])
    assert not torch.equal(new[:, :2], G[:, :2])
    # collision_rate 0 -> nothing collides
    torch.testing.assert_close(hard_collide(W, G, collision_rate=0.0), G)


# ---------------------------------------------------------------- the optimizer
def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _train(model, opt, batches, scaler=None):
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return model


@pytest.mark.parametrize(
    "base, kwargs, torch_cls, torch_kwargs",
    [
        ("adam", dict(betas=(0.8, 0.99), weight_decay=0.01), torch.optim.Adam, dict(betas=(0.8, 0.99), weight_decay=0.01)),
        ("adamw", dict(amsgrad=True), torch.optim.AdamW, dict(amsgrad=True)),
        ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=1e-3), torch.optim.SGD, dict(momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ],
)
def test_ko_without_collision_is_the_base_optimizer(base, kwargs, torch_cls, torch_kwargs):
    batches = _batches()
    m1, m2, m3 = _mlp(), _mlp(), _mlp()
    _train(m1, KO(m1.parameters(), lr=0.05, base=base, collision_rate=0.0, noise_scale=0.0, **kwargs), batches)
    _train(m2, KO(m2.parameters(), lr=0.05, base=base, collision="none", **kwargs), batches)
    _train(m3, torch_cls(m3.parameters(), lr=0.05, **torch_kwargs), batches)
    for a, b, c in zip(m1.parameters(), m2.parameters(), m3.parameters()):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_ko_with_collision_differs_from_base_and_is_seeded():
    batches = _batches()
    m0, m1, m2 = _mlp(), _mlp(), _mlp()
    _train(m0, torch.optim.Adam(m0.parameters(), lr=0.05), batches)
    _train(m1, KO(m1.parameters(), lr=0.05, seed=3), batches)
    _train(m2, KO(m2.parameters(), lr=0.05, seed=3), batches)
    assert not torch.equal(m0[0].weight, m1[0].weight)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_ko_step_applies_collide_to_matrices_only():
    m = _mlp()
    opt = KO(m.parameters(), lr=0.0, collision_rate=0.2, variant="wg", noise_scale=0.0)
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(m(x), y).backward()
    before = {n: p.grad.clone() for n, p in m.named_parameters()}
    opt.step()
    for name, p in m.named_parameters():
        if p.ndim >= 2:
            torch.testing.assert_close(p.grad, collide(p, before[name], 0.2, "wg"))
        else:
            assert torch.equal(p.grad, before[name]), name


def test_ko_calls_the_closure_and_returns_its_loss():
    m = _mlp()
    opt = KO(m.parameters(), lr=0.01)
    x, y = _batches(1)[0]
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        return loss

    w = m[0].weight.clone()
    loss = opt.step(closure)
    assert calls == [1] and torch.is_tensor(loss) and loss.requires_grad
    assert not torch.equal(w, m[0].weight)


def test_ko_state_dict_round_trip_continues_the_same_trajectory():
    batches = _batches(6)
    m1 = _mlp()
    o1 = KO(m1.parameters(), lr=0.05, noise_scale=1e-2, seed=7)
    _train(m1, o1, batches[:3])
    saved_model, saved_opt = copy.deepcopy(m1.state_dict()), copy.deepcopy(o1.state_dict())
    assert saved_opt["ko"]["steps"] == 3 and "cpu" in saved_opt["ko"]["rng"]
    _train(m1, o1, batches[3:])

    m2 = _mlp(seed=99)
    m2.load_state_dict(saved_model)
    o2 = KO(m2.parameters(), lr=0.05, noise_scale=1e-2, seed=123)  # seed is restored from the state
    o2.load_state_dict(saved_opt)
    assert o2.param_groups[0]["params"] and o2._base_optimizer.state is o2.state
    _train(m2, o2, batches[3:])
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_ko_param_groups_rates_and_collision_off():
    m = _mlp()
    opt = KO(
        [
            {"params": m[0].parameters(), "lr": 0.0, "collision": "none"},
            {"params": m[3].parameters(), "lr": 0.1, "collision_rate": 0.5, "variant": "wg"},
            {"params": m[5].parameters()},
        ],
        lr=0.01,
        noise_scale=0.0,
    )
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.1, 0.01]
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(m(x), y).backward()
    g0, g1 = m[0].weight.grad.clone(), m[3].weight.grad.clone()
    w0, w3 = m[0].weight.clone(), m[3].weight.clone()
    opt.step()
    assert torch.equal(m[0].weight.grad, g0)  # collision off for this group
    torch.testing.assert_close(m[3].weight.grad, collide(w3, g1, 0.5, "wg"))
    assert torch.equal(m[0].weight, w0)  # lr 0 for this group
    # an LR scheduler on KO reaches the base step
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sched.step()
    assert opt._base_optimizer.param_groups[1]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(collision_rate=-0.1), "collision_rate"),
        (dict(variant="nope"), "variant"),
        (dict(base="lion"), "base"),
        (dict(collision="medium"), "collision"),
        (dict(noise_scale=-1.0), "noise_scale"),
        (dict(lr=-1.0), "lr"),
        (dict(collision_every=0), "collision_every"),
        (dict(base="adam", momentum=0.9), "momentum"),
        (dict(base="sgd", amsgrad=True), "amsgrad"),
        (dict(betas=(1.5, 0.9)), "beta"),
    ],
)
def test_ko_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KO(_mlp().parameters(), **kwargs)


def test_ko_bad_param_group():
    m = _mlp()
    with pytest.raises(ValueError, match="param group: variant"):
        KO([{"params": m.parameters(), "variant": "zz"}])


def test_ko_with_amp_grad_scaler_matches_unscaled():
    batches = _batches(3)
    m1, m2 = _mlp(), _mlp()
    _train(m1, KO(m1.parameters(), lr=0.05, seed=1), batches)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _train(m2, KO(m2.parameters(), lr=0.05, seed=1), batches, scaler=scaler)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def reference_hard_collide(W, G, rate, distance_scale, gen):
    """The physical hard collision written out pair by pair, in float64 (independent of ``hard_collide``).

    Particles are the columns of the ``(out, -1)`` view. A pair (i, j), i < j, collides when
    ``|v_i - v_j| / max |v_k - v_l| * exp(-c |x_i - x_j|) > 1 - rate``; it leaves with
    ``v_cm +- |v_r| / 2 * e`` (elastic: momentum and energy of the pair conserved), e a random unit vector
    per pair (drawn for the pairs in row-major order, one ``randn(P, d)`` from ``gen``); each particle moves
    by the mean of its changes over its partners. Returns the new gradient and the largest partner count.
    """
    X = W.detach().reshape(W.shape[0], -1).double().T
    V = G.detach().reshape(G.shape[0], -1).double().T
    n = V.shape[0]
    vr = [[float((V[i] - V[j]).norm()) for j in range(n)] for i in range(n)]
    vmax = max(max(row) for row in vr)
    pairs = [
        (i, j)
        for i in range(n)
        for j in range(i + 1, n)
        if vr[i][j] / vmax * torch.exp(-distance_scale * (X[i] - X[j]).norm()) > 1 - rate
    ]
    if not pairs:
        return G.clone(), 0
    E = torch.randn(len(pairs), V.shape[1], generator=gen).double()
    delta = torch.zeros_like(V)
    count = [0] * n
    for (i, j), e in zip(pairs, E):
        e = e / e.norm()
        v_cm = (V[i] + V[j]) / 2
        delta[i] += v_cm + vr[i][j] / 2 * e - V[i]
        delta[j] += v_cm - vr[i][j] / 2 * e - V[j]
        count[i] += 1
        count[j] += 1
    new = V + delta / torch.tensor([max(c, 1) for c in count], dtype=V.dtype).unsqueeze(1)
    return new.T.reshape(G.shape).to(G.dtype), max(count)


def test_ko_hard_collision_trains():
    """KO(collision="hard") hands the base optimizer, at every step, the gradient of the elastic pairwise
    collision (checked against the pair-by-pair reference above: a no-op, the soft collision, the author's
    sign, a full instead of a half relative speed, or a sum instead of a mean over partners all fail), and it
    still learns: the loss falls and the trajectory is not plain SGD's."""
    rate, c = 0.2, 0.05
    m, plain = _mlp(), _mlp()
    opt = KO(m.parameters(), lr=0.3, base="sgd", collision="hard", collision_rate=rate, noise_scale=0.0, seed=0)
    sgd = torch.optim.SGD(plain.parameters(), lr=0.3)
    gen = torch.Generator().manual_seed(0)  # KO's noise generator with seed=0: the pairs' directions come from it
    losses, changed, most_partners = [], 0, 0
    for x, y in _batches(1, seed=1) * 15:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        before = [(p.detach().clone(), p.grad.clone()) for p in m.parameters()]
        opt.step()
        for p, (w0, g0) in zip(m.parameters(), before):
            if p.ndim < 2:
                assert torch.equal(p.grad, g0)  # biases get no collision
                continue
            expected, partners = reference_hard_collide(w0, g0, rate, c, gen)
            torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6)
            changed += not torch.equal(p.grad, g0)
            most_partners = max(most_partners, partners)
        losses.append(loss.item())
        sgd.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        sgd.step()
    assert changed >= 15  # the collision acted (at least one matrix per step)
    assert most_partners >= 2  # the mean over several partners was exercised
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert not torch.allclose(m[0].weight, plain[0].weight, atol=1e-4)


def test_ko_collision_every_k_steps():
    m1 = _mlp()
    opt = KO(m1.parameters(), lr=0.0, collision_rate=0.3, noise_scale=0.0, collision_every=2)
    x, y = _batches(1)[0]
    changed = []
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(m1(x), y).backward()
        g = m1[3].weight.grad.clone()
        opt.step()
        changed.append(not torch.equal(g, m1[3].weight.grad))
    assert changed == [True, False, True, False]


# ---------------------------------------------------------------- condensation measure
def test_condensation_stats_matches_brute_force():
    W = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    cos = [
        abs(float(W[i] @ W[j] / (W[i].norm() * W[j].norm())))
        for i, j in itertools.product(range(7), range(7))
        if i != j
    ]
    s = torch.linalg.svdvals(W.double())
    p = s / s.sum()
    erank = float(torch.exp(-(p * p.log()).sum()))
    for chunk in (None, 2, 3):
        stats = condensation_stats(W, chunk_size=chunk)
        assert stats["mean_abs_cos"] == pytest.approx(sum(cos) / len(cos), rel=1e-5)
        assert stats["max_abs_cos"] == pytest.approx(max(cos), rel=1e-5)
        assert stats["effective_rank"] == pytest.approx(erank, rel=1e-4)
    collapsed = condensation_stats(torch.ones(4, 3))
    assert collapsed["mean_abs_cos"] == pytest.approx(1.0) and collapsed["effective_rank"] == pytest.approx(1.0)


# ---------------------------------------------------------------- Lightning: resume and DDP
class _Boring(L.LightningModule):
    def __init__(self, noise=1e-2, seed=5):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
        self.noise, self.ko_seed = noise, seed

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return KO(self.parameters(), lr=0.05, noise_scale=self.noise, seed=self.ko_seed)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 2, (32,), generator=g))
        return torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)


def _trainer(tmp_path, **kw):
    return cpu_trainer(tmp_path, **{"enable_checkpointing": True, **kw})


def test_lightning_checkpoint_resume_continues_the_same_trajectory(tmp_path):
    straight = _Boring()
    _trainer(tmp_path / "a", max_epochs=4, enable_checkpointing=False).fit(straight)

    first = _Boring()
    t1 = _trainer(tmp_path / "b", max_epochs=2)
    t1.fit(first)
    ckpt = tmp_path / "half.ckpt"
    t1.save_checkpoint(ckpt)
    resumed = _Boring(seed=None)  # the generator state comes from the checkpoint
    _trainer(tmp_path / "c", max_epochs=4, enable_checkpointing=False).fit(resumed, ckpt_path=ckpt)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


class _DDPCheck(ProcessGroupCleanup, _Boring):
    """Each rank starts from a different global seed; KO's seed=None must be broadcast.

    ``ProcessGroupCleanup`` (as the library's modules): its ``setup`` registers the clean gloo teardown in each
    spawned rank."""

    def __init__(self, out):
        super().__init__(noise=5e-2, seed=None)
        self.out = out

    def on_fit_start(self):
        from lightning_eff.utils import distributed

        assert distributed._REGISTERED, "ProcessGroupCleanup.setup did not run in this rank"
        torch.manual_seed(1000 + self.global_rank)

    def on_train_end(self):
        flat = torch.cat([p.detach().flatten() for p in self.parameters()])
        gathered = self.all_gather(flat)
        if self.global_rank == 0:
            torch.save(gathered, self.out)


@pytest.mark.timeout(300)
def test_ddp_two_processes_stay_in_sync(tmp_path):
    out = tmp_path / "params.pt"
    model = _DDPCheck(str(out))
    trainer = _trainer(tmp_path, max_epochs=2, strategy="ddp_spawn", devices=2, enable_checkpointing=False)
    trainer.fit(model)
    gathered = torch.load(out)
    assert gathered.shape[0] == 2
    assert torch.equal(gathered[0], gathered[1])
    torch.manual_seed(0)
    assert not torch.equal(gathered[0], torch.cat([p.detach().flatten() for p in _Boring().parameters()]))
