"""lightning_eff.llm: arithmetic data, JSONL loading, answer metrics, tokenizer, collator, CausalLMModule."""

from __future__ import annotations

import itertools
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_eff.llm import (
    IGNORE_INDEX,
    CausalLMModule,
    InstructionCollator,
    InstructionDataModule,
    build_causal_lm,
    exact_match,
    extract_answer,
    extract_predictions,
    generate_arithmetic,
    load_instructions,
    load_tokenizer,
    rouge_l_f1,
    train_bpe_tokenizer,
)
from lightning_eff.llm.metrics import lcs_length, rouge_tokenize

ROOT = Path(__file__).resolve().parents[1]
LLM_CONFIG = ROOT / "configs" / "llm" / "arithmetic.yaml"
TINY = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
TINY_ARGS = [
    "--model.init_args.model.hidden_size=32",
    "--model.init_args.model.intermediate_size=64",
    "--model.init_args.model.num_hidden_layers=2",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("arithmetic-bpe")


# ------------------------------------------------------------------------------------------------
# generated data
# ------------------------------------------------------------------------------------------------
_STEP = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)")


def test_arithmetic_answers_are_correct_and_noise_is_exact():
    data = generate_arithmetic(300, seed=3, noise=0.2)
    assert data == generate_arithmetic(300, seed=3, noise=0.2)
    assert data != generate_arithmetic(300, seed=4, noise=0.2)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    n_wrong = 0
    for ex in data:
        lines = ex["answer"].splitlines()
        assert lines[-1].startswith("#### ")
        steps = [_STEP.match(line).groups() for line in lines[:-1]]
        assert len(steps) == ex["steps"] in (1, 2)
        results = [ops[op](int(a), int(b)) == int(r) for a, op, b, r in steps]
        assert all(results[:-1])  # earlier steps are always right
        assert int(lines[-1][5:]) == int(steps[-1][3]) >= 0
        assert results[-1] == (not ex["corrupted"])
        # the numbers of the question appear in the first step
        assert steps[0][0] in ex["question"] and steps[0][2] in ex["question"]
        n_wrong += ex["corrupted"]
    assert n_wrong == 60


def test_arithmetic_bad_arguments():
    with pytest.raises(ValueError, match="noise"):
        generate_arithmetic(5, noise=1.5)
    with pytest.raises(ValueError, match="max_steps"):
        generate_arithmetic(5, max_steps=3)
    with pytest.raises(ValueError, match="num_examples"):
        generate_arithmetic(-1)


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
def test_load_jsonl_and_json_with_custom_fields(tmp_path):
    rows = [
        {"instr": "Add 2 and 3", "ctx": "numbers", "out": "#### 5"},
        {"instr": "Hi", "ctx": "", "out": "Hello"},
    ]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    js = tmp_path / "d.json"
    js.write_text(json.dumps(rows))
    for path in (jsonl, js):
        recs = load_instructions(path, question_field="instr", answer_field="out", input_field="ctx")
        assert [r["question"] for r in recs] == ["Add 2 and 3\nnumbers", "Hi"]
        assert [r["answer"] for r in recs] == ["#### 5", "Hello"]
        assert recs[0]["ctx"] == "numbers"


