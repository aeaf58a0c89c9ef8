"""Shared fixtures: no network, no W&B uploads, deterministic seeds, the digits at 8 and 16 px.

Helpers (a quiet CPU Trainer, the digits, a tiny ConvNet) are in ``tests/helpers.py``.
"""

from __future__ import annotations

import os

import pytest
from helpers import digits_fixture

#: ``DigitsDataModule(image_size=8)``, set up, one per test module (tests may change its batch size)
digits8 = digits_fixture(8)
#: ``DigitsDataModule(image_size=16)``, set up, one per test module
digits16 = digits_fixture(16)


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch, tmp_path):
    """Every test runs offline: W&B disabled, Hugging Face offline, W&B dirs inside tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield


@pytest.fixture
def seed():
    import torch

    torch.manual_seed(0)
    return 0


def pytest_configure(config):
    """One intra-op thread: on a 2-core CI machine two threads fighting a second process
    (DDP tests, the console-script tests) make small trainings 10-20x slower."""
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests when CUDA is not available."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
