"""GPU suite: every GPU figure the README quotes or promises, in one command, in at most 8 minutes on one GPU.

    python -m benchmarks.gpu_suite                          # CUDA machine: all jobs -> benchmarks/results/gpu/
    python -m benchmarks.gpu_suite --jobs dart_7b autognothi_vit_b
    python -m benchmarks.gpu_suite --tiny --device cpu --out-dir /tmp/gpu_suite   # wiring check, CPU, tiny sizes

Each job of :data:`JOBS` runs one benchmark script (or, for NCFM at CIFAR size, this file's own worker) as a
subprocess in its own process group, under a time cap (``cap_s``, cut further so the whole suite stays within
``--budget-s``, 480 s by default). Jobs run one after the other, so their timings do not disturb each other.
Per job the suite writes, under ``--out-dir``:

* ``<job>.json``: the script's own raw results (its ``--out``), when the script writes JSON;
* ``<job>.log``: the job's stdout and stderr;

and one summary, ``suite.json``: the machine, and per job the command, the status, the return code, the wall
time, the CPU seconds of the job's processes (a size of the job that does not depend on other load), the cap,
the paths above and the last lines of the log. Statuses:

* ``ok``: the script exited with 0 and wrote its JSON; ``ok (log only: ...)``: exit 0 from a script that has
  no ``--out`` in this checkout (``tokens.py`` before the DART raw-JSON branch is merged): the log is the
  raw result;
* ``failed``: non-zero exit (the log tail says why);
* ``timeout``: killed at its cap (with its children);
* ``unavailable in this checkout``: the script or a flag the job needs is missing here (several scripts are
  being reworked on other branches: the LLaVA-class DART run needs ``tokens.py --arch llava``, the
  Think2Drive paper-size update speed needs ``rl.py --model paper --parts updates``); detected from the
  script's source before running, and from an argparse usage error (exit code 2) after;
* ``skipped: budget``: the suite's time budget ran out before the job.

The suite exits with 1 if any job failed or timed out, 0 otherwise (unavailable and skipped jobs are reported,
not errors). ``--tiny`` gives every job tiny sizes (seconds each on a CPU): it checks the wiring, not the
figures; ``tests/test_gpu_suite.py`` runs it.

NCFM vs trajectory matching at CIFAR size (job ``ncfm_vs_mtt_cifar``, worker in this file): generated
CIFAR-shaped data (3 x 32 x 32, 10 classes, 1,000 images per class from a fixed seed: class-dependent colour
means plus noise, nothing downloads; the count only changes the untimed expert and feature-network training,
not the cost of an iteration), ConvNet-3 width 128 (instance norm) as in the official NCFM and MTT
CIFAR-10 code, IPC 10. Per method, in one process: a Lightning ``Trainer`` runs ``warmup + iters``
distillation iterations; the median seconds per timed iteration and ``torch.cuda.max_memory_allocated``
above the allocation at the end of the warm-up are reported. Methods: NCFM (factor 2, 256 real images per
class, 1,024 frequencies; one feature network pretrained 1 epoch, since only the cost is measured), NCFM
``memory_efficient=True``, trajectory matching with N = 10 and N = 30 student steps per iteration (one
expert trained 3 epochs: cost only). The per-iteration cost does not depend on how well the networks are
trained.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu"
BUDGET_S = 480.0
SELF = "benchmarks/gpu_suite.py"


@dataclass(frozen=True)
class Job:
    """One figure: a script, its arguments at full (GPU) size and at tiny (CPU wiring-check) size.

    ``{device}`` in the arguments is replaced by ``--device``. ``requires`` lists strings that must occur in
    the script's source (its flags and choices) for the job to run. ``out_flag`` is the script's flag for
    the JSON path (``None``: the script writes no JSON; its log is the raw result).
    """

    name: str
    figure: str
    script: str
    args: tuple[str, ...]
    tiny_args: tuple[str, ...]
    cap_s: float
    tiny_cap_s: float = 300.0
    requires: tuple[str, ...] = ()
    out_flag: str | None = "--out"
    #: the script's flag for a resume/work folder: the suite passes a fresh temporary one per run
    work_dir_flag: str | None = None
    readme: str = ""
    notes: str = ""


JOBS: tuple[Job, ...] = (
    Job(
        name="dart_7b",
        figure="DART speed-up (prefill, generate) in a LLaVA-1.5-7B-shaped Llama decoder",
        script="benchmarks/tokens.py",
        args=("--part", "speed", "--device", "{device}", "--preset", "7b", "--repeats", "3"),
        tiny_args=(
            "--part",
            "speed",
            "--device",
            "{device}",
            "--quick",
            "--repeats",
            "1",
            "--new-tokens",
            "2",
        ),
        cap_s=80,
        requires=("--preset", "7b"),
        readme="Token compression and DART (speed table; GPU row promised)",
        notes="random-init decoder built on the device in float32; 3 ABAB repeats (the script's default is 5)",
    ),
    Job(
        name="dart_llava",
        figure="DART speed-up on a LLaVA-class model (LlavaForConditionalGeneration, CLIP tower + 7B decoder)",
        script="benchmarks/tokens.py",
        args=(
            "--part",
            "speed",
            "--arch",
            "llava",
            "--device",
            "{device}",
            "--preset",
            "7b",
            "--repeats",
            "3",
        ),
        tiny_args=(
            "--part",
            "speed",
            "--arch",
            "llava",
            "--device",
            "{device}",
            "--quick",
            "--repeats",
            "1",
            "--new-tokens",
            "2",
        ),
        cap_s=70,
        requires=("--arch", "llava"),
        readme="Token compression and DART (LLaVA-class model)",
    ),
    Job(
        name="ncfm_vs_mtt_cifar",
        figure="NCFM vs trajectory matching at CIFAR size: seconds per iteration and peak memory",
        script=SELF,
        args=("--worker", "ncfm_cifar", "--device", "{device}"),
        tiny_args=("--worker", "ncfm_cifar", "--device", "{device}", "--tiny"),
        cap_s=90,
        readme="NCFM cost table ('No GPU figures yet')",
        notes="generated CIFAR-shaped data; see this module's docstring",
    ),
    Job(
        name="distill_eval_stacked",
        figure="stacked student evaluation: loop vs vmap vs stacked (the H200 3.0x / 6.1x / 1.3x)",
        script="benchmarks/distill_eval.py",
        args=("--device", "{device}", "--repeats", "1"),
        tiny_args=("--device", "{device}", "--quick", "--epochs", "1", "--modes", "loop,stacked"),
        cap_s=90,
        requires=("--modes", "--repeats"),
        readme="DD-Ranking section (6.1x for a 25-student lr grid on an H200) and the distill_eval docstring",
        notes="the full protocol (300 epochs, 3 settings, 3 modes) with 1 timed repeat instead of 3, to fit 8 min",
    ),
    Job(
        name="ranking",
        figure="DD-Ranking wall time: students trained together vs one after the other, on a GPU",
        script="benchmarks/ranking.py",
        args=(
            "--device",
            "{device}",
            "--size",
            "16",
            "--width",
            "128",
            "--depth",
            "3",
            "--runs",
            "2",
            "--epochs",
            "100",
            "--eval-every",
            "20",
            "--distill-steps",
            "200",
            "--repeats",
            "1",
            "--methods",
            "random_real,dm,ncfm",
            "--no-scaling",
        ),
        tiny_args=(
            "--device",
            "{device}",
            "--quick",
            "--methods",
            "random_real,dm",
            "--settings",
            "hard",
            "--no-scaling",
        ),
        cap_s=60,
        requires=("--methods", "--settings", "--no-scaling"),
        readme="DD-Ranking section (vectorised vs sequential)",
        notes="reduced from the docstring's paper protocol (5 runs, 300 epochs, 1000 distillation steps) to fit",
    ),
    Job(
        name="autognothi_vit_b",
        figure="AutoGnothi at ViT-B/16: inference cost vs the classifier, training memory vs a full copy",
        script="benchmarks/explain.py",
        args=("--device", "{device}", "--only-vit-b"),
        tiny_args=(
            "--device",
            "{device}",
            "--only-vit-b",
            "--vit-b-tiny",
            "--repeats-vit-b",
            "1",
            "--vit-b-batch",
            "2",
            "--vit-b-train-batch",
            "1",
        ),
        cap_s=30,
        requires=("--only-vit-b",),
        readme="AutoGnothi section (ViT-B/16 rows; CUDA peak memory only on a GPU)",
    ),
    Job(
        name="think2drive_updates_paper",
        figure="Think2Drive updates per second at paper size (GRU 512, 128 x 128 BEV)",
        script="benchmarks/rl.py",
        args=(
            "--device",
            "{device}",
            "--model",
            "paper",
            "--bev-size",
            "128",
            "--parts",
            "updates",
            "--update-rounds",
            "2",
        ),
        tiny_args=("--device", "{device}", "--quick", "--parts", "updates"),
        cap_s=40,
        requires=("--model", "paper", "--parts", "--update-rounds"),
        work_dir_flag="--work-dir",
        readme="Think2Drive section (GPU protocol 'has not been run')",
    ),
)


@dataclass
class Outcome:
    name: str
    status: str
    command: list[str] = field(default_factory=list)
    returncode: int | None = None
    wall_s: float | None = None
    cpu_s: float | None = None
    cap_s: float | None = None
    json: str | None = None
    log: str | None = None
    missing: list[str] = field(default_factory=list)
    log_tail: str = ""


# ------------------------------------------------------------------------------------------------ running
def missing_requirements(job: Job, root: Path = ROOT) -> list[str]:
    """What the job needs that this checkout lacks: the script, or flag / choice strings in its source."""
    path = root / job.script
    if not path.is_file():
        return [job.script]
    source = path.read_text()
    return [r for r in job.requires if not re.search(r"[\"']" + re.escape(r) + r"[\"']", source)]


def script_module(script: str) -> str:
    """The module name of a script path relative to the repository root (``benchmarks/ko.py`` -> ``benchmarks.ko``)."""
    path = Path(script)
    if path.suffix != ".py" or path.is_absolute():
        raise ValueError(f"a job's script must be a relative path to a .py file, got {script!r}")
    return ".".join(path.with_suffix("").parts)


def _has_flag(script: str, flag: str, root: Path = ROOT) -> bool:
    return bool(re.search(r"[\"']" + re.escape(flag) + r"[\"']", (root / script).read_text()))


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes (a load-independent size of a job)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_job(job: Job, args, out_dir: Path, cap: float, root: Path = ROOT) -> Outcome:
    """Run one job as a subprocess (its own process group, killed at ``cap`` seconds) and classify the result."""
    missing = missing_requirements(job, root)
    if missing:
        return Outcome(job.name, "unavailable in this checkout", missing=missing)
    job_args = [a.replace("{device}", args.device) for a in (job.tiny_args if args.tiny else job.args)]
    json_path = out_dir / f"{job.name}.json"
    log_path = out_dir / f"{job.name}.log"
    json_path.unlink(missing_ok=True)
    # ``python -m benchmarks.<script>`` from ``root``: the scripts are modules of the ``benchmarks`` package
    cmd = [sys.executable, "-m", script_module(job.script), *job_args]
    writes_json = job.out_flag is not None and _has_flag(job.script, job.out_flag, root)
    if writes_json:
        cmd += [job.out_flag, str(json_path)]
    if args.threads and _has_flag(job.script, "--threads", root):
        cmd += ["--threads", str(args.threads)]
    # A script that resumes from a work dir (rl.py) gets a fresh one: a stale partial result of an earlier
    # run with the same arguments would otherwise be read back instead of measured.
    work_dir = None
    if job.work_dir_flag is not None and _has_flag(job.script, job.work_dir_flag, root):
        work_dir = tempfile.mkdtemp(prefix=f"gpu_suite_{job.name}_")
        cmd += [job.work_dir_flag, work_dir]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    start, cpu0 = time.perf_counter(), _children_cpu()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=cap)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the job and the processes it started
            proc.wait()
            rc, status = None, "timeout"
        finally:
            if work_dir is not None:
                shutil.rmtree(work_dir, ignore_errors=True)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu0
    tail = _tail(log_path)
    if rc == 2 and re.search(r"unrecognized arguments|invalid choice", tail):
        status = "unavailable in this checkout"
    if status == "ok" and writes_json and not json_path.is_file():
        status, tail = "failed", tail + "\n(gpu_suite: exit 0 but no JSON at " + str(json_path) + ")"
    elif status == "ok" and not writes_json:
        status = f"ok (log only: {job.script} has no {job.out_flag} in this checkout)"
    return Outcome(
        job.name,
        status,
        command=[os.path.relpath(c, root) if c.startswith(str(root)) else c for c in cmd],
        returncode=rc,
        wall_s=round(wall, 2),
        cpu_s=round(cpu, 2),
        cap_s=cap,
        json=str(json_path) if json_path.is_file() else None,
        log=str(log_path),
        log_tail=tail,
    )


def machine(device: str) -> dict:
    """:func:`benchmarks.harness.environment` (``cpus``: its ``cpu_count``, the key this file wrote before)."""
    info = harness.environment(device)
    info["cpus"] = info["cpu_count"]
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the figures) or cpu (with --tiny: wiring check)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: seconds per job, checks the wiring only")
    p.add_argument("--jobs", nargs="*", default=None, help=f"subset of {[j.name for j in JOBS]}")
    p.add_argument("--out-dir", default=None, help=f"default {os.path.relpath(DEFAULT_OUT, ROOT)}")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="time budget of the whole suite (s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads passed to the scripts")
    p.add_argument("--worker", choices=("ncfm_cifar",), default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    if args.worker:
        return ncfm_cifar_worker(
            [*rest, "--device", args.device, "--out", args.out or "ncfm_cifar.json"]
            + (["--tiny"] if args.tiny else [])
            + (["--threads", str(args.threads)] if args.threads else [])
        )
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    names = [j.name for j in JOBS]
    for name in args.jobs or []:
        if name not in names:
            p.error(f"--jobs: unknown job {name!r}; choose from {names}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error(
                "--device cuda: no CUDA device here. The suite's figures need one; use --tiny --device cpu "
                "to check the wiring."
            )
    out_dir = (Path(args.out_dir) if args.out_dir else DEFAULT_OUT).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [j for j in JOBS if args.jobs is None or j.name in args.jobs]
    print(
        f"# GPU suite: {len(jobs)} jobs on {args.device}{' (tiny sizes)' if args.tiny else ''}, budget "
        f"{args.budget_s:.0f} s -> {out_dir}",
        flush=True,
    )
    start = time.perf_counter()
    outcomes: list[Outcome] = []
    for job in jobs:
        left = args.budget_s - (time.perf_counter() - start)
        cap = min(job.tiny_cap_s if args.tiny else job.cap_s, left)
        if cap < 5:
            outcomes.append(Outcome(job.name, "skipped: budget", cap_s=max(0.0, left)))
        else:
            outcomes.append(run_job(job, args, out_dir, cap))
        o = outcomes[-1]
        extra = f" (missing: {', '.join(o.missing)})" if o.missing else ""
        wall = f"{o.wall_s:.1f} s of {o.cap_s:.0f} s" if o.wall_s is not None else "-"
        print(f"  {job.name:28s} {o.status}{extra}  [{wall}]", flush=True)
    summary = {
        "suite": "benchmarks/gpu_suite.py",
        "tiny": args.tiny,
        "budget_s": args.budget_s,
        "wall_s": round(time.perf_counter() - start, 2),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": machine(args.device),
        "jobs": [
            {**vars(o), "figure": j.figure, "readme": j.readme, "notes": j.notes}
            for o, j in zip(outcomes, jobs)
        ],
    }
    harness.write_json(out_dir / "suite.json", summary, indent=1)
    print(f"summary: {out_dir / 'suite.json'} ({summary['wall_s']:.0f} s)")
    return 1 if any(o.status in ("failed", "timeout") for o in outcomes) else 0


# ------------------------------------------------------------------------------------------------ NCFM worker
def ncfm_cifar_worker(argv: list[str]) -> int:
    """NCFM vs trajectory matching at CIFAR size on generated data (see the module docstring)."""
    p = argparse.ArgumentParser(prog="gpu_suite.py --worker ncfm_cifar")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import statistics
    import tempfile
    from functools import partial

    import lightning as L
    import torch

    from lightning_eff.distill import DSA, TrajectoryMatching
    from lightning_eff.distill.ncfm import NCFM
    from lightning_eff.models import ConvNet

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    size = (
        dict(per_class=40, width=8, warmup=1, iters=1, steps=(2,), batch_real=16, freqs=32)
        if args.tiny
        else (dict(per_class=1000, width=128, warmup=2, iters=5, steps=(10, 30), batch_real=256, freqs=1024))
    )
    dm = GeneratedImagesDataModule(per_class=size["per_class"], batch_size=256)
    net_cfg = dict(in_channels=3, num_classes=10, width=size["width"], depth=3, image_size=32)
    work = tempfile.mkdtemp(prefix="gpu_suite_ncfm_")

    def build(method: str):
        net = ConvNet(**net_cfg)
        if method.startswith("ncfm"):
            return NCFM(
                net,
                ipc=10,
                factor=2,
                batch_real=size["batch_real"],
                num_freqs=size["freqs"],
                memory_efficient=method == "ncfm_mem",
                calib_weight=1.0,
                num_feature_nets=1,
                pretrain_epochs=1,
                pretrain_batch_size=256,
                feature_nets_path=os.path.join(work, "feature_nets.pt"),
                dsa=DSA(strategy="color_crop_cutout", mode="multiple"),
                image_optimizer=partial(torch.optim.AdamW, lr=0.03, weight_decay=5e-4),
                seed=0,
            )
        return TrajectoryMatching(
            net,
            ipc=10,
            num_experts=1,
            expert_train_epochs=1 if args.tiny else 3,
            max_start_epoch=1,
            expert_epochs=1 if args.tiny else 2,
            syn_steps=int(method.split("@")[1]),
            dsa=DSA(),
            seed=0,
            image_optimizer=lambda ps: torch.optim.SGD(ps, lr=100.0, momentum=0.5),
        )

    class Probe(L.Callback):
        """Times each iteration after the warm-up; resets the CUDA peak at the end of the warm-up."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.base = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
                if batch_idx == size["warmup"]:
                    torch.cuda.reset_peak_memory_stats()
                    self.base = torch.cuda.memory_allocated()
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            if batch_idx >= size["warmup"]:
                self.times.append(time.perf_counter() - self._t)

    rows = []
    methods = ["ncfm", "ncfm_mem", *[f"mtt@{n}" for n in size["steps"]]]
    for method in methods:
        probe = Probe()
        module = build(method)
        t0 = time.perf_counter()
        harness.quiet_trainer(
            "cuda" if cuda else "cpu",
            max_steps=size["warmup"] + size["iters"],
            callbacks=[probe],
            default_root_dir=work,
        ).fit(module, datamodule=dm)
        row = {
            "method": method,
            "s_per_iter": statistics.median(probe.times),
            "timed_iters": len(probe.times),
            "wall_s": time.perf_counter() - t0,
        }
        if cuda:
            row["peak_mb"] = harness.cuda_peak_mb(since=probe.base)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del module
        if cuda:
            torch.cuda.empty_cache()
    base = {r["method"]: r for r in rows}
    ref = f"mtt@{size['steps'][-1]}"
    for r in rows:
        r[f"time_x_{ref}"] = r["s_per_iter"] / base[ref]["s_per_iter"]
        if cuda:
            r[f"memory_x_{ref}"] = r["peak_mb"] / base[ref]["peak_mb"]
    result = {
        "protocol": {
            "data": f"generated CIFAR-shaped images 3x32x32, 10 classes, {size['per_class']} per class",
            "net": net_cfg,
            "ipc": 10,
            "warmup_iters": size["warmup"],
            "timed_iters": size["iters"],
            "ncfm": {
                "factor": 2,
                "batch_real": size["batch_real"],
                "num_freqs": size["freqs"],
                "feature_nets": "1, pretrained 1 epoch (cost only)",
            },
            "mtt": {"syn_steps": list(size["steps"]), "experts": "1 (cost only)"},
            "memory": "torch.cuda.max_memory_allocated above the allocation after the warm-up"
            if cuda
            else "none",
            "tiny": args.tiny,
            "device": args.device,
        },
        "rows": rows,
    }
    harness.write_json(args.out, result, indent=1)
    return 0


