"""DD-Ranking's scores as ``torchmetrics.Metric`` classes: one ``update`` per evaluation run, mean and std.

The functional half is :mod:`lightning_eff.ranking.functional`. Like ``ddranking`` 0.2.0, the score of a
run is computed from that run's accuracies and the reported value is the mean (and the population
standard deviation, ``np.std``) of the per-run scores, not the score of the mean accuracies. Under DDP the
per-run values are concatenated across ranks (``dist_reduce_fx="cat"``), so each rank may update with
its own runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_eff.ranking import functional as F
from lightning_eff.utils.checks import check_float

__all__ = ["LabelRobustScore", "AugmentationRobustScore"]


def _flat(x: Any) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(x, dtype=torch.float64)
    return t.detach().to(torch.float64).flatten()


def _mean_std(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.mean(), (
        x.std(unbiased=False) if x.numel() > 1 else torch.zeros((), dtype=x.dtype, device=x.device)
    )


class _RunScores(Metric):
    """Per-run score lists (``_STATES``, concatenated across ranks), a weight in ``[0, 1]`` and the
    ``percent`` switch; ``_summary`` turns named per-run tensors into ``{"mean", "std", "runs"}``."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    _STATES: tuple[str, str] = ("", "")

    def __init__(self, weight: float = 0.5, percent: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.weight = check_float(weight, "weight", low=0.0, high=1.0, owner=type(self).__name__)
        if not isinstance(percent, bool):
            raise TypeError(f"{type(self).__name__}: `percent` must be a bool, got {percent!r}.")
        self.percent = percent
        for name in self._STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    @staticmethod
    def _summary(**values: Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, runs in values.items():
            mean, std = _mean_std(runs)
            out[name] = {"mean": mean, "std": std, "runs": runs}
        return out


class LabelRobustScore(_RunScores):
    """Hard label recovery, improvement over random and the label-robust score over evaluation runs.

    ``update(acc_full, acc_syn_hard, acc_syn, acc_random)`` takes the accuracies of one or more runs
    (numbers or 1-D tensors, broadcast); ``compute()`` returns ``{"hlr", "ior", "lrs"}`` each with
    ``"mean"`` and ``"std"`` (0-d float64 tensors) and ``"runs"`` (the per-run values).

    Args:
        weight: weight of IOR in ``alpha = w IOR - (1 - w) HLR``, in ``[0, 1]``.
        percent: accuracies in percent, scored as ``ddranking`` 0.2.0 does (see the functional module).
        **kwargs: ``torchmetrics.Metric`` options (``sync_on_compute``, ...).

    Example::

        >>> m = LabelRobustScore()
        >>> m.update(0.80, 0.455, 0.62, 0.55)
        >>> m.update(0.80, 0.4725, 0.605, 0.5725)
        >>> out = m.compute()
        >>> round(float(out["hlr"]["mean"]), 3), round(float(out["lrs"]["mean"]), 3)
        (0.336, 0.212)
    """

    _STATES = ("hlr", "ior")

    def update(  # type: ignore[override]
        self, acc_full: Any, acc_syn_hard: Any, acc_syn: Any, acc_random: Any
    ) -> None:
        full, syn_hard, syn, rdm = torch.broadcast_tensors(
            *(_flat(v) for v in (acc_full, acc_syn_hard, acc_syn, acc_random))
        )
        self.hlr.append(F.hard_label_recovery(full, syn_hard, percent=self.percent))
        self.ior.append(F.improvement_over_random(syn, rdm, percent=self.percent))

    def compute(self) -> dict[str, Any]:  # type: ignore[override]
        hlr, ior = dim_zero_cat(self.hlr), dim_zero_cat(self.ior)
        lrs = F.label_robust_score(hlr, ior, self.weight, percent=self.percent)
        return self._summary(hlr=hlr, ior=ior, lrs=lrs)


class AugmentationRobustScore(_RunScores):
    """The augmentation-robust score (and its two differences) over evaluation runs.

    ``update(acc_syn_aug, acc_rdm_aug, acc_syn_noaug, acc_rdm_noaug)`` per run (numbers or 1-D tensors);
    ``compute()`` returns ``{"with_aug", "without_aug", "ars"}`` each with ``"mean"``, ``"std"``, ``"runs"``.

    Args:
        weight: weight ``g`` of the with-augmentation difference, in ``[0, 1]``.
        percent: accuracies in percent, scored as ``ddranking`` 0.2.0 does.
        **kwargs: ``torchmetrics.Metric`` options.

    Example::

        >>> m = AugmentationRobustScore()
        >>> m.update(torch.tensor([0.62, 0.605]), torch.tensor([0.55, 0.5725]), 0.50, 0.46)
        >>> round(float(m.compute()["ars"]["mean"]), 4)
        0.2888
    """

    _STATES = ("with_aug", "without_aug")

    def update(  # type: ignore[override]
        self, acc_syn_aug: Any, acc_rdm_aug: Any, acc_syn_noaug: Any, acc_rdm_noaug: Any
    ) -> None:
        sa, ra, sn, rn = torch.broadcast_tensors(
            *(_flat(v) for v in (acc_syn_aug, acc_rdm_aug, acc_syn_noaug, acc_rdm_noaug))
        )
        # the same checks as the functional form (ranges, percent)
        F.augmentation_robust_score(sa, ra, sn, rn, self.weight, percent=self.percent)
        self.with_aug.append(sa - ra)
        self.without_aug.append(sn - rn)

    def compute(self) -> dict[str, Any]:  # type: ignore[override]
        wa, na = dim_zero_cat(self.with_aug), dim_zero_cat(self.without_aug)
        ars = F.normalized_score(self.weight * wa + (1.0 - self.weight) * na)
        return self._summary(with_aug=wa, without_aug=na, ars=ars)
