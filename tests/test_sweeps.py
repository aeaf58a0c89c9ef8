"""W&B sweeps (configs/sweeps/*.yaml): valid sweep configs, and the command the W&B agent runs works.

For every sweep file the command is built as ``wandb agent`` builds it (``wandb/wandb_agent.py``,
``Agent._command_run``, and ``wandb/sdk/launch/sweeps/utils.py``): the ``command:`` list with the
macros ``${env}`` (``/usr/bin/env``), ``${interpreter}`` (``python``), ``${program}`` (the sweep's
``program``), ``${args}`` (``--key=value``), ``${args_no_hyphens}`` (``key=value``) and the other
argument forms, ``${envvar:NAME}`` inside a chunk, each value formatted with ``str()``. The run takes
the first value of each parameter (``values[0]``, ``value``, or ``min`` of a range / distribution).

* ``test_sweep_schema``: method, metric, parameters, command and the config files it names.
* ``test_sweep_parameters_are_cli_keys``: the agent's arguments go through the real parser (in
  process, cheap) and every swept key lands in the parsed config with the swept value (first and
  last values; every value of every parameter in the ``slow`` set).
* ``test_sweep_command_runs``: the agent's command, with ``--trainer.fast_dev_run=1`` added, runs in
  a subprocess in a temporary directory with no network (W&B offline, Hugging Face offline) and exits 0.
  Files a sweep reads that an earlier, documented run writes (a checkpoint, a pretrained model) are
  made first by a reduced version of that run (``PREREQUISITES``). Sweeps whose run takes more than
  ~30 s on 2 CPU cores are in the ``slow`` set.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
BIN = Path(sys.executable).parent

#: W&B's sweep methods, goals and distributions (docs: "Sweep configuration options").
METHODS = {"grid", "random", "bayes"}
GOALS = {"minimize", "maximize"}
DISTRIBUTIONS = {
    "constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform", "log_uniform_values",
    "q_log_uniform", "q_log_uniform_values", "inv_log_uniform", "inv_log_uniform_values", "normal",
    "q_normal", "log_normal", "q_log_normal", "beta", "q_beta",
}
#: The macros the agent fills in (an unknown ``${...}`` chunk is silently dropped by the agent).
ARG_MACROS = {
    "args", "args_no_equals", "args_no_hyphens", "args_no_boolean_flags", "args_json", "args_json_file",
    "args_append_hydra", "args_override_hydra",
}
MACROS = ARG_MACROS | {"env", "interpreter", "program"}
ENVVAR = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")

#: ``lightning-eff`` subcommands that are Trainer entry points (LightningCLI) and take ``--trainer.*``.
TRAINER_SUBCOMMANDS = {"fit", "validate", "test", "predict"}

#: Sweeps whose smoke run takes more than ~30 s on 2 CPU cores (measured on a lightly loaded machine):
#: NCFM pretrains its 5 feature networks and trains 3 evaluation students (~7 min), the DD-Ranking
#: callback runs its CPU protocol at the end of fit (~3 min), Data Whisperer scores the whole training
#: set with the LLM in setup (~12 min), AutoGnothi needs two earlier fits first (~40 s in all).
SLOW = {"ncfm", "ddranking", "data_whisperer", "autognothi"}

#: Optional packages a sweep's run needs (skipped with the reason when missing).
REQUIRES = {"think2drive": "highway_env"}

#: Reduced runs of the documented earlier steps that write what a sweep reads (relative paths, so they
#: land in the test's working directory, where the sweep's command reads them).
_ONE = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
PREREQUISITES: dict[str, list[list[str]]] = {
    # configs/explain/digits_explainer.yaml reads the classifier's and the surrogate's best.ckpt
    "autognothi": [
        ["fit", "--config", "configs/explain/digits_vit_classifier.yaml", *_ONE, "--test_after_fit=false"],
        ["fit", "--config", "configs/explain/digits_surrogate.yaml", *_ONE],
    ],
    # configs/select/arithmetic.yaml fine-tunes outputs/llm_arithmetic/pretrained
    "data_whisperer": [
        [
            "fit", "--config", "configs/llm/arithmetic.yaml", "--trainer.max_steps=1", "--trainer.limit_val_batches=1",
            "--test_after_fit=false", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
        ],
    ],
}


# ---------------------------------------------------------------------------------------------
# the agent's command
# ---------------------------------------------------------------------------------------------
def load_sweep(path: Path) -> dict[str, Any]:
    sweep = yaml.safe_load(path.read_text())
    if not isinstance(sweep, dict):
        raise ValueError(f"{path.name}: a sweep config must be a mapping, got {type(sweep).__name__}")
    return sweep


def first_value(spec: dict[str, Any]) -> Any:
    """The value a smoke run takes for one parameter: ``value``, ``values[0]`` or ``min``."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return spec["values"][0]
    if "min" in spec:
        return spec["min"]
    if "parameters" in spec:  # nested parameters: the agent passes a dict
        return {k: first_value(v) for k, v in spec["parameters"].items()}
    raise ValueError(f"parameter spec {spec!r} has no value, values or min")


