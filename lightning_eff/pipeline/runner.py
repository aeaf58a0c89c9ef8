"""Running one stage of a pipeline: in this process (:func:`run_stage_inprocess`) or in a fresh one.

Part of :mod:`lightning_eff.pipeline`. ``python -m lightning_eff.pipeline _stage RESULT.json COMMAND ARGS...``
(:func:`_stage_main`) is the child of ``isolation: subprocess``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

from lightning_eff.cli import LightningEffCLI
from lightning_eff.pipeline.stages import (
    _STAGE_RESULT_NAME,
    COMMANDS,
    OVERRIDES_NAME,
    PipelineError,
    ResolvedStage,
)
from lightning_eff.utils.io import atomic_write_text

__all__ = ["run_stage_inprocess"]


def _write_overrides(resolved: ResolvedStage) -> None:
    import yaml

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



def _stage_main(argv: list[str]) -> int:
    """``python -m lightning_eff.pipeline _stage RESULT.json COMMAND ARGS...``: one stage, for subprocess isolation."""
    import warnings

    result_path, command, rest = Path(argv[0]), argv[1], argv[2:]
    output_dir = result_path.parent
    # sys.argv is kept (it is what a multi-process strategy relaunches), so LightningCLI sees both
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended to run from within")
    result = run_stage_inprocess(command, rest, output_dir, keep_argv=True)
    # under a multi-process strategy Lightning relaunches this command once per rank: rank 0 reports
    if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0 and int(os.environ.get("NODE_RANK", "0") or 0) == 0:
        atomic_write_text(result_path, json.dumps(result, indent=2, default=str) + "\n")
    return 0 if result["status"] == "ok" else 1
