"""Helpers the test files share: a quiet CPU Trainer, the digits DataModule (and a fixture factory for it) and
a tiny ConvNet.

Import them as ``from helpers import cpu_trainer, digits_fixture, tiny_convnet`` (``tests/`` is on ``sys.path``
for the test files, as for ``_flops`` and ``_tiny_vlms``). ``conftest.py`` builds its shared fixtures
(``digits8``, ``digits16``) with :func:`digits_fixture`.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

#: the Trainer switches a test turns off unless it checks them
QUIET_TRAINER: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def cpu_trainer(root: str | os.PathLike, **kwargs: Any):
    """A ``lightning.Trainer`` on one CPU device, quiet (:data:`QUIET_TRAINER`), writing under ``root``;
    ``kwargs`` override any of these (``accelerator="auto"``, ``enable_checkpointing=True``, ...)."""
    import lightning as L

    return L.Trainer(
        **{"accelerator": "cpu", "devices": 1, **QUIET_TRAINER, "default_root_dir": str(root), **kwargs}
    )


def digits(image_size: int = 8, **kwargs: Any):
    """A set-up ``DigitsDataModule`` (its default seed and splits 1258 / 180 / 359)."""
    from lightning_eff.data import DigitsDataModule

    dm = DigitsDataModule(image_size=image_size, **kwargs)
    dm.setup("fit")
    return dm


def digits_fixture(image_size: int = 8, scope: str = "module", **kwargs: Any):
    """A pytest fixture returning :func:`digits` (built once per ``scope``).

    Assign it to the fixture's name in a test file or ``conftest.py``: ``digits = digits_fixture(16)``.
    """

    @pytest.fixture(scope=scope)
    def _digits():
        return digits(image_size, **kwargs)

    return _digits


def tiny_convnet(image_size: int = 8, width: int = 16, depth: int = 2, in_channels: int = 1, num_classes: int = 10):
    """A small ``ConvNet`` (instance norm, ReLU, average pooling) for the digits."""
    from lightning_eff.models import ConvNet

    return ConvNet(in_channels=in_channels, num_classes=num_classes, width=width, depth=depth, image_size=image_size)
