"""Dataset distillation core: SyntheticSet, the base module and the DM / GM / MTT baselines."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_trainer, digits_fixture, tiny_convnet
from PIL import Image

from lightning_eff.data import DigitsDataModule
from lightning_eff.distill import SyntheticSet
from lightning_eff.distill.dm import DistributionMatching, mean_embedding_distance
from lightning_eff.distill.gm import GradientMatching, get_loops, gradient_distance
from lightning_eff.distill.mtt import (
    ExpertTrajectory,
    ExpertTrajectoryRecorder,
    TrajectoryMatching,
    normalized_parameter_distance,
    train_experts,
)
from lightning_eff.models import ImageClassifier

ROOT = Path(__file__).resolve().parents[1]


digits = digits_fixture(8)


def small_net(size=8, width=16):
    return tiny_convnet(size, width, depth=2)


def trainer(tmp_path, **kw):
    return cpu_trainer(tmp_path, **{"max_steps": 4, **kw})


METHODS = {
    "dm": lambda **kw: DistributionMatching(small_net(), batch_real=32, **kw),
    "gm": lambda **kw: GradientMatching(small_net(), batch_real=32, outer_loop=3, inner_loop=2, **kw),
    "mtt": lambda **kw: TrajectoryMatching(
        small_net(), num_experts=2, expert_train_epochs=3, max_start_epoch=2, expert_epochs=1, syn_steps=4, **kw
    ),
}


# ---------------------------------------------------------------- SyntheticSet
def _synset(**kw):
    g = torch.Generator().manual_seed(0)
    return SyntheticSet(
        torch.randn(6, 1, 8, 8, generator=g),
        torch.tensor([0, 0, 1, 1, 2, 2]),
        metadata={"num_classes": 3, "mean": [0.3], "std": [0.2], "method": "test", "ipc": 2},
        **kw,
    )


def test_synthetic_set_round_trip(tmp_path):
    s = _synset(soft_labels=torch.rand(6, 3), privileged=torch.randn(6, 4), lr=0.02)
    path = s.save(tmp_path / "sub" / "set.pt")
    loaded = SyntheticSet.load(path)
    assert loaded.equals(s) and loaded.lr == 0.02 and loaded.ipc == 2
    assert [p.name for p in path.parent.iterdir()] == ["set.pt"]  # no temp file left behind
    s2 = _synset()
    s2.save(path)  # overwrite in place
    assert SyntheticSet.load(path).equals(s2)


def test_synthetic_set_bad_files(tmp_path):
    good = tmp_path / "good.pt"
    _synset().save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(os.urandom(1000))
    torch.save({"hello": 1}, tmp_path / "foreign.pt")
    d = _synset().to_dict()
    d["format_version"] = 99
    torch.save(d, tmp_path / "future.pt")
    for name, match in [
        ("truncated.pt", "corrupt or truncated"),
        ("garbage.pt", "corrupt or truncated"),
        ("foreign.pt", "not a lightning-eff synthetic set"),
        ("future.pt", "format version 99"),
    ]:
        with pytest.raises(ValueError, match=match):
            SyntheticSet.load(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        SyntheticSet.load(tmp_path / "missing.pt")


def test_synthetic_set_validation():
    with pytest.raises(ValueError, match="labels must have shape"):
        SyntheticSet(torch.randn(3, 1, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must be < num_classes"):
        SyntheticSet(torch.randn(2, 1, 4, 4), torch.tensor([0, 5]), metadata={"num_classes": 3})
    with pytest.raises(ValueError, match="soft_labels"):
        SyntheticSet(torch.randn(2, 1, 4, 4), torch.tensor([0, 1]), soft_labels=torch.rand(2, 5))
    with pytest.raises(ValueError, match="images must be"):
        SyntheticSet(torch.randn(2, 4, 4), torch.tensor([0, 1]))


def test_image_grid_is_denormalised_png(tmp_path):
    s = _synset()
    grid = s.to_image_grid(tmp_path / "grid.png")
    assert grid.min() >= 0 and grid.max() <= 1
    img = Image.open(tmp_path / "grid.png")
    # 3 rows (classes) x 2 columns (ipc) of 32 px tiles (8 px upscaled x4) with 2 px padding
    assert img.size == (2 + 2 * 34, 2 + 3 * 34)
    # de-normalisation: image * std + mean
    torch.testing.assert_close(s.denormalized(), (s.images * 0.2 + 0.3).clamp(0, 1))


def test_random_subset_is_real_and_seeded(digits):
    a = SyntheticSet.random_subset(digits, ipc=3, seed=1)
    b = SyntheticSet.random_subset(digits, ipc=3, seed=1)
    c = SyntheticSet.random_subset(digits, ipc=3, seed=2)
    assert a.equals(b) and not torch.equal(a.images, c.images)
    assert len(a) == 30 and a.ipc == 3 and a.metadata["method"] == "random_real"
    for img, label in zip(a.images, a.labels):
        pool = digits.class_images(int(label))
        assert (pool == img).flatten(1).all(1).any(), "every image is a real training image of its class"
    x, y = next(iter(a.dataloader(batch_size=8)))
    assert x.shape == (8, 1, 8, 8) and y.dtype == torch.long


# ---------------------------------------------------------------- losses at their minimum
def test_losses_vanish_on_identical_inputs():
    e = torch.randn(5, 7)
    assert float(mean_embedding_distance(e, e)) == 0.0
    gen = torch.Generator().manual_seed(0)
    g = [torch.randn(4, 3, 3, 3, generator=gen), torch.randn(4, generator=gen), torch.randn(10, 4, generator=gen)]
    assert float(gradient_distance(g, g)) < 1e-4  # float32 rounding of 1 - cos over 15 rows
    assert float(gradient_distance(g, g, "mse")) == 0.0
    assert float(normalized_parameter_distance(g, g, [x + 1 for x in g])) == 0.0
    assert get_loops(10) == (10, 50) and get_loops(1) == (1, 1) and get_loops(12) == (10, 50)


def test_losses_match_hand_computed_values_and_independent_references():
    # DM: squared distance of the *mean* embeddings (2 real rows vs 1 synthetic: a sum or a missing square fails)
    real, syn = torch.tensor([[1.0, 0.0], [3.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    assert float(mean_embedding_distance(real, syn)) == pytest.approx(2.0**2 + 1.0**2)
    gen = torch.Generator().manual_seed(1)
    r, s = torch.randn(6, 4, generator=gen), torch.randn(3, 4, generator=gen)
    loop = sum((sum(r[i, d] for i in range(6)) / 6 - sum(s[j, d] for j in range(3)) / 3) ** 2 for d in range(4))
    assert float(mean_embedding_distance(r, s)) == pytest.approx(float(loop), rel=1e-5)
    # its gradient pulls the synthetic mean toward the real one: a small step lowers it (sign)
    s.requires_grad_(True)
    (grad,) = torch.autograd.grad(mean_embedding_distance(r, s), s)
    torch.testing.assert_close(grad, (-2 / 3 * (r.mean(0) - s.mean(0))).expand(3, 4).detach())
    assert float(mean_embedding_distance(r, s - 0.1 * grad)) < float(mean_embedding_distance(r, s))

    # gradient matching, DC's distance: per output row 1 - cos, summed; 1-D tensors (biases) ignored
    gs = [torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]), torch.tensor([5.0, -5.0, 1.0])]
    gr = [torch.tensor([[3.0, 0.0], [1.0, 0.0], [-1.0, -1.0]]), torch.tensor([0.0, 1.0, 2.0])]
    # rows: same direction (0), orthogonal (1), opposite (2)
    assert float(gradient_distance(gs, gr)) == pytest.approx(3.0, abs=1e-5)
    assert float(gradient_distance([3 * gs[0]], [gr[0]])) == pytest.approx(3.0, abs=1e-5)  # scale-free
    conv_s, conv_r = torch.randn(4, 3, 2, 2, generator=gen), torch.randn(4, 3, 2, 2, generator=gen)
    reference = sum(1 - F.cosine_similarity(conv_s[o].flatten(), conv_r[o].flatten(), dim=0) for o in range(4))
    assert float(gradient_distance([conv_s], [conv_r])) == pytest.approx(float(reference), abs=1e-5)
    # "mse" and "cos" over all parameters, biases included
    assert float(gradient_distance(gs, gr, "mse")) == pytest.approx(
        float(sum(((a - b) ** 2).sum() for a, b in zip(gs, gr)))
    )
    flat_s, flat_r = torch.cat([g.flatten() for g in gs]), torch.cat([g.flatten() for g in gr])
    assert float(gradient_distance(gs, gr, "cos")) == pytest.approx(
        1 - float(F.cosine_similarity(flat_s, flat_r, dim=0)), abs=1e-5
    )
    # MTT eq. 3 over two parameters: (1 + 1 + 4) / (4 + 4 + 1)
    student, target, start = [torch.ones(2), torch.tensor([3.0])], [torch.zeros(2), torch.tensor([1.0])], [
        torch.full((2,), 2.0), torch.tensor([2.0])]
    assert float(normalized_parameter_distance(student, target, start)) == pytest.approx(6 / 9)


def _fit_then_identical_real(method, digits, tmp_path, monkeypatch):
    """Make the module's real batch equal its synthetic images: the matching loss must vanish."""
    module = METHODS[method](ipc=2)
    trainer(tmp_path, max_steps=1).fit(module, datamodule=digits)
    monkeypatch.setattr(module, "sample_real", lambda c, n, generator: module.syn_class(c).detach().clone())
    return module


