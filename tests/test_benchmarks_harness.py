"""benchmarks/harness.py: the environment record, the quiet Trainer, interleaved timing and the JSON writer."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]


def test_environment_records_versions_machine_and_commit():
    import lightning
    import torch

    env = harness.environment("cpu")
    assert env["torch"] == torch.__version__ and env["lightning"] == lightning.__version__
    assert env["cpu_count"] == os.cpu_count() and env["threads"] == torch.get_num_threads()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert env["git"]["commit"] == head.stdout.strip() and isinstance(env["git"]["dirty"], bool)
    assert "gpu" not in env  # a CPU run names no GPU
    line = harness.environment_line(env)
    assert f"torch {torch.__version__}" in line and "device cpu" in line
    json.dumps(env)  # it goes into every result file


def test_quiet_trainer_kwargs():
    kw = harness.trainer_kwargs("cuda:1", max_steps=3, logger=True)
    assert kw["accelerator"] == "gpu" and kw["devices"] == 1 and kw["max_steps"] == 3
    assert kw["logger"] is True  # overrides win
    assert not kw["enable_checkpointing"] and not kw["enable_progress_bar"] and not kw["enable_model_summary"]
    assert harness.trainer_kwargs()["accelerator"] == "cpu"
    with pytest.raises(ValueError, match="device must be"):
        harness.trainer_kwargs("tpu0")
    trainer = harness.quiet_trainer("cpu", max_steps=1)
    assert trainer.max_steps == 1 and trainer.logger is None and trainer.checkpoint_callback is None


def test_interleaved_rotates_the_order_and_times_every_run():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = harness.interleaved(runs, rounds=3, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # the warm-up round
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_median_and_ratio_are_nan_instead_of_errors():
    assert harness.median([3.0, 1.0, 2.0]) == 2.0 and math.isnan(harness.median([]))
    assert harness.ratio(3.0, 2.0) == 1.5
    assert math.isnan(harness.ratio(1.0, 0.0)) and math.isnan(harness.ratio(float("nan"), 1.0))


def test_memory_helpers():
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc")
    now, peak = harness.rss_mb(), harness.rss_mb("VmHWM")
    assert 0 < now <= peak
    assert harness.peak_rss_mb() > 0
    assert math.isnan(harness.rss_mb("NoSuchField"))


def test_write_json_is_atomic_and_readable(tmp_path):
    path = harness.write_json(tmp_path / "sub" / "r.json", {"a": 1, "p": Path("x")}, default=str)
    assert json.loads(path.read_text()) == {"a": 1, "p": "x"}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(TypeError):
        harness.write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"a": 1, "p": "x"}  # a failed write leaves the old file
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]  # and no temp file


def test_every_script_is_a_module_of_the_package():
    """``python -m benchmarks.<script>`` for every script: no script edits sys.path or loads a sibling by path."""
    scripts = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if p.name != "__init__.py")
    assert (ROOT / "benchmarks" / "__init__.py").is_file() and len(scripts) > 10
    for path in scripts:
        text = path.read_text()
        assert "sys.path" not in text.replace("``sys.path``", ""), path.name
        assert "spec_from_file_location" not in text, path.name
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.rl_update_speed", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "usage" in proc.stdout