def _generated_images_datamodule():
    import torch

    from lightning_eff.data.base import ClassificationDataModule, ImageTensorDataset

    class _Generated(ClassificationDataModule):
        """CIFAR-shaped generated data: class ``c`` has colour mean ``mu_c`` (fixed seed) plus N(0, 0.25) noise."""

        def __init__(self, per_class: int, batch_size: int = 256, seed: int = 0) -> None:
            super().__init__(batch_size=batch_size)
            self.per_class, self.seed = per_class, seed
            self._num_classes, self._image_shape = 10, (3, 32, 32)
            self._mean, self._std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
            self._class_names = [str(c) for c in range(10)]

        def setup(self, stage: str | None = None) -> None:
            if self._train_set is not None:
                return
            g = torch.Generator().manual_seed(self.seed)
            means = torch.randn(10, 3, 1, 1, generator=g)

            def split(n: int) -> tuple:
                y = torch.arange(10).repeat_interleave(n)
                x = means[y] + 0.5 * torch.randn(len(y), 3, 32, 32, generator=g)
                return ImageTensorDataset(x, y), y

            self._train_set, self._train_targets = split(self.per_class)
            self._val_set, _ = split(max(2, self.per_class // 10))
            self._test_set = self._val_set

    return _Generated


def GeneratedImagesDataModule(per_class: int, batch_size: int = 256):  # noqa: N802 - a class factory
    return _generated_images_datamodule()(per_class, batch_size)


if __name__ == "__main__":
    sys.exit(main())