@pytest.mark.parametrize("method", ["dm", "gm"])
def test_module_loss_is_minimal_when_synthetic_equals_real(method, digits, tmp_path, monkeypatch):
    module = _fit_then_identical_real(method, digits, tmp_path, monkeypatch)
    identical = float(module.matching_loss(module.make_step()).detach())
    monkeypatch.undo()
    if method == "gm":
        module.__dict__["_net"] = None
    with_real = float(module.matching_loss(module.make_step()).detach())
    if method == "dm":
        assert identical == 0.0
    else:  # DC's distance keeps a 1e-6 in each row's cosine denominator: ~0, not exactly 0
        assert identical < 1e-3 * with_real, (identical, with_real)


@pytest.mark.parametrize("method", ["dm", "gm"])
def test_module_loss_is_the_formula_on_fixed_batches_and_an_image_step_lowers_it(method, digits, tmp_path,
                                                                                  monkeypatch):
    """The module's loss against the formula written out with the iteration's network on fixed real batches
    (no augmentation), and the image gradient's direction: a small step against it lowers the loss."""
    module = METHODS[method](ipc=2)
    trainer(tmp_path, max_steps=1).fit(module, datamodule=digits)
    gen = torch.Generator().manual_seed(0)
    real = [module._real[c][torch.randperm(len(module._real[c]), generator=gen)[:8]] for c in range(10)]
    monkeypatch.setattr(module, "sample_real", lambda c, n, generator: real[c])
    monkeypatch.setattr(module, "augment", lambda *batches, generator: batches)
    saved = module.iteration.clone()

    def loss_and_step():
        module.iteration.copy_(saved)
        if method == "gm":
            module.__dict__["_net"] = None  # the same network is drawn again (seeded by the iteration)
        step = module.make_step()
        return module.matching_loss(step), step

    loss, step = loss_and_step()
    net, syn = step.net, module.syn_images.detach()
    expected = 0.0
    for c in range(10):
        syn_c = syn[2 * c : 2 * c + 2]
        if method == "dm":
            with torch.no_grad():
                diff = net.features(real[c]).mean(0) - net.features(syn_c).mean(0)
            expected += float((diff**2).sum())
        else:
            params = [p for p in net.parameters() if p.requires_grad]
            g_real = torch.autograd.grad(F.cross_entropy(net(real[c]), torch.full((8,), c)), params)
            g_syn = torch.autograd.grad(F.cross_entropy(net(syn_c), torch.full((2,), c)), params)
            for a, b in zip(g_syn, g_real):
                if a.ndim > 1:  # per output unit 1 - cos, the official +1e-6 in the denominator (distance_wb)
                    for o in range(a.shape[0]):
                        u, v = a[o].flatten(), b[o].flatten()
                        expected += float(1 - u.dot(v) / (u.norm() * v.norm() + 1e-6))
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    (grad,) = torch.autograd.grad(loss, module.syn_images)
    # the slope of the loss along the gradient, by central differences, is +|grad| (a sign error gives -|grad|;
    # GM's loss has kinks (ReLU, near-zero gradient rows), so the step is small: 1e-4 along the unit direction)
    x0, h, unit = module.syn_images.detach().clone(), 1e-4, grad / grad.norm()
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            module.syn_images.copy_(x0 + sign * h * unit)
        values.append(float(loss_and_step()[0]))
    assert values[1] < float(loss) < values[0]
    assert (values[0] - values[1]) / (2 * h) == pytest.approx(float(grad.norm()), rel=0.1)


