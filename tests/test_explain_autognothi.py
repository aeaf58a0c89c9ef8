"""AutoGnothi: backbones, masking, the final model's outputs, argument errors, both stages through the CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_eff.explain import (
    AutoGnothi,
    PlayerLayout,
    SyntheticTextDataModule,
    TinyViT,
    exact_shapley,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "explain"


def tiny_vit(seed: int = 0, **kw) -> TinyViT:
    torch.manual_seed(seed)
    net = TinyViT(
        **{
            "image_size": 8,
            "patch_size": 2,
            "num_layers": 2,
            "num_heads": 2,
            "hidden_dim": 16,
            "mlp_dim": 32,
            **kw,
        }
    )
    nn.init.normal_(
        net.heads.head.weight, std=0.5
    )  # torchvision starts the head at zero: logits would be constant
    return net


def hf_vit(seed: int = 0):
    import inspect

    from transformers import ViTConfig, ViTForImageClassification

    if "attention_mask" not in inspect.signature(ViTForImageClassification.forward).parameters:
        pytest.skip("this transformers version's ViT takes no attention_mask (players cannot be removed)")
    torch.manual_seed(seed)
    cfg = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=10,
    )
    return ViTForImageClassification(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg).eval()


def text_batch(n: int = 6):
    dm = SyntheticTextDataModule(num_samples=40, max_len=10, batch_size=n)
    dm.setup()
    inputs, labels = next(iter(dm.val_dataloader()))
    assert not bool(inputs["attention_mask"].all()), "the batch should contain padding"
    return inputs, labels


def own_logits(backbone, inputs):
    if isinstance(inputs, dict):
        return backbone(**inputs).logits
    out = backbone(inputs) if isinstance(backbone, TinyViT) else backbone(pixel_values=inputs).logits
    return out


def surrogate_ckpt(model: AutoGnothi, path: Path) -> str:
    """A stage-1 checkpoint written the way Lightning writes one (state_dict + format marker)."""
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return str(path)


def explainer_from(surrogate: AutoGnothi, backbone, tmp_path: Path, **kw) -> AutoGnothi:
    path = surrogate_ckpt(surrogate, tmp_path / "surrogate.ckpt")
    model = AutoGnothi(
        backbone, stage="explainer", surrogate_checkpoint=path, side_ratio=4, explainer_hidden_dim=32, **kw
    )
    model.ensure_loaded()
    return model.eval()


BACKBONES = {"torchvision": tiny_vit, "hf_vit": hf_vit}


# --------------------------------------------------------------------------------------------------
# the final model
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["torchvision", "hf_vit", "bert"])
@pytest.mark.parametrize("masking", ["exclude", "multiply"])
def test_final_model_logits_are_the_backbones_and_phi_is_efficient(kind, masking, tmp_path):
    backbone = tiny_bert() if kind == "bert" else BACKBONES[kind]()
    inputs = text_batch()[0] if kind == "bert" else torch.randn(5, 1, 8, 8)
    surrogate = AutoGnothi(backbone, side_ratio=4, attention_masking=masking)
    model = explainer_from(surrogate, backbone, tmp_path, attention_masking=masking)
    with torch.no_grad():
        out = model(inputs)
        ref = own_logits(backbone, inputs)
    assert torch.equal(out.logits, ref)  # bit-identical: the backbone is untouched
    b = ref.shape[0]
    n = 16 if kind != "bert" else inputs["input_ids"].shape[1] - 1
    assert out.phi.shape == (b, n, ref.shape[1])
    # efficiency normalisation holds exactly: sum_i phi_i = v(1) - v(0)
    v1 = out.surrogate_logits.softmax(-1)
    v0 = model.surrogate_values(
        model.adapter.select(inputs, slice(0, 1)), torch.zeros(1, 1, n, dtype=torch.bool)
    )[0, 0]
    torch.testing.assert_close(out.phi.sum(1), v1 - v0, atol=1e-6, rtol=1e-5)
    if kind == "bert":  # CLS and padding are never players
        valid = inputs["attention_mask"][:, 1:].bool()
        assert torch.equal(out.valid, valid)
        assert torch.equal(out.phi[~valid], torch.zeros_like(out.phi[~valid]))


@pytest.mark.parametrize("kind", ["torchvision", "hf_vit"])
def test_removed_players_cannot_influence_the_surrogate(kind):
    model = AutoGnothi(BACKBONES[kind](), side_ratio=4).eval()
    x = torch.randn(2, 1, 8, 8)
    masks = torch.zeros(2, 1, 16, dtype=torch.bool)
    masks[:, :, :8] = True  # keep the top half (patch rows 0-1 = pixel rows 0-3)
    x2 = x.clone()
    x2[:, :, 4:] = 5.0  # change only removed patches
    torch.testing.assert_close(
        model.surrogate_values(x, masks), model.surrogate_values(x2, masks), rtol=0, atol=1e-7
    )
    assert not torch.allclose(model.surrogate_values(x, ~masks), model.surrogate_values(x2, ~masks))
    # keeping every player equals the unmasked pass
    full = model(x).surrogate_logits.softmax(-1)
    torch.testing.assert_close(
        model.surrogate_values(x, torch.ones(2, 1, 16, dtype=torch.bool))[:, 0], full, atol=1e-6, rtol=1e-5
    )


def test_multiply_masking_lets_removed_players_leak_like_the_official_code():
    model = AutoGnothi(tiny_vit(), side_ratio=4, attention_masking="multiply").eval()
    x = torch.randn(2, 1, 8, 8)
    x2 = x.clone()
    x2[:, :, 4:] = 5.0
    masks = torch.zeros(2, 1, 16, dtype=torch.bool)
    masks[:, :, :8] = True
    assert not torch.allclose(model.surrogate_values(x, masks), model.surrogate_values(x2, masks))


def test_null_value_is_input_independent():
    model = AutoGnothi(tiny_vit(), side_ratio=4).eval()
    empty = torch.zeros(1, 1, 16, dtype=torch.bool)
    a = model.surrogate_values(torch.randn(1, 1, 8, 8), empty)
    b = model.surrogate_values(torch.randn(1, 1, 8, 8) * 3, empty)
    torch.testing.assert_close(a, b)


def test_player_grid_groups_patches():
    model = AutoGnothi(tiny_vit(), side_ratio=4, player_grid=2).eval()
    assert model.num_players == 4 and model.layout.grid == (2, 2)
    keep = model.layout.keep_tokens(
        torch.tensor([[False, True, False, False]]), torch.ones(1, 17, dtype=torch.bool)
    )
    grid = keep[0, 1:].view(4, 4)
    assert keep[0, 0] and grid[:2, 2:].all() and grid.sum() == 4  # player 1 = top-right 2x2 block of patches
    layout = PlayerLayout("image", token_grid=4, player_grid=2)
    pooled = layout.pool(torch.arange(16.0).view(1, 16, 1))
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_value_function_feeds_exact_shapley():
    model = AutoGnothi(tiny_vit(), side_ratio=4, player_grid=2).eval()
    x = torch.randn(1, 1, 8, 8)
    fn = model.value_function(x)
    phi = exact_shapley(fn, 4)
    full, empty = fn(torch.ones(1, 4, dtype=torch.bool)), fn(torch.zeros(1, 4, dtype=torch.bool))
    torch.testing.assert_close(phi.sum(0), (full - empty)[0], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="exactly one input"):
        model.value_function(torch.randn(2, 1, 8, 8))


# --------------------------------------------------------------------------------------------------
# bad arguments
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_mask_samples": 7}, ValueError, "`num_mask_samples` must be even"),
        ({"player_grid": 8}, ValueError, "more players than the backbone has patch tokens"),
        ({"player_grid": 3}, ValueError, "must divide the token grid"),
        ({"stage": "explainer"}, ValueError, "needs `surrogate_checkpoint`"),
        ({"stage": "teacher"}, ValueError, "`stage` must be one of"),
        ({"side_ratio": 3}, ValueError, "must divide the backbone width 16"),
        ({"side_heads": 3, "side_ratio": 4}, ValueError, "not divisible by 3 heads"),
        ({"attention_masking": "add"}, ValueError, "`attention_masking` must be one of"),
        ({"num_heatmaps": -1}, ValueError, "`num_heatmaps` must be an int >= 0"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        AutoGnothi(tiny_vit(), **kwargs)


def test_bad_backbones():
    with pytest.raises(TypeError, match="unsupported backbone"):
        AutoGnothi(nn.Linear(4, 2))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AutoGnothi("/nonexistent/model.ckpt")
    with pytest.raises(ValueError, match="applies to image backbones"):
        AutoGnothi(tiny_bert(), player_grid=2)


def test_missing_surrogate_checkpoint_is_a_clear_error(tmp_path):
    model = AutoGnothi(
        tiny_vit(), stage="explainer", surrogate_checkpoint=str(tmp_path / "nope.ckpt"), side_ratio=4
    )
    with pytest.raises(FileNotFoundError, match="train stage 1 first"):
        model.setup("fit")
    with pytest.raises(FileNotFoundError, match="train stage 1 first"):
        model(torch.randn(1, 1, 8, 8))


def test_surrogate_of_another_backbone_is_refused(tmp_path):
    path = surrogate_ckpt(AutoGnothi(tiny_vit(seed=1), side_ratio=4), tmp_path / "s.ckpt")
    model = AutoGnothi(tiny_vit(seed=2), stage="explainer", surrogate_checkpoint=path, side_ratio=4)
    with pytest.raises(ValueError, match="trained on a different backbone"):
        model.setup("fit")
    other = AutoGnothi(tiny_vit(seed=1), stage="explainer", surrogate_checkpoint=path, side_ratio=2)
    with pytest.raises(ValueError, match="does not match this model"):
        other.setup("fit")


def test_unfrozen_backbone_stops_training(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    model = AutoGnothi(tiny_vit(), side_ratio=4)
    model.backbone.heads.head.weight.requires_grad_(True)
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    data = DataLoader(TensorDataset(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)), batch_size=2)
    with pytest.raises(RuntimeError, match=r"`backbone.heads.head.weight` requires grad"):
        trainer.fit(model, data)


# --------------------------------------------------------------------------------------------------
# stage 1 -> stage 2 through the CLI
# --------------------------------------------------------------------------------------------------
FAST = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
]


def one_epoch(batches: int) -> list[str]:
    return [
        "--trainer.max_epochs=1",
        f"--trainer.limit_train_batches={batches}",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
        *FAST,
    ]


def run_cli(args):
    from lightning_eff.cli import LightningEffCLI

    return LightningEffCLI(args=args)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """The configs write to relative `outputs/explain/...` paths: run them inside tmp_path."""
    monkeypatch.setattr(sys, "argv", ["lightning-eff"])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_digits_classifier_surrogate_explainer_through_the_cli(in_tmp):
    from lightning_eff.explain.plots import HEATMAP_FORMAT_VERSION

    # step 0: the classifier to explain (a few steps; it only has to exist)
    run_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "digits_vit_classifier.yaml"),
            *one_epoch(3),
            "--test_after_fit=false",
        ]
    )
    clf = in_tmp / "outputs/explain/digits_vit_classifier/checkpoints/last.ckpt"
    assert clf.exists()
    # stage 1
    cli1 = run_cli(["fit", "--config", str(CONFIGS / "digits_surrogate.yaml"), *one_epoch(4)])
    assert "surrogate/val_kl" in cli1.trainer.callback_metrics
    assert "surrogate/train_kl_step" in cli1.trainer.logged_metrics
    s_ckpt = in_tmp / "outputs/explain/digits_surrogate/checkpoints/last.ckpt"
    assert s_ckpt.exists()
    # stage 2 (loads stage 1 from the checkpoint path in its config)
    cli2 = run_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "digits_explainer.yaml"),
            *one_epoch(3),
            "--model.init_args.num_mask_samples=4",
        ]
    )
    model = cli2.model
    assert float(cli2.trainer.callback_metrics["explainer/val_efficiency_gap"]) < 1e-5
    # the surrogate is frozen in stage 2: its weights equal stage 1's
    state = torch.load(s_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.surrogate_head.weight, state["surrogate_head.weight"])
    # the heatmap PNG was written (atomically, with its format version) and logged
    png = Path(model.last_heatmap_path)
    assert png.exists() and png.suffix == ".png"
    from PIL import Image

    assert Image.open(png).info.get("lightning_eff_format") == str(HEATMAP_FORMAT_VERSION)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(cli2.trainer.logger.log_dir)
    events.Reload()
    assert "explainer/heatmap" in events.Tags()["images"]
    # the final model reloads from its checkpoint and still returns the classifier's logits
    e_ckpt = in_tmp / "outputs/explain/digits_explainer/checkpoints/last.ckpt"
    final = AutoGnothi.load_from_checkpoint(e_ckpt, map_location="cpu").eval()
    from lightning_eff.models import ImageClassifier

    classifier = ImageClassifier.load_from_checkpoint(clf, map_location="cpu").eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        out = final(x)
        assert torch.equal(out.logits, classifier(x))
        torch.testing.assert_close(out.phi, model.eval()(x).phi)
    # resume: a second epoch from the stage-2 checkpoint continues where it stopped
    cli3 = run_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "digits_explainer.yaml"),
            *one_epoch(3),
            "--trainer.max_epochs=2",
            "--model.init_args.num_mask_samples=4",
            f"--ckpt_path={e_ckpt}",
        ]
    )
    assert cli3.trainer.global_step == 6 and cli3.trainer.current_epoch == 2
    torch.testing.assert_close(cli3.model.surrogate_null, model.surrogate_null)


def test_text_stages_through_the_cli(in_tmp):
    bert_dir = in_tmp / "tiny-bert"
    tiny_bert().save_pretrained(bert_dir)
    common = [*one_epoch(2), f"--model.init_args.backbone={bert_dir}"]
    run_cli(["fit", "--config", str(CONFIGS / "text_surrogate.yaml"), *common])
    s_ckpt = in_tmp / "outputs/explain/text_surrogate/checkpoints/last.ckpt"
    assert s_ckpt.exists()
    cli = run_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "text_explainer.yaml"),
            *common,
            "--model.init_args.num_mask_samples=4",
        ]
    )
    assert "explainer/val_loss" in cli.trainer.callback_metrics
    inputs, _ = text_batch(4)
    out = cli.model.eval()(inputs)
    assert torch.equal(out.logits, cli.model.backbone(**inputs).logits)
    assert torch.equal(out.phi[~out.valid], torch.zeros_like(out.phi[~out.valid]))


def test_explainer_learns_exact_shapley_values_of_the_surrogate(tmp_path):
    """A short fit of both stages on digits (4 players): phi moves towards the exact Shapley values of v."""
    import functools

    import lightning as L

    from lightning_eff.data import DigitsDataModule

    torch.manual_seed(0)
    dm = DigitsDataModule(image_size=8, batch_size=64)
    backbone = tiny_vit()
    opt = functools.partial(torch.optim.AdamW, lr=3e-3)
    kw = {"side_ratio": 2, "player_grid": 2, "num_heatmaps": 0, "optimizer": opt}
    trainer_kw = {
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "enable_checkpointing": False,
        "default_root_dir": tmp_path,
    }
    surrogate = AutoGnothi(backbone, **kw)
    L.Trainer(max_steps=30, **trainer_kw).fit(surrogate, dm)
    path = surrogate_ckpt(surrogate, tmp_path / "surrogate.ckpt")

    def explainer():
        model = AutoGnothi(
            backbone,
            stage="explainer",
            surrogate_checkpoint=path,
            explainer_hidden_dim=64,
            num_mask_samples=8,
            **kw,
        )
        model.ensure_loaded()
        return model

    untrained, model = explainer(), explainer()
    L.Trainer(max_steps=60, **trainer_kw).fit(model, dm)
    x = dm.test_set.tensors[0][:12]
    with torch.no_grad():
        phi, phi0 = model.eval()(x).phi, untrained.eval()(x).phi
    exact = torch.stack([exact_shapley(model.value_function(x[i : i + 1]), 4) for i in range(len(x))])
    assert (phi - exact).pow(2).mean() < 0.5 * (phi0 - exact).pow(2).mean()