def agent_args(params: dict[str, Any]) -> dict[str, list[str]]:
    """``create_sweep_command_args`` of wandb: the argument forms of the macros."""
    flags, no_hyphens, no_equals, no_booleans, hydra_append, hydra_override = [], [], [], [], [], []
    for key, value in params.items():
        flag = f"{key}={value}"
        flags.append("--" + flag)
        no_hyphens.append(flag)
        no_equals += [f"--{key}", str(value)]
        hydra_append.append("+" + flag)
        hydra_override.append("++" + flag)
        if isinstance(value, bool):
            if value:
                no_booleans.append("--" + key)
        else:
            no_booleans.append("--" + flag)
    return {
        "args": flags,
        "args_no_equals": no_equals,
        "args_no_hyphens": no_hyphens,
        "args_no_boolean_flags": no_booleans,
        "args_json": [json.dumps(params)],
        "args_append_hydra": hydra_append,
        "args_override_hydra": hydra_override,
    }


def agent_command(sweep: dict[str, Any], json_file: Path | None = None, environ: dict | None = None) -> list[str]:
    """The argv ``wandb agent`` runs for the run made of the first value of every parameter."""
    environ = os.environ if environ is None else environ
    params = {key: first_value(spec) for key, spec in sweep["parameters"].items()}
    macros = agent_args(params)
    macros.update(
        env=["/usr/bin/env"],
        interpreter=["python"],
        program=[str(sweep["program"])],
        args_json_file=[str(json_file or "args.json")],
    )
    if json_file is not None:
        json_file.write_text(macros["args_json"][0])
    command = sweep.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"]
    argv: list[str] = []
    for chunk in command:
        chunk = ENVVAR.sub(lambda m: environ.get(m.group(1), m.group(1)), str(chunk))
        if chunk.startswith("${") and chunk.endswith("}"):
            argv += macros.get(chunk[2:-1]) or []
        else:
            argv.append(chunk)
    return argv


