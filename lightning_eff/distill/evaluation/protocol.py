"""How a fresh student is trained on a reduced set: one frozen, typed, validated object.

:class:`StudentProtocol` holds the training settings of the evaluation protocol of dataset distillation
(Zhao et al., ICLR 2021, Sec. 4; DSA, ICML 2021; DM, WACV 2023; MTT, CVPR 2022 — the ``evaluate_synset`` of
VICO-UoE/DatasetCondensation) and of DD-Ranking's extensions (arXiv:2505.13300, Sec. 3: checkpoints every
``eval_every`` epochs, CutMix, soft labels with the SCE / KL losses at temperature ``T``). It is validated once,
at construction, so every consumer (:func:`~lightning_eff.distill.evaluate_synthetic`,
:func:`~lightning_eff.distill.evaluate_synthetic_sets`, :class:`~lightning_eff.distill.SyntheticEvalCallback`,
DD-Ranking) reads settings that are already known to be valid, and LightningCLI type-checks it in YAML::

    init_args:
      protocol: {epochs: 300, lr: 0.01, batch_size: 256, dsa: true}

What it does *not* hold is what depends on the run rather than on the protocol: the student network, the
number of students, the seed, the device, the mode-M teacher, the feature layer of privileged labels.

Augmentations are plain values YAML can hold; after construction ``dsa`` and ``cutmix`` are ``None`` or the
full keyword arguments of :class:`~lightning_eff.distill.DSA` / :class:`~lightning_eff.distill.CutMix`
(``build_dsa()`` / ``build_cutmix()`` make the objects), so the protocol is JSON-serialisable
(:meth:`StudentProtocol.to_dict`), comparable and hashable.

Example::

    >>> p = StudentProtocol(epochs=50, lr=[0.01, 0.05], dsa="crop_flip")
    >>> p.lr, p.dsa["strategy"], p.soft_label_mode
    ((0.01, 0.05), 'crop_flip', None)
    >>> p.replace(epochs=10).epochs
    10
    >>> StudentProtocol(momentum=1.0)
    Traceback (most recent call last):
    ...
    ValueError: StudentProtocol: `momentum` must be in [0.0, 1.0), got 1.0.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lightning_eff.distill.augment import DSA, CutMix
from lightning_eff.utils.checks import check_choice, check_float, check_int, check_optional_int

__all__ = ["StudentProtocol", "SOFT_LOSSES", "SOFT_LABEL_MODES"]

SOFT_LOSSES: tuple[str, ...] = ("sce", "kl")
SOFT_LABEL_MODES: tuple[str, ...] = ("S", "M")
_OWNER = "StudentProtocol"


@dataclass(frozen=True)
class StudentProtocol:
    """The training settings of the students of an evaluation (SGD, step decay at half of the epochs).

    Args:
        epochs: training epochs over the reduced set (``>= 1``); the lr is divided by 10 from epoch
            ``max(1, epochs // 2)`` on (momentum kept, DD-Ranking's ``StepLR``).
        lr: the SGD learning rate (``>= 0``; 0 keeps a student at its initialisation, a control); a list
            gives one lr per student (an lr grid trained together, its length must equal the number of
            students); ``"synset"`` uses the set's learned lr (trajectory matching's ``synset.lr``).
        momentum: SGD momentum, in ``[0, 1)``.
        weight_decay: SGD weight decay (L2 added to the gradient), ``>= 0``.
        batch_size: mini-batch size (``>= 1``; the last batch of an epoch may be smaller).
        dsa: DSA with per-sample parameters on every batch: ``None``/``False`` (none), ``True`` (the default
            :class:`~lightning_eff.distill.DSA`: strategy ``color_crop_cutout_flip_scale_rotate``), a strategy
            string (``"color_crop_cutout"``), a mapping of ``DSA`` keyword arguments, or a ``DSA``.
        cutmix: CutMix on every batch (after DSA): ``None``/``False``, ``True`` (``CutMix(beta=1.0)``), a
            mapping of ``CutMix`` keyword arguments (``{beta: 1.0, prob: 0.5}``) or a ``CutMix``.
        use_soft_labels: ``False`` (hard labels, cross-entropy), ``True``/``"S"`` (the set's stored
            ``soft_labels``) or ``"M"`` (a teacher labels every augmented batch).
        soft_loss: ``"sce"`` (soft cross-entropy) or ``"kl"`` (``T^2 KL``), for soft labels.
        temperature: softmax temperature ``T > 0`` of soft labels.
        privileged_weight: DRUPI's ``lambda`` (``>= 0``) for sets with privileged information; ``None`` uses
            the set's own (``synset.metadata["privileged"]["weight"]``).
        eval_every: also test every this many epochs (``>= 1``) and report the best checkpoint; ``None``:
            only the final one.
        vectorize: train the students together (``True``), one after the other (``False``), ``None``
            (together on an accelerator, the loop on the CPU) or ``"vmap"`` (together with
            ``torch.func.vmap`` for every network). It does not change what is computed (to float rounding).

    After construction ``lr`` is a ``float``, a tuple of floats or ``"synset"``; ``use_soft_labels`` is
    ``False``, ``"S"`` or ``"M"``; ``dsa``/``cutmix`` are ``None`` or complete keyword dicts.
    """

    epochs: int = 300
    lr: float | tuple[float, ...] | Literal["synset"] = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa: bool | str | dict[str, Any] | None = None
    cutmix: bool | dict[str, float] | None = None
    use_soft_labels: bool | Literal["S", "M"] = False
    soft_loss: Literal["sce", "kl"] = "sce"
    temperature: float = 1.0
    privileged_weight: float | None = None
    eval_every: int | None = None
    vectorize: bool | Literal["vmap"] | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("epochs", check_int(self.epochs, "epochs", minimum=1, owner=_OWNER))
        put("lr", _check_lr(self.lr))
        put("momentum", check_float(self.momentum, "momentum", low=0.0, high=1.0, high_open=True, owner=_OWNER))
        put("weight_decay", check_float(self.weight_decay, "weight_decay", low=0.0, owner=_OWNER))
        put("batch_size", check_int(self.batch_size, "batch_size", minimum=1, owner=_OWNER))
        put("dsa", _augmentation_config("dsa", self.dsa, DSA, "a strategy string, a mapping of DSA arguments"))
        put("cutmix", _augmentation_config("cutmix", self.cutmix, CutMix, "a mapping of CutMix arguments"))
        put("use_soft_labels", _soft_label_mode(self.use_soft_labels) or False)
        check_choice(self.soft_loss, "soft_loss", SOFT_LOSSES, owner=_OWNER)
        put("temperature", check_float(self.temperature, "temperature", low=0.0, low_open=True, owner=_OWNER))
        if self.privileged_weight is not None:
            put("privileged_weight", check_float(self.privileged_weight, "privileged_weight", low=0.0, owner=_OWNER))
        put("eval_every", check_optional_int(self.eval_every, "eval_every", minimum=1, owner=_OWNER))
        if not (self.vectorize is None or isinstance(self.vectorize, bool) or self.vectorize == "vmap"):
            raise ValueError(
                f"{_OWNER}: `vectorize` must be True, False, None (auto) or 'vmap', got {self.vectorize!r}."
            )

    # ------------------------------------------------------------------ derived values
    @property
    def soft_label_mode(self) -> str | None:
        """``None`` (hard labels), ``"S"`` (stored soft labels) or ``"M"`` (teacher labels)."""
        return self.use_soft_labels or None

    def build_dsa(self) -> DSA | None:
        """The :class:`~lightning_eff.distill.DSA` of the protocol (``None`` without DSA)."""
        return None if self.dsa is None else DSA(**self.dsa)

    def build_cutmix(self) -> CutMix | None:
        """The :class:`~lightning_eff.distill.CutMix` of the protocol (``None`` without CutMix)."""
        return None if self.cutmix is None else CutMix(**self.cutmix)

    def replace(self, **changes: Any) -> StudentProtocol:
        """A copy with ``changes`` (validated again), like :func:`dataclasses.replace`."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise TypeError(f"{_OWNER}: unknown field(s) {unknown}; the fields are {list(self.field_names())}.")
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The names of the protocol's settings, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable ``dict`` (``StudentProtocol(**d)`` builds the same protocol)."""
        out = dataclasses.asdict(self)
        if isinstance(out["lr"], tuple):
            out["lr"] = list(out["lr"])
        return out

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))


