"""The transformers-facing parts other than token compression, on tiny random models of several families,
so that the oldest supported transformers (the second CI environment, ``make test-oldest``) exercises them:

* ``CausalLMModule`` fine-tunes and evaluates tiny Llama, Qwen2, Mistral, Phi-3 and GPT-2 models from configs,
  with prompts wrapped by a chat template applied through the tokenizer (``apply_chat_template``);
* Data Whisperer's attention re-run (``layer_attention``) equals the eager ``output_attentions`` of the same
  model (the independent reference) for those families;
* AutoGnothi wraps ``ViTForImageClassification`` and ``BertForSequenceClassification``: the final model's logits
  are the backbone's and removed players cannot influence the surrogate.
"""

from __future__ import annotations

import inspect

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_eff.llm import CausalLMModule, InstructionCollator, InstructionDataModule
from lightning_eff.llm.tokenization import load_tokenizer

pytestmark = pytest.mark.transformers_compat

CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
FAMILIES = {
    "llama": dict(model_type="llama", num_key_value_heads=2, **SMALL),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2, **SMALL),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, sliding_window=None, **SMALL),
    "phi3": dict(model_type="phi3", num_key_value_heads=2, pad_token_id=0, **SMALL),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=256),
}


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory):
    """The built-in BPE tokenizer with a chat template, saved to a local directory (how users pass one)."""
    tok = load_tokenizer("arithmetic-bpe")
    tok.chat_template = CHAT
    path = tmp_path_factory.mktemp("chat_tok")
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_causal_lm_module_fits_and_evaluates_with_a_chat_template(family, chat_tokenizer_dir, tmp_path):
    torch.manual_seed(0)
    tok = load_tokenizer(chat_tokenizer_dir)
    assert tok.chat_template == CHAT
    collate = InstructionCollator(tok, chat_template=True)
    q = "What is 2 + 3?"
    # the prompt is the tokenizer's own chat template rendering (not a string built by the library)
    want = tok.apply_chat_template(
        [{"role": "user", "content": collate.prompt_template.format(question=q)}],
        tokenize=True, add_generation_prompt=True,
    )  # fmt: skip
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert collate.prompt_ids(q) == list(want)
    module = CausalLMModule(FAMILIES[family], tokenizer=chat_tokenizer_dir, max_new_tokens=4)
    dm = InstructionDataModule(
        num_train=8, num_val=4, num_test=4, tokenizer=chat_tokenizer_dir, chat_template=True, batch_size=4
    )
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, dm)
    out = trainer.validate(module, dm, verbose=False)[0]
    assert torch.isfinite(torch.tensor(out["val/loss"])) and 0.0 <= out["val/exact_match"] <= 1.0
    # the loss is the mean cross-entropy over the answer tokens (checked by hand on one batch)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    module.eval()  # GPT-2 has dropout
    with torch.no_grad():
        loss = module(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
        logits = module(batch["input_ids"], batch["attention_mask"]).logits
    sel = batch["labels"][:, 1:] != -100
    ref = F.cross_entropy(logits[:, :-1][sel], batch["labels"][:, 1:][sel])
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    # generation runs on left-padded chat prompts and returns one string per prompt
    answers = module.generate_answers(batch["prompt_ids"], batch["prompt_attention_mask"], max_new_tokens=3)
    assert len(answers) == batch["prompt_ids"].shape[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_data_whisperer_attention_rerun_equals_eager_output_attentions(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_eff.select.data_whisperer import layer_attention

    torch.manual_seed(0)
    cfg = dict(FAMILIES[family])
    config = AutoConfig.for_model(cfg.pop("model_type"), vocab_size=64, **cfg)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(1, 64, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    got = layer_attention(model, ids, mask, layer=1, last_rows=5)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True).attentions[1]
    torch.testing.assert_close(got, ref.float().sum(1)[:, -5:], atol=1e-5, rtol=1e-5)


def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=32, num_labels=10)  # fmt: skip
    return ViTForImageClassification(cfg).eval()


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=2)  # fmt: skip
    return BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("kind", ["vit", "bert"])
def test_autognothi_wraps_hf_vit_and_bert(kind):
    from lightning_eff.explain import AutoGnothi, SyntheticTextDataModule

    backbone = _hf_vit() if kind == "vit" else _bert()
    if kind == "vit" and "attention_mask" not in inspect.signature(type(backbone).forward).parameters:
        # AutoGnothi removes ViT players through the attention mask, which ViTs take from transformers 5 on:
        # before, a clear error
        with pytest.raises(TypeError, match="takes no `attention_mask`"):
            AutoGnothi(backbone, side_ratio=4)
        return
    model = AutoGnothi(backbone, side_ratio=4).eval()
    if kind == "vit":
        x = torch.randn(3, 1, 8, 8)
        with torch.no_grad():
            ref = backbone(pixel_values=x).logits
        n = 16
    else:
        dm = SyntheticTextDataModule(num_samples=40, max_len=10, batch_size=4)
        dm.setup()
        x, _ = next(iter(dm.val_dataloader()))
        with torch.no_grad():
            ref = backbone(**x).logits
        n = x["input_ids"].shape[1] - 1
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out.logits, ref)  # the frozen backbone's own logits
    # a player that is removed cannot influence the surrogate: change it, the value stays the same
    keep = torch.ones(ref.shape[0], 1, n, dtype=torch.bool)
    keep[:, :, 0] = False
    if kind == "vit":
        x2 = x.clone()
        x2[:, :, :2, :2] = 7.0  # patch 0
    else:
        x2 = {k: v.clone() for k, v in x.items()}
        x2["input_ids"][:, 1] = (x2["input_ids"][:, 1] + 1) % 32  # player 0 = the token after CLS
    with torch.no_grad():
        torch.testing.assert_close(model.surrogate_values(x, keep), model.surrogate_values(x2, keep), atol=1e-6, rtol=0)


def test_oldest_ci_pin_is_the_declared_floor():
    """The second CI environment tests exactly the lowest transformers that pyproject.toml allows."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    floor = re.search(r'"transformers>=([0-9.]+),<6"', (root / "pyproject.toml").read_text()).group(1)
    pin = re.search(r"OLDEST_TRANSFORMERS := transformers==([0-9.]+)", (root / "Makefile").read_text()).group(1)
    assert pin.split(".")[:2] == floor.split(".")[:2], (floor, pin)
