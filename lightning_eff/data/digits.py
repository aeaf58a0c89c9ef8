"""scikit-learn's bundled handwritten digits as a ``LightningDataModule`` (the embedded default data).

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 grey-scale digit images (pixel values 0..16, 10
classes) inside scikit-learn, so every image pipeline in this package runs on a fresh machine with nothing
to download.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightning_eff.data.base import (
    ClassificationDataModule,
    ImageTensorDataset,
    _check_fraction,
    _stratified_split,
)
from lightning_eff.utils.checks import check_choice, check_int

__all__ = ["DigitsDataModule"]

_NUM_IMAGES = 1797
_NUM_CLASSES = 10
_MAX_PIXEL = 16.0


class DigitsDataModule(ClassificationDataModule):
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) with a seeded stratified split.

    Images are scaled to ``[0, 1]``, optionally resized (bilinear, no antialiasing) and replicated to 3
    channels, then normalised with the per-channel mean/std of the training split. All splits are held in
    memory as tensors; ``setup`` is idempotent and ``prepare_data`` does nothing.

    The ``val_fraction`` and ``test_fraction`` are fractions of all 1,797 images: the test split is drawn
    first (stratified by class), then the validation split from the rest. ``val_fraction=0`` uses the test
    split for validation.

    Args:
        image_size: side of the square images, one of 8 (native), 16, 32.
        channels: 1 (grey) or 3 (grey replicated, for RGB networks).
        val_fraction: fraction of all images used for validation, in ``[0, 1)``.
        test_fraction: fraction of all images used for testing, in ``(0, 1)``.
        seed: seed of the stratified split (same seed, same split).
        batch_size: batch size of the dataloaders.
        num_workers: dataloader worker processes.
        normalize: normalise with the training split's per-channel mean/std; if ``False`` the statistics are
            the identity (mean 0, std 1) and images stay in ``[0, 1]``.

    Example::

        >>> dm = DigitsDataModule(image_size=16, channels=3)
        >>> dm.num_classes, dm.image_shape
        (10, (3, 16, 16))
        >>> dm.setup()
        >>> len(dm.train_set), len(dm.val_set), len(dm.test_set)
        (1258, 180, 359)
        >>> x, y = dm.train_set[0]
        >>> tuple(x.shape), type(y).__name__
        ((3, 16, 16), 'int')
    """

    def __init__(
        self,
        image_size: int = 8,
        channels: int = 1,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        normalize: bool = True,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        name = type(self).__name__
        check_int(image_size, "image_size", owner=name)
        self.image_size = check_choice(image_size, "image_size", (8, 16, 32), owner=name)
        check_int(channels, "channels", owner=name)
        self.channels = check_choice(channels, "channels", (1, 3), owner=name)
        self.val_fraction = _check_fraction(name, "val_fraction", val_fraction, allow_zero=True)
        self.test_fraction = _check_fraction(name, "test_fraction", test_fraction, allow_zero=False)
        self.seed = check_int(seed, "seed", owner=name)
        if not isinstance(normalize, bool):
            raise TypeError(f"{name}: `normalize` must be a bool, got {normalize!r}.")
        self.use_normalization = normalize

        self.num_test = round(self.test_fraction * _NUM_IMAGES)
        self.num_val = round(self.val_fraction * _NUM_IMAGES)
        self.num_train = _NUM_IMAGES - self.num_test - self.num_val
        min_fraction = math.ceil(_NUM_CLASSES / _NUM_IMAGES * 1e4) / 1e4
        for arg, count, frac in (
            ("test_fraction", self.num_test, self.test_fraction),
            ("val_fraction", self.num_val, self.val_fraction),
        ):
            if frac > 0 and count < _NUM_CLASSES:
                raise ValueError(
                    f"{name}: `{arg}`={frac} gives {count} of {_NUM_IMAGES} images, fewer than the "
                    f"{_NUM_CLASSES} classes a stratified split needs; use 0 or >= {min_fraction}."
                )
        if self.num_train < _NUM_CLASSES:
            raise ValueError(
                f"{name}: `val_fraction`={self.val_fraction} + `test_fraction`={self.test_fraction} leave "
                f"{self.num_train} training images; their sum must leave at least {_NUM_CLASSES}."
            )
        self.save_hyperparameters()

        self._num_classes = _NUM_CLASSES
        self._image_shape = (self.channels, self.image_size, self.image_size)
        self._class_names = [str(i) for i in range(_NUM_CLASSES)]
        self.split_indices: dict[str, torch.Tensor] | None = None
        if not self.use_normalization:
            self._mean = (0.0,) * self.channels
            self._std = (1.0,) * self.channels

    def prepare_data(self) -> None:
        """Nothing to download: the data ships with scikit-learn."""

    def _load_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All 1,797 images as float ``[N, C, S, S]`` in ``[0, 1]`` and their labels ``[N]``."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).div_(_MAX_PIXEL).unsqueeze(1)
        targets = torch.as_tensor(digits.target, dtype=torch.long)
        if self.image_size != images.shape[-1]:
            images = F.interpolate(
                images,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=False,
            )
        if self.channels == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
        return images, targets

    def setup(self, stage: str | None = None) -> None:
        """Load the digits, split them (seeded, stratified) and normalise; does nothing the second time."""
        if self._train_set is not None:
            return
        images, targets = self._load_images()
        train_val_idx, test_idx = _stratified_split(targets, self.num_test, self.seed)
        if self.num_val > 0:
            train_idx, val_idx = _stratified_split(targets, self.num_val, self.seed, indices=train_val_idx)
        else:
            train_idx, val_idx = train_val_idx, test_idx

        if self.use_normalization:
            train = images[train_idx]
            mean = train.mean(dim=(0, 2, 3))
            std = train.std(dim=(0, 2, 3), correction=0)
            self._mean = tuple(float(v) for v in mean)
            self._std = tuple(float(v) for v in std)
            images = (images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)

        self._train_targets = targets[train_idx]
        self._train_set = ImageTensorDataset(images[train_idx], targets[train_idx])
        self._test_set = ImageTensorDataset(images[test_idx], targets[test_idx])
        self._val_set = (
            self._test_set if self.num_val == 0 else ImageTensorDataset(images[val_idx], targets[val_idx])
        )
        self.split_indices = {"train": train_idx, "val": val_idx, "test": test_idx}
