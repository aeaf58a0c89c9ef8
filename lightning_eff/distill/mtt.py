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

Expert trajectory format (``*.pt``, written atomically; one file per expert)::

    {"format": "lightning-eff/expert-trajectory", "format_version": 1,
     "param_names": [str, ...], "param_shapes": [[int, ...], ...],
     "epochs": [Tensor[num_params] (float32), ...],   # theta*_0 (init), theta*_1, ... after each epoch
     "metadata": {"net": {"class_path", "init_args"} or None, "lr", "dataset", "seed", ...}}

Make them with :func:`train_experts` (Python), with the :class:`ExpertTrajectoryRecorder` callback
on any classification run (``configs/distill/experts_digits.yaml``), or let
:class:`TrajectoryMatching` train ``num_experts`` of them itself when ``expert_dir`` is not given.

Departures: the official code flattens the parameters into one vector inside a re-parametrised
module; we keep named tensors and ``functional_call`` (same arithmetic). Expert and start-epoch
draws come from a per-rank generator, so under DDP each rank matches a different trajectory and the
image gradients are averaged (the official code runs on one process).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.func import functional_call

from lightning_eff.distill.base import DistillationModule, DistillPlugin, DistillStep, reinitialized
from lightning_eff.utils.io import load_versioned, save_versioned

__all__ = [
    "TrajectoryMatching",
    "ExpertTrajectory",
    "ExpertTrajectoryRecorder",
    "train_experts",
    "load_experts",
    "normalized_parameter_distance",
]

TRAJECTORY_FORMAT = "lightning-eff/expert-trajectory"
TRAJECTORY_VERSION = 1


def _flat(params: list[Tensor]) -> Tensor:
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in params])


def _net_config(net: nn.Module) -> dict[str, Any] | None:
    get_config = getattr(net, "get_config", None)
    if callable(get_config):
        return {"class_path": f"{type(net).__module__}.{type(net).__qualname__}", "init_args": get_config()}
    return None


class ExpertTrajectory:
    """The recorded parameters of one expert, epoch by epoch (see the module docstring for the format)."""

    def __init__(
        self,
        param_names: list[str],
        param_shapes: list[list[int]],
        epochs: list[Tensor],
        metadata: dict[str, Any] | None = None,
    ) -> None:
        numel = sum(int(torch.Size(s).numel()) for s in param_shapes)
        if len(param_names) != len(param_shapes):
            raise ValueError("param_names and param_shapes must have the same length")
        if len(epochs) < 2:
            raise ValueError(f"a trajectory needs at least 2 recorded epochs, got {len(epochs)}")
        for i, e in enumerate(epochs):
            if e.ndim != 1 or e.numel() != numel:
                raise ValueError(f"epoch {i} of the trajectory has {e.numel()} values, expected {numel}")
        self.param_names = list(param_names)
        self.param_shapes = [list(s) for s in param_shapes]
        self.epochs = epochs
        self.metadata = dict(metadata or {})

    def __len__(self) -> int:
        return len(self.epochs)

    @classmethod
    def from_module_states(cls, net: nn.Module, states: list[list[Tensor]], **metadata: Any) -> ExpertTrajectory:
        names = [n for n, _ in net.named_parameters()]
        shapes = [list(p.shape) for _, p in net.named_parameters()]
        metadata.setdefault("net", _net_config(net))
        return cls(names, shapes, [_flat(s) for s in states], metadata)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        out, start = {}, 0
        for name, shape in zip(self.param_names, self.param_shapes):
            n = int(torch.Size(shape).numel())
            out[name] = flat[start : start + n].view(shape)
            start += n
        return out

    def check_compatible(self, net: nn.Module, where: str = "") -> None:
        names = [n for n, _ in net.named_parameters()]
        shapes = [list(p.shape) for _, p in net.named_parameters()]
        if names != self.param_names or shapes != self.param_shapes:
            raise ValueError(
                f"{where}the expert trajectory was recorded on a network with parameters "
                f"{list(zip(self.param_names, self.param_shapes))[:3]}..., which does not match the net "
                f"{type(net).__name__} ({list(zip(names, shapes))[:3]}...): use the same architecture"
            )

    def save(self, path: str | Path) -> Path:
        payload = {
            "param_names": self.param_names,
            "param_shapes": self.param_shapes,
            "epochs": self.epochs,
            "metadata": self.metadata,
        }
        return save_versioned(path, TRAJECTORY_FORMAT, TRAJECTORY_VERSION, payload)

    @classmethod
    def load(cls, path: str | Path) -> ExpertTrajectory:
        data = load_versioned(path, TRAJECTORY_FORMAT, TRAJECTORY_VERSION, "expert trajectory")
        return cls(data["param_names"], data["param_shapes"], list(data["epochs"]), data.get("metadata"))


