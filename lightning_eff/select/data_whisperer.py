"""Data Whisperer: training-free, attention-based data selection for LLM fine-tuning.

Paper: S. Wang, Y. Chen, et al., "Data Whisperer: Efficient Data Selection for Task-Specific LLM
Fine-Tuning via Few-Shot In-Context Learning", ACL 2025, arXiv:2505.12212. Official code:
gszfwsb/Data-Whisperer (``pruning/datawhisperer_gsm_pruner.py``, ``pruning/prompt.py``).

Procedure (paper Sec. 3, official ``evaluate`` / ``_evaluate_single_fold``):

1. Split the training set in two (``KFold(n_splits=2, shuffle=True, random_state=42)``); the
   demonstrations come from one half and the queries from the other, then the halves swap, so every
   example is a demonstration exactly once. With a separate query set (``query_records``), all training
   examples are demonstrations and the queries come from it.
2. Demonstrations are taken in consecutive batches of ``n_d`` (5), queries in batches of ``n_q`` (3)
   that cycle over the query half. Each pair makes one prompt (:func:`build_icl_prompt`).
3. The model that will be fine-tuned answers the ``n_q`` queries greedily. Each answer gets a score
   ``s_k`` (exact match of the final number, or ROUGE-L F1); a prompt with fewer parsed answers than
   queries is skipped.
4. The prompt alone is re-run to read the attention at layer ``L``, summed over heads (``A``). For
   demonstration ``j`` with token span ``D_j`` and the response block's token span ``R``
   (paper Eq. 4-5)::

       a_j = sum_{r in R, c in D_j} A[r, c] / (|D_j| * |R|),      w_j = a_j / sum_j' a_j'

5. Paper Eq. 6: each demonstration accumulates ``w_j * s_k`` for every query of its prompt, and is
   divided by the number of queries it was scored with, i.e. ``score_j = w_j * mean_k s_k`` (averaged
   over prompts if it appears in several). The top ``ratio`` by score are kept.

Where we depart from the official code, and why:

* Token spans come from the tokenizer's character offsets of the joint prompt (:func:`token_spans`),
  not from tokenising each part separately and adding lengths, which is off by the tokens BPE merges
  across part boundaries and by special tokens.
* The attention re-run is model-agnostic and uses only public ``transformers`` API: a function
  registered in ``AttentionInterface`` runs the model's own eager attention at layer ``L`` (SDPA
  elsewhere), computes only the response-block rows (memory ``O(H |R| T)`` instead of ``O(H T^2)``),
  and stops the forward pass after layer ``L``. The official code re-implements the decoder loop
  with the private ``_update_causal_mask`` of transformers 4.4x, for Llama/Qwen/Mistral only.
* Generation keeps the model's fast attention and stops each prompt as soon as all its answers are
  complete (or at EOS), instead of generating up to a fixed total length.
* Attention is summed in float32 (the official code casts it to float16); a negative final answer keeps
  its sign (the official regex drops it).
* Layer ``L``: the official table (Llama-3-8B and Mistral-Nemo 13, Qwen2.5-3B/7B 16, Mistral-7B 10, else
  11) keyed by model family and depth, since a local model has no canonical name; models with at most 11
  layers use the middle layer instead of an out-of-range 11.
"""

from __future__ import annotations

import contextvars
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_eff.llm.metrics import METRICS, extract_answer, extract_predictions
from lightning_eff.select.prompts import ICLTemplate, build_icl_prompt

__all__ = [
    "demonstration_weights",
    "token_spans",
    "default_attention_layer",
    "layer_attention",
    "plan_prompts",
    "query_scores",
    "accumulate_scores",
    "data_whisperer_scores",
    "PromptPlan",
    "WhispererResult",
]


