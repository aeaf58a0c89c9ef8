"""`lightning-eff pipeline`: the file format, references, errors, the summary, and the flagship end to end."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from lightning_eff.pipeline import SUMMARY_FORMAT, Pipeline, PipelineError, main

ROOT = Path(__file__).resolve().parents[1]
FLAGSHIP = ROOT / "configs" / "pipeline" / "digits_ncfm_sdc_drupi_rank_ko.yaml"
SCRIPT = Path(sys.executable).with_name("lightning-eff")

#: the flagship with every budget cut to the bone (the same stages, components and wiring)
TINY = [
    # distill: NCFM at IPC 1 (4 decoded images per class), 2 iterations, 1 feature net, 1 SDC net
    "distill.trainer.max_steps=2",
    "distill.model.init_args.batch_real=16",
    "distill.model.init_args.num_freqs=32",
    "distill.model.init_args.num_feature_nets=1",
    "distill.model.init_args.pretrain.epochs=1",
    "distill.model.init_args.plugins.init_args.num_nets=1",
    "distill.model.init_args.plugins.init_args.train_epochs=1",
    # drupi: 2 iterations
    "drupi.trainer.max_steps=2",
    "drupi.model.init_args.plugins.init_args.batch_real=16",
    "drupi.model.init_args.plugins.init_args.inner_loop=1",
    # rank: one run, one lr, 2 epochs
    "rank.trainer.callbacks.init_args.evaluator.init_args.num_eval=1",
    "rank.trainer.callbacks.init_args.evaluator.init_args.protocol.epochs=2",
    "rank.trainer.callbacks.init_args.evaluator.init_args.protocol.eval_every=1",
    "rank.trainer.callbacks.init_args.evaluator.init_args.protocol.lr=[0.01]",
    "rank.trainer.callbacks.init_args.evaluator.init_args.full_epochs=1",
    # student: 2 epochs
    "student.trainer.max_epochs=2",
    "student.trainer.check_val_every_n_epoch=1",
]


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _summary(out: Path) -> dict:
    data = json.loads((out / "pipeline_summary.json").read_text())
    assert data["format"] == SUMMARY_FORMAT and data["format_version"] == 1
    return data


def _stage(summary: dict, name: str) -> dict:
    (rec,) = [r for r in summary["stages"] if r["name"] == name]
    return rec


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """DD-Ranking's cache in tmp (no reuse across tests or from the user's cache); a plain argv."""
    monkeypatch.setenv("LIGHTNING_EFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["lightning-eff"])


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# the file and its references (no training)
# --------------------------------------------------------------------------------------------------
def test_flagship_resolves_to_the_commands_it_documents(tmp_path):
    p = Pipeline.load(FLAGSHIP, output_dir=tmp_path / "out")
    assert list(p.stages) == ["distill", "drupi", "rank", "student"]
    assert [s.command for s in p.stages.values()] == ["fit", "fit", "rank", "fit"]
    out = tmp_path / "out"
    distill, drupi, rank, student = (p.resolve(n) for n in p.stages)
    # config paths are relative to the pipeline file and exist
    assert distill.configs == [Path(os.path.normpath(ROOT / "configs/distill/ncfm_digits_ipc1.yaml"))]
    assert all(c.is_file() for r in (distill, drupi, rank, student) for c in r.configs)
    # the distillation writes into its stage folder; the later stages read what it wrote
    assert distill.overrides["model"]["init_args"]["save_dir"] == str(out / "distill")
    plugins = distill.overrides["model"]["init_args"]["plugins"]
    assert [pl["class_path"] for pl in plugins] == ["lightning_eff.distill.SDC"]
    assert drupi.overrides["model"]["init_args"]["init"] == str(out / "distill" / "synthetic_set.pt")
    assert rank.overrides["synthetic"] == [str(out / "distill/synthetic_set.pt"), str(out / "drupi/synthetic_set.pt")]
    data = student.overrides["data"]
    assert data["class_path"] == "lightning_eff.data.SyntheticSetDataModule"
    assert data["init_args"]["path"] == str(out / "drupi" / "synthetic_set.pt")
    # each needs exactly the artefacts of the earlier stages, named with their producer
    assert distill.needs == []
    assert drupi.needs == [(out / "distill/synthetic_set.pt", "distill")]
    assert rank.needs == [(out / "distill/synthetic_set.pt", "distill"), (out / "drupi/synthetic_set.pt", "drupi")]
    assert student.needs == [(out / "drupi/synthetic_set.pt", "drupi")]
    assert rank.argv()[-2:] == [f"--output_dir={out / 'rank'}", f"--trainer.default_root_dir={out / 'rank'}"]
    assert student.argv()[:3] == ["fit", "--config", str(student.configs[0])]
    assert student.argv()[-1] == f"--trainer.default_root_dir={out / 'student'}"


def test_stage_configs_compose_with_the_real_cli(tmp_path):
    """Each fit stage's files + overrides parse and instantiate with the real LightningCLI (run=False)."""
    from lightning_eff.cli import LightningEffCLI
    from lightning_eff.data import DigitsDataModule, SyntheticSetDataModule
    from lightning_eff.distill import NCFM, SDC, StaticSet, SyntheticSet
    from lightning_eff.models import ImageClassifier
    from lightning_eff.optim import KO
    from lightning_eff.pipeline.runner import _write_overrides

    p = Pipeline.load(FLAGSHIP, output_dir=tmp_path / "out")
    # StaticSet checks at construction that the set it starts from exists: stand in for the distill stage
    real = DigitsDataModule(image_size=16)
    SyntheticSet.from_real(real, ipc=4).save(tmp_path / "out" / "distill" / "synthetic_set.pt")
    built = {}
    for name in ("distill", "drupi", "student"):
        r = p.resolve(name)
        _write_overrides(r)
        cli = LightningEffCLI(run=False, args=[*r.argv()[1:], "--trainer.logger=false"])
        built[name] = cli
    distill = built["distill"].model
    assert isinstance(distill, NCFM) and [type(x) for x in distill.plugins] == [SDC]
    assert distill.save_dir == str(tmp_path / "out" / "distill") and distill.ipc == 1
    assert isinstance(built["drupi"].model, StaticSet) and built["drupi"].model.ipc == 4
    student = built["student"]
    assert isinstance(student.model, ImageClassifier) and isinstance(student.datamodule, SyntheticSetDataModule)
    opt = student.model.configure_optimizers()
    opt = opt[0][0] if isinstance(opt, tuple) else opt
    assert isinstance(opt, KO)
    assert student.trainer.default_root_dir == str(tmp_path / "out" / "student")


