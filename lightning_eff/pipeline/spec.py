"""The pipeline file: :class:`Pipeline` parses it, resolves the references of each stage and runs them in order.

Part of :mod:`lightning_eff.pipeline` (see there for the format); one stage runs in
:mod:`~lightning_eff.pipeline.runner`, the summary is written by :mod:`~lightning_eff.pipeline.summary`.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from lightning_eff.pipeline.runner import _run_stage
from lightning_eff.pipeline.stages import (
    _KEY_METRIC,
    _NAME,
    _REF,
    _STAGE_KEYS,
    _TOP_KEYS,
    COMMANDS,
    ISOLATIONS,
    SUMMARY_FORMAT,
    SUMMARY_FORMAT_VERSION,
    SUMMARY_NAME,
    PipelineError,
    ResolvedStage,
    Stage,
    _err,
    _str_list,
)
from lightning_eff.pipeline.summary import _now, _previous_summary, _write_summary, format_summary

__all__ = ["Pipeline"]


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

