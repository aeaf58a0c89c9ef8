"""Data Whisperer's generation step: greedy multi-answer generation with per-prompt stopping, and answer parsing.

See :mod:`lightning_eff.select.data_whisperer` for the procedure.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_eff.llm.metrics import extract_predictions
from lightning_eff.select.prompts import ICLTemplate

__all__ = ["split_answers"]


_COMPLETE_ANSWER = re.compile(r"####\s*\$?\s*[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?=[^\d.,])")


def split_answers(response: str, n: int, template: ICLTemplate, metric: str) -> list[str]:
    """Parse a multi-answer response: ``#### <number>`` answers in order (exact match), or the texts after
    each ``answer_marker`` (free text; fewer than ``n`` markers gives fewer answers).

    Example::

        >>> split_answers("Question 1 Answer: a b\\nQuestion 2 Answer: c", 2, ICLTemplate(), "rouge_l")
        ['a b', 'c']
    """
    if metric == "exact_match":
        return extract_predictions(response)
    marker = re.escape(template.answer_marker).replace(re.escape("{k}"), r"(\d+)")
    matches = list(re.finditer(marker, response))
    out = []
    for m, nxt in zip(matches, matches[1:] + [None]):
        out.append(response[m.end() : nxt.start() if nxt is not None else len(response)].strip())
    return out[:n] if len(out) >= n else out


class _AnswersComplete:
    """Per-row stopping: a row is done once its generated text holds ``n`` complete answers."""

    def __init__(
        self, tokenizer: Any, prompt_len: int, n_answers: Sequence[int], template: ICLTemplate, metric: str
    ):
        self.tokenizer, self.prompt_len, self.n = tokenizer, prompt_len, list(n_answers)
        self.metric = metric
        self.next_marker = [template.answer_marker.format(k=k + 1) for k in self.n]

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        done = []
        for text, n, marker in zip(texts, self.n, self.next_marker):
            if self.metric == "exact_match":
                done.append(len(_COMPLETE_ANSWER.findall(text)) >= n)
            else:
                done.append(marker in text)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _generate(model: Any, tokenizer: Any, input_ids: Tensor, attention_mask: Tensor, n_answers: Sequence[int],
              max_new_tokens: int, template: ICLTemplate, metric: str) -> list[str]:  # fmt: skip
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    from lightning_eff.llm.module import eos_token_ids

    class _Stop(StoppingCriteria):
        def __init__(self, fn: _AnswersComplete) -> None:
            self.fn = fn

        def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
            return self.fn(input_ids, scores)

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_token_ids(model, tokenizer),
    )
    stop = _AnswersComplete(tokenizer, input_ids.shape[1], n_answers, template, metric)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=config,
        stopping_criteria=StoppingCriteriaList([_Stop(stop)]),
    )
    return tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
