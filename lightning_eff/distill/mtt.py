"""Trajectory matching (MTT) and the expert trajectories it learns from.

Paper: G. Cazenavette, T. Wang, A. Torralba, A. A. Efros, J.-Y. Zhu, "Dataset Distillation by
Matching Training Trajectories", CVPR 2022 (arXiv:2203.11932). Official code:
GeorgeCazenavette/mtt-distillation (``buffer.py`` for experts, ``distill.py``).

Experts are networks trained on real data whose parameters are recorded after every epoch. Each
distillation iteration picks an expert and a start epoch t < ``max_start_epoch``, initialises a
student at theta*_t, unrolls ``syn_steps`` SGD steps on synthetic mini-batches with the learned
learning rate alpha (eq. 2), and matches the expert ``expert_epochs`` (M) epochs later with the
normalised squared distance (eq. 3)::

    L = || theta_{t+N} - theta*_{t+M} ||^2 / || theta*_t - theta*_{t+M} ||^2

The images (SGD, momentum 0.5) and alpha (SGD, ``lr_lr``, momentum 0.5) are updated by
differentiating through the unrolled steps (``torch.func.functional_call``).

The experts (their file format, :func:`train_experts`, :class:`ExpertTrajectoryRecorder`,
:func:`load_experts`) live in :mod:`lightning_eff.distill.reference` and are re-exported here. Make them
with :func:`train_experts` (Python), with the :class:`ExpertTrajectoryRecorder` callback on any
classification run (``configs/distill/experts_digits.yaml``), or let :class:`TrajectoryMatching` train
``num_experts`` of them itself when ``expert_dir`` is not given.

Departures: the official code flattens the parameters into one vector inside a re-parametrised
module; we keep named tensors and ``functional_call`` (same arithmetic). Expert and start-epoch
draws come from a per-rank generator, so under DDP each rank matches a different trajectory and the
image gradients are averaged (the official code runs on one process).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torch.func import functional_call

from lightning_eff.distill.base import DistillationModule, DistillStep
from lightning_eff.distill.reference import (
    TRAJECTORY_FORMAT,
    TRAJECTORY_VERSION,
    ExpertTrajectory,
    ExpertTrajectoryRecorder,
    load_experts,
    train_experts,
)
from lightning_eff.utils.checks import check_int, check_optional_int

__all__ = [
    "TrajectoryMatching",
    "ExpertTrajectory",
    "ExpertTrajectoryRecorder",
    "train_experts",
    "load_experts",
    "normalized_parameter_distance",
    "TRAJECTORY_FORMAT",
    "TRAJECTORY_VERSION",
]


def normalized_parameter_distance(student: list[Tensor], target: list[Tensor], start: list[Tensor]) -> Tensor:
    """MTT eq. 3: ``||student - target||^2 / ||start - target||^2`` over all parameters.

    Example::

        >>> import torch
        >>> normalized_parameter_distance([torch.tensor([1.0])], [torch.tensor([2.0])], [torch.tensor([0.0])])
        tensor(0.2500)
    """
    num = sum((s - t).pow(2).sum() for s, t in zip(student, target))
    den = sum((s - t).pow(2).sum() for s, t in zip(start, target))
    return num / den.clamp_min(1e-12)


def _default_image_optimizer(params):
    return torch.optim.SGD(params, lr=100.0, momentum=0.5)


class TrajectoryMatching(DistillationModule):
    """Matching training trajectories (MTT) on the distillation base.

    Args:
        net: the student architecture (the experts must share it).
        ipc: synthetic images per class.
        expert_dir: folder of expert trajectories (``*.pt``); ``None``: train ``num_experts`` here.
        num_experts, expert_train_epochs, expert_lr: experts trained in ``setup`` when no folder is given.
        syn_steps: N, student steps on synthetic data per iteration.
        expert_epochs: M, expert epochs to match.
        max_start_epoch: start epochs are drawn from ``[0, max_start_epoch)``.
        batch_syn: synthetic mini-batch per student step (``None``: the whole set).
        lr_init: initial synthetic learning rate alpha (default: the experts' lr).
        lr_lr: learning rate of alpha (SGD, momentum 0.5); ``learn_lr=False`` keeps alpha fixed.
        image_optimizer: default SGD lr 100, momentum 0.5 (the official code uses 100-10^4 by dataset).
        (the rest as :class:`~lightning_eff.distill.DistillationModule`)
    """

    method_name = "mtt"

    def __init__(
        self,
        net: nn.Module,
        ipc: int = 10,
        expert_dir: str | None = None,
        num_experts: int = 5,
        expert_train_epochs: int = 15,
        expert_lr: float = 0.01,
        syn_steps: int = 20,
        expert_epochs: int = 2,
        max_start_epoch: int = 10,
        batch_syn: int | None = None,
        lr_init: float | None = None,
        lr_lr: float = 1e-5,
        learn_lr: bool = True,
        image_optimizer: OptimizerCallable = _default_image_optimizer,
        **common: Any,
    ) -> None:
        super().__init__(net, ipc, image_optimizer=image_optimizer, **common)
        for name, value, low in [
            ("num_experts", num_experts, 1),
            ("expert_train_epochs", expert_train_epochs, 1),
            ("syn_steps", syn_steps, 1),
            ("expert_epochs", expert_epochs, 1),
            ("max_start_epoch", max_start_epoch, 1),
        ]:
            check_int(value, name, minimum=low, owner="TrajectoryMatching")
        check_optional_int(batch_syn, "batch_syn", minimum=1, owner="TrajectoryMatching")
        if not expert_lr > 0 or not lr_lr >= 0:
            raise ValueError(f"TrajectoryMatching: expert_lr must be > 0 and lr_lr >= 0, got {expert_lr}, {lr_lr}")
        if expert_dir is None and max_start_epoch - 1 + expert_epochs > expert_train_epochs:
            raise ValueError(
                f"TrajectoryMatching: the last start epoch (max_start_epoch - 1 = {max_start_epoch - 1}) + "
                f"expert_epochs ({expert_epochs}) must be <= expert_train_epochs ({expert_train_epochs})"
            )
        self.expert_dir = expert_dir
        self.num_experts = num_experts
        self.expert_train_epochs = expert_train_epochs
        self.expert_lr = float(expert_lr)
        self.syn_steps = syn_steps
        self.expert_epochs = expert_epochs
        self.max_start_epoch = max_start_epoch
        self.batch_syn = batch_syn
        self.lr_lr = float(lr_lr)
        self.learn_lr = learn_lr
        self.syn_lr = nn.Parameter(torch.tensor(float(lr_init if lr_init is not None else expert_lr)), requires_grad=learn_lr)
        self.__dict__["_student"] = copy.deepcopy(net)
        self._experts: list[ExpertTrajectory] | None = None

    def setup_method(self, datamodule) -> None:
        if self._experts is not None:
            return
        if self.expert_dir is not None:
            experts = load_experts(self.expert_dir)
        else:
            experts = None
            if self.trainer.is_global_zero:
                experts = train_experts(
                    datamodule,
                    self.net_template,
                    num_experts=self.num_experts,
                    epochs=self.expert_train_epochs,
                    lr=self.expert_lr,
                    dsa=self.dsa,
                    seed=self.seed,
                )
            experts = self.trainer.strategy.broadcast(experts)
        for e in experts:
            e.check_compatible(self.net_template, where="TrajectoryMatching: ")
            if len(e) < self.max_start_epoch + self.expert_epochs:
                raise ValueError(
                    f"TrajectoryMatching: an expert has {len(e) - 1} epochs but max_start_epoch + expert_epochs = "
                    f"{self.max_start_epoch + self.expert_epochs}"
                )
        self._experts = experts

    def extra_parameters(self) -> list[dict[str, Any]]:
        if not self.learn_lr:
            return []
        return [{"optimizer": torch.optim.SGD([self.syn_lr], lr=self.lr_lr, momentum=0.5)}]

    def learned_lr(self) -> float | None:
        lr = float(self.syn_lr.detach())
        return lr if lr > 0 else None

    def matching_loss(self, step: DistillStep) -> Tensor:
        gen = step.local
        expert = self._experts[int(torch.randint(len(self._experts), (1,), generator=gen))]
        start_epoch = int(torch.randint(self.max_start_epoch, (1,), generator=gen))
        start = expert.unflatten(expert.epochs[start_epoch].to(self.device))
        target = expert.unflatten(expert.epochs[start_epoch + self.expert_epochs].to(self.device))
        names = list(start)
        params = [start[n].clone().requires_grad_(True) for n in names]
        if len(self.plugins):  # plug-ins (e.g. SDC with network="method") see the student at the start epoch
            step.net = copy.deepcopy(self._student)
            with torch.no_grad():
                for name, p in step.net.named_parameters():
                    p.copy_(start[name])
        images, labels = self.syn_images, self.syn_labels
        n = images.shape[0]
        batch = n if self.batch_syn is None else min(self.batch_syn, n)
        order = torch.randperm(n, generator=gen)
        cursor = 0
        for _ in range(self.syn_steps):
            if cursor + batch > n:
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor : cursor + batch].to(self.device)
            cursor += batch
            x = images[idx]
            if self.dsa is not None:
                x = self.dsa(x, generator=gen)
            logits = functional_call(self._student, dict(zip(names, params)), (x,))
            ce = F.cross_entropy(logits, labels[idx])
            grads = torch.autograd.grad(ce, params, create_graph=True)
            params = [p - self.syn_lr * g for p, g in zip(params, grads)]
        step.logs["syn_lr"] = self.syn_lr.detach()
        step.logs["start_epoch"] = float(start_epoch)
        return normalized_parameter_distance(params, [target[k] for k in names], [start[k] for k in names])

    def on_fit_start(self) -> None:
        self._student.to(self.device)
