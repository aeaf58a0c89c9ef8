"""``DDRanking``: the DD-Ranking evaluation protocol over one or more synthetic sets.

Paper: Z. Li et al., "DD-Ranking: Rethinking the Evaluation of Dataset Distillation", arXiv:2505.13300
(Sec. 3); official code NUS-HPC-AI-Lab/DD-Ranking, PyPI ``ddranking`` 0.2.0 (``metrics/soft_label.py``,
``hard_label.py``, ``aug_robust.py``, ``utils/train_and_eval.py``). The scores are in
:mod:`lightning_eff.ranking.functional`; every training goes through the distillation core's
:func:`~lightning_eff.distill.evaluate_synthetic_sets`.

Protocol (per synthetic set, ``num_eval`` runs; the official defaults in brackets). The students' own settings
(epochs, lr grid, SGD, batch, augmentation, labels, checkpoints) are one
:class:`~lightning_eff.distill.StudentProtocol`, ``protocol`` (default :data:`DEFAULT_PROTOCOL`); the rest is
ranking's own:

* every accuracy is the best test accuracy over checkpoints every ``eval_every`` epochs [20] and the
  final one, and the best over a learning-rate grid [0.001, 0.005, 0.01, 0.05, 0.1], one fresh student
  per lr; SGD momentum 0.9, weight decay 5e-4, lr x0.1 at half of the epochs, batch 256;
* ``Acc_full``: students trained on the whole real training split with hard labels, a fixed recipe
  (``full_epochs``, ``full_lr``, ``full_batch_size``), not augmented [the package augments it only in the
  soft-label setting with ``use_aug_for_hard``, and so do we]; by default one student, trained once and shared
  by every run [the package retrains it in every run: ``full_per_run=True``]; cached per dataset, student and
  recipe (memory and a JSON cache file);
* ``Acc_syn,hard``: the set with its hard labels, augmented only with ``augment_hard`` [off] in the
  soft-label setting, always augmented in the hard-label setting (as ``LabelRobustScoreHard``);
* ``Acc_syn`` and ``Acc_rdm``: the set and a random real subset with the set's per-class counts,
  redrawn each run, in the evaluation setting: hard labels, or soft labels in mode S (the set's stored
  soft labels; the random subset gets the teacher's logits) or mode M (the teacher labels every
  augmented batch), SCE or KL with a temperature, with the augmentation (DSA, CutMix or both);
  ``syn_lr`` replaces the grid for the synthetic set, as the package's ``syn_lr`` does;
* for ARS, the same two again without augmentation;
* ``HLR = Acc_full - Acc_syn,hard``, ``IOR = Acc_syn - Acc_rdm``, ``LRS``, ``ARS`` per run, then mean
  and population std over runs.

Speed-ups over the official code, none of which changes what is computed:

* the students of one protocol step train together: every cell (run x lr grid) of every set and of the
  random subsets that shares the training options and the set size goes into one
  ``evaluate_synthetic_sets`` call (vectorised on accelerators; ``protocol.vectorize`` passes through); each
  cell's students are seeded by the cell alone (the seed of a synthetic-set cell depends on the kind and
  the run, not on the set: every set sees the same initialisations and data orders — common random
  numbers), so the grouping never changes a result;
* the random-real and full-data trainings do not depend on the synthetic set, so they are shared
  between all sets ranked together (same per-class counts and setting) and cached, in memory and in
  ``cache_dir``, keyed by a hash of the dataset (test images, training labels), the student, the setting
  and the seeds: ranking a new method later reuses them;
* ARS's with-augmentation pair is the IOR pair (same setting, same runs), trained once;
* under DDP (``torch.distributed`` initialised) the trainings are spread over ranks (greedy by cost)
  and the results gathered, so every rank returns the same report.

Departures from ``ddranking`` 0.2.0 (checked against the package's source; :meth:`DDRanking.departures`
lists the ones that apply to given settings, with file and line, and every report carries them in
``protocol["departures_from_ddranking_0.2.0"]``): accuracies and scores are fractions (the package plugs
percentages into ``exp``; ``lrs_ddranking`` / ``ars_ddranking`` in the results give its numbers); every
randomness is seeded (the package seeds from the wall clock), so the same seed gives the same report; the
final epoch is always a checkpoint; checkpoints every ``eval_every`` = 20 epochs for every training (the
package's hard-label LRS tests every 10); the full-data students are shared by the runs unless
``full_per_run=True`` and follow their own recipe (the package trains them for the students' epochs with
``REAL_DATA_TRAINING_CONFIG``'s optimizer); mode S gives the random subsets the teacher's soft labels (the
package's ``_generate_soft_labels`` uses an undefined ``self.teacher_model``); one teacher instead of an
ensemble; ``KL`` is always scaled by ``T^2`` (the package's ``scale_loss=True``; the same at ``T = 1``).
Checkpoints count from the first epoch, as in ``ddranking``; the legacy ``dd_ranking`` package in the same
wheel tests only after 0.8 of the epochs.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_eff.distill.evaluation import StudentProtocol, default_student
from lightning_eff.distill.evaluation.protocol import SOFT_LABEL_MODES, SOFT_LOSSES  # noqa: F401 (they lived here)
from lightning_eff.distill.synthetic import SyntheticSet
from lightning_eff.ranking.cache import (
    CACHE_FORMAT,
    PROTOCOL_VERSION,
    _default_cache_dir,
    data_fingerprint,
    read_cache_file,
    write_cache_file,
)
from lightning_eff.ranking.plan import _assign, _Context, _Dist, _Job
from lightning_eff.ranking.results import RankingReport, RankingResult
from lightning_eff.ranking.teacher import load_teacher
from lightning_eff.utils.checks import check_choice, check_float, check_int

__all__ = [
    "DDRanking",
    "DEFAULT_LR_GRID",
    "DEFAULT_PROTOCOL",
    "AUGMENTATIONS",
    "load_teacher",
    "CACHE_FORMAT",
    "PROTOCOL_VERSION",
]

#: The official learning-rate grid (``_hyper_param_search_for_*``).
DEFAULT_LR_GRID: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1)
AUGMENTATIONS: tuple[str, ...] = ("none", "dsa", "cutmix", "dsa+cutmix")
METRICS: tuple[str, ...] = ("lrs", "ars")
#: The students' settings of the official protocol (``ddranking`` 0.2.0): 300 epochs, the lr grid, SGD momentum
#: 0.9, weight decay 5e-4, batch 256, CutMix (beta 1), the best checkpoint of every 20 epochs, hard labels.
#: ``DEFAULT_PROTOCOL.replace(epochs=50, dsa=True, cutmix=None)`` changes some of them.
DEFAULT_PROTOCOL = StudentProtocol(
    epochs=300,
    lr=DEFAULT_LR_GRID,
    momentum=0.9,
    weight_decay=5e-4,
    batch_size=256,
    cutmix=True,
    eval_every=20,
)
#: The student settings that DDRanking took as arguments of their own before issue 21 (deprecated; the value is
#: the StudentProtocol field). ``augmentation`` ("dsa", "cutmix", "dsa+cutmix", "none"), ``dsa`` and ``cutmix``
#: (objects) map onto the protocol's ``dsa`` and ``cutmix``.
_LEGACY_FIELDS = {
    "epochs": "epochs",
    "lrs": "lr",
    "eval_every": "eval_every",
    "momentum": "momentum",
    "weight_decay": "weight_decay",
    "batch_size": "batch_size",
    "soft_label_mode": "use_soft_labels",
    "soft_loss": "soft_loss",
    "temperature": "temperature",
    "privileged_weight": "privileged_weight",
    "vectorize": "vectorize",
}
# CACHE_FORMAT and PROTOCOL_VERSION (lightning_eff.ranking.cache) and load_teacher (lightning_eff.ranking.teacher)
# are re-exported here, where they used to live.


def _legacy_protocol(protocol: StudentProtocol, legacy: dict[str, Any]) -> StudentProtocol:
    """``protocol`` with the deprecated flat student arguments of ``DDRanking`` applied (validated by it)."""
    unknown = sorted(set(legacy) - set(_LEGACY_FIELDS) - {"augmentation", "dsa", "cutmix"})
    if unknown:
        raise TypeError(f"DDRanking got unexpected keyword argument(s) {unknown}.")
    warnings.warn(
        f"DDRanking: the student settings {sorted(legacy)} as arguments of their own are deprecated; pass "
        f"protocol=StudentProtocol(...) (lightning_eff.ranking.DEFAULT_PROTOCOL.replace(...) keeps the other "
        f"defaults).",
        FutureWarning,
        stacklevel=3,
    )
    changes = {_LEGACY_FIELDS[k]: v for k, v in legacy.items() if k in _LEGACY_FIELDS}
    if changes.get("use_soft_labels", False) is None:
        changes["use_soft_labels"] = False
    if {"augmentation", "dsa", "cutmix"} & set(legacy):
        current = "+".join(n for n in ("dsa", "cutmix") if getattr(protocol, n) is not None) or "none"
        aug = legacy.get("augmentation", current)
        aug = check_choice("none" if aug is None else aug, "augmentation", AUGMENTATIONS, owner="DDRanking")
        for name in ("dsa", "cutmix"):
            changes[name] = (legacy.get(name) or getattr(protocol, name) or True) if name in aug else None
    return protocol.replace(**changes)


class DDRanking:
    """Rank synthetic sets with DD-Ranking's label-robust (LRS) and augmentation-robust (ARS) scores.

    Args:
        net: student template (re-initialised per student); default: the protocol's ConvNet sized to the
            images (:func:`~lightning_eff.distill.evaluation.default_student`).
        protocol: how every student on a synthetic set or a random subset trains, a
            :class:`~lightning_eff.distill.StudentProtocol` (validated there; default :data:`DEFAULT_PROTOCOL`,
            the paper's). Its ``lr`` is the learning-rate grid (a float: a grid of one), each accuracy the best
            over it; ``eval_every``: test every this many epochs, an accuracy is the best checkpoint (and the
            final one); ``use_soft_labels``: ``False`` (hard-label setting), ``"S"`` (stored soft labels) or
            ``"M"`` (the teacher labels every augmented batch), with ``soft_loss`` and ``temperature``;
            ``dsa`` / ``cutmix``: the augmentation of the evaluation setting (ARS compares it with none);
            ``privileged_weight``: DRUPI weight for sets with privileged information (``None``: the set's own),
            on every training on the synthetic set (random subsets have none); ``vectorize``: passed to
            ``evaluate_synthetic_sets``. In YAML, ``protocol: {epochs: 40, dsa: true, cutmix: null}`` changes
            those fields of the default. (The flat keywords ``epochs``, ``lrs``, ``eval_every``, ``momentum``,
            ``weight_decay``, ``batch_size``, ``soft_label_mode``, ``soft_loss``, ``temperature``,
            ``augmentation``, ``dsa``, ``cutmix``, ``privileged_weight``, ``vectorize`` of earlier versions still
            work in Python, with a ``FutureWarning``.)
        ipc: the images per class every ranked set must have (``None``: any; each set is compared with
            random subsets of its own per-class counts).
        num_eval: evaluation runs (random subset redrawn and students re-initialised each run).
        syn_lr: learning rate of the synthetic set's runs in the evaluation setting instead of the grid
            (a float, or ``"synset"`` for the set's learned lr); the hard-label HLR run keeps the grid in
            the soft-label setting, as the package does.
        teacher: the soft-label teacher: an ``nn.Module`` or the path of a checkpoint (see
            :func:`load_teacher`; read when ranking starts). Needed in both soft modes (mode S labels the
            random subsets with it).
        augment_hard: augment the hard-label HLR run in the soft-label setting (``use_aug_for_hard``); as in the
            package, the full-data students are then augmented too (``soft_label.py`` l. 312).
        metrics: which scores: ``"lrs"`` (HLR, IOR, LRS) and/or ``"ars"``.
        lrs_weight: ``w`` of LRS, in ``[0, 1]``.
        ars_weight: ``g`` of ARS, in ``[0, 1]``.
        full_epochs: epochs of the full-data students.
        full_lr: learning rate of the full-data students (no grid, as in the package).
        full_batch_size: batch size of the full-data students.
        full_students: full-data students; ``Acc_full`` is the mean of their best accuracies, used by every run.
        full_per_run: train one full-data student per run instead (``num_eval`` of them, ``full_students`` is
            ignored) and use run ``r``'s own ``Acc_full`` in run ``r``'s HLR, as ``ddranking`` 0.2.0 does with
            ``eval_full_data=True`` (it retrains the full-data model in every run, ``hard_label.py`` l. 353-361).
        full_data_acc: a known full-data accuracy (fraction) to use instead of training.
        seed: seed of everything (subsets, initialisations, data order, augmentation).
        device: where to train (default: the current CUDA device, else CPU).
        max_students_per_call: at most this many students train together in one call (cells of the same
            options are split into calls of whole cells); bounds the accelerator memory of a vectorised step
            (each student holds its own activations). Results do not depend on it.
        cache_dir: folder of the cache files (default ``$LIGHTNING_EFF_CACHE/ranking`` or
            ``~/.cache/lightning_eff/ranking``).
        use_cache: read and write the cache of full-data and random-real accuracies (the in-memory cache of
            this object is always used).
        progress: a tqdm bar over the trainings (rank 0).

    Example::

        >>> from lightning_eff.data import DigitsDataModule
        >>> from lightning_eff.models import ConvNet
        >>> dm = DigitsDataModule()
        >>> protocol = DEFAULT_PROTOCOL.replace(epochs=2, lr=[0.01])
        >>> ranking = DDRanking(ConvNet(1, 10, width=8, depth=1, image_size=8), protocol=protocol, num_eval=1,
        ...                     full_epochs=1, use_cache=False, progress=False, device="cpu")
        >>> report = ranking.rank({"random": SyntheticSet.random_subset(dm, ipc=2, seed=5)}, dm)
        >>> sorted(report["random"].metrics)[:4], 0.0 <= report["random"].mean("lrs") <= 1.0
        (['ars', 'ars_ddranking', 'hlr', 'ior'], True)
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        *,
        protocol: StudentProtocol = DEFAULT_PROTOCOL,
        ipc: int | None = None,
        num_eval: int = 5,
        syn_lr: float | str | None = None,
        teacher: nn.Module | str | None = None,
        augment_hard: bool = False,
        metrics: Sequence[str] = METRICS,
        lrs_weight: float = 0.5,
        ars_weight: float = 0.5,
        full_epochs: int = 200,
        full_lr: float = 0.01,
        full_batch_size: int = 512,
        full_students: int = 1,
        full_per_run: bool = False,
        full_data_acc: float | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        max_students_per_call: int = 25,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        progress: bool = True,
        **legacy: Any,
    ) -> None:
        if net is not None and not isinstance(net, nn.Module):
            raise TypeError(f"DDRanking: `net` must be an nn.Module or None, got {type(net).__name__}.")
        self.net = net
        if protocol is None:
            protocol = DEFAULT_PROTOCOL
        if not isinstance(protocol, StudentProtocol):
            raise TypeError(
                f"DDRanking: `protocol` must be a lightning_eff.distill.StudentProtocol, got {type(protocol).__name__} "
                f"(DEFAULT_PROTOCOL.replace(...) changes some of the defaults)."
            )
        if legacy:
            protocol = _legacy_protocol(protocol, legacy)
        if protocol.lr == "synset":
            raise ValueError(
                "DDRanking: `protocol.lr` is the lr grid of the random-real and full-data students too; 'synset' "
                "applies to the synthetic set's runs only: pass syn_lr='synset'."
            )
        #: The students' training settings (validated by StudentProtocol); the derived values below read it.
        self.student_protocol = protocol
        self.lrs = [protocol.lr] if isinstance(protocol.lr, float) else list(protocol.lr)
        self.soft_label_mode = protocol.soft_label_mode
        self.dsa, self.cutmix = protocol.build_dsa(), protocol.build_cutmix()
        on = [name for name, aug in (("dsa", self.dsa), ("cutmix", self.cutmix)) if aug is not None]
        self.augmentation = "+".join(on) or "none"
        self.ipc = None if ipc is None else check_int(ipc, "ipc", minimum=1, owner="DDRanking")
        self.num_eval = check_int(num_eval, "num_eval", minimum=1, owner="DDRanking")
        if isinstance(syn_lr, str) and syn_lr != "synset":
            raise ValueError(f"DDRanking: `syn_lr` must be None, a float or 'synset', got {syn_lr!r}.")
        self.syn_lr = (
            syn_lr
            if syn_lr is None or isinstance(syn_lr, str)
            else check_float(syn_lr, "syn_lr", low=0.0, low_open=True, owner="DDRanking")
        )
        if teacher is not None and not isinstance(teacher, (nn.Module, str, os.PathLike)):
            raise TypeError(
                f"DDRanking: `teacher` must be an nn.Module, a checkpoint path or None, got {type(teacher).__name__}."
            )
        mode = self.soft_label_mode
        if mode is not None and teacher is None:
            why = (
                "to label every augmented batch"
                if mode == "M"
                else "to give the random-real subsets soft labels"
            )
            raise ValueError(
                f"DDRanking: soft labels (protocol.use_soft_labels={mode!r}) need a `teacher` {why} (an nn.Module "
                f"or a checkpoint path)."
            )
        if mode is None and teacher is not None:
            raise ValueError(
                "DDRanking: a `teacher` was given but the protocol has hard labels (use_soft_labels=False); set "
                "protocol.use_soft_labels to 'S' or 'M'."
            )
        self.teacher = teacher
        if not isinstance(augment_hard, bool):
            raise TypeError(f"DDRanking: `augment_hard` must be a bool, got {augment_hard!r}.")
        self.augment_hard = augment_hard
        if isinstance(metrics, str):
            metrics = [metrics]
        metrics = [m.lower() for m in metrics] if isinstance(metrics, Sequence) else metrics
        if not isinstance(metrics, list) or not metrics or any(m not in METRICS for m in metrics):
            raise ValueError(
                f"DDRanking: `metrics` must be a non-empty subset of {METRICS}, got {metrics!r}."
            )
        if "ars" in metrics and self.augmentation == "none":
            raise ValueError(
                "DDRanking: the augmentation-robust score compares training with and without augmentation; with "
                "no augmentation it is undefined. Set protocol.dsa and/or protocol.cutmix, or metrics=['lrs']."
            )
        self.metrics = [m for m in METRICS if m in metrics]
        self.lrs_weight = check_float(lrs_weight, "lrs_weight", low=0.0, high=1.0, owner="DDRanking")
        self.ars_weight = check_float(ars_weight, "ars_weight", low=0.0, high=1.0, owner="DDRanking")
        self.full_epochs = check_int(full_epochs, "full_epochs", minimum=1, owner="DDRanking")
        self.full_lr = check_float(full_lr, "full_lr", low=0.0, low_open=True, owner="DDRanking")
        self.full_batch_size = check_int(full_batch_size, "full_batch_size", minimum=1, owner="DDRanking")
        self.full_students = check_int(full_students, "full_students", minimum=1, owner="DDRanking")
        if not isinstance(full_per_run, bool):
            raise TypeError(f"DDRanking: `full_per_run` must be a bool, got {full_per_run!r}.")
        self.full_per_run = full_per_run
        self.full_data_acc = (
            None
            if full_data_acc is None
            else check_float(full_data_acc, "full_data_acc", low=0.0, high=1.0, owner="DDRanking")
        )
        self.seed = check_int(seed, "seed", minimum=-(2**63), owner="DDRanking")
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(f"DDRanking: `device` must be a string, a torch.device or None, got {device!r}.")
        self.device = device
        self.max_students_per_call = check_int(
            max_students_per_call, "max_students_per_call", minimum=1, owner="DDRanking"
        )
        self.cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        if not isinstance(use_cache, bool):
            raise TypeError(f"DDRanking: `use_cache` must be a bool, got {use_cache!r}.")
        self.use_cache = use_cache
        self.progress = bool(progress)
        self._memory: dict[str, dict[str, Any]] = {}
        self._teacher_module: nn.Module | None = None

    # ------------------------------------------------------------------ public API
    def evaluate(self, synset: SyntheticSet, datamodule: Any, name: str | None = None) -> RankingResult:
        """Scores of one synthetic set (see :meth:`rank`)."""
        if name is None:
            name = str(getattr(synset, "metadata", {}).get("method") or "synthetic")
        return self.rank({name: synset}, datamodule).results[0]

    def rank(
        self,
        synsets: SyntheticSet | Sequence[SyntheticSet] | Mapping[str, SyntheticSet],
        datamodule: Any,
    ) -> RankingReport:
        """Score every set on ``datamodule``'s test split with one protocol, sharing the random-real and
        full-data trainings between them.

        Args:
            synsets: one set, a sequence (named by ``metadata["method"]``) or a ``{name: set}`` mapping.
            datamodule: the :class:`~lightning_eff.data.ClassificationDataModule` the sets were made from.

        Returns:
            A :class:`~lightning_eff.ranking.results.RankingReport` (the same on every rank under DDP).
        """
        start = time.perf_counter()
        dm = self._ready(datamodule)
        named = self._named(synsets)
        for name, s in named.items():
            self._check_set(name, s, dm)
        dist = _Dist()
        device = self._resolve_device()
        template = self.net if self.net is not None else default_student(dm.image_shape, dm.num_classes)
        teacher = self._load_teacher(template) if self.soft_label_mode is not None else None
        data_fp = data_fingerprint(dm)
        ctx = _Context(self, dm, template, teacher, data_fp, device)
        jobs = ctx.plan(named)

        # cache: rank 0 decides what is known; everyone then runs the same plan
        known: dict[str, dict[str, Any]] = {}
        if dist.rank == 0:
            for job in jobs:
                if job.cache_key is not None:
                    hit = self._lookup(job.cache_key)
                    if hit is not None:
                        known[job.key] = hit
        known = dist.broadcast(known)
        todo = [j for j in jobs if j.key not in known]
        mine = _assign(todo, dist.world)[dist.rank]
        local, seconds = ctx.execute(mine, progress=self.progress and dist.rank == 0, on_done=self._remember)
        merged: dict[str, dict[str, Any]] = dict(known)
        timing: dict[str, float] = {}
        by_rank = []
        for part, secs, count in dist.gather((local, seconds, sum(len(j.lrs) for j in mine))):
            merged.update(part)
            by_rank.append(count)
            for k, v in secs.items():
                timing[k] = timing.get(k, 0.0) + v
        for job in todo:  # the other ranks' results (each rank wrote its own as they finished)
            if job.cache_key is not None and job.cache_key not in self._memory:
                self._memory[job.cache_key] = merged[job.key]
                if dist.rank == 0 and not (self.cache_dir / f"{job.cache_key}.json").is_file():
                    self._store(job.cache_key, job.cache, merged[job.key])
        report = ctx.assemble(named, merged, reused=set(known))
        report.stats = {
            "trainings": sum(len(j.lrs) for j in jobs),
            "trainings_run": sum(len(j.lrs) for j in todo),
            "trainings_reused": sum(len(j.lrs) for j in jobs if j.key in known),
            "seconds_by_kind": timing,
            "world_size": dist.world,
            "trainings_by_rank": by_rank,
        }
        report.seconds = time.perf_counter() - start
        return report

    # ------------------------------------------------------------------ checks and set-up
    @staticmethod
    def _ready(datamodule: Any):
        from lightning_eff.data import ClassificationDataModule

        if not isinstance(datamodule, ClassificationDataModule):
            raise TypeError(
                f"DDRanking: `datamodule` must be a lightning_eff ClassificationDataModule (per-class real images for "
                f"the random subsets), got {type(datamodule).__name__}."
            )
        try:
            datamodule.train_targets  # noqa: B018 - raises before setup()
        except RuntimeError:
            datamodule.setup("fit")
        return datamodule

    @staticmethod
    def _named(synsets: Any) -> dict[str, SyntheticSet]:
        if isinstance(synsets, SyntheticSet):
            synsets = [synsets]
        if isinstance(synsets, Mapping):
            items = [(str(k), v) for k, v in synsets.items()]
        elif isinstance(synsets, Sequence) and not isinstance(synsets, (str, bytes)):
            items = [(str(getattr(s, "metadata", {}).get("method") or "synthetic"), s) for s in synsets]
        else:
            raise TypeError(
                f"DDRanking: `synsets` must be a SyntheticSet, a sequence or a {{name: set}} mapping, got "
                f"{type(synsets).__name__}."
            )
        if not items:
            raise ValueError("DDRanking: no synthetic set to rank.")
        named: dict[str, SyntheticSet] = {}
        for name, s in items:
            unique, k = name, 2
            while unique in named:
                unique, k = f"{name}_{k}", k + 1
            named[unique] = s
        return named

    def _check_set(self, name: str, s: Any, dm) -> None:
        if not isinstance(s, SyntheticSet):
            raise TypeError(f"DDRanking: set {name!r} must be a SyntheticSet, got {type(s).__name__}.")
        if tuple(s.image_shape) != tuple(dm.image_shape):
            raise ValueError(
                f"DDRanking: set {name!r} has images of shape {tuple(s.image_shape)} but the DataModule yields "
                f"{tuple(dm.image_shape)}; rank a set on the DataModule it was made from."
            )
        top = int(s.labels.max())
        if top >= dm.num_classes:
            raise ValueError(
                f"DDRanking: set {name!r} has labels up to {top} but the DataModule has {dm.num_classes} classes "
                f"(labels must be in [0, {dm.num_classes - 1}])."
            )
        if s.num_classes != dm.num_classes:
            raise ValueError(
                f"DDRanking: set {name!r} declares num_classes={s.num_classes} but the DataModule has {dm.num_classes}."
            )
        if self.ipc is not None and s.ipc != self.ipc:
            raise ValueError(
                f"DDRanking: set {name!r} has {s.ipc} images per class (IPC) but the evaluator was built with ipc="
                f"{self.ipc}; rank it with ipc={s.ipc} or ipc=None."
            )
        counts = torch.bincount(s.labels, minlength=dm.num_classes).tolist()
        for c, n in enumerate(counts):
            available = len(dm.class_indices(c))
            if n > available:
                raise ValueError(
                    f"DDRanking: set {name!r} has {n} images of class {c} but the training split only {available}; "
                    f"the random-real baseline cannot match it."
                )
        if self.soft_label_mode == "S" and s.soft_labels is None:
            raise ValueError(f"DDRanking: soft_label_mode='S' but set {name!r} has no stored soft_labels.")
        if self.syn_lr == "synset" and s.lr is None:
            raise ValueError(f"DDRanking: syn_lr='synset' but set {name!r} has no learned learning rate.")
        meta_ds = s.metadata.get("dataset")
        if meta_ds is not None and meta_ds != type(dm).__name__:
            warnings.warn(
                f"DDRanking: set {name!r} was made from {meta_ds} but is ranked on {type(dm).__name__}.",
                stacklevel=3,
            )

    def _resolve_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _load_teacher(self, template: nn.Module) -> nn.Module:
        if isinstance(self.teacher, nn.Module):
            return self.teacher
        if not Path(
            self.teacher
        ).is_file():  # checked here, not in __init__: configs may name a file made later
            raise FileNotFoundError(
                f"DDRanking: `teacher`={str(self.teacher)!r}: no checkpoint at that path."
            )
        if self._teacher_module is None:
            self._teacher_module = load_teacher(self.teacher, template)
        return self._teacher_module

    # ------------------------------------------------------------------ cache
    def _lookup(self, key: str) -> dict[str, Any] | None:
        if key in self._memory:
            return self._memory[key]
        if not self.use_cache:
            return None
        result = read_cache_file(self.cache_dir, key)
        if result is not None:
            self._memory[key] = result
        return result

    def _remember(self, job: _Job, result: dict[str, Any]) -> None:
        """Keep a shared training's result as soon as it is known (memory and cache file): an interrupted
        ranking resumes from there."""
        if job.cache_key is not None:
            self._memory[job.cache_key] = result
            self._store(job.cache_key, job.cache, result)

    def _store(self, key: str, description: dict[str, Any] | None, result: dict[str, Any]) -> None:
        if self.use_cache:
            write_cache_file(self.cache_dir, key, description, result)

    def protocol(self) -> dict[str, Any]:
        """The settings of this evaluator (JSON-serialisable; the net and teacher described)."""
        sp = self.student_protocol
        return {
            "num_eval": self.num_eval,
            "epochs": sp.epochs,
            "lr_grid": list(self.lrs),
            "syn_lr": self.syn_lr,
            "eval_every": sp.eval_every,
            "momentum": sp.momentum,
            "weight_decay": sp.weight_decay,
            "batch_size": sp.batch_size,
            "lr_schedule": "x0.1 at half of the epochs",
            "label_setting": "hard" if self.soft_label_mode is None else f"soft ({self.soft_label_mode})",
            "soft_label_mode": self.soft_label_mode,
            "soft_loss": sp.soft_loss if self.soft_label_mode else None,
            "temperature": sp.temperature if self.soft_label_mode else None,
            "augmentation": self.augmentation,
            "dsa": self.dsa.config() if "dsa" in self.augmentation else None,
            "cutmix": self.cutmix.config() if "cutmix" in self.augmentation else None,
            "augment_hard": self.augment_hard,
            "metrics": list(self.metrics),
            "lrs_weight": self.lrs_weight,
            "ars_weight": self.ars_weight,
            "full_data": {
                "epochs": self.full_epochs,
                "lr": self.full_lr,
                "batch_size": self.full_batch_size,
                "students": self.num_eval if self.full_per_run else self.full_students,
                "per_run": self.full_per_run,
                "augmented": self.soft_label_mode is not None and self.augment_hard,
                "given_accuracy": self.full_data_acc,
            },
            "privileged_weight": sp.privileged_weight,
            "seed": self.seed,
            "vectorize": sp.vectorize,
            "accuracy": "best over checkpoints every eval_every epochs (and the final one), best over the lr grid",
            "scores": "fractions; mean and population std over runs of the per-run scores",
            "protocol_version": PROTOCOL_VERSION,
            "student_protocol": sp.to_dict(),
            "departures_from_ddranking_0.2.0": self.departures(),
        }

    def departures(self) -> list[str]:
        """How these settings differ from ``ddranking`` 0.2.0 (file and line of the package's code)."""
        out = [
            "scores are fractions; the package plugs percentages into exp (hard_label.py l. 380-383, soft_label.py "
            "l. 561-564): see lrs_ddranking / ars_ddranking",
            "every randomness is seeded from `seed`; the package reseeds every run from the wall clock (set_seed(), "
            "utils/misc.py l. 9-11)",
            "the final epoch is always a checkpoint besides every eval_every-th (the package tests only at "
            "(epoch + 1) % test_interval == 0)",
            "lr x0.1 at half of the epochs; the package's StepLR step_size has no default (get_lr_scheduler asserts, "
            "utils/train_and_eval.py l. 116)",
        ]
        eval_every = self.student_protocol.eval_every
        if eval_every is None:
            out.append(
                "only the final epoch is tested (protocol.eval_every=None); the package tests every 10 (hard-label "
                "LRS, hard_label.py l. 119) or 20 epochs (soft_label.py l. 130, aug_robust.py l. 135)"
            )
        elif eval_every != 10 and self.soft_label_mode is None and "lrs" in self.metrics:
            out.append(
                f"checkpoints every {eval_every} epochs; the package's hard-label LRS tests every 10 "
                "(LabelRobustScoreHard.test_interval, hard_label.py l. 119; soft and ARS: 20, soft_label.py l. 130, "
                "aug_robust.py l. 135)"
            )
        if "lrs" in self.metrics and self.full_data_acc is None:
            if not self.full_per_run:
                out.append(
                    f"{self.full_students} full-data student(s) trained once (seed from `seed`) and shared by all "
                    "runs and sets; the package with eval_full_data=True retrains one in every run after that run's "
                    "set_seed() (hard_label.py l. 340, 353-361; soft_label.py l. 513, 526-534): full_per_run=True"
                )
            out.append(
                f"full data: {self.full_epochs} epochs, lr {self.full_lr}, batch {self.full_batch_size}, lr x0.1 at "
                "half; the package trains it for the students' num_epochs (default 300, hard_label.py l. 266) with "
                "REAL_DATA_TRAINING_CONFIG's optimizer and step_size (CIFAR10-ConvNet-3: lr 0.01, step 100, "
                "utils/train_and_eval.py l. 54-64) and the students' real_batch_size (default 256, hard_label.py "
                "l. 240; the config's batch_size 512 is unused)"
            )
        if "ars" in self.metrics:
            out.append(
                "ARS reuses the IOR pair as its with-augmentation pair; the package trains it again (aug_robust.py "
                "l. 536-555)"
            )
        if self.soft_label_mode is not None:
            out.append(
                "one teacher (the package averages an ensemble, train_and_eval.py l. 178-179); mode S labels the random "
                "subsets with it (the package's _generate_soft_labels uses an undefined self.teacher_model, "
                "soft_label.py l. 451); KL is scaled by T^2"
            )
        out.append(
            "checkpoints count from the first epoch, as ddranking/metrics/*.py; the legacy dd_ranking package shipped "
            "in the same wheel tests only after 0.8 of the epochs (dd_ranking/metrics/hard_label.py l. 171, "
            "soft_label.py l. 224, 272)"
        )
        return out
