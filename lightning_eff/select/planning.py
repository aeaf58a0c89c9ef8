"""Data Whisperer's prompt plan: which demonstrations and which queries share a prompt (paper Sec. 3.1).

The official schedule (2-fold split or external queries, consecutive batches, cycling queries), its repetition
over ``passes`` and the matched-query assignment of the CPU stand-in (:func:`plan_prompts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_eff.utils.checks import check_int
from lightning_eff.utils.seeding import derive_seed

__all__ = ["PromptPlan", "plan_prompts", "matched_share"]


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
    demo_keys: Sequence[Any] | None = None,
    query_keys: Sequence[Any] | None = None,
) -> list[PromptPlan]:
    """The official prompt schedule (see the module docstring, steps 1-2), repeated for ``passes`` assignments.

    Pass 0 is the official schedule. Pass ``p >= 1`` (an extension: several prompt assignments averaged) first
    permutes the training indices and the query indices with a generator seeded by ``(seed, p)``, so every
    example is again a demonstration exactly once per pass, next to other demonstrations and queries.

    **Matched queries** (an extension, not in the paper; ``demo_keys`` and ``query_keys`` given, external queries
    only): instead of a batch of ``n_queries`` queries cycling over the query set, each prompt asks one query per
    demonstration, a query whose key equals that demonstration's key (``query_keys[q] == demo_keys[j]``), taken in
    turn from a per-key cycle (shuffled per pass), in a random order. A demonstration whose key no query
    has gets the next query of the plain cycle instead. The queries of a demonstration batch are asked
    ``n_queries`` at a time: ``n_queries >= n_demos`` gives one prompt per batch, ``n_queries = 1`` one prompt per
    demonstration, each with the same demonstrations and one query (so ``w_j`` is read per query). Eq. 6 is
    unchanged (a demonstration accumulates ``w_j * s_k`` over every prompt it is in); the assignment only makes sure
    that every demonstration is the one some query needs (see ``docs/methods/data_whisperer.md``).

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
    for name, value in (("num_examples", num_examples), ("n_demos", n_demos), ("n_queries", n_queries),
                        ("passes", passes)):  # fmt: skip
        check_int(value, name, minimum=1, owner="plan_prompts")
    if num_query_records is not None:
        check_int(num_query_records, "num_query_records", minimum=1, owner="plan_prompts")
        folds = [(list(range(num_examples)), list(range(num_query_records)))]
        if (demo_keys is None) != (query_keys is None):
            raise ValueError("plan_prompts: give both `demo_keys` and `query_keys` (matched queries) or neither.")
        if demo_keys is not None and (len(demo_keys) != num_examples or len(query_keys) != num_query_records):
            raise ValueError(
                f"plan_prompts: `demo_keys` ({len(demo_keys)}) and `query_keys` ({len(query_keys)}) must have "
                f"`num_examples` ({num_examples}) and `num_query_records` ({num_query_records}) entries."
            )
    else:
        if num_examples < 2:
            raise ValueError(
                f"plan_prompts: the 2-fold demo/query split needs at least 2 examples, got {num_examples}."
            )
        if demo_keys is not None or query_keys is not None:
            raise ValueError("plan_prompts: matched queries (`demo_keys`, `query_keys`) need `num_query_records`.")
        folds = _kfold2(num_examples, seed)
    plans = []
    for p in range(passes):
        g = torch.Generator().manual_seed(derive_seed("data-whisperer-pass", seed, p))
        for demo_pool, query_pool in folds:
            if p > 0:
                demo_pool = [demo_pool[i] for i in torch.randperm(len(demo_pool), generator=g).tolist()]
                query_pool = [query_pool[i] for i in torch.randperm(len(query_pool), generator=g).tolist()]
            demo_batches = [demo_pool[i : i + n_demos] for i in range(0, len(demo_pool), n_demos)]
            if demo_keys is not None:
                plans.extend(_matched_plans(demo_batches, query_pool, demo_keys, query_keys, p, g, n_queries))
                continue
            query_batches = [query_pool[i : i + n_queries] for i in range(0, len(query_pool), n_queries)]
            for b, demos in enumerate(demo_batches):
                queries = query_batches[b % len(query_batches)]
                plans.append(PromptPlan(tuple(demos), tuple(queries), num_query_records is not None, p))
    return plans


def _matched_plans(demo_batches: list[list[int]], query_pool: list[int], demo_keys: Sequence[Any],
                   query_keys: Sequence[Any], pass_index: int, generator: torch.Generator,
                   n_queries: int) -> list[PromptPlan]:  # fmt: skip
    """One query per demonstration, with the demonstration's key, cycling per key (see :func:`plan_prompts`);
    a batch's queries are put in a random order (query ``k`` is not simply demonstration ``k``'s) and asked
    ``n_queries`` at a time, each group in its own prompt with the same demonstrations."""
    by_key: dict[Any, list[int]] = {}
    for q in query_pool:
        by_key.setdefault(query_keys[q], []).append(q)
    cursor = {k: 0 for k in by_key}
    plain = 0
    plans = []
    for demos in demo_batches:
        queries = []
        for d in demos:
            key = demo_keys[d]
            if key in by_key:
                queries.append(by_key[key][cursor[key] % len(by_key[key])])
                cursor[key] += 1
            else:
                queries.append(query_pool[plain % len(query_pool)])
                plain += 1
        order = torch.randperm(len(queries), generator=generator).tolist()
        queries = [queries[i] for i in order]
        for start in range(0, len(queries), n_queries):
            plans.append(PromptPlan(tuple(demos), tuple(queries[start : start + n_queries]), True, pass_index))
    return plans


def matched_share(plans: Sequence[PromptPlan], demo_keys: Sequence[Any], query_keys: Sequence[Any]) -> float:
    """Share of demonstrations (per pass) whose key some query asks, among the prompts with their demonstrations.

    Prompts with the same demonstrations in the same pass (matched queries with ``n_queries < n_demos``) count as
    one batch whose queries are pooled.

    Example::

        >>> round(matched_share([PromptPlan((0, 1), (0,), True)], ["a", "b"], ["a"]), 3)
        0.5
        >>> matched_share([PromptPlan((0, 1), (0,), True), PromptPlan((0, 1), (1,), True)], ["a", "b"], ["a", "b"])
        1.0
    """
    asked: dict[tuple[int, tuple[int, ...]], set] = {}
    for plan in plans:
        keys = query_keys if plan.external_queries else demo_keys
        asked.setdefault((plan.pass_index, plan.demos), set()).update(keys[q] for q in plan.queries)
    hit = sum(demo_keys[d] in keys for (_, demos), keys in asked.items() for d in demos)
    total = sum(len(demos) for _, demos in asked)
    return hit / total if total else float("nan")