def load_experts(directory: str | Path) -> list[ExpertTrajectory]:
    """Every ``*.pt`` expert trajectory in ``directory`` (sorted by name)."""
    directory = Path(directory)
    files = sorted(directory.glob("*.pt")) if directory.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"no expert trajectories (*.pt) in {directory}: make them with lightning_eff.distill.train_experts or "
            f"`lightning-eff fit --config configs/distill/experts_digits.yaml` (ExpertTrajectoryRecorder)"
        )
    return [ExpertTrajectory.load(f) for f in files]


def train_experts(
    datamodule,
    net: nn.Module,
    num_experts: int = 5,
    epochs: int = 20,
    lr: float = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    dsa: Any | None = None,
    seed: int = 0,
    save_dir: str | Path | None = None,
    progress: bool = False,
) -> list[ExpertTrajectory]:
    """Train ``num_experts`` networks on the real training split and record their trajectories.

    The official buffer defaults: SGD lr 0.01, no momentum, no weight decay, DSA on the real batches.
    Each expert gets its own initialisation and data order (``seed + i``).
    """
    from lightning_eff.distill.base import _seed_from

    if num_experts < 1 or epochs < 1:
        raise ValueError(f"num_experts and epochs must be >= 1, got {num_experts} and {epochs}")
    datamodule.setup("fit")
    images = torch.cat([datamodule.class_images(c) for c in range(datamodule.num_classes)])
    labels = torch.cat(
        [torch.full((len(datamodule.class_indices(c)),), c) for c in range(datamodule.num_classes)]
    )
    experts = []
    iterator = range(num_experts)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="experts")
    for i in iterator:
        gen = torch.Generator().manual_seed(_seed_from(seed, i, "expert"))
        model = reinitialized(net, _seed_from(seed, i, "expert-init"))
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        states = [[p.detach().clone() for p in model.parameters()]]
        for _ in range(epochs):
            order = torch.randperm(images.shape[0], generator=gen)
            for start in range(0, images.shape[0], batch_size):
                idx = order[start : start + batch_size]
                x = images[idx]
                if dsa is not None:
                    x = dsa(x, generator=gen)
                opt.zero_grad()
                F.cross_entropy(model(x), labels[idx]).backward()
                opt.step()
            states.append([p.detach().clone() for p in model.parameters()])
        traj = ExpertTrajectory.from_module_states(
            model, states, lr=lr, momentum=momentum, dataset=type(datamodule).__name__, seed=seed, index=i
        )
        if save_dir is not None:
            traj.save(Path(save_dir) / f"expert_{i:04d}.pt")
        experts.append(traj)
    return experts


class ExpertTrajectoryRecorder(L.Callback):
    """Records the trajectory of a classification run (e.g. ``ImageClassifier``) as an expert for MTT.

    The parameters of ``pl_module.<attribute>`` (default ``net``) are recorded at the start of
    training and after every epoch, and written to ``dirpath/expert_<NNNN>.pt`` (the next free
    index) when training ends, on rank 0. Train with plain SGD (lr 0.01, the official default) so the
    trajectory is what MTT's student imitates.
    """

    def __init__(self, dirpath: str, attribute: str = "net") -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self.attribute = attribute
        self._states: list[list[Tensor]] = []

    def _net(self, pl_module: L.LightningModule) -> nn.Module:
        net = getattr(pl_module, self.attribute, None)
        if not isinstance(net, nn.Module):
            raise ValueError(f"ExpertTrajectoryRecorder: {type(pl_module).__name__} has no module {self.attribute!r}")
        return net

    def _record(self, pl_module: L.LightningModule) -> None:
        self._states.append([p.detach().cpu().clone() for p in self._net(pl_module).parameters()])

    def on_train_start(self, trainer, pl_module) -> None:
        if not self._states:
            self._record(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._record(pl_module)

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        if len(self._states) < 2:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        index = len(list(self.dirpath.glob("expert_*.pt")))
        while (self.dirpath / f"expert_{index:04d}.pt").exists():
            index += 1
        ExpertTrajectory.from_module_states(self._net(pl_module), self._states, recorder=True).save(
            self.dirpath / f"expert_{index:04d}.pt"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"states": self._states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._states = list(state_dict.get("states", []))


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
        init: str = "real",
        image_optimizer: OptimizerCallable = _default_image_optimizer,
        dsa: Any | None = None,
        plugins: list[DistillPlugin] | None = None,
        clamp: bool = False,
        save_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(net, ipc, init, image_optimizer, dsa, plugins, clamp, save_dir, seed)
        for name, value, low in [
            ("num_experts", num_experts, 1),
            ("expert_train_epochs", expert_train_epochs, 1),
            ("syn_steps", syn_steps, 1),
            ("expert_epochs", expert_epochs, 1),
            ("max_start_epoch", max_start_epoch, 1),
        ]:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TrajectoryMatching: {name} must be an integer >= {low}, got {value!r}")
        if batch_syn is not None and (not isinstance(batch_syn, int) or batch_syn < 1):
            raise ValueError(f"TrajectoryMatching: batch_syn must be None or an integer >= 1, got {batch_syn!r}")
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
        self.save_hyperparameters(ignore=["net", "image_optimizer", "dsa", "plugins"])

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
