"""DM: distribution matching.

Paper: B. Zhao and H. Bilen, "Dataset Condensation with Distribution Matching", WACV 2023
(arXiv:2110.04181). Official code: VICO-UoE/DatasetCondensation, ``main_DM.py``.

Each iteration draws a randomly initialised network psi (never trained) and matches, per class c,
the mean embeddings of a real batch and of the synthetic images of c under the same siamese
augmentation A (eq. 5 of the paper)::

    L = sum_c || mean_{x in B_c} psi(A(x)) - mean_{s in S_c} psi(A(s)) ||^2

psi is the network's penultimate embedding (``net.features``). Defaults follow the official code:
SGD on the images with lr 1.0 and momentum 0.5, 256 real images per class, DSA on.

Departure: the official code seeds the siamese augmentation from the wall clock; we draw it from
the per-iteration generator shared by all ranks, so runs are reproducible and resume exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.distill.base import (
    DistillationModule,
    DistillStep,
)
from lightning_eff.utils.checks import check_int

__all__ = ["DistributionMatching", "mean_embedding_distance"]


def mean_embedding_distance(real: Tensor, syn: Tensor) -> Tensor:
    """``|| mean(real, 0) - mean(syn, 0) ||^2``, the per-class DM loss on embeddings ``[B, D]``.

    Example::

        >>> import torch
        >>> mean_embedding_distance(torch.tensor([[0.0, 2.0], [2.0, 0.0]]), torch.tensor([[1.0, 1.0]]))
        tensor(0.)
    """
    if real.ndim != 2 or syn.ndim != 2 or real.shape[1] != syn.shape[1]:
        raise ValueError(f"expected embeddings [B, D] with the same D, got {tuple(real.shape)} and {tuple(syn.shape)}")
    return (real.mean(0) - syn.mean(0)).pow(2).sum()


class DistributionMatching(DistillationModule):
    """Distribution matching (DM) on the distillation base.

    Args:
        net: network template with a ``features(x) -> [B, D]`` embedding (``ConvNet``, ``MLP``).
        ipc: synthetic images per class.
        batch_real: real images per class per iteration.
        (the rest as :class:`~lightning_eff.distill.DistillationModule`)

    Example::

        >>> from lightning_eff.models import ConvNet
        >>> dm = DistributionMatching(ConvNet(in_channels=1, num_classes=10, width=16, image_size=8), ipc=1)
        >>> dm.method_name
        'dm'
    """

    method_name = "dm"

    def __init__(
        self,
        net: nn.Module,
        ipc: int = 10,
        batch_real: int = 256,
        **common: Any,
    ) -> None:
        super().__init__(net, ipc, **common)
        check_int(batch_real, "batch_real", minimum=1, owner="DistributionMatching")
        if not callable(getattr(net, "features", None)):
            raise TypeError(
                f"DistributionMatching: net {type(net).__name__} needs a features(x) -> [B, D] embedding method"
            )
        self.batch_real = batch_real

    def matching_loss(self, step: DistillStep) -> Tensor:
        seed = int(torch.randint(0, 2**62, (1,), generator=step.shared))
        net = self.fresh_network(seed).train()
        net.requires_grad_(False)
        step.net = net
        loss = self.syn_images.new_zeros(())
        for c in range(self.num_classes):
            real, syn = self.augment(self.sample_real(c, self.batch_real, step.local), self.syn_class(c), generator=step.shared)
            with torch.no_grad():
                emb_real = net.features(real)
            loss = loss + mean_embedding_distance(emb_real, net.features(syn))
        return loss
