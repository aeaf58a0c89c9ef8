"""The evaluation protocol of dataset distillation: train fresh students on a reduced set, test on real data.

Protocol (Zhao et al., ICLR 2021, Sec. 4; DSA, ICML 2021; DM, WACV 2023; MTT, CVPR 2022 — the
``evaluate_synset`` of VICO-UoE/DatasetCondensation): fresh ConvNet-3 students are trained only on
the synthetic set with SGD (lr 0.01, momentum 0.9, weight decay 5e-4, batch 256), the learning
rate divided by 10 at half of the epochs, optionally with DSA augmentation (per-sample parameters),
and tested on the real test split; the mean and standard deviation over students are reported.

Extensions used by later methods, each opt-in:

* DD-Ranking (arXiv:2505.13300, Sec. 3): test every ``eval_every`` epochs and report the best
  checkpoint besides the final one; a learning-rate grid (one lr per student, trained together);
  CutMix; soft labels, mode S (stored ``soft_labels``) or mode M (a ``teacher`` labels every
  augmented batch), with the soft cross-entropy ``SCE = -sum softmax(t / T) log softmax(s / T)``
  or ``KL(softmax(t / T) || softmax(s / T)) T^2`` (batch mean).
* DRUPI (arXiv:2410.01611, eq. 3 / Sec. 3.3): ``L = CE(f(x), y) + lambda MSE(pool(E(x)), F)`` with
  the stored privileged information ``F``; ``E`` is the student's last conv block
  (``ConvNet.encoder``), ``pool`` the identity for feature labels and average/max pooling over
  space for attention labels.

Speed: on an accelerator the students train *together*. Their parameters are stacked
(``torch.func.stack_module_state``) and one step trains every student on its own batch (own data
order, own augmentation): for a plain ``ConvNet`` with :func:`stacked_convnet_forward` (students'
channels side by side: grouped convs, fused group norms, one ``baddbmm``), for any other network
with ``torch.func.vmap(functional_call)``. A hand-written SGD with a per-student learning-rate tensor
does what ``torch.optim.SGD`` does per student (``d = g + wd p``, ``b = mu b + d``, ``p -= lr b``, as
fused ``_foreach`` ops), which the tests check against the sequential loop (``vectorize=False``) to
2e-5. The random draws of a block of epochs are made ahead on the CPU and moved in a few packed
copies, so steps do not wait on the host. The gain is largest when one student leaves an accelerator
idle (small images, few images per class) and smallest when one student already keeps it busy; measured
speed-ups (``benchmarks/distill_eval.py``) are in the README section "DD-Ranking". On the CPU the step
is compute-bound and grouped convolutions are slower than plain ones, so the default there is the loop.
Networks with BatchNorm (running statistics) always use the loop, with a warning.

:func:`evaluate_synthetic_sets` trains the students of several sets of equal size in one call (one step for
all of them when vectorised); student ``j`` of set ``i`` is seeded from that set's seed alone, so each set
gets exactly the result of its own :func:`evaluate_synthetic` call. DD-Ranking trains all cells of a ranking
this way.

Departures from the official code (documented in :attr:`EvaluationResult.protocol`):

* exactly ``epochs`` epochs, lr x0.1 from epoch ``max(1, epochs // 2)`` on, momentum kept across
  the decay (DD-Ranking's ``StepLR``); the official DC code runs ``epochs + 1`` epochs and rebuilds
  the optimiser at epoch ``epochs // 2 + 1``, which also drops the momentum buffer;
* all randomness (initialisation, data order, augmentation, CutMix) comes from per-student seeded
  generators; the global RNG is left untouched;
* accuracies are fractions in ``[0, 1]``; the standard deviation is the population one
  (``ddof = 0``, like ``np.std`` in the official scripts).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_eff.distill.augment import DSA, CutMix, CutMixParams, DSAParams, apply_dsa
from lightning_eff.distill.synthetic import SyntheticSet

__all__ = [
    "EvaluationResult",
    "evaluate_synthetic",
    "evaluate_synthetic_sets",
    "SyntheticEvalCallback",
    "default_student",
    "soft_label_loss",
    "privileged_loss",
    "stacked_convnet_forward",
]

_SOFT_LOSSES = ("sce", "kl")
_PRIVILEGED_KINDS = ("feature", "attention")
_POOLINGS = ("avg", "max")
_EVAL_CHUNK = 512  # test images per forward pass


# ---------------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------------
@dataclass
class EvaluationResult:
    """What :func:`evaluate_synthetic` returns (accuracies are fractions in ``[0, 1]``).

    Attributes:
        accuracies: final test accuracy of each student.
        best_accuracies: per student, the best test accuracy over the checkpoints every
            ``eval_every`` epochs and the final one (``None`` without ``eval_every``).
        mean: mean of ``accuracies``.
        std: population standard deviation of ``accuracies``.
        best_mean: mean of ``best_accuracies`` (``None`` without ``eval_every``).
        best_std: population std of ``best_accuracies`` (``None`` without ``eval_every``).
        lrs: the learning rate of each student.
        history: ``[{"epoch": e, "accuracies": [...]}, ...]`` for every test checkpoint.
        protocol: every setting used (JSON-serialisable).
        seconds: wall time of the whole evaluation.
        students: the trained students (eval mode, on the evaluation device) when
            ``return_students=True``; not part of :meth:`to_dict`.
    """

    accuracies: list[float]
    mean: float
    std: float
    lrs: list[float]
    protocol: dict[str, Any]
    seconds: float
    best_accuracies: list[float] | None = None
    best_mean: float | None = None
    best_std: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    students: list[nn.Module] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` (JSON-serialisable; without the students)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "students"}

    def __str__(self) -> str:
        text = f"{100 * self.mean:.2f} +- {100 * self.std:.2f} % (final, {len(self.accuracies)} students)"
        if self.best_mean is not None:
            text += f", best {100 * self.best_mean:.2f} +- {100 * self.best_std:.2f} %"
        return text


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(values) > 1 else 0.0


# ---------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------
def soft_label_terms(logits: Tensor, target_probs: Tensor, kind: str = "sce", temperature: float = 1.0) -> Tensor:
    """Per-sample soft-label loss over any leading dims: ``[..., K]`` logits and probabilities -> ``[...]``."""
    log_q = F.log_softmax(logits / temperature, dim=-1)
    if kind == "sce":
        return -(target_probs * log_q).sum(-1)
    if kind == "kl":
        return (torch.xlogy(target_probs, target_probs) - target_probs * log_q).sum(-1) * (temperature * temperature)
    raise ValueError(f"soft_label_loss: `kind` must be one of {_SOFT_LOSSES}, got {kind!r}.")


def soft_label_loss(logits: Tensor, target_probs: Tensor, kind: str = "sce", temperature: float = 1.0) -> Tensor:
    """Soft-label loss between student logits ``[B, K]`` and target probabilities ``[B, K]``.

    ``"sce"``: ``mean_b -sum_k p_bk log softmax(s_b / T)_k`` (DD-Ranking's ``SoftCrossEntropyLoss``
    without loss scaling; with one-hot targets and ``T = 1`` it is the cross-entropy); ``"kl"``:
    ``T^2 * KL(p || softmax(s / T))`` averaged over the batch (``reduction="batchmean"``). The target
    probabilities are already tempered (``softmax(t / T)`` of teacher logits).

    Example::

        >>> s = torch.tensor([[2.0, 0.0, -1.0]])
        >>> y = torch.tensor([0])
        >>> bool(torch.isclose(soft_label_loss(s, F.one_hot(y, 3).float()), F.cross_entropy(s, y)))
        True
    """
    return soft_label_terms(logits, target_probs, kind, temperature).mean()


def pool_privileged(features: Tensor, kind: str = "feature", pooling: str = "avg") -> Tensor:
    """DRUPI's ``pool(E(x))``: ``features [..., C, h, w]`` as is (``"feature"``), or pooled over space to
    ``[..., C]`` (``"attention"``, ``pooling`` ``"avg"`` or ``"max"``)."""
    if kind == "feature":
        return features
    return features.mean(dim=(-2, -1)) if pooling == "avg" else features.amax(dim=(-2, -1))


def privileged_terms(features: Tensor, target: Tensor, kind: str = "feature", pooling: str = "avg") -> Tensor:
    """Per-sample DRUPI term over any leading dims: ``features [..., C, h, w]``, ``target [..., *F]`` -> ``[...]``."""
    pred = pool_privileged(features, kind, pooling)
    if kind == "feature":
        pred = pred.flatten(-3)
    return (pred - target.reshape(pred.shape)).square().mean(-1)


def privileged_loss(features: Tensor, target: Tensor, kind: str = "feature", pooling: str = "avg") -> Tensor:
    """DRUPI's ``MSE(pool(E(x)), F)``: ``features`` ``[B, C, h, w]``, ``target`` ``[B, ...]``.

    ``kind="feature"`` compares the flattened maps; ``"attention"`` pools ``E(x)`` over space
    (``pooling`` ``"avg"`` or ``"max"``) to ``[B, C]`` first.

    Example::

        >>> e = torch.ones(2, 3, 2, 2)
        >>> float(privileged_loss(e, torch.zeros(2, 3), kind="attention"))
        1.0
    """
    return privileged_terms(features, target, kind, pooling).mean()


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


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"evaluate_synthetic: `{name}` must be an int, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"evaluate_synthetic: `{name}` must be an int >= {minimum}, got {value!r}.")
    return value


def _check_float(name: str, value: Any, low: float, high: float = math.inf, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise TypeError(f"evaluate_synthetic: `{name}` must be a finite float, got {value!r}.")
    value = float(value)
    if value < low or value > high or (high_open and value == high):
        bracket = ")" if high_open else "]"
        raise ValueError(f"evaluate_synthetic: `{name}` must be in [{low}, {high}{bracket}, got {value!r}.")
    return value


def _resolve_lrs(lr: Any, num_students: int, synset: SyntheticSet) -> list[float]:
    if isinstance(lr, str):
        if lr != "synset":
            raise ValueError(f"evaluate_synthetic: `lr` must be a float, a sequence of floats or 'synset', got {lr!r}.")
        if synset.lr is None:
            raise ValueError("evaluate_synthetic: lr='synset' but the synthetic set has no learned lr (synset.lr is None).")
        return [float(synset.lr)] * num_students
    if isinstance(lr, (Sequence, Tensor)):
        values = [float(v) for v in (lr.tolist() if isinstance(lr, Tensor) else lr)]
        if len(values) != num_students:
            raise ValueError(
                f"evaluate_synthetic: `lr` has {len(values)} values but num_students={num_students}; give one lr "
                f"per student (e.g. num_students=len(lr))."
            )
        return [_check_float("lr", v, 0.0) for v in values]
    return [_check_float("lr", lr, 0.0)] * num_students


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
        weight = _check_float("privileged_weight", privileged_weight, 0.0)
    if weight > 0:
        if synset.privileged is None:
            raise ValueError(
                f"evaluate_synthetic: privileged_weight={weight} but the synthetic set has no privileged information."
            )
        if kind not in _PRIVILEGED_KINDS:
            raise ValueError(f"synset.metadata['privileged']['kind'] must be one of {_PRIVILEGED_KINDS}, got {kind!r}.")
        if pooling not in _POOLINGS:
            raise ValueError(f"synset.metadata['privileged']['pooling'] must be one of {_POOLINGS}, got {pooling!r}.")
    return weight, kind, pooling


def _resolve_dsa(dsa: Any) -> DSA | None:
    if dsa is None or dsa is False:
        return None
    if dsa is True:
        return DSA()
    if isinstance(dsa, str):
        return DSA(strategy=dsa)
    if isinstance(dsa, DSA):
        return dsa
    raise TypeError(f"evaluate_synthetic: `dsa` must be None, True, a strategy string or a DSA, got {dsa!r}.")


def _resolve_cutmix(cutmix: Any) -> CutMix | None:
    if cutmix is None or cutmix is False:
        return None
    if cutmix is True:
        return CutMix()
    if isinstance(cutmix, CutMix):
        return cutmix
    raise TypeError(f"evaluate_synthetic: `cutmix` must be None, True or a CutMix, got {cutmix!r}.")


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
_TEST_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _test_tensors(datamodule: Any) -> tuple[Tensor, Tensor]:
    """All test images and labels of ``datamodule`` (CPU), cached per DataModule and test set."""
    if not callable(getattr(datamodule, "test_dataloader", None)):
        raise TypeError(
            f"evaluate_synthetic: `datamodule` must be a LightningDataModule with a test split, got "
            f"{type(datamodule).__name__}."
        )
    try:
        loader = datamodule.test_dataloader()
    except RuntimeError:  # ClassificationDataModule before setup()
        datamodule.setup("test")
        loader = datamodule.test_dataloader()
    key = id(getattr(datamodule, "test_set", None) or loader.dataset)
    try:
        cached = _TEST_CACHE.get(datamodule)
    except TypeError:
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    xs, ys = [], []
    for batch in loader:
        xs.append(torch.as_tensor(batch[0]).float().cpu())
        ys.append(torch.as_tensor(batch[1]).long().cpu())
    if not xs:
        raise ValueError("evaluate_synthetic: the DataModule's test split is empty.")
    x, y = torch.cat(xs), torch.cat(ys)
    try:
        _TEST_CACHE[datamodule] = (key, x, y)
    except TypeError:
        pass
    return x, y


def _reinitialized(template: nn.Module, seed: int) -> nn.Module:
    """A student: :func:`~lightning_eff.distill.base.reinitialized` on the CPU, in training mode."""
    from lightning_eff.distill.base import reinitialized

    return reinitialized(template, seed).train()


def _has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


class _Batches:
    """The synthetic set on the device, the students' random streams, and their training batches.

    Student ``s`` draws everything from ``generators[s]`` in a fixed order: per epoch its data order,
    then per batch its DSA parameters and its CutMix draw. The draws of a block of epochs are made
    ahead on the CPU and moved to the device in a few packed copies, so the training steps never wait
    on the host; the vectorised and the sequential trainers read the same streams, hence train the
    same students.
    """

    _BLOCK_SAMPLES = 1 << 18  # per-sample draws made ahead at a time (all students together)

    def __init__(self, synsets, which, device, mode, temperature, dsa, cutmix, use_priv, batch_size):
        # the distinct sets stacked ``[G, n, ...]``; student ``s`` trains on set ``which[s]``
        self.images = torch.stack([s.images for s in synsets]).to(device).detach().clone()
        self.labels = torch.stack([s.labels for s in synsets]).to(device).detach().clone()
        self.which = torch.as_tensor(which, dtype=torch.long, device=device)
        self.device = device
        self.num_classes = synsets[0].num_classes
        self.mode, self.temperature = mode, temperature
        self.dsa, self.cutmix = dsa, cutmix
        self.batch_size = batch_size
        self.soft = None
        if mode == "S":
            self.soft = torch.stack([self._soft(s, device, temperature) for s in synsets])
        self.priv = torch.stack([s.privileged for s in synsets]).to(device).float().clone() if use_priv else None
        self.size = tuple(self.images.shape[-2:])

    @staticmethod
    def _soft(synset: SyntheticSet, device, temperature: float) -> Tensor:
        soft = synset.soft_labels.to(device).float()
        kind = synset.metadata.get("soft_label_kind", "logits")
        if kind in ("probabilities", "probs"):
            return soft if temperature == 1.0 else torch.softmax(soft.clamp_min(1e-30).log() / temperature, -1)
        if kind == "logits":
            return torch.softmax(soft / temperature, dim=-1)
        raise ValueError(f"synset.metadata['soft_label_kind'] must be 'logits' or 'probabilities', got {kind!r}.")

    def __len__(self) -> int:
        return self.images.shape[1]

    def epochs(self, num_epochs: int, generators: list[torch.Generator]):
        """Yield, for each epoch, the list of its batches ``(idx [S, b], dsa_params | None, cutmix_draws | None)``."""
        n, s = len(self), len(generators)
        per_block = max(1, self._BLOCK_SAMPLES // max(1, n * s))
        for first in range(0, num_epochs, per_block):
            yield from self._block(min(per_block, num_epochs - first), generators)

    def _block(self, num_epochs: int, generators: list[torch.Generator]):
        n, bs = len(self), self.batch_size
        perms, dsa_draws, cutmix_draws = [], [], []
        for _ in range(num_epochs):
            perms.append(torch.stack([torch.randperm(n, generator=g) for g in generators]))
            for start in range(0, n, bs):
                b = min(bs, n - start)
                for g in generators:  # per student: DSA then CutMix (independent generators)
                    if self.dsa is not None:
                        dsa_draws.append(self.dsa.sample(b, generator=g, image_size=self.size))
                    if self.cutmix is not None:
                        cutmix_draws.append(self.cutmix.sample(b, *self.size, generator=g))
        perms_dev = torch.stack(perms).to(self.device)
        dsa_dev = DSAParams.cat(dsa_draws).to(self.device) if dsa_draws else None
        cm_perm_dev = torch.cat([d.perm for d in cutmix_draws]).to(self.device) if cutmix_draws else None
        row, k = 0, 0
        s = len(generators)
        for e in range(num_epochs):
            batches = []
            for start in range(0, n, bs):
                b = min(bs, n - start)
                dsa_params = dsa_dev.index(slice(row, row + s * b)) if dsa_dev is not None else None
                draws = None
                if cm_perm_dev is not None:
                    draws = [
                        dataclasses.replace(cutmix_draws[k + i], perm=cm_perm_dev[row + i * b : row + (i + 1) * b])
                        for i in range(s)
                    ]
                    k += s
                batches.append((perms_dev[e, :, start : start + b], dsa_params, draws))
                row += s * b
            yield batches

    def make(
        self, idx: Tensor, dsa_params: DSAParams | None, draws: list[CutMixParams] | None, teacher,
        students: slice | list[int] = slice(None),
    ):
        """Batches for the students ``students`` (all by default), with indices ``idx`` ``[S, b]`` and their draws.

        Returns ``(x [S, b, C, H, W], target_probs [S, b, K], privileged [S, b, ...] | None)``.
        """
        s, b = idx.shape
        rows = (self.which[students][:, None], idx)  # each student's own set
        x = self.images[rows].flatten(0, 1)
        if dsa_params is not None:
            x = apply_dsa(x, dsa_params)
        if self.soft is not None:
            targets = self.soft[rows]
        else:
            targets = F.one_hot(self.labels[rows], self.num_classes).to(x.dtype)
        priv = self.priv[rows] if self.priv is not None else None
        if draws is not None:
            x = torch.cat([CutMix.apply(chunk, d) for chunk, d in zip(x.split(b), draws)])
            targets = torch.stack([CutMix.mix_targets(targets[i], d) for i, d in enumerate(draws)])
            if priv is not None:
                priv = torch.stack([CutMix.mix_targets(priv[i], d) for i, d in enumerate(draws)])
        if teacher is not None:
            with torch.no_grad():
                targets = torch.softmax(teacher(x).float() / self.temperature, dim=-1).view(s, b, -1)
        return x.view(s, b, *x.shape[1:]), targets, priv


class _FeatureTap:
    """Forward hook that keeps the output of one submodule (DRUPI's ``E(x)``)."""

    def __init__(self, net: nn.Module, layer: str | None, where: str = "evaluate_synthetic: privileged information "
                 "needs the student's feature layer `feature_layer`"):
        self.value: Tensor | None = None
        self.active = False
        self.handle = None
        if layer is not None:
            try:
                module = net.get_submodule(layer)
            except AttributeError:
                names = [n for n, _ in net.named_modules() if n][:12]
                raise ValueError(
                    f"{where}={layer!r}, but {type(net).__name__} has no such submodule (it has: {', '.join(names)}"
                    f"{', ...' if len(names) == 12 else ''})."
                ) from None
            self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.active:
            self.value = output

    def take(self) -> Tensor:
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


# ---------------------------------------------------------------------------------------------
# the protocol
# ---------------------------------------------------------------------------------------------
def evaluate_synthetic(
    synset: SyntheticSet,
    datamodule: Any,
    net: nn.Module | None = None,
    num_students: int = 5,
    epochs: int = 300,
    lr: float | Sequence[float] | str = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 256,
    dsa: DSA | bool | str | None = None,
    cutmix: CutMix | bool | None = None,
    use_soft_labels: bool | str = False,
    soft_loss: str = "sce",
    temperature: float = 1.0,
    teacher: nn.Module | None = None,
    privileged_weight: float | None = None,
    eval_every: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    vectorize: bool | str | None = None,
    progress: bool = False,
    feature_layer: str | None = None,
    return_students: bool = False,
) -> EvaluationResult:
    """Train ``num_students`` fresh networks on ``synset`` and test them on ``datamodule``'s test split.

    Args:
        synset: the reduced set (images in the DataModule's normalised space).
        datamodule: a ``ClassificationDataModule`` (or any DataModule with ``test_dataloader``);
            ``setup("test")`` is called if needed.
        net: student template (deep-copied and re-initialised per student with a seeded RNG); default
            :func:`default_student` (ConvNet, width 128, depth by image size).
        num_students: students (independent initialisations, data orders and augmentations).
        epochs: training epochs over the synthetic set.
        lr: learning rate, one per student (a sequence of ``num_students`` values: an lr grid trained
            together), or ``"synset"`` for the set's learned lr (trajectory matching).
        momentum: SGD momentum, in ``[0, 1)``.
        weight_decay: SGD weight decay (L2 added to the gradient), ``>= 0``.
        batch_size: mini-batch size (the last batch of an epoch may be smaller).
        dsa: DSA with per-sample parameters on every batch (``True``: the default :class:`DSA`; a
            strategy string; a :class:`DSA`); ``None`` for none.
        cutmix: CutMix on every batch (after DSA): ``True`` or a :class:`CutMix`.
        use_soft_labels: ``False`` (hard labels, cross-entropy), ``True``/``"S"`` (the set's stored
            ``soft_labels``; logits unless ``metadata["soft_label_kind"] == "probabilities"``) or
            ``"M"`` (``teacher`` logits on every augmented batch).
        soft_loss: ``"sce"`` or ``"kl"`` (see :func:`soft_label_loss`).
        temperature: softmax temperature of soft labels, ``> 0``.
        teacher: the mode-M teacher (set to eval mode and moved to ``device``; its mode is restored).
        privileged_weight: DRUPI's ``lambda``; ``None`` uses ``synset.metadata["privileged"]["weight"]``
            when the set has privileged information (else 0).
        eval_every: also test every this many epochs and report the best checkpoint.
        seed: seed of everything random (same seed, same result on the same device).
        device: where to train (default: CUDA if available, else CPU).
        vectorize: train the students together (``True``) or one after the other with
            ``torch.optim.SGD`` (``False``); ``None`` (default): together on an accelerator, one after the
            other on the CPU, where a compute-bound step gains nothing from batching and grouped
            convolutions are slower. Together means :func:`stacked_convnet_forward` for a plain
            ``ConvNet`` and ``torch.func.vmap(functional_call)`` for any other network (``"vmap"``
            forces the latter). Networks with BatchNorm always use the loop.
        progress: show a tqdm bar over epochs (rank 0 only).
        feature_layer: submodule whose output is ``E(x)`` for privileged information (``None``: the
            layer DRUPI stored in ``synset.metadata["privileged"]["layer"]``, else ``"encoder"``).
        return_students: keep the trained students in :attr:`EvaluationResult.students`.

    Returns:
        An :class:`EvaluationResult`.

    Example::

        >>> from lightning_eff.data import DigitsDataModule
        >>> from lightning_eff.models import ConvNet
        >>> dm = DigitsDataModule()
        >>> synset = SyntheticSet.random_subset(dm, ipc=2, seed=0)
        >>> res = evaluate_synthetic(synset, dm, net=ConvNet(1, 10, width=8, depth=2, image_size=8),
        ...                          num_students=2, epochs=2, device="cpu")
        >>> len(res.accuracies), 0.0 <= res.mean <= 1.0, res.protocol["epochs"]
        (2, True, 2)
    """
    if not isinstance(synset, SyntheticSet):
        raise TypeError(f"evaluate_synthetic: `synset` must be a SyntheticSet, got {type(synset).__name__}.")
    kwargs = {k: v for k, v in locals().items() if k != "synset"}
    return evaluate_synthetic_sets([synset], **kwargs)[0]


def evaluate_synthetic_sets(
    synsets: Sequence[SyntheticSet],
    datamodule: Any,
    net: nn.Module | None = None,
    num_students: int = 5,
    epochs: int = 300,
    lr: float | Sequence[float] | Sequence[Sequence[float]] | str = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 256,
    dsa: DSA | bool | str | None = None,
    cutmix: CutMix | bool | None = None,
    use_soft_labels: bool | str = False,
    soft_loss: str = "sce",
    temperature: float = 1.0,
    teacher: nn.Module | None = None,
    privileged_weight: float | None = None,
    eval_every: int | None = None,
    seed: int | Sequence[int] = 0,
    device: torch.device | str | None = None,
    vectorize: bool | str | None = None,
    progress: bool = False,
    feature_layer: str | None = None,
    return_students: bool = False,
) -> list[EvaluationResult]:
    """Several sets under one protocol, all their students trained together: one result per set.

    Student ``j`` of set ``i`` draws its initialisation and data stream from ``seed[i]`` exactly as
    :func:`evaluate_synthetic` (``seed=seed[i]``) would, so a set's result does not depend on the other
    sets of the call — ``evaluate_synthetic_sets([a, b], seed=[s, t])`` equals
    ``[evaluate_synthetic(a, seed=s), evaluate_synthetic(b, seed=t)]`` — while the sets share every
    step (one stacked step for all ``len(synsets) * num_students`` students when vectorised). This is
    how DD-Ranking trains the sets of a ranking and their random-real baselines in one call.

    Args:
        synsets: the sets; they must have the same number of images and image shape (a set may appear
            more than once, e.g. with different seeds), and agree on soft labels / privileged
            information as the options below need them.
        seed: one seed for every set (the same initialisations and data orders for each: common random
            numbers, a paired comparison) or one per set.
        lr: as in :func:`evaluate_synthetic`, applied to each set (``"synset"``: each set's own lr), or a
            sequence with one lr list per set.
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
    seeds_in = [seed] * num_sets if not isinstance(seed, Sequence) else list(seed)
    if len(seeds_in) != num_sets:
        raise ValueError(f"evaluate_synthetic: `seed` has {len(seeds_in)} values for {num_sets} sets; give one per set.")
    set_seeds = [_check_int("seed", v, -(2**63)) for v in seeds_in]
    lengths = sorted({len(s) for s in synsets})
    if len(lengths) > 1:
        raise ValueError(
            f"evaluate_synthetic: sets trained together must have the same number of images, got {lengths}; "
            f"evaluate them in separate calls."
        )
    synset = synsets[0]
    num_students = _check_int("num_students", num_students, 1)
    epochs = _check_int("epochs", epochs, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    momentum = _check_float("momentum", momentum, 0.0, 1.0, high_open=True)
    weight_decay = _check_float("weight_decay", weight_decay, 0.0)
    temperature = _check_float("temperature", temperature, 0.0)
    if temperature == 0.0:
        raise ValueError("evaluate_synthetic: `temperature` must be > 0, got 0.0.")
    if soft_loss not in _SOFT_LOSSES:
        raise ValueError(f"evaluate_synthetic: `soft_loss` must be one of {_SOFT_LOSSES}, got {soft_loss!r}.")
    if eval_every is not None:
        eval_every = _check_int("eval_every", eval_every, 1)
    if vectorize is not None and not isinstance(vectorize, bool) and vectorize != "vmap":
        raise ValueError(
            f"evaluate_synthetic: `vectorize` must be True, False, None (auto) or 'vmap', got {vectorize!r}."
        )
    if net is not None and not isinstance(net, nn.Module):
        raise TypeError(f"evaluate_synthetic: `net` must be an nn.Module or None, got {type(net).__name__}.")
    per_set_lrs = not isinstance(lr, (str, Tensor)) and isinstance(lr, Sequence) and any(
        isinstance(v, (Sequence, Tensor)) for v in lr
    )
    if per_set_lrs and len(lr) != num_sets:
        raise ValueError(f"evaluate_synthetic: `lr` has {len(lr)} per-set lists for {num_sets} sets.")
    set_lrs = [_resolve_lrs(lr[i] if per_set_lrs else lr, num_students, s) for i, s in enumerate(synsets)]
    modes = {_resolve_soft_mode(use_soft_labels, teacher, s) for s in synsets}
    privs = {(w, k, p) if w > 0 else (0.0, "feature", "avg")  # kind and pooling only matter with a weight
             for w, k, p in (_resolve_privileged(privileged_weight, s) for s in synsets)}
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
    dsa_, cutmix_ = _resolve_dsa(dsa), _resolve_cutmix(cutmix)

    # ---- data and shapes
    test_x, test_y = _test_tensors(datamodule)
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
    tap = _FeatureTap(probe, layer)
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


# ---------------------------------------------------------------------------------------------
# trainers
# ---------------------------------------------------------------------------------------------
class _Trainer:
    def __init__(
        self, template, seeds, lrs, momentum, weight_decay, batches, epochs, milestone, device,
        teacher, soft_loss, temperature, priv, test, eval_every, progress, impl,
    ):
        self.template, self.seeds, self.lrs = template, seeds, lrs
        self.momentum, self.weight_decay = momentum, weight_decay
        self.batches, self.epochs, self.milestone = batches, epochs, milestone
        self.device, self.teacher, self.soft_loss, self.temperature = device, teacher, soft_loss, temperature
        self.priv, self.test, self.eval_every, self.progress, self.impl = priv, test, eval_every, progress, impl
        self.num_students = len(lrs)
        self.generators = [torch.Generator().manual_seed(int(s[1])) for s in seeds]

    def losses(self, logits: Tensor, targets: Tensor, feats: Tensor | None, priv: Tensor | None) -> Tensor:
        """Per-student training loss ``[S]`` from ``[S, b, ...]`` outputs and targets (batch means)."""
        if self.soft_loss == "hard":  # cross-entropy with one-hot (or CutMix-mixed) targets
            terms = soft_label_terms(logits, targets, "sce", 1.0)
        else:
            terms = soft_label_terms(logits, targets, self.soft_loss, self.temperature)
        if self.priv is not None:
            weight, kind, pooling, _ = self.priv
            terms = terms + weight * privileged_terms(feats, priv, kind, pooling)
        return terms.mean(-1)

    def lr_factor(self, epoch: int) -> float:
        return 0.1 if epoch >= self.milestone else 1.0

    def checkpoint(self, epoch: int) -> bool:
        return self.eval_every is not None and (epoch + 1) % self.eval_every == 0

    def bar(self, total: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="evaluate_synthetic", disable=not self.progress, leave=False)


_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Sigmoid, nn.Identity, nn.AvgPool2d, nn.MaxPool2d)


def _stackable_convnet(net: nn.Module) -> bool:
    """Whether ``net`` is a plain :class:`~lightning_eff.models.ConvNet` the stacked forward can run."""
    from lightning_eff.models import ConvNet

    return type(net) is ConvNet and all(
        isinstance(m, (nn.Conv2d, nn.GroupNorm, *_ELEMENTWISE)) for m in net.encoder
    ) and all(m.groups == 1 for m in net.encoder if isinstance(m, nn.Conv2d))


def stacked_convnet_forward(net: nn.Module, params: dict[str, Tensor], x: Tensor, num_students: int):
    """All students of a ConvNet at once: ``x`` ``[S, b, C, H, W]`` (or ``[b, C, H, W]`` shared) -> logits, E(x).

    The students' channels sit side by side (``[b, S * C, H, W]``): each conv is one grouped conv
    (``groups = S``), instance/layer norm one fused ``group_norm`` with ``S x`` the groups, pooling and
    activations act per channel, and the classifier is one ``baddbmm``. This is what
    ``vmap(functional_call)`` computes, without its per-op batching rules (GroupNorm with batched
    affine parameters decomposes into several elementwise passes) and layout copies.

    Returns:
        ``(logits [S, b, K], features [S, b, C', h, w])``.
    """
    s = num_students
    if x.ndim == 4:  # shared input (the test split): every student sees the same images
        b = x.shape[0]
        h = x.repeat(1, s, 1, 1)
    else:
        b = x.shape[1]
        h = x.transpose(0, 1).reshape(b, s * x.shape[2], *x.shape[3:])
    for i, m in enumerate(net.encoder):
        if isinstance(m, nn.Conv2d):
            w = params[f"encoder.{i}.weight"]
            bias = params.get(f"encoder.{i}.bias")
            h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), None if bias is None else bias.reshape(-1), m.stride,
                         m.padding, m.dilation, groups=s)
        elif isinstance(m, nn.GroupNorm):
            w, bias = params.get(f"encoder.{i}.weight"), params.get(f"encoder.{i}.bias")
            h = F.group_norm(h, s * m.num_groups, None if w is None else w.reshape(-1),
                             None if bias is None else bias.reshape(-1), m.eps)
        else:
            h = m(h)
    feats = h.view(b, s, -1, *h.shape[-2:]).transpose(0, 1)
    flat = feats.reshape(s, b, -1)
    weight, bias = params["classifier.weight"], params["classifier.bias"]
    return torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2)), feats


class _VectorizedTrainer(_Trainer):
    """All students at once: stacked parameters, one batched step, per-student-lr SGD."""

    def run(self) -> list[dict[str, Any]]:
        from torch.func import functional_call, stack_module_state, vmap

        nets = [_reinitialized(self.template, int(s[0])).to(self.device) for s in self.seeds]
        params, buffers = stack_module_state(nets)
        params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        buffers = {k: v.detach() for k, v in buffers.items()}
        base = copy.deepcopy(nets[0]).to("meta")
        del nets
        stacked = self.impl == "stacked"
        if stacked:
            def forward(x: Tensor):
                return stacked_convnet_forward(base, params, x, self.num_students)
        else:
            tap = _FeatureTap(base, self.priv[3] if self.priv is not None else None)

            def student(p, b, x):
                tap.active = self.priv is not None
                logits = functional_call(base, (p, b), (x,))
                tap.active = False
                feats = tap.take()
                return (logits, feats) if feats is not None else (logits,)

            batched = vmap(student, in_dims=(0, 0, 0), randomness="different")
            shared = vmap(student, in_dims=(0, 0, None), randomness="different")

            def forward(x: Tensor):
                out = (shared if x.ndim == 4 else batched)(params, buffers, x)
                return out[0], (out[1] if len(out) > 1 else None)

        def test_accuracies() -> list[float]:
            base.eval()
            x_test, y_test = self.test
            correct = torch.zeros(self.num_students, dtype=torch.long, device=self.device)
            with torch.no_grad():
                for xb, yb in zip(x_test.split(_EVAL_CHUNK), y_test.split(_EVAL_CHUNK)):
                    correct += (forward(xb)[0].argmax(-1) == yb).sum(1)
            base.train()
            return (correct.double() / len(y_test)).tolist()

        self._state = (params, buffers)
        history = []
        plist = list(params.values())
        bufs: list[Tensor] | None = None
        with self.bar(self.epochs) as bar:
            for epoch, batches in enumerate(self.batches.epochs(self.epochs, self.generators)):
                # per-student lr broadcast to each parameter's shape, so the update is one fused foreach op
                lr = torch.tensor([v * self.lr_factor(epoch) for v in self.lrs], device=self.device)
                lr_full = [lr.view(-1, *([1] * (p.ndim - 1))).expand_as(p).contiguous() for p in plist]
                finite = torch.ones((), dtype=torch.bool, device=self.device)
                for idx, dsa_params, draws in batches:
                    x, targets, priv = self.batches.make(idx, dsa_params, draws, self.teacher)
                    logits, feats = forward(x)
                    losses = self.losses(logits, targets, feats, priv)
                    finite &= torch.isfinite(losses).all()
                    grads = torch.autograd.grad(losses.sum(), plist)
                    with torch.no_grad():  # torch.optim.SGD (dampening 0, no Nesterov), per-student lr
                        d = list(grads) if self.weight_decay == 0 else torch._foreach_add(grads, plist,
                                                                                          alpha=self.weight_decay)
                        if self.momentum != 0:
                            if bufs is None:
                                bufs = [t.clone() for t in d]
                            else:
                                torch._foreach_mul_(bufs, self.momentum)
                                torch._foreach_add_(bufs, d)
                            d = bufs
                        torch._foreach_addcmul_(plist, lr_full, d, value=-1.0)
                if not bool(finite):
                    raise FloatingPointError(f"evaluate_synthetic: non-finite training loss in epoch {epoch}.")
                if self.checkpoint(epoch):
                    history.append({"epoch": epoch + 1, "accuracies": test_accuracies()})
                bar.update(1)
        if not history or history[-1]["epoch"] != self.epochs:
            history.append({"epoch": self.epochs, "accuracies": test_accuracies()})
        return history

    def students(self) -> list[nn.Module]:
        params, buffers = self._state
        nets = []
        for s, seeds in enumerate(self.seeds):
            net = _reinitialized(self.template, int(seeds[0])).to(self.device)
            net.load_state_dict({k: v[s].detach() for k, v in {**params, **buffers}.items()})
            nets.append(net.eval())
        return nets


class _SequentialTrainer(_Trainer):
    """One student after the other with ``torch.optim.SGD`` (the reference; BatchNorm students)."""

    def students(self) -> list[nn.Module]:
        return list(self._nets)

    def run(self) -> list[dict[str, Any]]:
        self._nets: list[nn.Module] = []
        per_student: list[list[tuple[int, float]]] = []
        with self.bar(self.epochs * self.num_students) as bar:
            for s in range(self.num_students):
                net = _reinitialized(self.template, int(self.seeds[s][0])).to(self.device)
                tap = _FeatureTap(net, self.priv[3] if self.priv is not None else None)
                opt = torch.optim.SGD(
                    net.parameters(), lr=self.lrs[s], momentum=self.momentum, weight_decay=self.weight_decay
                )
                checkpoints = []
                for epoch, batches in enumerate(self.batches.epochs(self.epochs, [self.generators[s]])):
                    for group in opt.param_groups:
                        group["lr"] = self.lrs[s] * self.lr_factor(epoch)
                    finite = torch.ones((), dtype=torch.bool, device=self.device)
                    for idx, dsa_params, draws in batches:
                        x, targets, priv = self.batches.make(idx, dsa_params, draws, self.teacher, [s])
                        tap.active = self.priv is not None
                        logits = net(x[0])
                        tap.active = False
                        feats = tap.take()
                        loss = self.losses(logits[None], targets, None if feats is None else feats[None], priv)[0]
                        finite &= torch.isfinite(loss.detach())
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                    if not bool(finite):
                        raise FloatingPointError(
                            f"evaluate_synthetic: non-finite training loss (student {s}, epoch {epoch})."
                        )
                    if self.checkpoint(epoch):
                        checkpoints.append((epoch + 1, self._accuracy(net)))
                    bar.update(1)
                if not checkpoints or checkpoints[-1][0] != self.epochs:
                    checkpoints.append((self.epochs, self._accuracy(net)))
                per_student.append(checkpoints)
                tap.remove()
                self._nets.append(net.eval())
        return [
            {"epoch": per_student[0][i][0], "accuracies": [p[i][1] for p in per_student]}
            for i in range(len(per_student[0]))
        ]

    def _accuracy(self, net: nn.Module) -> float:
        x_test, y_test = self.test
        net.eval()
        correct = 0
        with torch.no_grad():
            for xb, yb in zip(x_test.split(_EVAL_CHUNK), y_test.split(_EVAL_CHUNK)):
                correct += int((net(xb).argmax(-1) == yb).sum())
        net.train()
        return correct / len(y_test)


# ---------------------------------------------------------------------------------------------
# the callback
# ---------------------------------------------------------------------------------------------
_CALLBACK_RESERVED = ("synset", "datamodule", "num_students", "epochs", "progress")


class SyntheticEvalCallback(Callback):
    """Evaluate the synthetic set of a distillation module every ``every_n_steps`` and at the end of fit.

    The module must provide ``synthetic_set()`` (the current :class:`SyntheticSet`, detached), as
    :class:`~lightning_eff.distill.DistillationModule` does. Rank 0 runs :func:`evaluate_synthetic`
    against ``trainer.datamodule`` (or ``datamodule``) on the module's device; the result is
    broadcast so every rank logs the same ``distill/eval_acc`` and ``distill/eval_acc_std`` (through
    ``pl_module.log`` during training; directly to the loggers at the end of fit, where
    ``self.log`` is not allowed). Every result is kept in :attr:`history`.

    Args:
        every_n_steps: evaluate when ``trainer.global_step`` crosses a multiple of this (``>= 1``).
        num_students: students per evaluation.
        epochs: training epochs per student.
        on_fit_end: also evaluate at the end of fit (unless the last step was just evaluated).
        datamodule: the DataModule to test on (default: ``trainer.datamodule``).
        **eval_kwargs: any other argument of :func:`evaluate_synthetic` (``lr``, ``dsa``, ``net``, ...).

    Example::

        >>> cb = SyntheticEvalCallback(every_n_steps=100, num_students=2, epochs=50, dsa=True)
        >>> cb.every_n_steps, cb.eval_kwargs["dsa"]
        (100, True)
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_students: int = 3,
        epochs: int = 100,
        on_fit_end: bool = True,
        datamodule: Any = None,
        **eval_kwargs: Any,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for arg, value in (("every_n_steps", every_n_steps), ("num_students", num_students), ("epochs", epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: `{arg}` must be an int >= 1, got {value!r}.")
        if not isinstance(on_fit_end, bool):
            raise TypeError(f"{name}: `on_fit_end` must be a bool, got {on_fit_end!r}.")
        allowed = set(inspect.signature(evaluate_synthetic).parameters) - set(_CALLBACK_RESERVED)
        unknown = sorted(set(eval_kwargs) - allowed)
        if unknown:
            raise TypeError(f"{name}: unknown evaluate_synthetic argument(s) {unknown}; allowed: {sorted(allowed)}.")
        self.every_n_steps = every_n_steps
        self.num_students = num_students
        self.epochs = epochs
        self.evaluate_on_fit_end = on_fit_end
        self.datamodule = datamodule
        self.eval_kwargs = eval_kwargs
        self.history: list[dict[str, Any]] = []
        self._last_step = -1

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
        self.history = list(state_dict.get("history", []))

    def _evaluate(self, trainer, pl_module) -> tuple[float, float]:
        synset_fn = getattr(pl_module, "synthetic_set", None)
        if not callable(synset_fn):
            raise TypeError(
                f"{type(self).__name__} needs a module with a synthetic_set() method (a DistillationModule), got "
                f"{type(pl_module).__name__}."
            )
        synset = synset_fn()  # on every rank: the module may gather inside
        payload = None
        if trainer.is_global_zero:
            dm = self.datamodule if self.datamodule is not None else getattr(trainer, "datamodule", None)
            if dm is None:
                raise ValueError(
                    f"{type(self).__name__}: no DataModule to test on: fit with a datamodule or pass datamodule=."
                )
            kwargs = {"device": pl_module.device, **self.eval_kwargs}
            res = evaluate_synthetic(synset, dm, num_students=self.num_students, epochs=self.epochs, **kwargs)
            payload = {"step": int(trainer.global_step), "mean": res.mean, "std": res.std,
                       "accuracies": res.accuracies, "seconds": res.seconds}
        payload = trainer.strategy.broadcast(payload, src=0)
        self.history.append(payload)
        self._last_step = int(trainer.global_step)
        return payload["mean"], payload["std"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        if step <= 0 or step // self.every_n_steps <= max(self._last_step, 0) // self.every_n_steps:
            return
        mean, std = self._evaluate(trainer, pl_module)
        pl_module.log("distill/eval_acc", mean, on_step=True, on_epoch=False, prog_bar=True)
        pl_module.log("distill/eval_acc_std", std, on_step=True, on_epoch=False)

    def on_train_end(self, trainer, pl_module) -> None:
        # the end of fit, but before the strategy moves the module to the CPU (as it does before on_fit_end)
        if not self.evaluate_on_fit_end or int(trainer.global_step) == self._last_step:
            return
        mean, std = self._evaluate(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics({"distill/eval_acc": mean, "distill/eval_acc_std": std}, step=int(trainer.global_step))
