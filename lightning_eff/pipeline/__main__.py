"""``python -m lightning_eff.pipeline``: ``lightning-eff pipeline ...``, or one stage (``_stage``, subprocess isolation)."""

import sys

from lightning_eff.pipeline.cli import main
from lightning_eff.pipeline.runner import _stage_main

if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) > 1 and sys.argv[1] == "_stage":
        raise SystemExit(_stage_main(sys.argv[2:]))
    raise SystemExit(main())
