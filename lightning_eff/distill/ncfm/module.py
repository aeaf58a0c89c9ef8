"""The NCFM ``LightningModule`` on the distillation base (see :mod:`lightning_eff.distill.ncfm`)."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from lightning_eff.data.synthetic_set import SyntheticSet
from lightning_eff.distill.base import DistillationModule, DistillStep
from lightning_eff.distill.ncfm.feature_nets import (
    FeatureNetPretraining,
    FeatureNetworks,
    pretrain_feature_networks,
)
from lightning_eff.distill.ncfm.functional import ascent_gradient, ncfd
from lightning_eff.distill.ncfm.multi_formation import (
    decode_multi_formation,
    decode_synthetic_set,
    multi_formation_init,
)
from lightning_eff.distill.ncfm.sampling_net import SamplingNet
from lightning_eff.utils.checks import check_float, check_int, check_optional_int
from lightning_eff.utils.seeding import derive_seed

__all__ = ["NCFM"]

_REAL_CHUNK = 4096  # real images per no-grad forward on an accelerator
_PRETRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(FeatureNetPretraining))
_DEFAULT_PRETRAIN = FeatureNetPretraining()  # frozen: safe as a shared default


def _pretraining(pretrain: Any, legacy: dict[str, Any]) -> FeatureNetPretraining:
    """``pretrain`` as a :class:`FeatureNetPretraining`, with the deprecated ``pretrain_<field>`` keywords applied."""
    unknown = sorted(k for k in legacy if not (k.startswith("pretrain_") and k[len("pretrain_"):] in _PRETRAIN_FIELDS))
    if unknown:
        raise TypeError(f"NCFM: unexpected keyword argument(s) {unknown}")
    if pretrain is None:
        pretrain = FeatureNetPretraining()
    elif isinstance(pretrain, dict):
        pretrain = FeatureNetPretraining(**pretrain)
    elif not isinstance(pretrain, FeatureNetPretraining):
        raise TypeError(
            f"NCFM: `pretrain` must be a FeatureNetPretraining (or a dict of its fields), got {type(pretrain).__name__}"
        )
    if legacy:
        fields = {k[len("pretrain_"):]: v for k, v in sorted(legacy.items())}
        given = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        warnings.warn(
            f"NCFM: {', '.join(sorted(legacy))} are deprecated: pass pretrain=FeatureNetPretraining({given}) "
            f"(in YAML: `pretrain: {{epochs: ..., batch_size: ...}}`)",
            DeprecationWarning,
            stacklevel=3,
        )
        pretrain = dataclasses.replace(pretrain, **fields)
    return pretrain


def _default_image_optimizer(params):
    return torch.optim.AdamW(params, lr=0.01, weight_decay=5e-4)


def _default_psi_optimizer(params):
    return torch.optim.SGD(params, lr=1e-3, momentum=0.5, weight_decay=5e-4)


class NCFM(DistillationModule):
    """Neural characteristic function matching on the distillation base (see the module docstring).

    Args:
        net: feature-network template with ``features(x) -> [B, D]`` (``ConvNet``).
        ipc: stored synthetic images per class (the storage budget).
        factor: multi-formation factor: each stored image decodes to ``factor**2`` images (1: off).
        batch_real: real images per class per iteration (official 1024).
        num_freqs: frequencies per class and iteration (official 4096).
        alpha: amplitude weight of the discrepancy (official 0.5).
        loss_scale: the official ``300`` in front of the discrepancy.
        use_sampling_net: learn the frequency distribution with psi (the minmax); ``False`` draws ``N(0, I)``.
        psi_optimizer: optimizer of psi (official SGD lr 1e-3, momentum 0.5, weight decay 5e-4).
        psi_repeat: row repetition of psi (official 16).
        feature_dim: dimension of ``net.features`` (default: ``net.feature_dim``); needed for psi.
        calib_weight: weight of the calibration cross-entropy of the trained net on the decoded set (0: off).
        num_feature_nets: K pretrained feature networks (official 20).
        pretrain: their pretraining recipe (:class:`FeatureNetPretraining`: epochs, lr, momentum, weight decay,
            batch size, CutMix probability; a dict of its fields is accepted too). The former keywords
            ``pretrain_epochs``, ``pretrain_lr``, ``pretrain_momentum``, ``pretrain_weight_decay``,
            ``pretrain_batch_size`` and ``pretrain_cutmix`` still work from Python (with a
            ``DeprecationWarning``), not in YAML.
        feature_nets_path: where the feature networks live: loaded if the file exists, else pretrained
            (rank 0) and written there. Default ``<save_dir>/feature_networks.pt``.
        plateau_patience, plateau_factor: ReduceLROnPlateau on the image (and psi) optimizer, stepped with
            the iteration's loss averaged over ranks (``None``: off).
        memory_efficient: per-class activation checkpointing of the synthetic forward.
        image_optimizer: default AdamW lr 0.01, weight decay 5e-4.
        clamp: keep images in the valid pixel range (default on, as the official code).
        (the rest as :class:`~lightning_eff.distill.DistillationModule`)

    Example::

        >>> from lightning_eff.models import ConvNet
        >>> m = NCFM(ConvNet(in_channels=1, num_classes=10, width=16, depth=2, image_size=16), ipc=1,
        ...          use_sampling_net=True, num_freqs=64)
        >>> m.method_name, m.psi.feature_dim
        ('ncfm', 256)
    """

    method_name = "ncfm"
    hparams_ignore = (*DistillationModule.hparams_ignore, "psi_optimizer")

    def __init__(
        self,
        net: nn.Module,
        ipc: int = 10,
        factor: int = 2,
        batch_real: int = 1024,
        num_freqs: int = 4096,
        alpha: float = 0.5,
        loss_scale: float = 300.0,
        use_sampling_net: bool = False,
        psi_optimizer: OptimizerCallable = _default_psi_optimizer,
        psi_repeat: int = 16,
        feature_dim: int | None = None,
        calib_weight: float = 1.0,
        num_feature_nets: int = 20,
        pretrain: FeatureNetPretraining = _DEFAULT_PRETRAIN,
        feature_nets_path: str | None = None,
        plateau_patience: int | None = 500,
        plateau_factor: float = 0.5,
        memory_efficient: bool = False,
        image_optimizer: OptimizerCallable = _default_image_optimizer,
        clamp: bool = True,
        **common: Any,
    ) -> None:
        # `pretrain` goes into the hyperparameters as plain data (a checkpoint stays loadable without
        # unpickling classes), with the deprecated pretrain_* keywords folded into it
        legacy_pretrain = {k: common.pop(k) for k in list(common) if k.startswith("pretrain_")}
        pretrain = _pretraining(pretrain, legacy_pretrain).as_kwargs()
        if feature_dim is None:  # resolved before the base records it
            feature_dim = getattr(net, "feature_dim", None)
        super().__init__(net, ipc, image_optimizer=image_optimizer, clamp=clamp, **common)
        name = "NCFM"
        check_int(factor, "factor", minimum=1, owner=name)
        for arg, value in (("batch_real", batch_real), ("num_freqs", num_freqs), ("psi_repeat", psi_repeat),
                           ("num_feature_nets", num_feature_nets)):
            check_int(value, arg, minimum=1, owner=name)
        for arg, value in (("alpha", alpha), ("plateau_factor", plateau_factor)):
            check_float(value, arg, low=0.0, high=1.0, owner=name)
        check_float(loss_scale, "loss_scale", low=0.0, low_open=True, owner=name)
        check_float(calib_weight, "calib_weight", low=0.0, owner=name)
        check_optional_int(plateau_patience, "plateau_patience", minimum=0, owner=name)
        if not isinstance(use_sampling_net, bool):
            raise TypeError(f"{name}: `use_sampling_net` must be a bool, got {use_sampling_net!r}")
        if not isinstance(memory_efficient, bool):
            raise TypeError(f"{name}: `memory_efficient` must be a bool, got {memory_efficient!r}")
        if not callable(getattr(net, "features", None)):
            raise TypeError(f"{name}: net {type(net).__name__} needs a features(x) -> [B, D] embedding method")
        if use_sampling_net and (isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1):
            raise ValueError(
                f"{name}: use_sampling_net=True needs the feature dimension: pass `feature_dim` (the net "
                f"{type(net).__name__} has no integer `feature_dim` attribute), got {feature_dim!r}"
            )
        self.factor = factor
        self.batch_real = batch_real
        self.num_freqs = num_freqs
        self.alpha = float(alpha)
        self.loss_scale = float(loss_scale)
        self.use_sampling_net = use_sampling_net
        self.psi_optimizer = psi_optimizer
        self.feature_dim = feature_dim
        self.calib_weight = float(calib_weight)
        self.num_feature_nets = num_feature_nets
        self.pretrain = FeatureNetPretraining(**pretrain)
        self.feature_nets_path = feature_nets_path
        self.plateau_patience = plateau_patience
        self.plateau_factor = float(plateau_factor)
        self.memory_efficient = memory_efficient
        self.psi: SamplingNet | None = None
        if use_sampling_net:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.seed, "ncfm-psi"))
                self.psi = SamplingNet(feature_dim, num_freqs=num_freqs, repeat=psi_repeat)
        # networks that must not be registered (no DDP synchronisation, not in the checkpoint)
        self.__dict__["_feat_net"] = None
        self.__dict__["_calib_net"] = None
        self._feature_nets: FeatureNetworks | None = None

    # ------------------------------------------------------------------ set-up
    def _initial_set(self, dm) -> SyntheticSet:
        if self.init != "real" or self.factor == 1:
            try:
                return super()._initial_set(dm)
            except ValueError as err:
                if self.factor > 1 and "expected" in str(err):
                    raise ValueError(
                        f"{err} (with factor={self.factor}, init must be a *stored* set: the synthetic_set_stored.pt "
                        f"that NCFM writes next to synthetic_set.pt, not the decoded set)"
                    ) from None
                raise
        try:
            return multi_formation_init(dm, self.ipc, self.factor, seed=self.seed, method=self.method_name)
        except ValueError as err:
            raise ValueError(f"NCFM: {err}") from None

    def setup_method(self, datamodule) -> None:
        h, w = datamodule.image_shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"NCFM: the images ({h}x{w}) are not divisible by factor={self.factor}")
        with torch.no_grad():
            dim = self.net_template.features(torch.zeros(2, *datamodule.image_shape)).shape[1]
        if self.psi is not None and dim != self.psi.feature_dim:
            raise ValueError(
                f"NCFM: net.features gives {dim}-dimensional features but the sampling net was built for "
                f"feature_dim={self.psi.feature_dim}"
            )
        if self._feature_nets is None:
            self._feature_nets = self._obtain_feature_nets(datamodule)
        self.__dict__["_feat_net"] = copy.deepcopy(self.net_template).requires_grad_(False)
        self.__dict__["_calib_net"] = copy.deepcopy(self.net_template).requires_grad_(False)

    def _obtain_feature_nets(self, datamodule) -> FeatureNetworks:
        path = Path(self.feature_nets_path) if self.feature_nets_path else self._save_dir() / "feature_networks.pt"
        nets = None
        if self.trainer.is_global_zero:
            if path.is_file():
                nets = FeatureNetworks.load(path)
            else:
                nets = pretrain_feature_networks(
                    datamodule, self.net_template, num_nets=self.num_feature_nets, dsa=True, seed=self.seed,
                    device=self.trainer.strategy.root_device, save_path=path,
                    progress=self.trainer.progress_bar_callback is not None, **self.pretrain.as_kwargs(),
                )
            nets = nets.to("cpu")
        nets = self.trainer.strategy.broadcast(nets)
        nets.check_compatible(self.net_template, where=f"NCFM ({path}): ")
        if len(nets) < self.num_feature_nets:
            raise ValueError(
                f"NCFM: {path} holds {len(nets)} feature networks but num_feature_nets={self.num_feature_nets}; "
                f"delete the file to pretrain again, or lower num_feature_nets"
            )
        return nets.subset(self.num_feature_nets)

    def set_feature_networks(self, nets: FeatureNetworks) -> None:
        """Use these feature networks (e.g. shared between runs in one process) instead of pretraining."""
        nets.check_compatible(self.net_template, where="NCFM.set_feature_networks: ")
        self._feature_nets = nets.subset(min(len(nets), self.num_feature_nets))

    @property
    def feature_networks(self) -> FeatureNetworks | None:
        return self._feature_nets

    # ------------------------------------------------------------------ optimizers
    def extra_parameters(self) -> list[dict[str, Any]]:
        if self.psi is None:
            return []
        return [{"optimizer": self.psi_optimizer(self.psi.parameters())}]

    def configure_optimizers(self):
        optimizers = super().configure_optimizers()
        if self.plateau_patience is None:
            return optimizers
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
        schedulers = [plateau(optimizers[0], mode="min", factor=self.plateau_factor, patience=self.plateau_patience)]
        if self.psi is not None:
            schedulers.append(
                plateau(optimizers[1], mode="min", factor=self.plateau_factor, patience=self.plateau_patience)
            )
        return optimizers, schedulers

    def after_step(self, step: DistillStep) -> None:
        if self._trainer is None:
            return
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        loss = self.trainer.strategy.reduce(step.logs["match_loss"].detach(), reduce_op="mean")
        for sched in schedulers if isinstance(schedulers, list) else [schedulers]:
            sched.step(float(loss))
        optimizers = self.optimizers()
        first = optimizers[0] if isinstance(optimizers, list) else optimizers
        step.logs["image_lr"] = float(first.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ the iteration
    def decoded_class(self, c: int) -> Tensor:
        """The decoded synthetic images of class ``c`` (``factor**2 * ipc`` images, differentiable)."""
        return decode_multi_formation(self.syn_class(c), self.factor)

    def training_class(self, c: int) -> Tensor:
        return self.decoded_class(c)

    def training_images(self) -> tuple[Tensor, Tensor]:
        """The decoded set (classes in order, as :meth:`synthetic_set`), differentiable."""
        images = [self.decoded_class(c) for c in range(self.num_classes)]
        labels = [torch.full((x.shape[0],), c, dtype=torch.long, device=x.device) for c, x in enumerate(images)]
        return torch.cat(images), torch.cat(labels)

    def frequencies(self, feature_dim: int, generator: torch.Generator) -> Tensor:
        """``num_freqs`` frequencies: psi's (with reversed gradient) or ``N(0, I)``."""
        if self.psi is None:
            return torch.randn(self.num_freqs, feature_dim, generator=generator, device=generator.device).to(
                self.device
            )
        return ascent_gradient(self.psi(generator=generator))

    def _class_discrepancy(self, syn: Tensor, real_features: Tensor, t: Tensor) -> Tensor:
        syn_features = F.normalize(self._feat_net.features(syn), dim=1)
        return self.loss_scale * ncfd(real_features, syn_features, t, self.alpha)

    def _class_calibration(self, x: Tensor, c: int) -> Tensor:
        labels = torch.full((x.shape[0],), c, dtype=torch.long, device=x.device)
        return F.cross_entropy(self._calib_net(x), labels)

    def _features(self, batches: list[Tensor], grad: bool) -> list[Tensor]:
        """L2-normalised features of each batch. On an accelerator the batches go through in one forward
        (the nets normalise per sample, so this changes nothing but the speed); on the CPU one forward
        per batch is faster (the activations stay in cache)."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if self.device.type == "cpu":
                return [F.normalize(self._feat_net.features(b), dim=1) for b in batches]
            x = torch.cat(batches)
            chunks = x.split(_REAL_CHUNK) if not grad else (x,)
            feats = torch.cat([F.normalize(self._feat_net.features(xb), dim=1) for xb in chunks])
            return list(feats.split([b.shape[0] for b in batches]))

    def _prepare_nets(self, step: DistillStep) -> None:
        nets = self._feature_nets
        if nets is None:
            raise RuntimeError("NCFM: no feature networks yet (fit with a DataModule first)")
        if nets.device != self.device:
            nets = self._feature_nets = nets.to(self.device)
        for net in (self._feat_net, self._calib_net):
            if next(net.parameters()).device != self.device:
                net.to(self.device)
        k = int(torch.randint(len(nets), (1,), generator=step.shared))
        lam = float(torch.rand((), generator=step.shared))
        nets.load_into(self._feat_net, nets.interpolated(k, lam))
        self._feat_net.train()
        if self.calib_weight > 0:
            nets.load_into(self._calib_net, nets.trained_state(k))
            self._calib_net.train()
        step.net = self._feat_net
        step.logs["feature_net"] = float(k)
        step.logs["lambda"] = lam

    def matching_loss(self, step: DistillStep) -> Tensor:
        from torch.utils.checkpoint import checkpoint

        self._prepare_nets(step)
        seed = int(torch.randint(0, 2**62, (1,), generator=step.shared))
        freq_gen = torch.Generator(device=self.device).manual_seed(seed)
        classes = range(self.num_classes)
        # per class: a real batch and the decoded synthetic images under one siamese DSA draw
        reals, syns = [], []
        for c in classes:
            real, syn = self.augment(
                self.sample_real(c, self.batch_real, step.local), self.decoded_class(c), generator=step.shared
            )
            reals.append(real)
            syns.append(syn)
        real_features = self._features(reals, grad=False)
        if not self.memory_efficient:
            syn_features = self._features(syns, grad=True)
        match = self.syn_images.new_zeros(())
        for c in classes:
            t = self.frequencies(real_features[c].shape[1], freq_gen)
            if self.memory_efficient:  # recompute this class's forward in the backward
                match = match + checkpoint(self._class_discrepancy, syns[c], real_features[c], t, use_reentrant=False)
            else:
                match = match + self.loss_scale * ncfd(real_features[c], syn_features[c], t, self.alpha)
        step.logs["ncfd_loss"] = match.detach()
        if self.calib_weight == 0:
            return match
        # calibration: per class, the mean cross-entropy of the trained net on the augmented decoded
        # images, summed over the classes (the official per-class calibration steps)
        xs = []
        for c in classes:
            x = self.decoded_class(c)
            xs.append(self.dsa(x, generator=step.shared) if self.dsa is not None else x)
        if self.memory_efficient:
            calib = sum(checkpoint(self._class_calibration, xs[c], c, use_reentrant=False) for c in classes)
        elif self.device.type == "cpu":
            calib = sum(self._class_calibration(xs[c], c) for c in classes)
        else:
            x = torch.cat(xs)
            y = torch.cat([torch.full((xc.shape[0],), c, dtype=torch.long, device=x.device) for c, xc in enumerate(xs)])
            per_sample = F.cross_entropy(self._calib_net(x), y, reduction="none")
            calib = sum(chunk.mean() for chunk in per_sample.split([xc.shape[0] for xc in xs]))
        step.logs["calib_loss"] = calib.detach()
        return match + self.calib_weight * calib

    # ------------------------------------------------------------------ the result
    def _metadata(self) -> dict[str, Any]:
        meta = dict(self._data_meta)
        meta.update(
            method=self.method_name, ipc=self.ipc, seed=self.seed, iterations=int(self.iteration), factor=self.factor,
            stored_ipc=self.ipc, decoded_ipc=self.ipc * self.factor**2, sampling_net=self.use_sampling_net,
        )
        return meta

    def synthetic_set(self) -> SyntheticSet:
        """The decoded, evaluable set: ``factor**2 * ipc`` full-size images per class.

        ``metadata["ipc"]`` and ``metadata["stored_ipc"]`` are the stored budget, ``metadata["factor"]``
        the multi-formation factor, ``metadata["decoded_ipc"]`` the images per class of this set.
        """
        if self.syn_images is None:
            raise RuntimeError("NCFM: no synthetic set yet (call trainer.fit first)")
        synset = decode_synthetic_set(self.stored_set(), self.factor)
        for plugin in self.plugins:
            synset = plugin.on_synthetic_set(self, synset)
        return synset

    def stored_set(self) -> SyntheticSet:
        """The stored (encoded) set: ``ipc`` images per class, each packing ``factor**2`` tiles.

        Pass its file as ``init=`` to continue distilling from it.
        """
        if self.syn_images is None:
            raise RuntimeError("NCFM: no synthetic set yet (call trainer.fit first)")
        meta = self._metadata()
        meta["formation"] = "stored" if self.factor > 1 else "decoded"
        with torch.no_grad():
            images = self.syn_images.detach().cpu().clone()
        return SyntheticSet(images, self.syn_labels.cpu().clone(), metadata=meta)

    @rank_zero_only
    def save_synthetic_set(self) -> Path | None:
        """``synthetic_set.pt`` (decoded) + ``synthetic_grid.png``, and ``synthetic_set_stored.pt`` when ``factor > 1``."""
        path = super().save_synthetic_set()
        if path is not None and self.factor > 1:
            self.stored_set().save(Path(path).parent / "synthetic_set_stored.pt")
        return path

