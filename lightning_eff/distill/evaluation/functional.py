"""The evaluation protocol as functions: :func:`evaluate_synthetic` (one set) and :func:`evaluate_synthetic_sets`.

How the students are trained is a :class:`~lightning_eff.distill.StudentProtocol` (epochs, lr, SGD settings,
augmentation, soft labels, ...); what depends on the run is given beside it (the student network, the number of
students, the seed, the device, the mode-M teacher). The protocol's fields may also be given as keywords, which
override the protocol's (``evaluate_synthetic(synset, dm, epochs=50)`` is
``evaluate_synthetic(synset, dm, StudentProtocol(epochs=50))``).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.distill.evaluation.batches import _Batches
from lightning_eff.distill.evaluation.data import load_test_tensors
from lightning_eff.distill.evaluation.protocol import StudentProtocol
from lightning_eff.distill.evaluation.result import EvaluationResult, _mean_std
from lightning_eff.distill.evaluation.trainers import (
    _has_batchnorm,
    _SequentialTrainer,
    _stackable_convnet,
    _VectorizedTrainer,
)
from lightning_eff.distill.synthetic import SyntheticSet
from lightning_eff.models.privileged import POOLINGS, PRIVILEGED_KINDS, FeatureTap, pool_privileged
from lightning_eff.utils.checks import check_choice, check_int

__all__ = ["evaluate_synthetic", "evaluate_synthetic_sets", "default_student"]

_OWNER = "evaluate_synthetic"


def default_student(image_shape: Sequence[int], num_classes: int, width: int = 128) -> nn.Module:
    """The protocol's student: ConvNet-D (instance norm, ReLU, average pooling) sized to the images.

    Depth by image side (square images): ``< 8`` px: 1, ``8..15``: 2 (8x8 digits), ``16..63``: 3
    (ConvNet-3 on 16/32 px), ``64..127``: 4, ``>= 128``: 5 (the ConvNetD4/D5 of the distillation
    literature for 64 / 128 px).

    Example::

        >>> default_student((3, 32, 32), 10).depth
        3
    """
    from lightning_eff.models import ConvNet

    c, h, w = (int(v) for v in image_shape)
    if h != w:
        raise ValueError(
            f"default_student: the default ConvNet needs square images, got {h}x{w}; pass `net=` (any nn.Module)."
        )
    depth = 1 if h < 8 else 2 if h < 16 else 3 if h < 64 else 4 if h < 128 else 5
    return ConvNet(in_channels=c, num_classes=num_classes, width=width, depth=depth, image_size=h)


def _protocol_with(protocol: Any, overrides: dict[str, Any], owner: str) -> StudentProtocol:
    """``protocol`` (default: ``StudentProtocol()``) with the protocol fields given as keywords replaced."""
    if protocol is not None and not isinstance(protocol, StudentProtocol):
        hint = " (the student network is passed as net=...)" if isinstance(protocol, nn.Module) else ""
        raise TypeError(
            f"{owner}: `protocol` must be a StudentProtocol or None, got {type(protocol).__name__}{hint}."
        )
    base = protocol if protocol is not None else StudentProtocol()
    unknown = sorted(set(overrides) - set(StudentProtocol.field_names()))
    if unknown:
        raise TypeError(
            f"{owner}: unknown argument(s) {unknown}; the protocol's fields (keywords or a StudentProtocol) are "
            f"{list(StudentProtocol.field_names())}."
        )
    return base.replace(**overrides) if overrides else base


def evaluate_synthetic(
    synset: SyntheticSet,
    datamodule: Any,
    protocol: StudentProtocol | None = None,
    *,
    net: nn.Module | None = None,
    num_students: int | None = None,
    seed: int = 0,
    teacher: nn.Module | None = None,
    feature_layer: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    return_students: bool = False,
    **overrides: Any,
) -> EvaluationResult:
    """Train ``num_students`` fresh networks on ``synset`` under ``protocol`` and test them on ``datamodule``.

    Args:
        synset: the reduced set (images in the DataModule's normalised space).
        datamodule: a ``ClassificationDataModule`` (or any DataModule with ``test_dataloader``);
            ``setup("test")`` is called if needed.
        protocol: how each student is trained (:class:`~lightning_eff.distill.StudentProtocol`: epochs, lr,
            momentum, weight decay, batch size, DSA / CutMix, soft labels, temperature, privileged weight,
            ``eval_every``, ``vectorize``); default ``StudentProtocol()`` (300 epochs, SGD lr 0.01, momentum 0.9,
            weight decay 5e-4, batch 256, no augmentation).
        net: student template (deep-copied and re-initialised per student with a seeded RNG); default
            :func:`default_student` (ConvNet, width 128, depth by image size).
        num_students: students (independent initialisations, data orders and augmentations); default: one per
            lr of the protocol's lr list, else 5.
        seed: seed of everything random (same seed, same result on the same device).
        teacher: the mode-M teacher (``use_soft_labels="M"``; set to eval mode and moved to ``device``; its mode
            is restored).
        feature_layer: submodule whose output is ``E(x)`` for privileged information (``None``: the
            layer DRUPI stored in ``synset.metadata["privileged"]["layer"]``, else ``"encoder"``).
        device: where to train (default: CUDA if available, else CPU).
        progress: show a tqdm bar over epochs (rank 0 only).
        return_students: keep the trained students in :attr:`EvaluationResult.students`.
        **overrides: fields of the protocol (``epochs=50, lr=0.05, dsa=True, ...``), replacing ``protocol``'s.

    Returns:
        An :class:`EvaluationResult`.

    Example::

        >>> from lightning_eff.data import DigitsDataModule
        >>> from lightning_eff.models import ConvNet
        >>> dm = DigitsDataModule()
        >>> synset = SyntheticSet.random_subset(dm, ipc=2, seed=0)
        >>> res = evaluate_synthetic(synset, dm, StudentProtocol(epochs=2),
        ...                          net=ConvNet(1, 10, width=8, depth=2, image_size=8), num_students=2, device="cpu")
        >>> len(res.accuracies), 0.0 <= res.mean <= 1.0, res.protocol["epochs"]
        (2, True, 2)
    """
    if not isinstance(synset, SyntheticSet):
        raise TypeError(f"evaluate_synthetic: `synset` must be a SyntheticSet, got {type(synset).__name__}.")
    protocol = _protocol_with(protocol, overrides, "evaluate_synthetic")
    return evaluate_synthetic_sets(
        [synset], datamodule, protocol, net=net, num_students=num_students, seed=seed, teacher=teacher,
        feature_layer=feature_layer, device=device, progress=progress, return_students=return_students,
    )[0]


def evaluate_synthetic_sets(
    synsets: Sequence[SyntheticSet],
    datamodule: Any,
    protocol: StudentProtocol | None = None,
    *,
    net: nn.Module | None = None,
    num_students: int | None = None,
    seed: int | Sequence[int] = 0,
    lr: float | Sequence[float] | Sequence[Sequence[float]] | str | None = None,
    teacher: nn.Module | None = None,
    feature_layer: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    return_students: bool = False,
    **overrides: Any,
) -> list[EvaluationResult]:
    """Several sets under one protocol, all their students trained together: one result per set.

    Student ``j`` of set ``i`` draws its initialisation and data stream from ``seed[i]`` exactly as
    :func:`evaluate_synthetic` (``seed=seed[i]``) would, so a set's result does not depend on the other
    sets of the call — ``evaluate_synthetic_sets([a, b], dm, p, seed=[s, t])`` equals
    ``[evaluate_synthetic(a, dm, p, seed=s), evaluate_synthetic(b, dm, p, seed=t)]`` — while the sets share every
    step (one stacked step for all ``len(synsets) * num_students`` students when vectorised). This is
    how DD-Ranking trains the sets of a ranking and their random-real baselines in one call.

    Args:
        synsets: the sets; they must have the same number of images and image shape (a set may appear
            more than once, e.g. with different seeds), and agree on soft labels / privileged
            information as the protocol needs them.
        protocol: as in :func:`evaluate_synthetic`, for every set.
        seed: one seed for every set (the same initialisations and data orders for each: common random
            numbers, a paired comparison) or one per set.
        lr: the protocol's ``lr`` for every set (``"synset"``: each set's own lr), or a sequence with one lr
            list per set (``None``: the protocol's).
        Every other argument is :func:`evaluate_synthetic`'s, for each set.

    Returns:
        One :class:`EvaluationResult` per set, in order; ``protocol["sets_trained_together"]`` is the
        number of sets of the call and ``seconds`` the wall time of the whole call.
    """
    start_time = time.perf_counter()
    synsets = list(synsets) if isinstance(synsets, Sequence) else synsets
    if not isinstance(synsets, list) or not synsets:
        raise TypeError("evaluate_synthetic: `synsets` must be a non-empty sequence of SyntheticSets.")
    for i, s in enumerate(synsets):
        if not isinstance(s, SyntheticSet):
            raise TypeError(f"evaluate_synthetic: `synsets[{i}]` must be a SyntheticSet, got {type(s).__name__}.")
    num_sets = len(synsets)
    per_set_lrs = not isinstance(lr, (str, Tensor)) and isinstance(lr, Sequence) and any(
        isinstance(v, (Sequence, Tensor)) for v in lr
    )
    if lr is not None and not per_set_lrs:
        overrides["lr"] = lr
    protocol = _protocol_with(protocol, overrides, "evaluate_synthetic_sets")
    seeds_in = [seed] * num_sets if not isinstance(seed, Sequence) else list(seed)
    if len(seeds_in) != num_sets:
        raise ValueError(f"evaluate_synthetic: `seed` has {len(seeds_in)} values for {num_sets} sets; give one per set.")
    set_seeds = [check_int(v, "seed", minimum=-(2**63), owner=_OWNER) for v in seeds_in]
    lengths = sorted({len(s) for s in synsets})
    if len(lengths) > 1:
        raise ValueError(
            f"evaluate_synthetic: sets trained together must have the same number of images, got {lengths}; "
            f"evaluate them in separate calls."
        )
    synset = synsets[0]
    if per_set_lrs and len(lr) != num_sets:
        raise ValueError(f"evaluate_synthetic: `lr` has {len(lr)} per-set lists for {num_sets} sets.")
    set_lr_specs = [StudentProtocol(lr=v).lr for v in lr] if per_set_lrs else [protocol.lr] * num_sets
    if num_students is None:
        num_students = len(set_lr_specs[0]) if isinstance(set_lr_specs[0], tuple) else 5
    num_students = check_int(num_students, "num_students", minimum=1, owner=_OWNER)
    epochs, batch_size = protocol.epochs, protocol.batch_size
    momentum, weight_decay, temperature = protocol.momentum, protocol.weight_decay, protocol.temperature
    soft_loss, eval_every, vectorize = protocol.soft_loss, protocol.eval_every, protocol.vectorize
    if net is not None and not isinstance(net, nn.Module):
        raise TypeError(f"evaluate_synthetic: `net` must be an nn.Module or None, got {type(net).__name__}.")
    set_lrs = [_resolve_lrs(spec, num_students, s) for spec, s in zip(set_lr_specs, synsets)]
    modes = {_resolve_soft_mode(protocol.use_soft_labels, teacher, s) for s in synsets}
    privs = {(w, k, p) if w > 0 else (0.0, "feature", "avg")  # kind and pooling only matter with a weight
             for w, k, p in (_resolve_privileged(protocol.privileged_weight, s) for s in synsets)}
    layers = {
        feature_layer or str((s.metadata.get("privileged") or {}).get("layer") or "encoder")
        for s in synsets
        if max(w for w, _, _ in privs) > 0 or s is synsets[0]
    }
    if len(privs) > 1 or len(layers) > 1:
        raise ValueError(
            f"evaluate_synthetic: sets trained together must use the same privileged information settings, got "
            f"{sorted(privs)} (weight, kind, pooling) and layers {sorted(layers)}; pass privileged_weight= or "
            f"evaluate them separately."
        )
    (mode,), ((priv_weight, priv_kind, priv_pool),), (feature_layer,) = modes, privs, layers
    lrs = [v for values in set_lrs for v in values]
    dsa_, cutmix_ = protocol.build_dsa(), protocol.build_cutmix()

    # ---- data and shapes
    test_x, test_y = load_test_tensors(datamodule)
    num_classes = int(getattr(datamodule, "num_classes", None) or synset.num_classes)
    expected_shape = tuple(getattr(datamodule, "image_shape", None) or test_x.shape[1:])
    for synset in synsets:
        if tuple(synset.image_shape) != expected_shape or tuple(test_x.shape[1:]) != expected_shape:
            raise ValueError(
                f"evaluate_synthetic: the synthetic images have shape {tuple(synset.image_shape)} but the DataModule's "
                f"images are {expected_shape} (test split {tuple(test_x.shape[1:])}); evaluate on the DataModule the "
                f"set was made from."
            )
        if int(synset.labels.max()) >= num_classes:
            raise ValueError(
                f"evaluate_synthetic: synthetic labels go up to {int(synset.labels.max())} but the DataModule has "
                f"num_classes={num_classes} (labels must be < num_classes)."
            )
        if synset.num_classes != num_classes:
            raise ValueError(
                f"evaluate_synthetic: the synthetic set has num_classes={synset.num_classes} but the DataModule has "
                f"{num_classes}."
            )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)

    template = net if net is not None else default_student(expected_shape, num_classes)
    use_priv = priv_weight > 0
    if use_priv:
        for synset in synsets:
            _check_privileged_shape(template, synset, feature_layer, priv_kind, priv_pool)

    vectorized = bool(vectorize) if vectorize is not None else device.type != "cpu"
    fallback_reason = None
    if vectorized and _has_batchnorm(template):
        vectorized, fallback_reason = False, "BatchNorm running statistics"
    impl = "vmap"
    if vectorize is not False and vectorize != "vmap" and _stackable_convnet(template):
        feature_ok = not use_priv or feature_layer == "encoder"
        impl = "stacked" if feature_ok else "vmap"
    if fallback_reason is not None:
        warnings.warn(
            f"evaluate_synthetic: the student has {fallback_reason}; training the students one after the other "
            f"(vectorize=False).",
            stacklevel=2,
        )

    # ---- seeds: per student, one for the initialisation and one for the data stream
    seeds = [
        pair
        for v in set_seeds
        for pair in torch.randint(0, 2**62, (num_students, 2), generator=torch.Generator().manual_seed(v)).tolist()
    ]
    distinct: dict[int, int] = {}  # a set given twice is stored once
    which = [distinct.setdefault(id(s), len(distinct)) for s in synsets for _ in range(num_students)]
    stored = list({id(s): s for s in synsets}.values())
    milestone = max(1, epochs // 2)
    rank_zero = _rank_zero()
    protocol = {  # the entries set to None are each set's own, filled in per result below
        "net": _describe(template),
        "num_students": num_students,
        "sets_trained_together": num_sets,
        "epochs": epochs,
        "lr": None,
        "lr_schedule": f"x0.1 from epoch {milestone} (0-based) on, momentum kept",
        "optimizer": "SGD",
        "momentum": momentum,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "dsa": dsa_.config() if dsa_ is not None else None,
        "cutmix": cutmix_.config() if cutmix_ is not None else None,
        "soft_labels": mode,
        "soft_loss": soft_loss if mode is not None else None,
        "temperature": temperature if mode is not None else None,
        "teacher": type(teacher).__name__ if teacher is not None else None,
        "privileged_weight": priv_weight,
        "privileged": {"kind": priv_kind, "pooling": priv_pool, "layer": feature_layer} if use_priv else None,
        "eval_every": eval_every,
        "seed": None,
        "device": str(device),
        "vectorized": vectorized,
        "vectorized_impl": impl if vectorized else None,
        "vectorize_fallback": fallback_reason,
        "dataset": type(datamodule).__name__,
        "test_images": int(test_x.shape[0]),
        "synthetic_images": None,
        "ipc": None,
        "method": None,
        "accuracy": "fraction of the real test split, final (and best over checkpoints with eval_every)",
        "std": "population (ddof=0)",
    }

    teacher_mode = teacher.training if teacher is not None else None
    if teacher is not None:
        teacher.to(device).eval()
    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices), torch.inference_mode(False), torch.enable_grad():
            torch.manual_seed(set_seeds[0])  # only dropout-like layers read the global RNG
            batches = _Batches(stored, which, device, mode, temperature, dsa_, cutmix_, use_priv, batch_size)
            trainer = _VectorizedTrainer if vectorized else _SequentialTrainer
            run = trainer(
                template=template, seeds=seeds, lrs=lrs, momentum=momentum, weight_decay=weight_decay,
                batches=batches, epochs=epochs, milestone=milestone, device=device, impl=impl,
                teacher=teacher, soft_loss=soft_loss if mode is not None else "hard", temperature=temperature,
                priv=(priv_weight, priv_kind, priv_pool, feature_layer) if use_priv else None,
                test=(test_x.to(device), test_y.to(device)), eval_every=eval_every,
                progress=progress and rank_zero,
            )
            history = run.run()
            students = run.students() if return_students else None
    finally:
        if teacher is not None:
            teacher.train(teacher_mode)

    seconds = time.perf_counter() - start_time
    results = []
    for i, synset in enumerate(synsets):
        part = slice(i * num_students, (i + 1) * num_students)
        set_history = [{"epoch": h["epoch"], "accuracies": h["accuracies"][part]} for h in history]
        final = set_history[-1]["accuracies"]
        mean, std = _mean_std(final)
        result = EvaluationResult(
            accuracies=final, mean=mean, std=std, lrs=set_lrs[i], seconds=seconds, history=set_history,
            protocol={
                **copy.deepcopy(protocol),
                "lr": set_lrs[i],
                "seed": set_seeds[i],
                "synthetic_images": len(synset),
                "ipc": synset.ipc,
                "method": synset.metadata.get("method"),
            },
            students=students[part] if students is not None else None,
        )
        if eval_every is not None:
            best = [max(h["accuracies"][s] for h in set_history) for s in range(num_students)]
            result.best_accuracies = best
            result.best_mean, result.best_std = _mean_std(best)
        results.append(result)
    return results


def _rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _describe(net: nn.Module) -> dict[str, Any]:
    get_config = getattr(net, "get_config", None)
    config = get_config() if callable(get_config) else {}
    return {"class": f"{type(net).__module__}.{type(net).__qualname__}", "config": config}


def _check_privileged_shape(template: nn.Module, synset: SyntheticSet, layer: str, kind: str, pooling: str) -> None:
    probe = copy.deepcopy(template).cpu().eval()
    tap = FeatureTap(probe, layer)
    tap.active = True
    with torch.no_grad():
        probe(synset.images[:1].cpu().float())
    feat = tap.take()
    if feat is None or feat.ndim != 4:
        raise ValueError(
            f"evaluate_synthetic: the student's `{layer}` output must be a feature map [B, C, h, w] for privileged "
            f"information, got {None if feat is None else tuple(feat.shape)}."
        )
    expected = pool_privileged(feat[:1], kind, pooling)[0].numel()
    got = synset.privileged[0].numel()
    if got != expected:
        want = tuple(feat.shape[1:]) if kind == "feature" else (feat.shape[1],)
        raise ValueError(
            f"evaluate_synthetic: privileged information of kind {kind!r} must have {expected} values per image "
            f"(the student's `{layer}` gives {want}), got {tuple(synset.privileged.shape[1:])}: evaluate with the "
            f"architecture the labels were learned with (pass net=...)."
        )



def _resolve_lrs(lr: float | tuple[float, ...] | str, num_students: int, synset: SyntheticSet) -> list[float]:
    """One lr per student from a protocol's (validated) ``lr``: a float, one per student, or ``"synset"``."""
    if lr == "synset":
        if synset.lr is None:
            raise ValueError("evaluate_synthetic: lr='synset' but the synthetic set has no learned lr (synset.lr is None).")
        return [float(synset.lr)] * num_students
    if isinstance(lr, tuple):
        if len(lr) != num_students:
            raise ValueError(
                f"evaluate_synthetic: `lr` has {len(lr)} values but num_students={num_students}; give one lr "
                f"per student (e.g. num_students=len(lr))."
            )
        return list(lr)
    return [float(lr)] * num_students

def _resolve_soft_mode(use_soft_labels: Any, teacher: Any, synset: SyntheticSet) -> str | None:
    if use_soft_labels is False or use_soft_labels is None:
        mode = None
    elif use_soft_labels is True or use_soft_labels == "S":
        mode = "S"
    elif use_soft_labels == "M":
        mode = "M"
    else:
        raise ValueError(
            f"evaluate_synthetic: `use_soft_labels` must be False, True / 'S' (stored soft labels) or 'M' (teacher "
            f"labels every augmented batch), got {use_soft_labels!r}."
        )
    if mode == "S" and synset.soft_labels is None:
        raise ValueError("evaluate_synthetic: use_soft_labels='S' but the synthetic set has no soft_labels.")
    if mode == "M" and teacher is None:
        raise ValueError("evaluate_synthetic: use_soft_labels='M' needs a `teacher` (an nn.Module giving logits).")
    if teacher is not None:
        if mode != "M":
            raise ValueError(
                f"evaluate_synthetic: a `teacher` was given but use_soft_labels={use_soft_labels!r}; pass "
                f"use_soft_labels='M' to label batches with it."
            )
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"evaluate_synthetic: `teacher` must be an nn.Module, got {type(teacher).__name__}.")
    return mode


def _resolve_privileged(privileged_weight: Any, synset: SyntheticSet) -> tuple[float, str, str]:
    meta = synset.metadata.get("privileged") or {}
    kind, pooling = meta.get("kind", "feature"), meta.get("pooling", "avg")
    if privileged_weight is None:
        weight = float(meta.get("weight", 0.0)) if synset.privileged is not None else 0.0
    else:
        weight = privileged_weight  # validated by StudentProtocol
    if weight > 0:
        if synset.privileged is None:
            raise ValueError(
                f"evaluate_synthetic: privileged_weight={weight} but the synthetic set has no privileged information."
            )
        check_choice(kind, "synset.metadata['privileged']['kind']", PRIVILEGED_KINDS, owner=_OWNER)
        check_choice(pooling, "synset.metadata['privileged']['pooling']", POOLINGS, owner=_OWNER)
    return weight, kind, pooling

