"""benchmarks/gpu_suite.py: the job runner (statuses, caps, guards) and a tiny CPU run of every job."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _suite():
    return importlib.import_module("benchmarks.gpu_suite")


def _script(tmp_path: Path, name: str, body: str) -> str:
    """A small argparse script (no torch) standing in for a benchmark."""
    path = tmp_path / name
    path.write_text(
        "import argparse, json, sys, time\n"
        "p = argparse.ArgumentParser()\n"
        "p.add_argument('--mode', choices=['ok', 'fail', 'sleep', 'nojson'])\n"
        "p.add_argument('--out')\n"
        "a = p.parse_args()\n" + body
    )
    return name


BODY = (
    "if a.mode == 'fail': sys.exit(3)\n"
    "if a.mode == 'sleep': time.sleep(60)\n"
    "if a.mode == 'ok': open(a.out, 'w').write(json.dumps({'value': 1}))\n"
)


def _run(suite, tmp_path, job, cap=20.0):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return suite.run_job(job, SimpleNamespace(tiny=True, device="cpu", threads=None), out, cap, root=tmp_path)


def test_job_statuses(tmp_path):
    suite = _suite()
    script = _script(tmp_path, "bench.py", BODY)

    def job(*args, requires=("--mode",), script=script, out_flag="--out"):
        return suite.Job(
            name="j",
            figure="",
            script=script,
            args=(),
            tiny_args=args,
            cap_s=1,
            requires=requires,
            out_flag=out_flag,
        )

    ok = _run(suite, tmp_path, job("--mode", "ok"))
    assert ok.status == "ok" and ok.returncode == 0
    assert json.loads(Path(ok.json).read_text()) == {"value": 1}
    assert ok.command[-2:] == ["--out", "out/j.json"]  # paths in the summary are relative to the root

    failed = _run(suite, tmp_path, job("--mode", "fail"))
    assert failed.status == "failed" and failed.returncode == 3 and failed.json is None

    no_json = _run(suite, tmp_path, job("--mode", "nojson"))  # exit 0 without the promised JSON is a failure
    assert no_json.status == "failed" and "no JSON" in no_json.log_tail

    slow = _run(suite, tmp_path, job("--mode", "sleep"), cap=2.0)
    assert slow.status == "timeout" and slow.returncode is None and slow.wall_s < 30

    # a flag the job needs is missing from the script's source: not run at all
    missing = _run(suite, tmp_path, job("--arch", "llava", requires=("--arch", "llava")))
    assert missing.status == "unavailable in this checkout" and missing.missing == ["--arch", "llava"]
    assert missing.command == []
    # a flag not declared in `requires` but rejected by argparse at run time
    rejected = _run(suite, tmp_path, job("--mode", "teleport"))
    assert rejected.status == "unavailable in this checkout" and rejected.returncode == 2
    gone = _run(suite, tmp_path, job(script="no_such_script.py"))
    assert gone.status == "unavailable in this checkout" and gone.missing == ["no_such_script.py"]
    # a script without an --out flag runs; its log is the raw result
    plain = "plain.py"
    (tmp_path / plain).write_text("print('figure 42')\n")
    log_only = _run(suite, tmp_path, job(requires=(), script=plain))
    assert log_only.status.startswith("ok (log only") and "figure 42" in log_only.log_tail


def test_job_table_names_existing_scripts_and_unique_jobs():
    suite = _suite()
    names = [j.name for j in suite.JOBS]
    assert len(names) == len(set(names))
    assert {
        "dart_7b",
        "dart_llava",
        "ncfm_vs_mtt_cifar",
        "distill_eval_stacked",
        "ranking",
        "autognothi_vit_b",
        "think2drive_updates_paper",
    } <= set(names)
    for job in suite.JOBS:
        assert (ROOT / job.script).is_file(), job.script
        assert "{device}" in job.args and "{device}" in job.tiny_args, job.name
    assert sum(j.cap_s for j in suite.JOBS) <= suite.BUDGET_S == 480  # 8 minutes in all, on paper


def test_no_cuda_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_suite", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


@pytest.mark.timeout(1800)
def test_tiny_cpu_run_of_every_job(tmp_path):
    """The whole suite at tiny sizes on the CPU: every job runs or is reported unavailable, nothing fails.

    About 70-90 CPU seconds in all (seven subprocesses, mostly imports): about 90 s on 2 idle cores.
    """
    suite = _suite()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.gpu_suite",
            "--tiny",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--out-dir",
            str(tmp_path),
            "--budget-s",
            "1200",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    summary = json.loads((tmp_path / "suite.json").read_text())
    jobs = {j["name"]: j for j in summary["jobs"]}
    assert list(jobs) == [j.name for j in suite.JOBS]
    for job in suite.JOBS:
        got = jobs[job.name]
        needs = suite.missing_requirements(job)
        if needs:  # e.g. tokens.py --arch llava or rl.py --model paper before the other branches are merged
            assert got["status"] == "unavailable in this checkout" and got["missing"] == needs
            continue
        assert got["status"].startswith("ok"), (job.name, got["status"], got["log_tail"])
        assert Path(got["log"]).is_file()
    # rl.py resumes from its work dir: the suite must hand it a fresh one, never read back an old result
    t2d = jobs["think2drive_updates_paper"]
    assert "--work-dir" in t2d["command"]
    assert "resuming:" not in Path(t2d["log"]).read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ncfm = json.loads((tmp_path / "ncfm_vs_mtt_cifar.json").read_text())
    assert [r["method"] for r in ncfm["rows"]] == ["ncfm", "ncfm_mem", "mtt@2"]
    assert all(r["s_per_iter"] > 0 and r["timed_iters"] == 1 for r in ncfm["rows"])
    assert ncfm["rows"][-1]["time_x_mtt@2"] == pytest.approx(1.0)
    vit = json.loads((tmp_path / "autognothi_vit_b.json").read_text())["vit_b"]
    assert vit["inference"]["ratio"] > 0 and vit["memory"]["autognothi"]["trainable_params"] > 0
