"""W&B in offline mode: a run through the real CLI writes a run directory with the config, an image and tables.

Nothing goes to the network: ``WANDB_MODE=offline`` and ``WANDB_DIR`` inside ``tmp_path``; the offline
run directory (``<WANDB_DIR>/wandb/offline-run-*``) is what ``wandb sync`` would upload later. Media
(images, tables) are files under ``files/media``; the config and the logged keys are records of the
run's transaction log ``run-<id>.wandb`` (W&B >= 0.19's wandb-core writes ``files/config.yaml`` only
when it syncs; older clients write it offline too, and then it is read from there).
"""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("wandb")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, writing under tmp_path (the conftest's autouse fixture disables it)."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(sys, "argv", ["lightning-eff"])
    yield tmp_path
    wandb.finish()


def _run_dir(root: Path) -> Path:
    runs = sorted((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {root / 'wandb'}, found {[r.name for r in runs]}"
    _wait_for_exit_record(runs[0])
    return runs[0]


def _wait_for_exit_record(run: Path, timeout: float = 120.0) -> None:
    """Wait until the run's transaction log ends with its ``exit`` record.

    ``wandb.finish()`` (0.31, wandb-core) can return before the service has flushed the offline log: right
    after it the ``.wandb`` file was seen empty, complete a few seconds later (more often on a loaded machine).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in _log_records(run)):
                return
        except Exception:  # noqa: BLE001 - no log yet, or only its first bytes (a partial record)
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no exit record in {run} {timeout:.0f} s after wandb.finish()")
        time.sleep(0.2)


_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc32, length, type) records


def _log_records(run: Path) -> list:
    """The protobuf ``Record``s of the run's ``run-<id>.wandb`` transaction log, in order."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path.name} is not a W&B transaction log"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _stored_config(run: Path) -> dict:
    """The run's config as ``{key: value}``: the log's config records, then ``files/config.yaml`` if written.

    Both are read because under load the service can leave a ``config.yaml`` written at ``init`` (without the
    later ``config.update`` keys) when ``wandb.finish`` returns, while the transaction log has every update.
    """
    config = {}
    for record in _log_records(run):
        kind = record.WhichOneof("record_type")
        items = record.config.update if kind == "config" else record.run.config.update if kind == "run" else []
        for item in items:
            config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    path = run / "files" / "config.yaml"
    if path.exists():
        config.update(
            {k: v["value"] for k, v in (yaml.safe_load(path.read_text()) or {}).items() if isinstance(v, dict)}
        )
    return config


def _history(run: Path) -> dict:
    """The last logged value of every key (``wandb.log``), from the log's history records."""
    out: dict = {}
    for record in _log_records(run):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                # a media value comes as one item per field: nested_key = [key, field]
                *parents, leaf = [item.key] if item.key else list(item.nested_key)
                node = out
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = json.loads(item.value_json)
    return out


def test_distillation_fit_writes_an_offline_run_with_config_and_grid(wandb_offline):
    """``lightning-eff fit --trainer.logger=WandbLogger`` on a distillation config, offline."""
    import wandb
    from PIL import Image

    from lightning_eff.cli import LightningEffCLI

    tmp = wandb_offline
    cli = LightningEffCLI(
        args=[
            "fit",
            "--config",
            str(ROOT / "configs" / "distill" / "dm_digits_ipc1.yaml"),
            "--trainer.max_steps=2",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.logger=WandbLogger",
            "--trainer.logger.project=lightning-eff-test",
            f"--trainer.logger.save_dir={tmp}",
            f"--trainer.default_root_dir={tmp}",
        ]
    )
    assert cli.trainer.global_step == 2
    assert wandb.run is not None  # the logger's run, finished below
    wandb.finish()  # flushes files/config.yaml and the media

    run = _run_dir(tmp)
    files = run / "files"
    assert list(run.glob("run-*.wandb")), "no .wandb log in the offline run (nothing for `wandb sync`)"

    # the resolved config is stored on the run (LoggerSaveConfigCallback), interpolations resolved
    config = _stored_config(run)
    stored = config["lightning_eff_config"]
    assert stored["model"]["class_path"] == "lightning_eff.distill.DistributionMatching"
    assert stored["model"]["init_args"]["ipc"] == 1
    assert stored["model"]["init_args"]["net"]["init_args"]["image_size"] == 16  # was ${data.init_args.image_size}
    assert stored["trainer"]["max_steps"] == 2
    assert stored["data"]["class_path"] == "lightning_eff.data.DigitsDataModule"
    # Lightning's own hyperparameters of the module and the data sit beside it
    assert config["ipc"] == 1 and config["batch_real"] == 128 and config["image_size"] == 16

    # the synthetic grid went in as a wandb.Image (lightning_eff.utils.logging.log_image)
    images = sorted((files / "media" / "images").rglob("*.png"))
    assert images, f"no image under {files / 'media' / 'images'}"
    assert any("synthetic_grid" in p.name for p in images), [p.name for p in images]
    grid = Image.open(images[0])
    assert min(grid.size) >= 16  # at least one 16 px synthetic image
    # ... and the same grid as a PNG next to the synthetic set (the logger-independent copy)
    assert (tmp / "synthetic_grid.png").exists() and (tmp / "synthetic_set.pt").exists()
    # the logged key points at that file as a W&B image (what the UI shows)
    logged = _history(run)["distill/synthetic_grid"]
    assert logged["_type"] == "image-file" and (files / logged["path"]) in images


def test_ranking_report_goes_to_wandb_as_a_table(wandb_offline):
    """DD-Ranking's table (``lightning_eff.ranking.results.log_report``) lands in the run as a wandb.Table."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from lightning_eff.ranking.results import RankingReport, RankingResult, log_report

    tmp = wandb_offline
    result = RankingResult(
        "dm",
        {"lrs": {"mean": 0.25, "std": 0.01}, "ars": {"mean": 0.5, "std": 0.02}},
        [{"full_acc": 0.97, "lrs": 0.25, "ars": 0.5}],
        {"ipc": 10, "images": 100},
    )
    report = RankingReport([result], {"num_eval": 1})
    logger = WandbLogger(project="lightning-eff-test", save_dir=str(tmp), offline=True)
    assert log_report([logger], report, step=0) == ["wandb"]
    wandb.finish()

    run = _run_dir(tmp)
    files = run / "files"
    tables = sorted((files / "media" / "table").rglob("*.table.json"))
    assert tables, f"no wandb.Table under {files / 'media' / 'table'}"
    table = json.loads(tables[0].read_text())
    assert table["columns"] == report.columns()
    assert table["data"][0][0] == "dm"
    assert table["data"][0][table["columns"].index("lrs_mean")] == pytest.approx(0.25)
    history = _history(run)
    assert history["ranking/table"]["_type"] == "table-file"
    assert files / history["ranking/table"]["path"] in tables
    assert history["ranking/dm/lrs"] == pytest.approx(0.25) and history["ranking/dm/ars_std"] == pytest.approx(0.02)
