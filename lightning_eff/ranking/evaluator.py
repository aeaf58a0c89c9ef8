"""``DDRanking``: the DD-Ranking evaluation protocol over one or more synthetic sets.

Paper: Z. Li et al., "DD-Ranking: Rethinking the Evaluation of Dataset Distillation", arXiv:2505.13300
(Sec. 3); official code NUS-HPC-AI-Lab/DD-Ranking, PyPI ``ddranking`` 0.2.0 (``metrics/soft_label.py``,
``hard_label.py``, ``aug_robust.py``, ``utils/train_and_eval.py``). The scores are in
:mod:`lightning_eff.ranking.functional`; every training goes through the distillation core's
:func:`~lightning_eff.distill.evaluate_synthetic_sets`.

Protocol (per synthetic set, ``num_eval`` runs; the official defaults in brackets):

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
  ``evaluate_synthetic_sets`` call (vectorised on accelerators; ``vectorize=`` passes through); each
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

import copy
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.distill.augment import DSA, CutMix
from lightning_eff.distill.evaluate import default_student, evaluate_synthetic_sets
from lightning_eff.distill.synthetic import SyntheticSet
from lightning_eff.ranking import functional as F
from lightning_eff.ranking.results import RankingReport, RankingResult, atomic_write_text

__all__ = [
    "DDRanking",
    "DEFAULT_LR_GRID",
    "AUGMENTATIONS",
    "load_teacher",
    "CACHE_FORMAT",
    "PROTOCOL_VERSION",
]

#: The official learning-rate grid (``_hyper_param_search_for_*``).
DEFAULT_LR_GRID: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1)
AUGMENTATIONS: tuple[str, ...] = ("none", "dsa", "cutmix", "dsa+cutmix")
SOFT_LABEL_MODES: tuple[str, ...] = ("S", "M")
METRICS: tuple[str, ...] = ("lrs", "ars")
SOFT_LOSSES: tuple[str, ...] = ("sce", "kl")
CACHE_FORMAT = "lightning-eff/ddranking-cache"
#: Bumped whenever a change would make cached accuracies differ from a fresh run.
PROTOCOL_VERSION = 1


def _default_cache_dir() -> Path:
    root = os.environ.get("LIGHTNING_EFF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lightning_eff"
    )
    return Path(root) / "ranking"


def _seed_from(*parts: Any) -> int:
    """A 62-bit seed derived from ``parts`` (stable across processes, machines and runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def _hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _hash_tensors(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def _describe_net(net: nn.Module) -> dict[str, Any]:
    get_config = getattr(net, "get_config", None)
    config = get_config() if callable(get_config) else None
    return {
        "class": f"{type(net).__module__}.{type(net).__qualname__}",
        "config": config if config is not None else repr(net),
    }


def _state_fingerprint(net: nn.Module) -> str:
    sd = net.state_dict()
    return _hash_tensors(*(sd[k].float() if sd[k].is_floating_point() else sd[k] for k in sorted(sd)))


# ---------------------------------------------------------------------------------------------
# teacher
# ---------------------------------------------------------------------------------------------
def load_teacher(path: str | os.PathLike, template: nn.Module | None = None) -> nn.Module:
    """A teacher network from ``path`` (eval mode, CPU).

    Reads, with ``torch.load(weights_only=True)``:

    * a Lightning checkpoint of a module whose hyperparameters hold the net as a ``class_path`` /
      ``init_args`` config (as :class:`~lightning_eff.models.ImageClassifier` saves them): the net is
      rebuilt from the config and gets the checkpoint's ``net.*`` weights;
    * a Lightning checkpoint without such a config, or a plain ``state_dict``: the weights are loaded into
      a copy of ``template`` (the student architecture, as the official code builds teachers).

    Example::

        >>> import tempfile, os
        >>> from lightning_eff.models import ConvNet
        >>> net = ConvNet(1, 10, width=8, depth=1, image_size=8)
        >>> path = os.path.join(tempfile.mkdtemp(), "teacher.pt")
        >>> torch.save(net.state_dict(), path)
        >>> teacher = load_teacher(path, template=ConvNet(1, 10, width=8, depth=1, image_size=8))
        >>> all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), net.state_dict().values()))
        True
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DDRanking: no teacher checkpoint at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, or one that needs unpickling of arbitrary classes
        raise ValueError(
            f"DDRanking: cannot read the teacher checkpoint {path} (weights_only=True): {err}"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        state = obj["state_dict"]
        hparams = obj.get("hyper_parameters") or {}
        prefix = "net." if any(k.startswith("net.") for k in state) else ""
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        config = hparams.get("net") if isinstance(hparams, dict) else None
        if isinstance(config, dict) and "class_path" in config:
            import importlib

            module_name, _, cls_name = config["class_path"].rpartition(".")
            cls = getattr(importlib.import_module(module_name), cls_name)
            net = cls(**dict(config.get("init_args") or {}))
        elif template is not None:
            net = copy.deepcopy(template)
        else:
            raise ValueError(
                f"DDRanking: the checkpoint {path} has no `net` config in its hyperparameters; pass the teacher "
                f"architecture as `net` (the student template) or give an nn.Module as `teacher`."
            )
    elif isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        if template is None:
            raise ValueError(
                f"DDRanking: {path} is a plain state_dict; a template network is needed to load it."
            )
        net, state = copy.deepcopy(template), obj
    else:
        raise ValueError(
            f"DDRanking: {path} is neither a Lightning checkpoint nor a state_dict (got {type(obj).__name__})."
        )
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"DDRanking: the teacher weights in {path} do not fit {type(net).__name__}: {err}"
        ) from None
    return net.eval()


# ---------------------------------------------------------------------------------------------
# distributed helper
# ---------------------------------------------------------------------------------------------
class _Dist:
    """``torch.distributed`` when initialised (Lightning's DDP, torchrun), else a single process."""

    def __init__(self) -> None:
        import torch.distributed as td

        self.td = td
        self.on = td.is_available() and td.is_initialized()
        self.rank = td.get_rank() if self.on else 0
        self.world = td.get_world_size() if self.on else 1

    def broadcast(self, obj: Any) -> Any:
        if not self.on or self.world == 1:
            return obj
        box = [obj]
        self.td.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        if not self.on or self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        self.td.all_gather_object(out, obj)
        return out


# ---------------------------------------------------------------------------------------------
# the jobs of one ranking
# ---------------------------------------------------------------------------------------------
@dataclass
class _Job:
    """One cell of the protocol: the lr grid of one run of one training kind on one set."""

    key: str
    kind: str  # full | syn_hard | syn | syn_noaug | rdm | rdm_noaug
    run: int
    lrs: list[float]
    make_set: Callable[[], SyntheticSet]
    options: dict[str, Any]
    seed: int
    cost: float
    cache: dict[str, Any] | None = None  # description hashed into the cache key (shared jobs only)
    cache_key: str | None = field(default=None)

    def __post_init__(self) -> None:
        if self.cache is not None:
            self.cache_key = f"{self.kind}-{_hash_json(self.cache)}"


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"DDRanking: `{name}` must be an int, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"DDRanking: `{name}` must be an int >= {minimum}, got {value!r}.")
    return value


def _check_float(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise TypeError(f"DDRanking: `{name}` must be a finite float, got {value!r}.")
    value = float(value)
    if value < low or value > high or (low_open and value == low):
        raise ValueError(
            f"DDRanking: `{name}` must be in {'(' if low_open else '['}{low}, {high}], got {value!r}."
        )
    return value


class DDRanking:
    """Rank synthetic sets with DD-Ranking's label-robust (LRS) and augmentation-robust (ARS) scores.

    Args:
        net: student template (re-initialised per student); default: the protocol's ConvNet sized to the
            images (:func:`~lightning_eff.distill.evaluate.default_student`).
        ipc: the images per class every ranked set must have (``None``: any; each set is compared with
            random subsets of its own per-class counts).
        num_eval: evaluation runs (random subset redrawn and students re-initialised each run).
        epochs: training epochs of the students on a synthetic or random set.
        lrs: the learning-rate grid; each accuracy is the best over it.
        syn_lr: learning rate of the synthetic set's runs in the evaluation setting instead of the grid
            (a float, or ``"synset"`` for the set's learned lr); the hard-label HLR run keeps the grid in
            the soft-label setting, as the package does.
        eval_every: test every this many epochs; an accuracy is the best checkpoint (and the final one).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        batch_size: student mini-batch size.
        soft_label_mode: ``None`` (hard-label setting), ``"S"`` (stored soft labels) or ``"M"`` (the teacher
            labels every augmented batch).
        soft_loss: ``"sce"`` or ``"kl"``.
        temperature: soft-label temperature ``T > 0``.
        teacher: the soft-label teacher: an ``nn.Module`` or the path of a checkpoint (see
            :func:`load_teacher`; read when ranking starts). Needed in both soft modes (mode S labels the
            random subsets with it).
        augmentation: ``"dsa"``, ``"cutmix"``, ``"dsa+cutmix"`` or ``"none"`` / ``None``.
        dsa: DSA parameters (default ``DSA()``: DD-Ranking's flip 0.5, rotate 15, saturation 2, brightness 1,
            contrast 0.5, scale 1.2, crop 0.125, cutout 0.5).
        cutmix: CutMix parameters (default ``CutMix(beta=1.0)``).
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
        privileged_weight: DRUPI weight for sets with privileged information (``None``: the set's own);
            it applies to every training on the synthetic set (random subsets have none).
        seed: seed of everything (subsets, initialisations, data order, augmentation).
        device: where to train (default: the current CUDA device, else CPU).
        vectorize: passed to ``evaluate_synthetic`` (``None``: students together on accelerators).
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
        >>> ranking = DDRanking(net=ConvNet(1, 10, width=8, depth=1, image_size=8), num_eval=1, epochs=2,
        ...                     lrs=[0.01], full_epochs=1, use_cache=False, progress=False, device="cpu")
        >>> report = ranking.rank({"random": SyntheticSet.random_subset(dm, ipc=2, seed=5)}, dm)
        >>> sorted(report["random"].metrics)[:4], 0.0 <= report["random"].mean("lrs") <= 1.0
        (['ars', 'ars_ddranking', 'hlr', 'ior'], True)
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        ipc: int | None = None,
        num_eval: int = 5,
        epochs: int = 300,
        lrs: Sequence[float] = DEFAULT_LR_GRID,
        syn_lr: float | str | None = None,
        eval_every: int = 20,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        batch_size: int = 256,
        soft_label_mode: str | None = None,
        soft_loss: str = "sce",
        temperature: float = 1.0,
        teacher: nn.Module | str | None = None,
        augmentation: str | None = "cutmix",
        dsa: DSA | None = None,
        cutmix: CutMix | None = None,
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
        privileged_weight: float | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        vectorize: bool | str | None = None,
        max_students_per_call: int = 25,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        progress: bool = True,
    ) -> None:
        if net is not None and not isinstance(net, nn.Module):
            raise TypeError(f"DDRanking: `net` must be an nn.Module or None, got {type(net).__name__}.")
        self.net = net
        self.ipc = None if ipc is None else _check_int("ipc", ipc, 1)
        self.num_eval = _check_int("num_eval", num_eval, 1)
        self.epochs = _check_int("epochs", epochs, 1)
        if isinstance(lrs, (str, bytes)) or not isinstance(lrs, (Sequence, Tensor)) or len(lrs) == 0:
            raise TypeError(f"DDRanking: `lrs` must be a non-empty sequence of learning rates, got {lrs!r}.")
        self.lrs = [
            _check_float("lrs", v, 0.0, low_open=True)
            for v in (lrs.tolist() if isinstance(lrs, Tensor) else lrs)
        ]
        if isinstance(syn_lr, str) and syn_lr != "synset":
            raise ValueError(f"DDRanking: `syn_lr` must be None, a float or 'synset', got {syn_lr!r}.")
        self.syn_lr = (
            syn_lr
            if syn_lr is None or isinstance(syn_lr, str)
            else _check_float("syn_lr", syn_lr, 0.0, low_open=True)
        )
        self.eval_every = _check_int("eval_every", eval_every, 1)
        self.momentum = _check_float("momentum", momentum, 0.0, 1.0)
        if self.momentum == 1.0:
            raise ValueError("DDRanking: `momentum` must be in [0, 1), got 1.0.")
        self.weight_decay = _check_float("weight_decay", weight_decay, 0.0)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        if soft_label_mode not in (None, *SOFT_LABEL_MODES):
            raise ValueError(
                f"DDRanking: `soft_label_mode` must be None (hard labels), 'S' (stored soft labels) or 'M' (teacher "
                f"labels every batch), got {soft_label_mode!r}."
            )
        self.soft_label_mode = soft_label_mode
        if soft_loss not in SOFT_LOSSES:
            raise ValueError(f"DDRanking: `soft_loss` must be one of {SOFT_LOSSES}, got {soft_loss!r}.")
        self.soft_loss = soft_loss
        self.temperature = _check_float("temperature", temperature, 0.0, low_open=True)
        if teacher is not None and not isinstance(teacher, (nn.Module, str, os.PathLike)):
            raise TypeError(
                f"DDRanking: `teacher` must be an nn.Module, a checkpoint path or None, got {type(teacher).__name__}."
            )
        if soft_label_mode is not None and teacher is None:
            why = (
                "to label every augmented batch"
                if soft_label_mode == "M"
                else "to give the random-real subsets soft labels"
            )
            raise ValueError(
                f"DDRanking: soft_label_mode={soft_label_mode!r} needs a `teacher` {why} (an nn.Module or a checkpoint "
                f"path)."
            )
        if soft_label_mode is None and teacher is not None:
            raise ValueError(
                "DDRanking: a `teacher` was given but soft_label_mode=None (hard labels); set 'S' or 'M'."
            )
        self.teacher = teacher
        augmentation = "none" if augmentation is None else augmentation
        if augmentation not in AUGMENTATIONS:
            raise ValueError(
                f"DDRanking: `augmentation` must be one of {AUGMENTATIONS} or None, got {augmentation!r}."
            )
        self.augmentation = augmentation
        if dsa is not None and not isinstance(dsa, DSA):
            raise TypeError(
                f"DDRanking: `dsa` must be a lightning_eff.distill.DSA or None, got {type(dsa).__name__}."
            )
        if cutmix is not None and not isinstance(cutmix, CutMix):
            raise TypeError(
                f"DDRanking: `cutmix` must be a lightning_eff.distill.CutMix or None, got {type(cutmix).__name__}."
            )
        self.dsa = dsa if dsa is not None else DSA()
        self.cutmix = cutmix if cutmix is not None else CutMix(beta=1.0)
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
        if "ars" in metrics and augmentation == "none":
            raise ValueError(
                "DDRanking: the augmentation-robust score compares training with and without augmentation; with "
                "augmentation='none' it is undefined. Set `augmentation` or metrics=['lrs']."
            )
        self.metrics = [m for m in METRICS if m in metrics]
        self.lrs_weight = F._check_weight("DDRanking", "lrs_weight", lrs_weight)
        self.ars_weight = F._check_weight("DDRanking", "ars_weight", ars_weight)
        self.full_epochs = _check_int("full_epochs", full_epochs, 1)
        self.full_lr = _check_float("full_lr", full_lr, 0.0, low_open=True)
        self.full_batch_size = _check_int("full_batch_size", full_batch_size, 1)
        self.full_students = _check_int("full_students", full_students, 1)
        if not isinstance(full_per_run, bool):
            raise TypeError(f"DDRanking: `full_per_run` must be a bool, got {full_per_run!r}.")
        self.full_per_run = full_per_run
        self.full_data_acc = (
            None if full_data_acc is None else _check_float("full_data_acc", full_data_acc, 0.0, 1.0)
        )
        self.privileged_weight = (
            None if privileged_weight is None else _check_float("privileged_weight", privileged_weight, 0.0)
        )
        self.seed = _check_int("seed", seed, -(2**63))
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(f"DDRanking: `device` must be a string, a torch.device or None, got {device!r}.")
        self.device = device
        if vectorize is not None and not isinstance(vectorize, bool) and vectorize != "vmap":
            raise ValueError(
                f"DDRanking: `vectorize` must be True, False, None or 'vmap', got {vectorize!r}."
            )
        self.vectorize = vectorize
        self.max_students_per_call = _check_int("max_students_per_call", max_students_per_call, 1)
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
        data_fp = self._data_fingerprint(dm)
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

    @staticmethod
    def _data_fingerprint(dm) -> dict[str, Any]:
        from lightning_eff.distill.evaluate import _test_tensors

        test_x, test_y = _test_tensors(dm)
        return {
            "class": f"{type(dm).__module__}.{type(dm).__qualname__}",
            "num_classes": int(dm.num_classes),
            "image_shape": list(dm.image_shape),
            "train_targets": _hash_tensors(dm.train_targets.long()),
            "test": _hash_tensors(test_x.float(), test_y.long()),
        }

    # ------------------------------------------------------------------ cache
    def _lookup(self, key: str) -> dict[str, Any] | None:
        if key in self._memory:
            return self._memory[key]
        if not self.use_cache:
            return None
        path = self.cache_dir / f"{key}.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if (
            data.get("format") != CACHE_FORMAT
            or data.get("protocol_version") != PROTOCOL_VERSION
            or data.get("key") != key
        ):
            return None
        result = data.get("result")
        if not isinstance(result, dict) or "best" not in result or "lrs" not in result:
            return None
        self._memory[key] = result
        return result

    def _remember(self, job: _Job, result: dict[str, Any]) -> None:
        """Keep a shared training's result as soon as it is known (memory and cache file): an interrupted
        ranking resumes from there."""
        if job.cache_key is not None:
            self._memory[job.cache_key] = result
            self._store(job.cache_key, job.cache, result)

    def _store(self, key: str, description: dict[str, Any] | None, result: dict[str, Any]) -> None:
        if not self.use_cache:
            return
        payload = {
            "format": CACHE_FORMAT,
            "protocol_version": PROTOCOL_VERSION,
            "key": key,
            "description": description,
            "result": result,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        try:
            atomic_write_text(
                self.cache_dir / f"{key}.json", json.dumps(payload, indent=1, default=str) + "\n"
            )
        except OSError as err:  # a read-only cache folder must not lose the ranking itself
            warnings.warn(
                f"DDRanking: could not write the cache file in {self.cache_dir}: {err}", stacklevel=2
            )

    def protocol(self) -> dict[str, Any]:
        """The settings of this evaluator (JSON-serialisable; the net and teacher described)."""
        return {
            "num_eval": self.num_eval,
            "epochs": self.epochs,
            "lr_grid": list(self.lrs),
            "syn_lr": self.syn_lr,
            "eval_every": self.eval_every,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "batch_size": self.batch_size,
            "lr_schedule": "x0.1 at half of the epochs",
            "label_setting": "hard" if self.soft_label_mode is None else f"soft ({self.soft_label_mode})",
            "soft_label_mode": self.soft_label_mode,
            "soft_loss": self.soft_loss if self.soft_label_mode else None,
            "temperature": self.temperature if self.soft_label_mode else None,
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
            "privileged_weight": self.privileged_weight,
            "seed": self.seed,
            "vectorize": self.vectorize,
            "accuracy": "best over checkpoints every eval_every epochs (and the final one), best over the lr grid",
            "scores": "fractions; mean and population std over runs of the per-run scores",
            "protocol_version": PROTOCOL_VERSION,
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
        if self.eval_every != 10 and self.soft_label_mode is None and "lrs" in self.metrics:
            out.append(
                f"checkpoints every {self.eval_every} epochs; the package's hard-label LRS tests every 10 "
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


def _options_key(options: dict[str, Any]) -> tuple:
    """Hashable identity of a job's training options (objects by identity: the same net, teacher, DSA)."""
    plain = (str, int, float, bool, type(None))
    return tuple(sorted((k, v if isinstance(v, plain) else ("id", id(v))) for k, v in options.items()))


def _privileged_key(options: dict[str, Any], synset: SyntheticSet) -> str | None:
    """What a set's privileged information adds to its training (``None``: nothing); sets differing here train apart."""
    if synset.privileged is None or options.get("privileged_weight") == 0:
        return None
    return json.dumps(synset.metadata.get("privileged") or {}, sort_keys=True, default=str)


def _assign(jobs: list[_Job], world: int) -> list[list[_Job]]:
    """Greedy longest-processing-time assignment of jobs to ranks (deterministic)."""
    loads = [0.0] * world
    out: list[list[_Job]] = [[] for _ in range(world)]
    for job in sorted(jobs, key=lambda j: (-j.cost, j.key)):
        r = min(range(world), key=lambda i: (loads[i], i))
        out[r].append(job)
        loads[r] += job.cost
    return out


class _Context:
    """Everything one :meth:`DDRanking.rank` call needs to plan, run and assemble its trainings."""

    def __init__(self, owner: DDRanking, dm, template: nn.Module, teacher: nn.Module | None, data_fp, device):
        self.o = owner
        self.dm = dm
        self.template = template
        self.teacher = teacher
        self.data_fp = data_fp
        self.device = device
        self.net_desc = _describe_net(template)
        self.teacher_fp = (
            None
            if teacher is None
            else {"net": _describe_net(teacher), "weights": _state_fingerprint(teacher)}
        )
        self._subsets: dict[tuple, SyntheticSet] = {}
        self._full: SyntheticSet | None = None

    # ------------------------------------------------------------------ data
    def full_set(self) -> SyntheticSet:
        if self._full is None:
            images, labels = [], []
            for c in range(self.dm.num_classes):
                x = self.dm.class_images(c)
                images.append(x)
                labels.append(torch.full((x.shape[0],), c, dtype=torch.long))
            self._full = SyntheticSet(
                torch.cat(images),
                torch.cat(labels),
                metadata={
                    "method": "full_data",
                    "num_classes": self.dm.num_classes,
                    "dataset": type(self.dm).__name__,
                },
            )
        return self._full

    def random_subset(self, counts: tuple[int, ...], run: int) -> SyntheticSet:
        key = (counts, run)
        if key not in self._subsets:
            seed = _seed_from(self.o.seed, "subset", run)
            if len(set(counts)) == 1:
                subset = SyntheticSet.random_subset(self.dm, counts[0], seed=seed)
            else:
                gen = torch.Generator().manual_seed(seed)
                images, labels = [], []
                for c, n in enumerate(counts):
                    images.append(self.dm.class_images(c, n, generator=gen))
                    labels.append(torch.full((n,), c, dtype=torch.long))
                subset = SyntheticSet(
                    torch.cat(images),
                    torch.cat(labels),
                    metadata={
                        "method": "random_real",
                        "num_classes": self.dm.num_classes,
                        "seed": seed,
                    },
                )
            if self.o.soft_label_mode == "S":
                subset = self._with_teacher_labels(subset)
            self._subsets[key] = subset
        return self._subsets[key]

    def _with_teacher_labels(self, subset: SyntheticSet) -> SyntheticSet:
        teacher = self.teacher
        was_training = teacher.training
        teacher.to(self.device).eval()
        try:
            with torch.no_grad():
                logits = torch.cat(
                    [teacher(x.to(self.device)).float().cpu() for x in subset.images.split(512)]
                )
        finally:
            teacher.train(was_training)
        meta = dict(subset.metadata, soft_label_kind="logits", soft_labels_from="teacher")
        return SyntheticSet(subset.images, subset.labels, soft_labels=logits, metadata=meta)

    # ------------------------------------------------------------------ plan
    def _aug(self, on: bool) -> dict[str, Any]:
        aug = self.o.augmentation if on else "none"
        return {
            "dsa": self.o.dsa if "dsa" in aug else None,
            "cutmix": self.o.cutmix if "cutmix" in aug else None,
        }

    def _aug_desc(self, on: bool) -> dict[str, Any]:
        a = self._aug(on)
        return {k: (v.config() if v is not None else None) for k, v in a.items()}

    def _labels(self, soft: bool) -> dict[str, Any]:
        o = self.o
        if not soft or o.soft_label_mode is None:
            return {"use_soft_labels": False}
        out: dict[str, Any] = {
            "use_soft_labels": o.soft_label_mode,
            "soft_loss": o.soft_loss,
            "temperature": o.temperature,
        }
        if o.soft_label_mode == "M":
            out["teacher"] = self.teacher
        return out

    def _common(self, epochs: int, batch_size: int) -> dict[str, Any]:
        o = self.o
        return {
            "net": self.template,
            "epochs": epochs,
            "momentum": o.momentum,
            "weight_decay": o.weight_decay,
            "batch_size": batch_size,
            "eval_every": o.eval_every,
            "device": self.device,
            "vectorize": o.vectorize,
        }

    def plan(self, named: dict[str, SyntheticSet]) -> list[_Job]:
        o = self.o
        soft = o.soft_label_mode is not None
        need_lrs, need_ars = "lrs" in o.metrics, "ars" in o.metrics
        jobs: list[_Job] = []
        base = {"v": PROTOCOL_VERSION, "data": self.data_fp, "net": self.net_desc}
        students_desc = {
            "epochs": o.epochs,
            "momentum": o.momentum,
            "weight_decay": o.weight_decay,
            "batch_size": o.batch_size,
            "eval_every": o.eval_every,
        }

        if need_lrs and o.full_data_acc is None:
            seed = _seed_from(o.seed, "full")
            # ddranking 0.2.0 augments the full data only in the soft-label setting with use_aug_for_hard
            # (soft_label.py l. 312; hard_label.py l. 273 never does)
            full_aug = soft and o.augment_hard
            n_full = o.num_eval if o.full_per_run else o.full_students
            options = {
                **self._common(o.full_epochs, o.full_batch_size),
                "use_soft_labels": False,
                **self._aug(full_aug),
                "privileged_weight": 0.0,
            }
            desc = {
                **base,
                "kind": "full",
                "epochs": o.full_epochs,
                "lr": o.full_lr,
                "batch_size": o.full_batch_size,
                "momentum": o.momentum,
                "weight_decay": o.weight_decay,
                "eval_every": o.eval_every,
                "students": n_full,
                "seed": seed,
            }
            if full_aug:  # (absent otherwise, so earlier cache files stay valid)
                desc["aug"] = self._aug_desc(True)
            n = sum(len(self.dm.class_indices(c)) for c in range(self.dm.num_classes))
            jobs.append(
                _Job(
                    "full",
                    "full",
                    0,
                    [o.full_lr] * n_full,
                    self.full_set,
                    options,
                    seed,
                    cost=n_full * o.full_epochs * n,
                    cache=desc,
                )
            )

        # the random-real cells, shared by every set with the same per-class counts
        counts_seen: list[tuple[int, ...]] = []
        for s in named.values():
            counts = tuple(torch.bincount(s.labels, minlength=self.dm.num_classes).tolist())
            if counts not in counts_seen:
                counts_seen.append(counts)
        rdm_kinds = []
        if need_lrs or need_ars:
            rdm_kinds.append(("rdm", True))  # IOR's random side = ARS's with-augmentation random side
        if need_ars:
            rdm_kinds.append(("rdm_noaug", False))
        for counts in counts_seen:
            ctag = _hash_json(counts)[:8]
            for kind, aug in rdm_kinds:
                for run in range(o.num_eval):
                    seed = _seed_from(o.seed, kind, run, ctag)
                    labels = self._labels(soft)
                    options = {
                        **self._common(o.epochs, o.batch_size),
                        **labels,
                        **self._aug(aug),
                        "privileged_weight": 0.0,
                    }
                    desc = {
                        **base,
                        "kind": kind,
                        "counts": list(counts),
                        "subset_seed": _seed_from(o.seed, "subset", run),
                        "seed": seed,
                        "lrs": o.lrs,
                        "labels": {k: v for k, v in labels.items() if k != "teacher"},
                        "teacher": self.teacher_fp if labels.get("use_soft_labels") else None,
                        "aug": self._aug_desc(aug),
                        **students_desc,
                    }
                    jobs.append(
                        _Job(
                            f"{kind}|{ctag}|{run}",
                            kind,
                            run,
                            list(o.lrs),
                            (lambda c=counts, r=run: self.random_subset(c, r)),
                            options,
                            seed,
                            cost=len(o.lrs) * o.epochs * sum(counts),
                            cache=desc,
                        )
                    )

        # the synthetic sets' own cells
        for name, s in named.items():
            syn_lrs = list(o.lrs) if o.syn_lr is None else [float(s.lr) if o.syn_lr == "synset" else o.syn_lr]
            kinds: list[tuple[str, bool, bool, list[float]]] = []  # (kind, soft labels, augmented, lrs)
            if soft:
                if need_lrs:
                    kinds.append(("syn_hard", False, o.augment_hard, list(o.lrs)))
                kinds.append(("syn", True, True, syn_lrs))
            else:  # hard-label setting: the HLR run is the IOR run (augmented, like LabelRobustScoreHard)
                kinds.append(("syn", False, True, syn_lrs))
            if need_ars:
                kinds.append(("syn_noaug", soft, False, syn_lrs))
            for kind, use_soft, aug, lrs in kinds:
                options = {
                    **self._common(o.epochs, o.batch_size),
                    **self._labels(use_soft),
                    **self._aug(aug),
                    "privileged_weight": o.privileged_weight,
                }
                for run in range(o.num_eval):
                    jobs.append(
                        _Job(
                            f"{kind}|set:{name}|{run}",
                            kind,
                            run,
                            lrs,
                            (lambda s=s: s),
                            options,
                            _seed_from(o.seed, kind, run),
                            cost=len(lrs) * o.epochs * len(s),
                        )
                    )
        return jobs

    # ------------------------------------------------------------------ run
    def execute(
        self, jobs: list[_Job], progress: bool, on_done: Callable[[_Job, dict[str, Any]], None] | None = None
    ) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
        """Train this rank's jobs: the jobs with the same training options and set size in one call.

        A call of :func:`evaluate_synthetic_sets` trains the students of all its jobs together (the sets of a
        ranking, their random-real baselines and all runs, when their options agree); each job's students
        are seeded by the job alone, so the grouping never changes a result (and a cached job's accuracies
        are the ones a call of its own would give). The shared (cached) cells are grouped apart from the
        sets' own cells and trained first, so an interrupted ranking keeps them.
        """
        from tqdm.auto import tqdm

        groups: dict[tuple, list[list[tuple[_Job, SyntheticSet]]]] = {}
        # the shared (cached) trainings first: an interrupted ranking keeps them
        for job in sorted(jobs, key=lambda j: j.cache_key is None):
            synset = job.make_set()
            shared = job.cache_key is not None  # shared cells train apart from the sets' own, so they are stored first
            key = (shared, _options_key(job.options), _privileged_key(job.options, synset), len(synset), len(job.lrs))
            calls = groups.setdefault(key, [[]])
            if calls[-1] and sum(len(j.lrs) for j, _ in calls[-1]) + len(job.lrs) > self.o.max_students_per_call:
                calls.append([])  # this call is full: whole cells go to the next one
            calls[-1].append((job, synset))
        results: dict[str, dict[str, Any]] = {}
        seconds: dict[str, float] = {}
        total = sum(len(j.lrs) for j in jobs)
        with tqdm(total=total, desc="DD-Ranking", unit="student", disable=not progress or total == 0) as bar:
            for members in (call for calls in groups.values() for call in calls):
                kinds = sorted({j.kind for j, _ in members})
                bar.set_postfix_str(f"{'+'.join(kinds)} ({len(members)} cells)")
                t0 = time.perf_counter()
                out = evaluate_synthetic_sets(
                    [synset for _, synset in members],
                    self.dm,
                    num_students=len(members[0][0].lrs),
                    lr=[j.lrs for j, _ in members],
                    seed=[j.seed for j, _ in members],
                    progress=False,
                    **members[0][0].options,
                )
                elapsed = time.perf_counter() - t0
                for (j, _), res in zip(members, out):
                    seconds[j.kind] = seconds.get(j.kind, 0.0) + elapsed / len(members)
                    best = res.best_accuracies if res.best_accuracies is not None else res.accuracies
                    results[j.key] = {
                        "best": [float(v) for v in best],
                        "final": [float(v) for v in res.accuracies],
                        "lrs": list(j.lrs),
                    }
                    if on_done is not None:
                        on_done(j, results[j.key])
                bar.update(sum(len(j.lrs) for j, _ in members))
        return results, seconds

    # ------------------------------------------------------------------ results
    def assemble(
        self, named: dict[str, SyntheticSet], res: dict[str, dict[str, Any]], reused: set[str]
    ) -> RankingReport:
        o = self.o
        soft = o.soft_label_mode is not None
        need_lrs, need_ars = "lrs" in o.metrics, "ars" in o.metrics

        def best(key: str) -> tuple[float, float]:
            r = res[key]
            i = max(range(len(r["best"])), key=lambda k: (r["best"][k], -k))
            return r["best"][i], r["lrs"][i]

        full_info: dict[str, Any] = {}
        full_acc = None
        if need_lrs:
            if o.full_data_acc is not None:
                full_acc = o.full_data_acc
                full_info = {"accuracy": full_acc, "accuracies": [full_acc], "given": True, "cached": False}
            else:
                accs = res["full"]["best"]
                full_acc = sum(accs) / len(accs)
                full_info = {
                    "accuracy": full_acc,
                    "accuracies": accs,
                    "given": False,
                    "cached": "full" in reused,
                    "per_run": o.full_per_run,
                }
        results = []
        for name, s in named.items():
            counts = tuple(torch.bincount(s.labels, minlength=self.dm.num_classes).tolist())
            ctag = _hash_json(counts)[:8]
            runs = []
            for run in range(o.num_eval):
                row: dict[str, Any] = {"run": run}
                syn_acc, syn_lr = best(f"syn|set:{name}|{run}")
                rdm_acc, rdm_lr = best(f"rdm|{ctag}|{run}")
                if need_lrs:
                    hard_acc, hard_lr = best(f"syn_hard|set:{name}|{run}") if soft else (syn_acc, syn_lr)
                    run_full = res["full"]["best"][run] if o.full_per_run and o.full_data_acc is None else full_acc
                    row.update(full_acc=run_full, syn_hard_acc=hard_acc, syn_hard_lr=hard_lr)
                row.update(syn_acc=syn_acc, syn_lr=syn_lr, rdm_acc=rdm_acc, rdm_lr=rdm_lr)
                if need_ars:
                    sn, sn_lr = best(f"syn_noaug|set:{name}|{run}")
                    rn, rn_lr = best(f"rdm_noaug|{ctag}|{run}")
                    row.update(syn_noaug_acc=sn, syn_noaug_lr=sn_lr, rdm_noaug_acc=rn, rdm_noaug_lr=rn_lr)
                if need_lrs:
                    row["hlr"] = F.hard_label_recovery(row["full_acc"], row["syn_hard_acc"])
                    row["ior"] = F.improvement_over_random(syn_acc, rdm_acc)
                    row["lrs"] = F.label_robust_score(row["hlr"], row["ior"], o.lrs_weight)
                    row["lrs_ddranking"] = F.label_robust_score(
                        100 * row["hlr"], 100 * row["ior"], o.lrs_weight, percent=True
                    )
                if need_ars:
                    row["with_aug"] = syn_acc - rdm_acc
                    row["without_aug"] = row["syn_noaug_acc"] - row["rdm_noaug_acc"]
                    row["ars"] = F.augmentation_robust_score(
                        syn_acc, rdm_acc, row["syn_noaug_acc"], row["rdm_noaug_acc"], o.ars_weight
                    )
                    row["ars_ddranking"] = F.augmentation_robust_score(
                        100 * syn_acc,
                        100 * rdm_acc,
                        100 * row["syn_noaug_acc"],
                        100 * row["rdm_noaug_acc"],
                        o.ars_weight,
                        percent=True,
                    )
                runs.append(row)
            metrics = {}
            names = (["hlr", "ior", "lrs", "lrs_ddranking"] if need_lrs else []) + (
                ["ars", "with_aug", "without_aug", "ars_ddranking"] if need_ars else []
            )
            for m in names:
                values = torch.tensor([r[m] for r in runs], dtype=torch.float64)
                metrics[m] = {
                    "mean": float(values.mean()),
                    "std": float(values.std(unbiased=False)) if len(runs) > 1 else 0.0,
                }
            meta = {
                "method": s.metadata.get("method"),
                "ipc": s.ipc,
                "images": len(s),
                "class_counts": list(counts),
                "dataset": s.metadata.get("dataset"),
                "soft_labels": s.soft_labels is not None,
                "privileged": s.privileged is not None,
                "learned_lr": s.lr,
            }
            results.append(RankingResult(name, metrics, runs, meta))
        protocol = {
            **o.protocol(),
            "student": self.net_desc,
            "teacher": self.teacher_fp,
            "dataset": self.data_fp,
            "device": str(self.device),
        }
        return RankingReport(results, protocol, full_info)