def test_reference_errors_are_clear(tmp_path):
    base = {"command": "fit", "config": "a.yaml"}

    def load(stages, **top):
        return Pipeline({"stages": stages, **top}, path=tmp_path / "p.yaml", output_dir=tmp_path)

    with pytest.raises(PipelineError, match=r"stage 'b'.*unknown stage 'nope'"):
        load({"a": base, "b": {**base, "args": ["--x=${stages.nope.output_dir}"]}})
    with pytest.raises(PipelineError, match=r"stage 'a'.*refers to stage 'b', which does not run before 'a'"):
        load({"a": {**base, "args": ["--x=${stages.b.output_dir}/f.pt"]}, "b": base})
    with pytest.raises(PipelineError, match=r"stage 'a' declares no output 'set' \(its outputs: none"):
        load({"a": base, "b": {**base, "overrides": {"x": "${stages.a.set}"}}})
    with pytest.raises(PipelineError, match=r"\$\{stages\.a\} is not a pipeline reference"):
        load({"a": base, "b": {**base, "overrides": {"x": "${stages.a}"}}})
    with pytest.raises(PipelineError, match=r"`command` must be one of \['fit', 'validate', 'test', 'rank'\], got 'predict'"):
        load({"a": {**base, "command": "predict"}})
    with pytest.raises(PipelineError, match=r"unknown key\(s\) \['ovverrides'\]"):
        load({"a": {**base, "ovverrides": {}}})
    with pytest.raises(PipelineError, match=r"unknown key\(s\) \['stage'\]"):
        Pipeline({"stage": {}}, path=tmp_path / "p.yaml")
    with pytest.raises(PipelineError, match="`stages` must be a non-empty mapping"):
        load({})
    with pytest.raises(PipelineError, match="`isolation` must be one of"):
        load({"a": base}, isolation="threads")
    # references that are not the pipeline's stay for the command's own OmegaConf interpolation
    p = load({"a": {**base, "overrides": {"n": "${data.init_args.channels}", "d": "${pipeline.output_dir}/x"}}})
    assert p.resolve("a").overrides == {"n": "${data.init_args.channels}", "d": f"{tmp_path}/x"}
    assert p.select("a") == ["a"]
    with pytest.raises(PipelineError, match=r"--stages: unknown stage\(s\) \['b'\]; the stages of p are \['a'\]"):
        p.select("a,b")


