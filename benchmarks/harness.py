"""What the benchmark scripts share: the environment record, a quiet Trainer, timing, memory and result files.

Every script of ``benchmarks/`` runs as a module from the repository root (``python -m benchmarks.ko``), so
``benchmarks`` is a package and the scripts import this file as ``from benchmarks import harness`` (no
``sys.path`` edits).

- :func:`environment` / :func:`environment_line`: the versions (python, torch, lightning, transformers), the
  machine (CPU, core count, torch threads, GPU) and the git commit a result was measured with.
- :func:`trainer_kwargs` / :func:`quiet_trainer`: a ``lightning.Trainer`` without logger, checkpoints, progress
  bar or model summary on one device (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"gpu"`` or ``"auto"``).
- :func:`timed`, :func:`timed_round`, :func:`interleaved`, :func:`median`, :func:`ratio`: wall-clock timing
  (CUDA synchronised), interleaved rounds with a rotating order so that load from other jobs hits every
  contender alike, medians and ratios that are ``nan`` instead of an exception on empty input.
- :func:`rss_mb`, :func:`peak_rss_mb`, :func:`cuda_peak_mb`: memory.
- :func:`write_json`: results written atomically (temp file + fsync + rename, through
  :func:`lightning_eff.utils.io.atomic_write_text`) with the usual file permissions.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: the Trainer switches every benchmark turns off: it measures, it does not log or save
QUIET_TRAINER: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}

__all__ = [
    "QUIET_TRAINER",
    "ROOT",
    "accelerator",
    "cpu_name",
    "cuda_peak_mb",
    "environment",
    "environment_line",
    "git_commit",
    "interleaved",
    "load_average",
    "median",
    "peak_rss_mb",
    "quiet_trainer",
    "ratio",
    "rss_mb",
    "sync",
    "timed",
    "timed_round",
    "trainer_kwargs",
    "write_json",
]


# --------------------------------------------------------------------------------------------------
# environment record
# --------------------------------------------------------------------------------------------------
def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    """1, 5 and 15 min load average (runnable jobs; above the core count the machine is shared)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()`` or ``platform.machine()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: str | os.PathLike = ROOT) -> dict[str, Any]:
    """``{"commit": HEAD's sha or None, "dirty": whether lightning_eff/ or benchmarks/ differ from it}``."""
    def git(*cmd: str) -> str | None:
        try:
            out = subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", "lightning_eff", "benchmarks") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def environment(device: str | None = None) -> dict[str, Any]:
    """The record a result needs to be compared: versions, machine, threads, GPU and git commit.

    ``device``: the device the benchmark runs on; for a CUDA device the GPU's name and memory are added.
    """
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": _version("lightning"),
        "transformers": _version("transformers"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "device": device,
        "git": git_commit(),
    }
    env["load_average"] = load_average()
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return env


def environment_line(env: Mapping[str, Any] | None = None) -> str:
    """:func:`environment` in one printable line."""
    env = environment() if env is None else env
    git = env.get("git") or {}
    commit = (git.get("commit") or "unknown")[:10] + (" (dirty)" if git.get("dirty") else "")
    parts = [
        f"python {env['python']}",
        f"torch {env['torch']}",
        f"lightning {env.get('lightning')}",
        f"transformers {env.get('transformers')}",
        f"{env['cpu']}, {env['cpu_count']} CPUs, {env['threads']} torch threads",
    ]
    if env.get("gpu"):
        parts.append(f"GPU {env['gpu']} ({env['gpu_memory_gib']} GiB)")
    if env.get("device"):
        parts.append(f"device {env['device']}")
    parts.append(f"commit {commit}")
    return "environment: " + ", ".join(parts)


# --------------------------------------------------------------------------------------------------
# quiet trainer
# --------------------------------------------------------------------------------------------------
def accelerator(device: str) -> str:
    """Lightning's accelerator name for a torch device string (``"cuda:0"`` -> ``"gpu"``)."""
    device = str(device)
    if device.startswith("cuda"):
        return "gpu"
    if device in ("cpu", "gpu", "auto", "mps"):
        return device
    raise ValueError(f"device must be 'cpu', 'cuda[:N]', 'gpu', 'mps' or 'auto', got {device!r}")


def trainer_kwargs(device: str = "cpu", **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a quiet one-device ``lightning.Trainer`` (see :data:`QUIET_TRAINER`) plus ``overrides``."""
    return {**QUIET_TRAINER, "accelerator": accelerator(device), "devices": 1, **overrides}


def quiet_trainer(device: str = "cpu", **overrides: Any):
    """``lightning.Trainer(**trainer_kwargs(device, **overrides))``."""
    import lightning as L

    return L.Trainer(**trainer_kwargs(device, **overrides))


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------
def sync(device: Any = None) -> None:
    """Wait for queued CUDA work on ``device`` (a no-op on the CPU and for ``None``)."""
    if device is None:
        return
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any = None) -> tuple[float, Any]:
    """``(seconds, fn())``, with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def timed_round(runs: Mapping[str, Callable[[], Any]], device: Any, rotation: int, times: dict, per: int = 1) -> dict:
    """One interleaved round: every callable of ``runs`` once, the order rotated by ``rotation`` so that load
    from other jobs hits all alike. Appends each call's seconds / ``per`` to ``times[name]``; returns the outputs.
    """
    names = list(runs)
    start = rotation % len(names)
    outputs = {}
    for name in names[start:] + names[:start]:
        dt, outputs[name] = timed(runs[name], device)
        times.setdefault(name, []).append(dt / per)
    return outputs


def interleaved(
    runs: Mapping[str, Callable[[], Any]], rounds: int, device: Any = None, warmup: int = 1, per: int = 1
) -> dict[str, list[float]]:
    """``warmup`` untimed rounds, then ``rounds`` :func:`timed_round` s; the seconds (/ ``per``) of each run."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        timed_round(runs, device, r, times, per)
    return times


def median(values: Iterable[float]) -> float:
    """The median, ``nan`` for no values."""
    values = list(values)
    return statistics.median(values) if values else float("nan")


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, ``nan`` when the denominator is 0 or either is ``nan``."""
    if not denominator or math.isnan(denominator) or math.isnan(numerator):
        return float("nan")
    return numerator / denominator


# --------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------
def rss_mb(field: str = "VmRSS") -> float:
    """A memory field of ``/proc/self/status`` in MiB (``VmRSS``: resident now, ``VmHWM``: its peak); ``nan``
    where there is no ``/proc``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """The process's peak resident set size in MiB (``ru_maxrss``; it is KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cuda_peak_mb(device: Any = None, since: int = 0) -> float:
    """``torch.cuda.max_memory_allocated(device)`` above ``since`` bytes, in MiB."""
    import torch

    return (torch.cuda.max_memory_allocated(device) - since) / 2**20


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------
def write_json(path: str | os.PathLike, data: Any, indent: int | None = 1, default: Callable | None = None) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (a crash leaves the old file or the new one, never half of
    one); parent folders are created, and the file gets the usual ``0666 & ~umask`` permissions."""
    from lightning_eff.utils.io import atomic_write_text

    path = atomic_write_text(path, json.dumps(data, indent=indent, default=default) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return path
