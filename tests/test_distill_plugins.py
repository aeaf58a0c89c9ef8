"""SDC and DRUPI: the plug-ins that ride on every distillation method."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import digits_fixture
from torch import nn

from lightning_eff.data import DigitsDataModule
from lightning_eff.distill import (
    DRUPI,
    SDC,
    DistributionMatching,
    GradientMatching,
    StaticSet,
    SyntheticSet,
    TrajectoryMatching,
    evaluate_synthetic,
    sample_difficulty,
)
from lightning_eff.distill.base import DistillStep
from lightning_eff.models import MLP, ConvNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distill import METHODS, small_net, trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


digits = digits_fixture(8)


# ---------------------------------------------------------------- sample_difficulty
def _loop_difficulty(net, images, labels, create_graph):
    out = []
    params = list(net.parameters())
    for x, y in zip(images, labels):
        grads = torch.autograd.grad(F.cross_entropy(net(x[None]), y[None]), params, create_graph=create_graph)
        out.append(torch.sqrt(sum(g.square().sum() for g in grads)))
    return torch.stack(out)


@pytest.mark.parametrize(
    "net",
    [small_net(width=8), MLP(in_channels=1, image_size=8, num_classes=10, hidden_sizes=(16,))],
    ids=["convnet", "mlp"],
)
def test_sample_difficulty_matches_a_per_sample_loop(net):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    fast = sample_difficulty(net, x, y)
    assert not fast.requires_grad
    torch.testing.assert_close(fast, _loop_difficulty(net, x, y, False), rtol=1e-4, atol=1e-6)
    # differentiable w.r.t. the images: the same input gradient as the double-backward loop
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(sample_difficulty(net, xa, y, chunk_size=4).sum(), xa)
    (gb,) = torch.autograd.grad(_loop_difficulty(net, xb, y, True).sum(), xb)
    torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-6)


def test_sample_difficulty_with_batchnorm_uses_running_stats_and_restores_the_mode():
    net = ConvNet(in_channels=1, num_classes=10, width=8, depth=2, image_size=8, norm="batch").train()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    d = sample_difficulty(net, x, y)
    assert net.training and d.shape == (4,) and torch.isfinite(d).all()
    net.eval()
    torch.testing.assert_close(d, _loop_difficulty(net, x, y, False), rtol=1e-4, atol=1e-6)


def test_sample_difficulty_bad_inputs():
    net = MLP(in_channels=1, image_size=2, num_classes=3, hidden_sizes=(8,))
    with pytest.raises(ValueError, match="must be"):
        sample_difficulty(net, torch.randn(3, 1, 2, 2), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="nn.Module"):
        sample_difficulty(lambda x: x, torch.randn(3, 1, 2, 2), torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------- SDC
def test_sdc_arguments_and_default_weight():
    assert SDC.default_weight(1) > SDC.default_weight(10) > SDC.default_weight(50)
    assert SDC.default_weight(1, "real") > SDC.default_weight(10, "real")
    for kwargs, match in [
        ({"weight": -0.1}, "weight"),
        ({"mode": "both"}, "mode"),
        ({"schedule": "step"}, "schedule"),
        ({"network": "expert"}, "network"),
        ({"mode": "real", "network": "method"}, "trained"),
        ({"num_nets": 0}, "num_nets"),
        ({"batch_syn": 0}, "batch_syn"),
    ]:
        with pytest.raises(ValueError, match=match):
            SDC(**kwargs)
    sdc = SDC(weight=0.2, schedule="cosine_decay")
    sdc._max_steps = 10
    assert [round(sdc.weight_at(i), 6) for i in (0, 5, 10)] == [0.2, 0.1, 0.0]
    sdc.schedule = "linear_warmup"
    assert sdc.weight_at(5) == pytest.approx(0.1)


def test_sdc_at_weight_zero_leaves_the_run_identical(digits, tmp_path):
    def run(plugins):
        m = GradientMatching(
            small_net(),
            ipc=2,
            batch_real=16,
            outer_loop=3,
            inner_loop=1,
            plugins=plugins,
            save_dir=str(tmp_path),
        )
        trainer(tmp_path, max_steps=3).fit(m, datamodule=digits)
        return m.syn_images.detach().clone()

    plain = run([])
    assert torch.equal(plain, run([SDC(weight=0.0)]))
    assert not torch.equal(plain, run([SDC(weight=1.0, num_nets=1, train_epochs=1)]))


def test_sdc_lowers_the_difficulty_of_the_synthetic_samples(digits, tmp_path):
    def run(weight):
        sdc = SDC(weight=weight, num_nets=2, train_epochs=30, net_lr=0.1, seed=1)
        m = DistributionMatching(
            small_net(),
            ipc=2,
            batch_real=16,
            plugins=[sdc],
            save_dir=str(tmp_path),
            image_optimizer=lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.5),
        )
        trainer(tmp_path, max_steps=8).fit(m, datamodule=digits)
        return m

    reference = run(10.0)
    nets = reference.plugins[0]._nets
    init = SyntheticSet.from_real(digits, 2, seed=0)

    def difficulty(images):
        return torch.stack([sample_difficulty(n.cpu(), images, init.labels) for n in nets]).mean().item()

    baseline = run(0.0)
    before = difficulty(init.images)
    with_sdc, without = (
        difficulty(reference.syn_images.detach().cpu()),
        difficulty(baseline.syn_images.detach().cpu()),
    )
    assert with_sdc < 0.8 * before and with_sdc < 0.8 * without, (before, without, with_sdc)


def test_sdc_real_mode_prefers_easy_real_images(digits, tmp_path):
    sdc = SDC(weight=2.0, mode="real", num_nets=1, train_epochs=2)
    m = DistributionMatching(small_net(), ipc=1, batch_real=16, plugins=[sdc], save_dir=str(tmp_path))
    trainer(tmp_path, max_steps=1).fit(m, datamodule=digits)
    d = sdc._difficulty[3]
    w = sdc.real_sample_weights(m, 3, m._real[3])
    assert w.shape == d.shape and torch.isclose(w.sum(), torch.tensor(1.0))
    assert w[d.argmin()] > w[d.argmax()] and w.argmax() == d.argmin()
    # the draw follows the weights: easy samples are over-represented in real batches
    gen = torch.Generator().manual_seed(0)
    drawn = torch.cat([torch.multinomial(w, 16, generator=gen) for _ in range(200)])
    assert d[drawn].mean() < d.mean()
    sdc.weight = 0.0
    assert sdc.real_sample_weights(m, 3, m._real[3]) is None


def test_sdc_network_method_uses_the_iteration_network(digits, tmp_path, monkeypatch):
    # MTT's network of the iteration is the student at the expert's start epoch: the penalty must be
    # measured with exactly those weights (not a trained reference net, a fresh net, the unrolled
    # student, nor the expert at the target epoch)
    import lightning_eff.distill.sdc as sdc_module

    seen = []

    def spy(model, images, labels, **kw):
        seen.append(torch.cat([p.detach().flatten().cpu() for p in model.parameters()]))
        return sample_difficulty(model, images, labels, **kw)

    monkeypatch.setattr(sdc_module, "sample_difficulty", spy)
    sdc = SDC(weight=0.1, network="method")
    m = TrajectoryMatching(
        small_net(), ipc=1, num_experts=1, expert_train_epochs=3, max_start_epoch=2, expert_epochs=1, syn_steps=2,
        plugins=[sdc], save_dir=str(tmp_path),
    )
    starts = []
    matching_loss = m.matching_loss

    def record(step):
        loss = matching_loss(step)
        starts.append(int(step.logs["start_epoch"]))
        return loss

    m.matching_loss = record
    trainer(tmp_path, max_steps=3).fit(m, datamodule=digits)
    assert sdc._nets is None  # nothing trained for SDC
    assert len(seen) == len(starts) == 3
    (expert,) = m._experts
    for params, start in zip(seen, starts):
        torch.testing.assert_close(params, expert.epochs[start].float(), rtol=0, atol=0)
        assert not torch.equal(params, expert.epochs[start + 1].float())


# ---------------------------------------------------------------- DRUPI
def test_drupi_arguments():
    for kwargs, match in [
        ({"weight": -1.0}, "weight"),
        ({"kind": "logits"}, "kind"),
        ({"pooling": "sum"}, "pooling"),
        ({"init": "teacher"}, "init"),
        ({"lr": 0}, "lr"),
        ({"class_weight": 0.1, "kind": "attention"}, "feature"),
        ({"layer": ""}, "layer"),
        ({"outer_loop": 0}, "outer_loop"),
    ]:
        with pytest.raises(ValueError, match=match):
            DRUPI(**kwargs)
    with pytest.raises(ValueError, match="plug-in"):
        StaticSet(small_net(), ipc=1)


def test_drupi_unknown_layer_is_a_clear_error(digits, tmp_path):
    m = StaticSet(small_net(), ipc=1, plugins=[DRUPI(layer="encoder.99")], save_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"layer.*encoder\.99.*no such submodule"):
        trainer(tmp_path, max_steps=1).fit(m, datamodule=digits)
    m = StaticSet(small_net(), ipc=1, plugins=[DRUPI(layer="classifier")], save_dir=str(tmp_path))
    with pytest.raises(ValueError, match="feature map"):
        trainer(tmp_path, max_steps=1).fit(m, datamodule=digits)


@pytest.mark.parametrize(
    ("kind", "pooling", "shape"), [("feature", "avg", (16, 2, 2)), ("attention", "max", (16,))]
)
def test_drupi_on_fixed_images_learns_labels_of_the_layer_shape(kind, pooling, shape, digits, tmp_path):
    # the direction and per-class window of F's update: test_drupi_step_descends_its_matching_loss_...
    source = SyntheticSet.random_subset(digits, 2, seed=3)
    source.metadata["method"] = "dm"
    path = source.save(tmp_path / "dm.pt")
    drupi = DRUPI(kind=kind, pooling=pooling, weight=0.1, batch_real=32, outer_loop=2, inner_loop=1)
    m = StaticSet(small_net(), ipc=2, init=str(path), plugins=[drupi], save_dir=str(tmp_path / "out"))
    trainer(tmp_path, max_steps=3).fit(m, datamodule=digits)
    assert torch.equal(m.syn_images.detach(), source.images)  # images fixed
    # F starts as the features of a net trained one epoch and moves under the matching loss
    initial = drupi.initial_labels(m, shape, digits)
    assert drupi.F.shape == (20, *shape) and not torch.allclose(drupi.F.detach(), initial)
    saved = SyntheticSet.load(tmp_path / "out" / "synthetic_set.pt")
    assert saved.metadata["method"] == "dm+drupi" and saved.metadata["source"]["source"] == str(path)
    assert saved.metadata["privileged"] == {
        "kind": kind,
        "pooling": pooling,
        "layer": "encoder",
        "weight": 0.1,
        "init": "pretrained",
        "learned": True,
        "iterations": 3,
    }
    torch.testing.assert_close(saved.privileged, drupi.F.detach())
    # storage: the labels are counted; IPC 2 with attention labels still costs less than IPC 3
    assert saved.storage()["privileged"] == drupi.F.numel() * 4
    if kind == "attention":
        assert saved.nbytes < SyntheticSet.random_subset(digits, 3, seed=0).nbytes


def test_drupi_step_descends_its_matching_loss_on_the_rows_of_each_class(digits, tmp_path):
    # one SGD step on F (outer_loop 1: the network of iteration 0 is re-drawn identically, no inner training)
    source = SyntheticSet.random_subset(digits, 2, seed=3)
    path = source.save(tmp_path / "real.pt")
    lr = 0.05
    drupi = DRUPI(kind="attention", weight=1.0, batch_real=32, outer_loop=1, inner_loop=1, lr=lr, momentum=0.0)
    m = StaticSet(small_net(), ipc=2, init=str(path), plugins=[drupi], save_dir=str(tmp_path / "out"))
    trainer(tmp_path, max_steps=1).fit(m, datamodule=digits)
    after = drupi.F.detach().clone()
    before = drupi.initial_labels(m, (16,), digits)
    step = DistillStep(iteration=0, shared=torch.Generator(), local=torch.Generator())

    def loss_and_grad(labels):
        with torch.no_grad():
            drupi.F.copy_(labels)
        loss = drupi.extra_loss(m, step)
        (grad,) = torch.autograd.grad(loss, drupi.F)
        return loss.item(), grad

    loss0, grad0 = loss_and_grad(before)
    loss1, _ = loss_and_grad(after)
    assert loss1 >= 0  # a gradient distance (DC's 1 - cos per output unit) and a squared error
    # the update is the SGD step down the gradient (a sign error or a frozen F fails) and it lowers the loss
    torch.testing.assert_close(after, before - lr * grad0, rtol=1e-4, atol=1e-6)
    assert grad0.abs().sum() > 0 and loss1 < loss0, (loss0, loss1)
    # each class's labels are matched on that class's images only: changing the images of class 3 (rows 6, 7)
    # changes the gradient of rows 6 and 7 and of no other row (a shifted class window fails)
    with torch.no_grad():
        m.syn_images[6:8] += torch.randn_like(m.syn_images[6:8])
    _, grad_moved = loss_and_grad(before)
    changed = (grad_moved != grad0).any(dim=1)
    assert changed.nonzero().flatten().tolist() == [6, 7]


def test_drupi_baseline_inits(digits, tmp_path):
    m = StaticSet(small_net(), ipc=2, plugins=[DRUPI(kind="attention", learn=False)], save_dir=str(tmp_path))
    trainer(tmp_path, max_steps=1).fit(m, datamodule=digits)
    pretrained = m.plugins[0].F.detach()
    class_mean = DRUPI(kind="attention", init="class_mean").initial_labels(m, (16,), digits)
    random = DRUPI(kind="attention", init="random").initial_labels(m, (16,), digits)
    assert torch.equal(class_mean[0], class_mean[1]) and not torch.equal(class_mean[0], class_mean[2])
    assert not torch.equal(pretrained[0], pretrained[1])
    assert abs(random.std() - pretrained.std()) < 0.5 * pretrained.std()
    assert m.synthetic_set().metadata["method"] == "random_real+drupi"


def test_student_loss_uses_the_privileged_labels(digits):
    base = SyntheticSet.random_subset(digits, 1, seed=0)
    feats = torch.randn(10, 16)
    kw = dict(num_students=1, epochs=3, lr=0.01, device="cpu", net=small_net(), vectorize=False)
    with_f = SyntheticSet(
        base.images,
        base.labels,
        privileged=feats,
        metadata={
            **base.metadata,
            "privileged": {"kind": "attention", "pooling": "avg", "layer": "encoder", "weight": 1.0},
        },
    )
    a = evaluate_synthetic(base, digits, **kw, return_students=True)
    b = evaluate_synthetic(with_f, digits, **kw, return_students=True)
    assert b.protocol["privileged"] == {"kind": "attention", "pooling": "avg", "layer": "encoder"}
    assert b.protocol["privileged_weight"] == 1.0 and a.protocol["privileged"] is None
    pa, pb = (torch.cat([p.flatten() for p in r.students[0].parameters()]) for r in (a, b))
    assert not torch.allclose(pa, pb)  # same seeds; only the privileged term differs
    with pytest.raises(ValueError, match="values per image"):
        bad = SyntheticSet(base.images, base.labels, privileged=torch.randn(10, 7), metadata=with_f.metadata)
        evaluate_synthetic(bad, digits, **kw)


def test_drupi_resumes_from_a_checkpoint(digits, tmp_path):
    def make():
        return StaticSet(
            small_net(),
            ipc=1,
            plugins=[DRUPI(kind="attention", batch_real=16, outer_loop=2, inner_loop=1)],
            save_dir=str(tmp_path),
        )

    full = make()
    trainer(tmp_path, max_steps=4).fit(full, datamodule=digits)
    first = make()
    t = trainer(tmp_path, max_steps=2)
    t.fit(first, datamodule=digits)
    ckpt = tmp_path / "half.ckpt"
    t.save_checkpoint(ckpt)
    resumed = make()
    trainer(tmp_path, max_steps=4).fit(resumed, datamodule=digits, ckpt_path=str(ckpt))
    torch.testing.assert_close(resumed.plugins[0].F, full.plugins[0].F)


# ---------------------------------------------------------------- through the CLI, on every method
CLI_METHODS = {
    "dm": "dm_digits_ipc1.yaml",
    "gm": "gm_digits_ipc1.yaml",
    "mtt": "mtt_digits_ipc1.yaml",
    "ncfm": "ncfm_digits_ipc1.yaml",
}
FAST = {
    "dm": ["--model.init_args.batch_real=16"],
    "gm": ["--model.init_args.batch_real=16", "--model.init_args.inner_loop=1"],
    "mtt": [
        "--model.init_args.num_experts=1",
        "--model.init_args.expert_train_epochs=3",
        "--model.init_args.max_start_epoch=1",
        "--model.init_args.syn_steps=2",
    ],
    "ncfm": [
        "--model.init_args.batch_real=16",
        "--model.init_args.num_feature_nets=1",
        "--model.init_args.pretrain.epochs=1",
        "--model.init_args.num_freqs=64",
    ],
}


@pytest.mark.parametrize("method", list(CLI_METHODS))
def test_both_plugins_compose_with_every_method_through_the_cli(method, tmp_path, monkeypatch):
    from lightning_eff.cli import LightningEffCLI

    monkeypatch.setattr(sys, "argv", ["lightning-eff"])
    config = tmp_path / "plugins.yaml"
    config.write_text(
        "model:\n  init_args:\n    plugins:\n"
        "      - class_path: SDC\n        init_args: {weight: 0.01, num_nets: 1, train_epochs: 1}\n"
        "      - class_path: DRUPI\n"
        "        init_args: {kind: attention, weight: 0.01, batch_real: 16, inner_loop: 1}\n"
    )
    LightningEffCLI(
        args=[
            "fit",
            "--config",
            str(ROOT / "configs" / "distill" / CLI_METHODS[method]),
            "--config",
            str(config),
            "--trainer.max_steps=2",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--model.init_args.save_dir={tmp_path}",
            *FAST[method],
        ]
    )
    synset = SyntheticSet.load(tmp_path / "synthetic_set.pt")
    assert synset.metadata["method"] == f"{method}+drupi"
    assert synset.privileged is not None and synset.privileged.shape[0] == len(synset)


def test_plugins_from_the_command_line(tmp_path, monkeypatch):
    from lightning_eff.cli import LightningEffCLI

    monkeypatch.setattr(sys, "argv", ["lightning-eff"])
    cli = LightningEffCLI(
        args=[
            "fit",
            "--config",
            str(ROOT / "configs" / "distill" / "dm_digits_ipc1.yaml"),
            "--model.plugins+=SDC",
            "--model.plugins.weight=0.5",
            "--model.plugins.mode=real",
            "--model.plugins.num_nets=1",
            "--model.plugins.train_epochs=1",
            "--trainer.max_steps=1",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--model.init_args.save_dir={tmp_path}",
            "--model.init_args.batch_real=16",
        ]
    )
    (plugin,) = cli.model.plugins
    assert isinstance(plugin, SDC) and plugin.weight == 0.5 and plugin.mode == "real"
    # the draw the module makes is biased toward the easy images of each class: under p ~ exp(-0.5 z) the
    # mean standardised difficulty of a drawn image is about -0.4 (a no-op gives 0, a sign error +0.4)
    model, gen = cli.model, torch.Generator().manual_seed(0)
    drawn_z = []
    for c in range(10):
        d = plugin._difficulty[c]
        assert d.shape == (model._real[c].shape[0],)
        z = (d - d.mean()) / d.std()
        rows = {tuple(x.flatten().tolist()): i for i, x in enumerate(model._real[c])}
        for _ in range(20):
            drawn = model.sample_real(c, 16, gen)
            drawn_z.append(z[[rows[tuple(x.flatten().tolist())] for x in drawn.cpu()]])
    mean_z = torch.cat(drawn_z).mean().item()
    assert mean_z < -0.25, mean_z


def test_sdc_real_mode_refuses_to_be_a_silent_no_op(digits, tmp_path):
    # digits have 121-128 training images per class: a draw of >= 128 takes every image of every class
    sdc = SDC(weight=1.0, mode="real", num_nets=1, train_epochs=1)
    m = DistributionMatching(small_net(), ipc=1, batch_real=128, plugins=[sdc], save_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"batch_real=128.*121-128"):
        trainer(tmp_path, max_steps=1).fit(m, datamodule=digits)
    assert sdc._nets is None  # refused before training anything
    # trajectory matching draws no real images at all
    m = METHODS["mtt"](ipc=1, plugins=[SDC(weight=1.0, mode="real")], save_dir=str(tmp_path))
    with pytest.raises(ValueError, match="does not apply to TrajectoryMatching"):
        trainer(tmp_path, max_steps=1).fit(m, datamodule=digits)
    # a draw that covers only the smaller classes warns; weight 0 (the method alone) is not checked
    sdc = SDC(weight=1.0, mode="real", num_nets=1, train_epochs=1)
    m = DistributionMatching(small_net(), ipc=1, batch_real=125, plugins=[sdc], save_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"leaves 4 of 10 classes unchanged"):
        trainer(tmp_path, max_steps=1).fit(m, datamodule=digits)
    m = DistributionMatching(small_net(), ipc=1, batch_real=128, plugins=[SDC(weight=0.0, mode="real")],
                             save_dir=str(tmp_path))
    trainer(tmp_path, max_steps=1).fit(m, datamodule=digits)


def test_static_set_keeps_the_method_of_a_learning_free_plugin_list_clear():
    with pytest.raises(ValueError, match="noise"):
        StaticSet(small_net(), ipc=1, init="noise", plugins=[DRUPI()])
    assert isinstance(DRUPI(), nn.Module)


# ---------------------------------------------------------------- DDP
class _DDPGM(GradientMatching):
    """GM + SDC + DRUPI under 2-process DDP: gathers the images and F of every rank at the end."""

    def __init__(self, out):
        super().__init__(
            small_net(),
            ipc=1,
            batch_real=16,
            outer_loop=2,
            inner_loop=1,
            plugins=[SDC(weight=0.1, num_nets=1, train_epochs=2), DRUPI(kind="attention", batch_real=16)],
        )
        self.out = out

    def on_train_end(self):
        images = self.all_gather(self.syn_images.detach())
        labels = self.all_gather(self.plugins[1].F.detach())
        if self.global_rank == 0:
            torch.save({"images": images, "F": labels}, self.out)


@pytest.mark.timeout(300)
def test_ddp_keeps_images_and_privileged_labels_identical(tmp_path):
    out = tmp_path / "ddp.pt"
    dm = DigitsDataModule(image_size=8)
    trainer(tmp_path, max_steps=3, strategy="ddp_spawn", devices=2).fit(_DDPGM(str(out)), datamodule=dm)
    gathered = torch.load(out)
    assert torch.equal(gathered["images"][0], gathered["images"][1])
    assert torch.equal(gathered["F"][0], gathered["F"][1])
