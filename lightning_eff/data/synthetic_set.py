"""The synthetic (or selected) set: the artefact every distillation method produces.

(Moved here from ``lightning_eff.distill.synthetic`` in issue 21: it is a data artefact, served by
:class:`~lightning_eff.data.SyntheticSetDataModule`; the old import paths still work. The file format is
unchanged.)

A :class:`SyntheticSet` holds images in the *normalised* space of the DataModule it was made from
(so students train on it exactly as on real batches), hard labels, optional soft labels, optional
privileged information (DRUPI's feature/attention labels), an optional learned learning rate
(trajectory matching) and metadata (method, IPC, dataset, image shape, normalisation, seed, library
and format versions). It saves atomically and loads back identically.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_eff.data.base import ClassificationDataModule
from lightning_eff.utils.checks import check_int
from lightning_eff.utils.io import atomic_write_bytes, load_versioned, save_versioned

__all__ = [
    "SyntheticSet",
    "SyntheticSetDataset",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "check_ipc",
    "prepared_datamodule",
    "synthetic_metadata",
]

FORMAT_NAME = "lightning-eff/synthetic-set"
FORMAT_VERSION = 1


def _library_version() -> str:
    from lightning_eff import __version__

    return __version__


class SyntheticSetDataset(Dataset):
    """``(image, label)`` pairs, or ``(image, target, privileged)`` when asked for extras.

    ``target`` is the soft-label row when ``use_soft_labels`` and the set has soft labels, else the
    hard label (an int). With ``with_privileged`` the privileged tensor of the sample is appended.
    """

    def __init__(self, synset: SyntheticSet, use_soft_labels: bool = False, with_privileged: bool = False):
        if use_soft_labels and synset.soft_labels is None:
            raise ValueError("use_soft_labels=True but the synthetic set has no soft labels")
        if with_privileged and synset.privileged is None:
            raise ValueError("with_privileged=True but the synthetic set has no privileged information")
        self.synset = synset
        self.use_soft_labels = use_soft_labels
        self.with_privileged = with_privileged

    def __len__(self) -> int:
        return len(self.synset)

    def __getitem__(self, index: int):
        s = self.synset
        target = s.soft_labels[index] if self.use_soft_labels else int(s.labels[index])
        if self.with_privileged:
            return s.images[index], target, s.privileged[index]
        return s.images[index], target


@dataclass
class SyntheticSet:
    """A distilled (or selected) dataset.

    Args:
        images: ``[N, C, H, W]`` float images in the normalised space of ``metadata["mean"/"std"]``.
        labels: ``[N]`` hard labels in ``[0, num_classes)``.
        soft_labels: optional ``[N, num_classes]`` soft labels (logits or probabilities, see
            ``metadata["soft_label_kind"]``).
        privileged: optional ``[N, ...]`` privileged information (DRUPI), see
            ``metadata["privileged"]`` for its kind, layer and weight.
        lr: optional learned learning rate (trajectory matching).
        metadata: free-form, JSON-like; the keys the library fills are ``method``, ``ipc``,
            ``dataset``, ``num_classes``, ``image_shape``, ``mean``, ``std``, ``seed``,
            ``library_version``.

    Example::

        >>> import torch
        >>> s = SyntheticSet(torch.randn(4, 1, 8, 8), torch.tensor([0, 0, 1, 1]),
        ...                  metadata={"num_classes": 2, "mean": [0.5], "std": [0.25]})
        >>> s.ipc, s.num_classes, len(s)
        (2, 2, 4)
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "set.pt")
        >>> _ = s.save(path)
        >>> SyntheticSet.load(path).equals(s)
        True
    """

    images: Tensor
    labels: Tensor
    soft_labels: Tensor | None = None
    privileged: Tensor | None = None
    lr: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or self.images.ndim != 4 or not self.images.is_floating_point():
            raise ValueError(
                f"images must be a float tensor [N, C, H, W], got {type(self.images).__name__} "
                f"{tuple(getattr(self.images, 'shape', ()))}"
            )
        self.images = self.images.detach()
        self.labels = torch.as_tensor(self.labels).detach().long()
        n = self.images.shape[0]
        if self.labels.shape != (n,):
            raise ValueError(f"labels must have shape [{n}] to match images, got {tuple(self.labels.shape)}")
        if n == 0:
            raise ValueError("a synthetic set needs at least one image")
        if self.labels.min() < 0:
            raise ValueError(f"labels must be >= 0, got min {int(self.labels.min())}")
        k = self.metadata.get("num_classes")
        if k is None:
            self.metadata["num_classes"] = k = int(self.labels.max()) + 1
        if int(self.labels.max()) >= k:
            raise ValueError(f"labels must be < num_classes={k}, got max {int(self.labels.max())}")
        if self.soft_labels is not None:
            self.soft_labels = self.soft_labels.detach()
            if self.soft_labels.shape != (n, k):
                raise ValueError(f"soft_labels must have shape [{n}, {k}], got {tuple(self.soft_labels.shape)}")
        if self.privileged is not None:
            self.privileged = self.privileged.detach()
            if self.privileged.shape[0] != n:
                raise ValueError(f"privileged must have {n} rows to match images, got {self.privileged.shape[0]}")
        if self.lr is not None:
            self.lr = float(self.lr)
            if not math.isfinite(self.lr) or self.lr <= 0:
                raise ValueError(f"lr must be a finite positive number, got {self.lr}")
        self.metadata.setdefault("image_shape", list(self.images.shape[1:]))
        self.metadata.setdefault("library_version", _library_version())

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return int(self.metadata["num_classes"])

    @property
    def ipc(self) -> int:
        """Images per class (the largest class count when classes are unequal)."""
        return int(torch.bincount(self.labels, minlength=self.num_classes).max())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def class_images(self, c: int) -> Tensor:
        return self.images[self.labels == c]

    def to(self, device: torch.device | str) -> SyntheticSet:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SyntheticSet(
            move(self.images), move(self.labels), move(self.soft_labels), move(self.privileged), self.lr,
            dict(self.metadata),
        )

    def equals(self, other: SyntheticSet) -> bool:
        """Same tensors (bit for bit), same lr and same metadata."""

        def same(a: Tensor | None, b: Tensor | None) -> bool:
            return (a is None and b is None) or (a is not None and b is not None and torch.equal(a.cpu(), b.cpu()))

        return (
            same(self.images, other.images)
            and same(self.labels, other.labels)
            and same(self.soft_labels, other.soft_labels)
            and same(self.privileged, other.privileged)
            and self.lr == other.lr
            and self.metadata == other.metadata
        )

    def storage(self) -> dict[str, int]:
        """Bytes per stored field (images, labels, soft labels, privileged information, lr) and the total.

        The storage-parity comparison of DRUPI: a set at IPC ``k - 1`` with privileged information
        against IPC ``k`` without (the bytes of the tensors as stored, not of the file's metadata).

        Example::

            >>> s = SyntheticSet(torch.zeros(10, 1, 8, 8), torch.arange(10))
            >>> s.storage()["images"], s.nbytes
            (2560, 2640)
        """
        def size(t: Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        out = {
            "images": size(self.images),
            "labels": size(self.labels),
            "soft_labels": size(self.soft_labels),
            "privileged": size(self.privileged),
            "lr": 0 if self.lr is None else 4,
        }
        out["total"] = sum(out.values())
        return out

    @property
    def nbytes(self) -> int:
        """Total bytes of the stored tensors (see :meth:`storage`)."""
        return self.storage()["total"]

    def to_dataset(self, use_soft_labels: bool = False, with_privileged: bool = False) -> SyntheticSetDataset:
        return SyntheticSetDataset(self, use_soft_labels=use_soft_labels, with_privileged=with_privileged)

    def dataloader(self, batch_size: int = 256, shuffle: bool = True, **kwargs: Any) -> DataLoader:
        return DataLoader(self.to_dataset(), batch_size=batch_size, shuffle=shuffle, **kwargs)

    def denormalized(self) -> Tensor:
        """Images mapped back to ``[0, 1]`` pixel space with the stored mean/std (clamped)."""
        c = self.images.shape[1]
        mean = torch.tensor(self.metadata.get("mean", [0.0] * c), dtype=self.images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.metadata.get("std", [1.0] * c), dtype=self.images.dtype).view(1, -1, 1, 1)
        return (self.images.cpu() * std + mean).clamp(0, 1)

    def to_image_grid(self, path: str | os.PathLike | None = None, upscale: int | None = None) -> Tensor:
        """One row per class, de-normalised to ``[0, 1]``; saved as PNG when ``path`` is given.

        Args:
            path: where to write the PNG (atomically); ``None`` only returns the grid.
            upscale: nearest-neighbour upscaling factor (default: so the short side is >= 32 px).

        Returns:
            The grid as a ``[C, H, W]`` float tensor in ``[0, 1]``.
        """
        from torchvision.utils import make_grid

        images = self.denormalized()
        order = torch.argsort(self.labels.cpu(), stable=True)
        if upscale is None:
            upscale = max(1, math.ceil(32 / min(images.shape[-2:])))
        if upscale > 1:
            images = torch.nn.functional.interpolate(images, scale_factor=upscale, mode="nearest")
        grid = make_grid(images[order], nrow=self.ipc, padding=2, pad_value=1.0)
        if path is not None:
            from torchvision.utils import save_image

            buffer = io.BytesIO()
            save_image(grid, buffer, format="png")
            atomic_write_bytes(Path(path), buffer.getvalue())
        return grid

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "images": self.images.cpu(),
            "labels": self.labels.cpu(),
            "soft_labels": None if self.soft_labels is None else self.soft_labels.cpu(),
            "privileged": None if self.privileged is None else self.privileged.cpu(),
            "lr": self.lr,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> SyntheticSet:
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ValueError(f"{source} is not a lightning-eff synthetic set (no '{FORMAT_NAME}' header)")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{source} has synthetic-set format version {version!r}; this lightning-eff "
                f"({_library_version()}) reads version {FORMAT_VERSION}"
            )
        try:
            return cls(
                images=data["images"],
                labels=data["labels"],
                soft_labels=data.get("soft_labels"),
                privileged=data.get("privileged"),
                lr=data.get("lr"),
                metadata=dict(data.get("metadata") or {}),
            )
        except KeyError as err:
            raise ValueError(f"{source} is missing the field {err.args[0]!r}") from None
        except (ValueError, TypeError) as err:
            raise ValueError(f"{source} holds an invalid synthetic set: {err}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` atomically (temp file in the same folder, fsync, rename)."""
        payload = {k: v for k, v in self.to_dict().items() if k not in ("format", "format_version")}
        return save_versioned(path, FORMAT_NAME, FORMAT_VERSION, payload)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SyntheticSet:
        """Read a set written by :meth:`save`; a corrupt, truncated or foreign file is a ValueError."""
        data = load_versioned(path, FORMAT_NAME, FORMAT_VERSION, "synthetic set", map_location)
        return cls.from_dict(data, source=str(path))

    # ------------------------------------------------------------------ construction from data
    @classmethod
    def from_real(
        cls, datamodule, ipc: int, seed: int = 0, method: str = "random_real", **metadata: Any
    ) -> SyntheticSet:
        """``ipc`` real training images per class drawn without replacement (seeded)."""
        check_ipc(ipc)
        dm = prepared_datamodule(datamodule)
        gen = torch.Generator().manual_seed(seed)
        images, labels = [], []
        for c in range(dm.num_classes):
            images.append(dm.class_images(c, ipc, generator=gen))
            labels.append(torch.full((ipc,), c, dtype=torch.long))
        return cls(torch.cat(images), torch.cat(labels), metadata=synthetic_metadata(dm, method, ipc, seed, metadata))

    @classmethod
    def random_subset(cls, datamodule, ipc: int, seed: int = 0) -> SyntheticSet:
        """The "random real" baseline: a seeded random real subset of ``ipc`` images per class."""
        return cls.from_real(datamodule, ipc, seed=seed, method="random_real")

    @classmethod
    def from_noise(cls, datamodule, ipc: int, seed: int = 0, method: str = "noise", **metadata: Any) -> SyntheticSet:
        """Standard-normal images (in the normalised space), ``ipc`` per class."""
        check_ipc(ipc)
        dm = prepared_datamodule(datamodule)
        gen = torch.Generator().manual_seed(seed)
        n = dm.num_classes * ipc
        images = torch.randn(n, *dm.image_shape, generator=gen)
        labels = torch.arange(dm.num_classes).repeat_interleave(ipc)
        return cls(images, labels, metadata=synthetic_metadata(dm, method, ipc, seed, metadata))


def check_ipc(ipc: Any, owner: str | None = None) -> int:
    """``ipc`` (images per class) if it is an int >= 1; else ``TypeError`` / ``ValueError`` naming it."""
    return check_int(ipc, "ipc", minimum=1, owner=owner)


def prepared_datamodule(datamodule):
    """``datamodule`` after ``setup("fit")`` (called only if it was not yet); must be a ClassificationDataModule."""
    if not isinstance(datamodule, ClassificationDataModule):
        raise TypeError(
            f"expected a lightning_eff.data.ClassificationDataModule, got {type(datamodule).__name__}"
        )
    try:
        datamodule.train_targets  # noqa: B018 - raises when setup() was not called
    except RuntimeError:
        datamodule.setup("fit")
    return datamodule


def synthetic_metadata(dm, method: str, ipc: int, seed: int, extra: dict[str, Any]) -> dict[str, Any]:
    """The metadata the library fills for a set made from ``dm`` (see :class:`SyntheticSet`), updated by ``extra``."""
    meta = {
        "method": method,
        "ipc": ipc,
        "dataset": type(dm).__name__,
        "num_classes": dm.num_classes,
        "image_shape": list(dm.image_shape),
        "mean": list(dm.mean),
        "std": list(dm.std),
        "seed": seed,
    }
    meta.update(extra)
    return meta

