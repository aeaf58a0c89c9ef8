"""lightning-eff: PyTorch Lightning components for data-centric efficient AI.

``import lightning_eff`` is deliberately light (it imports neither torch nor Lightning); the
component packages load on first use::

    from lightning_eff.optim import KO
    from lightning_eff.data import DigitsDataModule

or as attributes (``lightning_eff.optim.KO``), which import the sub-package lazily.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("cli", "data", "models", "optim", "distill", "ranking", "llm", "select", "tokens", "explain", "rl")

__all__ = ["__version__", *_SUBPACKAGES]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
