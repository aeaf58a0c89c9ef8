"""TokenCompression on a LightningModule that wraps a multimodal transformers model as ``self.model`` (tiny
random LLaVA), inside Lightning's validate and predict loops: the kept ratio, FLOPs saved (against torch's
FlopCounterMode), KV-cache bytes saved (against the bytes of the cache the model really returns) and the
prefill latency are reported; predictions equal those of the pruner attached by hand."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from _flops import measured_layer_flops
from _tiny_vlms import build, cache_bytes, inputs, text_decoder
from helpers import cpu_trainer
from torch.utils.data import DataLoader

from lightning_eff.tokens import DART, DecoderTokenPruner, TokenCompression

pytestmark = pytest.mark.transformers_compat

NEW = 3


class WrappedVLM(L.LightningModule):
    """The usual layout: the Hugging Face model is ``self.model``; batches are the processor's dicts."""

    def __init__(self) -> None:
        super().__init__()
        self.model = build("llava", seed=5)

    def forward(self, batch):
        return self.model(**batch).logits

    def validation_step(self, batch, batch_idx):
        self.log("val/last_logit_max", self(batch)[:, -1].max(), batch_size=batch["input_ids"].shape[0])

    def predict_step(self, batch, batch_idx):
        return self.model.generate(**batch, max_new_tokens=NEW, do_sample=False)


def _loader(model, n=4):
    items = []
    for s in range(n):
        kw, _, _ = inputs(model, "llava", seed=10 + s)
        items.append({k: v[0] for k, v in kw.items()})
    return DataLoader(items, batch_size=2)


def _hooks(module):
    return {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in module.named_modules()}


def _trainer(tmp_path, cb):
    return cpu_trainer(tmp_path, callbacks=[cb])


def test_validate_logs_kept_ratio_flops_kv_bytes_and_latency(tmp_path):
    module = WrappedVLM()
    dl = _loader(module.model)
    with torch.no_grad():
        module(next(iter(dl)))  # transformers may install its own hooks on a first call
    hooks = _hooks(module)
    cb = TokenCompression(DART(num_kept=16), layer=2, measure_latency=True)  # the config's image token
    out = _trainer(tmp_path, cb).validate(module, dl, verbose=False)[0]
    assert out["tokens/kept_ratio"] == pytest.approx(20 / 64)
    assert out["tokens/prefill_ms"] > 0
    # independent references on one batch: FLOPs torch counts in the decoder layers, bytes of the real cache
    batch = next(iter(dl))
    model, dec = module.model, text_decoder(module.model)
    with torch.no_grad():
        full_cache = model(**batch, use_cache=True).past_key_values
        full_flops = measured_layer_flops(model, dec, lambda: model(**batch))
        with DecoderTokenPruner(DART(num_kept=16), layer=2).attach(model):
            pruned_cache = model(**batch, use_cache=True).past_key_values
            pruned_flops = measured_layer_flops(model, dec, lambda: model(**batch))
    saved_per_seq = (cache_bytes(full_cache) - cache_bytes(pruned_cache)) / 2
    # 44 pruned tokens x 2 layers >= K x (K and V) x 2 KV heads x 16 dims x 4 bytes
    assert saved_per_seq == 44 * 2 * 2 * 2 * 16 * 4
    assert out["tokens/kv_saved_bytes"] == pytest.approx(saved_per_seq)
    assert out["tokens/kv_saved_ratio"] == pytest.approx(1 - cache_bytes(pruned_cache) / cache_bytes(full_cache))
    assert out["tokens/flops_saved"] == pytest.approx(1 - pruned_flops / full_flops, abs=0.01)
    assert not cb.pruner.attached
    assert _hooks(module) == hooks  # the callback left no hook behind


def test_predict_generates_with_pruning_and_keeps_a_summary(tmp_path):
    module = WrappedVLM()
    dl = _loader(module.model)
    cb = TokenCompression(DART(num_kept=16), layer=2, stages=("predict",))
    preds = _trainer(tmp_path, cb).predict(module, dl)
    assert cb.summary["tokens/kept_ratio"] == pytest.approx(20 / 64)
    assert cb.summary["tokens/kv_saved_bytes"] > 0
    with DecoderTokenPruner(DART(num_kept=16), layer=2).attach(module.model), torch.no_grad():
        want = [module.model.generate(**b, max_new_tokens=NEW, do_sample=False) for b in dl]
    plain = [module.model.generate(**b, max_new_tokens=NEW, do_sample=False) for b in dl]
    assert all(torch.equal(p, w) for p, w in zip(preds, want))
    assert any(not torch.equal(p, q) for p, q in zip(preds, plain))  # pruning changed some generation
