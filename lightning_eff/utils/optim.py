"""``configure_optimizers`` of a module that takes an ``optimizer`` callable and an optional ``lr_scheduler``.

Shared by :class:`~lightning_eff.models.ImageClassifier`, :class:`~lightning_eff.llm.CausalLMModule` and
:class:`~lightning_eff.explain.AutoGnothi`, which each take ``optimizer: OptimizerCallable`` and
``lr_scheduler: LRSchedulerCallable | None``.

    >>> import functools, torch
    >>> params = [torch.nn.Parameter(torch.zeros(2))]
    >>> sgd = functools.partial(torch.optim.SGD, lr=0.1)
    >>> type(optimizer_config(sgd, params)).__name__
    'SGD'
    >>> plateau = functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=2)
    >>> out = optimizer_config(sgd, params, plateau, monitor="val/loss")
    >>> sorted(out), out["lr_scheduler"]["monitor"]
    (['lr_scheduler', 'optimizer'], 'val/loss')
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch.optim.lr_scheduler import ReduceLROnPlateau

__all__ = ["optimizer_config"]


def optimizer_config(
    optimizer: Callable[[Any], Any],
    params: Iterable[Any],
    lr_scheduler: Callable[[Any], Any] | None = None,
    monitor: str = "val/loss",
) -> Any:
    """``optimizer(params)``, or Lightning's ``{"optimizer", "lr_scheduler"}`` dict when ``lr_scheduler`` is given.

    A ``ReduceLROnPlateau`` scheduler is told to watch ``monitor`` (Lightning requires a monitored metric for it).
    """
    opt = optimizer(params)
    if lr_scheduler is None:
        return opt
    scheduler = lr_scheduler(opt)
    config: dict[str, Any] = {"scheduler": scheduler}
    if isinstance(scheduler, ReduceLROnPlateau):
        config["monitor"] = monitor
    return {"optimizer": opt, "lr_scheduler": config}
