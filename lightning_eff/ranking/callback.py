"""``DDRankingCallback``: rank the synthetic set of a distillation fit when the fit ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_eff.ranking.evaluator import DDRanking
from lightning_eff.ranking.results import RankingReport, log_report

__all__ = ["DDRankingCallback"]


class DDRankingCallback(Callback):
    """Score the module's synthetic set with :class:`DDRanking` at the end of ``fit``.

    The module must provide ``synthetic_set()`` (every
    :class:`~lightning_eff.distill.DistillationModule` does). At ``on_train_end`` (before the strategy
    moves the module off its device) every rank takes the set, the trainings of the protocol are spread
    over the ranks and gathered (see :class:`DDRanking`), and rank 0 writes ``ranking.json``,
    ``ranking.csv`` and ``ranking_runs.csv`` to ``output_dir`` and sends the scores
    (``ranking/<name>/lrs``, ...) and the table to the trainer's loggers (a ``wandb.Table`` with W&B).
    The report is kept in :attr:`report` (every rank) and its JSON form in the callback state, so a
    checkpoint written after the ranking carries it.

    Args:
        evaluator: the protocol (default ``DDRanking()``, the paper's settings). Its ``device`` defaults to
            the module's device.
        output_dir: where the results go (default ``<trainer.log_dir>/ranking``).
        name: the set's name in the report (default: the module's ``method_name``).
        datamodule: the DataModule to rank on (default: ``trainer.datamodule``).

    Example::

        >>> from lightning_eff.ranking.evaluator import DEFAULT_PROTOCOL
        >>> cb = DDRankingCallback(DDRanking(protocol=DEFAULT_PROTOCOL.replace(epochs=50), num_eval=2, progress=False))
        >>> cb.evaluator.num_eval, cb.evaluator.student_protocol.epochs, cb.report is None
        (2, 50, True)
    """

    def __init__(
        self,
        evaluator: DDRanking | None = None,
        output_dir: str | None = None,
        name: str | None = None,
        datamodule: Any = None,
    ) -> None:
        super().__init__()
        if evaluator is not None and not isinstance(evaluator, DDRanking):
            raise TypeError(
                f"DDRankingCallback: `evaluator` must be a lightning_eff.ranking.DDRanking or None, got "
                f"{type(evaluator).__name__}."
            )
        if output_dir is not None and not isinstance(output_dir, (str, Path)):
            raise TypeError(
                f"DDRankingCallback: `output_dir` must be a path string or None, got {output_dir!r}."
            )
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"DDRankingCallback: `name` must be a non-empty string or None, got {name!r}.")
        self.evaluator = evaluator if evaluator is not None else DDRanking()
        self.output_dir = output_dir
        self.name = name
        self.datamodule = datamodule
        self.report: RankingReport | None = None
        self.paths: dict[str, Path] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and not callable(getattr(pl_module, "synthetic_set", None)):
            raise TypeError(
                f"DDRankingCallback needs a module with a synthetic_set() method (a DistillationModule), got "
                f"{type(pl_module).__name__}."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"report": None if self.report is None else self.report.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        data = state_dict.get("report")
        self.report = None if data is None else RankingReport.from_dict(data)

    def on_train_end(self, trainer, pl_module) -> None:
        synset = pl_module.synthetic_set()  # on every rank: the module may gather inside
        dm = self.datamodule if self.datamodule is not None else getattr(trainer, "datamodule", None)
        if dm is None:
            raise ValueError(
                "DDRankingCallback: no DataModule to rank on: fit with a datamodule or pass datamodule=."
            )
        name = self.name or str(
            getattr(pl_module, "method_name", None) or synset.metadata.get("method") or "synthetic"
        )
        evaluator = self.evaluator
        if evaluator.device is None:
            evaluator.device = pl_module.device
            try:
                report = evaluator.rank({name: synset}, dm)
            finally:
                evaluator.device = None
        else:
            report = evaluator.rank({name: synset}, dm)
        self.report = report
        # trainer.log_dir broadcasts under DDP: every rank asks for it
        folder = (
            Path(self.output_dir)
            if self.output_dir
            else Path(trainer.log_dir or trainer.default_root_dir) / "ranking"
        )
        if trainer.is_global_zero:
            self.paths = report.save(folder)
            log_report(trainer.loggers, report, step=int(trainer.global_step))
