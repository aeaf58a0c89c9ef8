"""The best constant action of the Think2Drive action table on the held-out highway + merge suite.

A policy that has collapsed to one action scores at most what the best constant action scores, so this
is the floor a learned driver must clear by far (issue 17). Protocol:

1. every action of the table is driven, unchanged, for ``--val-episodes`` episodes per scenario on
   *validation* seeds (``2**31 + 100000 + i``: neither training nor test seeds);
2. the action with the best mean driving score there is evaluated on the *test* suite, the held-out
   seeds ``2**31 + i`` (``i < --test-episodes``) that ``benchmarks/rl.py`` reports.

The script only uses ``HighwayBEVEnv`` and ``run_episode``, so it runs against an older checkout too
(``PYTHONPATH=/path/to/old/checkout python -m benchmarks.rl_constant``): that is how the "before" row of
``benchmarks/results/rl_constant_action.json`` was measured.

Usage::

    python -m benchmarks.rl_constant --out benchmarks/results/rl_constant_action_after.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks import harness

EVAL_SEED_OFFSET = 2**31
VAL_SEED_OFFSET = 2**31 + 100_000


def summarize(records: list[dict]) -> dict:
    keys = [k for k, v in records[0].items() if isinstance(v, (int, float)) and k != "seed"]
    out = {"all": {k: float(np.mean([r[k] for r in records])) for k in keys}}
    for scenario in sorted({r["scenario"] for r in records}):
        rows = [r for r in records if r["scenario"] == scenario]
        out[scenario] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    return out


def drive(env, action: int, suite: list[tuple[str, int]]) -> list[dict]:
    from lightning_eff.rl.policies import run_episode

    return [run_episode(env, lambda obs, env: action, scenario, seed) for scenario, seed in suite]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", nargs="+", default=["highway", "merge"])
    p.add_argument("--val-episodes", type=int, default=5)
    p.add_argument("--test-episodes", type=int, default=20)
    p.add_argument("--bev-size", type=int, default=16, help="BEV size (constant actions do not read it)")
    p.add_argument("--resolution", type=float, default=4.0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import lightning_eff
    from lightning_eff.rl.envs import HighwayBEVEnv

    env = HighwayBEVEnv(args.scenarios, bev_size=args.bev_size, resolution=args.resolution)
    table = env.action_table
    print(f"lightning_eff from {Path(lightning_eff.__file__).parent}; {len(table)} actions; scenarios {args.scenarios}")
    val = [(s, VAL_SEED_OFFSET + i) for s in args.scenarios for i in range(args.val_episodes)]
    test = [(s, EVAL_SEED_OFFSET + i) for s in args.scenarios for i in range(args.test_episodes)]
    t0 = time.perf_counter()
    scan = []
    for a in range(len(table)):
        res = summarize(drive(env, a, val))
        scan.append({"action": a, "command": table[a].tolist(), **{k: res["all"][k] for k in
                     ("driving_score", "route_completion", "collision")}})
        print(f"  action {a:2d} {table[a].tolist()}  val DS {scan[-1]['driving_score']:.3f}  "
              f"RC {scan[-1]['route_completion']:.3f}  coll {scan[-1]['collision']:.2f}", flush=True)
    best = max(scan, key=lambda r: r["driving_score"])
    test_res = summarize(drive(env, best["action"], test))
    print(f"best constant action on validation: {best['action']} {best['command']}; test suite ({len(test)} episodes):")
    for k, row in test_res.items():
        extra = f"  DS(LB1.0 set) {row['driving_score_lb1']:.3f}" if "driving_score_lb1" in row else ""
        print(f"  {k:8s} DS {row['driving_score']:.3f}  RC {row['route_completion']:.3f}  coll {row['collision']:.2f}"
              f"{extra}")
    out = {"protocol": vars(args), "code": str(Path(lightning_eff.__file__).parent), "val_scan": scan,
           "best_action": best["action"], "best_command": best["command"], "test": test_res,
           "wall_s": time.perf_counter() - t0}
    if args.out:
        harness.write_json(args.out, {**out, "environment": harness.environment()}, indent=1)


if __name__ == "__main__":
    main()