def test_mtt_loss_is_zero_when_the_expert_followed_the_synthetic_set(digits, tmp_path):
    """An expert that took exactly N full-batch SGD steps on the synthetic set is matched exactly."""
    module = TrajectoryMatching(small_net(), ipc=1, expert_dir=None, num_experts=1, expert_train_epochs=1,
                                max_start_epoch=1, expert_epochs=1, syn_steps=3, lr_init=0.05)
    trainer(tmp_path, max_steps=1).fit(module, datamodule=digits)
    net = small_net()
    theta0 = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=float(module.syn_lr))
    x, y = module.syn_images.detach(), module.syn_labels
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    module._experts = [ExpertTrajectory.from_module_states(net, [theta0, [p.detach() for p in net.parameters()]])]
    assert float(module.matching_loss(module.make_step())) < 1e-8
    with torch.no_grad():
        module.syn_lr.fill_(0.0)  # the student does not move: the loss is exactly 1
    assert float(module.matching_loss(module.make_step())) == pytest.approx(1.0)


# ---------------------------------------------------------------- training, resume, errors
def _loss_at_iteration_zero(module):
    it = module.iteration.clone()
    module.iteration.zero_()
    if isinstance(module, GradientMatching):
        module.__dict__["_net"] = None
    loss = float(module.matching_loss(module.make_step()))
    module.iteration.copy_(it)
    return loss


