"""Tests for lightning_eff.models: ConvNet, MLP and ImageClassifier (real Trainer runs on the digits)."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_trainer
from torch import nn

from lightning_eff.data import DigitsDataModule
from lightning_eff.models import MLP, ConvNet, ImageClassifier


def _trainer(root: Path, **kwargs) -> L.Trainer:
    return cpu_trainer(root, **{"enable_checkpointing": True, **kwargs})


# ------------------------------------------------------------------------------------------------
# ConvNet
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_size", [8, 16, 32])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("norm", ["instance", "batch", "layer", "none"])
def test_convnet_shapes(image_size, depth, norm):
    width = 8
    net = ConvNet(in_channels=3, num_classes=7, width=width, depth=depth, norm=norm, image_size=image_size)
    side = image_size // 2**depth
    assert net.feature_dim == width * side * side
    x = torch.randn(2, 3, image_size, image_size)
    feats = net.features(x)
    assert feats.shape == (2, net.feature_dim)
    assert net(x).shape == (2, 7)
    torch.testing.assert_close(net(x), net.classifier(feats))
    assert isinstance(net.classifier, nn.Linear) and net.classifier.in_features == net.feature_dim
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth and all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert all(c.out_channels == width for c in convs)


@pytest.mark.parametrize("width", [4, 32])
def test_convnet_instance_norm_is_groupnorm_per_channel(width):
    net = ConvNet(in_channels=1, num_classes=10, width=width, depth=2, norm="instance", image_size=8)
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 2
    assert all(n.num_groups == width and n.num_channels == width and n.affine for n in norms)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) for m in net.modules())
    # GroupNorm(C, C) is instance normalisation (+ affine), checked against F.instance_norm
    h = torch.randn(3, width, 8, 8)
    with torch.no_grad():
        norms[0].weight.uniform_(0.5, 1.5)
        norms[0].bias.uniform_(-1, 1)
    expected = F.instance_norm(h, weight=norms[0].weight, bias=norms[0].bias, eps=norms[0].eps)
    torch.testing.assert_close(norms[0](h), expected, atol=1e-5, rtol=1e-5)


def test_convnet_other_norms_activations_pooling():
    layer = ConvNet(width=16, depth=2, norm="layer", image_size=16)
    assert all(
        m.num_groups == 1 and m.num_channels == 16 for m in layer.modules() if isinstance(m, nn.GroupNorm)
    )
    batch = ConvNet(width=16, depth=2, norm="batch", image_size=16)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in batch.modules()) == 2
    plain = ConvNet(width=16, depth=2, norm="none", image_size=16)
    assert not any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)) for m in plain.modules())
    for activation, cls in (
        ("relu", nn.ReLU),
        ("leakyrelu", nn.LeakyReLU),
        ("gelu", nn.GELU),
        ("sigmoid", nn.Sigmoid),
    ):
        net = ConvNet(width=4, depth=2, activation=activation, image_size=8)
        assert sum(isinstance(m, cls) for m in net.modules()) == 2
    maxnet = ConvNet(width=4, depth=2, pooling="max", image_size=8)
    assert sum(isinstance(m, nn.MaxPool2d) for m in maxnet.modules()) == 2
    nopool = ConvNet(in_channels=1, width=4, depth=3, pooling="none", image_size=8)
    assert nopool.feature_dim == 4 * 8 * 8
    assert nopool.features(torch.randn(2, 1, 8, 8)).shape == (2, 256)


def test_convnet_default_is_convnet3_on_cifar_shapes():
    net = ConvNet()
    assert (net.in_channels, net.num_classes, net.width, net.depth, net.image_size) == (3, 10, 128, 3, 32)
    assert net.feature_dim == 128 * 4 * 4 == 2048
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    rebuilt = ConvNet(**net.get_config())
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in net.parameters()]


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"image_size": 4, "depth": 3}, ValueError, r"`image_size`=4 is too small for `depth`=3"),
        (
            {"norm": "instancenorm"},
            ValueError,
            r"`norm` must be one of \('instance', 'batch', 'layer', 'none'\)",
        ),
        ({"activation": "tanh"}, ValueError, "`activation` must be one of .* got 'tanh'"),
        ({"pooling": "stride"}, ValueError, "`pooling` must be one of .* got 'stride'"),
        ({"width": 0}, ValueError, "`width` must be an int >= 1, got 0"),
        ({"depth": True}, TypeError, "`depth` must be an int, got True"),
        ({"num_classes": 2.5}, TypeError, "`num_classes` must be an int, got 2.5"),
    ],
)
def test_convnet_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        ConvNet(**kwargs)


def test_convnet_input_shape_error():
    net = ConvNet(in_channels=3, width=4, depth=2, image_size=16)
    for bad in (torch.randn(2, 1, 16, 16), torch.randn(2, 3, 32, 32), torch.randn(3, 16, 16)):
        with pytest.raises(ValueError, match=r"expected input of shape \[B, 3, 16, 16\]"):
            net(bad)
    # large image with no pooling still works where it fits
    assert ConvNet(in_channels=3, width=4, depth=1, pooling="none", image_size=4)(
        torch.randn(1, 3, 4, 4)
    ).shape == (1, 10)


# ------------------------------------------------------------------------------------------------
# MLP
# ------------------------------------------------------------------------------------------------
def test_mlp_shapes_and_api():
    net = MLP(
        in_channels=3, image_size=16, num_classes=5, hidden_sizes=(32, 16), activation="gelu", dropout=0.1
    )
    x = torch.randn(4, 3, 16, 16)
    assert net.feature_dim == 16 and net.features(x).shape == (4, 16) and net(x).shape == (4, 5)
    assert net.classifier.in_features == 16 and net.classifier.out_features == 5
    assert sum(isinstance(m, nn.Dropout) for m in net.modules()) == 2
    assert sum(isinstance(m, nn.GELU) for m in net.modules()) == 2
    net.eval()
    torch.testing.assert_close(net(x), net(x.flatten(1)))  # flat inputs are accepted
    torch.testing.assert_close(net(x), net.classifier(net.features(x)))
    linear = MLP(hidden_sizes=())
    assert linear.feature_dim == 64 and linear(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert MLP(**net.get_config()).hidden_sizes == (32, 16)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"hidden_sizes": (32, 0)}, ValueError, r"`hidden_sizes` must hold ints >= 1, got \[32, 0\]"),
        ({"hidden_sizes": "64"}, TypeError, "`hidden_sizes` must be a sequence of ints"),
        ({"dropout": 1.0}, ValueError, r"`dropout` must be a float in \[0, 1\), got 1.0"),
        ({"activation": "swish"}, ValueError, "`activation` must be one of"),
        ({"in_channels": 0}, ValueError, "`in_channels` must be an int >= 1, got 0"),
    ],
)
def test_mlp_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        MLP(**kwargs)


def test_mlp_input_shape_error():
    with pytest.raises(ValueError, match=r"expected input of shape \[B, 1, 8, 8\] or \[B, 64\]"):
        MLP()(torch.randn(2, 1, 16, 16))


# ------------------------------------------------------------------------------------------------
# ImageClassifier
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real fit: ConvNet-3 (width 32) on the 16x16 digits for 3 epochs, then test."""
    root = tmp_path_factory.mktemp("fit")
    L.seed_everything(0, workers=True)
    dm = DigitsDataModule(image_size=16, batch_size=64)
    net = ConvNet(in_channels=1, num_classes=10, width=32, depth=3, image_size=16)
    model = ImageClassifier(net, optimizer=functools.partial(torch.optim.Adam, lr=3e-3))
    trainer = _trainer(root, max_epochs=3)
    trainer.fit(model, datamodule=dm)
    fit_metrics = dict(trainer.callback_metrics)
    results = trainer.test(model, datamodule=dm, verbose=False)
    return {"model": model, "dm": dm, "trainer": trainer, "results": results, "fit_metrics": fit_metrics}