# ------------------------------------------------------------------------------------------------
# pure math
# ------------------------------------------------------------------------------------------------
def demonstration_weights(
    attention: Tensor, demo_spans: Sequence[tuple[int, int]], response_span: tuple[int, int]
) -> Tensor:
    """Normalised attention weight ``w_j`` of each demonstration (paper Eq. 4-5).

    ``a_j = A[R, D_j].sum() / (|D_j| |R|)`` and ``w_j = a_j / sum_j' a_j'``, where ``A`` is the head-summed
    attention ``[query_len, key_len]``, ``D_j = [start_j, end_j)`` a demonstration's key (column) span and
    ``R = [start, end)`` the response block's query (row) span. If every ``a_j`` is 0 the weights are uniform.

    Args:
        attention: ``[query_len, key_len]`` attention summed over heads.
        demo_spans: ``[(start, end), ...]`` column spans, non-empty and inside ``key_len``.
        response_span: ``(start, end)`` row span, non-empty and inside ``query_len``.

    Returns:
        float tensor ``[len(demo_spans)]`` summing to 1.

    Example::

        >>> A = torch.tensor([[1., 0., 0., 0.], [.5, .5, 0., 0.], [.2, .2, .6, 0.], [.1, .3, .2, .4]])
        >>> demonstration_weights(A, [(0, 1), (1, 3)], (2, 4))  # a = (.3/2, 1.3/4)
        tensor([0.3158, 0.6842])
    """
    if not isinstance(attention, Tensor) or attention.ndim != 2:
        shape = tuple(attention.shape) if isinstance(attention, Tensor) else type(attention).__name__
        raise ValueError(
            f"demonstration_weights: `attention` must be a 2-D tensor [query_len, key_len], got {shape}."
        )
    n_rows, n_cols = attention.shape
    if len(demo_spans) == 0:
        raise ValueError("demonstration_weights: `demo_spans` must not be empty.")
    r0, r1 = (int(v) for v in response_span)
    if not 0 <= r0 < r1 <= n_rows:
        raise ValueError(
            f"demonstration_weights: `response_span` {tuple(response_span)} must satisfy 0 <= start < end <= "
            f"query_len={n_rows}."
        )
    rows = attention[r0:r1].to(torch.float64)
    a = []
    for j, span in enumerate(demo_spans):
        s, e = (int(v) for v in span)
        if not 0 <= s < e <= n_cols:
            raise ValueError(
                f"demonstration_weights: demo span {j} = {tuple(span)} must satisfy 0 <= start < end <= "
                f"key_len={n_cols}."
            )
        a.append(rows[:, s:e].sum() / ((e - s) * (r1 - r0)))
    a_t = torch.stack(a)
    total = a_t.sum()
    if not torch.isfinite(total):
        raise ValueError("demonstration_weights: the attention contains NaN or inf.")
    if total <= 0:
        return torch.full((len(a),), 1.0 / len(a), dtype=torch.float32)
    return (a_t / total).to(torch.float32)


def token_spans(
    offsets: Sequence[tuple[int, int]],
    char_spans: Sequence[tuple[int, int]],
    special_tokens_mask: Sequence[int] | None = None,
) -> list[tuple[int, int]]:
    """Map ``[start, end)`` character spans to ``[first, last + 1)`` token spans.

    A token belongs to the character span that contains its first character (``offsets[t][0]``); special
    tokens (``special_tokens_mask[t] == 1``) and zero-width tokens belong to none. Tokens of one span are
    contiguous because offsets increase.

    Args:
        offsets: per-token ``(char_start, char_end)`` from a fast tokenizer's ``return_offsets_mapping``.
        char_spans: character spans to map.
        special_tokens_mask: per-token 1 for special tokens (optional).

    Raises:
        ValueError: a span contains no token.

    Example::

        >>> token_spans([(0, 0), (0, 3), (3, 4), (4, 9), (9, 12)], [(0, 4), (4, 12)], [1, 0, 0, 0, 0])
        [(1, 3), (3, 5)]
    """
    starts = [
        (
            int(s)
            if int(e) > int(s) and not (special_tokens_mask is not None and special_tokens_mask[t])
            else -1
        )
        for t, (s, e) in enumerate(offsets)
    ]
    out = []
    for cs, ce in char_spans:
        members = [t for t, s in enumerate(starts) if s >= 0 and cs <= s < ce]
        if not members:
            raise ValueError(f"token_spans: no token starts inside the character span ({cs}, {ce}).")
        out.append((members[0], members[-1] + 1))
    return out