def _check_lr(lr: Any) -> float | tuple[float, ...] | str:
    if isinstance(lr, str):
        if lr != "synset":
            raise ValueError(f"{_OWNER}: `lr` must be a float, a sequence of floats or 'synset', got {lr!r}.")
        return lr
    if hasattr(lr, "tolist") and not isinstance(lr, (int, float)):  # a tensor / array of lrs
        lr = lr.tolist()
    if isinstance(lr, Sequence):
        if len(lr) == 0:
            raise ValueError(f"{_OWNER}: `lr` must not be an empty sequence (give one lr per student).")
        return tuple(check_float(v, "lr", low=0.0, owner=_OWNER) for v in lr)
    return check_float(lr, "lr", low=0.0, owner=_OWNER)


def _soft_label_mode(value: Any) -> str | None:
    if value is False or value is None:
        return None
    if value is True or value == "S":
        return "S"
    if value == "M":
        return "M"
    raise ValueError(
        f"{_OWNER}: `use_soft_labels` must be False, True / 'S' (stored soft labels) or 'M' (teacher labels "
        f"every augmented batch), got {value!r}."
    )


def _augmentation_config(name: str, value: Any, cls: type, forms: str) -> dict[str, Any] | None:
    """``None`` or the complete keyword arguments of ``cls`` (validated by building it once)."""
    if value is None or value is False:
        return None
    if value is True:
        return cls().config()
    if isinstance(value, cls):
        return value.config()
    if name == "dsa" and isinstance(value, str):
        return DSA(strategy=value).config()
    if isinstance(value, Mapping):
        try:
            return cls(**dict(value)).config()
        except TypeError as err:
            raise TypeError(f"{_OWNER}: `{name}` has an unknown {cls.__name__} argument: {err}") from None
    raise TypeError(
        f"{_OWNER}: `{name}` must be None, a bool, {forms} or a {cls.__name__}, got {value!r} ({type(value).__name__})."
    )
