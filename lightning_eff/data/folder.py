"""A ``LightningDataModule`` over local ``ImageFolder`` trees (``<root>/<split>/<class>/<image>``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_eff.data.base import (
    ClassificationDataModule,
    _check_root,
    _check_stats,
)
from lightning_eff.utils.checks import check_choice, check_int

__all__ = ["ImageFolderDataModule"]


class _TransformedDataset(Dataset):
    """Applies ``transform`` to the image of each ``(image, label)`` item of ``base``."""

    def __init__(self, base: Dataset, transform: Callable[[Any], Tensor]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), int(label)


class ImageFolderDataModule(ClassificationDataModule):
    """Image classification from local folders in torchvision's ``ImageFolder`` layout.

    ``<root>/<train_dir>/<class>/*.png`` (any extension ``ImageFolder`` reads); the validation and test folders
    must hold the same class sub-folders as the training folder. Images are resized to
    ``image_size x image_size``, converted to ``channels`` channels and normalised with ``mean``/``std``; when
    these are not given they are computed (per channel, in ``[0, 1]`` pixel units, after resizing) from up to
    ``stats_max_images`` training images drawn with ``seed``.

    If ``val_dir`` is ``None`` the test folder is used for validation; if ``test_dir`` is ``None`` the
    validation folder is used for testing; one of them must be given.

    Args:
        root: dataset root.
        image_size: side of the square images after resizing.
        train_dir: training folder, relative to ``root``.
        val_dir: validation folder, relative to ``root`` (or ``None``).
        test_dir: test folder, relative to ``root`` (or ``None``).
        mean: per-channel mean (``channels`` floats in ``[0, 1]`` units), or ``None`` to compute it.
        std: per-channel std, or ``None`` to compute it (give both or neither).
        channels: 3 (RGB) or 1 (grey-scale).
        augment: random crop (``image_size // 8`` px zero padding) + horizontal flip on the training set.
        stats_max_images: at most this many training images are read to compute ``mean``/``std``.
        seed: seed of the image draw for the statistics.
        batch_size: batch size of the dataloaders.
        num_workers: dataloader worker processes.

    Raises:
        FileNotFoundError: (on first access of the data or ``num_classes``) when a folder is missing.

    Example::

        >>> import tempfile
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> for split in ("train", "val"):
        ...     for cls in ("cat", "dog"):
        ...         (root / split / cls).mkdir(parents=True)
        ...         for i in range(3):
        ...             Image.new("RGB", (20, 20), (40 * i, 100, 200)).save(root / split / cls / f"{i}.png")
        >>> dm = ImageFolderDataModule(root, image_size=16)
        >>> dm.num_classes, dm.class_names, dm.image_shape
        (2, ['cat', 'dog'], (3, 16, 16))
        >>> dm.setup()
        >>> len(dm.train_set), dm.class_images(1).shape
        (6, torch.Size([3, 3, 16, 16]))
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int = 32,
        train_dir: str = "train",
        val_dir: str | None = "val",
        test_dir: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels: int = 3,
        augment: bool = False,
        stats_max_images: int = 1000,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        name = type(self).__name__
        self.root = _check_root(name, root)
        self.image_size = check_int(image_size, "image_size", minimum=1, owner=name)
        for arg, value, optional in (
            ("train_dir", train_dir, False),
            ("val_dir", val_dir, True),
            ("test_dir", test_dir, True),
        ):
            if not (isinstance(value, str) and value) and not (optional and value is None):
                allowed = "a non-empty str" + (" or None" if optional else "")
                raise TypeError(f"{name}: `{arg}` must be {allowed}, got {value!r}.")
        if val_dir is None and test_dir is None:
            raise ValueError(f"{name}: `val_dir` and `test_dir` are both None; give at least one of them.")
        self.train_dir, self.val_dir, self.test_dir = train_dir, val_dir, test_dir
        check_int(channels, "channels", owner=name)
        self.channels = check_choice(channels, "channels", (1, 3), owner=name)
        if (mean is None) != (std is None):
            raise ValueError(
                f"{name}: give both `mean` and `std` or neither, got mean={mean!r}, std={std!r}."
            )
        if mean is not None:
            self._mean = _check_stats(name, "mean", mean, self.channels, positive=False)
            self._std = _check_stats(name, "std", std, self.channels, positive=True)
        if not isinstance(augment, bool):
            raise TypeError(f"{name}: `augment` must be a bool, got {augment!r}.")
        self.augment = augment
        self.stats_max_images = check_int(stats_max_images, "stats_max_images", minimum=1, owner=name)
        self.seed = check_int(seed, "seed", owner=name)
        self.save_hyperparameters(
            {
                "root": self.root,
                "image_size": image_size,
                "train_dir": train_dir,
                "val_dir": val_dir,
                "test_dir": test_dir,
                "mean": None if mean is None else list(self._mean or ()),
                "std": None if std is None else list(self._std or ()),
                "channels": channels,
                "augment": augment,
                "stats_max_images": stats_max_images,
                "seed": seed,
                "batch_size": batch_size,
                "num_workers": num_workers,
            }
        )
        self._image_shape = (self.channels, self.image_size, self.image_size)

    # ------------------------------------------------------------------------------------------
    # folders
    # ------------------------------------------------------------------------------------------
    def _folder(self, sub: str) -> Path:
        path = Path(self.root) / sub
        if not path.is_dir():
            raise FileNotFoundError(
                f"{type(self).__name__}: image folder '{path}' not found (root='{self.root}', '{sub}'); expected "
                f"'{path}/<class name>/<image files>'."
            )
        return path

    def _scan_classes(self) -> None:
        from torchvision.datasets.folder import find_classes

        classes, _ = find_classes(self._folder(self.train_dir))
        self._class_names = list(classes)
        self._num_classes = len(classes)

    @property
    def num_classes(self) -> int:
        """Number of class sub-folders of the training folder (scanned on first access)."""
        if self._num_classes is None:
            self._scan_classes()
        return super().num_classes

    @property
    def class_names(self) -> list[str]:
        """Class sub-folder names of the training folder, sorted (label ``i`` is ``class_names[i]``)."""
        if self._class_names is None:
            self._scan_classes()
        return super().class_names

    # ------------------------------------------------------------------------------------------
    # transforms
    # ------------------------------------------------------------------------------------------
    def _transform(self, normalize: bool, augment: bool) -> Callable[[Any], Tensor]:
        from torchvision.transforms import v2

        steps: list[Any] = [v2.Resize((self.image_size, self.image_size))]
        if self.channels == 1:
            steps.append(v2.Grayscale(num_output_channels=1))
        steps.append(v2.ToImage())
        if augment:
            steps += [
                v2.RandomCrop(self.image_size, padding=max(1, self.image_size // 8)),
                v2.RandomHorizontalFlip(),
            ]
        steps.append(v2.ToDtype(torch.float32, scale=True))
        if normalize:
            steps.append(v2.Normalize(mean=list(self.mean), std=list(self.std)))
        steps.append(v2.ToPureTensor())
        return v2.Compose(steps)

    def _compute_stats(self, base: Dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean/std (population) over up to ``stats_max_images`` resized training images."""
        transform = self._transform(normalize=False, augment=False)
        count = min(len(base), self.stats_max_images)  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(self.seed)
        picks = torch.randperm(len(base), generator=generator)[:count]  # type: ignore[arg-type]
        total = torch.zeros(self.channels, dtype=torch.float64)
        total_sq = torch.zeros(self.channels, dtype=torch.float64)
        from lightning.pytorch.utilities import rank_zero_only
        from tqdm.auto import tqdm

        desc = f"{type(self).__name__}: mean/std of {count} images"
        for i in tqdm(
            picks.tolist(), desc=desc, leave=False, disable=rank_zero_only.rank != 0 or count < 100
        ):
            x = transform(base[i][0]).to(torch.float64)
            total += x.sum(dim=(1, 2))
            total_sq += x.square().sum(dim=(1, 2))
        pixels = count * self.image_size * self.image_size
        mean = total / pixels
        std = (total_sq / pixels - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)

    # ------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Check that the folders exist (nothing downloads)."""
        for sub in (self.train_dir, self.val_dir, self.test_dir):
            if sub is not None:
                self._folder(sub)

    def setup(self, stage: str | None = None) -> None:
        """Index the folders, compute the statistics if needed and build the datasets; idempotent."""
        if self._train_set is not None:
            return
        from torchvision.datasets import ImageFolder

        train = ImageFolder(str(self._folder(self.train_dir)))
        self._class_names = list(train.classes)
        self._num_classes = len(train.classes)
        others: dict[str, ImageFolder] = {}
        for sub in (self.val_dir, self.test_dir):
            if sub is None or sub in others:
                continue
            folder = ImageFolder(str(self._folder(sub)))
            if folder.classes != train.classes:
                raise ValueError(
                    f"{type(self).__name__}: the class folders of '{Path(self.root) / sub}' {folder.classes} differ "
                    f"from those of the training folder '{Path(self.root) / self.train_dir}' {train.classes}."
                )
            others[sub] = folder
        if self._mean is None:
            self._mean, self._std = self._compute_stats(train)

        plain = self._transform(normalize=True, augment=False)
        self._train_targets = torch.tensor(train.targets, dtype=torch.long)
        self._plain_train_set = _TransformedDataset(train, plain)
        self._train_set = (
            _TransformedDataset(train, self._transform(normalize=True, augment=True))
            if self.augment
            else self._plain_train_set
        )
        val_sub = self.val_dir if self.val_dir is not None else self.test_dir
        test_sub = self.test_dir if self.test_dir is not None else self.val_dir
        assert val_sub is not None and test_sub is not None
        self._val_set = _TransformedDataset(others[val_sub], plain)
        self._test_set = (
            self._val_set if test_sub == val_sub else _TransformedDataset(others[test_sub], plain)
        )