@pytest.mark.parametrize("method", ["dm", "gm", "mtt"])
def test_short_fit_lowers_the_loss(method, digits, tmp_path):
    module = METHODS[method](ipc=2, seed=3)
    t = trainer(tmp_path, max_steps=1)
    t.fit(module, datamodule=digits)
    before = _loss_at_iteration_zero(module)
    trainer(tmp_path, max_steps=25).fit(module, datamodule=digits)
    after = _loss_at_iteration_zero(module)
    assert after < before, (before, after)
    synset = SyntheticSet.load(tmp_path / "synthetic_set.pt")
    assert synset.metadata["method"] == method and synset.ipc == 2
    assert (tmp_path / "synthetic_grid.png").exists()
    if method == "mtt":
        assert synset.lr is not None and synset.lr != 0.01


@pytest.mark.parametrize("method", ["dm", "gm", "mtt"])
def test_resume_continues_identically(method, digits, tmp_path):
    straight = METHODS[method](ipc=2)
    trainer(tmp_path / "a", max_steps=5).fit(straight, datamodule=digits)

    first = METHODS[method](ipc=2)
    t1 = trainer(tmp_path / "b", max_steps=2)
    t1.fit(first, datamodule=digits)
    t1.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = METHODS[method](ipc=2)
    trainer(tmp_path / "c", max_steps=5).fit(resumed, datamodule=digits, ckpt_path=tmp_path / "mid.ckpt")
    assert int(resumed.iteration) == int(straight.iteration) == 5
    assert torch.equal(straight.syn_images, resumed.syn_images)
    if method == "mtt":
        assert torch.equal(straight.syn_lr, resumed.syn_lr)


