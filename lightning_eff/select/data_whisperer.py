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

Layout: the scoring math (Eq. 4-6) is in :mod:`~lightning_eff.select.scoring`, the attention re-run in
:mod:`~lightning_eff.select.attention`, the prompt plan in :mod:`~lightning_eff.select.planning`, generation and
answer parsing in :mod:`~lightning_eff.select.generation`; this module runs the procedure and re-exports them.

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

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_eff.llm.metrics import METRICS
from lightning_eff.select.attention import _num_layers, default_attention_layer, layer_attention
from lightning_eff.select.generation import _generate, split_answers
from lightning_eff.select.planning import PromptPlan, matched_share, plan_prompts
from lightning_eff.select.prompts import ICLTemplate, build_icl_prompt
from lightning_eff.select.scoring import (
    WhispererResult,
    accumulate_scores,
    demonstration_weights,
    query_scores,
    token_spans,
)
from lightning_eff.utils.checks import check_choice, check_int

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
    "matched_share",
    "split_answers",
]


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
    query_match: str | None = None,
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
        query_match: a record field (e.g. ``"key"`` of :mod:`lightning_eff.llm.icl_tasks`): each prompt asks one
            query per demonstration, with the same value of this field, ``n_queries`` per prompt (matched queries,
            :func:`plan_prompts`; needs ``query_records``). ``None``: the official query cycle.
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
    check_int(prompt_batch_size, "prompt_batch_size", minimum=1, owner="data_whisperer_scores")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            "data_whisperer_scores: the tokenizer must be a fast (Rust) tokenizer, which reports character offsets."
        )
    check_choice(metric, "metric", tuple(METRICS), owner="data_whisperer_scores")
    layer = default_attention_layer(model.config) if layer is None else layer
    n_layers = _num_layers(model)
    check_int(layer, "layer", minimum=0, maximum=n_layers - 1, owner="data_whisperer_scores")
    if max_new_tokens is None:
        longest = max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in records)
        max_new_tokens = (min(n_demos, n_queries) if query_match is not None else n_queries) * (longest + 16)

    # A template whose instruction already starts with the BOS token (official chat prompts) gets no second one.
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and template.instruction.startswith(bos))
    demo_keys = query_keys = None
    if query_match is not None:
        if query_records is None:
            raise ValueError("data_whisperer_scores: `query_match` needs `query_records` (the clean queries).")
        missing = [name for name, recs in (("records", records), ("query_records", query_records))
                   if any(query_match not in r for r in recs)]  # fmt: skip
        if missing:
            raise ValueError(
                f"data_whisperer_scores: `query_match`={query_match!r} is not a field of every record of {missing}."
            )
        demo_keys = [r[query_match] for r in records]
        query_keys = [r[query_match] for r in query_records]
    plans = plan_prompts(
        len(records), n_demos, n_queries, seed, None if query_records is None else len(query_records), passes,
        demo_keys=demo_keys, query_keys=query_keys,
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
