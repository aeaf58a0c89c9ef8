"""The lightning-eff command: every YAML through the real LightningCLI, the console script end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_eff.cli import LightningEffCLI

ROOT = Path(__file__).resolve().parents[1]
# configs/sweeps (W&B sweeps) and configs/pipeline (`lightning-eff pipeline` files, covered by
# tests/test_pipeline.py) are not LightningCLI configs
CONFIGS = sorted(
    p for p in (ROOT / "configs").rglob("*.yaml") if "sweeps" not in p.parts and "pipeline" not in p.parts
)
BASE_FOR_FRAGMENTS = ROOT / "configs" / "classify" / "digits_convnet.yaml"
SCRIPT = Path(sys.executable).with_name("lightning-eff")


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI(args=...) warns when sys.argv holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["lightning-eff"])


def _is_fragment(path: Path) -> bool:
    return "model" not in (yaml.safe_load(path.read_text()) or {})


def test_there_are_configs():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_parses_and_instantiates(path, tmp_path):
    """Each YAML (fragments on top of a full config) goes through the real CLI and builds its objects."""
    configs = ["--config", str(BASE_FOR_FRAGMENTS)] if _is_fragment(path) else []
    configs += ["--config", str(path)]
    cli = LightningEffCLI(
        run=False, args=[*configs, "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    )
    import lightning as L

    assert isinstance(cli.model, L.LightningModule)
    assert isinstance(cli.datamodule, L.LightningDataModule)
    raw = yaml.safe_load(path.read_text())
    if "optimizer" in raw:
        opt = cli.model.configure_optimizers()
        opt = opt[0][0] if isinstance(opt, tuple) else opt
        opt = opt["optimizer"] if isinstance(opt, dict) else opt
        assert type(opt).__name__ == raw["optimizer"]["class_path"].rsplit(".", 1)[-1]


def test_short_class_names_resolve(tmp_path):
    from lightning_eff.data import DigitsDataModule
    from lightning_eff.models import ConvNet, ImageClassifier
    from lightning_eff.optim import KO

    cli = LightningEffCLI(
        run=False,
        args=[
            "--model=ImageClassifier",
            "--model.net=ConvNet",
            "--model.net.in_channels=1",
            "--model.net.image_size=8",
            "--model.net.width=16",
            "--data=DigitsDataModule",
            "--optimizer=KO",
            "--optimizer.collision_rate=0.05",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    assert isinstance(cli.model, ImageClassifier) and isinstance(cli.model.net, ConvNet)
    assert isinstance(cli.datamodule, DigitsDataModule)
    opt = cli.model.configure_optimizers()
    opt = opt[0][0] if isinstance(opt, tuple) else opt
    assert isinstance(opt, KO) and opt.defaults["collision_rate"] == 0.05


def test_model_net_mlp_resolves_to_the_image_mlp(tmp_path):
    """`--model.net MLP`: torchvision.ops.MLP (imported with explain's ViT) shares the name; ours wins."""
    import torch.nn as nn
    from jsonargparse import _typehints

    from lightning_eff.models import MLP

    cli = LightningEffCLI(
        run=False,
        args=[
            "--model=ImageClassifier",
            "--model.net=MLP",
            "--model.net.in_channels=1",
            "--model.net.image_size=8",
            "--model.net.hidden_sizes=[16]",
            "--data=DigitsDataModule",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    assert type(cli.model.net) is MLP and cli.model.net.hidden_sizes == (16,)
    # the clash is real: plain jsonargparse refuses the short name (so the test above can fail)
    with pytest.raises(ValueError, match="Multiple subclasses with name MLP"):
        _typehints.resolve_class_path_by_name(nn.Module, "MLP")


def _library_classes() -> list[type]:
    import importlib
    import pkgutil

    import lightning_eff

    classes = {}
    for info in pkgutil.walk_packages(lightning_eff.__path__, "lightning_eff."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if isinstance(obj, type) and obj.__module__ == info.name and not name.startswith("_"):
                classes[obj] = None  # an alias (rl.dreamer's MLP = DreamerMLP) is the same class
    return list(classes)


def test_class_names_of_the_library_are_unique():
    """Two lightning-eff classes with one name would make that short name ambiguous on the command line."""
    seen: dict[str, list[str]] = {}
    for cls in _library_classes():
        seen.setdefault(cls.__name__, []).append(f"{cls.__module__}.{cls.__qualname__}")
    assert not {n: p for n, p in seen.items() if len(p) > 1}


def test_every_component_class_resolves_by_its_short_name():
    """Each nn.Module / LightningModule / DataModule / Callback / Optimizer of the library, by short name,
    is itself, also where a third-party class (torchvision.ops.MLP, torchvision's ViT Encoder) shares it."""
    import lightning as L
    import torch
    from jsonargparse import _typehints
    from jsonargparse._util import import_object

    from lightning_eff.cli import import_components, prefer_own_short_names

    import_components()
    bases = (torch.nn.Module, L.LightningModule, L.LightningDataModule, L.Callback, torch.optim.Optimizer)
    checked, wrong = 0, []
    with prefer_own_short_names():
        for cls in _library_classes():
            for base in bases:
                if issubclass(cls, base) and not getattr(cls, "__abstractmethods__", None):
                    checked += 1
                    try:
                        got = import_object(_typehints.resolve_class_path_by_name(base, cls.__name__))
                    except ValueError as err:
                        got = err
                    if got is not cls:
                        wrong.append(f"{cls.__module__}.{cls.__name__} as {base.__name__}: {got}")
    assert checked > 30 and not wrong, wrong


def test_bad_optimizer_argument_is_a_clear_error(tmp_path):
    args = [
        "--config",
        str(ROOT / "configs" / "ko" / "digits.yaml"),
        "--optimizer.collision_rate=-1",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    with pytest.raises(ValueError, match=r"KO: collision_rate must be a number in \[0, 1\], got -1"):
        LightningEffCLI(run=False, args=args).model.configure_optimizers()


def test_console_script_fit_then_test(tmp_path):
    """The installed `lightning-eff` script, as the README and the issue write it."""
    assert SCRIPT.exists(), f"console script not installed at {SCRIPT}"
    cmd = [
        str(SCRIPT),
        "fit",
        "--config",
        str(ROOT / "configs" / "ko" / "digits.yaml"),
        "--optimizer",
        "KO",
        "--optimizer.collision_rate",
        "0.05",
        "--trainer.fast_dev_run=2",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "test/acc" in proc.stdout + proc.stderr


def test_second_run_into_the_same_folder_with_wandb(tmp_path, monkeypatch):
    """The LightningCLI + WandbLogger trap: config.yaml already exists in the shared W&B save dir."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    import wandb

    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / "classify" / "digits_mlp.yaml"),
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
        "--trainer.enable_checkpointing=false",
        "--trainer.logger=WandbLogger",
        "--trainer.logger.offline=true",
        f"--trainer.logger.save_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    for _ in range(2):
        cli = LightningEffCLI(args=args)
        stored = dict(cli.trainer.logger.experiment.config)
        wandb.finish()
    assert (tmp_path / "config.yaml").exists()
    assert stored["lightning_eff_config"]["model"]["class_path"] == "lightning_eff.models.ImageClassifier"


def test_import_is_light():
    code = "import sys, lightning_eff; print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_demo_config_trains_a_real_model(tmp_path):
    """A short real run of the demo's config learns digits (the full demo is `make demo`)."""
    cli = LightningEffCLI(
        args=[
            "fit",
            "--config",
            str(ROOT / "configs" / "ko" / "digits.yaml"),
            "--trainer.max_epochs=2",
            "--model.net.init_args.width=32",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    from lightning_eff.optim import KO, CondensationMonitor

    acc = cli.trainer.callback_metrics["test/acc"]
    assert isinstance(cli.trainer.optimizers[0], KO)
    assert float(acc) > 0.8, float(acc)
    (monitor,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, CondensationMonitor)]
    assert 0.0 <= monitor.measure(cli.model)["condensation/mean_abs_cos"] < 1.0
