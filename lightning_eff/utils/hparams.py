"""Hyperparameters saved as plain data, so that ``load_from_checkpoint`` rebuilds a module without pickles.

A ``LightningModule`` built by LightningCLI receives its parsed config (plain data plus Lightning's
instantiator) and saves that. A module built in Python holds objects (a network, an optimizer class or
``functools.partial``); :func:`save_plain_hyperparameters` writes each as a jsonargparse config
(``{"class_path", "init_args"}``) when it can and warns when it cannot, naming the argument to pass when
reloading. Used by :class:`~lightning_eff.models.ImageClassifier`, :class:`~lightning_eff.llm.CausalLMModule`
and :class:`~lightning_eff.explain.AutoGnothi`.

    >>> import functools, torch
    >>> callable_config(functools.partial(torch.optim.SGD, lr=0.1), OPTIMIZER_BASES)
    {'class_path': 'torch.optim.sgd.SGD', 'init_args': {'lr': 0.1}}
    >>> callable_config(lambda params: torch.optim.SGD(params, lr=0.1), OPTIMIZER_BASES) is None
    True
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

__all__ = [
    "INSTANTIATOR",
    "OPTIMIZER_BASES",
    "SCHEDULER_BASES",
    "callable_config",
    "class_path",
    "given_cli_hparams",
    "is_plain",
    "net_config",
    "save_plain_hyperparameters",
]

# Lightning's own instantiator for hyperparameters written as jsonargparse configs; LightningCLI stores it
# with the config of every module it builds, and ``load_from_checkpoint`` trusts it.
INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
OPTIMIZER_BASES: tuple[type, ...] = (Optimizer,)
SCHEDULER_BASES: tuple[type, ...] = (LRScheduler, ReduceLROnPlateau)


def class_path(cls: type) -> str:
    """``module.QualName`` of ``cls`` (what jsonargparse's ``class_path`` expects)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def is_plain(value: Any) -> bool:
    """Whether ``value`` is built from None/bool/int/float/str, lists, tuples and str-keyed dicts only."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def net_config(net: nn.Module) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` config that rebuilds ``net``, if it exposes ``get_config()``."""
    get_config = getattr(net, "get_config", None)
    if not callable(get_config):
        return None
    init_args = get_config()
    if not isinstance(init_args, dict) or not is_plain(init_args):
        return None
    return {"class_path": class_path(type(net)), "init_args": dict(init_args)}


def callable_config(fn: Any, bases: tuple[type, ...]) -> dict[str, Any] | None:
    """Config for a class in ``bases`` or a ``functools.partial`` of one with plain keyword arguments.

    Also recognises the partials jsonargparse builds for ``OptimizerCallable``/``LRSchedulerCallable`` (e.g. when
    ``load_from_checkpoint`` rebuilds the module from a saved config).
    """
    if isinstance(fn, type) and issubclass(fn, bases):
        return {"class_path": class_path(fn), "init_args": {}}
    if not isinstance(fn, functools.partial) or not is_plain(dict(fn.keywords)):
        return None
    if isinstance(fn.func, type) and issubclass(fn.func, bases) and not fn.args:
        return {"class_path": class_path(fn.func), "init_args": dict(fn.keywords)}
    # jsonargparse builds ``partial(call_without_instantiate_context, instantiator, cls, **init_args)``
    target = fn.args[-1] if fn.args else None
    if (
        getattr(fn.func, "__module__", "").startswith("jsonargparse")
        and isinstance(target, type)
        and issubclass(target, bases)
    ):
        return {"class_path": class_path(target), "init_args": dict(fn.keywords)}
    return None


def given_cli_hparams() -> dict[str, Any] | None:
    """The config LightningCLI hands to the module being instantiated, if any."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - older/newer Lightning without the mechanism
        return None
    return _given_hyperparameters.get()


def save_plain_hyperparameters(
    module: Any,
    plain: Mapping[str, Any],
    *,
    nets: Mapping[str, nn.Module | str] | None = None,
    optimizer: Any = None,
    lr_scheduler: Any = None,
) -> None:
    """``module.save_hyperparameters`` of ``plain`` plus the configs of ``nets``, ``optimizer`` and ``lr_scheduler``.

    Built by LightningCLI, ``module`` saves the config LightningCLI hands it instead (plain data already). A net
    given as a string (a path) is saved as is; one without a plain ``get_config()`` is left out with a warning
    that names the argument to pass to ``load_from_checkpoint``; so is an optimizer / scheduler that is not a
    class or ``functools.partial`` of one (``optimizer=None`` saves nothing; ``lr_scheduler=None`` saves None).
    """
    if given_cli_hparams() is not None:
        # Built by LightningCLI: it hands over the parsed config (plain data + its instantiator).
        module.save_hyperparameters()
        return
    owner = type(module).__name__
    hparams: dict[str, Any] = {**plain, "_instantiator": INSTANTIATOR}
    for name, net in (nets or {}).items():
        if isinstance(net, str):
            hparams[name] = net
            continue
        config = net_config(net)
        if config is None:
            rank_zero_warn(
                f"{owner}: `{name}` ({type(net).__name__}) has no `get_config()`, so it is not saved as a "
                f"hyperparameter; pass it when reloading: `{owner}.load_from_checkpoint(path, {name}=...)`."
            )
        else:
            hparams[name] = config
    if optimizer is not None:
        optimizer_config = callable_config(optimizer, OPTIMIZER_BASES)
        if optimizer_config is None:
            rank_zero_warn(
                f"{owner}: `optimizer` {optimizer!r} is not a class or functools.partial of one, so it is "
                f"not saved as a hyperparameter; `load_from_checkpoint` will use the default unless given `optimizer=`."
            )
        else:
            hparams["optimizer"] = optimizer_config
    if lr_scheduler is None:
        hparams["lr_scheduler"] = None
    else:
        scheduler_config = callable_config(lr_scheduler, SCHEDULER_BASES)
        if scheduler_config is None:
            rank_zero_warn(
                f"{owner}: `lr_scheduler` {lr_scheduler!r} is not a class or functools.partial of "
                f"one, so it is not saved as a hyperparameter."
            )
        else:
            hparams["lr_scheduler"] = scheduler_config
    module.save_hyperparameters(hparams)
