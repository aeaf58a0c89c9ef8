"""SDC, sample difficulty correction: a plug-in for every matching-based distillation method.

Paper: "Not All Samples Should Be Utilized Equally: Towards Understanding and Improving Dataset
Distillation" (Wang et al., arXiv 2408.12483, CVPR 2025 Synthetic Data workshop). No public code.

Findings the plug-in rests on (paper Sec. 3-4):

* the difficulty of a sample ``(x, y)`` under a trained network ``f_theta`` is the norm of its
  per-sample loss gradient ``d(x, y) = || grad_theta CE(f_theta(x), y) ||_2``;
* gradient matching (DC, DSA) drifts toward hard samples, trajectory matching (MTT, ...) toward
  easy ones; extending the data-pruning scaling law (Sorscher et al. 2022) to distillation, easy
  samples are worth more at a small budget (low IPC) and harder ones at a large budget.

**The exact published loss is not public; both modes here are reconstructions** (see the method
page ``shared/methods/sdc.md``):

* ``mode="synthetic"`` (the reading of the method page): add the mean difficulty of the synthetic
  set to the matching loss of any method, differentiated w.r.t. the synthetic images::

      L = L_match + lambda_sdc(t) * mean_{(x_s, y_s) in S} d(x_s, y_s)

  computed with ``torch.func`` per-sample gradients (``create_graph`` semantics: the penalty's
  gradient reaches the images through the per-sample gradient norms);
* ``mode="real"``: a cheaper reading that leaves the loss alone and biases the *real* batches
  toward easy samples: within each class, real image ``i`` is drawn with probability
  ``p_i ~ exp(-lambda_sdc(t) * z_i)``, ``z_i`` its difficulty standardised within the class.
  It can only act where a draw takes *part* of a class: with ``batch_real`` at least the class
  size every image is drawn at every iteration whatever the weights (a no-op: the plug-in raises a
  ``ValueError`` when this holds for every class and draw, and warns when it holds for some), and the
  bias weakens as ``batch_real`` nears the class size. It does not apply to trajectory matching,
  which draws no real images during distillation (the real data enters only through the expert
  trajectories, trained before): ``mode="real"`` raises there.

The default weight falls as IPC grows (the paper's scaling argument; the exact law is ours):
``lambda_sdc = 0.01 / ipc`` in synthetic mode and ``1 / ipc`` in real mode
(:meth:`SDC.default_weight`). ``schedule`` scales it over the run.

Difficulty is measured under *trained* networks: by default (``network="trained"``) the plug-in
trains ``num_nets`` networks of the method's architecture on the real data for ``train_epochs``
epochs when fit starts (seeded; the same on every rank) and draws one per iteration;
``network="method"`` uses the network the method drew for the iteration (gradient matching's
network in training, MTT's student at the expert's start epoch, DM's random network, NCFM's
feature network).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_eff.distill.base import DistillPlugin, DistillStep, train_reference_networks
from lightning_eff.utils.checks import check_choice, check_int, check_optional_int
from lightning_eff.utils.seeding import derive_seed

if TYPE_CHECKING:
    from lightning_eff.distill.base import DistillationModule

__all__ = ["SDC", "sample_difficulty"]

MODES = ("synthetic", "real")
SCHEDULES = ("constant", "linear_decay", "cosine_decay", "linear_warmup")
NETWORKS = ("trained", "method")


def sample_difficulty(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    create_graph: bool | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-sample difficulty ``|| grad_theta CE(f_theta(x_i), y_i) ||_2`` ``[N]`` (SDC, Sec. 3).

    The gradient is taken w.r.t. every parameter of ``model`` (whether or not it requires grad),
    one sample at a time with ``torch.func.vmap(torch.func.grad(...))``: no Python loop over
    samples. The model runs in eval mode (BatchNorm uses its running statistics: a per-sample
    gradient is not defined under batch statistics); its mode is restored afterwards.

    Args:
        model: a classifier ``[N, ...] -> [N, K]`` logits.
        images: ``[N, ...]`` inputs.
        labels: ``[N]`` class indices.
        create_graph: keep the graph so that the result is differentiable w.r.t. ``images``
            (``None``: when ``images.requires_grad``).
        chunk_size: samples per vectorised chunk (``None``: all at once).

    Example::

        >>> from lightning_eff.models import MLP
        >>> net = MLP(in_channels=1, image_size=2, num_classes=3, hidden_sizes=(8,))
        >>> sample_difficulty(net, torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])).shape
        torch.Size([5])
    """
    from torch.func import functional_call, grad, vmap

    if not isinstance(model, nn.Module):
        raise TypeError(f"sample_difficulty: model must be an nn.Module, got {type(model).__name__}")
    if images.shape[0] != labels.shape[0] or labels.ndim != 1:
        raise ValueError(
            f"sample_difficulty: images {tuple(images.shape)} and labels {tuple(labels.shape)} must be [N, ...] and [N]"
        )
    if create_graph is None:
        create_graph = images.requires_grad
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}
    if not params:
        raise ValueError(f"sample_difficulty: {type(model).__name__} has no parameters")

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        if logits.ndim != 2:
            raise ValueError(
                f"sample_difficulty: {type(model).__name__} must return logits [N, num_classes], got "
                f"{tuple(logits.shape)}"
            )
        return F.cross_entropy(logits, y.unsqueeze(0))

    def norms(x: Tensor, y: Tensor) -> Tensor:
        grads = vmap(grad(loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, x, y)
        return torch.sqrt(sum(g.flatten(1).square().sum(1) for g in grads.values()))

    was_training = model.training
    model.eval()
    try:
        if create_graph:
            return norms(images, labels)
        with torch.no_grad():
            return norms(images.detach(), labels)
    finally:
        model.train(was_training)


class SDC(DistillPlugin):
    """Sample difficulty correction as a :class:`~lightning_eff.distill.DistillPlugin` (see the module docstring).

    Works with :class:`~lightning_eff.distill.GradientMatching`, :class:`~lightning_eff.distill.TrajectoryMatching`,
    :class:`~lightning_eff.distill.DistributionMatching` and :class:`~lightning_eff.distill.NCFM`::

        model:
          class_path: GradientMatching
          init_args:
            plugins:
              - class_path: SDC
                init_args: {weight: 0.01, mode: synthetic}

    or ``--model.plugins+=SDC --model.plugins.weight=0.01`` on the command line.

    Args:
        weight: ``lambda_sdc`` (>= 0; ``None``: :meth:`default_weight` for the method's IPC).
        schedule: factor over the run (``t`` = iteration / ``trainer.max_steps``): ``"constant"``,
            ``"linear_decay"`` (1 - t), ``"cosine_decay"`` ((1 + cos(pi t)) / 2), ``"linear_warmup"`` (t).
        mode: ``"synthetic"`` (difficulty penalty on the synthetic images) or ``"real"`` (easy-biased
            real batches).
        network: ``"trained"`` (networks trained here on the real data) or ``"method"`` (the
            network of the iteration; synthetic mode only).
        num_nets, train_epochs, net_lr: the trained networks (plain SGD, batch 256, the experts' recipe;
            on a small set such as digits, 6 steps an epoch, use ~30 epochs at lr 0.1).
        batch_syn: synthetic images per penalty evaluation (``None``: the whole set).
        chunk_size: samples per vectorised per-sample-gradient chunk (memory bound).
        seed: seed of the trained networks and of the per-iteration draws.
    """

    def __init__(
        self,
        weight: float | None = None,
        schedule: str = "constant",
        mode: str = "synthetic",
        network: str = "trained",
        num_nets: int = 3,
        train_epochs: int = 10,
        net_lr: float = 0.05,
        batch_syn: int | None = None,
        chunk_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if weight is not None and (
            isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0
        ):
            raise ValueError(
                f"SDC: weight must be a number >= 0 (or None for the IPC default), got {weight!r}"
            )
        check_choice(schedule, "schedule", SCHEDULES, owner="SDC")
        check_choice(mode, "mode", MODES, owner="SDC")
        check_choice(network, "network", NETWORKS, owner="SDC")
        if mode == "real" and network == "method":
            raise ValueError(
                "SDC: mode='real' ranks the real images once, under trained networks: use network='trained'"
            )
        for name, value in (("num_nets", num_nets), ("train_epochs", train_epochs)):
            check_int(value, name, minimum=1, owner="SDC")
        for name, value in (("batch_syn", batch_syn), ("chunk_size", chunk_size)):
            check_optional_int(value, name, minimum=1, owner="SDC")
        if not net_lr > 0:
            raise ValueError(f"SDC: net_lr must be > 0, got {net_lr!r}")
        self.weight = None if weight is None else float(weight)
        self.schedule = schedule
        self.mode = mode
        self.network = network
        self.num_nets = num_nets
        self.train_epochs = train_epochs
        self.net_lr = float(net_lr)
        self.batch_syn = batch_syn
        self.chunk_size = chunk_size
        self.seed = int(seed)
        # kept out of the state dict: rebuilt (deterministically) when fit starts
        self.__dict__["_nets"] = None
        self._difficulty: list[Tensor] | None = None
        self._ipc: int | None = None
        self._max_steps: int = -1

    # ------------------------------------------------------------------ weight
    @staticmethod
    def default_weight(ipc: int, mode: str = "synthetic") -> float:
        """``lambda_sdc`` when none is given: falls as ``1 / ipc`` (easy samples matter most at low IPC).

        Example::

            >>> SDC.default_weight(1), SDC.default_weight(10), SDC.default_weight(10, "real")
            (0.01, 0.001, 0.1)
        """
        if mode not in MODES:
            raise ValueError(f"SDC.default_weight: mode must be one of {MODES}, got {mode!r}")
        return (0.01 if mode == "synthetic" else 1.0) / int(ipc)

    def base_weight(self) -> float:
        if self.weight is not None:
            return self.weight
        if self._ipc is None:
            raise RuntimeError("SDC: the default weight depends on the IPC; it is known once fit starts")
        return self.default_weight(self._ipc, self.mode)

    def weight_at(self, iteration: int) -> float:
        """``lambda_sdc(t)``: the base weight times the schedule factor at ``iteration``."""
        w = self.base_weight()
        if self.schedule == "constant" or w == 0:
            return w
        if self._max_steps <= 0:
            raise ValueError(f"SDC: schedule={self.schedule!r} needs trainer.max_steps > 0 (the run length)")
        t = min(max(iteration / self._max_steps, 0.0), 1.0)
        factor = {
            "linear_decay": 1.0 - t,
            "cosine_decay": 0.5 * (1.0 + math.cos(math.pi * t)),
            "linear_warmup": t,
        }[self.schedule]
        return w * factor

    # ------------------------------------------------------------------ hooks
    def setup(self, module: DistillationModule) -> None:
        self._ipc = module.ipc
        trainer = module._trainer
        self._max_steps = int(trainer.max_steps) if trainer is not None and trainer.max_steps else -1
        if self.schedule != "constant":
            self.weight_at(0)  # fails early without max_steps
        if self.base_weight() == 0:
            return
        if self.mode == "real":
            self.check_real_mode_applies(module)
        if self.network == "trained" and self._nets is None:
            datamodule = trainer.datamodule
            self.__dict__["_nets"] = train_reference_networks(
                datamodule,
                module.net_template,
                self.num_nets,
                self.train_epochs,
                self.net_lr,
                seed=derive_seed(self.seed, "sdc"),
                strategy=trainer.strategy,
            )
        if self.mode == "real" and self._difficulty is None:
            self._difficulty = [self.class_difficulty(images, c) for c, images in enumerate(module._real)]

    def check_real_mode_applies(self, module: DistillationModule) -> None:
        """Raise when ``mode="real"`` cannot change the run; warn when it cannot for some classes.

        Re-weighting the draw of real images matters only where a draw takes part of a class: a draw of
        ``batch_real >= `` the class size returns every image of the class (in another order, which no
        matching loss here depends on).
        """
        name = type(module).__name__
        sizes = module.real_batch_sizes()
        if not sizes:
            raise ValueError(
                f"SDC: mode='real' does not apply to {name}: it draws no real images during distillation "
                f"(trajectory matching sees the real data only through its expert trajectories, trained "
                f"before distillation), so biasing the draw of real images changes nothing. Use "
                f"mode='synthetic' (the difficulty penalty on the synthetic images)."
            )
        class_sizes = [int(images.shape[0]) for images in module._real]
        smallest, largest = min(class_sizes), max(class_sizes)
        if min(sizes) >= largest:
            raise ValueError(
                f"SDC: mode='real' cannot change anything: {name} draws batch_real={min(sizes)} real images per "
                f"class (all draws: {list(sizes)}), at least the size of every class ({smallest}-{largest} "
                f"images), so every real image is drawn at every iteration whatever the weights. Use a "
                f"batch_real below the class size (the bias grows as it falls, e.g. half of it) or "
                f"mode='synthetic'."
            )
        full = [b for b in sizes if b >= smallest]
        if full:
            from lightning.pytorch.utilities import rank_zero_warn

            covered = sum(size <= max(full) for size in class_sizes)
            rank_zero_warn(
                f"SDC: mode='real' leaves {covered} of {len(class_sizes)} classes unchanged for the draws of "
                f"batch_real={max(full)} (classes of {smallest}-{largest} images): those draws take every image "
                f"of such a class. The bias only acts on draws smaller than the class."
            )

    def class_difficulty(self, images: Tensor, c: int) -> Tensor:
        """Mean difficulty of ``images`` (all of class ``c``) over the trained networks, on the CPU."""
        labels = torch.full((images.shape[0],), c, dtype=torch.long)
        chunk = self.chunk_size or 256  # per-sample gradients of a whole class at once would not fit
        per_net = [
            sample_difficulty(net.cpu(), images, labels, create_graph=False, chunk_size=chunk)
            for net in self._nets
        ]
        return torch.stack(per_net).mean(0)

    def _network(self, module: DistillationModule, step: DistillStep, gen: torch.Generator) -> nn.Module:
        if self.network == "method":
            if step.net is None:
                raise RuntimeError(
                    f"SDC(network='method'): {type(module).__name__} exposes no network for the iteration; "
                    f"use network='trained'"
                )
            return step.net
        net = self._nets[int(torch.randint(len(self._nets), (1,), generator=gen))]
        if next(net.parameters()).device != module.device:
            net.to(module.device)
        return net

    def extra_loss(self, module: DistillationModule, step: DistillStep) -> Tensor | None:
        if self.mode != "synthetic":
            return None
        w = self.weight_at(step.iteration)
        if w == 0:
            return None  # nothing drawn, nothing added: the run is the method's own
        # own generator: the method's shared/local draws are the same with and without SDC
        gen = torch.Generator().manual_seed(derive_seed(self.seed, step.iteration, "sdc"))
        net = self._network(module, step, gen)
        images, labels = module.training_images()
        if self.batch_syn is not None and self.batch_syn < images.shape[0]:
            idx = torch.randperm(images.shape[0], generator=gen)[: self.batch_syn].to(images.device)
            images, labels = images[idx], labels[idx]
        difficulty = sample_difficulty(net, images, labels, create_graph=True, chunk_size=self.chunk_size)
        step.logs["sdc_difficulty"] = difficulty.mean().detach()
        step.logs["sdc_weight"] = w
        return w * difficulty.mean()

    def real_sample_weights(self, module: DistillationModule, c: int, images: Tensor) -> Tensor | None:
        if self.mode != "real" or self._difficulty is None:
            return None
        w = self.weight_at(int(module.iteration))
        if w == 0:
            return None
        d = self._difficulty[c]
        z = (d - d.mean()) / d.std().clamp_min(1e-12) if d.numel() > 1 else torch.zeros_like(d)
        return torch.softmax(-w * z, dim=0)

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, schedule={self.schedule!r}, mode={self.mode!r}, network={self.network!r}"
        )
