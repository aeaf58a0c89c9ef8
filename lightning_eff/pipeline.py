"""``lightning-eff pipeline``: run named ``fit`` / ``validate`` / ``test`` / ``rank`` stages in order from one YAML.

Usage::

    lightning-eff pipeline --config configs/pipeline/digits_ncfm_sdc_drupi_rank_ko.yaml
    lightning-eff pipeline --config ... --stages rank,student          # a subset (earlier outputs must exist)
    lightning-eff pipeline --config ... --set distill.trainer.max_steps=20 --set student.trainer.max_epochs=5
    lightning-eff pipeline --config ... --output_dir runs/try2 --dry_run # print the stage commands only

Every stage is an ordinary ``lightning-eff`` command (the LightningCLI's ``fit`` / ``validate`` / ``test``, or
``rank``, the DD-Ranking evaluator) built from existing config files plus overrides, so a pipeline is a list
of commands you could type, wired together by the paths of what each one writes. The file::

    name: my_pipeline                       # default: the file name
    output_dir: outputs/pipeline/my_pipeline  # relative to the working directory; --output_dir overrides
    isolation: inprocess                    # or subprocess (each stage in a fresh `python`); --isolation
    stages:                                 # run in this order
      distill:                              # a stage name: letters, digits, _ and -
        command: fit                        # fit | validate | test | rank
        config: ../distill/ncfm_digits_ipc10.yaml   # one path or a list, relative to THIS file
        overrides:                          # a mapping given to the command as one more --config (last)
          model: {init_args: {save_dir: ${stage.output_dir}}}
        args: [--trainer.max_steps=300]     # extra command-line arguments (after everything else)
        outputs: {synthetic_set: synthetic_set.pt}  # files the stage writes, relative to its folder
      student:
        command: fit
        config: ../ko/digits.yaml
        overrides:
          data: {class_path: SyntheticSetDataModule, init_args: {path: ${stages.distill.synthetic_set}, ...}}

References, replaced by the pipeline in ``config``, ``overrides`` and ``args`` before the stage runs:

* ``${stage.output_dir}``: this stage's folder, ``<output_dir>/<stage name>``;
* ``${stages.NAME.output_dir}``: an earlier stage's folder (``${stages.NAME.output_dir}/file.pt`` for a file
  in it);
* ``${stages.NAME.OUTPUT}``: the path of an output declared in that stage's ``outputs``;
* ``${pipeline.output_dir}``, ``${pipeline.name}``.

A value that is a reference to an earlier stage (optionally followed by ``/path``) names an artefact: it
must exist when the stage starts, else the pipeline stops with an error that names the stage to run first.
Any other ``${...}`` is left to the command itself (OmegaConf interpolation, resolved within each config
file). The pipeline sets ``trainer.default_root_dir`` (and ``rank``'s ``--output_dir``) to the stage's
folder; a module that writes elsewhere (a distillation's ``save_dir``) is pointed there with
``${stage.output_dir}``. After a stage, each declared output must exist.

Results: ``<output_dir>/pipeline_summary.json`` (written atomically after every stage) with, per stage, the
equivalent shell command, the status (``ok`` / ``failed`` / ``skipped`` / ``not_run``), the folder, the
seconds, the outputs, the scalar metrics (``test/acc``, ``val/acc``, ``distill/loss``, DD-Ranking's
``ranking/<set>/lrs`` ... read from ``ranking.json``) and the key ones among them. Each stage folder holds
``pipeline_overrides.yaml``, the ``--config`` the overrides became. Exit status 0 when every selected stage
succeeded, 1 otherwise (with the error).

Stages run in this process by default (no interpreter start-up per stage; global state that a stage
changes, such as the deterministic-algorithms flag, the thread count and the seed environment, is restored
afterwards), or each in a fresh process of the same Python with ``isolation: subprocess``
(``python -m lightning_eff.pipeline _stage ...``). A stage whose strategy launches more processes
(``strategy: ddp`` with ``devices > 1``: Lightning re-runs the command line once per rank) needs
``isolation: subprocess``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_eff.cli import LightningEffCLI

__all__ = [
    "COMMANDS",
    "ISOLATIONS",
    "SUMMARY_FORMAT",
    "SUMMARY_FORMAT_VERSION",
    "Pipeline",
    "PipelineError",
    "Stage",
    "build_parser",
    "main",
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


# ----------------------------------------------------------------------------------------------------
# the pipeline file
# ----------------------------------------------------------------------------------------------------
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


class Pipeline:
    """A parsed pipeline file (see the module docstring for the format).

    Args:
        spec: the YAML content as a mapping.
        path: the file it came from (relative config paths are resolved against its folder).
        output_dir: overrides the file's ``output_dir``.

    Example::

        >>> p = Pipeline({"stages": {"a": {"command": "fit", "config": "x.yaml",
        ...               "overrides": {"model": {"init_args": {"save_dir": "${stage.output_dir}"}}},
        ...               "outputs": {"set": "synthetic_set.pt"}},
        ...               "b": {"command": "rank", "config": "r.yaml", "args": ["--synthetic=${stages.a.set}"]}}},
        ...              path="configs/pipeline/p.yaml", output_dir="out")
        >>> r = p.resolve("b")
        >>> r.args, [str(n[0]) for n in r.needs]
        (['--synthetic=out/a/synthetic_set.pt'], ['out/a/synthetic_set.pt'])
        >>> p.resolve("a").overrides
        {'model': {'init_args': {'save_dir': 'out/a'}}}
    """

    def __init__(self, spec: Any, path: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> None:
        self.path = Path(path)
        where = f"pipeline {self.path}"
        if not isinstance(spec, dict):
            raise _err(where, f"the file must hold a mapping with a `stages:` key, got {type(spec).__name__}")
        unknown = sorted(set(spec) - set(_TOP_KEYS))
        if unknown:
            raise _err(where, f"unknown key(s) {unknown}; allowed: {list(_TOP_KEYS)}")
        self.name = str(spec.get("name") or self.path.stem)
        out = output_dir if output_dir is not None else spec.get("output_dir")
        if out is None:
            out = Path("outputs") / "pipeline" / self.name
        if not isinstance(out, (str, os.PathLike)) or not str(out):
            raise _err(where, f"`output_dir` must be a path, got {out!r}")
        self.output_dir = Path(out)
        self.isolation = spec.get("isolation", "inprocess")
        if self.isolation not in ISOLATIONS:
            raise _err(where, f"`isolation` must be one of {list(ISOLATIONS)}, got {self.isolation!r}")
        stages = spec.get("stages")
        if not isinstance(stages, dict) or not stages:
            raise _err(where, "`stages` must be a non-empty mapping `name: {command, config, ...}`, in run order")
        self.stages: dict[str, Stage] = {}
        for name, body in stages.items():
            self.stages[str(name)] = self._parse_stage(str(name), body, where)
        # references must point at earlier stages and declared outputs: checked once, up front
        for name in self.stages:
            self.resolve(name)

    @classmethod
    def load(cls, path: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> Pipeline:
        """Read a pipeline YAML file."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"no pipeline file at {str(path)!r}")
        try:
            spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise PipelineError(f"pipeline {path} is not valid YAML: {err}") from None
        return cls(spec, path, output_dir)

    @staticmethod
    def _parse_stage(name: str, body: Any, where: str) -> Stage:
        where = f"{where}, stage {name!r}"
        if not _NAME.match(name):
            raise _err(where, "stage names may only hold letters, digits, '_' and '-'")
        if not isinstance(body, dict):
            raise _err(where, f"a stage must be a mapping with `command` and `config`, got {body!r}")
        unknown = sorted(set(body) - set(_STAGE_KEYS))
        if unknown:
            raise _err(where, f"unknown key(s) {unknown}; allowed: {list(_STAGE_KEYS)}")
        command = body.get("command")
        if command not in COMMANDS:
            raise _err(where, f"`command` must be one of {list(COMMANDS)}, got {command!r}")
        configs = _str_list(body.get("config", []), where, "config")
        overrides = body.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise _err(where, f"`overrides` must be a mapping (a config fragment), got {overrides!r}")
        args = _str_list(body.get("args", []), where, "args")
        outputs = body.get("outputs") or {}
        if not isinstance(outputs, dict) or not all(
            isinstance(k, str) and _NAME.match(k) and isinstance(v, str) and v for k, v in outputs.items()
        ):
            raise _err(where, f"`outputs` must map names (letters, digits, _ -) to file names, got {outputs!r}")
        if "output_dir" in outputs:
            raise _err(where, "`outputs` cannot declare `output_dir` (it is the stage's folder)")
        if not configs and not overrides:
            raise _err(where, "give at least one `config` file or `overrides`")
        return Stage(name, command, configs, dict(overrides), args, dict(outputs))

    # ------------------------------------------------------------------------------------------------
    def stage_dir(self, name: str) -> Path:
        """``<output_dir>/<name>``."""
        return self.output_dir / name

    def select(self, names: str | list[str] | None) -> list[str]:
        """The stages to run, in pipeline order (``None``: all); unknown names are an error."""
        if names is None:
            return list(self.stages)
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in names if n not in self.stages]
        if unknown or not names:
            raise PipelineError(
                f"--stages: unknown stage(s) {unknown or names!r}; the stages of {self.name} are {list(self.stages)}"
            )
        return [n for n in self.stages if n in names]

    def resolve(self, name: str) -> ResolvedStage:
        """Replace the references of stage ``name`` (see the module docstring)."""
        stage = self.stages[name]
        order = list(self.stages)
        here = order.index(name)
        out_dir = self.stage_dir(name)
        needs: list[tuple[Path, str]] = []
        where = f"pipeline {self.path}, stage {name!r}"

        def lookup(kind: str, key: str, text: str) -> tuple[str, str | None]:
            parts = key.split(".")
            if kind == "pipeline" and parts in (["output_dir"], ["name"]):
                return (str(self.output_dir) if parts[0] == "output_dir" else self.name), None
            if kind == "stage" and parts == ["output_dir"]:
                return str(out_dir), None
            if kind == "stages" and len(parts) == 2:
                other, what = parts
                if other not in self.stages:
                    raise _err(where, f"{text} refers to an unknown stage {other!r}; stages: {order}")
                if order.index(other) >= here:
                    raise _err(where, f"{text} refers to stage {other!r}, which does not run before {name!r}")
                if what == "output_dir":
                    return str(self.stage_dir(other)), other
                outputs = self.stages[other].outputs
                if what not in outputs:
                    raise _err(
                        where,
                        f"{text}: stage {other!r} declares no output {what!r} (its outputs: "
                        f"{sorted(outputs) or 'none'}; or use ${{stages.{other}.output_dir}}/<file>)",
                    )
                return str(self.stage_dir(other) / outputs[what]), other
            raise _err(
                where,
                f"{text} is not a pipeline reference; use ${{stage.output_dir}}, ${{stages.NAME.output_dir}}, "
                f"${{stages.NAME.OUTPUT}}, ${{pipeline.output_dir}} or ${{pipeline.name}}",
            )

        def substitute(text: str, artefact_value: bool) -> str:
            producers: list[str] = []

            def repl(match: re.Match) -> str:
                value, producer = lookup(match.group(1), match.group(2), match.group(0))
                if producer is not None:
                    producers.append(producer)
                return value

            result = _REF.sub(repl, text)
            # a value that *is* a reference to an earlier stage (+ "/sub/path") names an artefact
            head = _REF.match(text.strip())
            if artefact_value and head and producers and head.group(1) == "stages":
                rest = text.strip()[head.end() :]
                if rest == "" or rest.startswith("/"):
                    needs.append((Path(result.strip()), producers[0]))
            return result

        def walk(value: Any) -> Any:
            if isinstance(value, str):
                return substitute(value, artefact_value=True)
            if isinstance(value, list):
                return [walk(v) for v in value]
            if isinstance(value, dict):
                return {k: walk(v) for k, v in value.items()}
            return value

        configs = []
        for c in stage.configs:
            text = substitute(c, artefact_value=True)
            path = Path(text)
            if not path.is_absolute() and not _REF.search(c):
                path = Path(os.path.normpath(self.path.parent / path))
            configs.append(path)
        args = []
        for a in stage.args:
            if a.startswith("--") and "=" in a:
                key, value = a.split("=", 1)
                args.append(f"{key}={substitute(value, artefact_value=True)}")
            else:
                args.append(substitute(a, artefact_value=True))
        return ResolvedStage(stage, out_dir, configs, walk(stage.overrides), args, needs)

    # ------------------------------------------------------------------------------------------------
    def run(
        self,
        stages: str | list[str] | None = None,
        isolation: str | None = None,
        extra_args: dict[str, list[str]] | None = None,
        verbose: bool = True,
    ) -> dict[str, Any]:
        """Run the selected stages in order; returns the summary (also written to ``pipeline_summary.json``).

        Stops at the first failing stage (its error is in the summary, the later stages are ``not_run``).

        Raises:
            PipelineError: unknown stages, or a stage needs an artefact that does not exist (checked before
                the stage starts; the summary is written first).
        """
        selected = self.select(stages)
        isolation = isolation or self.isolation
        if isolation not in ISOLATIONS:
            raise PipelineError(f"--isolation must be one of {list(ISOLATIONS)}, got {isolation!r}")
        extra_args = extra_args or {}
        for name in extra_args:
            if name not in self.stages:
                raise PipelineError(f"--set: unknown stage {name!r}; the stages of {self.name} are {list(self.stages)}")
        previous = _previous_summary(self.output_dir / SUMMARY_NAME)
        started = time.time()
        summary: dict[str, Any] = {
            "format": SUMMARY_FORMAT,
            "format_version": SUMMARY_FORMAT_VERSION,
            "pipeline": self.name,
            "config": str(self.path),
            "output_dir": str(self.output_dir),
            "isolation": isolation,
            "selected": selected,
            "started": _now(),
            "finished": None,
            "seconds": None,
            "status": "running",
            "stages": [],
        }
        records: dict[str, dict[str, Any]] = {}
        for name in self.stages:
            r = self.resolve(name)
            records[name] = {
                "name": name,
                "command": self.stages[name].command,
                "status": "not_run" if name in selected else "skipped",
                "output_dir": str(r.output_dir),
            }
            if name not in selected and name in previous:
                records[name]["previous"] = previous[name]
        summary["stages"] = [records[n] for n in self.stages]

        def write() -> None:
            _write_summary(self.output_dir / SUMMARY_NAME, summary)

        failed = False
        try:
            for name in selected:
                resolved = self.resolve(name)
                if name in extra_args:
                    resolved.args = [*resolved.args, *extra_args[name]]
                record = records[name]
                record.update(shell_command=resolved.shell_command(), argv=resolved.argv())
                missing = [(p, producer) for p, producer in resolved.needs if not p.exists()]
                if missing:
                    path, producer = missing[0]
                    message = (
                        f"stage {name!r} needs {path}, made by stage {producer!r}, which does not exist: run "
                        f"stage {producer!r} first (e.g. --stages {producer},{name}) or check its outputs."
                    )
                    record.update(status="failed", error=message)
                    failed = True
                    write()
                    raise PipelineError(message)
                record["status"] = "running"
                write()
                if verbose:
                    print(f"\n=== pipeline {self.name}: stage {name!r} ({resolved.stage.command}) ===", flush=True)
                    print(resolved.shell_command(), flush=True)
                t0 = time.perf_counter()
                result = _run_stage(resolved, isolation)
                record["seconds"] = round(time.perf_counter() - t0, 2)
                metrics = {k: v for k, v in sorted(result.get("metrics", {}).items())}
                record["metrics"] = metrics
                record["key_metrics"] = {k: v for k, v in metrics.items() if _KEY_METRIC.match(k)}
                for key in ("checkpoint", "ranking_json"):
                    if result.get(key):
                        record[key] = result[key]
                outputs = {k: str(p) for k, p in resolved.outputs().items()}
                record["outputs"] = outputs
                if result.get("status") != "ok":
                    record.update(status="failed", error=result.get("error", "unknown error"))
                    failed = True
                    write()
                    break
                absent = [k for k, p in outputs.items() if not Path(p).exists()]
                if absent:
                    record.update(
                        status="failed",
                        error=f"stage {name!r} finished but did not write its declared output(s) "
                        + ", ".join(f"{k} ({outputs[k]})" for k in absent)
                        + "; check where the command writes (e.g. model.init_args.save_dir: ${stage.output_dir})",
                    )
                    failed = True
                    write()
                    break
                record["status"] = "ok"
                write()
        except KeyboardInterrupt:
            summary["status"] = "interrupted"
            raise
        finally:
            summary["finished"] = _now()
            summary["seconds"] = round(time.time() - started, 2)
            if summary["status"] == "running":
                summary["status"] = "failed" if failed else "ok"
            write()
        if verbose:
            print("\n" + format_summary(summary), flush=True)
        return summary


