"""Gradient matching: DC, and DSA when the augmentation is on.

Papers: B. Zhao, K. R. Mopuri, H. Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021
(arXiv:2006.05929); B. Zhao and H. Bilen, "Dataset Condensation with Differentiable Siamese
Augmentation", ICML 2021 (arXiv:2102.08259). Official code: VICO-UoE/DatasetCondensation
(``main.py``, ``utils.py`` ``match_loss`` / ``distance_wb`` / ``get_loops``).

Outer loop (one training step here): per class c, the gradients of the cross-entropy w.r.t. the
network's weights on a real batch and on the synthetic images of c are matched with the layer-wise
distance of the DC paper (eq. 10, "ours")::

    d(A, B) = sum_layers sum_i (1 - <A_i, B_i> / (||A_i|| ||B_i|| + 1e-6))

where A_i, B_i are the rows of each layer's gradient viewed as ``(out, -1)``; 1-D parameters
(biases, norms) are ignored, as in the official ``distance_wb``. The synthetic images take one
optimizer step, then the network is trained on the (detached) synthetic set for ``inner_loop``
epochs (not after the last outer step). A fresh network is drawn every ``outer_loop`` steps.
``outer_loop``/``inner_loop`` default to the official ``get_loops(ipc)`` table (ipc 1: 1/1, 10:
10/50, 20: 20/25, 30: 30/20, 40: 40/15, 50: 50/10); other IPCs take the nearest entry.

Departures: the official code re-seeds the siamese augmentation from the wall clock and draws
inner-loop augmentation from the global RNG; we use per-iteration generators (reproducible, same
on every rank). The network and its optimizer state are part of the checkpoint, so a resumed run
continues the same outer loop.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lightning_eff.distill.base import DistillationModule, DistillStep
from lightning_eff.utils.checks import check_int

__all__ = ["GradientMatching", "gradient_distance", "get_loops", "DISTANCES"]

DISTANCES = ("ours", "mse", "cos")
_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def get_loops(ipc: int) -> tuple[int, int]:
    """``(outer_loop, inner_loop)`` of the official DC code for ``ipc`` (nearest entry otherwise)."""
    key = min(_LOOPS, key=lambda k: (abs(k - ipc), k))
    return _LOOPS[key]


def _default_image_optimizer(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.5)


def gradient_distance(syn: list[Tensor], real: list[Tensor], distance: str = "ours") -> Tensor:
    """Distance between two lists of per-parameter gradients (DC eq. 10 for ``"ours"``).

    Example::

        >>> import torch
        >>> g = [torch.randn(4, 3), torch.randn(4)]
        >>> float(gradient_distance(g, g)) < 1e-5      # identical gradients: distance 0
        True
        >>> round(float(gradient_distance([torch.eye(2)], [-torch.eye(2)])), 4)   # 2 opposite rows: 2 x 2
        4.0
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if len(syn) != len(real):
        raise ValueError(f"got {len(syn)} synthetic and {len(real)} real gradients")
    if distance == "ours":
        total = syn[0].new_zeros(())
        for gs, gr in zip(syn, real):
            if gs.ndim == 1:
                continue  # biases and norm parameters are ignored (official distance_wb)
            gs, gr = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
            cos = (gs * gr).sum(-1) / (gs.norm(dim=-1) * gr.norm(dim=-1) + 1e-6)
            total = total + (1 - cos).sum()
        return total
    gs = torch.cat([g.reshape(-1) for g in syn])
    gr = torch.cat([g.reshape(-1) for g in real])
    if distance == "mse":
        return (gs - gr).pow(2).sum()
    return 1 - (gs * gr).sum() / (gs.norm() * gr.norm() + 1e-6)


