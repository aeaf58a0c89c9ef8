"""``python -m lightning_eff.ranking --config ... --synthetic ...`` (the same as ``lightning-eff rank``)."""

import sys

from lightning_eff.ranking.cli import main

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
