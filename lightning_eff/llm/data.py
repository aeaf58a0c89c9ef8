"""Instruction data for causal-LM fine-tuning: a JSON/JSONL loader, prompt formatting and a DataModule.

Records are plain dicts with ``question`` and ``answer`` (other keys are kept). :func:`load_instructions`
reads a local JSON list or JSONL file with configurable field names; :class:`InstructionDataModule`
serves the generated arithmetic problems (:func:`~lightning_eff.llm.arithmetic.generate_arithmetic`,
the embedded default) or local files, tokenised for training with the loss on answer tokens only, and
with left-padded prompts plus reference answers for generation-based evaluation.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_eff.llm.arithmetic import DEFAULT_PROMPT
from lightning_eff.utils.checks import check_float, check_int
from lightning_eff.utils.loaders import make_loader

__all__ = [
    "DEFAULT_PROMPT",
    "IGNORE_INDEX",
    "load_instructions",
    "InstructionDataset",
    "InstructionCollator",
    "InstructionDataModule",
]

#: Label of tokens that do not count in the loss (prompt and padding).
IGNORE_INDEX = -100

def load_instructions(
    path: str | os.PathLike,
    question_field: str = "question",
    answer_field: str = "answer",
    input_field: str | None = None,
) -> list[dict]:
    """Read instruction records from a local JSON list or JSONL file.

    Each record becomes ``{"question": ..., "answer": ..., **other fields}``; with ``input_field`` a non-empty
    input is appended to the question on a new line (Alpaca / BioInstruct style: instruction + input).

    Args:
        path: ``.jsonl`` (one JSON object per line; blank lines skipped) or ``.json`` (a list of objects).
        question_field: field holding the question / instruction.
        answer_field: field holding the reference answer.
        input_field: optional field with extra input for the question.

    Raises:
        FileNotFoundError: no such file.
        ValueError: malformed JSON, a record that is not an object, or a missing field (the message names the
            record, the field and the fields it has).

    Example::

        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "d.jsonl")
        >>> _ = open(path, "w").write('{"q": "1 + 1?", "a": "#### 2"}\\n')
        >>> load_instructions(path, question_field="q", answer_field="a")
        [{'q': '1 + 1?', 'a': '#### 2', 'question': '1 + 1?', 'answer': '#### 2'}]
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_instructions: no file at {path!r}.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    records: list[tuple[str, Any]] = []
    if path.endswith(".jsonl") or (stripped and not stripped.startswith("[")):
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"load_instructions: {path}, line {lineno} is not valid JSON: {err}."
                ) from err
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"load_instructions: {path} is not valid JSON: {err}.") from err
        if not isinstance(data, list):
            raise ValueError(
                f"load_instructions: {path} must hold a JSON list of objects, got {type(data).__name__}."
            )
        records = [(f"record {i}", r) for i, r in enumerate(data)]
    out = []
    for where, rec in records:
        if not isinstance(rec, dict):
            raise ValueError(f"load_instructions: {path}, {where} is not a JSON object: {rec!r}.")
        for role, field in (("question_field", question_field), ("answer_field", answer_field)):
            if field not in rec:
                raise ValueError(
                    f"load_instructions: {path}, {where} has no field {field!r} (`{role}`); its fields are "
                    f"{sorted(rec)}. Set `{role}` to the right name."
                )
        question = str(rec[question_field])
        if input_field is not None:
            if input_field not in rec:
                raise ValueError(
                    f"load_instructions: {path}, {where} has no field {input_field!r} (`input_field`); its fields "
                    f"are {sorted(rec)}."
                )
            extra = str(rec[input_field]).strip()
            if extra:
                question = f"{question}\n{extra}"
        out.append({**rec, "question": question, "answer": str(rec[answer_field])})
    return out


class InstructionDataset(Dataset):
    """A list of instruction records as a ``Dataset`` of ``(index, record)`` pairs.

    Example::

        >>> ds = InstructionDataset([{"question": "q", "answer": "a"}])
        >>> len(ds), ds[0]
        (1, (0, {'question': 'q', 'answer': 'a'}))
    """

    def __init__(self, records: Sequence[dict], indices: Sequence[int] | None = None) -> None:
        self.records = records
        self.indices = list(range(len(records))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, dict]:
        idx = self.indices[i]
        return idx, self.records[idx]


