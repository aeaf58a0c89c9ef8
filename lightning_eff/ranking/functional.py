"""DD-Ranking's scores as plain functions of accuracies.

Paper: Z. Li et al., "DD-Ranking: Rethinking the Evaluation of Dataset Distillation", arXiv:2505.13300
(Sec. 3). Official code: NUS-HPC-AI-Lab/DD-Ranking, PyPI ``ddranking`` 0.2.0 (``ddranking/metrics/
soft_label.py``, ``hard_label.py``, ``aug_robust.py``). With accuracies ``Acc`` as fractions in ``[0, 1]``:

* hard label recovery ``HLR = Acc(full real data, hard labels) - Acc(synthetic, hard labels)`` (lower is
  better);
* improvement over random ``IOR = Acc(synthetic, setting) - Acc(random real subset of equal IPC, same
  setting)`` (higher is better);
* label-robust score ``alpha = w IOR - (1 - w) HLR``, ``LRS = (e^alpha - e^-1) / (e - e^-1)``, ``w = 0.5``;
* augmentation-robust score ``beta = g (Acc_syn,aug - Acc_rdm,aug) + (1 - g) (Acc_syn,naug - Acc_rdm,naug)``,
  ``ARS = (e^beta - e^-1) / (e - e^-1)``, ``g = 0.5``.

``alpha`` and ``beta`` lie in ``[-1, 1]`` for fractions, so the normalisation maps them onto ``[0, 1]``.

Departure from the official code (on purpose): ``ddranking`` 0.2.0 plugs accuracies in *percent* into
``exp`` (``validate`` returns top-1 in percent), so its LRS / ARS leave ``[0, 1]`` (MTT on CIFAR-10 IPC 10,
HLR 23.73 / IOR 30.90, gives 15.18; a weak set gives ``-e^-1 / (e - e^-1) = -0.1565``). Here accuracies are
fractions by default; ``percent=True`` takes percentages and reproduces the package's numbers, for
comparison with its leaderboard.

Every function accepts Python numbers or tensors (broadcast together); it returns a ``float`` when all
inputs are numbers and a floating tensor otherwise.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Union

import torch
from torch import Tensor

from lightning_eff.utils.checks import check_float

__all__ = [
    "hard_label_recovery",
    "improvement_over_random",
    "label_robust_score",
    "augmentation_robust_score",
    "normalized_score",
]

Number = Union[float, int, Tensor]

_E = math.e
_INV_E = math.exp(-1.0)


def _check(name: str, value: Number, bound: float, fn: str, kind: str, percent: bool) -> Number:
    """Type- and range-check one input; ``bound`` is the largest magnitude (``kind`` says which interval)."""
    low = 0.0 if kind == "accuracy" else -bound
    unit = "percentages" if percent else "fractions"
    hint = "" if percent else " (pass percent=True for accuracies in percent)"
    if isinstance(value, Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{fn}: `{name}` must be a real tensor, got dtype {value.dtype}.")
        value = value if value.is_floating_point() else value.to(torch.get_default_dtype())
        bad = ~torch.isfinite(value) | (value < low) | (value > bound)
        if bool(bad.any()):
            first = float(value.detach().flatten()[bad.flatten()][0])
            raise ValueError(f"{fn}: `{name}` must hold {unit} in [{low:g}, {bound:g}]{hint}, got {first!r}.")
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"{fn}: `{name}` must be a float or a tensor, got {value!r} ({type(value).__name__})."
        )
    value = float(value)
    if not (math.isfinite(value) and low <= value <= bound):
        raise ValueError(
            f"{fn}: `{name}` must be a {unit[:-1]} in [{low:g}, {bound:g}]{hint}, got {value!r}."
        )
    return value


def _exp(x: Number) -> Number:
    return torch.exp(x) if isinstance(x, Tensor) else math.exp(x)


def normalized_score(x: Number) -> Number:
    """``(e^x - e^-1) / (e - e^-1)``: maps ``x in [-1, 1]`` onto ``[0, 1]`` (monotone, ``0 -> 0.2689``).

    Example::

        >>> normalized_score(-1.0), normalized_score(1.0)
        (0.0, 1.0)
        >>> round(normalized_score(0.0), 4)
        0.2689
    """
    return (_exp(x) - _INV_E) / (_E - _INV_E)


def hard_label_recovery(acc_full: Number, acc_syn: Number, *, percent: bool = False) -> Number:
    """``HLR = Acc_full - Acc_syn``, both trained with hard labels (lower is better).

    Args:
        acc_full: accuracy of a student trained on the full real training set.
        acc_syn: accuracy of a student trained on the synthetic set with its hard labels.
        percent: accuracies (and the result) in percent instead of fractions.

    Example::

        >>> round(hard_label_recovery(0.85, 0.60), 4)
        0.25
        >>> hard_label_recovery(torch.tensor([0.8, 0.8]), torch.tensor([0.5, 0.6]))
        tensor([0.3000, 0.2000])
    """
    bound = 100.0 if percent else 1.0
    fn = "hard_label_recovery"
    return _check("acc_full", acc_full, bound, fn, "accuracy", percent) - _check(
        "acc_syn", acc_syn, bound, fn, "accuracy", percent
    )


def improvement_over_random(acc_syn: Number, acc_random: Number, *, percent: bool = False) -> Number:
    """``IOR = Acc_syn - Acc_random`` under the same evaluation setting (higher is better).

    Args:
        acc_syn: accuracy of a student trained on the synthetic set (any labels / augmentation).
        acc_random: accuracy of a student trained on a random real subset of the same IPC, same setting.
        percent: accuracies (and the result) in percent instead of fractions.

    Example::

        >>> round(improvement_over_random(0.62, 0.55), 4)
        0.07
    """
    bound = 100.0 if percent else 1.0
    fn = "improvement_over_random"
    return _check("acc_syn", acc_syn, bound, fn, "accuracy", percent) - _check(
        "acc_random", acc_random, bound, fn, "accuracy", percent
    )


def label_robust_score(hlr: Number, ior: Number, weight: float = 0.5, *, percent: bool = False) -> Number:
    """``LRS = normalized_score(w IOR - (1 - w) HLR)``, in ``[0, 1]`` for fractions (higher is better).

    Args:
        hlr: hard label recovery, in ``[-1, 1]`` (``[-100, 100]`` with ``percent``).
        ior: improvement over random, same range.
        weight: ``w``, the weight of IOR, in ``[0, 1]``.
        percent: ``hlr`` / ``ior`` are in percent and go into ``exp`` as such, which is what ``ddranking``
            0.2.0 computes (the score then leaves ``[0, 1]``).

    Example::

        >>> round(label_robust_score(0.2373, 0.3090), 4)  # MTT, CIFAR-10 IPC 10 (leaderboard pair)
        0.2845
        >>> round(label_robust_score(23.73, 30.90, percent=True), 2)  # what ddranking 0.2.0 reports
        15.18
    """
    fn = "label_robust_score"
    bound = 100.0 if percent else 1.0
    w = check_float(weight, "weight", low=0.0, high=1.0, owner=fn)
    hlr = _check("hlr", hlr, bound, fn, "difference", percent)
    ior = _check("ior", ior, bound, fn, "difference", percent)
    return normalized_score(w * ior - (1.0 - w) * hlr)


def augmentation_robust_score(
    acc_syn_aug: Number,
    acc_rdm_aug: Number,
    acc_syn_noaug: Number,
    acc_rdm_noaug: Number,
    weight: float = 0.5,
    *,
    percent: bool = False,
) -> Number:
    """``ARS = normalized_score(g (syn_aug - rdm_aug) + (1 - g) (syn_noaug - rdm_noaug))``.

    Args:
        acc_syn_aug: synthetic set, evaluated with augmentation.
        acc_rdm_aug: random real subset of equal IPC, with augmentation.
        acc_syn_noaug: synthetic set, without augmentation.
        acc_rdm_noaug: random real subset, without augmentation.
        weight: ``g``, the weight of the with-augmentation difference, in ``[0, 1]``.
        percent: accuracies in percent, plugged into ``exp`` as ``ddranking`` 0.2.0 does.

    Example::

        >>> round(augmentation_robust_score(0.62, 0.55, 0.50, 0.46), 4)
        0.293
        >>> augmentation_robust_score(0.3, 0.3, 0.3, 0.3) == normalized_score(0.0)
        True
    """
    fn = "augmentation_robust_score"
    bound = 100.0 if percent else 1.0
    g = check_float(weight, "weight", low=0.0, high=1.0, owner=fn)
    sa = _check("acc_syn_aug", acc_syn_aug, bound, fn, "accuracy", percent)
    ra = _check("acc_rdm_aug", acc_rdm_aug, bound, fn, "accuracy", percent)
    sn = _check("acc_syn_noaug", acc_syn_noaug, bound, fn, "accuracy", percent)
    rn = _check("acc_rdm_noaug", acc_rdm_noaug, bound, fn, "accuracy", percent)
    return normalized_score(g * (sa - ra) + (1.0 - g) * (sn - rn))
