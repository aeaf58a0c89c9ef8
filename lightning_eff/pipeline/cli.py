"""``lightning-eff pipeline``'s command line: :func:`build_parser` and :func:`main`.

Part of :mod:`lightning_eff.pipeline`.
"""

from __future__ import annotations

import argparse
import sys

from lightning_eff.pipeline.spec import Pipeline
from lightning_eff.pipeline.stages import ISOLATIONS, PipelineError

__all__ = ["build_parser", "main"]


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

