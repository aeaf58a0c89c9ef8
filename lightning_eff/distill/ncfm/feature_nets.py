"""NCFM's feature networks: K nets pretrained on the real data, with their initial and trained weights.

Official ``pretrain_script.py`` (recipe) and ``update_feature_extractor`` (the interpolation); the file is
written atomically with a format version (:mod:`lightning_eff.utils.io`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_eff.distill.reference import real_training_tensors, reinitialized
from lightning_eff.utils.checks import check_float, check_int
from lightning_eff.utils.hparams import net_config
from lightning_eff.utils.io import load_versioned, save_versioned
from lightning_eff.utils.seeding import derive_seed

__all__ = [
    "FeatureNetworks",
    "FeatureNetPretraining",
    "pretrain_feature_networks",
    "FEATURE_NETS_FORMAT",
    "FEATURE_NETS_VERSION",
]

FEATURE_NETS_FORMAT = "lightning-eff/ncfm-feature-networks"
FEATURE_NETS_VERSION = 1


class FeatureNetworks:
    """The initial and trained weights of K feature networks (stacked per state-dict entry).

    ``init[name]`` and ``trained[name]`` are ``[K, *shape]`` tensors over the floating-point entries
    of the networks' state dicts (parameters and float buffers). :meth:`interpolated` gives
    ``lambda init_k + (1 - lambda) trained_k`` (the official ``update_feature_extractor``).

    File format (``*.pt``, written atomically)::

        {"format": "lightning-eff/ncfm-feature-networks", "format_version": 1,
         "names": [str, ...], "init": {name: Tensor[K, ...]}, "trained": {name: Tensor[K, ...]},
         "metadata": {"net": {"class_path", "init_args"} or None, "epochs", "test_acc": [...], ...}}

    Example::

        >>> net = nn.Linear(2, 1)
        >>> fn = FeatureNetworks.from_states([net.state_dict()], [{k: v + 1 for k, v in net.state_dict().items()}])
        >>> len(fn), bool(torch.allclose(fn.interpolated(0, 0.5)["bias"], net.bias + 0.5))
        (1, True)
    """

    def __init__(
        self, names: list[str], init: dict[str, Tensor], trained: dict[str, Tensor], metadata: dict[str, Any] | None = None
    ) -> None:
        if not names:
            raise ValueError("FeatureNetworks: no state entries")
        if set(init) != set(names) or set(trained) != set(names):
            raise ValueError("FeatureNetworks: init and trained must hold exactly the entries in `names`")
        k = init[names[0]].shape[0]
        for name in names:
            if init[name].shape != trained[name].shape or init[name].shape[0] != k:
                raise ValueError(
                    f"FeatureNetworks: entry {name!r} has init {tuple(init[name].shape)} and trained "
                    f"{tuple(trained[name].shape)}; both must be [K={k}, ...]"
                )
        self.names = list(names)
        self.init = init
        self.trained = trained
        self.metadata = dict(metadata or {})

    def __len__(self) -> int:
        return int(self.init[self.names[0]].shape[0])

    @classmethod
    def from_states(
        cls, init_states: list[dict[str, Tensor]], trained_states: list[dict[str, Tensor]], **metadata: Any
    ) -> FeatureNetworks:
        if len(init_states) != len(trained_states) or not init_states:
            raise ValueError("FeatureNetworks.from_states: need as many (>= 1) initial as trained states")
        names = [n for n, v in init_states[0].items() if v.is_floating_point()]
        init = {n: torch.stack([s[n].detach().cpu() for s in init_states]) for n in names}
        trained = {n: torch.stack([s[n].detach().cpu() for s in trained_states]) for n in names}
        return cls(names, init, trained, metadata)

    def to(self, device: torch.device | str) -> FeatureNetworks:
        return FeatureNetworks(
            self.names, {n: v.to(device) for n, v in self.init.items()},
            {n: v.to(device) for n, v in self.trained.items()}, self.metadata,
        )

    @property
    def device(self) -> torch.device:
        return self.init[self.names[0]].device

    def subset(self, count: int) -> FeatureNetworks:
        """The first ``count`` networks."""
        return FeatureNetworks(
            self.names, {n: v[:count] for n, v in self.init.items()},
            {n: v[:count] for n, v in self.trained.items()}, self.metadata,
        )

    def interpolated(self, k: int, lam: float | Tensor) -> dict[str, Tensor]:
        """``lam * init_k + (1 - lam) * trained_k`` for every entry."""
        return {n: torch.lerp(self.trained[n][k], self.init[n][k], lam) for n in self.names}

    def trained_state(self, k: int) -> dict[str, Tensor]:
        return {n: self.trained[n][k] for n in self.names}

    def check_compatible(self, net: nn.Module, where: str = "") -> None:
        state = {n: v for n, v in net.state_dict().items() if v.is_floating_point()}
        mine = [(n, tuple(self.init[n].shape[1:])) for n in self.names]
        theirs = [(n, tuple(v.shape)) for n, v in state.items()]
        if mine != theirs:
            raise ValueError(
                f"{where}the feature networks were trained on an architecture with entries {mine[:3]}..., which "
                f"does not match the net {type(net).__name__} ({theirs[:3]}...): use the same architecture or "
                f"pretrain new feature networks"
            )

    def load_into(self, net: nn.Module, state: dict[str, Tensor]) -> None:
        """Copy ``state`` (from :meth:`interpolated` / :meth:`trained_state`) into ``net`` in place."""
        own = net.state_dict()
        with torch.no_grad():
            for n in self.names:
                own[n].copy_(state[n])

    def save(self, path: str | Path) -> Path:
        """Write the networks atomically (a versioned ``torch.save`` file, see :mod:`lightning_eff.utils.io`)."""
        return save_versioned(path, FEATURE_NETS_FORMAT, FEATURE_NETS_VERSION, {
            "names": self.names,
            "init": {n: v.cpu() for n, v in self.init.items()},
            "trained": {n: v.cpu() for n, v in self.trained.items()},
            "metadata": self.metadata,
        })

    @classmethod
    def load(cls, path: str | Path) -> FeatureNetworks:
        """Read a file of :meth:`save`; a missing, corrupt, foreign or other-version file raises a clear error."""
        data = load_versioned(path, FEATURE_NETS_FORMAT, FEATURE_NETS_VERSION, "NCFM feature-networks file")
        return cls(data["names"], data["init"], data["trained"], data.get("metadata"))


def _check_recipe(
    owner: str, epochs: Any, lr: Any, momentum: Any, weight_decay: Any, batch_size: Any, cutmix: Any
) -> None:
    check_int(epochs, "epochs", minimum=1, owner=owner)
    check_float(lr, "lr", low=0.0, owner=owner)
    check_float(momentum, "momentum", low=0.0, owner=owner)
    check_float(weight_decay, "weight_decay", low=0.0, owner=owner)
    check_int(batch_size, "batch_size", minimum=1, owner=owner)
    check_float(cutmix, "cutmix", low=0.0, high=1.0, owner=owner)


@dataclass(frozen=True)
class FeatureNetPretraining:
    """How :class:`~lightning_eff.distill.NCFM` pretrains its feature networks (:func:`pretrain_feature_networks`).

    The official ``pretrain_script.py`` recipe (``config/ipc*/``): SGD with ``lr``, ``momentum`` and
    ``weight_decay``, MultiStepLR x0.2 at 2/3 and 5/6 of ``epochs``, mini-batches of ``batch_size``, DSA, and
    CutMix with probability ``cutmix``. Validated once, here; in YAML it is a nested group::

        model:
          class_path: lightning_eff.distill.ncfm.NCFM
          init_args:
            pretrain: {epochs: 15, batch_size: 64}   # the other fields keep their defaults

    Example::

        >>> FeatureNetPretraining(epochs=15).batch_size
        128
        >>> FeatureNetPretraining(cutmix=2.0)
        Traceback (most recent call last):
        ...
        ValueError: FeatureNetPretraining: `cutmix` must be in [0.0, 1.0], got 2.0.
    """

    epochs: int = 60
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    cutmix: float = 0.5

    def __post_init__(self) -> None:
        _check_recipe(
            type(self).__name__, self.epochs, self.lr, self.momentum, self.weight_decay, self.batch_size, self.cutmix
        )
        for name in ("lr", "momentum", "weight_decay", "cutmix"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def as_kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments of :func:`pretrain_feature_networks`."""
        return dataclasses.asdict(self)