# ----------------------------------------------------------------------------------------------------
# running one stage
# ----------------------------------------------------------------------------------------------------
def _write_overrides(resolved: ResolvedStage) -> None:
    import yaml

    from lightning_eff.ranking.results import atomic_write_text

    resolved.output_dir.mkdir(parents=True, exist_ok=True)
    if resolved.overrides:
        text = (
            f"# written by `lightning-eff pipeline` for stage {resolved.stage.name!r}: the stage's overrides,\n"
            f"# given to the command as its last --config\n"
            + yaml.safe_dump(resolved.overrides, sort_keys=False)
        )
        atomic_write_text(resolved.output_dir / OVERRIDES_NAME, text)


def _run_stage(resolved: ResolvedStage, isolation: str) -> dict[str, Any]:
    _write_overrides(resolved)
    for path in resolved.configs:
        if not path.is_file():
            return {"status": "failed", "error": f"no config file at {path}", "metrics": {}}
    if isolation == "subprocess":
        return _run_subprocess(resolved)
    return run_stage_inprocess(resolved.stage.command, resolved.argv()[1:], resolved.output_dir)


def _run_subprocess(resolved: ResolvedStage) -> dict[str, Any]:
    result_path = resolved.output_dir / _STAGE_RESULT_NAME
    if result_path.exists():
        result_path.unlink()
    cmd = [sys.executable, "-m", "lightning_eff.pipeline", "_stage", str(result_path), *resolved.argv()]
    proc = subprocess.run(cmd)
    if result_path.is_file():
        result = json.loads(result_path.read_text(encoding="utf-8"))
    else:
        result = {"status": "failed", "metrics": {}}
    if proc.returncode != 0 and result.get("status") == "ok":
        result["status"] = "failed"
    if result.get("status") != "ok":
        result.setdefault("error", f"the stage's process exited with status {proc.returncode} (see its output above)")
    return result


