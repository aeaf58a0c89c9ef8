"""TokenCompression as a Lightning callback: the real CLI with the YAMLs of configs/tokens, stage handling,
logged metrics against hand values, ViT encoders (torchvision and transformers) against a manual reference,
TinyVLM checkpoints, and bad arguments."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
from _flops import measured_layer_flops
from helpers import cpu_trainer
from lightning.pytorch.callbacks import Callback

from lightning_eff.cli import LightningEffCLI
from lightning_eff.data import DigitsDataModule
from lightning_eff.models import ConvNet, ImageClassifier
from lightning_eff.tokens import (
    DART,
    FastV,
    FLOPsSaved,
    KeptTokenRatio,
    PrefillLatency,
    Random,
    TinyVLM,
    TokenCompression,
    ViTTokenPruner,
    dart_keep_indices,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-eff"])


def _trainer(tmp_path, callbacks, **kw):
    return cpu_trainer(tmp_path, callbacks=callbacks, **{"accelerator": "auto", "devices": "auto", **kw})


def test_cli_fit_with_dart_config(tmp_path, plain_argv):
    cli = LightningEffCLI(
        args=[
            "fit",
            "--config",
            str(ROOT / "configs" / "tokens" / "digits_vlm_dart.yaml"),
            "--data.init_args.image_size=8",
            "--model.init_args.image_size=8",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=2",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    metrics = cli.trainer.callback_metrics
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, TokenCompression)]
    # 8x8 digits: 64 image tokens, DART(max_kept=28) keeps 4 + 8 * 3 = 28
    assert float(metrics["tokens/kept_ratio"]) == pytest.approx(28 / 64)
    # FLOPs saved against an independent count: torch's FlopCounterMode over the decoder layers of one batch
    # run with and without the same pruning (DART's own selection cost is inside the pruned count)
    model, dec = cli.model.eval(), cli.model.lm.model
    images = torch.randn(4, 1, 8, 8)
    full = measured_layer_flops(model, dec, lambda: model(images))
    with TokenCompression(DART(num_kept=28), layer=2).attached_to(model):
        pruned = measured_layer_flops(model, dec, lambda: model(images))
    assert float(metrics["tokens/flops_saved"]) == pytest.approx(1 - pruned / full, abs=0.01)
    assert 0.2 < 1 - pruned / full < 0.4  # pruning 36 of 77 tokens in 2 of 4 layers
    assert "test/acc" in metrics
    assert not cb.pruner.attached
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in cli.model.modules())


def test_cli_vit_config_validates_with_pruning(tmp_path, plain_argv):
    cli = LightningEffCLI(
        args=[
            "validate",
            "--config",
            str(ROOT / "configs" / "tokens" / "digits_vit_dart.yaml"),
            "--trainer.limit_val_batches=2",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    # 64 patches, DART(max_kept=8, p_img=8, p_txt=0) keeps 8 + 8 * 1 = 16
    assert float(cli.trainer.callback_metrics["tokens/kept_ratio"]) == pytest.approx(16 / 64)


class _Spy(Callback):
    def __init__(self, cb):
        self.cb, self.seen = cb, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.seen.append(("train", self.cb.pruner.attached))

    def on_validation_batch_end(self, trainer, pl_module, *args, **kw):
        self.seen.append(("val", self.cb.pruner.attached))


@pytest.mark.parametrize("stages,train_on", [(("validate",), False), (("fit", "validate"), True)])
def test_callback_attaches_only_in_its_stages(tmp_path, stages, train_on):
    dm = DigitsDataModule(image_size=8, batch_size=32)
    model = TinyVLM(image_size=8, patch_size=2)
    cb = TokenCompression(Random(keep_ratio=0.5), layer=2, stages=stages)
    spy = _Spy(cb)
    _trainer(
        tmp_path, [cb, spy], max_epochs=1, limit_train_batches=2, limit_val_batches=2, num_sanity_val_steps=0
    ).fit(model, dm)
    assert ("train", train_on) in spy.seen and ("train", not train_on) not in spy.seen
    assert ("val", True) in spy.seen and ("val", False) not in spy.seen
    assert not cb.pruner.attached


def test_prefill_latency_is_logged_and_predict_prunes(tmp_path):
    dm = DigitsDataModule(image_size=8, batch_size=16)
    model = TinyVLM(image_size=8, patch_size=1)
    cb = TokenCompression(DART(num_kept=16), layer=1, measure_latency=True)
    _trainer(tmp_path, [cb], limit_test_batches=2).test(model, dm)
    # TinyVLM calls the decoder with inputs_embeds; the latency is measured around each prefill
    assert cb.pruner is not None
    preds = _trainer(tmp_path, [cb], limit_predict_batches=1).predict(model, dm.test_dataloader())
    assert preds[0].shape == (16,)
    # predict does not log: the epoch's values are in `summary` (16 images x 64 tokens, DART keeps 4 + 8 * 2)
    assert cb.summary["tokens/kept_ratio"] == pytest.approx((4 + 8 * 2) / 64)
    assert cb.summary["tokens/prefill_ms"] > 0 and cb.summary["tokens/kv_saved_bytes"] > 0


def test_callback_metrics_logged_under_tokens(tmp_path):
    dm = DigitsDataModule(image_size=8, batch_size=16)
    model = TinyVLM(image_size=8, patch_size=1)
    cb = TokenCompression(DART(num_kept=16), layer=1, measure_latency=True)
    out = _trainer(tmp_path, [cb], limit_test_batches=2).test(model, dm)[0]
    assert out["tokens/kept_ratio"] == pytest.approx(20 / 64)
    assert out["tokens/prefill_ms"] > 0 and 0 < out["tokens/flops_saved"] < 1


def _tv_vit():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=16, patch_size=2, num_layers=4, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5
    ).eval()
    with torch.no_grad():
        vit.encoder.pos_embedding.normal_(0, 0.5)
        vit.heads.head.weight.normal_(0, 0.5)  # torchvision initialises the head to zeros
    return vit


@torch.no_grad()
def test_torchvision_vit_dart_equals_manual_reference():
    vit = _tv_vit()
    x = torch.randn(3, 3, 16, 16)
    with ViTTokenPruner(DART(num_kept=12, num_image_pivots=4, num_text_pivots=0), layer=2).attach(vit) as p:
        got = vit(x)
    # manual: blocks 0-1 on all 65 tokens, keys of block 1 from its fused in_proj, DART on patches, blocks 2-3
    h = vit._process_input(x)
    h = torch.cat([vit.class_token.expand(3, -1, -1), h], dim=1) + vit.encoder.pos_embedding
    blocks = list(vit.encoder.layers)
    for i in range(2):
        if i == 1:
            mha = blocks[1].self_attention
            keys = torch.nn.functional.linear(
                blocks[1].ln_1(h), mha.in_proj_weight[32:64], mha.in_proj_bias[32:64]
            )
        h = blocks[i](h)
    normed = vit.encoder.ln(h)
    rows = []
    for b in range(3):
        kept = dart_keep_indices(
            normed[b], keys[b], 1, 64, num_image_pivots=4, num_text_pivots=0, max_kept=12
        )
        assert p.last_record.keep_index[b].tolist() == [0, *kept.tolist()]
        rows.append(h[b, [0, *kept.tolist()]])
    h = torch.stack(rows)
    for blk in blocks[2:]:
        h = blk(h)
    want = vit.heads(vit.encoder.ln(h)[:, 0])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert p.last_record.kept_len == 1 + 4 + 4 * 3
    assert (got - vit(x)).abs().max() > 1e-3  # detached again: the unpruned model gives other logits


@torch.no_grad()
def test_hf_vit_dart_equals_manual_reference():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=16,
            patch_size=2,
            num_labels=4,
        )
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    with ViTTokenPruner(DART(num_kept=10, num_image_pivots=2, num_text_pivots=0), layer=1).attach(model) as p:
        got = model(pixel_values=x).logits
    vit = model.vit
    layers = vit.layers if hasattr(vit, "layers") else vit.encoder.layer
    h = vit.embeddings(x)
    blk = layers[0]
    k_lin = blk.attention.k_proj if hasattr(blk.attention, "k_proj") else blk.attention.attention.key
    keys = k_lin(blk.layernorm_before(h))
    h = blk(h)
    h = h[0] if isinstance(h, tuple) else h
    normed = vit.layernorm(h)
    kept = [dart_keep_indices(normed[b], keys[b], 1, 64, 2, 0, 10).tolist() for b in range(2)]
    h = torch.stack([h[b, [0, *kept[b]]] for b in range(2)])
    for blk in layers[1:]:
        h = blk(h)
        h = h[0] if isinstance(h, tuple) else h
    want = model.classifier(vit.layernorm(h)[:, 0])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert p.last_record.kept_len == 1 + 2 + 2 * 5
    assert (got - model(pixel_values=x).logits).abs().max() > 1e-4  # unpruned logits differ
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ref_state.items())


def test_vit_callback_on_image_classifier(tmp_path):
    net = torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10
    )
    model = ImageClassifier(net)
    cb = TokenCompression(Random(num_kept=4), layer=1)
    out = _trainer(tmp_path, [cb], limit_val_batches=2).validate(
        model, DigitsDataModule(image_size=16, channels=3)
    )
    assert out[0]["tokens/kept_ratio"] == pytest.approx(4 / 16)
    with pytest.raises(ValueError, match="needs attention weights"):
        ViTTokenPruner(FastV(num_kept=4), layer=1)
    with pytest.raises(ValueError, match=r"`layer`=3 is beyond the encoder's depth: it has 3 blocks"):
        ViTTokenPruner(Random(num_kept=4), layer=3).attach(net)


def test_tinyvlm_checkpoint_roundtrip(tmp_path):
    dm = DigitsDataModule(image_size=8, batch_size=32)
    model = TinyVLM(image_size=8, patch_size=2, decoder={"hidden_size": 32, "intermediate_size": 64})
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=1,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = TinyVLM.load_from_checkpoint(ckpt, weights_only=True)
    x = torch.randn(4, 1, 8, 8)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.lm.config.hidden_size == 32
    # resuming continues from the saved step
    trainer2 = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=5,
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=1,
        enable_model_summary=False,
    )
    trainer2.fit(
        TinyVLM(image_size=8, patch_size=2, decoder={"hidden_size": 32, "intermediate_size": 64}),
        dm,
        ckpt_path=ckpt,
    )
    assert trainer2.global_step == 5


def test_metrics_against_hand_values():
    k = KeptTokenRatio()
    k.update(torch.tensor([10, 20]), torch.tensor([100, 100]))
    assert float(k.compute()) == pytest.approx(0.15)
    f = FLOPsSaved()
    f.update(200.0, 50.0)
    f.update(100.0, 50.0)
    assert float(f.compute()) == pytest.approx(1 - 100 / 300)
    lat = PrefillLatency()
    lat.update(torch.tensor([1.0, 2.0, 6.0]))
    assert float(lat.compute()) == pytest.approx(3.0)


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="`selector` must be a TokenSelector"):
        TokenCompression("DART")
    with pytest.raises(ValueError, match="`layer` must be an int >= 1"):
        TokenCompression(DART(num_kept=8), layer=0)
    with pytest.raises(ValueError, match="`stages` must be a non-empty subset"):
        TokenCompression(DART(num_kept=8), stages=["training"])
    with pytest.raises(ValueError, match="`target` must be 'auto', 'decoder' or 'vit'"):
        TokenCompression(DART(num_kept=8), target="llm")
    with pytest.raises(ValueError, match="not both"):
        TokenCompression(DART(num_kept=8), image_token_id=3, span=(0, 4))
    with pytest.raises(ValueError, match=r"`span` must be \(start, length\) ints"):
        TokenCompression(DART(num_kept=8), span=(0,))
    convnet = ImageClassifier(ConvNet(in_channels=1, num_classes=10, width=8, image_size=8))
    with pytest.raises(ValueError, match="no supported model in ImageClassifier"):
        TokenCompression(DART(num_kept=8)).setup(None, convnet, "validate")
    with pytest.raises(ValueError, match=r"`layer`=4 is beyond the decoder's depth"):
        TokenCompression(DART(num_kept=8), layer=4).setup(None, TinyVLM(image_size=8), "validate")
    with pytest.raises(ValueError, match="needs attention weights"):
        TokenCompression(FastV(num_kept=8)).setup(None, TinyVLM(image_size=8), "validate")
    with pytest.raises(ValueError, match="`patch_size`=3"):
        TinyVLM(image_size=8, patch_size=3)
    with pytest.raises(ValueError, match="`attn_implementation` must be 'sdpa' or 'eager'"):
        TinyVLM(attn_implementation="flash")