def test_command_line_errors(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 1
    assert "no pipeline file at" in capsys.readouterr().err
    assert main(["--config", str(FLAGSHIP), "--output_dir", str(tmp_path), "--set", "student=3"]) == 1
    assert "expected STAGE.KEY=VALUE" in capsys.readouterr().err
    assert main(["--config", str(FLAGSHIP), "--output_dir", str(tmp_path), "--set", "teacher.a=1"]) == 1
    assert "--set: unknown stage 'teacher'" in capsys.readouterr().err
    assert main(["--config", str(FLAGSHIP), "--output_dir", str(tmp_path), "--stages", "distil"]) == 1
    assert "unknown stage(s) ['distil']" in capsys.readouterr().err
    # --dry_run prints the commands (with --set arguments) and runs nothing
    assert main(["--config", str(FLAGSHIP), "--output_dir", str(tmp_path), "--dry_run", "--set", "rank.name=[a,b]"]) == 0
    out = capsys.readouterr().out
    assert out.count("lightning-eff fit") == 3 and out.count("lightning-eff rank") == 1 and "--name=[a,b]" in out
    assert not (tmp_path / "pipeline_summary.json").exists()


def test_missing_artefact_stops_before_the_stage(tmp_path, capsys):
    rc = main(["--config", str(FLAGSHIP), "--output_dir", str(tmp_path), "--stages", "student"])
    assert rc == 1
    err = capsys.readouterr().err
    expected = f"stage 'student' needs {tmp_path / 'drupi' / 'synthetic_set.pt'}, made by stage 'drupi'"
    assert expected in err and "--stages drupi,student" in err
    summary = _summary(tmp_path)
    assert summary["status"] == "failed"
    assert _stage(summary, "student")["status"] == "failed" and expected in _stage(summary, "student")["error"]
    assert [_stage(summary, n)["status"] for n in ("distill", "drupi", "rank")] == ["skipped"] * 3


# --------------------------------------------------------------------------------------------------
# running stages (tiny)
# --------------------------------------------------------------------------------------------------
def _tiny_classifier_pipeline(tmp_path: Path) -> Path:
    """Two stages: `fit` an MLP for 3 steps (its checkpoint is a declared output), then `test` that checkpoint."""
    spec = {
        "stages": {
            "train": {
                "command": "fit",
                "config": str(ROOT / "configs/classify/digits_mlp.yaml"),
                "args": [
                    "--trainer.max_steps=3",
                    "--trainer.limit_val_batches=1",
                    "--trainer.limit_test_batches=1",
                    "--trainer.logger=false",
                    "--trainer.enable_progress_bar=false",
                ],
                "overrides": {"trainer": {"callbacks": [
                    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                     "init_args": {"dirpath": "${stage.output_dir}/ckpt", "filename": "last"}}]}},
                "outputs": {"ckpt": "ckpt/last.ckpt"},
            },
            "check": {
                "command": "test",
                "config": str(ROOT / "configs/classify/digits_mlp.yaml"),
                "args": ["--ckpt_path=${stages.train.ckpt}", "--trainer.limit_test_batches=2", "--trainer.logger=false"],
            },
        }
    }
    return _write(tmp_path / "tiny.yaml", spec)


