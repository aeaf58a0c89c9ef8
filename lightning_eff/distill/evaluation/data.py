"""The real test split of a DataModule as tensors, cached: every evaluation tests on it."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

__all__ = ["load_test_tensors"]

_TEST_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def load_test_tensors(datamodule: Any) -> tuple[Tensor, Tensor]:
    """All test images and labels of ``datamodule`` (CPU), cached per DataModule and test set."""
    if not callable(getattr(datamodule, "test_dataloader", None)):
        raise TypeError(
            f"evaluate_synthetic: `datamodule` must be a LightningDataModule with a test split, got "
            f"{type(datamodule).__name__}."
        )
    try:
        loader = datamodule.test_dataloader()
    except RuntimeError:  # ClassificationDataModule before setup()
        datamodule.setup("test")
        loader = datamodule.test_dataloader()
    key = id(getattr(datamodule, "test_set", None) or loader.dataset)
    try:
        cached = _TEST_CACHE.get(datamodule)
    except TypeError:
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    xs, ys = [], []
    for batch in loader:
        xs.append(torch.as_tensor(batch[0]).float().cpu())
        ys.append(torch.as_tensor(batch[1]).long().cpu())
    if not xs:
        raise ValueError("evaluate_synthetic: the DataModule's test split is empty.")
    x, y = torch.cat(xs), torch.cat(ys)
    try:
        _TEST_CACHE[datamodule] = (key, x, y)
    except TypeError:
        pass
    return x, y


_test_tensors = load_test_tensors  # the former private name (lightning_eff.distill.evaluate._test_tensors)