class InstructionCollator:
    """Tokenises ``(index, record)`` pairs into a training + generation batch.

    The batch dict holds ``input_ids``/``attention_mask``/``labels`` (prompt + answer + EOS, right-padded;
    labels are :data:`IGNORE_INDEX` on prompt and padding tokens, so the loss is on the answer only),
    ``prompt_ids``/``prompt_attention_mask`` (the prompt alone, left-padded, for ``generate``), ``answers``
    (reference strings) and ``index`` (record indices). Prompt and answer are tokenised separately and
    concatenated, so the generation prompt is exactly the training prefix. Sequences longer than
    ``max_length`` lose prompt tokens from the left (then answer tokens from the right).

    Args:
        tokenizer: a ``transformers`` tokenizer with ``pad_token_id`` and ``eos_token_id``.
        prompt_template: ``str.format`` template with ``{question}``.
        chat_template: wrap the formatted prompt as a user turn with ``tokenizer.apply_chat_template``.
        max_length: maximum tokens of prompt + answer.

    Example::

        >>> from lightning_eff.llm.tokenization import load_tokenizer
        >>> collate = InstructionCollator(load_tokenizer("arithmetic-bpe"))
        >>> batch = collate([(0, {"question": "What is 2 + 3?", "answer": "#### 5"})])
        >>> labels = batch["labels"][0]
        >>> collate.tokenizer.decode(labels[labels != -100])
        '#### 5</s>'
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_template: str = DEFAULT_PROMPT,
        chat_template: bool = False,
        max_length: int = 512,
    ) -> None:
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("InstructionCollator: the tokenizer needs a pad token and an EOS token.")
        if "{question}" not in prompt_template:
            raise ValueError(
                f"InstructionCollator: `prompt_template` must contain '{{question}}', got {prompt_template!r}."
            )
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template
        self.chat_template = bool(chat_template)
        self.max_length = check_int(max_length, "max_length", minimum=2, owner="InstructionCollator")
        self._warned = False

    def prompt_text(self, question: str) -> str:
        """The prompt text for ``question`` (chat-templated if configured)."""
        text = self.prompt_template.format(question=question)
        if self.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the prompt (BOS added by the tokenizer unless the chat template already has it)."""
        return list(
            self.tokenizer(self.prompt_text(question), add_special_tokens=not self.chat_template)["input_ids"]
        )

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of the answer followed by EOS."""
        return list(self.tokenizer(answer, add_special_tokens=False)["input_ids"]) + [
            self.tokenizer.eos_token_id
        ]

    def __call__(self, items: Sequence[tuple[int, dict]]) -> dict[str, Any]:
        pad = self.tokenizer.pad_token_id
        prompts, answers = [], []
        for _, rec in items:
            p, a = self.prompt_ids(rec["question"]), self.answer_ids(rec["answer"])
            if len(p) + len(a) > self.max_length:
                if not self._warned:
                    rank_zero_warn(
                        f"InstructionCollator: an example has {len(p) + len(a)} tokens > max_length={self.max_length}; "
                        f"prompt tokens are cut from the left (answer tokens from the right if still too long)."
                    )
                    self._warned = True
                a = a[: self.max_length - 1]
                p = p[max(0, len(p) - (self.max_length - len(a))) :]
            prompts.append(p)
            answers.append(a)
        full = [p + a for p, a in zip(prompts, answers)]
        t_full = max(len(x) for x in full)
        t_prompt = max(len(p) for p in prompts)
        n = len(items)
        input_ids = torch.full((n, t_full), pad, dtype=torch.long)
        attention_mask = torch.zeros((n, t_full), dtype=torch.long)
        labels = torch.full((n, t_full), IGNORE_INDEX, dtype=torch.long)
        prompt_ids = torch.full((n, t_prompt), pad, dtype=torch.long)
        prompt_mask = torch.zeros((n, t_prompt), dtype=torch.long)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            seq = p + a
            input_ids[i, : len(seq)] = torch.tensor(seq)
            attention_mask[i, : len(seq)] = 1
            labels[i, len(p) : len(seq)] = torch.tensor(a)
            prompt_ids[i, t_prompt - len(p) :] = torch.tensor(p)
            prompt_mask[i, t_prompt - len(p) :] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "prompt_ids": prompt_ids,
            "prompt_attention_mask": prompt_mask,
            "answers": [rec["answer"] for _, rec in items],
            "index": torch.tensor([int(i) for i, _ in items], dtype=torch.long),
        }


class InstructionDataModule(L.LightningDataModule):
    """Instruction fine-tuning data: generated arithmetic problems (default) or local JSON/JSONL files.

    Without ``data_path``, the splits are independent draws of
    :func:`~lightning_eff.llm.arithmetic.generate_arithmetic` (``num_train`` / ``num_val`` / ``num_test``
    examples; seeds ``seed``, ``seed + 1``, ``seed + 2``); ``noise`` corrupts that fraction of the training
    answers only, and validation/test questions that also occur in the training split are dropped. With
    ``data_path``, ``val_path`` / ``test_path`` are read when given, otherwise ``num_val`` / ``num_test``
    examples are carved out of the training file by a seeded shuffle (``num_train`` caps the rest; ``None``
    keeps all).

    Batches are built by :class:`InstructionCollator` (loss on answer tokens only). The tokenizer is loaded on
    first use (``"arithmetic-bpe"`` or a local path, see :func:`~lightning_eff.llm.tokenization.load_tokenizer`).
    Subclasses choose which training records are served by overriding :meth:`train_indices`.

    Args:
        data_path: local JSON/JSONL training file; ``None`` generates arithmetic problems.
        val_path: local validation file (optional).
        test_path: local test file (optional).
        question_field: question field name in the files.
        answer_field: answer field name in the files.
        input_field: optional extra-input field appended to the question.
        num_train: generated training examples (with files: cap on training records, ``None`` = all).
        num_val: validation examples (generated, or carved out of the training file).
        num_test: test examples (generated, or carved out of the training file).
        noise: fraction of generated training answers made wrong (label noise), in ``[0, 1]``.
        max_operand: largest operand of the generated problems.
        max_steps: 1 or 2 calculation steps in the generated problems.
        tokenizer: tokenizer spec (built-in name or local path).
        prompt_template: prompt before the answer, with ``{question}``.
        chat_template: wrap prompts with the tokenizer's chat template.
        max_length: maximum tokens per example.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        num_workers: dataloader workers.
        seed: seed of the generated data and of the file splits (the training order follows ``seed_everything``).

    Example::

        >>> dm = InstructionDataModule(num_train=8, num_val=4, num_test=4, batch_size=4)
        >>> dm.setup("fit")
        >>> len(dm.train_records), len(dm.val_records)
        (8, 4)
        >>> sorted(next(iter(dm.train_dataloader())))[:4]
        ['answers', 'attention_mask', 'index', 'input_ids']
    """

    def __init__(
        self,
        data_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        question_field: str = "question",
        answer_field: str = "answer",
        input_field: str | None = None,
        num_train: int | None = 2000,
        num_val: int = 100,
        num_test: int = 200,
        noise: float = 0.0,
        max_operand: int = 20,
        max_steps: int = 2,
        tokenizer: str = "arithmetic-bpe",
        prompt_template: str = DEFAULT_PROMPT,
        chat_template: bool = False,
        max_length: int = 512,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for arg, value in (("data_path", data_path), ("val_path", val_path), ("test_path", test_path)):
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"{name}: `{arg}` must be a path or None, got {value!r}.")
        if data_path is None and (val_path is not None or test_path is not None):
            raise ValueError(
                f"{name}: `val_path`/`test_path` need `data_path` (the generated data has its own splits)."
            )
        if num_train is not None:
            check_int(num_train, "num_train", minimum=1, owner=name)
        elif data_path is None:
            raise ValueError(f"{name}: `num_train` must be an int >= 1 for generated data, got None.")
        check_int(num_val, "num_val", minimum=0, owner=name)
        check_int(num_test, "num_test", minimum=0, owner=name)
        check_float(noise, "noise", low=0.0, high=1.0, owner=name)
        check_int(max_operand, "max_operand", minimum=2, owner=name)
        if max_steps not in (1, 2) or isinstance(max_steps, bool):
            raise ValueError(f"{name}: `max_steps` must be 1 or 2, got {max_steps!r}.")
        if not isinstance(tokenizer, str) and not hasattr(tokenizer, "decode"):
            raise TypeError(
                f"{name}: `tokenizer` must be a built-in name or a local path, got {tokenizer!r}."
            )
        if not isinstance(prompt_template, str) or "{question}" not in prompt_template:
            raise ValueError(
                f"{name}: `prompt_template` must be a str containing '{{question}}', got {prompt_template!r}."
            )
        check_int(max_length, "max_length", minimum=2, owner=name)
        check_int(batch_size, "batch_size", minimum=1, owner=name)
        if eval_batch_size is not None:
            check_int(eval_batch_size, "eval_batch_size", minimum=1, owner=name)
        check_int(num_workers, "num_workers", minimum=0, owner=name)
        check_int(seed, "seed", minimum=0, owner=name)
        self.data_path = None if data_path is None else os.fspath(data_path)
        self.val_path = None if val_path is None else os.fspath(val_path)
        self.test_path = None if test_path is None else os.fspath(test_path)
        self.question_field, self.answer_field, self.input_field = question_field, answer_field, input_field
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.noise, self.max_operand, self.max_steps = float(noise), max_operand, max_steps
        self.tokenizer_spec = tokenizer
        self.prompt_template = prompt_template
        self.chat_template = bool(chat_template)
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._tokenizer: Any = None
        self._collator: InstructionCollator | None = None
        self.train_records: list[dict] | None = None
        self.val_records: list[dict] | None = None
        self.test_records: list[dict] | None = None

    # ------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The tokenizer (loaded on first access)."""
        if self._tokenizer is None:
            from lightning_eff.llm.tokenization import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_spec)
        return self._tokenizer

    @property
    def collator(self) -> InstructionCollator:
        """The :class:`InstructionCollator` of all dataloaders."""
        if self._collator is None:
            self._collator = InstructionCollator(
                self.tokenizer, self.prompt_template, self.chat_template, self.max_length
            )
        return self._collator

    def _load(self, path: str) -> list[dict]:
        return load_instructions(path, self.question_field, self.answer_field, self.input_field)

    def load_records(self) -> None:
        """Load (or generate) the three splits; idempotent."""
        if self.train_records is not None:
            return
        name = type(self).__name__
        if self.data_path is None:
            from lightning_eff.llm.arithmetic import generate_arithmetic

            kw = {"max_operand": self.max_operand, "max_steps": self.max_steps}
            train = generate_arithmetic(self.num_train, seed=self.seed, noise=self.noise, **kw)
            seen = {r["question"] for r in train}
            val = [
                r
                for r in generate_arithmetic(self.num_val, seed=self.seed + 1, **kw)
                if r["question"] not in seen
            ]
            test = [
                r
                for r in generate_arithmetic(self.num_test, seed=self.seed + 2, **kw)
                if r["question"] not in seen
            ]
        else:
            train = self._load(self.data_path)
            order = list(range(len(train)))
            random.Random(self.seed).shuffle(order)
            val = self._load(self.val_path) if self.val_path else None
            test = self._load(self.test_path) if self.test_path else None
            carve = (0 if val is not None else self.num_val) + (0 if test is not None else self.num_test)
            if carve >= len(train):
                raise ValueError(
                    f"{name}: {self.data_path} has {len(train)} records, too few to carve out num_val + num_test = "
                    f"{carve} for validation/testing; lower them or give `val_path`/`test_path`."
                )
            pos = 0
            if val is None:
                val = [train[i] for i in sorted(order[pos : pos + self.num_val])]
                pos += self.num_val
            if test is None:
                test = [train[i] for i in sorted(order[pos : pos + self.num_test])]
                pos += self.num_test
            rest = sorted(order[pos:])
            if self.num_train is not None:
                rest = sorted(order[pos : pos + self.num_train])
            train = [train[i] for i in rest]
        if not train:
            raise ValueError(f"{name}: the training set is empty.")
        self.train_records, self.val_records, self.test_records = train, val, test

    def setup(self, stage: str | None = None) -> None:
        """Load the records (every stage)."""
        self.load_records()

    def train_indices(self) -> Sequence[int] | None:
        """Indices of the training records to serve (``None``: all). Overridden by selecting subclasses."""
        return None

    def _require(self, records: list[dict] | None, split: str) -> list[dict]:
        if records is None:
            raise RuntimeError(f"{type(self).__name__}: call `setup()` before asking for the {split} data.")
        return records

    def _loader(
        self, records: list[dict], indices: Sequence[int] | None, batch_size: int, shuffle: bool
    ) -> DataLoader:
        # Shuffling draws from torch's global RNG, which `seed_everything` seeds (not from `seed`, which fixes the
        # data itself), so runs with different seeds see the data in different orders.
        dataset = InstructionDataset(records, indices)
        return make_loader(dataset, batch_size, shuffle, self.num_workers, self.collator)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (of the records :meth:`train_indices` names)."""
        return self._loader(
            self._require(self.train_records, "train"), self.train_indices(), self.batch_size, True
        )

    def val_dataloader(self) -> DataLoader:
        """Validation batches."""
        return self._loader(self._require(self.val_records, "validation"), None, self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        """Test batches."""
        return self._loader(self._require(self.test_records, "test"), None, self.eval_batch_size, False)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move the tensors of a batch dict (strings stay on the host)."""
        if isinstance(batch, dict):
            return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)