def split_program(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """``(launcher, subcommand, rest)`` of a ``lightning-eff`` command; subcommand None for other programs."""
    for i, token in enumerate(argv):
        if Path(token).name == "lightning-eff":
            rest = argv[i + 1 :]
            if rest and not rest[0].startswith("-"):
                return argv[: i + 1], rest[0], rest[1:]
            return argv[: i + 1], None, rest
    return argv, None, []


def smoke_args(argv: list[str]) -> list[str]:
    """What a smoke run adds to the agent's command: ``fast_dev_run`` for the Trainer entry points.

    ``lightning-eff rank`` is not a Trainer loop (its cost is the DD-Ranking protocol, set by the
    evaluator in the config), so nothing is added there; any other program is not known to this test.
    """
    _, sub, _ = split_program(argv)
    if sub in TRAINER_SUBCOMMANDS:
        return ["--trainer.fast_dev_run=1"]
    if sub == "rank":
        return []
    raise ValueError(
        f"the sweep runs {' '.join(argv[:3])} ...: not a `lightning-eff` subcommand this test knows "
        f"({sorted(TRAINER_SUBCOMMANDS | {'rank'})})"
    )


# ---------------------------------------------------------------------------------------------
# unit tests of the command builder (W&B's documented behaviour)
# ---------------------------------------------------------------------------------------------
def test_agent_command_follows_wandb(tmp_path):
    sweep = {
        "program": "train.py",
        "parameters": {
            "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
            "depth": {"values": [3, 4]},
            "flag": {"value": False},
            "name": {"value": "a"},
        },
        "command": ["${env}", "${interpreter}", "${program}", "--out=${envvar:MY_OUT}/x", "${args}",
                    "${args_no_hyphens}", "${args_no_boolean_flags}", "${args_json_file}", "${unknown}"],
    }
    argv = agent_command(sweep, json_file=tmp_path / "a.json", environ={"MY_OUT": "/o"})
    args = ["--lr=0.0001", "--depth=3", "--flag=False", "--name=a"]
    assert argv == [
        "/usr/bin/env", "python", "train.py", "--out=/o/x", *args, *(a[2:] for a in args),
        "--lr=0.0001", "--depth=3", "--name=a", str(tmp_path / "a.json"),
    ]
    assert json.loads((tmp_path / "a.json").read_text()) == {"lr": 0.0001, "depth": 3, "flag": False, "name": "a"}
    # no command: wandb's default ${env} ${interpreter} ${program} ${args}
    del sweep["command"]
    assert agent_command(sweep) == ["/usr/bin/env", "python", "train.py", *args]


def test_smoke_args_by_subcommand():
    assert smoke_args(["/usr/bin/env", "lightning-eff", "fit", "--config", "x.yaml"]) == ["--trainer.fast_dev_run=1"]
    assert smoke_args(["lightning-eff", "test", "--ckpt_path=a"]) == ["--trainer.fast_dev_run=1"]
    assert smoke_args(["/usr/bin/env", "lightning-eff", "rank", "--synthetic", "s.pt"]) == []
    with pytest.raises(ValueError, match="not a `lightning-eff` subcommand"):
        smoke_args(["/usr/bin/env", "python", "benchmarks/ko.py"])


# ---------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------
def test_there_are_sweeps():
    names = {p.stem for p in SWEEPS}
    assert {"ko", "ncfm", "ddranking", "data_whisperer", "dart", "autognothi", "think2drive"} <= names


def _check_parameter(name: str, key: str, spec: Any, method: str) -> None:
    assert isinstance(spec, dict) and spec, f"{name}: parameter {key!r} must be a non-empty mapping, got {spec!r}"
    if "parameters" in spec:
        for sub, sub_spec in spec["parameters"].items():
            _check_parameter(name, f"{key}.{sub}", sub_spec, method)
        return
    kinds = [k for k in ("value", "values", "min") if k in spec]
    assert len(kinds) == 1 and ("min" in spec) == ("max" in spec), (
        f"{name}: parameter {key!r} needs exactly one of value / values / min+max, got {sorted(spec)}"
    )
    if "values" in spec:
        assert isinstance(spec["values"], list) and spec["values"], f"{name}: {key}.values must be a non-empty list"
        if "probabilities" in spec:
            assert len(spec["probabilities"]) == len(spec["values"]), f"{name}: {key}: one probability per value"
    if "min" in spec:
        assert method != "grid", f"{name}: grid search takes only value / values, {key!r} is a range"
        lo, hi = spec.get("min"), spec.get("max")
        # YAML 1.1 reads `1e-3` (no dot) as a string: a range must be numbers
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)), (
            f"{name}: {key}: min and max must be numbers, got {lo!r} and {hi!r} (write 1.0e-3, not 1e-3)"
        )
        assert lo < hi, f"{name}: {key}: min {lo} must be below max {hi}"
        dist = spec.get("distribution")
        assert dist is None or dist in DISTRIBUTIONS, f"{name}: {key}: unknown distribution {dist!r}"
        if dist in {"log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values"}:
            assert lo > 0, f"{name}: {key}: {dist} needs min > 0, got {lo}"
    unknown = set(spec) - {"value", "values", "min", "max", "distribution", "q", "mu", "sigma", "a", "b",
                           "probabilities"}
    assert not unknown, f"{name}: parameter {key!r} has unknown fields {sorted(unknown)}"


