"""NCFM: the discrepancy against a direct complex computation, the minmax (psi ascends, images descend),
multi-formation, feature networks, the module (fit, resume, DDP, CLI, plug-ins) and its errors."""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_trainer, digits_fixture, tiny_convnet

from lightning_eff.data import DigitsDataModule
from lightning_eff.distill import DistillPlugin, SyntheticSet, evaluate_synthetic
from lightning_eff.distill.ncfm import (
    NCFM,
    FeatureNetPretraining,
    FeatureNetworks,
    SamplingNet,
    ascent_gradient,
    characteristic_function,
    decode_multi_formation,
    ncfd,
    pack_multi_formation,
    pretrain_feature_networks,
)
from lightning_eff.models import ConvNet

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fixtures
digits = digits_fixture(16)


def tiny_net(width: int = 8):
    return tiny_convnet(16, width, depth=2)


@pytest.fixture(scope="module")
def feature_file(digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("features") / "feature_networks.pt"
    pretrain_feature_networks(digits, tiny_net(), num_nets=2, epochs=2, seed=0, save_path=path)
    return path


def make(feature_file, **kw):
    kw.setdefault("ipc", 1)
    kw.setdefault("batch_real", 16)
    kw.setdefault("num_freqs", 64)
    kw.setdefault("num_feature_nets", 2)
    return NCFM(tiny_net(), feature_nets_path=str(feature_file), **kw)


def trainer(tmp_path, **kw):
    return cpu_trainer(tmp_path, **{"max_steps": 2, **kw})


def loss_at(module, iteration):
    """The matching loss of ``iteration`` (same draws every call) with the module's current state."""
    saved = module.iteration.clone()
    module.iteration.fill_(iteration)
    step = module.make_step()
    with torch.no_grad():
        loss = float(module.matching_loss(step))
    module.iteration.copy_(saved)
    return loss, step


# ---------------------------------------------------------------- the discrepancy
def _direct_ncfd(real, syn, t, alpha):
    """NCFM eq. 7 with complex numbers: amplitudes and the phase difference from the complex CFs."""
    phi_r = torch.exp(1j * (t @ real.T)).mean(1)
    phi_s = torch.exp(1j * (t @ syn.T)).mean(1)
    a_r, a_s = phi_r.abs(), phi_s.abs()
    dtheta = torch.angle(phi_r) - torch.angle(phi_s)
    integrand = alpha * (a_r - a_s) ** 2 + (1 - alpha) * 2 * a_r * a_s * (1 - torch.cos(dtheta))
    return integrand.clamp_min(0).sqrt().mean()


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_ncfd_matches_a_direct_complex_computation(alpha):
    g = torch.Generator().manual_seed(1)
    real = F.normalize(torch.randn(40, 6, generator=g, dtype=torch.float64), dim=1)
    syn = F.normalize(torch.randn(7, 6, generator=g, dtype=torch.float64), dim=1)
    t = torch.randn(100, 6, generator=g, dtype=torch.float64) * 3
    expected = _direct_ncfd(real, syn, t, alpha)
    torch.testing.assert_close(ncfd(real, syn, t, alpha), expected, rtol=1e-9, atol=1e-9)


def test_ncfd_alpha_half_is_the_mean_complex_distance_over_sqrt2():
    g = torch.Generator().manual_seed(2)
    real, syn, t = torch.randn(30, 5, generator=g), torch.randn(4, 5, generator=g), torch.randn(64, 5, generator=g)
    phi_r = torch.exp(1j * (t @ real.T).double()).mean(1)
    phi_s = torch.exp(1j * (t @ syn.T).double()).mean(1)
    expected = (phi_r - phi_s).abs().mean() / math.sqrt(2)
    assert float(ncfd(real, syn, t, 0.5)) == pytest.approx(float(expected), rel=1e-5)
    # and the characteristic function itself
    re, im = characteristic_function(real, t)
    torch.testing.assert_close(torch.complex(re, im).to(torch.complex128), phi_r, rtol=1e-5, atol=1e-6)


def test_ncfd_is_zero_with_zero_gradient_for_identical_sets():
    f = torch.randn(9, 4, requires_grad=True)
    t = torch.randn(50, 4)
    loss = ncfd(f.detach(), f, t)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.isfinite(f.grad).all() and float(f.grad.abs().max()) == 0.0
    # a different set is strictly positive, and the gradient then points somewhere
    g = torch.randn(3, 4, requires_grad=True)
    d = ncfd(f.detach(), g, t)
    d.backward()
    assert float(d) > 0 and float(g.grad.abs().max()) > 0


def test_ncfd_rejects_bad_inputs():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        ncfd(torch.randn(3, 4), torch.randn(3, 5), torch.randn(2, 4))
    with pytest.raises(ValueError, match="2-D"):
        ncfd(torch.randn(3), torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="alpha"):
        ncfd(torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 4), alpha=1.5)