def test_bad_arguments(digits, tmp_path):
    with pytest.raises(ValueError, match="ipc"):
        DistributionMatching(small_net(), ipc=0)
    with pytest.raises(ValueError, match="init must be one of"):
        DistributionMatching(small_net(), init="zeros")
    with pytest.raises(FileNotFoundError, match="no synthetic set"):
        DistributionMatching(small_net(), init=str(tmp_path / "nothing.pt"))
    with pytest.raises(ValueError, match="batch_real"):
        DistributionMatching(small_net(), batch_real=0)
    with pytest.raises(ValueError, match="distance"):
        GradientMatching(small_net(), distance="l1")
    with pytest.raises(ValueError, match="last start epoch"):
        TrajectoryMatching(small_net(), expert_train_epochs=5, max_start_epoch=5, expert_epochs=2)
    # image size mismatch between the network and the DataModule
    wrong = DistributionMatching(small_net(size=16), ipc=1)
    with pytest.raises(ValueError, match="does not accept the DataModule's images"):
        trainer(tmp_path, max_steps=1).fit(wrong, datamodule=digits)
    # a saved set of another shape as init
    SyntheticSet(torch.randn(10, 1, 16, 16), torch.arange(10), metadata={"num_classes": 10}).save(tmp_path / "s16.pt")
    bad_init = DistributionMatching(small_net(), ipc=1, init=str(tmp_path / "s16.pt"))
    with pytest.raises(ValueError, match="holds images of shape"):
        trainer(tmp_path, max_steps=1).fit(bad_init, datamodule=digits)


def test_init_from_a_saved_set_continues_it(digits, tmp_path):
    start = SyntheticSet.random_subset(digits, ipc=1, seed=5)
    start.save(tmp_path / "start.pt")
    module = DistributionMatching(small_net(), ipc=1, batch_real=16, init=str(tmp_path / "start.pt"))
    trainer(tmp_path, max_steps=1).fit(module, datamodule=digits)
    assert not torch.equal(module.syn_images.detach(), start.images)
    assert (module.syn_images.detach() - start.images).abs().max() < 5  # one step away from it


def test_image_optimizer_can_be_ko(digits, tmp_path):
    from functools import partial

    from lightning_eff.optim import KO

    module = DistributionMatching(small_net(), ipc=2, batch_real=16, image_optimizer=partial(KO, lr=0.05))
    t = trainer(tmp_path, max_steps=2)
    t.fit(module, datamodule=digits)
    assert isinstance(t.optimizers[0], KO) and int(module.iteration) == 2


