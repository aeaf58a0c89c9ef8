"""Reference networks: fresh and trained copies of a template, and the expert trajectories of MTT.

Everything here trains (or re-initialises) networks on the *real* data, for the distillation methods and
plug-ins that need them (issue 21 gave it one home; it used to live in ``base.py`` and ``mtt.py``, which
imported each other):

* :func:`reinitialized`: a seeded fresh copy of a network template (every method, the evaluation students);
* :func:`train_experts`: networks trained on the real training split, their parameters recorded after every
  epoch (:class:`ExpertTrajectory`, the "buffer" of MTT, G. Cazenavette et al., CVPR 2022, official
  ``buffer.py``); :class:`ExpertTrajectoryRecorder` records one from any classification run and
  :func:`load_experts` reads a folder of them;
* :func:`train_reference_networks`: the final networks of that recipe, frozen (SDC's difficulty, DRUPI's
  initial feature labels).

Expert trajectory format (``*.pt``, written atomically; one file per expert)::

    {"format": "lightning-eff/expert-trajectory", "format_version": 1,
     "param_names": [str, ...], "param_shapes": [[int, ...], ...],
     "epochs": [Tensor[num_params] (float32), ...],   # theta*_0 (init), theta*_1, ... after each epoch
     "metadata": {"net": {"class_path", "init_args"} or None, "lr", "dataset", "seed", ...}}

The old paths (``lightning_eff.distill.base.reinitialized``, ``lightning_eff.distill.mtt.train_experts``, ...)
still work.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from lightning_eff.utils.checks import check_int
from lightning_eff.utils.hparams import net_config
from lightning_eff.utils.io import load_versioned, save_versioned
from lightning_eff.utils.seeding import derive_seed

__all__ = [
    "reinitialized",
    "train_reference_networks",
    "ExpertTrajectory",
    "ExpertTrajectoryRecorder",
    "train_experts",
    "load_experts",
    "real_training_tensors",
    "TRAJECTORY_FORMAT",
    "TRAJECTORY_VERSION",
]

def reinitialized(template: nn.Module, seed: int, device: torch.device | str | None = None) -> nn.Module:
    """A deep copy of ``template`` with every ``reset_parameters`` re-run under ``seed``.

    The initialisation is drawn on the CPU, whatever device the template is on, with the global
    RNG left untouched (``torch.random.fork_rng``): drawing networks perturbs nothing else and the
    same seed gives the same network on every rank and device. The copy is moved to ``device``
    (default: it stays on the CPU).
    """
    net = copy.deepcopy(template).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in net.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    net.requires_grad_(True)
    return net.to(device) if device is not None else net


def train_reference_networks(
    datamodule, template: nn.Module, num_nets: int, epochs: int, lr: float = 0.01, seed: int = 0, strategy=None
) -> list[nn.Module]:
    """``num_nets`` copies of ``template`` trained ``epochs`` epochs on the real training split (frozen, CPU).

    The recipe of the expert trajectories (:func:`~lightning_eff.distill.train_experts`: SGD, seeded
    initialisation and data order). With a Lightning ``strategy`` rank 0 trains and broadcasts, so
    every rank holds the same networks. Plug-ins use them as "trained networks" (SDC's difficulty,
    DRUPI's initial feature labels).
    """
    states = None
    if strategy is None or strategy.is_global_zero:
        experts = train_experts(datamodule, template, num_experts=num_nets, epochs=epochs, lr=lr, seed=seed)
        states = [e.unflatten(e.epochs[-1]) for e in experts]
    if strategy is not None:
        states = strategy.broadcast(states)
    nets = []
    for state in states:
        net = copy.deepcopy(template)
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(state[name])
        nets.append(net.requires_grad_(False).eval())
    return nets


TRAJECTORY_FORMAT = "lightning-eff/expert-trajectory"
TRAJECTORY_VERSION = 1


def _flat(params: list[Tensor]) -> Tensor:
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in params])


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
        metadata.setdefault("net", net_config(net))
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


def real_training_tensors(datamodule) -> tuple[Tensor, Tensor]:
    """The real training split of a ``ClassificationDataModule`` as two tensors, sorted by class.

    Calls ``datamodule.setup("fit")``, then returns ``(images [N, C, H, W], labels [N])`` with class 0's images
    first (``class_images(c)`` in order), so that ``labels[i]`` is the class of ``images[i]``. Shared by
    :func:`train_experts` and :func:`~lightning_eff.distill.ncfm.pretrain_feature_networks`.
    """
    datamodule.setup("fit")
    images = torch.cat([datamodule.class_images(c) for c in range(datamodule.num_classes)])
    labels = torch.cat(
        [torch.full((len(datamodule.class_indices(c)),), c) for c in range(datamodule.num_classes)]
    )
    return images, labels


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
    check_int(num_experts, "num_experts", minimum=1, owner="train_experts")
    check_int(epochs, "epochs", minimum=1, owner="train_experts")
    images, labels = real_training_tensors(datamodule)
    experts = []
    iterator = range(num_experts)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="experts")
    for i in iterator:
        gen = torch.Generator().manual_seed(derive_seed(seed, i, "expert"))
        model = reinitialized(net, derive_seed(seed, i, "expert-init"))
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

