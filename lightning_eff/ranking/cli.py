"""``lightning-eff rank``: rank saved synthetic sets with DD-Ranking from the command line.

Usage::

    lightning-eff rank --config configs/ranking/digits.yaml --synthetic path/to/synthetic_set.pt
    lightning-eff rank --config configs/ranking/digits.yaml --synthetic dm.pt gm.pt mtt.pt --name DM GM MTT
    python -m lightning_eff.ranking --config configs/ranking/digits.yaml --synthetic set.pt   # the same
    torchrun --nproc_per_node 4 -m lightning_eff.ranking --config ... --synthetic ...  # over 4 GPUs

The YAML has the layout of a ``lightning-eff fit`` config, so one file serves both commands and a
distillation config composes with it (``--config configs/distill/dm_digits_ipc10.yaml --config
configs/ranking/digits.yaml``):

* ``data``: the DataModule the sets were made from (``class_path`` / ``init_args``);
* ``trainer.callbacks``: a :class:`~lightning_eff.ranking.DDRankingCallback` whose ``evaluator`` is the
  protocol (:class:`~lightning_eff.ranking.DDRanking` arguments, the students' settings under ``protocol``;
  without one the paper's defaults);
* ``trainer.logger``: where the table and scores go (``WandbLogger`` for a W&B table), ``trainer.accelerator``
  / ``devices``: where the students train; ``trainer.default_root_dir``: where the results go (unless
  ``--output_dir`` or the callback's ``output_dir`` says otherwise: ``<default_root_dir>/ranking``);
* ``model``, ``optimizer``, ``seed_everything`` ... of a fit config are accepted and ignored.

Override a protocol setting with jsonargparse's path to the (last) callback, e.g.
``--trainer.callbacks.init_args.evaluator.init_args.num_eval 3``, and a student setting through the
:class:`~lightning_eff.distill.StudentProtocol`, type-checked by the parser:
``--trainer.callbacks.init_args.evaluator.init_args.protocol.epochs 50``. Writes ``ranking.json``, ``ranking.csv``
and ``ranking_runs.csv`` and prints the table. Exit status 0 on success, 1 on a bad input (with a message).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


def build_parser():
    """The jsonargparse parser of ``lightning-eff rank`` (a ``LightningArgumentParser``)."""
    from jsonargparse import ActionConfigFile
    from lightning.pytorch import LightningDataModule, Trainer
    from lightning.pytorch.cli import LightningArgumentParser

    from lightning_eff.cli import import_components

    import_components()  # short class names (DigitsDataModule, DDRankingCallback, ...) resolve
    parser = LightningArgumentParser(
        prog="lightning-eff rank",
        description="Rank saved synthetic sets with DD-Ranking (LRS, ARS).",
        parser_mode="omegaconf",
        env_prefix="LIGHTNING_EFF_RANK",
        default_env=False,
    )
    parser.add_argument(
        "-c", "--config", action=ActionConfigFile, help="YAML config (may be given several times)."
    )
    parser.add_argument(
        "--synthetic",
        type=str,
        nargs="+",
        required=True,
        help="Saved synthetic set(s) (SyntheticSet.save / synthetic_set.pt of a distillation fit).",
    )
    parser.add_argument(
        "--name",
        type=str,
        nargs="+",
        default=None,
        help="Names of the sets in the report (default: their metadata['method']).",
    )
    parser.add_argument(
        "--output_dir",
        type=str,
        default=None,
        help="Where ranking.json / ranking.csv go (default: the callback's output_dir, else "
        "<trainer.default_root_dir>/ranking).",
    )
    parser.add_lightning_class_args(LightningDataModule, "data", subclass_mode=True, required=True)
    parser.add_lightning_class_args(Trainer, "trainer")
    # keys of a `lightning-eff fit` config, accepted so that the configs compose, and ignored
    parser.add_argument(
        "--model", type=dict | None, default=None, help="Ignored (for composing with fit configs)."
    )
    parser.add_argument("--optimizer", type=dict | str | None, default=None, help="Ignored.")
    parser.add_argument("--lr_scheduler", type=dict | str | None, default=None, help="Ignored.")
    parser.add_argument(
        "--seed_everything", type=bool | int, default=True, help="Ignored (DD-Ranking seeds itself)."
    )
    parser.add_argument("--test_after_fit", type=bool, default=False, help="Ignored.")
    parser.add_argument("--ckpt_path", type=str | None, default=None, help="Ignored.")
    return parser


def _maybe_init_distributed() -> None:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE > 1``)."""
    import torch
    import torch.distributed as td

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not td.is_available() or td.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group("nccl")
    else:
        td.init_process_group("gloo")


def main(argv: list[str] | None = None) -> int:
    """Run ``lightning-eff rank`` with ``argv`` (without the ``rank`` word); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    cfg = parser.parse_args(argv)
    try:
        return _run(parser, cfg)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"lightning-eff rank: error: {err}", file=sys.stderr)
        return 1


def _run(parser, cfg) -> int:
    import torch
    import torch.distributed as td
    from lightning.pytorch import Trainer

    from lightning_eff.distill.synthetic import SyntheticSet
    from lightning_eff.ranking.callback import DDRankingCallback
    from lightning_eff.ranking.evaluator import DDRanking
    from lightning_eff.ranking.results import log_report

    paths = list(cfg.synthetic)
    names = list(cfg.name) if cfg.name else None
    if names is not None and len(names) != len(paths):
        raise ValueError(
            f"--name gives {len(names)} names for {len(paths)} --synthetic sets; give one per set."
        )
    sets = [SyntheticSet.load(p) for p in paths]

    init = parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)
    dm = init.data
    trainer_kwargs: dict[str, Any] = dict(init.trainer)
    trainer_kwargs["enable_progress_bar"] = False
    trainer = Trainer(**trainer_kwargs)
    callbacks = [cb for cb in trainer.callbacks if isinstance(cb, DDRankingCallback)]
    callback = callbacks[-1] if callbacks else None
    evaluator = callback.evaluator if callback is not None else DDRanking()
    _maybe_init_distributed()
    if evaluator.device is None:
        if td.is_available() and td.is_initialized() and torch.cuda.is_available():
            evaluator.device = torch.device("cuda", torch.cuda.current_device())  # torchrun: this rank's GPU
        else:
            evaluator.device = trainer.strategy.root_device
    if names is None:
        named = {}
        for s, p in zip(sets, paths):
            base = str(s.metadata.get("method") or Path(p).stem)
            name, k = base, 2
            while name in named:
                name, k = f"{base}_{k}", k + 1
            named[name] = s
    else:
        named = dict(zip(names, sets))
        if len(named) != len(names):
            raise ValueError(f"--name has duplicates: {names}.")

    report = evaluator.rank(named, dm)
    rank = td.get_rank() if td.is_available() and td.is_initialized() else 0
    if rank == 0:
        out = (
            cfg.output_dir
            or (callback.output_dir if callback is not None else None)
            or (Path(trainer.default_root_dir) / "ranking")
        )
        files = report.save(out)
        log_report(trainer.loggers, report, step=0)
        for logger in trainer.loggers:
            logger.finalize("success")
        print(report.table())
        print(
            f"\n{len(report)} set(s), {report.stats.get('trainings_run', 0)} trainings run, "
            f"{report.stats.get('trainings_reused', 0)} reused from the cache, {report.seconds:.1f} s"
        )
        for kind, path in files.items():
            print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
