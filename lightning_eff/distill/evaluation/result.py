"""What an evaluation returns: :class:`EvaluationResult` (accuracies are fractions in ``[0, 1]``)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

__all__ = ["EvaluationResult"]


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

