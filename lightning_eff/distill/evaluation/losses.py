"""Soft-label losses of the evaluation protocol (DD-Ranking, arXiv:2505.13300, Sec. 3).

``SCE = -sum_k softmax(t / T)_k log softmax(s / T)_k`` and ``KL(softmax(t / T) || softmax(s / T)) T^2``
(batch means); the targets are given already tempered. DRUPI's privileged-label term lives in
:mod:`lightning_eff.models.privileged` (it is also used to train ordinary classifiers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_eff.distill.evaluation.protocol import SOFT_LOSSES

__all__ = ["soft_label_terms", "soft_label_loss"]

_SOFT_LOSSES = SOFT_LOSSES


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

