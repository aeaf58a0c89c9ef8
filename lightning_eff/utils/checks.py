"""Argument checks shared by every component: one message format, raised once at construction.

Each check returns the value (converted where stated) so that it reads as an assignment::

    >>> check_int(3, "epochs", minimum=1, owner="NCFM")
    3
    >>> check_int(0, "epochs", minimum=1, owner="NCFM")
    Traceback (most recent call last):
    ...
    ValueError: NCFM: `epochs` must be an int >= 1, got 0.
    >>> check_float(0.5, "lr", low=0.0, low_open=True)
    0.5
    >>> check_choice("sce", "soft_loss", ("sce", "kl"), owner="evaluate_synthetic")
    'sce'

A wrong type raises ``TypeError`` and a value out of range ``ValueError``; ``bool`` is never an int.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real
from typing import Any, TypeVar

__all__ = ["check_int", "check_float", "check_choice", "check_optional_int"]

T = TypeVar("T")


def _prefix(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def check_int(
    value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None, owner: str | None = None
) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) in ``[minimum, maximum]``; else ``TypeError``/``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_prefix(owner)}`{name}` must be an int, got {value!r} ({type(value).__name__}).")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if maximum is None:
            allowed = f">= {minimum}"
        elif minimum is None:
            allowed = f"<= {maximum}"
        else:
            allowed = f"in [{minimum}, {maximum}]"
        raise ValueError(f"{_prefix(owner)}`{name}` must be an int {allowed}, got {value!r}.")
    return value


def check_optional_int(
    value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None, owner: str | None = None
) -> int | None:
    """``None`` or :func:`check_int`."""
    return None if value is None else check_int(value, name, minimum=minimum, maximum=maximum, owner=owner)


def check_float(
    value: Any,
    name: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    owner: str | None = None,
) -> float:
    """``float(value)`` if it is a finite real number (not a ``bool``) in the interval; else raise."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise TypeError(f"{_prefix(owner)}`{name}` must be a finite number, got {value!r}.")
    value = float(value)
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{_prefix(owner)}`{name}` must be in {interval}, got {value!r}.")
    return value


def check_choice(value: T, name: str, allowed: Iterable[Any], *, owner: str | None = None) -> T:
    """``value`` if it is one of ``allowed`` (a ``bool`` never matches ``0``/``1``); else ``ValueError``."""
    allowed = tuple(allowed)
    if isinstance(value, bool) and not any(a is value for a in allowed) or value not in allowed:
        raise ValueError(f"{_prefix(owner)}`{name}` must be one of {allowed}, got {value!r}.")
    return value
