"""The ``DataLoader`` every DataModule of the package builds: a batch size, a shuffle flag and worker processes
that persist between epochs when there are any.

Shared by :class:`~lightning_eff.data.base.ClassificationDataModule`,
:class:`~lightning_eff.explain.text_data.SyntheticTextDataModule` and
:class:`~lightning_eff.llm.data.InstructionDataModule`; the first two take their three loaders from
:class:`SplitDataLoaders`.

    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> loader = make_loader(TensorDataset(torch.arange(5)), batch_size=2, shuffle=False, num_workers=0)
    >>> [b[0].tolist() for b in loader], loader.persistent_workers
    ([[0, 1], [2, 3], [4]], False)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader, Dataset

__all__ = ["make_loader", "SplitDataLoaders"]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """``DataLoader(dataset, ...)`` with ``persistent_workers`` on when ``num_workers > 0``.

    ``collate_fn=None`` is the ``DataLoader`` default (stacking). Shuffling draws from torch's global RNG, which
    ``seed_everything`` seeds.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate_fn,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


class SplitDataLoaders:
    """The dataloaders of a DataModule with ``train_set``, ``val_set`` and ``test_set`` (``None`` before
    ``setup``), ``batch_size`` and ``num_workers``: the training loader shuffles, the others do not.

    A mixin, placed before ``LightningDataModule`` in the bases.
    """

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call `setup()` first (the Trainer does it for you).")
        return make_loader(dataset, self.batch_size, shuffle, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Shuffled loader over ``train_set``."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Loader over ``val_set`` (not shuffled)."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Loader over ``test_set`` (not shuffled)."""
        return self._loader(self.test_set, shuffle=False)