def _scalars(metrics: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in dict(metrics or {}).items():
        try:
            v = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError, RuntimeError):
            continue
        out[str(key)] = v if math.isfinite(v) else None  # strict JSON
    return out


@contextlib.contextmanager
def _restored_globals(keep_argv: bool = False):
    """Undo what a stage changes globally (so stages run in one process behave as in fresh ones).

    Unless ``keep_argv``, ``sys.argv`` holds only the program name meanwhile (LightningCLI warns when both
    ``sys.argv`` and ``args`` hold arguments).
    """
    import torch

    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    env_keys = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG")
    env = {k: os.environ.get(k) for k in env_keys}
    saved_argv = sys.argv
    if not keep_argv:
        sys.argv = sys.argv[:1]
    try:
        yield
    finally:
        sys.argv = saved_argv
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()
        gc.collect()


def run_stage_inprocess(
    command: str, argv: list[str], output_dir: str | os.PathLike, keep_argv: bool = False
) -> dict[str, Any]:
    """Run ``lightning-eff <command> <argv>`` in this process; returns status, scalar metrics and artefacts.

    Never raises for a failing stage: the error (and traceback, printed to stderr) goes in the result.
    ``keep_argv`` leaves ``sys.argv`` as it is (the ``_stage`` child: a multi-process strategy relaunches it).
    """
    output_dir = Path(output_dir)
    result: dict[str, Any] = {"status": "failed", "metrics": {}}
    try:
        with _restored_globals(keep_argv):
            if command == "rank":
                from lightning_eff.ranking.cli import main as rank_main

                code = rank_main(list(argv))
                ranking = output_dir / "ranking.json"
                if code != 0:
                    result["error"] = f"`lightning-eff rank` exited with status {code} (its error is printed above)"
                    return result
                if ranking.is_file():
                    from lightning_eff.ranking.results import RankingReport

                    report = RankingReport.load(ranking)
                    metrics = _scalars(report.scalar_metrics("ranking"))
                    full = report.full_data.get("accuracy")
                    if full is not None:
                        metrics["ranking/full_acc"] = float(full)
                    result["metrics"] = metrics
                    result["ranking_json"] = str(ranking)
            elif command in ("fit", "validate", "test"):
                cli = _RecordingCLI(args=[command, *argv], relaunch_ok=keep_argv)
                result["metrics"] = dict(cli.recorded)
                ckpt = getattr(getattr(cli.trainer, "checkpoint_callback", None), "best_model_path", "")
                if ckpt:
                    result["checkpoint"] = str(ckpt)
                del cli
            else:
                result["error"] = f"unknown command {command!r}; one of {list(COMMANDS)}"
                return result
    except SystemExit as exc:  # jsonargparse reports a bad argument with SystemExit(2)
        if exc.code not in (0, None):
            result["error"] = f"`lightning-eff {command}` stopped: bad arguments or config (exit status {exc.code}; see above)"
            return result
    except Exception as exc:  # a failing stage is reported, not raised: the summary records it
        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    result["status"] = "ok"
    return result


