"""``DataWhispererDataModule``: an instruction DataModule that fine-tunes on a selected subset.

In ``setup("fit")`` it scores every training example with a :class:`~lightning_eff.select.scorers.Scorer`
plug-in (``DataWhispererScorer`` by default, or a baseline: ``RandomScorer``, ``EL2NScorer``, ``GraNdScorer``),
keeps the top ``ratio`` (or ``num_selected``; ties broken at random with the selection seed), and
``train_dataloader`` serves only that subset; validation and test data are untouched. See
:mod:`lightning_eff.select.data_whisperer` for the method and the paper. The documented recipe takes the
Data Whisperer queries from the clean validation split (``DataWhispererScorer(queries_from_val=True)``).

* Scorer model: the model being fine-tuned (the Trainer's :class:`~lightning_eff.llm.CausalLMModule`, at its
  initial weights) by default, or ``scorer_model``: a local path (e.g. a smaller model of the same
  family, the paper's weak-to-strong setting) or a config dict.
* Cache: with ``cache_dir``, the per-example scores are stored under a key of the scorer class and its
  settings (and the selection seed for a stochastic scorer), the scorer model (weights fingerprint), the training data and every scoring setting, written atomically with a format
  version; a rerun, a resumed run or a sweep over ``ratio`` reads them instead of scoring again. The
  selection is exported as JSON (``selection_path``, or next to the cache) and reads back with
  :func:`load_selection`.
* DDP: prompts (or examples, for the baselines) are sharded across ranks and the partial scores summed
  with the strategy's ``reduce``; the cache decision is broadcast from rank 0, so every rank ends with
  the same subset.
* Cost: ``select/seconds`` (this run), ``select/scoring_seconds`` (cost of the scores, also when read
  from the cache), ``select/num_selected`` are logged to the Trainer's loggers; with
  ``full_finetune_seconds`` also ``select/str`` (selection-to-tuning ratio, the paper's STR). The
  :class:`SelectionToTuningRatio` callback logs an estimate of STR from the measured subset fine-tuning
  time when the full-set time is unknown.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_eff.llm.data import InstructionDataModule
from lightning_eff.select.scorers import Scorer, ScoringContext, scorer_from_method
from lightning_eff.utils.checks import check_float, check_optional_int
from lightning_eff.utils.io import atomic_write_text

__all__ = [
    "DataWhispererDataModule",
    "SelectionToTuningRatio",
    "METHODS",
    "FORMAT_VERSION",
    "load_selection",
    "top_k",
    "model_fingerprint",
]

METHODS = ("data_whisperer", "random", "el2n", "grand", "full")
FORMAT_VERSION = 2
#: Former DataModule arguments that are scorer settings now (a clear error names the new place).
_SCORER_SETTINGS = frozenset({"n_demos", "n_queries", "attention_layer", "prompt_batch_size", "max_new_tokens", "metric",
                              "fold_seed", "queries_from_val", "icl_template", "warmup_steps",
                              "warmup_lr", "passes"})  # fmt: skip


def top_k(scores: Tensor, k: int, seed: int | None = None) -> list[int]:
    """Indices of the ``k`` highest scores, highest first; ties are broken at random with ``seed``.

    With ``seed=None`` ties go to the lower index (deterministic, but biased towards the start of the data when
    many scores tie, e.g. the zeros of Data Whisperer prompts whose queries were all wrong).

    Example::

        >>> top_k(torch.tensor([0.1, 0.5, 0.5, 0.2]), 3)
        [1, 2, 3]
        >>> sorted(top_k(torch.zeros(6), 3, seed=0)) != [0, 1, 2] or sorted(top_k(torch.zeros(6), 3, seed=1))
        True
    """
    scores = scores.double()
    if seed is None:
        return torch.argsort(-scores, stable=True)[:k].tolist()
    perm = torch.randperm(len(scores), generator=torch.Generator().manual_seed(seed))
    order = torch.argsort(-scores[perm], stable=True)
    return perm[order][:k].tolist()


def _tied_at_cutoff(scores: Tensor, k: int) -> int:
    """How many examples share the score of the k-th best (the ones the random tie-breaking chooses among)."""
    if k >= len(scores):
        return 0
    kth = torch.sort(scores.double(), descending=True).values[k - 1]
    tied = int((scores.double() == kth).sum())
    return tied if tied > 1 else 0


def _atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj))


def load_selection(path: str | os.PathLike) -> dict[str, Any]:
    """Read a selection exported by :class:`DataWhispererDataModule` (checks the format version).

    Returns the dict with ``indices`` (selected training indices, best first), ``scores``, ``examples``,
    ``method``, ``num_examples``, ``num_selected`` and the scoring ``settings``.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("format_version") != FORMAT_VERSION or data.get("kind") != "selection":
        raise ValueError(
            f"load_selection: {path} is not a lightning-eff selection of format version {FORMAT_VERSION} "
            f"(found kind={data.get('kind')!r}, format_version={data.get('format_version')!r})."
        )
    return data