def test_classifier_fit_reaches_accuracy(trained):
    results = trained["results"][0]
    assert results["test/acc"] > 0.8, results
    metrics = trained["fit_metrics"]
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert key in metrics, key
    assert float(metrics["val/acc"]) > 0.8
    # train/acc is the fraction of correct predictions (micro accuracy), within [0, 1]
    assert 0.0 <= float(metrics["train/acc"]) <= 1.0


def test_classifier_load_from_checkpoint_round_trip(trained):
    model, dm = trained["model"], trained["dm"]
    ckpt = trained["trainer"].checkpoint_callback.best_model_path
    assert ckpt and Path(ckpt).is_file()
    # hyperparameters are plain data: the checkpoint loads with torch's safe (weights-only) unpickler
    raw = torch.load(ckpt, weights_only=True)
    assert raw["hyper_parameters"]["net"] == {
        "class_path": "lightning_eff.models.convnet.ConvNet",
        "init_args": model.net.get_config(),
    }
    assert raw["hyper_parameters"]["optimizer"] == {
        "class_path": "torch.optim.adam.Adam",
        "init_args": {"lr": 3e-3},
    }

    loaded = ImageClassifier.load_from_checkpoint(ckpt)
    assert isinstance(loaded.net, ConvNet) and loaded.net.get_config() == model.net.get_config()
    x = dm.class_images(3, n=8, generator=torch.Generator().manual_seed(0))
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    opt = loaded.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 3e-3


def test_classifier_resume_from_checkpoint(trained, tmp_path):
    ckpt = trained["trainer"].checkpoint_callback.best_model_path
    net = ConvNet(in_channels=1, num_classes=10, width=32, depth=3, image_size=16)
    model = ImageClassifier(net, optimizer=functools.partial(torch.optim.Adam, lr=3e-3))
    trainer = _trainer(tmp_path, max_epochs=4, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=DigitsDataModule(image_size=16), ckpt_path=ckpt)
    assert trainer.current_epoch == 4
    assert trainer.global_step == trained["trainer"].global_step + 2