class _RecordingCLI(LightningEffCLI):
    """``LightningEffCLI`` that keeps the scalar metrics of each phase (``test_after_fit`` resets them).

    With ``relaunch_ok=False`` (a stage in the pipeline's own process) a strategy that relaunches the command
    line per rank is refused: the relaunched processes would run the pipeline's command, not the stage's.
    """

    def __init__(self, *args: Any, relaunch_ok: bool = True, **kwargs: Any) -> None:
        self.recorded: dict[str, float] = {}
        self.relaunch_ok = relaunch_ok
        super().__init__(*args, **kwargs)

    def instantiate_trainer(self, **kwargs: Any):
        trainer = super().instantiate_trainer(**kwargs)
        from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

        if not self.relaunch_ok and isinstance(getattr(trainer.strategy, "launcher", None), _SubprocessScriptLauncher):
            raise PipelineError(
                f"the stage's strategy ({type(trainer.strategy).__name__}, {trainer.num_devices} devices) starts "
                f"one process per device by re-running the command line; run the pipeline with "
                f"`isolation: subprocess` (or --isolation subprocess), or use strategy ddp_spawn"
            )
        return trainer

    def _record(self) -> None:
        self.recorded.update(_scalars(self.trainer.callback_metrics))

    def after_fit(self) -> None:
        self._record()
        super().after_fit()
        self._record()

    def after_validate(self) -> None:
        self._record()

    def after_test(self) -> None:
        self._record()


