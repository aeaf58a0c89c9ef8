"""The pipeline summary: ``pipeline_summary.json`` (written atomically after every stage) and its printed table.

Part of :mod:`lightning_eff.pipeline`.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from lightning_eff.pipeline.stages import SUMMARY_FORMAT, SUMMARY_NAME
from lightning_eff.utils.io import atomic_write_text

__all__ = ["format_summary"]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_summary(path: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(summary, indent=2, default=str) + "\n")


def _previous_summary(path: Path) -> dict[str, dict[str, Any]]:
    """Stage records of an earlier run into the same folder (for stages this run skips)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != SUMMARY_FORMAT:
        return {}
    out = {}
    for rec in data.get("stages", []):
        if isinstance(rec, dict) and "name" in rec:
            prev = rec.get("previous") if rec.get("status") == "skipped" else rec
            if prev:
                out[rec["name"]] = prev
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """A markdown table of the stages: status, seconds and key metrics."""
    lines = [
        f"pipeline {summary['pipeline']}: {summary['status']} in {summary.get('seconds') or 0:.0f} s; "
        f"summary: {Path(summary['output_dir']) / SUMMARY_NAME}",
        "",
        "| stage | command | status | seconds | key metrics |",
        "| --- | --- | --- | --- | --- |",
    ]
    for rec in summary["stages"]:
        metrics = ", ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.get("key_metrics", {}).items()
        )
        if rec.get("error"):
            metrics = (metrics + "; " if metrics else "") + f"error: {rec['error']}"
        seconds = rec.get("seconds")
        lines.append(
            f"| {rec['name']} | {rec['command']} | {rec['status']} | {'' if seconds is None else f'{seconds:.0f}'} "
            f"| {metrics} |"
        )
    return "\n".join(lines)

