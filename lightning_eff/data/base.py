"""Shared base for image-classification ``LightningDataModule``\\ s.

Every image DataModule in :mod:`lightning_eff.data` derives from :class:`ClassificationDataModule`, so that
other components (dataset distillation, data selection, the evaluator) can rely on one API: the class
count and image shape, the normalisation statistics, per-class access to the (un-augmented) training
images, and the usual train / val / test dataloaders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from lightning_eff.utils.checks import check_int
from lightning_eff.utils.loaders import SplitDataLoaders

__all__ = ["ClassificationDataModule", "ImageTensorDataset"]


# --------------------------------------------------------------------------------------------------
# argument checks shared by the DataModules
# --------------------------------------------------------------------------------------------------
def _check_root(owner: str, root: Any) -> str:
    """``root`` (a local data folder) as a ``str``; a ``TypeError`` naming it otherwise."""
    if not isinstance(root, (str, Path)):
        raise TypeError(f"{owner}: `root` must be a str or pathlib.Path, got {root!r} ({type(root).__name__}).")
    return str(root)


def _check_fraction(owner: str, name: str, value: Any, allow_zero: bool = True) -> float:
    """Return ``value`` as a float if it lies in ``[0, 1)`` (``(0, 1)`` without ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{owner}: `{name}` must be a float, got {value!r} ({type(value).__name__}).")
    value = float(value)
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value < 1.0) or math.isnan(value):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{owner}: `{name}` must be a fraction in {interval}, got {value!r}.")
    return value


def _check_stats(owner: str, name: str, value: Any, channels: int, positive: bool) -> tuple[float, ...]:
    """Return per-channel statistics as a tuple of ``channels`` floats, else raise."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{owner}: `{name}` must be a sequence of {channels} floats, got {value!r}.")
    if len(value) != channels or not all(isinstance(v, Real) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{owner}: `{name}` must have one float per channel ({channels}), got {value!r}.")
    out = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in out) or (positive and not all(v > 0 for v in out)):
        what = "positive finite" if positive else "finite"
        raise ValueError(f"{owner}: `{name}` must be {what} floats, got {value!r}.")
    return out


def _stratified_split(
    targets: Tensor, n_split: int, seed: int, indices: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Split ``indices`` (default: all) into ``(rest, split)`` with ``n_split`` stratified samples.

    Uses scikit-learn's ``train_test_split`` with ``random_state=seed``; both outputs are sorted.
    """
    from sklearn.model_selection import train_test_split

    if indices is None:
        indices = torch.arange(len(targets))
    rest, split = train_test_split(
        indices.numpy(), test_size=n_split, stratify=targets[indices].numpy(), random_state=seed
    )
    return torch.as_tensor(rest).sort().values, torch.as_tensor(split).sort().values


class ImageTensorDataset(TensorDataset):
    """A ``TensorDataset`` of ``(image, label)`` that yields the label as a Python ``int``.

    Args:
        images: float tensor ``[N, C, H, W]``.
        targets: integer tensor ``[N]``.

    Example::

        >>> ds = ImageTensorDataset(torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
        >>> x, y = ds[2]
        >>> tuple(x.shape), y
        ((1, 8, 8), 2)
    """

    def __init__(self, images: Tensor, targets: Tensor) -> None:
        if images.ndim != 4:
            raise ValueError(
                f"ImageTensorDataset: `images` must be [N, C, H, W], got shape {tuple(images.shape)}."
            )
        if targets.ndim != 1 or len(targets) != len(images):
            raise ValueError(
                f"ImageTensorDataset: `targets` must be [N] with N={len(images)}, got shape {tuple(targets.shape)}."
            )
        super().__init__(images, targets.long())

    def __getitem__(self, index: int) -> tuple[Tensor, int]:  # type: ignore[override]
        return self.tensors[0][index], int(self.tensors[1][index])