def test_load_errors_name_the_problem(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n{"question": "c", "solution": "d"}\n')
    with pytest.raises(ValueError, match=r"line 2 has no field 'answer'.*\['question', 'solution'\]"):
        load_instructions(path)
    path.write_text('{"question": "a", "answer": "b"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_instructions(path)
    with pytest.raises(FileNotFoundError):
        load_instructions(tmp_path / "missing.jsonl")
    dm = InstructionDataModule(data_path=str(tmp_path / "d.jsonl"), answer_field="answer")
    path.write_text('{"q": "a", "answer": "b"}\n')
    with pytest.raises(ValueError, match="no field 'question'"):
        dm.setup("fit")


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def test_answer_parsing():
    assert extract_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert extract_answer("#### 1,234") == "1,234" and exact_match("1,234", "1234") == 1.0
    assert extract_answer("It costs $5.50 in total") == "5.50"
    assert extract_answer("#### -4") == "-4"
    assert extract_predictions("Q1: #### 3\nQ2: 1 + 1 = 2\n####2\nQ3: #### -1.5.") == ["3", "2", "-1.5"]
    assert exact_match("2.50", "2.5") == 1.0 and exact_match("", "") == 0.0 and exact_match("7", "") == 0.0


def _lcs_brute(a, b):
    best = 0
    for r in range(len(a), 0, -1):
        for sub in itertools.combinations(a, r):
            it = iter(b)
            if all(x in it for x in sub):  # subsequence test
                return r
    return best


def test_rouge_l_against_brute_force_and_hand_values():
    g = torch.Generator().manual_seed(0)
    words = ["a", "b", "c", "d"]
    for _ in range(30):
        a = [
            words[i] for i in torch.randint(0, 4, (int(torch.randint(0, 7, (1,), generator=g)),), generator=g)
        ]
        b = [
            words[i] for i in torch.randint(0, 4, (int(torch.randint(0, 7, (1,), generator=g)),), generator=g)
        ]
        assert lcs_length(a, b) == _lcs_brute(a, b)
    # "the cat sat on the mat" vs "the cat is on the mat": LCS = 5 (the cat on the mat), P = R = 5/6
    assert rouge_l_f1("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # P = 2/2, R = 2/4 -> F1 = 2 * 1 * .5 / 1.5
    assert rouge_l_f1("Police KILLED", "police killed the gunman") == pytest.approx(2 / 3)
    assert rouge_tokenize("Don't STOP-now!") == ["don", "t", "stop", "now"]
    assert rouge_l_f1("x", "") == 0.0


# ------------------------------------------------------------------------------------------------
# tokenizer and collator
# ------------------------------------------------------------------------------------------------
def test_bpe_tokenizer_roundtrip_offsets_and_digits(tok):
    text = "Mia has 128 shells.\nAnswer:\n#### 42"
    enc = tok(text, return_offsets_mapping=True)
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == text
    assert enc["input_ids"][0] == tok.bos_token_id
    pieces = [text[s:e] for s, e in enc["offset_mapping"][1:]]
    assert "".join(pieces) == text
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["1", "2", "8", "4", "2"]
    small = train_bpe_tokenizer(["aaa bbb"] * 10, vocab_size=270)
    assert len(small) <= 270


def test_builtin_tokenizer_phrases_are_data_whisperers_prompt(tok):
    """The phrases handed to the built-in tokenizer (llm/arithmetic.py) are those of select's default ICL prompt,
    and the tokenizer encodes each of them in few tokens (what they are in its corpus for)."""
    from lightning_eff.llm import ICL_PROMPT_PHRASES, arithmetic_corpus
    from lightning_eff.select.prompts import ICLTemplate, build_icl_prompt

    records = [{"question": f"q{i}?", "answer": f"#### {i}"} for i in range(3)]
    prompt = build_icl_prompt(records[:1], records).text + ICLTemplate().format_answers(["1", "2", "3"])
    for phrase in ICL_PROMPT_PHRASES:
        assert phrase in prompt
    corpus = arithmetic_corpus()
    assert corpus[-len(ICL_PROMPT_PHRASES) :] == list(ICL_PROMPT_PHRASES)
    bare = train_bpe_tokenizer(arithmetic_corpus(phrases=()), vocab_size=512)
    n_with = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in ICL_PROMPT_PHRASES)
    n_without = sum(len(bare(p, add_special_tokens=False)["input_ids"]) for p in ICL_PROMPT_PHRASES)
    assert n_with < n_without


def test_collator_loss_mask_and_prompts(tok):
    collate = InstructionCollator(tok)
    items = [
        (3, {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}),
        (7, {"question": "Hi?", "answer": "#### 1"}),
    ]
    b = collate(items)
    assert b["index"].tolist() == [3, 7] and b["answers"] == ["2 + 3 = 5\n#### 5", "#### 1"]
    for i, (_, rec) in enumerate(items):
        labels = b["labels"][i]
        assert tok.decode(labels[labels != IGNORE_INDEX]) == rec["answer"] + tok.eos_token
        prompt = b["prompt_ids"][i][b["prompt_attention_mask"][i].bool()]
        n = len(prompt)
        assert b["input_ids"][i, :n].tolist() == prompt.tolist()  # generation prompt == training prefix
        assert (labels[:n] == IGNORE_INDEX).all()
        assert tok.decode(prompt, skip_special_tokens=True) == f"Question: {rec['question']}\nAnswer:\n"
    assert b["prompt_attention_mask"][1, 0] == 0 and b["prompt_attention_mask"][1, -1] == 1  # left padded
    assert b["attention_mask"][1, 0] == 1 and b["attention_mask"][1, -1] == 0  # right padded
    short = InstructionCollator(tok, max_length=14)  # the first answer is 12 tokens with EOS
    with pytest.warns(UserWarning, match="max_length"):
        t = short(items)
    assert t["input_ids"].shape[1] == 14
    labels = t["labels"][0]
    assert tok.decode(labels[labels != IGNORE_INDEX]) == "2 + 3 = 5\n#### 5</s>"
    full_prompt = collate.prompt_ids(items[0][1]["question"])
    assert t["input_ids"][0, :2].tolist() == full_prompt[-2:]  # prompt cut from the left


def test_datamodule_splits(tmp_path):
    dm = InstructionDataModule(num_train=200, num_val=40, num_test=40, noise=0.5, seed=2)
    dm.setup()
    train_q = {r["question"] for r in dm.train_records}
    assert len(dm.train_records) == 200 and sum(r["corrupted"] for r in dm.train_records) == 100
    assert not any(r["corrupted"] for r in dm.val_records + dm.test_records)
    assert not train_q & {r["question"] for r in dm.val_records + dm.test_records}
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) for i in range(30)))
    fdm = InstructionDataModule(data_path=str(path), num_train=None, num_val=5, num_test=5)
    fdm.setup()
    qs = [r["question"] for r in fdm.train_records + fdm.val_records + fdm.test_records]
    assert sorted(qs) == sorted(f"q{i}" for i in range(30)) and len(fdm.train_records) == 20
    with pytest.raises(ValueError, match="num_val"):
        InstructionDataModule(num_val=-1)
    with pytest.raises(ValueError, match="prompt_template"):
        InstructionDataModule(prompt_template="no placeholder")
    with pytest.raises(ValueError, match="data_path"):
        InstructionDataModule(val_path="x.jsonl")
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="too few"):
        InstructionDataModule(data_path=str(empty)).setup()


