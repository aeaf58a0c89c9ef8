"""The ``lightning-eff`` command: Lightning's ``LightningCLI`` over every lightning-eff component.

Usage::

    lightning-eff fit --config configs/ko/digits.yaml
    lightning-eff fit --config configs/ko/digits.yaml --optimizer KO --optimizer.collision_rate 0.05
    lightning-eff fit --config configs/ko/digits.yaml --trainer.logger WandbLogger \\
        --trainer.logger.project my-project
    lightning-eff test --config configs/ko/digits.yaml --ckpt_path path/to/last.ckpt
    lightning-eff rank --config configs/ranking/digits.yaml --synthetic path/to/synthetic_set.pt
    lightning-eff pipeline --config configs/pipeline/digits_ncfm_sdc_drupi_rank_ko.yaml

What this adds to a plain ``LightningCLI``:

* ``subclass_mode_model`` and ``subclass_mode_data``: any ``LightningModule`` / ``LightningDataModule``
  by class path, and by short name for the ones this package defines (``--model ImageClassifier``,
  ``--data DigitsDataModule``, ``--optimizer KO``): every component package is imported before
  parsing so that jsonargparse can resolve them.
* A short name that a lightning-eff class shares with a class of another installed package resolves to the
  lightning-eff one (``--model.net MLP`` is :class:`lightning_eff.models.MLP`, not ``torchvision.ops.MLP``);
  a full class path still picks any class. lightning-eff's own class names are unique.
* OmegaConf interpolation in YAML (``parser_mode="omegaconf"``): write a value once and reference it
  (``${data.init_args.image_size}``).
* Config saving that does not fail when a second run writes into the same folder (with
  ``WandbLogger`` the "log dir" is the shared W&B save dir, where Lightning's default callback
  refuses to overwrite ``config.yaml``), and the full resolved config stored on the W&B run.
* ``test_after_fit: true`` runs ``trainer.test`` on the best (or last) checkpoint after ``fit``,
  so that one command trains and reports test accuracy.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

__all__ = [
    "LightningEffCLI",
    "LoggerSaveConfigCallback",
    "COMPONENT_PACKAGES",
    "EXTRA_SUBCOMMANDS",
    "main",
    "prefer_own_short_names",
]

#: Packages whose classes become available by short name on the command line. A package that is
#: not written yet (the library grows one method at a time) is skipped; one that exists but fails
#: to import raises.
COMPONENT_PACKAGES: tuple[str, ...] = (
    "lightning_eff.data",
    "lightning_eff.models",
    "lightning_eff.optim",
    "lightning_eff.distill",
    "lightning_eff.ranking",
    "lightning_eff.llm",
    "lightning_eff.select",
    "lightning_eff.tokens",
    "lightning_eff.explain",
    "lightning_eff.rl",
)


def import_components() -> list[str]:
    """Import every component package that exists, so that short class names resolve."""
    imported = []
    for name in COMPONENT_PACKAGES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
            imported.append(name)
    return imported


@contextlib.contextmanager
def prefer_own_short_names() -> Iterator[None]:
    """While active, jsonargparse resolves a short class name shared by several classes to lightning-eff's.

    jsonargparse refuses a short name that several imported subclasses of the expected type share ("Multiple
    subclasses with name MLP"); torchvision's ``torchvision.ops.MLP`` is imported with the ViT that
    :mod:`lightning_eff.explain` builds on. Among the candidates, exactly one from ``lightning_eff`` wins; any
    other ambiguity is still jsonargparse's error. Without jsonargparse's resolver (another version) this is a
    no-op.

    Example::

        >>> import torch.nn as nn
        >>> import torchvision.ops, lightning_eff.models
        >>> from jsonargparse import _typehints
        >>> with prefer_own_short_names():
        ...     _typehints.resolve_class_path_by_name(nn.Module, "MLP")
        'lightning_eff.models.MLP'
    """
    try:
        from jsonargparse import _typehints
    except ImportError:  # pragma: no cover - jsonargparse is a dependency of LightningCLI
        yield
        return
    original = getattr(_typehints, "resolve_class_path_by_name", None)
    find = getattr(_typehints, "get_all_subclass_paths", None)
    if original is None or find is None or getattr(original, "_prefers_lightning_eff", False):
        yield
        return

    def resolve(cls: Any, name: str) -> str:
        try:
            return original(cls, name)
        except ValueError:
            if isinstance(cls, tuple) or "." in name:
                raise
            same = [p for p in find(cls) if p.rsplit(".", 1)[1] == name]
            own = [p for p in same if p.split(".", 1)[0] == __name__.split(".", 1)[0]]
            if len(own) != 1:
                raise
            return own[0]

    resolve._prefers_lightning_eff = True  # type: ignore[attr-defined]
    _typehints.resolve_class_path_by_name = resolve
    try:
        yield
    finally:
        _typehints.resolve_class_path_by_name = original


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` (overwriting a previous one) and stores the config on W&B runs."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        config = self.parser.dump(self.config, skip_none=False, format="yaml")
        import yaml

        as_dict = yaml.safe_load(config)
        for logger in loggers:
            logger.experiment.config.update({"lightning_eff_config": as_dict}, allow_val_change=True)


class LightningEffCLI(LightningCLI):
    """``LightningCLI`` with lightning-eff's defaults (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import_components()
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", LoggerSaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("parser_mode", "omegaconf")
        with warnings.catch_warnings(), prefer_own_short_names():
            # With ``--optimizer`` given, LightningCLI replaces the module's own
            # ``configure_optimizers``: that is what the user asked for, not a problem.
            warnings.filterwarnings("ignore", message=r".*configure_optimizers` will be overridden by.*")
            super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After `fit`, run `trainer.test` on the best checkpoint (or the final weights).",
        )

    def after_fit(self) -> None:
        if not self._get(self.config, "test_after_fit", default=False):
            return
        ckpt = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or None
        if self.trainer.fast_dev_run:
            ckpt = None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)


#: Subcommands that are not Trainer methods: name -> module with ``main(argv) -> int``.
EXTRA_SUBCOMMANDS: dict[str, str] = {"rank": "lightning_eff.ranking.cli", "pipeline": "lightning_eff.pipeline"}


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-eff`` console script.

    ``lightning-eff {fit,validate,test,predict} ...`` is LightningCLI; ``lightning-eff rank ...`` runs
    the DD-Ranking evaluator (``lightning_eff.ranking.cli``); ``lightning-eff pipeline ...`` runs the stages
    of a pipeline YAML in order (``lightning_eff.pipeline``).
    """
    args = list(args if args is not None else sys.argv[1:])
    if args and args[0] in EXTRA_SUBCOMMANDS:
        module = importlib.import_module(EXTRA_SUBCOMMANDS[args[0]])
        raise SystemExit(module.main(args[1:]))
    LightningEffCLI(args=args)


if __name__ == "__main__":  # pragma: no cover
    main()
