"""``ImageClassifier``: supervised cross-entropy training of any image network as a ``LightningModule``."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_eff.utils.distributed import ProcessGroupCleanup
from lightning_eff.utils.hparams import save_plain_hyperparameters
from lightning_eff.utils.optim import optimizer_config

__all__ = ["ImageClassifier"]


def _infer_num_classes(net: nn.Module) -> int:
    n = getattr(net, "num_classes", None)
    if isinstance(n, int) and not isinstance(n, bool) and n >= 1:
        return n
    for attr in ("classifier", "fc", "head"):
        head = getattr(net, attr, None)
        if isinstance(head, nn.Linear):
            return head.out_features
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1].out_features
    raise ValueError(
        f"ImageClassifier: cannot tell how many classes `net` ({type(net).__name__}) predicts: it has no int "
        f"`num_classes` attribute and no nn.Linear layer. Give it a `num_classes` attribute."
    )


class ImageClassifier(ProcessGroupCleanup, L.LightningModule):
    """Cross-entropy image classification of any ``net`` (logits ``[B, num_classes]``).

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc`` (progress bar), ``test/loss`` and
    ``test/acc`` per epoch; accuracy is torchmetrics' ``MulticlassAccuracy`` with ``average="micro"`` (the
    fraction of correct predictions). At ``setup`` the net is checked against a
    :class:`~lightning_eff.data.ClassificationDataModule` attached to the trainer (class count and image shape).

    Hyperparameters are saved as plain configs (``class_path`` + ``init_args``, as LightningCLI writes them), so
    checkpoints load with ``torch.load(weights_only=True)`` and ``ImageClassifier.load_from_checkpoint(path)``
    rebuilds the net, provided it exposes ``get_config()`` (as :class:`ConvNet` and :class:`MLP` do) or the
    module was built by LightningCLI. Otherwise a warning says to pass ``net=`` to ``load_from_checkpoint``.
    Likewise ``optimizer``/``lr_scheduler`` are recorded when they are a class or a ``functools.partial`` of
    one (anything else, e.g. a lambda, works for training but falls back to the default on reload).

    Args:
        net: network mapping images ``[B, C, H, W]`` to logits ``[B, num_classes]``.
        optimizer: callable ``params -> Optimizer`` (default ``torch.optim.Adam`` with its default lr 1e-3).
        lr_scheduler: optional callable ``optimizer -> LRScheduler``; ``ReduceLROnPlateau`` monitors
            ``val/loss``.
        label_smoothing: cross-entropy label smoothing in ``[0, 1)``.

    Example::

        >>> from lightning_eff.models import ConvNet
        >>> model = ImageClassifier(ConvNet(in_channels=1, num_classes=10, width=8, image_size=8))
        >>> model(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
        >>> model.hparams["net"]["class_path"], model.hparams["optimizer"]["class_path"]
        ('lightning_eff.models.convnet.ConvNet', 'torch.optim.adam.Adam')
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
        privileged_weight: float | None = None,
        feature_layer: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(
                f"ImageClassifier: `net` must be a torch.nn.Module, got {net!r} ({type(net).__name__})."
            )
        if not callable(optimizer):
            raise TypeError(
                f"ImageClassifier: `optimizer` must be a callable params -> Optimizer, got {optimizer!r}."
            )
        if lr_scheduler is not None and not callable(lr_scheduler):
            raise TypeError(
                f"ImageClassifier: `lr_scheduler` must be None or a callable optimizer -> LRScheduler, "
                f"got {lr_scheduler!r}."
            )
        if (
            isinstance(label_smoothing, bool)
            or not isinstance(label_smoothing, (int, float))
            or not 0.0 <= label_smoothing < 1.0
        ):
            raise ValueError(
                f"ImageClassifier: `label_smoothing` must be a float in [0, 1), got {label_smoothing!r}."
            )
        if privileged_weight is not None and (
            isinstance(privileged_weight, bool)
            or not isinstance(privileged_weight, (int, float))
            or not privileged_weight >= 0
        ):
            raise ValueError(
                f"ImageClassifier: `privileged_weight` must be None or a number >= 0, got {privileged_weight!r}."
            )
        if feature_layer is not None and (not isinstance(feature_layer, str) or not feature_layer):
            raise ValueError(f"ImageClassifier: `feature_layer` must be None or a submodule name, got {feature_layer!r}.")
        self.privileged_weight = None if privileged_weight is None else float(privileged_weight)
        self.feature_layer = feature_layer
        self._tap = None
        self.net = net
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.label_smoothing = float(label_smoothing)
        self._save_plain_hyperparameters()

        self.num_classes = _infer_num_classes(net)
        self.train_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(self.num_classes, average="micro")

    def _save_plain_hyperparameters(self) -> None:
        save_plain_hyperparameters(
            self,
            {
                "label_smoothing": self.label_smoothing,
                "privileged_weight": self.privileged_weight,
                "feature_layer": self.feature_layer,
            },
            nets={"net": self.net},
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
        )

    # ------------------------------------------------------------------------------------------
    # checks
    # ------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Check the net against the trainer's :class:`ClassificationDataModule` (class count, image shape)."""
        from lightning_eff.data.base import ClassificationDataModule

        super().setup(stage)  # ProcessGroupCleanup
        trainer = getattr(self, "_trainer", None)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if isinstance(datamodule, ClassificationDataModule):
            self.check_datamodule(datamodule)

    def check_datamodule(self, datamodule: Any) -> None:
        """Raise ``ValueError`` unless ``net`` maps ``datamodule.image_shape`` images to ``num_classes`` logits."""
        image_shape = tuple(datamodule.image_shape)
        num_classes = datamodule.num_classes
        name, net_name = type(datamodule).__name__, type(self.net).__name__
        if num_classes != self.num_classes:
            raise ValueError(
                f"ImageClassifier: the datamodule {name} has num_classes={num_classes} but the net {net_name} "
                f"predicts {self.num_classes} classes; build the net with num_classes={num_classes}."
            )
        param = next(self.net.parameters(), None)
        if param is not None and param.is_meta:
            return
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                out = self.net(torch.zeros(2, *image_shape, device=device, dtype=dtype))
        except Exception as err:
            raise ValueError(
                f"ImageClassifier: the net {net_name} cannot process the images of the datamodule {name} "
                f"(image_shape={image_shape}): {err}"
            ) from err
        finally:
            self.net.train(was_training)
        if not isinstance(out, Tensor) or tuple(out.shape) != (2, num_classes):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"ImageClassifier: the net {net_name} maps images of shape {image_shape} from {name} to {got}; "
                f"expected logits [B, {num_classes}] (num_classes={num_classes})."
            )

    def _check_finite(self, loss: Tensor, stage: str, batch_idx: int) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"ImageClassifier: the {stage} loss is {loss.item()} at epoch {self.current_epoch}, batch {batch_idx} "
                f"(global step {self.global_step}); lower the learning rate or check the inputs."
            )

    # ------------------------------------------------------------------------------------------
    # steps
    # ------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of images ``x``."""
        return self.net(x)

    def _shared_step(self, batch: Any, batch_idx: int, stage: str, metric: MulticlassAccuracy) -> Tensor:
        x, y, *privileged = batch
        if privileged:  # (x, y, F): DRUPI's labels, see training_step
            logits, priv = self._privileged_forward(x, privileged[0])
        else:
            logits, priv = self(x), None
        # ``y``: class indices [B], or class probabilities [B, K] (soft labels, e.g. from
        # SyntheticSetDataModule(use_soft_labels=True)): cross-entropy against the distribution,
        # accuracy against its arg-max
        soft = y.is_floating_point() and y.ndim == 2
        if soft and y.shape != logits.shape:
            raise ValueError(
                f"{type(self).__name__}: soft targets of shape {tuple(y.shape)} do not match the logits "
                f"{tuple(logits.shape)}"
            )
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if priv is not None:
            weight, term = priv
            loss = loss + weight * term
            self.log(f"{stage}/privileged_loss", term.detach(), on_step=False, on_epoch=True, sync_dist=True)
        self._check_finite(loss, stage, batch_idx)
        metric.update(logits.detach(), y.argmax(1) if soft else y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=on_step, sync_dist=True)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Cross-entropy on one ``(images, labels)`` batch (labels: indices, or probabilities ``[B, K]``).

        A third element ``F`` (``SyntheticSetDataModule(use_privileged=True)``: DRUPI's privileged
        labels) adds ``weight * MSE(pool(E(x)), F)`` with ``E`` the output of ``feature_layer``; kind,
        pooling, layer and weight default to what the set stores (DRUPI, arXiv 2410.01611, Eq. 2).
        """
        return self._shared_step(batch, batch_idx, "train", self.train_acc)

    def _privileged_forward(self, x: Tensor, target: Tensor) -> tuple[Tensor, tuple[float, Tensor]]:
        """``(logits, (weight, MSE(pool(E(x)), target)))`` in one forward pass."""
        from lightning_eff.models.privileged import FeatureTap, pool_privileged, privileged_loss

        trainer = getattr(self, "_trainer", None)
        info = getattr(getattr(trainer, "datamodule", None), "privileged_info", None)
        if not info:
            raise ValueError(
                f"{type(self).__name__}: the training batches carry privileged labels, but the DataModule does not "
                f"describe them (use SyntheticSetDataModule(use_privileged=True) on a set saved by DRUPI)."
            )
        weight = self.privileged_weight if self.privileged_weight is not None else float(info.get("weight", 0.0))
        layer = self.feature_layer or info.get("layer") or "encoder"
        if self._tap is None:
            self._tap = FeatureTap(self.net, layer, where=f"{type(self).__name__}: privileged labels need `feature_layer`")
        self._tap.active = True
        try:
            logits = self(x)
            feats = self._tap.take()
        finally:
            self._tap.active = False
        kind, pooling = info.get("kind", "feature"), info.get("pooling", "avg")
        if feats.ndim != 4 or target[0].numel() != pool_privileged(feats[:1], kind, pooling)[0].numel():
            raise ValueError(
                f"{type(self).__name__}: privileged labels of kind {kind!r} hold {target[0].numel()} values per image "
                f"but `{layer}` of {type(self.net).__name__} gives {tuple(feats.shape[1:])}: train the student with "
                f"the architecture the labels were learned with."
            )
        return logits, (weight, privileged_loss(feats, target, kind, pooling))

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Validation loss and accuracy."""
        return self._shared_step(batch, batch_idx, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Test loss and accuracy."""
        return self._shared_step(batch, batch_idx, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Logits of a batch of images (``(images, labels)`` batches are accepted too)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    def configure_optimizers(self) -> Any:
        """``optimizer(self.parameters())``, plus ``lr_scheduler(optimizer)`` when given."""
        return optimizer_config(self.optimizer, self.parameters(), self.lr_scheduler, monitor="val/loss")
