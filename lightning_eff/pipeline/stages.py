"""The names of a pipeline (commands, file names), its error, and its stages before and after resolving.

Part of :mod:`lightning_eff.pipeline` (see there for the pipeline file's format).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "COMMANDS",
    "ISOLATIONS",
    "OVERRIDES_NAME",
    "SUMMARY_FORMAT",
    "SUMMARY_FORMAT_VERSION",
    "SUMMARY_NAME",
    "PipelineError",
    "ResolvedStage",
    "Stage",
]

COMMANDS: tuple[str, ...] = ("fit", "validate", "test", "rank")
ISOLATIONS: tuple[str, ...] = ("inprocess", "subprocess")
SUMMARY_FORMAT = "lightning-eff/pipeline-summary"
SUMMARY_FORMAT_VERSION = 1
SUMMARY_NAME = "pipeline_summary.json"
OVERRIDES_NAME = "pipeline_overrides.yaml"
_STAGE_RESULT_NAME = "pipeline_stage_result.json"

_TOP_KEYS = ("name", "output_dir", "isolation", "stages")
_STAGE_KEYS = ("command", "config", "overrides", "args", "outputs")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_REF = re.compile(r"\$\{\s*(stage|stages|pipeline)\.([^}]*?)\s*\}")
#: metrics shown in the printed table and in each stage's ``key_metrics``
_KEY_METRIC = re.compile(r"^(test/acc|test/loss|val/acc|distill/loss|ranking/full_acc|ranking/[^/]+/(lrs|ars|hlr|ior))$")


class PipelineError(ValueError):
    """A bad pipeline file or command line, or a stage that needs an artefact that is not there."""


@dataclass
class Stage:
    """One stage as written in the pipeline file (references not yet replaced)."""

    name: str
    command: str
    configs: list[str]
    overrides: dict[str, Any] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)


@dataclass
class ResolvedStage:
    """A stage with its references replaced: what runs, and which artefacts it needs."""

    stage: Stage
    output_dir: Path
    configs: list[Path]
    overrides: dict[str, Any]
    args: list[str]
    needs: list[tuple[Path, str]]  # (artefact, the stage that makes it)

    def argv(self) -> list[str]:
        """The command line after ``lightning-eff``: the command, the configs, the overrides file, the args."""
        argv = [self.stage.command]
        for path in self.configs:
            argv += ["--config", str(path)]
        if self.overrides:
            argv += ["--config", str(self.output_dir / OVERRIDES_NAME)]
        argv += self.args
        if self.stage.command == "rank":
            argv += [f"--output_dir={self.output_dir}", f"--trainer.default_root_dir={self.output_dir}"]
        else:
            argv += [f"--trainer.default_root_dir={self.output_dir}"]
        return argv

    def shell_command(self) -> str:
        return shlex.join(["lightning-eff", *self.argv()])

    def outputs(self) -> dict[str, Path]:
        return {k: self.output_dir / v for k, v in self.stage.outputs.items()}


def _err(where: str, message: str) -> PipelineError:
    return PipelineError(f"{where}: {message}")


def _str_list(value: Any, where: str, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise _err(where, f"`{what}` must be a string or a list of strings, got {value!r}")