#: The official layer choice (``predict_batch``) by (model_type, num_hidden_layers).
_OFFICIAL_LAYERS: dict[tuple[str, int], int] = {
    ("llama", 32): 13,  # Meta-Llama-3-8B-Instruct
    ("mistral", 40): 13,  # Mistral-Nemo-Instruct-2407
    ("qwen2", 36): 16,  # Qwen2.5-3B-Instruct
    ("qwen2", 28): 16,  # Qwen2.5-7B-Instruct
    ("mistral", 32): 10,  # Mistral-7B-Instruct-v0.2
}


def default_attention_layer(config: Any) -> int:
    """The attention layer Data Whisperer reads for a model config (see the module docstring).

    Example::

        >>> from types import SimpleNamespace as NS
        >>> default_attention_layer(NS(model_type="llama", num_hidden_layers=32))
        13
        >>> default_attention_layer(NS(model_type="gemma", num_hidden_layers=26)), default_attention_layer(
        ...     NS(model_type="llama", num_hidden_layers=4))
        (11, 2)
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(
            f"default_attention_layer: the config has no positive `num_hidden_layers` ({n_layers!r})."
        )
    model_type = getattr(text_config, "model_type", "") or getattr(config, "model_type", "")
    if (model_type, n_layers) in _OFFICIAL_LAYERS:
        return _OFFICIAL_LAYERS[(model_type, n_layers)]
    return 11 if n_layers > 11 else n_layers // 2


# ------------------------------------------------------------------------------------------------
# the attention re-run
# ------------------------------------------------------------------------------------------------
_PROBE_NAME = "lightning_eff_attention_probe"
_PROBE: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "lightning_eff_attention_probe", default=None
)


class _StopForward(Exception):
    """Raised by the probe once layer L's attention is captured, to skip the remaining layers."""


def _probe_attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, Any]:  # fmt: skip
    state = _PROBE.get()
    if state is not None and getattr(module, "layer_idx", None) == state["layer"]:
        modeling = sys.modules.get(type(module).__module__)
        eager = getattr(modeling, "eager_attention_forward", None)
        if eager is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward as eager
        rows = state["rows"]
        q = query if rows is None else query[:, :, -rows:]
        mask = attention_mask
        if mask is not None and rows is not None:
            mask = mask[:, :, -rows:, :]
        _, weights = eager(module, q, key, value, mask, scaling=scaling, dropout=0.0, **kwargs)
        state["attention"] = weights.float().sum(dim=1)
        raise _StopForward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


def _register_probe() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

    if _PROBE_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(_PROBE_NAME, _probe_attention)
        AttentionMaskInterface.register(_PROBE_NAME, eager_mask)


def _num_layers(model: Any) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


@torch.no_grad()
def layer_attention(
    model: Any, input_ids: Tensor, attention_mask: Tensor, layer: int, last_rows: int | None = None
) -> Tensor:
    """Head-summed attention of one layer for a (left-padded) batch of prompts: ``[B, rows, T]``.

    Equals ``model(..., output_attentions=True).attentions[layer].sum(1)`` of an eager forward (restricted to
    the last ``last_rows`` query rows when given), but runs eager attention at ``layer`` only, computes only
    the requested rows and skips the layers after ``layer``. Models that do not dispatch attention through
    ``transformers``' ``AttentionInterface`` fall back to a full forward with ``output_attentions=True``.

    Args:
        model: a ``transformers`` causal LM.
        input_ids: ``[B, T]`` token ids.
        attention_mask: ``[B, T]`` 1 for tokens, 0 for (left) padding.
        layer: 0-based decoder layer.
        last_rows: number of final query rows to compute (``None``: all ``T``).

    Raises:
        ValueError: ``layer`` out of range, or the model returns no attention weights.

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> _ = torch.manual_seed(0)
        >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
        ...                                   num_hidden_layers=2, num_attention_heads=2)).eval()
        >>> ids = torch.randint(0, 50, (1, 6))
        >>> A = layer_attention(lm, ids, torch.ones_like(ids), layer=1)
        >>> A.shape, torch.allclose(A.sum(-1), torch.full((1, 6), 2.0))  # 2 heads, rows sum to 1 each
        (torch.Size([1, 6, 6]), True)
    """
    n_layers = _num_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"layer_attention: `layer` must be an int in [0, {n_layers - 1}], got {layer!r}.")
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"layer_attention: `input_ids` and `attention_mask` must both be [B, T], got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}."
        )
    t = input_ids.shape[1]
    rows = None if last_rows is None or last_rows >= t else int(last_rows)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    _register_probe()
    previous = getattr(model.config, "_attn_implementation", None)
    state: dict[str, Any] = {"layer": layer, "rows": rows, "attention": None}
    token = _PROBE.set(state)
    try:
        import logging

        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity(logging.ERROR)  # a model that cannot switch only warns; we fall back below
        try:
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(_PROBE_NAME)
        finally:
            hf_logging.set_verbosity(verbosity)
        try:
            model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
        except _StopForward:
            pass
    finally:
        _PROBE.reset(token)
        if getattr(model.config, "_attn_implementation", None) != previous:
            model.set_attn_implementation(previous)
    if state["attention"] is not None:
        return state["attention"]
    # Fallback: a model that does not route attention through AttentionInterface.
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        output_attentions=True,
    )
    attentions = getattr(out, "attentions", None)
    if not attentions or len(attentions) <= layer or attentions[layer] is None:
        raise ValueError(
            f"layer_attention: {type(model).__name__} returns no attention weights for layer {layer} "
            f"(output_attentions=True gave {type(attentions).__name__}); Data Whisperer needs a model whose "
            f"attention goes through transformers' AttentionInterface or that returns `attentions`."
        )
    attn = attentions[layer].float().sum(dim=1)
    return attn if rows is None else attn[:, -rows:, :]