# ------------------------------------------------------------------------------------------------
# CausalLMModule
# ------------------------------------------------------------------------------------------------
def test_module_bad_arguments():
    with pytest.raises(ValueError, match="tokenizer"):
        CausalLMModule(TINY)
    with pytest.raises(ValueError, match="model_type"):
        CausalLMModule({"hidden_size": 8}, tokenizer="arithmetic-bpe")
    with pytest.raises(ValueError, match="metric"):
        CausalLMModule(TINY, tokenizer="arithmetic-bpe", metric="bleu")
    with pytest.raises(ValueError, match="max_new_tokens"):
        CausalLMModule(TINY, tokenizer="arithmetic-bpe", max_new_tokens=0)
    with pytest.raises(TypeError, match="model"):
        CausalLMModule(3, tokenizer="arithmetic-bpe")
    module = CausalLMModule("/no/such/model", tokenizer="arithmetic-bpe")
    with pytest.raises(ValueError, match="not an existing local directory"):
        module.configure_model()
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokenizer("no-such-tokenizer")


def test_loss_is_on_answer_tokens_only(tok):
    torch.manual_seed(0)
    module = CausalLMModule(TINY, tokenizer="arithmetic-bpe")
    module.configure_model()
    batch = InstructionCollator(tok)([(i, r) for i, r in enumerate(generate_arithmetic(3, seed=1))])
    loss = module(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
    logits = module(batch["input_ids"], batch["attention_mask"]).logits
    total, n = 0.0, 0
    for i in range(3):
        for t in range(1, batch["input_ids"].shape[1]):
            if batch["labels"][i, t] != IGNORE_INDEX:
                total += float(F.cross_entropy(logits[i, t - 1], batch["labels"][i, t]))
                n += 1
    n_answer = sum(
        len(tok(r["answer"], add_special_tokens=False)["input_ids"]) + 1 for r in batch_records(batch)
    )
    assert n == n_answer
    assert float(loss) == pytest.approx(total / n, rel=1e-5)


def batch_records(batch):
    return [{"answer": a} for a in batch["answers"]]


def test_generation_score_is_logged(monkeypatch, tmp_path):
    """val/exact_match is the mean of per-example scores of the generated answers (stubbed here)."""
    import lightning as L

    torch.manual_seed(0)
    dm = InstructionDataModule(num_train=8, num_val=6, num_test=6, batch_size=4, eval_batch_size=4)
    module = CausalLMModule(TINY, tokenizer="arithmetic-bpe", max_new_tokens=4)
    answers = iter([])

    def fake_generate(prompt_ids, mask, max_new_tokens=None):
        return [next(answers) for _ in range(prompt_ids.shape[0])]

    monkeypatch.setattr(module, "generate_answers", fake_generate)
    dm.setup()
    refs = [r["answer"] for r in dm.test_records]
    # 4 right (the reference itself), 2 wrong
    answers = iter(refs[:4] + ["#### 99999", "nothing"])
    trainer = L.Trainer(
        logger=False, enable_progress_bar=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    out = trainer.test(module, datamodule=dm, verbose=False)
    assert out[0]["test/exact_match"] == pytest.approx(4 / 6)


def test_real_generation_decodes_new_tokens_only(tok):
    torch.manual_seed(0)
    module = CausalLMModule(TINY, tokenizer="arithmetic-bpe", max_new_tokens=5)
    module.configure_model()
    module.eval()
    batch = InstructionCollator(tok)(
        [
            (0, {"question": "Hi?", "answer": "#### 1"}),
            (1, {"question": "Longer question?", "answer": "#### 2"}),
        ]
    )
    out = module.generate_answers(batch["prompt_ids"], batch["prompt_attention_mask"])
    ids = module.model.generate(
        input_ids=batch["prompt_ids"][1:],
        attention_mask=batch["prompt_attention_mask"][1:],
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    assert out[1] == tok.decode(ids[0, batch["prompt_ids"].shape[1] :], skip_special_tokens=True)
    assert "Question" not in out[1] or len(out[1]) < 40


def _fit_args(tmp_path, *extra):
    return [
        "fit",
        "--config",
        str(LLM_CONFIG),
        *TINY_ARGS,
        "--data.init_args.num_train=16",
        "--data.init_args.num_val=4",
        "--data.init_args.num_test=4",
        "--data.init_args.batch_size=4",
        "--data.init_args.eval_batch_size=4",
        "--model.init_args.max_new_tokens=4",
        "--trainer.max_steps=3",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.callbacks.init_args.dirpath={tmp_path / 'pretrained'}",
        *extra,
    ]


def test_cli_fit_saves_a_reloadable_model(tmp_path, monkeypatch):
    from lightning_eff.cli import LightningEffCLI

    monkeypatch.setattr(sys, "argv", ["lightning-eff"])
    cli = LightningEffCLI(args=_fit_args(tmp_path))
    metrics = cli.trainer.callback_metrics
    assert "test/exact_match" in metrics and 0.0 <= float(metrics["test/exact_match"]) <= 1.0
    assert cli.trainer.global_step == 3
    # the exported directory loads back as a plain transformers model with the same outputs
    reloaded = build_causal_lm(str(tmp_path / "pretrained")).eval()
    tok = load_tokenizer(str(tmp_path / "pretrained"))
    ids = torch.tensor([tok("Question: 1 + 1?")["input_ids"]])
    cli.model.model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, cli.model.model.cpu()(ids).logits, atol=1e-5)
    # and the Lightning checkpoint reloads with weights_only loading (plain hyperparameters)
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    again = CausalLMModule.load_from_checkpoint(ckpt, weights_only=True).eval()
    with torch.no_grad():
        assert torch.allclose(again.model(ids).logits, reloaded(ids).logits, atol=1e-5)


def test_cli_resume_continues_and_ko_optimizer(tmp_path, monkeypatch):
    from lightning_eff.cli import LightningEffCLI
    from lightning_eff.optim import KO

    monkeypatch.setattr(sys, "argv", ["lightning-eff"])
    cli = LightningEffCLI(
        args=_fit_args(
            tmp_path, "--optimizer=KO", "--optimizer.collision_rate=0.05", "--test_after_fit=false"
        )
    )
    assert isinstance(cli.trainer.optimizers[0], KO)
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    cli2 = LightningEffCLI(
        args=_fit_args(
            tmp_path / "b",
            "--trainer.max_steps=5",
            f"--ckpt_path={ckpt}",
            "--test_after_fit=false",
            "--optimizer=KO",
            "--optimizer.collision_rate=0.05",
        )
    )
    assert cli2.trainer.global_step == 5


def test_lora_trains_adapters_only(tok):
    pytest.importorskip("peft")
    torch.manual_seed(0)
    module = CausalLMModule(
        TINY, tokenizer="arithmetic-bpe", lora={"r": 4, "target_modules": ["q_proj", "v_proj"]}
    )
    module.configure_model()
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = InstructionCollator(tok)([(0, generate_arithmetic(1)[0])])
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    opt = module.configure_optimizers()
    module.training_step(batch, 0).backward()
    opt.step()
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(trainable)
