"""Data scorers: the plug-ins :class:`~lightning_eff.select.DataWhispererDataModule` selects with.

A :class:`Scorer` turns the training records into one float per example (higher = keep). The DataModule owns
what every scorer shares: resolving the scorer model, the cache (keyed by :meth:`Scorer.settings`), the DDP
reduction (a scorer adds up per-rank partial results with ``ctx.reduce``), top-k with seeded random
tie-breaking, the export and the selection-to-tuning ratio. A scorer owns its own settings and is chosen by
``class_path`` in YAML, like the distillation plug-ins and the token selectors::

    data:
      class_path: lightning_eff.select.DataWhispererDataModule
      init_args:
        ratio: 0.1
        scorer:
          class_path: lightning_eff.select.DataWhispererScorer
          init_args: {n_demos: 5, n_queries: 3, passes: 2}

* :class:`DataWhispererScorer`: Data Whisperer (arXiv:2505.12212), training-free, in context.
* :class:`RandomScorer`: uniform random scores (a random subset).
* :class:`EL2NScorer`, :class:`GraNdScorer`: Paul et al. (NeurIPS 2021) after a short fine-tuning warm-up.

A new scorer subclasses :class:`Scorer`, sets ``name``, ``needs_model`` and ``uses_seed``, and implements
:meth:`Scorer.settings` and :meth:`Scorer.score`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_eff.llm.metrics import METRICS
from lightning_eff.select.prompts import ICLTemplate
from lightning_eff.utils.checks import check_choice, check_float, check_int, check_optional_int

__all__ = [
    "Scorer",
    "ScoringContext",
    "DataWhispererScorer",
    "RandomScorer",
    "EL2NScorer",
    "GraNdScorer",
    "SCORERS",
    "scorer_from_method",
]


@dataclass
class ScoringContext:
    """What the DataModule hands a scorer.

    Attributes:
        records: the training records (``question``, ``answer``, ...).
        query_records: clean query records (the validation split), or ``None`` if there are none.
        model: the scorer model (on ``device``, eval mode), or ``None`` for a scorer with ``needs_model=False``.
        tokenizer: its tokenizer (``None`` with ``model``).
        collator: the :class:`~lightning_eff.llm.data.InstructionCollator` of ``tokenizer`` (training format).
        batch_size: training batch size of the DataModule.
        eval_batch_size: evaluation batch size of the DataModule.
        seed: the selection seed (a scorer's own ``seed`` overrides it).
        rank: this process's rank; ``world_size``: number of processes.
        reduce: sums a tensor over ranks (identity on one process).
        device: the scoring device.
        progress: show progress bars (rank 0).
        stats: the scorer writes its statistics here (logged as ``select/<key>``, cached with the scores).
        owner: name used in messages.
    """

    records: Sequence[dict]
    query_records: Sequence[dict] | None
    model: Any
    tokenizer: Any
    collator: Any
    batch_size: int
    eval_batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    reduce: Callable[[Tensor], Tensor] = field(default=lambda t: t)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = False
    stats: dict[str, float] = field(default_factory=dict)
    owner: str = "DataWhispererDataModule"


class Scorer:
    """Base class of data scorers (see the module docstring).

    Class attributes: ``name`` (used in file names and logs), ``needs_model`` (the DataModule resolves the scorer
    model), ``uses_seed`` (the scores depend on the selection seed: a new seed gives a new selection).
    """

    name: str = "scorer"
    needs_model: bool = True
    uses_seed: bool = False

    def settings(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """Every setting that changes the scores (part of the cache key and of the export)."""
        raise NotImplementedError

    def score(self, ctx: ScoringContext) -> Tensor:  # pragma: no cover - abstract
        """Per-example scores ``[N]`` (float64), the same on every rank."""
        raise NotImplementedError

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.settings().items() if k != "scorer")
        return f"{type(self).__name__}({inner})"


class RandomScorer(Scorer):
    """Uniform random scores from a seeded generator: the top-k is a random subset.

    Args:
        seed: seed of the draw (default: the DataModule's selection seed, i.e. ``seed_everything``'s).

    Example::

        >>> ctx = ScoringContext(records=[{}] * 4, query_records=None, model=None, tokenizer=None, collator=None,
        ...                      batch_size=1, eval_batch_size=1, seed=1)
        >>> RandomScorer().score(ctx).equal(RandomScorer(seed=1).score(ctx))
        True
    """

    name = "random"
    needs_model = False
    uses_seed = True

    def __init__(self, seed: int | None = None) -> None:
        self.seed = check_optional_int(seed, "seed", minimum=0, owner="RandomScorer")

    def settings(self) -> dict[str, Any]:
        return {"scorer": self.name, "seed": self.seed}

    def score(self, ctx: ScoringContext) -> Tensor:
        from lightning_eff.select.baselines import random_scores

        return random_scores(len(ctx.records), ctx.seed if self.seed is None else self.seed)


class _WarmupScorer(Scorer):
    """EL2N / GraNd: ``warmup_steps`` AdamW steps (lr ``warmup_lr``) on the training set, then score."""

    uses_seed = True  # the warm-up's batch order

    def __init__(self, warmup_steps: int = 50, warmup_lr: float = 1e-3, seed: int | None = None) -> None:
        owner = type(self).__name__
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", minimum=0, owner=owner)
        self.warmup_lr = check_float(warmup_lr, "warmup_lr", low=0.0, low_open=True, owner=owner)
        self.seed = check_optional_int(seed, "seed", minimum=0, owner=owner)

    def settings(self) -> dict[str, Any]:
        return {"scorer": self.name, "warmup_steps": self.warmup_steps, "warmup_lr": self.warmup_lr,
                "seed": self.seed}  # fmt: skip

    def _part(self, tuned: Any, ctx: ScoringContext, mine: list[int]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, ctx: ScoringContext) -> Tensor:
        from lightning_eff.select.baselines import warmup_finetune

        n = len(ctx.records)
        seed = ctx.seed if self.seed is None else self.seed
        tuned = warmup_finetune(ctx.model, ctx.collator, ctx.records, steps=self.warmup_steps, lr=self.warmup_lr,
                                batch_size=ctx.batch_size, seed=seed, progress=ctx.progress and ctx.rank == 0)  # fmt: skip
        mine = list(range(ctx.rank, n, ctx.world_size))
        part = self._part(tuned, ctx, mine)
        del tuned
        full = torch.zeros(n, dtype=torch.float64)
        full[mine] = part
        return ctx.reduce(full)


class EL2NScorer(_WarmupScorer):
    """EL2N (Paul et al. 2021, Eq. 2) after a fine-tuning warm-up; the hardest examples score highest.

    Args:
        warmup_steps: fine-tuning steps before scoring.
        warmup_lr: AdamW learning rate of the warm-up.
        seed: seed of the warm-up's batch order (default: the DataModule's selection seed).
    """

    name = "el2n"

    def _part(self, tuned: Any, ctx: ScoringContext, mine: list[int]) -> Tensor:
        from lightning_eff.select.baselines import el2n_scores

        return el2n_scores(tuned, ctx.collator, ctx.records, mine, batch_size=ctx.eval_batch_size,
                           progress=ctx.progress and ctx.rank == 0)  # fmt: skip


class GraNdScorer(_WarmupScorer):
    """GraNd (Paul et al. 2021, Eq. 1) after a fine-tuning warm-up; the largest gradient norms score highest.

    Args:
        warmup_steps: fine-tuning steps before scoring.
        warmup_lr: AdamW learning rate of the warm-up.
        seed: seed of the warm-up's batch order (default: the DataModule's selection seed).
    """

    name = "grand"

    def _part(self, tuned: Any, ctx: ScoringContext, mine: list[int]) -> Tensor:
        from lightning_eff.select.baselines import grand_scores

        return grand_scores(tuned, ctx.collator, ctx.records, mine, progress=ctx.progress and ctx.rank == 0)


class DataWhispererScorer(Scorer):
    """Data Whisperer (arXiv:2505.12212): ``score_j = w_j * mean_k s_k`` in few-shot prompts of the scorer model.

    See :mod:`lightning_eff.select.data_whisperer` for the method; this class is its settings and its statistics.

    Args:
        n_demos: demonstrations per prompt (paper: 5).
        n_queries: queries per prompt (paper scripts: 3).
        attention_layer: layer whose attention is read (default: per model family, as the official code).
        prompt_batch_size: prompts per batched generation / attention re-run (left padding).
        max_new_tokens: generation budget per prompt (default from the longest reference answer).
        metric: ``"exact_match"`` or ``"rouge_l"`` for the query answers.
        fold_seed: seed of the prompt assignment (the 2-fold split, and the shuffles of ``passes`` > 1).
        queries_from_val: take the (clean) queries from the validation split; the documented recipe. Without a
            validation split the official 2-fold split of the training set is used, with a warning.
        passes: prompt assignments averaged (each example is a demonstration once per pass); with 2 or more the
            mean pairwise Spearman correlation of the passes' scores is reported as ``select/pass_agreement``.
        icl_template: overrides of :class:`~lightning_eff.select.prompts.ICLTemplate` fields.
        query_match: a record field (e.g. ``"key"`` of the :mod:`lightning_eff.llm.icl_tasks` stand-in): each prompt
            asks, for each demonstration, a validation query with the same value of that field, ``n_queries`` per
            prompt (matched queries, an assignment choice of the benchmark, not of the paper; needs the validation
            queries). ``None``: the official cycle of ``n_queries`` queries per prompt.

    Statistics (``select/...``): ``icl_accuracy`` (mean query score over the queries of the prompts whose answers
    parsed), ``unparsed_share`` (share of prompts with fewer parsed answers than queries, skipped),
    ``icl_score`` (mean over all queries, an unparsed one counting 0), ``prompts``, ``skipped_prompts``,
    ``pass_agreement``.

    Example::

        >>> DataWhispererScorer(n_demos=4, passes=2).settings()["passes"]
        2
    """

    name = "data_whisperer"

    def __init__(
        self,
        n_demos: int = 5,
        n_queries: int = 3,
        attention_layer: int | None = None,
        prompt_batch_size: int = 4,
        max_new_tokens: int | None = None,
        metric: str = "exact_match",
        fold_seed: int = 42,
        queries_from_val: bool = True,
        passes: int = 1,
        icl_template: dict[str, str] | None = None,
        query_match: str | None = None,
    ) -> None:
        owner = type(self).__name__
        self.n_demos = check_int(n_demos, "n_demos", minimum=1, owner=owner)
        self.n_queries = check_int(n_queries, "n_queries", minimum=1, owner=owner)
        self.attention_layer = check_optional_int(attention_layer, "attention_layer", minimum=0, owner=owner)
        self.prompt_batch_size = check_int(prompt_batch_size, "prompt_batch_size", minimum=1, owner=owner)
        self.max_new_tokens = check_optional_int(max_new_tokens, "max_new_tokens", minimum=1, owner=owner)
        self.metric = check_choice(metric, "metric", tuple(METRICS), owner=owner)
        self.fold_seed = check_int(fold_seed, "fold_seed", minimum=0, owner=owner)
        if not isinstance(queries_from_val, bool):
            raise TypeError(f"{owner}: `queries_from_val` must be a bool, got {queries_from_val!r}.")
        self.queries_from_val = queries_from_val
        self.passes = check_int(passes, "passes", minimum=1, owner=owner)
        if query_match is not None and (not isinstance(query_match, str) or not query_match):
            raise ValueError(f"{owner}: `query_match` must be a record field name or None, got {query_match!r}.")
        self.query_match = query_match
        try:
            self.template = ICLTemplate(**(icl_template or {}))
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{owner}: bad `icl_template` {icl_template!r} (keys must be ICLTemplate fields): {err}"
            ) from err

    def settings(self) -> dict[str, Any]:
        return {"scorer": self.name, "n_demos": self.n_demos, "n_queries": self.n_queries,
                "attention_layer": self.attention_layer, "max_new_tokens": self.max_new_tokens,
                "metric": self.metric, "fold_seed": self.fold_seed, "queries_from_val": self.queries_from_val,
                "passes": self.passes, "template": self.template.__dict__,
                **({"query_match": self.query_match} if self.query_match is not None else {})}  # fmt: skip

    def uses_queries(self, query_records: Sequence[dict] | None) -> bool:
        """Whether the queries come from ``query_records`` (the validation split)."""
        return self.queries_from_val and bool(query_records)

    def score(self, ctx: ScoringContext) -> Tensor:
        from lightning_eff.select import data_whisperer as dw

        queries = ctx.query_records if self.uses_queries(ctx.query_records) else None
        if self.queries_from_val and queries is None:
            rank_zero_warn(
                f"{ctx.owner}: DataWhispererScorer(queries_from_val=True) found no validation records; the queries "
                f"come from the training set (2-fold split), so they carry its label noise. Give a validation split "
                f"(`num_val` or `val_path`)."
            )
        if self.query_match is not None and queries is None:
            raise ValueError(
                f"{ctx.owner}: DataWhispererScorer(query_match={self.query_match!r}) needs the validation queries "
                f"(`queries_from_val=True` and a validation split: `num_val` or `val_path`)."
            )
        result = dw.data_whisperer_scores(
            ctx.model, ctx.tokenizer, ctx.records, queries, n_demos=self.n_demos, n_queries=self.n_queries,
            layer=self.attention_layer, template=self.template, metric=self.metric,
            prompt_batch_size=self.prompt_batch_size, max_new_tokens=self.max_new_tokens, seed=self.fold_seed,
            passes=self.passes, query_match=self.query_match, rank=ctx.rank, world_size=ctx.world_size, progress=ctx.progress,
        )  # fmt: skip
        score_sum, count = ctx.reduce(result.score_sum), ctx.reduce(result.count)
        totals = ctx.reduce(torch.tensor([float(result.num_prompts), float(result.num_skipped),
                                          result.query_score_sum, float(result.num_queries)], dtype=torch.float64))  # fmt: skip
        prompts, skipped, q_sum, q_num = (float(v) for v in totals)
        reduced = dw.WhispererResult(score_sum, count, int(prompts), int(skipped), q_sum, int(q_num))
        n_all = q_num + skipped * (min(self.n_demos, self.n_queries) if self.query_match else self.n_queries)
        ctx.stats.update(
            prompts=prompts,
            skipped_prompts=skipped,
            unparsed_share=skipped / prompts if prompts else 0.0,
            icl_accuracy=q_sum / q_num if q_num else 0.0,
            icl_score=q_sum / n_all if n_all else 0.0,
        )
        if self.passes > 1:
            ctx.stats["pass_agreement"] = reduced.pass_agreement()
        scores = reduced.scores
        if prompts and (skipped == prompts or q_sum == 0):
            cause = (
                f"the scorer gave fewer parsable answers than queries in all {int(prompts)} prompts"
                if skipped == prompts
                else f"the scorer answered none of the {int(q_num)} parsed in-context queries correctly (accuracy 0)"
            )
            rank_zero_warn(
                f"{ctx.owner}: {cause}, so every Data Whisperer score is 0 and the selection is a random draw (ties "
                f"are broken at random), not a Data Whisperer selection. Use a scorer that can answer in context (a "
                f"trained or instruction-tuned model, see lightning_eff.llm.icl_tasks) or raise `max_new_tokens`."
            )
        if not math.isfinite(float(scores.sum())):
            raise FloatingPointError(f"{ctx.owner}: a Data Whisperer score is NaN or inf.")
        return scores


#: The built-in scorers by ``method`` shorthand.
SCORERS: dict[str, type[Scorer]] = {
    "data_whisperer": DataWhispererScorer,
    "random": RandomScorer,
    "el2n": EL2NScorer,
    "grand": GraNdScorer,
}


def scorer_from_method(method: str) -> Scorer:
    """The default scorer of a ``method`` shorthand (``"data_whisperer"``, ``"random"``, ``"el2n"``, ``"grand"``).

    Example::

        >>> scorer_from_method("el2n")
        EL2NScorer(warmup_steps=50, warmup_lr=0.001, seed=None)
    """
    if method not in SCORERS:
        raise ValueError(f"scorer_from_method: `method` must be one of {tuple(SCORERS)}, got {method!r}.")
    return SCORERS[method]()
