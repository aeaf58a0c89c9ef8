"""Baseline data selectors for the Data Whisperer comparison: random, EL2N and GraNd.

EL2N and GraNd: M. Paul, S. Ganguli, G. K. Dziugaite, "Deep Learning on a Data Diet: Finding Important
Examples Early in Training", NeurIPS 2021 (Sec. 2, Eq. 1-2). Both need a short fine-tuning pass first
(the "warm-up"), which is why their selection cost is high (paper of Data Whisperer, Table 4 / STR).

* GraNd (Eq. 1): ``chi(x, y) = || grad_theta loss(f_theta(x), y) ||_2``, the norm of the per-example
  gradient of all trainable parameters.
* EL2N (Eq. 2): ``chi(x, y) = || p(x) - onehot(y) ||_2``. For a causal LM the example's error is the mean
  over its answer tokens ``t`` of ``|| softmax(z_t) - onehot(y_t) ||_2``.

Both keep the highest-scoring (hardest) examples. Departure: Paul et al. average the score over 10
independent warm-up runs; we use one (``warmup_steps`` AdamW steps on the full training set from the
model to be fine-tuned), the setting Data Whisperer's paper compares against.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_eff.llm.data import IGNORE_INDEX, InstructionCollator, InstructionDataset
from lightning_eff.utils.checks import check_int

__all__ = ["random_scores", "el2n_from_logits", "warmup_finetune", "el2n_scores", "grand_scores"]


def random_scores(num_examples: int, seed: int = 0) -> Tensor:
    """Uniform random scores (float64 ``[N]``) from a seeded generator: top-k of them is a random subset.

    Example::

        >>> random_scores(4, seed=1).equal(random_scores(4, seed=1))
        True
    """
    return torch.rand(num_examples, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def el2n_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """EL2N per sequence: mean over labelled positions of ``|| softmax(logits_t) - onehot(label_t) ||_2``.

    ``logits[:, t]`` predicts ``labels[:, t + 1]`` (the causal shift is done here); labels equal to -100 are
    ignored. A sequence without labelled tokens scores 0.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` token ids or -100.

    Example::

        >>> logits = torch.zeros(1, 2, 2)  # uniform over 2 tokens: || (.5, .5) - (0, 1) || = sqrt(.5)
        >>> round(float(el2n_from_logits(logits, torch.tensor([[-100, 1]]))[0]), 4)
        0.7071
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    valid = shift_labels != IGNORE_INDEX
    p = shift_logits.softmax(-1)
    target = shift_labels.clamp(min=0)
    p_y = p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    # ||p - e_y||^2 = sum_v p_v^2 - 2 p_y + 1
    err = (p.pow(2).sum(-1) - 2 * p_y + 1).clamp(min=0).sqrt()
    err = torch.where(valid, err, torch.zeros_like(err))
    return err.sum(1) / valid.sum(1).clamp(min=1)


def _batches(collator: InstructionCollator, records: Sequence[dict], indices: Sequence[int], batch_size: int):
    ds = InstructionDataset(records, indices)
    for i in range(0, len(ds), batch_size):
        yield collator([ds[j] for j in range(i, min(i + batch_size, len(ds)))])


def warmup_finetune(
    model: Any,
    collator: InstructionCollator,
    records: Sequence[dict],
    steps: int = 50,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> Any:
    """A copy of ``model`` fine-tuned for ``steps`` AdamW steps on shuffled ``records`` (answer-token loss).

    Example::

        >>> from lightning_eff.llm import build_causal_lm, load_tokenizer, generate_arithmetic
        >>> tok = load_tokenizer("arithmetic-bpe")
        >>> lm = build_causal_lm({"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
        ...                       "num_hidden_layers": 1, "num_attention_heads": 2}, tok)
        >>> tuned = warmup_finetune(lm, InstructionCollator(tok), generate_arithmetic(8), steps=2, batch_size=4,
        ...                         progress=False)
        >>> tuned is not lm
        True
    """
    from tqdm.auto import tqdm

    check_int(steps, "steps", minimum=0, owner="warmup_finetune")
    tuned = copy.deepcopy(model)
    tuned.train()
    params = [p for p in tuned.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    device = next(tuned.parameters()).device
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in tqdm(range(steps), desc="warm-up fine-tuning", disable=not progress):
        if len(order) < batch_size:
            order += torch.randperm(len(records), generator=g).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        batch = collator([(i, records[i]) for i in idx])
        out = tuned(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            labels=batch["labels"].to(device),
        )
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"warmup_finetune: the loss is {out.loss.item()}; lower `lr`.")
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    tuned.eval()
    return tuned


@torch.no_grad()
def el2n_scores(
    model: Any,
    collator: InstructionCollator,
    records: Sequence[dict],
    indices: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> Tensor:
    """EL2N of ``records[indices]`` (default all) under ``model``: float64 ``[len(indices)]``."""
    from tqdm.auto import tqdm

    indices = list(range(len(records))) if indices is None else list(indices)
    model.eval()
    device = next(model.parameters()).device
    out = []
    total = math.ceil(len(indices) / batch_size)
    for batch in tqdm(
        _batches(collator, records, indices, batch_size), total=total, desc="EL2N", disable=not progress
    ):
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        out.append(el2n_from_logits(logits, batch["labels"].to(device)).double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def grand_scores(
    model: Any,
    collator: InstructionCollator,
    records: Sequence[dict],
    indices: Sequence[int] | None = None,
    progress: bool = True,
) -> Tensor:
    """GraNd of ``records[indices]``: the L2 norm of each example's loss gradient over the trainable
    parameters (one backward pass per example), float64 ``[len(indices)]``."""
    from tqdm.auto import tqdm

    indices = list(range(len(records))) if indices is None else list(indices)
    model.eval()  # no dropout: the score is a deterministic function of the example
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    out = torch.zeros(len(indices), dtype=torch.float64)
    for k, batch in enumerate(
        tqdm(_batches(collator, records, indices, 1), total=len(indices), desc="GraNd", disable=not progress)
    ):
        loss = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            labels=batch["labels"].to(device),
        ).loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out[k] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
    return out