# ------------------------------------------------------------------------------------------------
# the prompt plan and the score bookkeeping
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptPlan:
    """One prompt: indices of its demonstrations (training records) and of its queries (training records,
    or ``query_records`` when ``external_queries``)."""

    demos: tuple[int, ...]
    queries: tuple[int, ...]
    external_queries: bool = False
    pass_index: int = 0


def _kfold2(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """``sklearn.model_selection.KFold(n_splits=2, shuffle=True, random_state=seed).split(range(n))``, without
    importing scikit-learn: ``RandomState(seed)`` shuffles ``arange(n)``, the first ``ceil(n / 2)`` shuffled
    indices are fold 0's test half; both halves are returned sorted."""
    import numpy as np

    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    first = (n + 1) // 2
    folds = []
    for test in (order[:first], order[first:]):
        mask = np.zeros(n, dtype=bool)
        mask[test] = True
        folds.append((np.flatnonzero(~mask).tolist(), np.flatnonzero(mask).tolist()))
    return folds


def plan_prompts(
    num_examples: int,
    n_demos: int = 5,
    n_queries: int = 3,
    seed: int = 42,
    num_query_records: int | None = None,
    passes: int = 1,
) -> list[PromptPlan]:
    """The official prompt schedule (see the module docstring, steps 1-2), repeated for ``passes`` assignments.

    Pass 0 is the official schedule. Pass ``p >= 1`` (an extension: several prompt assignments averaged) first
    permutes the training indices and the query indices with a generator seeded by ``(seed, p)``, so every
    example is again a demonstration exactly once per pass, next to other demonstrations and queries.

    Example::

        >>> plans = plan_prompts(10, n_demos=2, n_queries=2, seed=0)
        >>> len(plans), sorted(i for p in plans for i in p.demos) == list(range(10))
        (6, True)
        >>> all(not set(p.demos) & set(p.queries) for p in plans)
        True
        >>> two = plan_prompts(10, n_demos=2, n_queries=2, seed=0, passes=2)
        >>> two[:6] == plans, sorted(i for p in two[6:] for i in p.demos) == list(range(10))
        (True, True)
    """
    for name, value, low in (
        ("num_examples", num_examples, 1),
        ("n_demos", n_demos, 1),
        ("n_queries", n_queries, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"plan_prompts: `{name}` must be an int >= {low}, got {value!r}.")
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"plan_prompts: `passes` must be an int >= 1, got {passes!r}.")
    if num_query_records is not None:
        if (
            isinstance(num_query_records, bool)
            or not isinstance(num_query_records, int)
            or num_query_records < 1
        ):
            raise ValueError(
                f"plan_prompts: `num_query_records` must be an int >= 1, got {num_query_records!r}."
            )
        folds = [(list(range(num_examples)), list(range(num_query_records)))]
    else:
        if num_examples < 2:
            raise ValueError(
                f"plan_prompts: the 2-fold demo/query split needs at least 2 examples, got {num_examples}."
            )
        folds = _kfold2(num_examples, seed)
    plans = []
    for p in range(passes):
        g = torch.Generator().manual_seed(seed * 1_000_003 + p)
        for demo_pool, query_pool in folds:
            if p > 0:
                demo_pool = [demo_pool[i] for i in torch.randperm(len(demo_pool), generator=g).tolist()]
                query_pool = [query_pool[i] for i in torch.randperm(len(query_pool), generator=g).tolist()]
            demo_batches = [demo_pool[i : i + n_demos] for i in range(0, len(demo_pool), n_demos)]
            query_batches = [query_pool[i : i + n_queries] for i in range(0, len(query_pool), n_queries)]
            for b, demos in enumerate(demo_batches):
                queries = query_batches[b % len(query_batches)]
                plans.append(PromptPlan(tuple(demos), tuple(queries), num_query_records is not None, p))
    return plans


def query_scores(
    predictions: Sequence[str], references: Sequence[str], metric: str = "exact_match"
) -> list[float] | None:
    """Per-query scores ``s_k``, or ``None`` when there are fewer predictions than references (skipped prompt).

    Extra predictions are ignored (as in the official code). With ``exact_match`` the reference's final
    number is :func:`~lightning_eff.llm.metrics.extract_answer` of the gold answer.

    Example::

        >>> query_scores(["4", "6"], ["2 + 2 = 4\\n#### 4", "#### 5"])
        [1.0, 0.0]
        >>> query_scores(["4"], ["#### 4", "#### 5"]) is None
        True
    """
    if metric not in METRICS:
        raise ValueError(f"query_scores: `metric` must be one of {tuple(METRICS)}, got {metric!r}.")
    if len(predictions) < len(references):
        return None
    fn = METRICS[metric]
    if metric == "exact_match":
        return [fn(p, extract_answer(r)) for p, r in zip(predictions, references)]
    return [fn(p, r) for p, r in zip(predictions, references)]


def accumulate_scores(
    score_sum: Tensor, count: Tensor, demo_indices: Sequence[int], weights: Tensor, scores: Sequence[float]
) -> None:
    """Add one prompt's contribution in place (paper Eq. 6): ``score_sum[j] += w_j * sum_k s_k``,
    ``count[j] += n_q``; the final score is ``score_sum / count``.

    Example::

        >>> total, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        >>> accumulate_scores(total, count, [0, 2], torch.tensor([0.25, 0.75]), [1.0, 0.0, 1.0])
        >>> (total / count.clamp(min=1)).tolist()  # w_j * mean(s) = w_j * 2/3
        [0.16666666666666666, 0.0, 0.5]
    """
    if len(demo_indices) != len(weights):
        raise ValueError(f"accumulate_scores: {len(demo_indices)} demonstrations but {len(weights)} weights.")
    idx = torch.as_tensor(list(demo_indices), dtype=torch.long, device=score_sum.device)
    score_sum.index_add_(0, idx, weights.to(score_sum) * float(sum(scores)))
    count.index_add_(
        0, idx, torch.full((len(idx),), float(len(scores)), dtype=count.dtype, device=count.device)
    )


# ------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# the whole procedure
# ------------------------------------------------------------------------------------------------
@dataclass
class WhispererResult:
    """Accumulated scores of a (shard of a) Data Whisperer run.

    ``score_sum`` and ``count`` are ``[N]`` (one pass) or ``[passes, N]``; a pass's score is ``score_sum / count``
    (0 where ``count == 0``) and :attr:`scores` averages the passes in which an example was scored.
    ``query_score_sum / num_queries`` is the scorer's in-context accuracy on the queries of the prompts that
    were not skipped; ``num_skipped / num_prompts`` is the share of prompts with too few parsed answers."""

    score_sum: Tensor
    count: Tensor
    num_prompts: int
    num_skipped: int
    query_score_sum: float = 0.0
    num_queries: int = 0

    @property
    def pass_scores(self) -> Tensor:
        """Per-pass scores ``[passes, N]``."""
        s, c = self.score_sum.reshape(-1, self.score_sum.shape[-1]), self.count.reshape(-1, self.count.shape[-1])
        return torch.where(c > 0, s / c.clamp(min=1), torch.zeros_like(s))

    @property
    def scores(self) -> Tensor:
        """Final per-example scores ``[N]``: the mean over the passes that scored the example (0 if none did)."""
        c = self.count.reshape(-1, self.count.shape[-1])
        scored = (c > 0).to(self.score_sum.dtype)
        n = scored.sum(0)
        return torch.where(n > 0, (self.pass_scores * scored).sum(0) / n.clamp(min=1), torch.zeros_like(n))

    def pass_agreement(self) -> float:
        """Mean pairwise Spearman rank correlation between the passes' scores (NaN with one pass or constant scores).

        Example::

            >>> r = WhispererResult(torch.tensor([[1., 2., 3.], [1., 3., 2.]]), torch.ones(2, 3), 2, 0)
            >>> round(r.pass_agreement(), 6)
            0.5
        """
        scores = self.pass_scores
        if scores.shape[0] < 2:
            return float("nan")
        ranks = torch.stack([_average_ranks(row) for row in scores])
        corr = []
        for i in range(len(ranks)):
            for j in range(i + 1, len(ranks)):
                a, b = ranks[i] - ranks[i].mean(), ranks[j] - ranks[j].mean()
                denom = float(a.norm() * b.norm())
                if denom > 0:
                    corr.append(float((a * b).sum()) / denom)
        return sum(corr) / len(corr) if corr else float("nan")


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks of ``x`` (0-based), ties sharing their mean rank (as ``scipy.stats.rankdata(method='average')``)."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    values = x[order]
    out = ranks.clone()
    start = 0
    for i in range(1, len(x) + 1):
        if i == len(x) or values[i] != values[start]:
            out[order[start:i]] = ranks[order[start:i]].mean()
            start = i
    return out


def data_whisperer_scores(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict],
    query_records: Sequence[dict] | None = None,
    *,
    n_demos: int = 5,
    n_queries: int = 3,
    layer: int | None = None,
    template: ICLTemplate | None = None,
    metric: str = "exact_match",
    prompt_batch_size: int = 4,
    max_new_tokens: int | None = None,
    seed: int = 42,
    passes: int = 1,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    predict_fn: Callable[[list[str], list[int]], list[str]] | None = None,
) -> WhispererResult:
    """Score every training record with Data Whisperer (see the module docstring).

    Prompts are processed ``prompt_batch_size`` at a time, left-padded; prompt ``i`` of the schedule runs on
    rank ``i % world_size``, so the per-rank results add up (``all_reduce`` sum) to the full run.

    Args:
        model: the causal LM that will be fine-tuned (or a smaller one of its family), in eval mode.
        tokenizer: its fast tokenizer (character offsets are needed).
        records: training records (``question``, ``answer``).
        query_records: optional separate query records (e.g. a validation split); default: 2-fold split.
        n_demos: demonstrations per prompt (paper: 5).
        n_queries: queries per prompt (paper scripts: 3).
        layer: attention layer (default :func:`default_attention_layer`).
        template: prompt strings.
        metric: ``"exact_match"`` or ``"rouge_l"``.
        prompt_batch_size: prompts per generation / re-run batch.
        max_new_tokens: generation budget per prompt (default: ``n_queries`` times the longest reference in
            tokens, plus 16 per answer).
        seed: seed of the 2-fold split (official: 42) and of the shuffles of later passes.
        passes: prompt assignments averaged (see :func:`plan_prompts`); the result holds one row per pass.
        rank: this process's rank.
        world_size: number of processes sharing the work.
        progress: show a progress bar (rank 0 only).
        predict_fn: replaces generation: ``predict_fn(prompt_texts, n_queries_per_prompt) -> responses``.

    Returns:
        :class:`WhispererResult` of this rank's prompts.
    """
    from tqdm.auto import tqdm

    template = template if template is not None else ICLTemplate()
    if len(records) == 0:
        raise ValueError("data_whisperer_scores: `records` is empty.")
    if query_records is not None and len(query_records) == 0:
        raise ValueError("data_whisperer_scores: `query_records` is empty.")
    if isinstance(prompt_batch_size, bool) or not isinstance(prompt_batch_size, int) or prompt_batch_size < 1:
        raise ValueError(
            f"data_whisperer_scores: `prompt_batch_size` must be an int >= 1, got {prompt_batch_size!r}."
        )
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            "data_whisperer_scores: the tokenizer must be a fast (Rust) tokenizer, which reports character offsets."
        )
    if metric not in METRICS:
        raise ValueError(f"data_whisperer_scores: `metric` must be one of {tuple(METRICS)}, got {metric!r}.")
    layer = default_attention_layer(model.config) if layer is None else layer
    n_layers = _num_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(
            f"data_whisperer_scores: `layer` must be an int in [0, {n_layers - 1}], got {layer!r}."
        )
    if max_new_tokens is None:
        longest = max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in records)
        max_new_tokens = n_queries * (longest + 16)

    # A template whose instruction already starts with the BOS token (official chat prompts) gets no second one.
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and template.instruction.startswith(bos))
    plans = plan_prompts(
        len(records), n_demos, n_queries, seed, None if query_records is None else len(query_records), passes
    )
    mine = plans[rank::world_size]
    device = next(model.parameters()).device
    score_sum = torch.zeros(passes, len(records), dtype=torch.float64)
    count = torch.zeros(passes, len(records), dtype=torch.float64)
    skipped = 0
    query_total, n_queries_scored = 0.0, 0
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    batches = [mine[i : i + prompt_batch_size] for i in range(0, len(mine), prompt_batch_size)]
    bar = tqdm(batches, desc="Data Whisperer scoring", unit="batch", disable=not progress or rank != 0)
    try:
        for batch in bar:
            prompts = []
            for plan in batch:
                qpool = query_records if plan.external_queries else records
                prompts.append(build_icl_prompt([records[i] for i in plan.demos], [qpool[i] for i in plan.queries],
                                                template))  # fmt: skip
            enc = tokenizer(
                [p.text for p in prompts],
                padding=True,
                return_tensors="pt",
                return_offsets_mapping=True,
                return_special_tokens_mask=True,
                add_special_tokens=add_special,
            )
            input_ids = enc["input_ids"].to(device)
            mask = enc["attention_mask"].to(device)
            n_answers = [len(plan.queries) for plan in batch]
            if predict_fn is not None:
                responses = list(predict_fn([p.text for p in prompts], n_answers))
            else:
                responses = _generate(
                    model, tokenizer, input_ids, mask, n_answers, max_new_tokens, template, metric
                )
            t = input_ids.shape[1]
            spans = []
            for b, p in enumerate(prompts):
                offsets = enc["offset_mapping"][b].tolist()
                special = enc["special_tokens_mask"][b].tolist()
                pad = t - int(enc["attention_mask"][b].sum())
                special = [1 if i < pad else s for i, s in enumerate(special)]
                tok_spans = token_spans(offsets, [*p.demo_spans, p.response_span], special)
                spans.append((tok_spans[:-1], tok_spans[-1]))
            rows = t - min(r[0] for _, r in spans)
            attention = layer_attention(model, input_ids, mask, layer, last_rows=rows).cpu()
            for b, (plan, response) in enumerate(zip(batch, responses)):
                qpool = query_records if plan.external_queries else records
                refs = [qpool[i]["answer"] for i in plan.queries]
                preds = split_answers(response, len(refs), template, metric)
                s = query_scores(preds, refs, metric)
                if s is None:
                    skipped += 1
                    continue
                demo_spans, (r0, r1) = spans[b]
                w = demonstration_weights(attention[b], demo_spans, (r0 - (t - rows), r1 - (t - rows)))
                accumulate_scores(score_sum[plan.pass_index], count[plan.pass_index], plan.demos, w, s)
                query_total += float(sum(s))
                n_queries_scored += len(s)
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
        bar.close()
    if not math.isfinite(float(score_sum.sum())):
        raise FloatingPointError("data_whisperer_scores: a score is NaN or inf.")
    if passes == 1:
        score_sum, count = score_sum[0], count[0]
    return WhispererResult(score_sum, count, len(mine), skipped, query_total, n_queries_scored)