def check_schema(sweep: dict[str, Any], name: str) -> None:
    """W&B's sweep config rules, plus: the command runs a lightning-eff subcommand on existing configs."""
    assert sweep.get("method") in METHODS, f"{name}: method must be one of {sorted(METHODS)}, got {sweep.get('method')!r}"
    metric = sweep.get("metric")
    assert isinstance(metric, dict), f"{name}: metric must be a mapping with name and goal"
    assert isinstance(metric.get("name"), str) and metric["name"], f"{name}: metric.name missing"
    assert metric.get("goal") in GOALS, f"{name}: metric.goal must be one of {sorted(GOALS)}"
    params = sweep.get("parameters")
    assert isinstance(params, dict) and params, f"{name}: parameters must be a non-empty mapping"
    for key, spec in params.items():
        _check_parameter(name, key, spec, sweep["method"])
    assert isinstance(sweep.get("program"), str) and sweep["program"], f"{name}: program missing"
    command = sweep.get("command")
    assert isinstance(command, list) and command, (
        f"{name}: give a command (the default one runs `python {sweep['program']}`, not the lightning-eff CLI)"
    )
    macros = {c[2:-1] for c in map(str, command) if c.startswith("${") and c.endswith("}")}
    assert macros <= MACROS, f"{name}: unknown macros {sorted(macros - MACROS)} (the agent drops them)"
    assert macros & ARG_MACROS, f"{name}: the command passes no parameters (no ${{args}} macro)"
    argv = agent_command(sweep)
    launcher, sub, rest = split_program(argv)
    assert sub is not None, f"{name}: the command does not run a lightning-eff subcommand: {argv}"
    assert sub in TRAINER_SUBCOMMANDS | {"rank"}, f"{name}: unknown lightning-eff subcommand {sub!r}"
    for i, token in enumerate(rest):
        if token in ("--config", "-c"):
            assert (ROOT / rest[i + 1]).is_file(), f"{name}: --config {rest[i + 1]} does not exist"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_schema(path):
    check_schema(load_sweep(path), path.name)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"method": "hyperband"}, "method must be one of"),
        ({"metric": {"name": "val/acc"}}, "metric.goal"),
        ({"parameters": {}}, "parameters must be a non-empty"),
        ({"parameters": {"a": {"values": []}}}, "a.values must be a non-empty list"),
        ({"parameters": {"a": {"min": "1e-4", "max": 0.1}}}, "min and max must be numbers"),
        ({"method": "grid", "parameters": {"a": {"min": 1, "max": 2}}}, "grid search takes only"),
        ({"parameters": {"a": {"min": 0.0, "max": 1.0, "distribution": "log_uniform_values"}}}, "needs min > 0"),
        ({"parameters": {"a": {"min": 1.0}}}, "exactly one of value / values / min[+]max"),
        ({"command": ["${env}", "${program}", "fit", "${arguments}"]}, "unknown macros"),
        ({"command": ["${env}", "${program}", "fit"]}, "passes no parameters"),
        ({"command": None}, "give a command"),
        ({"command": ["${env}", "${program}", "fit", "--config", "configs/nope.yaml", "${args}"]}, "does not exist"),
        ({"command": ["${env}", "python", "train.py", "${args}"]}, "does not run a lightning-eff subcommand"),
    ],
)
def test_schema_catches_broken_sweeps(change, message):
    sweep = {
        "program": "lightning-eff",
        "method": "random",
        "metric": {"name": "val/acc", "goal": "maximize"},
        "parameters": {"seed_everything": {"values": [0, 1]}},
        "command": ["${env}", "${program}", "fit", "--config", "configs/ko/digits.yaml", "${args}"],
    }
    check_schema(sweep, "ok.yaml")
    sweep.update(change)
    with pytest.raises(AssertionError, match=message):
        check_schema(sweep, "broken.yaml")


# ---------------------------------------------------------------------------------------------
# every swept key is a real CLI key and lands in the parsed config
# ---------------------------------------------------------------------------------------------
def _lookup(cfg: Any, key: str) -> Any:
    """The value at a dotted key, as jsonargparse applies it (a list of classes: its last item)."""
    node = cfg
    for part in key.split("."):
        if isinstance(node, list):
            assert node, f"{key}: empty list on the way"
            node = node[-1]
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _same(parsed: Any, value: Any) -> bool:
    class_path = getattr(parsed, "class_path", None) if not isinstance(parsed, dict) else parsed.get("class_path")
    if class_path is not None and isinstance(value, str):
        return class_path == value or class_path.rsplit(".", 1)[-1] == value.rsplit(".", 1)[-1]
    if isinstance(value, float) and isinstance(parsed, (int, float)):
        return abs(parsed - value) <= 1e-12 * max(1.0, abs(value))
    return parsed == value


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run where the agent would (configs/ reachable by its relative path), writing into tmp_path."""
    (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-eff"])
    monkeypatch.setenv("LIGHTNING_EFF_CACHE", str(tmp_path / "cache"))
    return tmp_path


def check_parameters_parse(sweep: dict[str, Any], name: str) -> None:
    """Parse the agent's arguments with the real parser; each swept key must hold the swept value."""
    _, sub, rest = split_program(agent_command(sweep))
    try:
        if sub == "rank":
            from lightning_eff.ranking.cli import build_parser

            cfg = build_parser().parse_args(rest)
        else:
            from lightning_eff.cli import LightningEffCLI

            cfg = LightningEffCLI(run=False, args=rest).config
    except SystemExit as err:  # jsonargparse prints the reason to stderr and exits
        pytest.fail(f"{name}: the parser rejects the agent's arguments (exit {err.code}; reason above): {rest}")
    for key, spec in sweep["parameters"].items():
        value = first_value(spec)
        parsed = _lookup(cfg, key)
        assert _same(parsed, value), f"{name}: {key}={value!r} parsed as {parsed!r}"