# ---------------------------------------------------------------- psi and the minmax
def test_sampling_net_shapes_repeats_and_errors():
    psi = SamplingNet(feature_dim=6, num_freqs=70, repeat=16)
    t = psi(generator=torch.Generator().manual_seed(0))
    assert t.shape == (70, 6) and psi.num_rows == 5
    torch.testing.assert_close(t[:5], t[5:10])  # each row repeated (mixture components)
    assert float(t.abs().max()) <= 1.0  # Tanh output
    a = psi(generator=torch.Generator().manual_seed(3))
    b = psi(generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="fewer than 2 noise rows"):
        SamplingNet(feature_dim=4, num_freqs=16, repeat=16)
    with pytest.raises(ValueError, match="feature_dim"):
        SamplingNet(feature_dim=0)


def _minmax_setup():
    torch.manual_seed(0)
    psi = SamplingNet(feature_dim=5, num_freqs=128, repeat=4)
    real = F.normalize(torch.randn(64, 5), dim=1)
    syn = torch.nn.Parameter(torch.randn(6, 5))
    noise = torch.randn(psi.num_rows, 5)

    def loss_fn(reverse=True):
        t = psi(noise=noise)
        return 300 * ncfd(real, F.normalize(syn, dim=1), ascent_gradient(t) if reverse else t)

    return psi, syn, loss_fn


def test_one_backward_ascends_psi_and_descends_the_images():
    psi, syn, loss_fn = _minmax_setup()
    opt_psi = torch.optim.SGD(psi.parameters(), lr=1e-3)
    opt_img = torch.optim.SGD([syn], lr=1e-3)
    before = float(loss_fn())
    psi_before, syn_before = copy.deepcopy(psi.state_dict()), syn.detach().clone()
    loss = loss_fn()
    loss.backward()
    # psi's gradient is exactly minus the true one
    psi2, syn2, loss_fn2 = _minmax_setup()
    true = torch.autograd.grad(loss_fn2(reverse=False), list(psi2.parameters()))
    for p, g in zip(psi.parameters(), true):
        torch.testing.assert_close(p.grad, -g)
    opt_psi.step()
    opt_img.step()
    psi_after, syn_after = copy.deepcopy(psi.state_dict()), syn.detach().clone()
    with torch.no_grad():
        syn.copy_(syn_before)
        raised = float(loss_fn())  # psi stepped, images not
        psi.load_state_dict(psi_before)
        syn.copy_(syn_after)
        lowered = float(loss_fn())  # images stepped, psi not
    assert raised > before > lowered, (raised, before, lowered)
    assert psi_after["layers.0.weight"].ne(psi_before["layers.0.weight"]).any()


