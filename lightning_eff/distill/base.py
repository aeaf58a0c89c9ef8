"""The distillation base: a ``LightningModule`` whose trainable state is the synthetic set.

Every matching method (DM, gradient matching, trajectory matching, NCFM) is a small subclass that
implements :meth:`DistillationModule.matching_loss`; plug-ins (:class:`DistillPlugin`: SDC, DRUPI)
add terms to the loss of any of them, bias real-batch sampling, or add fields to the saved set.

One ``training_step`` is one distillation iteration (manual optimisation, because methods run
inner loops):

1. a per-iteration context (:class:`DistillStep`) with seeded generators: ``shared`` (same on every
   rank: network draws, synthetic mini-batches, augmentation of synthetic data) and ``local``
   (different per rank: real-batch sampling, so ranks see different real data);
2. ``loss = matching_loss(step) + sum(plugin.extra_loss(self, step))``; a non-finite loss stops with
   an error naming the method and the iteration;
3. one backward, the image optimizer (and the learning-rate / plug-in optimizers) step — under DDP
   the gradients of the synthetic set are all-reduced, so every rank holds the same set;
4. :meth:`after_step` (gradient matching trains its network here), optional clamping to the valid
   pixel range, logging under ``distill/*``.

The real batches ignore the DataModule's ``train_dataloader`` batches: real images are sampled per
class from the (un-augmented) training split, cached once on the module's device. The loader only
paces the iterations (``trainer.max_steps`` is the number of distillation iterations).

The synthetic set is saved (atomically, with a PNG grid) at the end of fit and at every checkpoint
to ``save_dir`` (default: the trainer's log dir), and the grid is logged to the active loggers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from lightning_eff.data.synthetic_set import SyntheticSet, check_ipc
from lightning_eff.distill.reference import reinitialized, train_reference_networks
from lightning_eff.utils.distributed import ProcessGroupCleanup
from lightning_eff.utils.seeding import derive_seed

__all__ = ["DistillationModule", "DistillPlugin", "DistillStep", "reinitialized", "train_reference_networks", "INITS"]

INITS = ("real", "noise")


def _default_image_optimizer(params):
    return torch.optim.SGD(params, lr=1.0, momentum=0.5)


@dataclass
class DistillStep:
    """What one distillation iteration knows; methods fill ``net`` and ``logs`` for plug-ins and logging."""

    iteration: int
    shared: torch.Generator
    local: torch.Generator
    net: nn.Module | None = None
    logs: dict[str, Tensor | float] = field(default_factory=dict)


class DistillPlugin(nn.Module):
    """Base class of plug-ins that work on every distillation method (SDC, DRUPI).

    A plug-in is an ``nn.Module`` (its parameters and buffers are saved in checkpoints) with hooks:

    * :meth:`setup` once the module knows its data and synthetic set;
    * :meth:`extra_loss` adds a term to the matching loss of the iteration;
    * :meth:`real_sample_weights` biases the sampling of real images of a class;
    * :meth:`make_optimizer` for the plug-in's own parameters (stepped with the images);
    * :meth:`after_step` after the synthetic set was updated;
    * :meth:`on_synthetic_set` adds fields (soft labels, privileged information) to the saved set.
    """

    def setup(self, module: DistillationModule) -> None:  # noqa: B027 - optional hook
        pass

    def extra_loss(self, module: DistillationModule, step: DistillStep) -> Tensor | None:
        return None

    def real_sample_weights(self, module: DistillationModule, c: int, images: Tensor) -> Tensor | None:
        return None

    def make_optimizer(self) -> torch.optim.Optimizer | None:
        return None

    def after_step(self, module: DistillationModule, step: DistillStep) -> None:  # noqa: B027 - optional hook
        """Called after the method's :meth:`DistillationModule.after_step` (e.g. to train the plug-in's network)."""

    def on_synthetic_set(self, module: DistillationModule, synset: SyntheticSet) -> SyntheticSet:
        return synset


class DistillationModule(ProcessGroupCleanup, L.LightningModule):
    """Base class of the matching-based distillation methods.

    Args:
        net: template of the networks the method uses (deep-copied and re-initialised with seeded
            generators; never trained in place). It must accept the DataModule's images.
        ipc: synthetic images per class.
        init: ``"real"`` (random real images of each class, the default), ``"noise"``, or the path of a
            saved :class:`SyntheticSet` to continue from.
        image_optimizer: optimizer of the synthetic images (any ``torch.optim`` optimizer or
            ``lightning_eff.optim.KO``; from the CLI ``--model.image_optimizer KO``).
        dsa: differentiable siamese augmentation applied identically to real and synthetic batches
            (``None``: off).
        plugins: :class:`DistillPlugin` instances (SDC, DRUPI).
        clamp: keep the synthetic images inside the valid pixel range ``[0, 1]`` (in normalised units).
        save_dir: where ``synthetic_set.pt`` and ``synthetic_grid.png`` go (default: the trainer's log dir).
        seed: seed of the synthetic-set initialisation and of every per-iteration draw.

    A method takes its own arguments after ``net`` and ``ipc`` and hands the others on as keyword
    arguments (``**common``); LightningCLI still lists and type-checks them, as the method's.
    The hyperparameters (all but those named in ``hparams_ignore``) are saved here.
    """

    method_name = "distillation"
    #: arguments left out of the saved hyperparameters (modules and callables)
    hparams_ignore: tuple[str, ...] = ("net", "image_optimizer", "dsa", "plugins")

    def __init__(
        self,
        net: nn.Module,
        ipc: int = 10,
        init: str = "real",
        image_optimizer: OptimizerCallable = _default_image_optimizer,
        dsa: Any | None = None,
        plugins: list[DistillPlugin] | None = None,
        clamp: bool = False,
        save_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_ipc(ipc, owner=type(self).__name__)
        if not isinstance(net, nn.Module):
            raise TypeError(f"{type(self).__name__}: net must be a torch.nn.Module, got {type(net).__name__}")
        if init not in INITS and not str(init).endswith((".pt", ".pth")):
            raise ValueError(
                f"{type(self).__name__}: init must be one of {INITS} or the path of a saved synthetic set "
                f"(*.pt), got {init!r}"
            )
        if str(init).endswith((".pt", ".pth")) and not Path(init).is_file():
            raise FileNotFoundError(f"{type(self).__name__}: init={init!r}: no synthetic set at that path")
        if dsa is not None and not callable(getattr(dsa, "siamese", None)):
            raise TypeError(f"{type(self).__name__}: dsa must be a lightning_eff.distill.DSA or None, got {dsa!r}")
        plugins = list(plugins or [])
        for p in plugins:
            if not isinstance(p, DistillPlugin):
                raise TypeError(f"{type(self).__name__}: plugins must be DistillPlugin instances, got {p!r}")
        self.automatic_optimization = False
        self.ipc = ipc
        self.init = init
        self.image_optimizer = image_optimizer
        self.dsa = dsa
        self.plugins = nn.ModuleList(plugins)
        self.clamp = clamp
        self.save_dir = save_dir
        self.seed = int(seed)
        # The template is kept out of the module's parameters (no grads, not DDP-synchronised).
        self.__dict__["net_template"] = net.requires_grad_(False)
        self.syn_images: nn.Parameter | None = None
        self.register_buffer("syn_labels", torch.empty(0, dtype=torch.long))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self._real: list[Tensor] | None = None
        self._data_meta: dict[str, Any] = {}
        self._bounds: tuple[Tensor, Tensor] | None = None
        self._resolved_save_dir: Path | None = None
        # Lightning collects the arguments of every __init__ up the class chain, so this records a
        # method's own arguments too (and the defaults of those it hands on here as ``**common``).
        self.save_hyperparameters(ignore=list(self.hparams_ignore))

    # ------------------------------------------------------------------ set-up
    @property
    def num_classes(self) -> int:
        return int(self._data_meta["num_classes"])

    def setup(self, stage: str) -> None:
        super().setup(stage)  # ProcessGroupCleanup
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            if self.syn_images is None:
                raise RuntimeError(
                    f"{type(self).__name__} needs a lightning_eff ClassificationDataModule: pass datamodule= to "
                    f"the Trainer (or data: in the config)"
                )
            return
        from lightning_eff.data import ClassificationDataModule

        if not isinstance(dm, ClassificationDataModule):
            raise TypeError(f"{type(self).__name__} needs a ClassificationDataModule, got {type(dm).__name__}")
        dm.setup("fit")
        self._data_meta = {
            "dataset": type(dm).__name__,
            "num_classes": dm.num_classes,
            "image_shape": list(dm.image_shape),
            "mean": list(dm.mean),
            "std": list(dm.std),
        }
        self._check_net(dm.image_shape, dm.num_classes)
        if self.syn_images is None:
            synset = self._initial_set(dm)
            self.syn_images = nn.Parameter(synset.images.clone())
            self.syn_labels = synset.labels.clone()
        elif tuple(self.syn_images.shape[1:]) != tuple(dm.image_shape):
            raise ValueError(
                f"{type(self).__name__}: the synthetic images have shape {tuple(self.syn_images.shape[1:])} but the "
                f"DataModule yields {tuple(dm.image_shape)}"
            )
        # Every training image of each class, un-augmented, for per-class sampling.
        self._real = [dm.class_images(c) for c in range(dm.num_classes)]
        mean = torch.tensor(dm.mean).view(1, -1, 1, 1)
        std = torch.tensor(dm.std).view(1, -1, 1, 1)
        self._bounds = ((0 - mean) / std, (1 - mean) / std)
        self._save_dir()
        for plugin in self.plugins:
            plugin.setup(self)
        self.setup_method(dm)

    def setup_method(self, datamodule) -> None:
        """Method-specific set-up (experts, feature networks); called at the end of :meth:`setup`."""

    def _check_net(self, image_shape: tuple[int, ...], num_classes: int) -> None:
        try:
            with torch.no_grad():
                out = self.net_template(torch.zeros(2, *image_shape))
        except Exception as err:
            raise ValueError(
                f"{type(self).__name__}: net {type(self.net_template).__name__} does not accept the DataModule's "
                f"images of shape {tuple(image_shape)}: {err}"
            ) from None
        if out.ndim != 2 or out.shape[1] != num_classes:
            raise ValueError(
                f"{type(self).__name__}: net outputs {tuple(out.shape[1:])} logits but the DataModule has "
                f"{num_classes} classes"
            )

    def _initial_set(self, dm) -> SyntheticSet:
        if self.init == "real":
            return SyntheticSet.from_real(dm, self.ipc, seed=self.seed, method=self.method_name)
        if self.init == "noise":
            return SyntheticSet.from_noise(dm, self.ipc, seed=self.seed, method=self.method_name)
        loaded = SyntheticSet.load(self.init)
        if tuple(loaded.image_shape) != tuple(dm.image_shape):
            raise ValueError(
                f"{type(self).__name__}: init={self.init!r} holds images of shape {loaded.image_shape}, but the "
                f"DataModule yields {tuple(dm.image_shape)}"
            )
        if loaded.num_classes != dm.num_classes or loaded.ipc != self.ipc:
            raise ValueError(
                f"{type(self).__name__}: init={self.init!r} has {loaded.num_classes} classes at IPC {loaded.ipc}; "
                f"expected {dm.num_classes} classes at ipc={self.ipc}"
            )
        return loaded

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The synthetic set is allocated in setup(); a state dict loaded before that (checkpoint
        # reload, results sent back from ddp_spawn workers) allocates it here, with its shape.
        images, labels = state_dict.get(prefix + "syn_images"), state_dict.get(prefix + "syn_labels")
        if images is not None and (self.syn_images is None or self.syn_images.shape != images.shape):
            self.syn_images = nn.Parameter(torch.empty_like(images, device=self.syn_labels.device))
        if labels is not None and self.syn_labels.shape != labels.shape:
            self.syn_labels = torch.empty_like(labels, device=self.syn_labels.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._data_meta = dict(checkpoint.get("distill_data_meta", self._data_meta))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["distill_data_meta"] = dict(self._data_meta)
        self.save_synthetic_set()

    # ------------------------------------------------------------------ helpers for methods
    def make_step(self) -> DistillStep:
        it = int(self.iteration)
        shared = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, it, "shared"))
        local = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, it, "local", self.global_rank))
        return DistillStep(iteration=it, shared=shared, local=local)

    def fresh_network(self, seed: int) -> nn.Module:
        """A freshly initialised copy of the network template on the module's device."""
        return reinitialized(self.net_template, seed, self.device)

    def real_batch_sizes(self) -> tuple[int, ...]:
        """Real images per class that each :meth:`sample_real` draw of an iteration asks for.

        The method's own ``batch_real`` (none for methods that never sample real images during
        distillation, such as trajectory matching) and that of every plug-in that draws (DRUPI). Plug-ins
        that bias the draw (SDC's real mode) read it to tell whether the bias can change anything.
        """
        sizes = [getattr(self, "batch_real", None)] + [getattr(p, "batch_real", None) for p in self.plugins]
        return tuple(int(b) for b in sizes if b is not None)

    def sample_real(self, c: int, n: int, generator: torch.Generator) -> Tensor:
        """``n`` real training images of class ``c`` (all of them if the class has fewer), on the device.

        Plug-ins may bias the draw through :meth:`DistillPlugin.real_sample_weights`.
        """
        pool = self._real[c]
        weights = None
        for plugin in self.plugins:
            w = plugin.real_sample_weights(self, c, pool)
            if w is not None:
                weights = w if weights is None else weights * w
        n = min(n, pool.shape[0])
        if weights is None:
            idx = torch.randperm(pool.shape[0], generator=generator)[:n]
        else:
            idx = torch.multinomial(weights.cpu().float(), n, replacement=False, generator=generator)
        return pool[idx].to(self.device, non_blocking=True)

    def syn_class(self, c: int) -> Tensor:
        """The synthetic images of class ``c`` (a view of the parameter, differentiable)."""
        start = c * self.ipc
        return self.syn_images[start : start + self.ipc]

    def training_class(self, c: int) -> Tensor:
        """The images of class ``c`` that students train on (differentiable; plug-ins read these).

        The stored images by default; methods that decode their storage (NCFM's multi-formation)
        return the decoded images.
        """
        return self.syn_class(c)

    def training_images(self) -> tuple[Tensor, Tensor]:
        """``(images, labels)`` of the whole set students train on, classes in order (see :meth:`training_class`)."""
        return self.syn_images, self.syn_labels

    def augment(self, *batches: Tensor, generator: torch.Generator) -> tuple[Tensor, ...]:
        """The same DSA transform on every batch (identity when DSA is off)."""
        if self.dsa is None:
            return batches
        return tuple(self.dsa.siamese(*batches, generator=generator))

    # ------------------------------------------------------------------ the iteration
    def matching_loss(self, step: DistillStep) -> Tensor:
        """The method's loss for one iteration (differentiable w.r.t. ``self.syn_images``)."""
        raise NotImplementedError

    def after_step(self, step: DistillStep) -> None:
        """Called after the synthetic set was updated (e.g. to train the method's network)."""

    def extra_parameters(self) -> list[dict[str, Any]]:
        """Further parameters to optimise with their own optimizer (e.g. the learned lr)."""
        return []

    def configure_optimizers(self):
        if self.syn_images is None:
            raise RuntimeError(f"{type(self).__name__}: configure_optimizers before setup (no synthetic set yet)")
        optimizers = [self.image_optimizer([self.syn_images])]
        for spec in self.extra_parameters():
            optimizers.append(spec["optimizer"])
        for plugin in self.plugins:
            opt = plugin.make_optimizer()
            if opt is not None:
                optimizers.append(opt)
        return optimizers

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        step = self.make_step()
        loss = self.matching_loss(step)
        step.logs["match_loss"] = loss.detach()
        for plugin in self.plugins:
            extra = plugin.extra_loss(self, step)
            if extra is not None:
                step.logs[f"{type(plugin).__name__.lower()}_loss"] = extra.detach()
                loss = loss + extra
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{type(self).__name__}: the distillation loss is {loss.item()} at iteration {step.iteration}"
            )
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for opt in optimizers:
            opt.zero_grad()
        if loss.requires_grad:  # a StaticSet whose plug-ins only annotate (e.g. DRUPI(learn=False)) has no graph
            self.manual_backward(loss)
        # Only the image optimizer goes through Lightning (it counts trainer.global_step).
        optimizers[0].step()
        for opt in optimizers[1:]:
            opt.optimizer.step()
        if self.clamp:
            low, high = (b.to(self.device) for b in self._bounds)
            with torch.no_grad():
                self.syn_images.copy_(torch.maximum(torch.minimum(self.syn_images, high), low))
        self.after_step(step)
        for plugin in self.plugins:
            plugin.after_step(self, step)
        self.iteration += 1
        self.log("distill/loss", loss.detach(), prog_bar=True)
        for key, value in step.logs.items():
            self.log(f"distill/{key}", value)
        return loss.detach()

    # ------------------------------------------------------------------ the result
    def synthetic_set(self) -> SyntheticSet:
        """The current synthetic set (detached, on the CPU), with the plug-ins' fields."""
        if self.syn_images is None:
            raise RuntimeError(f"{type(self).__name__}: no synthetic set yet (call trainer.fit first)")
        meta = dict(self._data_meta)
        meta.update(method=self.method_name, ipc=self.ipc, seed=self.seed, iterations=int(self.iteration))
        synset = SyntheticSet(
            self.syn_images.detach().cpu().clone(), self.syn_labels.cpu().clone(), lr=self.learned_lr(), metadata=meta
        )
        for plugin in self.plugins:
            synset = plugin.on_synthetic_set(self, synset)
        return synset

    def learned_lr(self) -> float | None:
        return None

    def _save_dir(self) -> Path:
        if self.save_dir is not None:
            return Path(self.save_dir)
        if self._resolved_save_dir is None and self._trainer is not None:
            # trainer.log_dir is a collective under DDP: resolved once, in setup, on every rank
            self._resolved_save_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        return self._resolved_save_dir or Path(".")

    @rank_zero_only
    def save_synthetic_set(self) -> Path | None:
        """Write ``synthetic_set.pt`` and ``synthetic_grid.png`` (atomically) to the save dir."""
        if self.syn_images is None:
            return None
        folder = self._save_dir()
        synset = self.synthetic_set()
        path = synset.save(folder / "synthetic_set.pt")
        synset.to_image_grid(folder / "synthetic_grid.png")
        return path

    def on_fit_end(self) -> None:
        self.save_synthetic_set()
        if self.syn_images is not None and self._trainer is not None and self.trainer.is_global_zero:
            from lightning_eff.utils.logging import log_image

            log_image(self.trainer, "distill/synthetic_grid", self.synthetic_set().to_image_grid())