# ---------------------------------------------------------------- experts
def test_expert_trajectories_round_trip_and_recorder(digits, tmp_path):
    experts = train_experts(digits, small_net(), num_experts=2, epochs=2, save_dir=tmp_path / "experts")
    assert len(experts) == 2 and len(experts[0]) == 3
    loaded = ExpertTrajectory.load(tmp_path / "experts" / "expert_0000.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.epochs, experts[0].epochs))
    assert not torch.equal(experts[0].epochs[0], experts[1].epochs[0])  # different initialisations
    (tmp_path / "bad.pt").write_bytes(b"not a trajectory")
    with pytest.raises(ValueError, match="not a readable expert trajectory"):
        ExpertTrajectory.load(tmp_path / "bad.pt")

    # the recorder on an ordinary classification run
    rec_dir = tmp_path / "recorded"
    clf = ImageClassifier(small_net(), optimizer=torch.optim.SGD)
    trainer(tmp_path, max_epochs=2, max_steps=-1, limit_train_batches=3, limit_val_batches=1,
            callbacks=[ExpertTrajectoryRecorder(str(rec_dir))]).fit(clf, datamodule=digits)
    rec = ExpertTrajectory.load(rec_dir / "expert_0000.pt")
    assert len(rec) == 3
    rec.check_compatible(small_net())
    with pytest.raises(ValueError, match="does not match"):
        rec.check_compatible(small_net(width=8))
    # MTT distills from the recorded folder
    module = TrajectoryMatching(small_net(), ipc=1, expert_dir=str(rec_dir), max_start_epoch=1, expert_epochs=1,
                                syn_steps=2)
    trainer(tmp_path, max_steps=2).fit(module, datamodule=digits)
    assert int(module.iteration) == 2


# ---------------------------------------------------------------- DDP
class _DDPDM(DistributionMatching):
    def __init__(self, out):
        super().__init__(small_net(), ipc=2, batch_real=16)
        self.out = out

    def on_train_end(self):
        gathered = self.all_gather(self.syn_images.detach())
        if self.global_rank == 0:
            torch.save(gathered, self.out)


@pytest.mark.timeout(300)
def test_ddp_keeps_the_synthetic_set_identical(tmp_path):
    out = tmp_path / "syn.pt"
    dm = DigitsDataModule(image_size=8)
    trainer(tmp_path, max_steps=3, strategy="ddp_spawn", devices=2).fit(_DDPDM(str(out)), datamodule=dm)
    gathered = torch.load(out)
    assert gathered.shape[0] == 2 and torch.equal(gathered[0], gathered[1])
    dm.setup("fit")
    init = SyntheticSet.from_real(dm, 2, seed=0).images
    assert not torch.equal(gathered[0], init)


# ---------------------------------------------------------------- CLI
DISTILL_CONFIGS = sorted((ROOT / "configs" / "distill").glob("*digits*.yaml"))


@pytest.mark.parametrize("path", [p for p in DISTILL_CONFIGS if "experts" not in p.name], ids=lambda p: p.name)
def test_distill_configs_fit_through_the_cli(path, tmp_path, monkeypatch):
    from lightning_eff.cli import LightningEffCLI

    monkeypatch.setattr(sys, "argv", ["lightning-eff"])
    overrides = [
        "--trainer.max_steps=2",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.init_args.save_dir={tmp_path}",
    ]
    text = path.read_text()
    if "TrajectoryMatching" in text:
        overrides += ["--model.init_args.num_experts=1", "--model.init_args.expert_train_epochs=3",
                      "--model.init_args.max_start_epoch=1", "--model.init_args.syn_steps=2"]
    if "GradientMatching" in text:
        overrides += ["--model.init_args.inner_loop=2"]
    if "batch_real" in text and "StaticSet" not in text:
        overrides += ["--model.init_args.batch_real=16"]
    if "distill.SDC" in text:  # SDC trains its networks on the real data first (2 x 20 epochs in the config)
        overrides += ["--model.init_args.plugins.init_args.train_epochs=1"]
    if "ncfm.NCFM" in text:
        overrides += ["--model.init_args.num_feature_nets=1", "--model.init_args.pretrain.epochs=1",
                      "--model.init_args.num_freqs=64"]
    LightningEffCLI(args=["fit", "--config", str(path), *overrides])
    synset = SyntheticSet.load(tmp_path / "synthetic_set.pt")
    assert synset.metadata["iterations"] == 2


# ---------------------------------------------------------------- reference networks (issue 21's move)
def test_reference_training_has_one_home_and_the_old_paths_still_work():
    import lightning_eff.distill as distill
    import lightning_eff.distill.base as base
    import lightning_eff.distill.mtt as mtt
    import lightning_eff.distill.reference as reference

    assert base.reinitialized is reference.reinitialized is distill.reinitialized
    assert base.train_reference_networks is reference.train_reference_networks
    for name in ("ExpertTrajectory", "ExpertTrajectoryRecorder", "train_experts", "load_experts"):
        assert getattr(mtt, name) is getattr(reference, name) is getattr(distill, name)


def test_an_expert_trajectory_saved_before_the_move_loads():
    """tests/fixtures/expert_trajectory_v1.pt was written by the former ``mtt.ExpertTrajectory.save``
    (a seeded Linear(3, 2) at epoch 0, its parameters + 1 at epoch 1)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 2)
    expert = ExpertTrajectory.load(Path(__file__).resolve().parent / "fixtures" / "expert_trajectory_v1.pt")
    expert.check_compatible(net)
    assert len(expert) == 2 and expert.metadata["lr"] == 0.01 and expert.metadata["net"] is None
    for epoch, shift in ((0, 0.0), (1, 1.0)):
        state = expert.unflatten(expert.epochs[epoch])
        for name, p in net.named_parameters():
            assert torch.equal(state[name], p.detach() + shift)