def test_the_official_two_backward_scheme_leaves_psi_untrained(digits, feature_file, tmp_path, monkeypatch):
    """The official defect (issues #3, #14): loss.backward(); (-loss).backward() gives psi no gradient; the
    module's one backward gives psi exactly minus the true gradient of its loss (and the images plus it)."""
    psi, syn, loss_fn = _minmax_setup()
    loss = loss_fn(reverse=False)
    loss.backward(retain_graph=True)
    (-loss).backward()
    assert all(float(p.grad.abs().max()) == 0.0 for p in psi.parameters())

    import lightning_eff.distill.ncfm.module as ncfm_module  # where NCFM looks ascent_gradient up

    module = make(feature_file, use_sampling_net=True, calib_weight=0.0, save_dir=str(tmp_path))
    trainer(tmp_path, max_steps=1).fit(module, datamodule=digits)

    def gradients():
        module.zero_grad(set_to_none=True)
        saved = module.iteration.clone()
        module.matching_loss(module.make_step()).backward()  # the same draws each time
        module.iteration.copy_(saved)
        return module.syn_images.grad.clone(), [p.grad.clone() for p in module.psi.parameters()]

    img_grad, psi_grad = gradients()
    monkeypatch.setattr(ncfm_module, "ascent_gradient", lambda x: x)  # the plain loss: true gradients
    true_img, true_psi = gradients()
    torch.testing.assert_close(img_grad, true_img)  # the images descend the loss
    for g, true in zip(psi_grad, true_psi):
        torch.testing.assert_close(g, -true)  # psi ascends it
    assert max(float(g.abs().max()) for g in psi_grad) > 0


