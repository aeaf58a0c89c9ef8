"""What the DD-Ranking evaluator returns, and how it is saved (JSON, CSV) and logged (W&B table, ...).

All accuracies and scores are fractions in ``[0, 1]`` (HLR and IOR are differences of fractions, in
``[-1, 1]``); standard deviations are population ones (``np.std``, as ``ddranking`` reports).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_eff.utils.io import atomic_write_text  # re-exported: it used to live here

__all__ = [
    "RankingResult",
    "RankingReport",
    "RESULTS_FORMAT",
    "RESULTS_FORMAT_VERSION",
    "SUMMARY_COLUMNS",
    "log_report",
    "atomic_write_text",
]

RESULTS_FORMAT = "lightning-eff/ddranking-results"
RESULTS_FORMAT_VERSION = 1

#: Metrics of a result, in table order (those that were not computed are left out of the table).
_METRICS = ("hlr", "ior", "lrs", "ars", "with_aug", "without_aug")
SUMMARY_COLUMNS: tuple[str, ...] = (
    "method",
    "ipc",
    "images",
    *(f"{m}_{s}" for m in _METRICS for s in ("mean", "std")),
    "full_acc",
    "num_eval",
)


def _csv_text(columns: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buffer.getvalue()


@dataclass
class RankingResult:
    """DD-Ranking scores of one synthetic set.

    Attributes:
        name: the set's name in the report (the method, by default).
        metrics: ``{"hlr" | "ior" | "lrs" | "ars" | "with_aug" | "without_aug": {"mean", "std"}}`` (those
            computed), plus ``"lrs_ddranking"`` / ``"ars_ddranking"``: the same scores computed from
            percentages, as ``ddranking`` 0.2.0 reports them (out of ``[0, 1]``; for comparison only).
        runs: one dict per evaluation run with every raw accuracy (``full_acc``, ``syn_hard_acc``,
            ``syn_acc``, ``rdm_acc``, ``syn_noaug_acc``, ``rdm_noaug_acc``), the learning rate that won
            the grid for each (``*_lr``) and the run's scores.
        metadata: about the set (method, IPC, images, per-class counts, soft labels / privileged info).
    """

    name: str
    metrics: dict[str, dict[str, float]]
    runs: list[dict[str, Any]]
    metadata: dict[str, Any] = field(default_factory=dict)

    def mean(self, metric: str) -> float:
        """The mean of ``metric`` over runs (``"lrs"``, ``"ars"``, ``"hlr"``, ``"ior"``, ...)."""
        if metric not in self.metrics:
            raise KeyError(
                f"{self.name}: metric {metric!r} was not computed; available: {sorted(self.metrics)}"
            )
        return self.metrics[metric]["mean"]

    def std(self, metric: str) -> float:
        """The population standard deviation of ``metric`` over runs."""
        if metric not in self.metrics:
            raise KeyError(
                f"{self.name}: metric {metric!r} was not computed; available: {sorted(self.metrics)}"
            )
        return self.metrics[metric]["std"]

    def summary_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "method": self.name,
            "ipc": self.metadata.get("ipc"),
            "images": self.metadata.get("images"),
            "full_acc": self.runs[0].get("full_acc") if self.runs else None,
            "num_eval": len(self.runs),
        }
        for m in _METRICS:
            for s in ("mean", "std"):
                row[f"{m}_{s}"] = self.metrics.get(m, {}).get(s)
        return row

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "metrics": self.metrics, "runs": self.runs, "metadata": self.metadata}


@dataclass
class RankingReport:
    """The results of one :meth:`DDRanking.rank` call (one or more synthetic sets, one protocol).

    Attributes:
        results: one :class:`RankingResult` per set, in the order given.
        protocol: every setting of the evaluation (JSON-serialisable).
        full_data: ``{"accuracy", "accuracies", "cached", "given"}`` of the full-data hard-label students.
        stats: trainings run and reused (cache), wall time per kind of training.
        seconds: wall time of the whole call.
    """

    results: list[RankingResult]
    protocol: dict[str, Any]
    full_data: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def __getitem__(self, name: str) -> RankingResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"no result named {name!r}; names: {[r.name for r in self.results]}")

    def __len__(self) -> int:
        return len(self.results)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.results]

    # ------------------------------------------------------------------ views
    def columns(self) -> list[str]:
        """Summary columns, without metrics that no result computed."""
        present = {m for r in self.results for m in r.metrics}
        missing = {f"{m}_{s}" for m in _METRICS if m not in present for s in ("mean", "std")}
        return [c for c in SUMMARY_COLUMNS if c not in missing]

    def rows(self) -> list[list[Any]]:
        cols = self.columns()
        return [[r.summary_row()[c] for c in cols] for r in self.results]

    def run_columns(self) -> list[str]:
        keys: list[str] = []
        for r in self.results:
            for run in r.runs:
                keys.extend(k for k in run if k not in keys)
        return ["method", *keys]

    def run_rows(self) -> list[list[Any]]:
        cols = self.run_columns()
        return [[r.name, *[run.get(c) for c in cols[1:]]] for r in self.results for run in r.runs]

    def table(self, digits: int = 4) -> str:
        """A markdown table: one row per set, ``mean +- std`` of each metric (fractions)."""
        present = [m for m in _METRICS if any(m in r.metrics for r in self.results)]
        header = ["method", "IPC", *[m.upper() if len(m) == 3 else m for m in present]]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        for r in self.results:
            cells = [r.name, str(r.metadata.get("ipc", ""))]
            for m in present:
                v = r.metrics.get(m)
                cells.append("" if v is None else f"{v['mean']:.{digits}f} +- {v['std']:.{digits}f}")
            lines.append("| " + " | ".join(cells) + " |")
        full = self.full_data.get("accuracy")
        if full is not None:
            lines.append("")
            lines.append(
                f"full-data accuracy (hard labels): {full:.{digits}f}; scores are fractions; "
                f"runs per set: {len(self.results[0].runs) if self.results else 0}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RESULTS_FORMAT,
            "format_version": RESULTS_FORMAT_VERSION,
            "results": [r.to_dict() for r in self.results],
            "protocol": self.protocol,
            "full_data": self.full_data,
            "stats": self.stats,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RankingReport:
        if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
            raise ValueError(f"not a DD-Ranking results file (no '{RESULTS_FORMAT}' header)")
        if data.get("format_version") != RESULTS_FORMAT_VERSION:
            raise ValueError(
                f"DD-Ranking results format version {data.get('format_version')!r}; this version reads "
                f"{RESULTS_FORMAT_VERSION}"
            )
        results = [
            RankingResult(r["name"], r["metrics"], r["runs"], r.get("metadata", {})) for r in data["results"]
        ]
        return cls(
            results,
            data["protocol"],
            data.get("full_data", {}),
            data.get("stats", {}),
            data.get("seconds", 0.0),
        )

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | os.PathLike, stem: str = "ranking") -> dict[str, Path]:
        """Write ``<stem>.json`` (everything), ``<stem>.csv`` (one row per set) and ``<stem>_runs.csv``
        (one row per set and run) into ``folder``, each atomically. Returns the paths."""
        folder = Path(folder)
        paths = {
            "json": atomic_write_text(
                folder / f"{stem}.json", json.dumps(_jsonable(self.to_dict()), indent=2) + "\n"
            ),
            "csv": atomic_write_text(folder / f"{stem}.csv", _csv_text(self.columns(), self.rows())),
            "runs_csv": atomic_write_text(
                folder / f"{stem}_runs.csv", _csv_text(self.run_columns(), self.run_rows())
            ),
        }
        return paths

    @classmethod
    def load(cls, path: str | os.PathLike) -> RankingReport:
        """Read a ``ranking.json`` written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def scalar_metrics(self, prefix: str = "ranking") -> dict[str, float]:
        """``{"<prefix>/<name>/<metric>": mean, "<prefix>/<name>/<metric>_std": std}`` for loggers."""
        out: dict[str, float] = {}
        for r in self.results:
            name = _safe_key(r.name)
            for m in _METRICS:
                if m in r.metrics:
                    out[f"{prefix}/{name}/{m}"] = float(r.metrics[m]["mean"])
                    out[f"{prefix}/{name}/{m}_std"] = float(r.metrics[m]["std"])
        return out


def _safe_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)) or "set"


def _jsonable(value: Any) -> Any:
    """Plain JSON types; non-finite floats become ``None`` (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item") and callable(value.item):
        try:
            return _jsonable(value.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def log_report(
    loggers: list[Any], report: RankingReport, step: int | None = None, prefix: str = "ranking"
) -> list[str]:
    """Send ``report`` to Lightning loggers: the scalar means/stds to every logger, and the table to those
    that take tables (W&B: a ``wandb.Table`` via ``WandbLogger.log_table``; TensorBoard: markdown text).

    Returns the kinds of loggers that received the table.

    Example::

        >>> log_report([], RankingReport([], {}))
        []
    """
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    scalars = report.scalar_metrics(prefix)
    sent = []
    for logger in loggers:
        if scalars:
            logger.log_metrics(scalars, step=step)
        if isinstance(logger, WandbLogger):
            logger.log_table(
                key=f"{prefix}/table", columns=report.columns(), data=_jsonable(report.rows()), step=step
            )
            sent.append("wandb")
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(f"{prefix}/table", report.table(), global_step=step or 0)
            sent.append("tensorboard")
    return sent
