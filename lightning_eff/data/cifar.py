"""CIFAR-10 / CIFAR-100 ``LightningDataModule``\\ s reading a local root (nothing downloads).

The folder layout is torchvision's (``<root>/cifar-10-batches-py``, ``<root>/cifar-100-python``: the
extracted official "python version" archives). The pickled batches are read here directly rather than through
``torchvision.datasets.CIFAR10``, whose loader insists on the MD5 sums of the official files (so it cannot read
a re-packed or test copy) and returns PIL images one at a time; holding the images as one ``uint8`` tensor
lets :meth:`~lightning_eff.data.ClassificationDataModule.class_images` gather a class in one indexing op.
File names and meta keys are taken from torchvision's classes so the layout stays identical.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100

from lightning_eff.data.base import ClassificationDataModule, _check_fraction, _check_root, _stratified_split
from lightning_eff.utils.checks import check_int

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule"]


class _UInt8ImageDataset(Dataset):
    """``(normalised float image, int label)`` view of rows ``indices`` of a ``uint8 [N, C, H, W]`` tensor."""

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        indices: Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool,
    ) -> None:
        self.images = images
        self.targets = targets
        self.indices = indices
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.augment = None
        if augment:
            from torchvision.transforms import v2

            size = images.shape[-1]
            self.augment = v2.Compose([v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        j = self.indices[index]
        x = self.images[j]
        if self.augment is not None:
            x = self.augment(x)
        return (x.float() / 255.0 - self.mean) / self.std, int(self.targets[j])


class _CIFARDataModule(ClassificationDataModule):
    """Shared implementation of the CIFAR DataModules (see :class:`CIFAR10DataModule`)."""

    _torchvision_cls: type[CIFAR10] = CIFAR10
    _display_name = "CIFAR-10"
    _NUM_CLASSES = 10
    _MEAN: tuple[float, ...] = ()
    _STD: tuple[float, ...] = ()

    image_size = 32

    def __init__(
        self,
        root: str | Path,
        val_fraction: float = 0.0,
        augment: bool = False,
        seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        name = type(self).__name__
        self.root = _check_root(name, root)
        self.val_fraction = _check_fraction(name, "val_fraction", val_fraction, allow_zero=True)
        if not isinstance(augment, bool):
            raise TypeError(f"{name}: `augment` must be a bool, got {augment!r}.")
        self.augment = augment
        self.seed = check_int(seed, "seed", owner=name)
        self.save_hyperparameters(
            {
                "root": self.root,
                "val_fraction": self.val_fraction,
                "augment": augment,
                "seed": seed,
                "batch_size": batch_size,
                "num_workers": num_workers,
            }
        )
        self._num_classes = self._NUM_CLASSES
        self._image_shape = (3, 32, 32)
        self._mean = self._MEAN
        self._std = self._STD
        self._train_images_u8: Tensor | None = None
        self._train_index: Tensor | None = None

    # ------------------------------------------------------------------------------------------
    # files
    # ------------------------------------------------------------------------------------------
    @property
    def folder(self) -> Path:
        """The folder holding the extracted archive, e.g. ``<root>/cifar-10-batches-py``."""
        return Path(self.root) / self._torchvision_cls.base_folder

    def _file_names(self) -> list[str]:
        tv = self._torchvision_cls
        return [n for n, _ in tv.train_list] + [n for n, _ in tv.test_list] + [tv.meta["filename"]]

    def _check_files(self) -> None:
        folder = self.folder
        missing = [n for n in self._file_names() if not (folder / n).is_file()]
        if missing:
            tv = self._torchvision_cls
            where = (
                f"folder '{folder}' does not exist"
                if not folder.is_dir()
                else f"missing: {', '.join(missing)}"
            )
            raise FileNotFoundError(
                f"{self._display_name} not found: expected the extracted archive at '{folder}' ({where}). "
                f"Place the extracted '{tv.filename}' (from {tv.url}) there, i.e. extract it into '{self.root}' "
                f"so that '{folder}' holds {', '.join(self._file_names())}. Nothing is downloaded automatically."
            )

    def _unpickle(self, name: str) -> dict[str, Any]:
        path = self.folder / name
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise RuntimeError(
                f"{self._display_name}: could not read '{path}' as a CIFAR pickle: {err}"
            ) from err

    def _load_split(self, names: list[str]) -> tuple[Tensor, Tensor]:
        data, labels = [], []
        for name in names:
            entry = self._unpickle(name)
            key = "labels" if "labels" in entry else "fine_labels"
            if "data" not in entry or key not in entry:
                raise RuntimeError(
                    f"{self._display_name}: '{self.folder / name}' lacks the keys 'data' and 'labels'/'fine_labels'."
                )
            array = np.asarray(entry["data"], dtype=np.uint8)
            if array.ndim != 2 or array.shape[1] != 3 * 32 * 32 or len(array) != len(entry[key]):
                raise RuntimeError(
                    f"{self._display_name}: '{self.folder / name}' has data of shape {array.shape} for "
                    f"{len(entry[key])} labels; expected [N, 3072]."
                )
            data.append(array)
            labels.extend(int(v) for v in entry[key])
        images = torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32).copy())
        targets = torch.tensor(labels, dtype=torch.long)
        if len(targets) and not (0 <= int(targets.min()) and int(targets.max()) < self._NUM_CLASSES):
            raise RuntimeError(
                f"{self._display_name}: labels in '{self.folder}' must lie in [0, {self._NUM_CLASSES}), "
                f"got range [{int(targets.min())}, {int(targets.max())}]."
            )
        return images, targets

    # ------------------------------------------------------------------------------------------
    # LightningDataModule hooks
    # ------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Check that the files are in place (nothing downloads)."""
        self._check_files()

    def setup(self, stage: str | None = None) -> None:
        """Load the batches, split off the validation set (seeded, stratified); idempotent."""
        if self._train_set is not None:
            return
        self._check_files()
        tv = self._torchvision_cls
        train_images, train_targets = self._load_split([n for n, _ in tv.train_list])
        test_images, test_targets = self._load_split([n for n, _ in tv.test_list])
        names = self._unpickle(tv.meta["filename"]).get(tv.meta["key"])
        if names is None or len(names) != self._NUM_CLASSES:
            raise RuntimeError(
                f"{self._display_name}: '{self.folder / tv.meta['filename']}' must hold {self._NUM_CLASSES} "
                f"class names under the key '{tv.meta['key']}'."
            )

        n_val = round(self.val_fraction * len(train_targets))
        if self.val_fraction > 0 and n_val < self._NUM_CLASSES:
            raise ValueError(
                f"{type(self).__name__}: `val_fraction`={self.val_fraction} gives {n_val} of {len(train_targets)} "
                f"training images, fewer than the {self._NUM_CLASSES} classes a stratified split needs."
            )
        if n_val > 0:
            train_idx, val_idx = _stratified_split(train_targets, n_val, self.seed)
        else:
            train_idx, val_idx = torch.arange(len(train_targets)), torch.empty(0, dtype=torch.long)

        stats = (self.mean, self.std)
        self._class_names = [str(n) for n in names]
        self._train_images_u8 = train_images
        self._train_index = train_idx
        self._train_targets = train_targets[train_idx]
        self._train_set = _UInt8ImageDataset(
            train_images, train_targets, train_idx, *stats, augment=self.augment
        )
        self._plain_train_set = _UInt8ImageDataset(
            train_images, train_targets, train_idx, *stats, augment=False
        )
        self._test_set = _UInt8ImageDataset(
            test_images, test_targets, torch.arange(len(test_targets)), *stats, augment=False
        )
        self._val_set = (
            _UInt8ImageDataset(train_images, train_targets, val_idx, *stats, augment=False)
            if n_val > 0
            else self._test_set
        )

    def _train_images(self, indices: Tensor) -> Tensor:
        """Vectorised un-augmented normalised training images at ``indices`` (into ``train_set``)."""
        assert self._train_images_u8 is not None and self._train_index is not None
        x = self._train_images_u8[self._train_index[indices]].float().div_(255.0)
        return self.normalize(x)


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 from a local root (``<root>/cifar-10-batches-py``, the extracted official archive).

    Normalised with the standard statistics mean ``(0.4914, 0.4822, 0.4465)``, std
    ``(0.2023, 0.1994, 0.2010)``. A seeded stratified ``val_fraction`` of the training set is held out for
    validation (``0`` validates on the test set). With ``augment=True`` the training set is randomly cropped
    (4 px zero padding) and flipped horizontally; validation, test and ``class_images`` never are.

    Args:
        root: folder that contains ``cifar-10-batches-py``.
        val_fraction: fraction of the 50,000 training images held out for validation, in ``[0, 1)``.
        augment: random crop + horizontal flip on the training set.
        seed: seed of the validation split.
        batch_size: batch size of the dataloaders.
        num_workers: dataloader worker processes.

    Raises:
        FileNotFoundError: in ``prepare_data``/``setup`` when the folder or one of its files is missing; the
            message names the expected folder.

    Example::

        >>> dm = CIFAR10DataModule(root="/nonexistent")
        >>> dm.num_classes, dm.image_shape, dm.mean
        (10, (3, 32, 32), (0.4914, 0.4822, 0.4465))
        >>> dm.setup()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        FileNotFoundError: CIFAR-10 not found: expected the extracted archive at '/nonexistent/cifar-10-batches-py' ...
    """

    _torchvision_cls = CIFAR10
    _display_name = "CIFAR-10"
    _NUM_CLASSES = 10
    _MEAN = (0.4914, 0.4822, 0.4465)
    _STD = (0.2023, 0.1994, 0.2010)


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (fine labels) from a local root (``<root>/cifar-100-python``, the extracted official archive).

    Normalised with the standard statistics mean ``(0.5071, 0.4866, 0.4409)``, std
    ``(0.2673, 0.2564, 0.2762)``; split and augmentation as in :class:`CIFAR10DataModule`.

    Args:
        root: folder that contains ``cifar-100-python``.
        val_fraction: fraction of the 50,000 training images held out for validation, in ``[0, 1)``.
        augment: random crop + horizontal flip on the training set.
        seed: seed of the validation split.
        batch_size: batch size of the dataloaders.
        num_workers: dataloader worker processes.

    Raises:
        FileNotFoundError: in ``prepare_data``/``setup`` when the folder or one of its files is missing.

    Example::

        >>> dm = CIFAR100DataModule(root="/nonexistent", val_fraction=0.1)
        >>> dm.num_classes, dm.image_shape, str(dm.folder)
        (100, (3, 32, 32), '/nonexistent/cifar-100-python')
    """

    _torchvision_cls = CIFAR100
    _display_name = "CIFAR-100"
    _NUM_CLASSES = 100
    _MEAN = (0.5071, 0.4866, 0.4409)
    _STD = (0.2673, 0.2564, 0.2762)