def last_value(spec: dict[str, Any]) -> Any:
    """The other end of a parameter: ``values[-1]``, ``max``, or ``value``."""
    if "values" in spec:
        return spec["values"][-1]
    if "max" in spec:
        return spec["max"]
    return first_value(spec)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_parameters_are_cli_keys(path, in_tmp):
    """The first values (the smoke run's) and the last ones (often not the config's own value, so an
    override that lands nowhere shows) parse, instantiate and hold the swept values."""
    if path.stem in REQUIRES:
        pytest.importorskip(REQUIRES[path.stem])
    sweep = load_sweep(path)
    check_parameters_parse(sweep, path.name)
    last = {key: {"value": last_value(spec)} for key, spec in sweep["parameters"].items()}
    check_parameters_parse({**sweep, "parameters": last}, f"{path.name} (last values)")


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_swept_value_parses(path, in_tmp):
    """Each value of each parameter (the others at their first value) parses and instantiates (~10 s a sweep)."""
    if path.stem in REQUIRES:
        pytest.importorskip(REQUIRES[path.stem])
    sweep = load_sweep(path)
    for key, spec in sweep["parameters"].items():
        for value in spec.get("values", [])[1:]:
            one = {k: ({"value": value} if k == key else v) for k, v in sweep["parameters"].items()}
            check_parameters_parse({**sweep, "parameters": one}, f"{path.name} ({key}={value!r})")


def test_a_misspelled_sweep_key_is_caught(in_tmp):
    sweep = load_sweep(ROOT / "configs" / "sweeps" / "ko.yaml")
    sweep["parameters"] = {"optimizer.init_args.collision_strength": {"values": [0.1]}}
    with pytest.raises(pytest.fail.Exception, match="the parser rejects"):  # unrecognized argument
        check_parameters_parse(sweep, "ko.yaml")
    # a key the parser takes but that lands elsewhere than the sweep says is caught too
    sweep["parameters"] = {"trainer.max_epochs": {"values": [3]}}
    sweep["command"] = [*sweep["command"], "--trainer.max_epochs=5"]
    with pytest.raises(AssertionError, match="trainer.max_epochs=3 parsed as 5"):
        check_parameters_parse(sweep, "ko.yaml")


# ---------------------------------------------------------------------------------------------
# the agent's command runs (fast_dev_run, no network)
# ---------------------------------------------------------------------------------------------
def _run_prerequisites(name: str) -> None:
    from lightning_eff.cli import main

    for args in PREREQUISITES.get(name, []):
        try:
            main(args)
        except SystemExit as err:  # pragma: no cover - a failing step reports itself
            assert not err.code, f"prerequisite of {name} failed: lightning-eff {' '.join(args)}"


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=[pytest.mark.slow] if p.stem in SLOW else []) for p in SWEEPS],
    ids=lambda p: p.stem,
)
@pytest.mark.timeout(3600)
def test_sweep_command_runs(path, in_tmp):
    sweep = load_sweep(path)
    if path.stem in REQUIRES:
        pytest.importorskip(REQUIRES[path.stem])
    _run_prerequisites(path.stem)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `/usr/bin/env lightning-eff` / `python`
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(in_tmp),
        "WANDB_SILENT": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "LIGHTNING_EFF_CACHE": str(in_tmp / "cache"),
        "PYTHONWARNINGS": "ignore",
    }
    argv = agent_command(sweep, json_file=in_tmp / "args.json", environ=env)
    argv += smoke_args(argv)
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=in_tmp, env=env, capture_output=True, text=True, timeout=3500)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"{' '.join(argv)}\nexit {proc.returncode} after {seconds:.0f} s\n{proc.stderr[-4000:]}"