def test_stages_pass_artefacts_and_the_summary_records_metrics(tmp_path):
    config = _tiny_classifier_pipeline(tmp_path)
    out = tmp_path / "out"
    assert main(["--config", str(config), "--output_dir", str(out)]) == 0
    summary = _summary(out)
    assert summary["status"] == "ok" and summary["selected"] == ["train", "check"]
    train, check = _stage(summary, "train"), _stage(summary, "check")
    assert train["status"] == check["status"] == "ok"
    assert train["outputs"] == {"ckpt": str(out / "train/ckpt/last.ckpt")} and (out / "train/ckpt/last.ckpt").is_file()
    assert 0.0 <= check["metrics"]["test/acc"] <= 1.0 and check["key_metrics"]["test/acc"] == check["metrics"]["test/acc"]
    assert f"--ckpt_path={out / 'train/ckpt/last.ckpt'}" in check["argv"]
    assert check["shell_command"].startswith("lightning-eff test --config ")
    assert train["seconds"] > 0 and summary["seconds"] >= train["seconds"]
    # a subset reuses the earlier artefacts; skipped stages keep their previous record
    assert main(["--config", str(config), "--output_dir", str(out), "--stages", "check"]) == 0
    again = _summary(out)
    assert _stage(again, "train")["status"] == "skipped"
    assert _stage(again, "train")["previous"]["outputs"] == train["outputs"]
    assert _stage(again, "check")["status"] == "ok"


def test_a_failing_stage_stops_the_pipeline(tmp_path, capsys):
    config = _tiny_classifier_pipeline(tmp_path)
    out = tmp_path / "out"
    assert main(["--config", str(config), "--output_dir", str(out), "--set", "train.trainer.max_steps=abc"]) == 1
    summary = _summary(out)
    assert summary["status"] == "failed"
    assert _stage(summary, "train")["status"] == "failed" and "bad arguments" in _stage(summary, "train")["error"]
    assert _stage(summary, "check")["status"] == "not_run"
    assert "| train | fit | failed |" in capsys.readouterr().out


def test_a_declared_output_that_is_not_written_fails_the_stage(tmp_path):
    spec = yaml.safe_load(_tiny_classifier_pipeline(tmp_path).read_text())
    spec["stages"]["train"]["outputs"] = {"ckpt": "ckpt/other_name.ckpt"}
    config = _write(tmp_path / "bad_output.yaml", spec)
    assert main(["--config", str(config), "--output_dir", str(tmp_path / "out"), "--stages", "train"]) == 1
    rec = _stage(_summary(tmp_path / "out"), "train")
    assert rec["status"] == "failed" and "did not write its declared output(s) ckpt" in rec["error"]


def test_subprocess_isolation(tmp_path, capsys):
    """With `isolation: subprocess` a stage runs in a fresh `python -m lightning_eff.pipeline _stage ...`."""
    config = _tiny_classifier_pipeline(tmp_path)
    out = tmp_path / "out"
    assert main(["--config", str(config), "--output_dir", str(out), "--isolation", "subprocess", "--stages", "train"]) == 0
    summary = _summary(out)
    assert summary["isolation"] == "subprocess" and summary["status"] == "ok"
    train = _stage(summary, "train")
    assert train["status"] == "ok" and 0.0 <= train["metrics"]["test/acc"] <= 1.0  # test_after_fit, in the child
    assert (out / "train" / "pipeline_stage_result.json").is_file()


@pytest.mark.slow
def test_subprocess_isolation_runs_a_two_process_ddp_stage(tmp_path):
    """A `strategy: ddp` stage (Lightning relaunches the command per rank) reports once, from rank 0."""
    config = _tiny_classifier_pipeline(tmp_path)
    out = tmp_path / "out"
    ddp = ["train.trainer.strategy=ddp", "train.trainer.devices=2", "train.trainer.accelerator=cpu"]
    args = ["--config", str(config), "--output_dir", str(out), "--isolation", "subprocess", "--stages", "train"]
    assert main([*args, *_sets(ddp)]) == 0
    train = _stage(_summary(out), "train")
    assert train["status"] == "ok" and 0.0 <= train["metrics"]["test/acc"] <= 1.0
    assert "--trainer.strategy=ddp" in train["argv"]