def model_fingerprint(model: Any) -> str:
    """A cheap fingerprint of a model's config and weights (per-parameter shape, sum, sum of squares and a
    few values), for cache keys.

    Example::

        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> model_fingerprint(a) == model_fingerprint(a), model_fingerprint(a) == model_fingerprint(b)
        (True, False)
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            t = p.detach()
            flat = t.reshape(-1)
            stats = [float(t.double().sum()), float(t.double().pow(2).sum())] if t.numel() else []
            head = flat[:4].double().tolist()
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{stats}|{head}".encode())
    return h.hexdigest()


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _records_fingerprint(records: Sequence[dict]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r["question"], r["answer"]]).encode())
    return h.hexdigest()


class DataWhispererDataModule(InstructionDataModule):
    """Instruction data whose training split is reduced to the examples a :class:`~lightning_eff.select.Scorer`
    scores highest.

    Args:
        scorer: the scorer (:class:`~lightning_eff.select.DataWhispererScorer`,
            :class:`~lightning_eff.select.RandomScorer`, :class:`~lightning_eff.select.EL2NScorer`,
            :class:`~lightning_eff.select.GraNdScorer` or your own), chosen by ``class_path`` in YAML; each carries
            its own settings. Default: ``DataWhispererScorer()`` (clean queries from the validation split).
        method: shorthand for a scorer with default settings: ``"data_whisperer"``, ``"random"``, ``"el2n"``,
            ``"grand"``, or ``"full"`` (no selection). Give ``scorer`` or ``method``, not both.
        ratio: fraction of the training set to keep, in ``(0, 1]`` (``ceil(ratio * N)`` examples).
        num_selected: keep exactly this many instead (overrides ``ratio``).
        scorer_model: model that scores: ``None`` (the Trainer's CausalLMModule), a local path or a config dict.
        scorer_tokenizer: tokenizer of ``scorer_model`` (default: the model path, else the data tokenizer).
        scorer_dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``None`` for a loaded ``scorer_model``.
        selection_seed: seed of the stochastic scorers (random, the EL2N/GraNd warm-up order) and of the random
            tie-breaking of the top-k (default: the seed given to ``lightning.seed_everything``, read when
            selecting; 0 without one).
        cache_dir: directory of the score cache (``None``: no cache).
        selection_path: where to export the selection as JSON (default: in ``cache_dir`` when set).
        full_finetune_seconds: measured time of fine-tuning on the full set, to log ``select/str``.
        device: device to score on (default: the Trainer's root device, else CPU).
        progress: show progress bars (rank 0).
        **kwargs: :class:`~lightning_eff.llm.data.InstructionDataModule` arguments (data, tokenizer, batches).

    Example::

        >>> from lightning_eff.select import DataWhispererScorer
        >>> tiny = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        ...         "num_attention_heads": 2}
        >>> dm = DataWhispererDataModule(scorer=DataWhispererScorer(max_new_tokens=4), ratio=0.25, scorer_model=tiny,
        ...                              num_train=12, num_val=2, num_test=2, progress=False)
        >>> _ = torch.manual_seed(0)
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")  # an untrained scorer cannot answer: a warning says so
        ...     dm.setup("fit")
        >>> len(dm.selected_indices), len(dm.train_dataloader().dataset)
        (3, 3)
    """

    def __init__(
        self,
        scorer: Scorer | None = None,
        method: str | None = None,
        ratio: float = 0.1,
        num_selected: int | None = None,
        scorer_model: str | dict[str, Any] | None = None,
        scorer_tokenizer: str | None = None,
        scorer_dtype: str | None = None,
        selection_seed: int | None = None,
        cache_dir: str | None = None,
        selection_path: str | None = None,
        full_finetune_seconds: float | None = None,
        device: str | None = None,
        progress: bool = True,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        moved = sorted(set(kwargs) & _SCORER_SETTINGS)
        if moved:
            raise ValueError(
                f"{name}: {moved} are settings of the scorer now, not of the DataModule: give them to the scorer, e.g. "
                f"`scorer: {{class_path: lightning_eff.select.DataWhispererScorer, init_args: {{{moved[0]}: ...}}}}` "
                f"(EL2NScorer / GraNdScorer take warmup_steps, warmup_lr)."
            )
        super().__init__(**kwargs)
        if scorer is not None and method is not None:
            raise ValueError(f"{name}: give `scorer` or `method`, not both (got {scorer!r} and {method!r}).")
        if method is not None and method not in METHODS:
            raise ValueError(f"{name}: `method` must be one of {METHODS}, got {method!r}.")
        if scorer is not None and not isinstance(scorer, Scorer):
            raise TypeError(
                f"{name}: `scorer` must be a lightning_eff.select.Scorer (e.g. DataWhispererScorer), got {scorer!r}."
            )
        check_float(ratio, "ratio", low=0.0, high=1.0, low_open=True, owner=name)
        check_optional_int(num_selected, "num_selected", minimum=1, owner=name)
        if scorer_model is not None and not isinstance(scorer_model, (str, dict, os.PathLike)):
            raise TypeError(
                f"{name}: `scorer_model` must be None, a local path or a config dict, got {scorer_model!r}."
            )
        if isinstance(scorer_model, dict) and not isinstance(scorer_model.get("model_type"), str):
            raise ValueError(
                f"{name}: a config dict `scorer_model` needs a str `model_type`, got {scorer_model!r}."
            )
        from lightning_eff.llm.module import DTYPES

        if scorer_dtype is not None and scorer_dtype not in DTYPES:
            raise ValueError(
                f"{name}: `scorer_dtype` must be one of {tuple(DTYPES)} or None, got {scorer_dtype!r}."
            )
        check_optional_int(selection_seed, "selection_seed", minimum=0, owner=name)
        if full_finetune_seconds is not None:
            check_float(full_finetune_seconds, "full_finetune_seconds", low=0.0, low_open=True, owner=name)
        if method == "full":
            self.scorer: Scorer | None = None
        elif scorer is not None:
            self.scorer = scorer
        else:
            self.scorer = scorer_from_method(method or "data_whisperer")
        self.method = "full" if self.scorer is None else self.scorer.name
        self.ratio = float(ratio)
        self.num_selected = num_selected
        self.scorer_model = os.fspath(scorer_model) if isinstance(scorer_model, os.PathLike) else scorer_model
        self.scorer_tokenizer = scorer_tokenizer
        self.scorer_dtype = scorer_dtype
        self._selection_seed = selection_seed
        self.cache_dir = cache_dir
        self.selection_path = selection_path
        self.full_finetune_seconds = None if full_finetune_seconds is None else float(full_finetune_seconds)
        self.device = device
        self.progress = bool(progress)
        self.scores: Tensor | None = None
        self.selected_indices: list[int] | None = None
        self.selection_stats: dict[str, float] = {}
        self.cache_hit = False
        self.selection_file: str | None = None
        self.cache_key: str | None = None
        self.cache_file: str | None = None
        self._restored: list[int] | None = None

    # ------------------------------------------------------------------------------------------
    # selection
    # ------------------------------------------------------------------------------------------
    @property
    def selection_seed(self) -> int:
        """``selection_seed``, or the ``seed_everything`` seed (``PL_GLOBAL_SEED``), or 0."""
        if self._selection_seed is not None:
            return self._selection_seed
        try:
            return max(0, int(os.environ.get("PL_GLOBAL_SEED", "0")))
        except ValueError:
            return 0

    def num_to_select(self, num_examples: int) -> int:
        """How many examples are kept out of ``num_examples``."""
        if self.method == "full":
            return num_examples
        if self.num_selected is not None:
            if self.num_selected > num_examples:
                raise ValueError(
                    f"{type(self).__name__}: `num_selected`={self.num_selected} exceeds the {num_examples} training "
                    f"examples."
                )
            return self.num_selected
        return min(num_examples, max(1, math.ceil(self.ratio * num_examples - 1e-9)))

    def setup(self, stage: str | None = None) -> None:
        """Load the data; for ``fit`` (or ``None``) also score and select once."""
        super().setup(stage)
        if stage in ("fit", None) and self.selected_indices is None:
            self.select()

    def train_indices(self) -> Sequence[int] | None:
        """The selected training indices (all, before selection or for ``method="full"``)."""
        if self._restored is not None:
            return self._restored
        return self.selected_indices

    def _dist(self) -> tuple[int, int, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1, None
        return trainer.global_rank, trainer.world_size, trainer.strategy

    def _scoring_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _resolve_scorer(self) -> tuple[Any, Any, bool]:
        """``(model, tokenizer, owned)``: ``owned`` is whether the model was loaded here (and can be freed)."""
        from lightning_eff.llm.module import build_causal_lm
        from lightning_eff.llm.tokenization import load_tokenizer

        name = type(self).__name__
        if self.scorer_model is None:
            trainer = getattr(self, "trainer", None)
            module = getattr(trainer, "lightning_module", None) if trainer is not None else None
            if module is None or not hasattr(module, "configure_model") or not hasattr(module, "tokenizer"):
                raise ValueError(
                    f"{name}: `scorer_model` is None, which scores with the Trainer's CausalLMModule, but no such "
                    f"module is attached (got {type(module).__name__}); give `scorer_model` (a local path or config)."
                )
            module.configure_model()
            return module.model, module.tokenizer, False
        spec = self.scorer_tokenizer
        if spec is None:
            spec = self.scorer_model if isinstance(self.scorer_model, str) else self.tokenizer_spec
        tokenizer = load_tokenizer(spec) if isinstance(spec, str) else self.tokenizer
        model = build_causal_lm(self.scorer_model, tokenizer, self.scorer_dtype)
        return model, tokenizer, True

    def settings(self) -> dict[str, Any]:
        """Every setting that changes the scores (part of the cache key and of the export)."""
        if self.scorer is None:
            return {"method": "full"}
        out = {"method": self.method, "scorer_class": f"{type(self.scorer).__module__}.{type(self.scorer).__qualname__}",
               **self.scorer.settings()}  # fmt: skip
        if self.scorer.uses_seed:
            out["selection_seed"] = self.selection_seed
        if self.scorer.needs_model:  # the training format the EL2N / GraNd losses and the collator use
            out.update(batch_size=self.batch_size, prompt_template=self.prompt_template,
                       chat_template=self.chat_template, max_length=self.max_length)  # fmt: skip
        return out

    def _cache_key(self, model: Any, tokenizer: Any) -> str:
        records = self.train_records or []
        payload = {
            "format_version": FORMAT_VERSION,
            "settings": self.settings(),
            "data": _records_fingerprint(records),
            "queries": _records_fingerprint(self.val_records or []) if self._uses_val_queries() else None,
        }
        if model is not None:
            payload["model"] = model_fingerprint(model)
            payload["tokenizer"] = _tokenizer_fingerprint(tokenizer)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _cache_file(self, key: str) -> str | None:
        return (
            None
            if self.cache_dir is None
            else os.path.join(self.cache_dir, f"scores-{self.method}-{key[:20]}.json")
        )

    def _read_cache(self, path: str | None, key: str, n: int) -> tuple[Tensor, float] | None:
        if path is None or not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            rank_zero_warn(f"{type(self).__name__}: ignoring unreadable score cache {path}: {err}")
            return None
        if (
            data.get("format_version") != FORMAT_VERSION
            or data.get("key") != key
            or len(data.get("scores", [])) != n
        ):
            return None
        self.selection_stats.update({k: float(v) for k, v in data.get("stats", {}).items()})
        return torch.tensor(data["scores"], dtype=torch.float64), float(data.get("scoring_seconds", 0.0))

    def _uses_val_queries(self) -> bool:
        uses = getattr(self.scorer, "uses_queries", None)
        return bool(uses(self.val_records)) if uses is not None else False

    def _compute_scores(self, model: Any, tokenizer: Any, rank: int, world: int, strategy: Any) -> Tensor:
        assert self.scorer is not None and self.train_records is not None
        device = self._scoring_device()
        collator = None
        if tokenizer is not None:
            collator = self.collator if tokenizer is self.tokenizer else self._collator_for(tokenizer)
        ctx = ScoringContext(
            records=self.train_records, query_records=self.val_records or None, model=model, tokenizer=tokenizer,
            collator=collator, batch_size=self.batch_size, eval_batch_size=self.eval_batch_size,
            seed=self.selection_seed, rank=rank, world_size=world,
            reduce=lambda t: self._reduce(t, strategy, device), device=device, progress=self.progress,
            stats=self.selection_stats, owner=type(self).__name__,
        )  # fmt: skip
        scores = self.scorer.score(ctx)
        if scores.shape != (len(self.train_records),):
            raise ValueError(
                f"{type(self).__name__}: {type(self.scorer).__name__}.score returned shape {tuple(scores.shape)}, "
                f"expected ({len(self.train_records)},)."
            )
        return scores.to(torch.float64)

    def _collator_for(self, tokenizer: Any) -> Any:
        from lightning_eff.llm.data import InstructionCollator

        return InstructionCollator(tokenizer, self.prompt_template, self.chat_template, self.max_length)

    @staticmethod
    def _reduce(t: Tensor, strategy: Any, device: torch.device) -> Tensor:
        if strategy is None or getattr(strategy, "world_size", 1) <= 1:
            return t
        # float64 is not supported by every collective backend: sum in float32 on the device, exact enough
        # for scores; counts are small integers.
        reduced = strategy.reduce(t.to(device=device, dtype=torch.float32), reduce_op="sum")
        return reduced.detach().to("cpu", torch.float64)

    def select(self) -> list[int]:
        """Score the training set (or read the cache) and keep the top examples; returns their indices."""
        self.load_records()
        records = self.train_records
        assert records is not None
        n = len(records)
        if n == 0:
            raise ValueError(f"{type(self).__name__}: the training set is empty.")
        k = self.num_to_select(n)
        start = time.perf_counter()
        rank, world, strategy = self._dist()
        if self.scorer is None or k >= n:  # the full set: nothing to score
            self.scores = torch.zeros(n, dtype=torch.float64)
            self.selected_indices = list(range(n))
            self.selection_stats = {"seconds": 0.0, "scoring_seconds": 0.0, "num_selected": float(n)}
            return self.selected_indices
        assert self.scorer is not None
        needs_model = self.scorer.needs_model
        model = tokenizer = None
        owned = False
        moved_from: torch.device | None = None
        try:
            if needs_model:
                model, tokenizer, owned = self._resolve_scorer()
                device = self._scoring_device()
                first = next(model.parameters())
                if first.device != device:
                    moved_from = first.device
                    model.to(device)
            key = self._cache_key(model, tokenizer)
            path = self._cache_file(key)
            self.cache_key, self.cache_file = key, path
            cached = self._read_cache(path, key, n) if rank == 0 else None
            if strategy is not None and world > 1:
                cached = strategy.broadcast(cached, src=0)
            self.cache_hit = cached is not None
            if cached is not None:
                scores, scoring_seconds = cached
                rank_zero_info(f"{type(self).__name__}: read {self.method} scores from the cache {path}.")
            else:
                scores = self._compute_scores(model, tokenizer, rank, world, strategy)
                scoring_seconds = time.perf_counter() - start
                if path is not None and rank == 0:
                    _atomic_write_json(
                        path,
                        {
                            "format_version": FORMAT_VERSION,
                            "kind": "scores",
                            "key": key,
                            "settings": self.settings(),
                            "num_examples": n,
                            "scoring_seconds": scoring_seconds,
                            "stats": dict(self.selection_stats),
                            "scores": scores.tolist(),
                        },
                    )
        finally:
            if model is not None and moved_from is not None and not owned:
                model.to(moved_from)
            if owned:
                del model
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        self.scores = scores
        self.selected_indices = top_k(scores, k, seed=self.selection_seed)
        ties = _tied_at_cutoff(scores, k)
        self.selection_stats["tied_at_cutoff"] = float(ties)
        seconds = time.perf_counter() - start
        self.selection_stats.update(
            {
                "seconds": seconds,
                "scoring_seconds": scoring_seconds,
                "num_selected": float(k),
                "fraction": k / n,
                "cache_hit": float(self.cache_hit),
            }  # fmt: skip
        )
        if self.full_finetune_seconds is not None:
            self.selection_stats["str"] = scoring_seconds / self.full_finetune_seconds
        self._export(key, k, n)
        self._log_stats()
        return self.selected_indices

    def _export(self, key: str, k: int, n: int) -> None:
        rank, _, _ = self._dist()
        path = self.selection_path
        if path is None and self.cache_dir is not None:
            path = os.path.join(self.cache_dir, f"selection-{self.method}-{key[:20]}-{k}.json")
        if path is None or rank != 0:
            return
        assert (
            self.scores is not None and self.selected_indices is not None and self.train_records is not None
        )
        _atomic_write_json(
            path,
            {
                "format_version": FORMAT_VERSION,
                "kind": "selection",
                "method": self.method,
                "key": key,
                "settings": self.settings(),
                "num_examples": n,
                "num_selected": k,
                "indices": self.selected_indices,
                "scores": [float(self.scores[i]) for i in self.selected_indices],
                "examples": [
                    {"question": self.train_records[i]["question"], "answer": self.train_records[i]["answer"]}
                    for i in self.selected_indices
                ],
            },
        )
        self.selection_file = path

    def _log_stats(self) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.global_rank != 0:
            return
        metrics = {f"select/{k}": v for k, v in self.selection_stats.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)

    # ------------------------------------------------------------------------------------------
    # checkpointing: a resumed run trains on exactly the same subset
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The selected indices and method."""
        return {"method": self.method, "selected_indices": self.selected_indices}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Serve the checkpoint's subset (warns if it differs from a fresh selection)."""
        saved = state_dict.get("selected_indices")
        if saved is None:
            return
        saved = [int(i) for i in saved]
        if self.selected_indices is not None and saved != self.selected_indices:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint's subset differs from the one just selected; the checkpoint's "
                f"is used so that the resumed run continues on the same data."
            )
        self._restored = saved


class SelectionToTuningRatio(Callback):
    """Logs the selection-to-tuning ratio (STR) when fitting on a selected subset ends.

    ``select/finetune_seconds`` is the measured fit time on the subset; ``select/str_estimate`` is the scoring
    time divided by that time scaled to the full set (``t_subset * N / k``, assuming time linear in the data).
    The exact STR needs the measured full fine-tuning time: pass ``full_finetune_seconds`` to the DataModule.

    Example::

        >>> SelectionToTuningRatio().start is None
        True
    """

    def __init__(self) -> None:
        self.start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if self.start is None or not isinstance(dm, DataWhispererDataModule) or dm.selected_indices is None:
            return
        elapsed = time.perf_counter() - self.start
        n, k = len(dm.train_records or []), len(dm.selected_indices)
        full = elapsed * n / max(k, 1)
        metrics = {"select/finetune_seconds": elapsed,
                   "select/str_estimate": dm.selection_stats.get("scoring_seconds", 0.0) / max(full, 1e-12)}  # fmt: skip
        dm.selection_stats.update({k_[7:]: v for k_, v in metrics.items()})
        if trainer.global_rank == 0:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