class GradientMatching(DistillationModule):
    """Gradient matching (DC; DSA with ``dsa=DSA()``) on the distillation base.

    Args:
        net: network template (the official ConvNet-3 with instance norm).
        ipc: synthetic images per class.
        batch_real: real images per class per outer step.
        outer_loop, inner_loop: loop counts (default: the official table for ``ipc``).
        net_lr: SGD learning rate of the network's inner training (official 0.01).
        batch_train: mini-batch size of the inner training on the synthetic set.
        distance: ``"ours"`` (DC, default), ``"mse"`` or ``"cos"``.
        image_optimizer: default SGD lr 0.1, momentum 0.5 (official).
        (the rest as :class:`~lightning_eff.distill.DistillationModule`)

    Example::

        >>> from lightning_eff.models import ConvNet
        >>> gm = GradientMatching(ConvNet(in_channels=1, num_classes=10, width=16, image_size=8), ipc=10)
        >>> gm.outer_loop, gm.inner_loop
        (10, 50)
    """

    method_name = "gm"

    def __init__(
        self,
        net: nn.Module,
        ipc: int = 10,
        batch_real: int = 256,
        outer_loop: int | None = None,
        inner_loop: int | None = None,
        net_lr: float = 0.01,
        batch_train: int = 256,
        distance: str = "ours",
        image_optimizer: OptimizerCallable = _default_image_optimizer,
        **common: Any,
    ) -> None:
        super().__init__(net, ipc, image_optimizer=image_optimizer, **common)
        default_outer, default_inner = get_loops(ipc)
        self.outer_loop = default_outer if outer_loop is None else outer_loop
        self.inner_loop = default_inner if inner_loop is None else inner_loop
        for name, value, low in [
            ("batch_real", batch_real, 1),
            ("outer_loop", self.outer_loop, 1),
            ("inner_loop", self.inner_loop, 0),
            ("batch_train", batch_train, 1),
        ]:
            check_int(value, name, minimum=low, owner="GradientMatching")
        if not net_lr > 0:
            raise ValueError(f"GradientMatching: net_lr must be > 0, got {net_lr!r}")
        if distance not in DISTANCES:
            raise ValueError(f"GradientMatching: distance must be one of {DISTANCES}, got {distance!r}")
        self.batch_real = batch_real
        self.net_lr = float(net_lr)
        self.batch_train = batch_train
        self.distance = distance
        self.__dict__["_net"] = None
        self._net_opt: torch.optim.Optimizer | None = None
        self._pending_net_state: dict[str, Any] | None = None

    # the network persists across training steps within one outer loop: it is checkpointed
    def _network(self, step: DistillStep) -> nn.Module:
        if self._pending_net_state is not None:
            self.__dict__["_net"] = self.fresh_network(0)
            self._net.load_state_dict(self._pending_net_state["net"])
            self._net_opt = torch.optim.SGD(self._net.parameters(), lr=self.net_lr)
            self._net_opt.load_state_dict(self._pending_net_state["optimizer"])
            self._pending_net_state = None
        if self._net is None or step.iteration % self.outer_loop == 0:
            seed = int(torch.randint(0, 2**62, (1,), generator=step.shared))
            self.__dict__["_net"] = self.fresh_network(seed).train()
            self._net_opt = torch.optim.SGD(self._net.parameters(), lr=self.net_lr)
        else:
            # the same draws from the shared generator whether or not a net is drawn
            torch.randint(0, 2**62, (1,), generator=step.shared)
        return self._net

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._net is not None:
            checkpoint["gm_network"] = {"net": self._net.state_dict(), "optimizer": self._net_opt.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.__dict__["_net"], self._net_opt = None, None
        self._pending_net_state = checkpoint.get("gm_network")

    def matching_loss(self, step: DistillStep) -> Tensor:
        net = self._network(step)
        step.net = net
        params = [p for p in net.parameters() if p.requires_grad]
        loss = self.syn_images.new_zeros(())
        for c in range(self.num_classes):
            real, syn = self.augment(self.sample_real(c, self.batch_real, step.local), self.syn_class(c), generator=step.shared)
            target_real = torch.full((real.shape[0],), c, device=self.device)
            target_syn = torch.full((syn.shape[0],), c, device=self.device)
            g_real = torch.autograd.grad(F.cross_entropy(net(real), target_real), params)
            g_real = [g.detach() for g in g_real]
            g_syn = torch.autograd.grad(F.cross_entropy(net(syn), target_syn), params, create_graph=True)
            loss = loss + gradient_distance(list(g_syn), g_real, self.distance)
        return loss

    def after_step(self, step: DistillStep) -> None:
        if (step.iteration + 1) % self.outer_loop == 0:
            return  # official: no inner training after the last outer step
        net, opt = self._net, self._net_opt
        images, labels = self.syn_images.detach(), self.syn_labels
        n = images.shape[0]
        with torch.enable_grad():
            for _ in range(self.inner_loop):
                order = torch.randperm(n, generator=step.shared).to(self.device)
                for start in range(0, n, self.batch_train):
                    idx = order[start : start + self.batch_train]
                    x = images[idx]
                    if self.dsa is not None:
                        x = self.dsa(x, generator=step.shared)
                    opt.zero_grad()
                    F.cross_entropy(net(x), labels[idx]).backward()
                    opt.step()