def pretrain_feature_networks(
    datamodule,
    net: nn.Module,
    num_nets: int = 20,
    epochs: int = 60,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    dsa: Any | None = True,
    cutmix: float = 0.5,
    seed: int = 0,
    device: torch.device | str | None = None,
    save_path: str | Path | None = None,
    progress: bool = False,
) -> FeatureNetworks:
    """Train ``num_nets`` copies of ``net`` on the real training split, keeping initial and trained weights.

    The official ``pretrain_script.py``: SGD (``lr``, ``momentum``, ``weight_decay``), MultiStepLR x0.2
    at 2/3 and 5/6 of the epochs, DSA on every batch (per-sample parameters), CutMix (beta 1) with
    probability ``cutmix``. Net ``i`` gets its own initialisation and data order (seeded from
    ``seed`` and ``i``); the global RNG is untouched.

    Args:
        datamodule: a ``ClassificationDataModule``.
        net: the architecture (re-initialised per net; never trained in place).
        num_nets, epochs: K networks, epochs each (official 20 x 60).
        dsa: ``True`` (the default :class:`~lightning_eff.distill.DSA`), a ``DSA``, or ``None``/``False``.
        cutmix: probability of CutMix per batch (0 disables it).
        device: where to train (default: the CPU).
        save_path: also write the result there (atomically).
        progress: tqdm bar over networks.

    Example::

        >>> from lightning_eff.data import DigitsDataModule
        >>> from lightning_eff.models import ConvNet
        >>> fn = pretrain_feature_networks(DigitsDataModule(), ConvNet(1, 10, width=8, depth=2, image_size=8),
        ...                                num_nets=2, epochs=1)
        >>> len(fn), len(fn.metadata["test_acc"])
        (2, 2)
    """
    from lightning_eff.distill.augment import DSA, CutMix
    from lightning_eff.distill.evaluation.data import load_test_tensors

    check_int(num_nets, "num_nets", minimum=1, owner="pretrain_feature_networks")
    _check_recipe("pretrain_feature_networks", epochs, lr, momentum, weight_decay, batch_size, cutmix)
    if dsa is True:
        dsa = DSA()
    elif dsa is False:
        dsa = None
    cutmixer = CutMix(beta=1.0, prob=float(cutmix)) if cutmix > 0 else None
    device = torch.device(device) if device is not None else torch.device("cpu")
    images, labels = real_training_tensors(datamodule)
    images, labels = images.to(device), labels.to(device)
    test_x, test_y = load_test_tensors(datamodule)
    milestones = [2 * epochs // 3, 5 * epochs // 6]
    inits, trained, accs = [], [], []
    iterator = range(num_nets)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="NCFM feature networks")
    for i in iterator:
        gen = torch.Generator().manual_seed(derive_seed(seed, i, "ncfm-feature-data"))
        model = reinitialized(net, derive_seed(seed, i, "ncfm-feature-init"), device).train()
        inits.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.2)
        for _ in range(epochs):
            order = torch.randperm(images.shape[0], generator=gen).to(device)
            for start in range(0, images.shape[0], batch_size):
                idx = order[start : start + batch_size]
                x, y = images[idx], labels[idx]
                if dsa is not None:
                    x = dsa(x, generator=gen)
                opt.zero_grad(set_to_none=True)
                if cutmixer is not None:
                    x, ya, yb, lam = cutmixer(x, y, generator=gen)
                    out = model(x)
                    loss = lam * F.cross_entropy(out, ya) + (1 - lam) * F.cross_entropy(out, yb)
                else:
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
            sched.step()
        trained.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        model.eval()
        with torch.no_grad():
            correct = sum(
                int((model(xb.to(device)).argmax(1) == yb.to(device)).sum())
                for xb, yb in zip(test_x.split(512), test_y.split(512))
            )
        accs.append(correct / len(test_y))
    result = FeatureNetworks.from_states(
        inits, trained, net=net_config(net), epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
        cutmix=float(cutmix), dsa=None if dsa is None else dsa.config(), seed=seed,
        dataset=type(datamodule).__name__, test_acc=accs,
    )
    if save_path is not None:
        result.save(save_path)
    return result