# ----------------------------------------------------------------------------------------------------
# the summary
# ----------------------------------------------------------------------------------------------------
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_summary(path: Path, summary: dict[str, Any]) -> None:
    from lightning_eff.ranking.results import atomic_write_text

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


# ----------------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-eff pipeline",
        description="Run the named fit / validate / test / rank stages of a pipeline YAML in order.",
    )
    parser.add_argument("-c", "--config", required=True, help="the pipeline YAML (configs/pipeline/*.yaml)")
    parser.add_argument(
        "--stages", default=None, help="comma-separated stages to run (default: all); earlier outputs must exist"
    )
    parser.add_argument("--output_dir", default=None, help="where the stage folders and the summary go")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="one more argument for a stage's command: --set student.trainer.max_epochs=5 adds "
        "--trainer.max_epochs=5 to stage student (repeatable)",
    )
    parser.add_argument("--isolation", choices=ISOLATIONS, default=None, help="run stages in this process or each in a fresh one")
    parser.add_argument("--dry_run", action="store_true", help="print each stage's command and exit")
    return parser


def _parse_sets(values: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in values:
        head, sep, value = item.partition("=")
        stage, dot, key = head.partition(".")
        if not sep or not dot or not stage or not key:
            raise PipelineError(f"--set {item!r}: expected STAGE.KEY=VALUE, e.g. student.trainer.max_epochs=5")
        out.setdefault(stage, []).append(f"--{key}={value}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Run ``lightning-eff pipeline`` with ``argv`` (without the ``pipeline`` word); returns the exit status."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        pipeline = Pipeline.load(args.config, args.output_dir)
        extra = _parse_sets(args.sets)
        if args.dry_run:
            selected = pipeline.select(args.stages)
            for name in extra:
                if name not in pipeline.stages:
                    raise PipelineError(f"--set: unknown stage {name!r}; the stages are {list(pipeline.stages)}")
            for name in selected:
                resolved = pipeline.resolve(name)
                resolved.args = [*resolved.args, *extra.get(name, [])]
                print(f"# {name}")
                print(resolved.shell_command())
            return 0
        summary = pipeline.run(args.stages, isolation=args.isolation, extra_args=extra)
    except PipelineError as err:
        print(f"lightning-eff pipeline: error: {err}", file=sys.stderr)
        return 1
    return 0 if summary["status"] == "ok" else 1


def _stage_main(argv: list[str]) -> int:
    """``python -m lightning_eff.pipeline _stage RESULT.json COMMAND ARGS...``: one stage, for subprocess isolation."""
    import warnings

    from lightning_eff.ranking.results import atomic_write_text

    result_path, command, rest = Path(argv[0]), argv[1], argv[2:]
    output_dir = result_path.parent
    # sys.argv is kept (it is what a multi-process strategy relaunches), so LightningCLI sees both
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended to run from within")
    result = run_stage_inprocess(command, rest, output_dir, keep_argv=True)
    # under a multi-process strategy Lightning relaunches this command once per rank: rank 0 reports
    if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0 and int(os.environ.get("NODE_RANK", "0") or 0) == 0:
        atomic_write_text(result_path, json.dumps(result, indent=2, default=str) + "\n")
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) > 1 and sys.argv[1] == "_stage":
        raise SystemExit(_stage_main(sys.argv[2:]))
    raise SystemExit(main())