# ---------------------------------------------------------------- multi-formation
def test_pack_and_decode_follow_the_same_tile_order():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, 8, 8, generator=g)  # 4 chunks of n = 2
    packed = pack_multi_formation(x, 2)
    assert packed.shape == (2, 2, 8, 8)
    small = F.avg_pool2d(x, 2)  # area downsampling by 2
    torch.testing.assert_close(packed[:, :, :4, 4:], small[2:4])  # chunk 1 -> tile (0, 1)
    torch.testing.assert_close(packed[:, :, 4:, :4], small[4:6])  # chunk 2 -> tile (1, 0)
    decoded = decode_multi_formation(packed, 2)
    expected = F.interpolate(small, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(decoded, expected)
    assert torch.equal(decode_multi_formation(x, 1), x)
    s = torch.randn(2, 1, 8, 8, requires_grad=True)
    decode_multi_formation(s, 2).sum().backward()
    assert s.grad is not None and float(s.grad.abs().min()) > 0
    with pytest.raises(ValueError, match="not divisible"):
        decode_multi_formation(torch.randn(1, 1, 7, 7), 2)
    with pytest.raises(ValueError, match="multiple of factor"):
        pack_multi_formation(torch.randn(3, 1, 8, 8), 2)


# ---------------------------------------------------------------- feature networks
def test_feature_networks_are_trained_saved_and_interpolated(digits, feature_file, tmp_path):
    nets = FeatureNetworks.load(feature_file)
    assert len(nets) == 2 and nets.metadata["epochs"] == 2
    net = tiny_net()
    nets.check_compatible(net)
    # the trained weights classify the test split better than the initial ones
    from lightning_eff.distill.evaluate import _test_tensors

    x, y = _test_tensors(digits)
    accs = []
    for state in (nets.interpolated(0, 1.0), nets.trained_state(0)):
        nets.load_into(net, state)
        with torch.no_grad():
            accs.append(float((net(x).argmax(1) == y).float().mean()))
    assert accs[1] > accs[0] + 0.2, accs
    assert accs[1] == pytest.approx(nets.metadata["test_acc"][0])
    # interpolation formula, entry by entry
    name = nets.names[0]
    lam = 0.3
    torch.testing.assert_close(nets.interpolated(1, lam)[name], lam * nets.init[name][1] + (1 - lam) * nets.trained[name][1])
    # round trip, bad files
    nets.save(tmp_path / "copy.pt")
    again = FeatureNetworks.load(tmp_path / "copy.pt")
    assert all(torch.equal(again.trained[n], nets.trained[n]) for n in nets.names)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable NCFM feature-networks file"):
        FeatureNetworks.load(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not match"):
        nets.check_compatible(tiny_net(width=4))


# ---------------------------------------------------------------- the module
def test_one_psi_step_raises_and_one_image_step_lowers_the_module_loss(digits, feature_file, tmp_path):
    module = make(feature_file, use_sampling_net=True, calib_weight=0.0, save_dir=str(tmp_path))
    trainer(tmp_path, max_steps=1).fit(module, datamodule=digits)
    before, _ = loss_at(module, 1)
    psi0, img0 = copy.deepcopy(module.psi.state_dict()), module.syn_images.detach().clone()
    trainer(tmp_path, max_steps=1).fit(module, datamodule=digits)  # runs iteration 1
    assert int(module.iteration) == 2
    psi1, img1 = copy.deepcopy(module.psi.state_dict()), module.syn_images.detach().clone()
    assert psi1["layers.0.weight"].ne(psi0["layers.0.weight"]).any()
    with torch.no_grad():
        module.syn_images.copy_(img0)
        raised, _ = loss_at(module, 1)
        module.psi.load_state_dict(psi0)
        module.syn_images.copy_(img1)
        lowered, _ = loss_at(module, 1)
    assert raised > before > lowered, (raised, before, lowered)


def test_memory_efficient_mode_gives_the_same_gradients(digits, feature_file, tmp_path):
    module = make(feature_file, use_sampling_net=True, ipc=2, save_dir=str(tmp_path))
    trainer(tmp_path, max_steps=1).fit(module, datamodule=digits)
    grads = []
    for flag in (False, True):
        module.memory_efficient = flag
        module.syn_images.grad = None
        for p in module.psi.parameters():
            p.grad = None
        saved = module.iteration.clone()
        module.matching_loss(module.make_step()).backward()
        module.iteration.copy_(saved)
        grads.append([module.syn_images.grad.clone()] + [p.grad.clone() for p in module.psi.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_short_fit_lowers_the_loss_and_beats_its_initialisation(digits, feature_file, tmp_path):
    module = make(feature_file, ipc=1, factor=2, batch_real=64, num_freqs=256, save_dir=str(tmp_path), seed=1,
                  image_optimizer=partial(torch.optim.AdamW, lr=0.05, weight_decay=5e-4))
    trainer(tmp_path, max_steps=1).fit(module, datamodule=digits)
    before, _ = loss_at(module, 0)
    first = module.synthetic_set()
    trainer(tmp_path, max_steps=40).fit(module, datamodule=digits)
    after, _ = loss_at(module, 0)
    assert after < before, (before, after)
    synset = module.synthetic_set()
    student = ConvNet(in_channels=1, num_classes=10, width=16, depth=2, image_size=16)
    kw = dict(net=student, num_students=3, epochs=60, seed=0)
    acc_init = evaluate_synthetic(first, digits, **kw).mean
    acc_ncfm = evaluate_synthetic(synset, digits, **kw).mean
    assert acc_ncfm > acc_init, (acc_init, acc_ncfm)


def test_synthetic_set_is_decoded_with_metadata_and_files(digits, feature_file, tmp_path):
    module = make(feature_file, ipc=2, factor=2, save_dir=str(tmp_path))
    trainer(tmp_path, max_steps=2).fit(module, datamodule=digits)
    synset = SyntheticSet.load(tmp_path / "synthetic_set.pt")
    assert len(synset) == 10 * 2 * 4 and synset.ipc == 8 and synset.image_shape == (1, 16, 16)
    meta = synset.metadata
    assert (meta["method"], meta["ipc"], meta["stored_ipc"], meta["factor"], meta["decoded_ipc"]) == ("ncfm", 2, 2, 2, 8)
    assert torch.equal(synset.labels, torch.arange(10).repeat_interleave(8))
    torch.testing.assert_close(synset.images[:8], decode_multi_formation(module.syn_images.detach()[:2], 2))
    stored = SyntheticSet.load(tmp_path / "synthetic_set_stored.pt")
    assert stored.ipc == 2 and stored.metadata["formation"] == "stored"
    assert (tmp_path / "synthetic_grid.png").exists()
    # the initial stored images pack four real images each
    init = module._initial_set(digits)
    gen = torch.Generator().manual_seed(0)
    real = digits.class_images(0, 8, generator=gen)
    torch.testing.assert_close(init.images[:2], pack_multi_formation(real, 2))
    # every evaluator takes the decoded set unchanged
    res = evaluate_synthetic(synset, digits, net=tiny_net(), num_students=1, epochs=1)
    assert 0.0 <= res.mean <= 1.0
    # continuing from the stored set
    cont = make(feature_file, ipc=2, factor=2, init=str(tmp_path / "synthetic_set_stored.pt"), save_dir=str(tmp_path / "c"))
    trainer(tmp_path / "c", max_steps=1).fit(cont, datamodule=digits)
    assert int(cont.iteration) == 1
    wrong = make(feature_file, ipc=2, factor=2, init=str(tmp_path / "synthetic_set.pt"), save_dir=str(tmp_path / "d"))
    with pytest.raises(ValueError, match="stored"):
        trainer(tmp_path / "d", max_steps=1).fit(wrong, datamodule=digits)


def test_resume_continues_identically(digits, feature_file, tmp_path):
    kw = dict(use_sampling_net=True, ipc=1, plateau_patience=0)  # patience 0: the scheduler acts every step
    straight = make(feature_file, save_dir=str(tmp_path / "a"), **kw)
    t0 = trainer(tmp_path / "a", max_steps=4)
    t0.fit(straight, datamodule=digits)

    first = make(feature_file, save_dir=str(tmp_path / "b"), **kw)
    t1 = trainer(tmp_path / "b", max_steps=2)
    t1.fit(first, datamodule=digits)
    t1.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = make(feature_file, save_dir=str(tmp_path / "c"), **kw)
    t2 = trainer(tmp_path / "c", max_steps=4)
    t2.fit(resumed, datamodule=digits, ckpt_path=tmp_path / "mid.ckpt")
    assert int(resumed.iteration) == int(straight.iteration) == 4
    assert torch.equal(straight.syn_images, resumed.syn_images)
    for a, b in zip(straight.psi.state_dict().values(), resumed.psi.state_dict().values()):
        assert torch.equal(a, b)
    # the plateau schedulers (images, psi) were restored and acted: same state, lr below the initial one
    for c0, c2 in zip(t0.lr_scheduler_configs, t2.lr_scheduler_configs):
        a, b = c0.scheduler.state_dict(), c2.scheduler.state_dict()
        assert {k: a[k] for k in ("best", "num_bad_epochs", "last_epoch", "_last_lr")} == {
            k: b[k] for k in ("best", "num_bad_epochs", "last_epoch", "_last_lr")
        }
    assert t2.optimizers[0].param_groups[0]["lr"] < 0.01


def test_pretrains_in_setup_when_no_file_exists(digits, tmp_path):
    module = NCFM(tiny_net(), ipc=1, batch_real=8, num_freqs=32, num_feature_nets=1,
                  pretrain=FeatureNetPretraining(epochs=1), save_dir=str(tmp_path))
    trainer(tmp_path, max_steps=1).fit(module, datamodule=digits)
    nets = FeatureNetworks.load(tmp_path / "feature_networks.pt")
    assert len(nets) == 1 and nets.metadata["epochs"] == 1
    assert len(module.feature_networks) == 1
    # a file with too few networks is an error that names the file
    again = NCFM(tiny_net(), ipc=1, num_feature_nets=3, save_dir=str(tmp_path))
    with pytest.raises(ValueError, match="holds 1 feature networks"):
        trainer(tmp_path, max_steps=1).fit(again, datamodule=digits)


class _CountingPlugin(DistillPlugin):
    """Adds a term to the loss and records the size of the set it is shown."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.seen = None

    def extra_loss(self, module, step):
        self.calls += 1
        return 1e-3 * module.syn_images.square().mean()

    def on_synthetic_set(self, module, synset):
        self.seen = len(synset)
        return synset


def test_plugins_are_called(digits, feature_file, tmp_path):
    plugin = _CountingPlugin()
    module = make(feature_file, plugins=[plugin], save_dir=str(tmp_path))
    t = trainer(tmp_path, max_steps=2)
    t.fit(module, datamodule=digits)
    assert plugin.calls == 2 and plugin.seen == 40
    assert "distill/_countingplugin_loss" in t.callback_metrics


def test_bad_arguments(digits, feature_file, tmp_path):
    net = tiny_net()
    for kwargs, match in [
        ({"factor": 0}, "factor"),
        ({"num_freqs": 0}, "num_freqs"),
        ({"alpha": -0.1}, "alpha"),
        ({"loss_scale": 0.0}, "loss_scale"),
        ({"calib_weight": -1.0}, "calib_weight"),
        ({"plateau_patience": -1}, "plateau_patience"),
        ({"batch_real": 0}, "batch_real"),
        ({"ipc": 0}, "ipc"),
    ]:
        with pytest.raises(ValueError, match=match):
            NCFM(net, **kwargs)
    with pytest.raises(TypeError, match="use_sampling_net"):
        NCFM(net, use_sampling_net="yes")
    with pytest.raises(TypeError, match="features"):
        NCFM(torch.nn.Linear(4, 10))

    class NoDim(torch.nn.Module):
        def features(self, x):
            return x.flatten(1)

        def forward(self, x):
            return x.flatten(1)[:, :10]

    with pytest.raises(ValueError, match="feature_dim"):
        NCFM(NoDim(), use_sampling_net=True)
    # psi built for the wrong dimension, caught in set-up
    wrong = make(feature_file, use_sampling_net=True, feature_dim=7, save_dir=str(tmp_path))
    with pytest.raises(ValueError, match="feature_dim=7"):
        trainer(tmp_path, max_steps=1).fit(wrong, datamodule=digits)
    # too few real images to pack
    greedy = make(feature_file, ipc=40, factor=2, save_dir=str(tmp_path))
    with pytest.raises(ValueError, match="packs 160 real images"):
        trainer(tmp_path, max_steps=1).fit(greedy, datamodule=digits)


# ---------------------------------------------------------------- DDP
class _DDPNCFM(NCFM):
    def __init__(self, out, feature_path):
        super().__init__(tiny_net(), ipc=1, batch_real=8, num_freqs=32, num_feature_nets=2, use_sampling_net=True,
                         feature_nets_path=feature_path, save_dir=str(Path(out).parent))
        self.out = out

    def on_train_end(self):
        flat = torch.cat([self.syn_images.detach().flatten()] + [p.detach().flatten() for p in self.psi.parameters()])
        gathered = self.all_gather(flat)
        if self.global_rank == 0:
            torch.save(gathered, self.out)


@pytest.mark.timeout(300)
def test_ddp_keeps_images_and_psi_identical(feature_file, tmp_path):
    out = tmp_path / "state.pt"
    dm = DigitsDataModule(image_size=16)
    trainer(tmp_path, max_steps=2, strategy="ddp_spawn", devices=2).fit(
        _DDPNCFM(str(out), str(feature_file)), datamodule=dm
    )
    gathered = torch.load(out)
    assert gathered.shape[0] == 2 and torch.equal(gathered[0], gathered[1])


# ---------------------------------------------------------------- CLI
@pytest.mark.parametrize("name", ["ncfm_digits_ipc1.yaml", "ncfm_digits_ipc10.yaml"])
def test_digits_configs_fit_through_the_cli(name, tmp_path, monkeypatch):
    from lightning_eff.cli import LightningEffCLI

    monkeypatch.setattr(sys, "argv", ["lightning-eff"])
    overrides = [
        "--trainer.max_steps=2", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={tmp_path}", f"--model.init_args.save_dir={tmp_path}",
        "--model.init_args.batch_real=16", "--model.init_args.num_freqs=64",
        "--model.init_args.num_feature_nets=1", "--model.init_args.pretrain.epochs=1",
        "--model.init_args.net.init_args.width=8",
    ]
    LightningEffCLI(args=["fit", "--config", str(ROOT / "configs" / "distill" / name), *overrides])
    synset = SyntheticSet.load(tmp_path / "synthetic_set.pt")
    assert synset.metadata["iterations"] == 2 and synset.metadata["method"] == "ncfm"
    # the nested pretrain group: the override changed epochs, the YAML's other fields stayed
    meta = FeatureNetworks.load(tmp_path / "feature_networks.pt").metadata
    assert meta["epochs"] == 1 and meta["weight_decay"] == 5e-4 and meta["cutmix"] == 0.5


@pytest.mark.parametrize(
    "override, message",
    [("--model.init_args.pretrain.epochs=many", "pretrain"), ("--model.init_args.pretrain_epochs=1", "pretrain_epochs")],
)
def test_the_pretrain_group_is_type_checked_in_yaml(override, message, monkeypatch, capsys):
    from lightning_eff.cli import LightningEffCLI

    monkeypatch.setattr(sys, "argv", ["lightning-eff"])
    with pytest.raises(SystemExit):
        LightningEffCLI(args=["fit", "--config", str(ROOT / "configs" / "distill" / "ncfm_digits_ipc1.yaml"), override])
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- the pretraining recipe (issue 21's grouping)
def test_feature_net_pretraining_groups_and_validates_the_recipe():
    default = FeatureNetPretraining()
    assert (default.epochs, default.lr, default.momentum, default.weight_decay, default.batch_size, default.cutmix) == (
        60, 0.01, 0.9, 5e-4, 128, 0.5)  # the official pretrain_script.py
    for kwargs, error, match in [
        ({"epochs": 0}, ValueError, "epochs"),
        ({"batch_size": 2.5}, TypeError, "batch_size"),
        ({"lr": -1.0}, ValueError, "lr"),
        ({"cutmix": 1.5}, ValueError, "cutmix"),
        ({"momentum": True}, TypeError, "momentum"),
    ]:
        with pytest.raises(error, match=match):
            FeatureNetPretraining(**kwargs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        default.epochs = 3
    # NCFM: a dataclass or a dict of its fields; anything else is an error naming `pretrain`
    assert NCFM(tiny_net(), pretrain={"epochs": 3}).pretrain == FeatureNetPretraining(epochs=3)
    with pytest.raises(TypeError, match="pretrain"):
        NCFM(tiny_net(), pretrain=3)
    with pytest.raises(TypeError, match="unexpected keyword"):
        NCFM(tiny_net(), pretrain_epoch=3)


def test_the_former_pretrain_keywords_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match=r"pretrain=FeatureNetPretraining\(batch_size=64, epochs=3\)"):
        old = NCFM(tiny_net(), pretrain_epochs=3, pretrain_batch_size=64)
    new = NCFM(tiny_net(), pretrain=FeatureNetPretraining(epochs=3, batch_size=64))
    assert old.pretrain == new.pretrain
    # saved as plain data, without the deprecated keywords: a checkpoint rebuilds the same module
    assert old.hparams["pretrain"] == new.hparams["pretrain"] == new.pretrain.as_kwargs()
    assert not any(k.startswith("pretrain_") for k in old.hparams)
    assert NCFM(tiny_net(), **{k: v for k, v in old.hparams.items()}).pretrain == new.pretrain


def test_a_feature_networks_file_saved_before_the_split_loads(tmp_path):
    """tests/fixtures/ncfm_feature_networks_v1.pt was written by the former ``ncfm.py`` (init: a seeded
    Linear(3, 2), trained: init + 1)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 2)
    nets = FeatureNetworks.load(ROOT / "tests" / "fixtures" / "ncfm_feature_networks_v1.pt")
    assert len(nets) == 1 and nets.names == ["weight", "bias"] and nets.metadata == {"epochs": 1}
    nets.check_compatible(net)
    for name, value in net.state_dict().items():
        assert torch.equal(nets.init[name][0], value) and torch.equal(nets.trained[name][0], value + 1)