def test_inprocess_refuses_a_strategy_that_relaunches_the_command(tmp_path):
    config = _tiny_classifier_pipeline(tmp_path)
    out = tmp_path / "out"
    ddp = ["train.trainer.strategy=ddp", "train.trainer.devices=2", "train.trainer.accelerator=cpu"]
    assert main(["--config", str(config), "--output_dir", str(out), "--stages", "train", *_sets(ddp)]) == 1
    train = _stage(_summary(out), "train")
    assert train["status"] == "failed" and "isolation: subprocess" in train["error"]


def test_lightning_eff_dispatches_the_pipeline_subcommand(tmp_path, capsys):
    from lightning_eff.cli import main as cli_main

    with pytest.raises(SystemExit) as exc:
        cli_main(["pipeline", "--config", str(FLAGSHIP), "--output_dir", str(tmp_path), "--dry_run"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("# distill\nlightning-eff fit --config ")
    if SCRIPT.exists():  # the installed console script resolves to the same entry point
        assert "lightning_eff.cli" in SCRIPT.read_text()


# --------------------------------------------------------------------------------------------------
# the flagship
# --------------------------------------------------------------------------------------------------
def _check_flagship(out: Path) -> dict:
    from lightning_eff.distill import SyntheticSet

    summary = _summary(out)
    assert summary["status"] == "ok", json.dumps(summary, indent=1)[-3000:]
    assert [r["status"] for r in summary["stages"]] == ["ok"] * 4
    distilled = SyntheticSet.load(out / "distill" / "synthetic_set.pt")
    labelled = SyntheticSet.load(out / "drupi" / "synthetic_set.pt")
    assert distilled.metadata["method"] == "ncfm" and distilled.privileged is None
    assert labelled.metadata["method"] == "ncfm+drupi" and labelled.privileged is not None
    assert labelled.metadata["source"]["source"] == str(out / "distill" / "synthetic_set.pt")
    assert (out / "distill" / "synthetic_grid.png").is_file()
    # DD-Ranking ranked both sets; its scores are in the summary
    rank = _stage(summary, "rank")
    for name in ("ncfm_sdc", "ncfm_sdc_drupi"):
        for metric in ("lrs", "ars"):
            assert 0.0 <= rank["key_metrics"][f"ranking/{name}/{metric}"] <= 1.0
    assert 0.0 < rank["key_metrics"]["ranking/full_acc"] <= 1.0
    assert Path(rank["ranking_json"]).is_file()
    # the KO student trained on the DRUPI set and was tested on the real test split
    student = _stage(summary, "student")
    assert 0.0 <= student["key_metrics"]["test/acc"] <= 1.0
    assert "distill/loss" in _stage(summary, "distill")["metrics"]
    return summary


def test_flagship_pipeline_reduced(tmp_path):
    """The flagship's four stages with tiny budgets (the full run is the slow test below)."""
    out = tmp_path / "out"
    assert main(["--config", str(FLAGSHIP), "--output_dir", str(out), *_sets(TINY)]) == 0
    summary = _check_flagship(out)
    assert _stage(summary, "student")["argv"][-2:] == ["--trainer.check_val_every_n_epoch=1", f"--trainer.default_root_dir={out / 'student'}"]


@pytest.mark.slow
def test_flagship_pipeline_full(tmp_path):
    """The flagship as shipped (about 5 minutes on 2 shared CPU cores): the set beats random real images of
    the same IPC under DD-Ranking, and the KO student learns the digits from its 40 images."""
    out = tmp_path / "out"
    assert main(["--config", str(FLAGSHIP), "--output_dir", str(out)]) == 0
    summary = _check_flagship(out)
    assert _stage(summary, "rank")["key_metrics"]["ranking/ncfm_sdc/ior"] > 0  # 0.079 when written
    assert _stage(summary, "student")["key_metrics"]["test/acc"] > 0.9  # 0.961 when written