def test_classifier_class_count_mismatch(tmp_path):
    model = ImageClassifier(ConvNet(in_channels=1, num_classes=5, width=8, depth=2, image_size=8))
    with pytest.raises(
        ValueError, match=r"DigitsDataModule has num_classes=10 but the net ConvNet predicts 5"
    ):
        _trainer(tmp_path, fast_dev_run=True).fit(model, datamodule=DigitsDataModule())


def test_classifier_image_shape_mismatch(tmp_path):
    model = ImageClassifier(ConvNet(in_channels=3, num_classes=10, width=8, depth=2, image_size=8))
    with pytest.raises(
        ValueError,
        match=r"cannot process the images of the datamodule DigitsDataModule \(image_shape=\(1, 8, 8\)\)",
    ):
        _trainer(tmp_path, fast_dev_run=True).fit(model, datamodule=DigitsDataModule())


def test_classifier_mlp_with_scheduler_and_smoothing(tmp_path):
    sched = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    model = ImageClassifier(
        MLP(hidden_sizes=(32,)),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=sched,
        label_smoothing=0.1,
    )
    config = model.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD)
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=2)
    trainer.fit(model, datamodule=DigitsDataModule())
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)
    plateau = ImageClassifier(MLP(), lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert plateau.configure_optimizers()["lr_scheduler"]["monitor"] == "val/loss"
    # label smoothing enters the loss exactly as in F.cross_entropy
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    expected = F.cross_entropy(model(x), y, label_smoothing=0.1)
    model.log = lambda *a, **k: None  # no trainer attached
    torch.testing.assert_close(model.training_step((x, y), 0), expected)


def test_classifier_unserialisable_net_warns_and_reloads_with_net(tmp_path):
    def make_net():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    with pytest.warns(UserWarning, match=r"has no `get_config\(\)`"):
        model = ImageClassifier(make_net())
    assert model.num_classes == 10 and "net" not in model.hparams
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1)
    trainer.fit(model, datamodule=DigitsDataModule())
    ckpt = trainer.checkpoint_callback.best_model_path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = ImageClassifier.load_from_checkpoint(ckpt, net=make_net())
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))


def test_classifier_lambda_optimizer_warns():
    with pytest.warns(UserWarning, match="`optimizer` .* is not a class or functools.partial"):
        model = ImageClassifier(MLP(), optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    assert isinstance(model.configure_optimizers(), torch.optim.SGD)
    assert "optimizer" not in model.hparams


def test_classifier_non_finite_loss_stops(tmp_path):
    model = ImageClassifier(MLP(hidden_sizes=(8,)), optimizer=functools.partial(torch.optim.SGD, lr=1e30))
    with pytest.raises(FloatingPointError, match=r"the train loss is .* at epoch 0, batch \d+"):
        _trainer(tmp_path, max_steps=20, limit_val_batches=0).fit(model, datamodule=DigitsDataModule())


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"net": "convnet"}, TypeError, "`net` must be a torch.nn.Module, got 'convnet'"),
        ({"optimizer": 0.1}, TypeError, "`optimizer` must be a callable"),
        ({"lr_scheduler": "step"}, TypeError, "`lr_scheduler` must be None or a callable"),
        ({"label_smoothing": 1.0}, ValueError, r"`label_smoothing` must be a float in \[0, 1\), got 1.0"),
        ({"net": nn.Conv2d(1, 2, 3)}, ValueError, "cannot tell how many classes `net` \\(Conv2d\\) predicts"),
    ],
)
def test_classifier_bad_arguments(kwargs, error, pattern):
    kwargs = {"net": MLP(), **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=pattern):
            ImageClassifier(**kwargs)


def test_classifier_through_lightning_cli(tmp_path):
    """YAML with OmegaConf interpolation of ``data.init_args.image_size``, built by LightningCLI, reloads."""
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  accelerator: cpu
  max_steps: 3
  limit_val_batches: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {tmp_path}
data:
  class_path: lightning_eff.data.DigitsDataModule
  init_args:
    image_size: 16
model:
  class_path: lightning_eff.models.ImageClassifier
  init_args:
    net:
      class_path: lightning_eff.models.ConvNet
      init_args:
        in_channels: 1
        width: 8
        image_size: ${{data.init_args.image_size}}
    optimizer:
      class_path: torch.optim.SGD
      init_args:
        lr: 0.05
"""
    )
    cli = LightningCLI(
        args=["--config", str(config)],
        run=False,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_callback=None,
    )
    assert cli.model.net.image_size == 16 and cli.datamodule.image_size == 16
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["net"]["init_args"]["image_size"] == 16
    loaded = ImageClassifier.load_from_checkpoint(ckpt)
    assert isinstance(loaded.configure_optimizers(), torch.optim.SGD)
    x = torch.randn(2, 1, 16, 16)
    cli.model.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(x), cli.model(x))