class ClassificationDataModule(SplitDataLoaders, L.LightningDataModule):
    """Base ``LightningDataModule`` for image classification.

    Subclasses fill in the protected attributes (``_num_classes``, ``_image_shape``, ``_mean``, ``_std``,
    ``_class_names``) as soon as they are known (cheap ones in ``__init__``, the rest in ``setup``) and, in
    ``setup``, the datasets ``_train_set``, ``_val_set``, ``_test_set`` and the training labels
    ``_train_targets``. Datasets yield ``(normalised image tensor [C, H, W], int label)``.

    If the training set is augmented, a subclass sets ``_plain_train_set`` to the same samples without
    augmentation (same order), and may override :meth:`_train_images` with a vectorised version: that is what
    :meth:`class_images` reads, so per-class real images are never augmented.

    Args:
        batch_size: batch size of all three dataloaders.
        num_workers: dataloader worker processes (``persistent_workers`` is on when this is > 0).

    Example::

        >>> from lightning_eff.data import DigitsDataModule
        >>> dm = DigitsDataModule()
        >>> isinstance(dm, ClassificationDataModule), dm.num_classes, dm.image_shape
        (True, 10, (1, 8, 8))
        >>> dm.setup()
        >>> dm.class_images(3, n=5, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([5, 1, 8, 8])
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0) -> None:
        super().__init__()
        name = type(self).__name__
        self.batch_size = check_int(batch_size, "batch_size", minimum=1, owner=name)
        self.num_workers = check_int(num_workers, "num_workers", minimum=0, owner=name)
        self._num_classes: int | None = None
        self._image_shape: tuple[int, int, int] | None = None
        self._mean: tuple[float, ...] | None = None
        self._std: tuple[float, ...] | None = None
        self._class_names: list[str] | None = None
        self._train_set: Dataset | None = None
        self._plain_train_set: Dataset | None = None
        self._val_set: Dataset | None = None
        self._test_set: Dataset | None = None
        self._train_targets: Tensor | None = None
        self._class_index_cache: tuple[Tensor, list[Tensor]] | None = None

    # ------------------------------------------------------------------------------------------
    # properties
    # ------------------------------------------------------------------------------------------
    def _require(self, name: str, value: Any) -> Any:
        if value is None:
            raise RuntimeError(
                f"{type(self).__name__}.{name} is not available yet: the data must be loaded first. Call "
                f"`datamodule.setup()` (the Trainer calls it for you in fit/validate/test)."
            )
        return value

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self._require("num_classes", self._num_classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the datasets yield (after transforms)."""
        return self._require("image_shape", self._image_shape)

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean used for normalisation (in ``[0, 1]`` pixel units)."""
        return self._require("mean", self._mean)

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel standard deviation used for normalisation (in ``[0, 1]`` pixel units)."""
        return self._require("std", self._std)

    @property
    def class_names(self) -> list[str]:
        """Human-readable class names, indexed by label."""
        return list(self._require("class_names", self._class_names))

    @property
    def train_set(self) -> Dataset:
        """Training dataset (augmented if the DataModule augments)."""
        return self._require("train_set", self._train_set)

    @property
    def val_set(self) -> Dataset:
        """Validation dataset."""
        return self._require("val_set", self._val_set)

    @property
    def test_set(self) -> Dataset:
        """Test dataset."""
        return self._require("test_set", self._test_set)

    @property
    def train_targets(self) -> Tensor:
        """``LongTensor [len(train_set)]`` of training labels, aligned with ``train_set``."""
        return self._require("train_targets", self._train_targets)

    # ------------------------------------------------------------------------------------------
    # per-class access
    # ------------------------------------------------------------------------------------------
    def _class_index_lists(self) -> list[Tensor]:
        targets = self.train_targets
        if self._class_index_cache is None or self._class_index_cache[0] is not targets:
            lists = [torch.nonzero(targets == c, as_tuple=False).flatten() for c in range(self.num_classes)]
            self._class_index_cache = (targets, lists)
        return self._class_index_cache[1]

    def _check_class(self, c: Any) -> int:
        if isinstance(c, Tensor) and c.numel() == 1 and not c.is_floating_point():
            c = int(c.item())
        if isinstance(c, bool) or not isinstance(c, int):
            raise TypeError(
                f"{type(self).__name__}: class `c` must be an int, got {c!r} ({type(c).__name__})."
            )
        if not 0 <= c < self.num_classes:
            raise ValueError(
                f"{type(self).__name__}: class `c` must be in [0, {self.num_classes - 1}] "
                f"(num_classes={self.num_classes}), got {c}."
            )
        return c

    def class_indices(self, c: int) -> Tensor:
        """Indices into ``train_set`` of the samples of class ``c``.

        Args:
            c: class label in ``[0, num_classes)``.

        Returns:
            ``LongTensor`` of indices, in increasing order.
        """
        c = self._check_class(c)
        return self._class_index_lists()[c].clone()

    def class_images(self, c: int, n: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Normalised, un-augmented training images of class ``c``.

        Args:
            c: class label in ``[0, num_classes)``.
            n: how many images to draw without replacement; ``None`` returns all images of the class, in
                ``train_set`` order.
            generator: ``torch.Generator`` driving the draw (the global RNG if ``None``); the same seeded
                generator gives the same images.

        Returns:
            ``Tensor [n, C, H, W]`` (on the CPU).

        Raises:
            ValueError: if ``c`` is out of range or ``n`` exceeds the number of images of the class.
        """
        c = self._check_class(c)
        indices = self._class_index_lists()[c]
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int):
                raise TypeError(f"{type(self).__name__}.class_images: `n` must be an int or None, got {n!r}.")
            if not 0 <= n <= len(indices):
                raise ValueError(
                    f"{type(self).__name__}.class_images: `n` must be in [0, {len(indices)}] (class {c} has "
                    f"{len(indices)} training images), got n={n}."
                )
            device = generator.device if generator is not None else torch.device("cpu")
            perm = torch.randperm(len(indices), generator=generator, device=device)[:n].cpu()
            indices = indices[perm]
        if len(indices) == 0:
            return torch.empty(0, *self.image_shape)
        return self._train_images(indices)

    def _train_images(self, indices: Tensor) -> Tensor:
        """Un-augmented normalised training images at ``indices`` (into ``train_set``) as ``[n, C, H, W]``.

        Subclasses may override this with a vectorised implementation.
        """
        dataset = self._plain_train_set if self._plain_train_set is not None else self.train_set
        if isinstance(dataset, TensorDataset):
            return dataset.tensors[0][indices]
        if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
            base = torch.as_tensor(dataset.indices)[indices]
            return dataset.dataset.tensors[0][base]
        return torch.stack([dataset[int(i)][0] for i in indices])

    # ------------------------------------------------------------------------------------------
    # normalisation
    # ------------------------------------------------------------------------------------------
    def _stats_like(self, x: Tensor, fn: str) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor) or x.ndim < 3 or x.shape[-3] != len(self.mean):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__}.{fn}: expected a tensor [..., C, H, W] with C={len(self.mean)}, got {shape}."
            )
        dtype = x.dtype if x.is_floating_point() else torch.float32
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(-1, 1, 1)
        return mean, std

    def normalize(self, x: Tensor) -> Tensor:
        """Map images in ``[0, 1]`` pixel units to the normalised space: ``(x - mean) / std`` per channel.

        Args:
            x: ``[B, C, H, W]`` (or ``[C, H, W]``) tensor.
        """
        mean, std = self._stats_like(x, "normalize")
        return (x - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`: ``x * std + mean`` per channel (back to ``[0, 1]`` pixel units).

        Args:
            x: ``[B, C, H, W]`` (or ``[C, H, W]``) tensor.
        """
        mean, std = self._stats_like(x, "denormalize")
        return x * std + mean
