"""DD-Ranking evaluator, callback and command line on the bundled digits with tiny students."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import digits_fixture, tiny_convnet

from lightning_eff.data import DigitsDataModule
from lightning_eff.distill import DistributionMatching, StudentProtocol, SyntheticSet
from lightning_eff.models import ConvNet, ImageClassifier
from lightning_eff.ranking import (
    DEFAULT_PROTOCOL,
    DDRanking,
    DDRankingCallback,
    RankingReport,
    load_teacher,
    log_report,
)
from lightning_eff.ranking import functional as F
from lightning_eff.ranking.plan import _Context
from lightning_eff.utils.seeding import derive_seed

ROOT = Path(__file__).resolve().parents[1]


dm8 = digits_fixture(8)


def tiny_net(size: int = 8, width: int = 8) -> ConvNet:
    return tiny_convnet(size, width, depth=1)


#: The students of the tiny protocol: 4 epochs, a 2-lr grid, checkpoints every 2 epochs, DSA (no CutMix).
TINY = DEFAULT_PROTOCOL.replace(epochs=4, lr=[0.01, 0.05], eval_every=2, dsa=True, cutmix=None)


def tiny(student: dict | None = None, **kw) -> DDRanking:
    """A tiny protocol: 2 runs, ARS, the students of TINY (``student``: changes of its fields)."""
    args = dict(
        net=tiny_net(),
        protocol=TINY.replace(**(student or {})),
        num_eval=2,
        full_epochs=2,
        device="cpu",
        progress=False,
        use_cache=False,
    )
    args.update(kw)
    return DDRanking(**args)


def prototypes(dm, ipc: int) -> SyntheticSet:
    """Per class, the centres of ``ipc`` k-means clusters of its training images (class prototypes)."""
    from sklearn.cluster import KMeans

    images, labels = [], []
    for c in range(dm.num_classes):
        x = dm.class_images(c)
        km = KMeans(ipc, n_init=1, random_state=0).fit(x.flatten(1).numpy())
        images.append(torch.tensor(km.cluster_centers_, dtype=torch.float32).view(ipc, *x.shape[1:]))
        labels.append(torch.full((ipc,), c))
    return SyntheticSet(
        torch.cat(images),
        torch.cat(labels),
        metadata={"method": "prototypes", "num_classes": 10, "dataset": type(dm).__name__},
    )


def scores(report: RankingReport) -> dict:
    return {r.name: (r.metrics, r.runs) for r in report.results}


# ---------------------------------------------------------------------------------------------
# the protocol
# ---------------------------------------------------------------------------------------------
def test_random_real_set_scores_ior_near_zero_and_prototypes_above(dm8):
    ranking = DDRanking(
        net=tiny_net(),
        protocol=DEFAULT_PROTOCOL.replace(epochs=20, lr=[0.01, 0.05], eval_every=6, cutmix=None),
        num_eval=3,
        metrics=["lrs"],
        full_epochs=10,
        device="cpu",
        progress=False,
        use_cache=False,
        seed=0,
    )
    report = ranking.rank(
        {"random": SyntheticSet.random_subset(dm8, 2, seed=12345), "prototypes": prototypes(dm8, 2)}, dm8
    )
    rand, proto = report["random"], report["prototypes"]
    assert abs(rand.mean("ior")) < 0.06
    assert proto.mean("ior") > 0.05 and proto.mean("ior") > rand.mean("ior") + 0.04
    assert proto.mean("lrs") > rand.mean("lrs")
    # both sets were compared with the same random subsets (shared trainings): identical random accuracies
    assert [r["rdm_acc"] for r in rand.runs] == [r["rdm_acc"] for r in proto.runs]
    # the per-run scores are the functional ones of the raw accuracies
    for run in proto.runs:
        assert run["hlr"] == pytest.approx(run["full_acc"] - run["syn_hard_acc"])
        assert run["ior"] == pytest.approx(run["syn_acc"] - run["rdm_acc"])
        assert run["lrs"] == pytest.approx(F.label_robust_score(run["hlr"], run["ior"]))
        assert run["syn_acc"] == run["syn_hard_acc"]  # hard-label setting: the HLR run is the IOR run
    assert "ars" not in proto.metrics


def test_same_seed_same_report_and_other_seed_differs(dm8):
    synset = SyntheticSet.from_noise(dm8, 2, seed=3)
    a = tiny(seed=7).rank(synset, dm8)
    b = tiny(seed=7).rank(synset, dm8)
    c = tiny(seed=8).rank(synset, dm8)
    assert scores(a) == scores(b)
    assert a.full_data == b.full_data
    assert scores(a) != scores(c)


def test_shared_trainings_counts_and_cache_reuse(dm8, tmp_path):
    s1, s2 = SyntheticSet.from_noise(dm8, 2, seed=1), SyntheticSet.random_subset(dm8, 2, seed=9)
    ranking = tiny(use_cache=True, cache_dir=tmp_path / "cache")
    report = ranking.rank({"noise": s1, "random": s2}, dm8)
    runs, grid = 2, 2
    # full (1 student) + random with and without augmentation (shared)
    # + per set: syn and syn without augmentation
    assert report.stats["trainings_run"] == 1 + 2 * runs * grid + 2 * (2 * runs * grid)
    assert report.full_data["cached"] is False
    files = sorted(p.name for p in (tmp_path / "cache").glob("*.json"))
    assert len(files) == 1 + 2 * runs  # the full-data students and each random cell
    entry = json.loads((tmp_path / "cache" / files[0]).read_text())
    assert entry["format"] == "lightning-eff/ddranking-cache" and entry["key"] == files[0][:-5]

    # a new evaluator (another process, another day) with the same protocol reuses all but the set's own runs
    again = tiny(use_cache=True, cache_dir=tmp_path / "cache").rank({"noise": s1}, dm8)
    assert again.stats["trainings_reused"] == 1 + 2 * runs * grid
    assert again.stats["trainings_run"] == 2 * runs * grid
    assert again.full_data["cached"] is True
    assert scores(again)["noise"] == scores(report)["noise"]

    # another student or another full-data recipe is another key: nothing reused
    other = tiny(net=tiny_net(width=4), use_cache=True, cache_dir=tmp_path / "cache").rank({"noise": s1}, dm8)
    assert other.stats["trainings_reused"] == 0
    longer = tiny(full_epochs=3, use_cache=True, cache_dir=tmp_path / "cache", metrics=["lrs"]).rank(
        {"noise": s1}, dm8
    )
    assert longer.full_data["cached"] is False


def test_cells_train_together_without_changing_any_result(dm8, monkeypatch):
    """All runs of all sets (and all random cells) go into few calls; a set's scores do not depend on the others."""
    import lightning_eff.ranking.plan as ev  # where the trainings are called

    calls = []
    real = ev.evaluate_synthetic_sets

    def counting(synsets, *args, **kwargs):
        calls.append(len(synsets))
        return real(synsets, *args, **kwargs)

    monkeypatch.setattr(ev, "evaluate_synthetic_sets", counting)
    s1, s2 = SyntheticSet.from_noise(dm8, 2, seed=1), SyntheticSet.random_subset(dm8, 2, seed=9)
    both = tiny(metrics=["lrs"]).rank({"noise": s1, "random": s2}, dm8)
    # full data; the random cells of both runs; the two sets' cells of both runs (hard setting: syn = syn_hard)
    assert sorted(calls) == [1, 2, 4]
    calls.clear()
    alone = tiny(metrics=["lrs"]).rank({"noise": s1}, dm8)
    assert sorted(calls) == [1, 2, 2]
    assert scores(alone)["noise"] == scores(both)["noise"]
    # a cap on the students per call splits the calls into whole cells; nothing else changes
    calls.clear()
    capped = tiny(metrics=["lrs"], max_students_per_call=4).rank({"noise": s1, "random": s2}, dm8)
    assert sorted(calls) == [1, 2, 2, 2]  # 2-lr cells: 2 per call
    assert scores(capped) == scores(both)
    with pytest.raises(ValueError, match="max_students_per_call"):
        tiny(max_students_per_call=0)


def test_full_data_per_run_and_augmented_as_the_package(dm8, monkeypatch):
    """full_per_run: one full-data student per run, run r's HLR uses its own Acc_full (ddranking's
    eval_full_data=True); the full data is augmented exactly when the package does (soft setting with
    augment_hard); the report's protocol lists the departures that apply."""
    import lightning_eff.ranking.plan as ev  # where the trainings are called

    full_calls = []
    real = ev.evaluate_synthetic_sets

    def recording(synsets, *args, **kwargs):
        if synsets[0].metadata.get("method") == "full_data":
            full_calls.append(dict(kwargs, students=kwargs["num_students"]))
        return real(synsets, *args, **kwargs)

    monkeypatch.setattr(ev, "evaluate_synthetic_sets", recording)
    s = SyntheticSet.from_noise(dm8, 2, seed=1)
    shared = tiny(metrics=["lrs"], num_eval=3).rank({"noise": s}, dm8)
    assert full_calls[-1]["students"] == 1 and full_calls[-1]["dsa"] is None
    assert len({r["full_acc"] for r in shared["noise"].runs}) == 1
    assert any("full_per_run=True" in d for d in shared.protocol["departures_from_ddranking_0.2.0"])

    per_run = tiny(metrics=["lrs"], num_eval=3, full_per_run=True).rank({"noise": s}, dm8)
    assert full_calls[-1]["students"] == 3
    accs = per_run.full_data["accuracies"]
    assert len(accs) == 3 and per_run.full_data["per_run"] is True
    for r, run in enumerate(per_run["noise"].runs):
        assert run["full_acc"] == accs[r]
        assert run["hlr"] == pytest.approx(accs[r] - run["syn_hard_acc"])
    assert per_run["noise"].mean("hlr") == pytest.approx(
        sum(accs) / 3 - sum(r["syn_hard_acc"] for r in per_run["noise"].runs) / 3
    )
    assert not any("full_per_run=True" in d for d in per_run.protocol["departures_from_ddranking_0.2.0"])

    teacher = tiny_net(width=16)
    soft = dict(student={"use_soft_labels": "M"}, teacher=teacher, metrics=["lrs"], num_eval=1)
    tiny(**soft).rank({"noise": s}, dm8)
    assert full_calls[-1]["dsa"] is None  # use_aug_for_hard off: not augmented (soft_label.py l. 312)
    rep = tiny(**soft, augment_hard=True).rank({"noise": s}, dm8)
    assert full_calls[-1]["dsa"] is not None  # on: the package augments the full data too
    assert rep.protocol["full_data"]["augmented"] is True


def test_an_interrupted_ranking_resumes_from_the_cache(dm8, tmp_path, monkeypatch):
    import lightning_eff.ranking.plan as ev  # where the trainings are called

    real = ev.evaluate_synthetic_sets

    def failing(synsets, *args, **kwargs):
        if any(s.metadata.get("method") == "boom" for s in synsets):
            raise RuntimeError("interrupted")
        return real(synsets, *args, **kwargs)

    noise = SyntheticSet.from_noise(dm8, 2, seed=1, method="boom")
    monkeypatch.setattr(ev, "evaluate_synthetic_sets", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        tiny(use_cache=True, cache_dir=tmp_path).rank({"noise": noise}, dm8)
    monkeypatch.setattr(ev, "evaluate_synthetic_sets", real)
    resumed = tiny(use_cache=True, cache_dir=tmp_path).rank({"noise": noise}, dm8)
    # the shared trainings run first and were cached as they finished: they are not run again
    assert resumed.stats["trainings_reused"] == 1 + 2 * 2 * 2
    assert scores(resumed) == scores(tiny().rank({"noise": noise}, dm8))


def test_cache_keys_and_seeds_are_pinned():
    """The seeds and cache keys of a ranking do not drift (values of the code before issue 21 moved the cache
    to ``ranking/cache.py`` and the seed derivation to ``utils.seeding``): cache files written earlier stay valid."""
    from lightning_eff.ranking.cache import _hash_json, _hash_tensors
    from lightning_eff.ranking.plan import _Job

    assert derive_seed(0, "full") == 1578009703969749304
    assert derive_seed(3, "rdm", 1, "abcd1234") == 4385324276967344414
    assert derive_seed(0, "subset", 2) == 328116679223244492
    desc = {"v": 1, "kind": "full", "epochs": 200, "lr": 0.01, "seed": derive_seed(0, "full")}
    job = _Job("full", "full", 0, [0.01], lambda: None, {}, 1, 1.0, cache=desc)
    assert job.cache_key == "full-5855dc2dbcba285c3ec15b48d0d3bd31"
    assert (
        _hash_tensors(torch.arange(6).view(2, 3), torch.tensor([0.5, -1.0]))
        == "307681d6ffb6bc7d52fa3674fa352137"
    )
    assert _hash_json([3] * 10)[:8] == "f3e22bf1"


def test_random_subsets_are_redrawn_per_run_with_the_sets_class_counts(dm8):
    ranking = tiny()
    ctx = _Context(ranking, dm8, tiny_net(), None, {}, torch.device("cpu"))
    balanced = (3,) * 10
    r0, r1 = ctx.random_subset(balanced, 0), ctx.random_subset(balanced, 1)
    assert not torch.equal(r0.images, r1.images)
    assert torch.bincount(r0.labels, minlength=10).tolist() == list(balanced)
    # the balanced draw is SyntheticSet.random_subset with the run's derived seed
    assert torch.equal(
        r0.images, SyntheticSet.random_subset(dm8, 3, seed=derive_seed(ranking.seed, "subset", 0)).images
    )
    uneven = (1, 2, 3, 1, 2, 3, 1, 2, 3, 4)
    r = ctx.random_subset(uneven, 0)
    assert torch.bincount(r.labels, minlength=10).tolist() == list(uneven)


def test_soft_labels_mode_s_and_m(dm8):
    teacher = tiny_net(width=16)
    base = SyntheticSet.random_subset(dm8, 2, seed=4)
    soft = SyntheticSet(
        base.images, base.labels, soft_labels=torch.randn(len(base), 10), metadata=dict(base.metadata)
    )
    # mode S: the stored soft labels for the set, the teacher's logits for the random subsets
    rs = tiny({"use_soft_labels": "S", "dsa": None, "cutmix": True}, teacher=teacher, num_eval=1)
    rep = rs.rank({"soft": soft}, dm8)
    run = rep["soft"].runs[0]
    assert {"syn_hard_acc", "syn_acc", "rdm_acc", "syn_noaug_acc"} <= set(run)
    assert rep.protocol["label_setting"] == "soft (S)" and rep.protocol["teacher"] is not None
    ctx = _Context(rs, dm8, tiny_net(), teacher, {}, torch.device("cpu"))
    subset = ctx.random_subset((2,) * 10, 0)
    with torch.no_grad():
        assert torch.allclose(subset.soft_labels, teacher.eval()(subset.images))
    # mode M: the teacher labels the batches; no stored soft labels needed
    rm = tiny(
        {"use_soft_labels": "M", "soft_loss": "kl", "temperature": 2.0},
        teacher=teacher,
        num_eval=1,
        metrics=["lrs"],
    )
    rep_m = rm.rank({"hard_set": base}, dm8)
    assert rep_m.protocol["soft_loss"] == "kl" and rep_m.protocol["temperature"] == 2.0
    assert set(rep_m["hard_set"].metrics) == {"hlr", "ior", "lrs", "lrs_ddranking"}


def test_privileged_information_is_used_for_the_synthetic_set(dm8):
    base = SyntheticSet.from_noise(dm8, 2, seed=2)
    # DRUPI attention labels: one value per channel of the student's encoder output (width 8)
    features = torch.randn(len(base), 8, generator=torch.Generator().manual_seed(0)) * 3
    priv = SyntheticSet(
        base.images,
        base.labels,
        privileged=features,
        metadata={**base.metadata, "privileged": {"kind": "attention", "pooling": "avg", "weight": 50.0}},
    )
    with_priv = tiny(num_eval=1, metrics=["lrs"], full_data_acc=0.9).rank({"p": priv}, dm8)
    without = tiny(num_eval=1, metrics=["lrs"], full_data_acc=0.9, student={"privileged_weight": 0.0}).rank(
        {"p": priv}, dm8
    )
    plain = tiny(num_eval=1, metrics=["lrs"], full_data_acc=0.9).rank({"p": base}, dm8)
    assert scores(without) == scores(plain)  # weight 0: the privileged term is off
    assert with_priv["p"].runs[0]["rdm_acc"] == plain["p"].runs[0]["rdm_acc"]  # the random side has none
    assert with_priv["p"].runs[0]["syn_acc"] != plain["p"].runs[0]["syn_acc"]
    assert with_priv.full_data == {"accuracy": 0.9, "accuracies": [0.9], "given": True, "cached": False}
    assert with_priv["p"].runs[0]["hlr"] == pytest.approx(0.9 - with_priv["p"].runs[0]["syn_hard_acc"])
    # ranked together with a plain set, each keeps its own training (they go to separate calls)
    together = tiny(num_eval=1, metrics=["lrs"], full_data_acc=0.9).rank({"p": priv, "plain": base}, dm8)
    assert scores(together)["p"] == scores(with_priv)["p"] and scores(together)["plain"] == scores(plain)["p"]


def test_metric_subsets_and_syn_lr(dm8):
    s = SyntheticSet.from_noise(dm8, 2, seed=5)
    ars_only = tiny(metrics=["ars"], num_eval=1).rank(s, dm8)
    assert set(ars_only.results[0].metrics) == {"ars", "with_aug", "without_aug", "ars_ddranking"}
    assert ars_only.full_data == {} and ars_only.stats["trainings_run"] == 4 * 2  # no full-data training
    learned = SyntheticSet(s.images, s.labels, lr=0.02, metadata=dict(s.metadata))
    rep = tiny(syn_lr="synset", num_eval=1, metrics=["lrs"]).rank(learned, dm8)
    assert rep.results[0].runs[0]["syn_lr"] == 0.02


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_bad_sets_raise_clear_errors(dm8):
    with pytest.raises(ValueError, match="IPC"):
        tiny(ipc=5).rank(SyntheticSet.random_subset(dm8, 2), dm8)
    wide = SyntheticSet(torch.randn(12, 1, 8, 8), torch.arange(12), metadata={"num_classes": 12})
    with pytest.raises(ValueError, match=r"labels up to 11.*10 classes"):
        tiny().rank(wide, dm8)
    with pytest.raises(ValueError, match="shape"):
        tiny().rank(SyntheticSet(torch.randn(10, 1, 16, 16), torch.arange(10)), dm8)
    with pytest.raises(ValueError, match="soft_labels"):
        tiny({"use_soft_labels": "S"}, teacher=tiny_net()).rank(SyntheticSet.random_subset(dm8, 1), dm8)
    with pytest.raises(ValueError, match="learned learning rate"):
        tiny(syn_lr="synset").rank(SyntheticSet.random_subset(dm8, 1), dm8)
    with pytest.raises(TypeError, match="ClassificationDataModule"):
        tiny().rank(SyntheticSet.random_subset(dm8, 1), object())
    with pytest.raises(TypeError, match="SyntheticSet"):
        tiny().rank({"x": torch.zeros(3)}, dm8)
    with pytest.raises(FileNotFoundError, match="teacher"):
        tiny({"use_soft_labels": "M"}, teacher="/no/such/teacher.ckpt").rank(
            SyntheticSet.random_subset(dm8, 1), dm8
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        # the students' settings are checked by StudentProtocol (tests/test_student_protocol.py); here what
        # DDRanking adds, and how the protocol must fit the ranking
        ({"protocol": DEFAULT_PROTOCOL.replace(use_soft_labels="M")}, ValueError, "need a `teacher`"),
        ({"protocol": DEFAULT_PROTOCOL.replace(use_soft_labels="S")}, ValueError, "need a `teacher`"),
        ({"teacher": torch.nn.Linear(2, 2)}, ValueError, "hard labels"),
        (
            {"protocol": {"epochs": 3}},
            TypeError,
            "`protocol` must be a lightning_eff.distill.StudentProtocol",
        ),
        ({"protocol": DEFAULT_PROTOCOL.replace(lr="synset")}, ValueError, "syn_lr='synset'"),
        ({"protocol": DEFAULT_PROTOCOL.replace(cutmix=None)}, ValueError, "augmentation-robust"),
        ({"num_eval": 0}, ValueError, "num_eval"),
        ({"syn_lr": "best"}, ValueError, "syn_lr"),
        ({"syn_lr": 0.0}, ValueError, "syn_lr"),
        ({"metrics": ["lrs", "xyz"]}, ValueError, "metrics"),
        ({"lrs_weight": 1.5}, ValueError, "lrs_weight"),
        ({"full_data_acc": 85.0}, ValueError, "full_data_acc"),
        ({"full_epochs": 0}, ValueError, "full_epochs"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"net": "ConvNet"}, TypeError, "net"),
        ({"ipc": 0}, ValueError, "ipc"),
        ({"epochz": 3}, TypeError, "epochz"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DDRanking(**kwargs)


def test_the_protocol_is_type_checked_from_yaml():
    """LightningCLI's parser builds the StudentProtocol from YAML, the fields not given keep DEFAULT_PROTOCOL's,
    and a wrong type is rejected naming the field (the real CLI is run with protocol overrides below)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DDRanking, "ranking")
    cfg = parser.parse_args(["--ranking.protocol", "{epochs: 5, lr: [0.1, 0.2], dsa: true, cutmix: null}"])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    ranking = instantiate(cfg).ranking
    assert ranking.student_protocol == DEFAULT_PROTOCOL.replace(
        epochs=5, lr=(0.1, 0.2), dsa=True, cutmix=None
    )
    assert ranking.student_protocol.eval_every == 20 and ranking.augmentation == "dsa"
    with pytest.raises(Exception, match="epochs"):
        parser.parse_args(["--ranking.protocol.epochs=many"])


def test_flat_student_arguments_of_earlier_versions_map_onto_the_protocol_with_a_warning():
    from lightning_eff.distill import DSA

    with pytest.warns(FutureWarning, match="protocol=StudentProtocol"):
        old = DDRanking(epochs=4, lrs=[0.01, 0.05], eval_every=2, augmentation="dsa", momentum=0.5)
    assert old.student_protocol == TINY.replace(momentum=0.5) and old.augmentation == "dsa"
    with pytest.warns(FutureWarning):
        both = DDRanking(augmentation="dsa+cutmix", dsa=DSA(strategy="flip"), soft_label_mode=None)
    assert both.student_protocol == DEFAULT_PROTOCOL.replace(dsa="flip") and both.augmentation == "dsa+cutmix"
    with pytest.warns(FutureWarning):
        soft = DDRanking(soft_label_mode="M", soft_loss="kl", teacher=tiny_net(), metrics=["lrs"])
    assert soft.student_protocol == DEFAULT_PROTOCOL.replace(use_soft_labels="M", soft_loss="kl")
    # still validated, naming the argument
    with pytest.warns(FutureWarning), pytest.raises(TypeError, match="epochs"):
        DDRanking(epochs=2.5)
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="augmentation"):
        DDRanking(augmentation="mixup")
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="lr"):
        DDRanking(lrs=[0.01, -1.0])


def test_the_default_protocol_is_the_papers():
    p = DDRanking().student_protocol
    assert p is DEFAULT_PROTOCOL and isinstance(p, StudentProtocol)
    assert (p.epochs, p.lr, p.momentum, p.weight_decay, p.batch_size, p.eval_every) == (
        300,
        (0.001, 0.005, 0.01, 0.05, 0.1),
        0.9,
        5e-4,
        256,
        20,
    )
    assert p.dsa is None and p.cutmix == {"beta": 1.0, "prob": 1.0} and p.soft_label_mode is None
    assert DDRanking(protocol=DEFAULT_PROTOCOL.replace(lr=0.05)).lrs == [0.05]  # a float: a grid of one


def test_callback_bad_arguments():
    with pytest.raises(TypeError, match="evaluator"):
        DDRankingCallback(evaluator={"epochs": 3})
    with pytest.raises(ValueError, match="name"):
        DDRankingCallback(name="")


# ---------------------------------------------------------------------------------------------
# teacher checkpoints
# ---------------------------------------------------------------------------------------------
def test_teacher_from_a_lightning_checkpoint_and_a_state_dict(dm8, tmp_path):
    model = ImageClassifier(tiny_net(width=6))
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=dm8)
    trainer.save_checkpoint(tmp_path / "teacher.ckpt")
    teacher = load_teacher(tmp_path / "teacher.ckpt")  # the architecture comes from the checkpoint's config
    assert isinstance(teacher, ConvNet) and teacher.width == 6 and not teacher.training
    for (k, v), w in zip(teacher.state_dict().items(), model.net.state_dict().values()):
        assert torch.equal(v, w), k
    torch.save(model.net.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="template"):
        load_teacher(tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="do not fit"):
        load_teacher(tmp_path / "sd.pt", template=tiny_net(width=8))
    from_sd = load_teacher(tmp_path / "sd.pt", template=tiny_net(width=6))
    assert torch.equal(from_sd.classifier.weight, model.net.classifier.weight)
    # a path works as `teacher` of the evaluator (mode M)
    rep = tiny(
        {"use_soft_labels": "M"},
        teacher=str(tmp_path / "teacher.ckpt"),
        num_eval=1,
        metrics=["lrs"],
        full_data_acc=0.95,
    ).rank(SyntheticSet.random_subset(dm8, 1, seed=2), dm8)
    assert rep.protocol["teacher"]["net"]["config"]["width"] == 6


# ---------------------------------------------------------------------------------------------
# results: files and loggers
# ---------------------------------------------------------------------------------------------
def test_results_json_csv_roundtrip_and_loggers(dm8, tmp_path, monkeypatch):
    rep = tiny(num_eval=2).rank({"a": SyntheticSet.from_noise(dm8, 1, seed=1)}, dm8)
    paths = rep.save(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "ranking.csv",
        "ranking.json",
        "ranking_runs.csv",
    ]
    loaded = RankingReport.load(paths["json"])
    assert scores(loaded) == scores(rep) and loaded.protocol["num_eval"] == 2
    lines = paths["csv"].read_text().splitlines()
    assert lines[0].split(",")[:4] == ["method", "ipc", "images", "hlr_mean"] and len(lines) == 2
    assert float(lines[1].split(",")[lines[0].split(",").index("lrs_mean")]) == pytest.approx(
        rep["a"].mean("lrs")
    )
    assert len(paths["runs_csv"].read_text().splitlines()) == 1 + 2
    with pytest.raises(ValueError, match="not a DD-Ranking results file"):
        RankingReport.from_dict({"format": "other"})

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    csv_logger = CSVLogger(tmp_path / "csv")
    tb = TensorBoardLogger(tmp_path / "tb")
    wb = WandbLogger(project="ranking-test", save_dir=str(tmp_path), offline=True)
    tables, texts = [], []
    monkeypatch.setattr(
        wb, "log_table", lambda key, columns, data, step=None: tables.append((key, columns, data))
    )
    monkeypatch.setattr(wb, "log_metrics", lambda metrics, step=None: None)
    monkeypatch.setattr(
        tb.experiment, "add_text", lambda tag, text, global_step=None: texts.append((tag, text))
    )
    assert log_report([csv_logger, tb, wb], rep, step=3) == ["tensorboard", "wandb"]
    key, columns, data = tables[0]
    assert key == "ranking/table" and columns == rep.columns() and data[0][0] == "a"
    assert texts[0][0] == "ranking/table" and "| a |" in texts[0][1]
    csv_logger.save()
    header = (Path(csv_logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "ranking/a/lrs" in header and "ranking/a/ars_std" in header


# ---------------------------------------------------------------------------------------------
# the callback after a distillation fit
# ---------------------------------------------------------------------------------------------
def test_callback_ranks_the_set_after_a_distillation_fit(dm8, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    cb = DDRankingCallback(tiny(num_eval=1, full_data_acc=0.9))
    module = DistributionMatching(tiny_net(), ipc=2, batch_real=16)
    logger = CSVLogger(tmp_path / "logs")
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[cb],
    )
    trainer.fit(module, datamodule=dm8)
    assert cb.report is not None and cb.report.names == ["dm"]
    assert cb.report["dm"].metadata["ipc"] == 2 and cb.report["dm"].metadata["method"] == "dm"
    folder = Path(logger.log_dir) / "ranking"
    assert cb.paths["json"] == folder / "ranking.json" and (folder / "ranking.csv").is_file()
    # the ranked set is the module's final set
    saved = SyntheticSet.load(Path(logger.log_dir) / "synthetic_set.pt")
    assert cb.report["dm"].metadata["images"] == len(saved)
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "ranking/dm/lrs" in header
    # the report travels in the callback state
    state = cb.state_dict()
    fresh = DDRankingCallback()
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert scores(fresh.report) == scores(cb.report)


def test_callback_refuses_a_module_without_a_synthetic_set(dm8, tmp_path):
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[DDRankingCallback(tiny())],
    )
    with pytest.raises(TypeError, match="synthetic_set"):
        trainer.fit(ImageClassifier(tiny_net()), datamodule=dm8)


def test_end_to_end_fit_through_the_real_cli_with_the_ranking_config(tmp_path, monkeypatch):
    from lightning_eff.cli import LightningEffCLI

    monkeypatch.setattr(sys, "argv", ["lightning-eff"])
    ev = "--trainer.callbacks.init_args.evaluator.init_args."
    LightningEffCLI(
        args=[
            "fit",
            "--config",
            str(ROOT / "configs/distill/dm_digits_ipc10.yaml"),
            "--config",
            str(ROOT / "configs/ranking/digits_quick.yaml"),
            "--trainer.max_steps=2",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--model.init_args.ipc=1",
            "--model.init_args.batch_real=16",
            "--model.init_args.net.init_args.width=8",
            f"{ev}net.init_args.width=8",
            f"{ev}net.init_args.depth=2",
            f"{ev}num_eval=1",
            f"{ev}protocol.epochs=2",
            f"{ev}protocol.eval_every=1",
            f"{ev}protocol.lr=[0.01]",
            f"{ev}full_epochs=1",
            f"{ev}cache_dir={tmp_path / 'cache'}",
            f"{ev}progress=false",
        ]
    )
    data = json.loads((tmp_path / "ranking" / "ranking.json").read_text())
    assert data["format"] == "lightning-eff/ddranking-results"
    assert data["results"][0]["name"] == "dm" and data["results"][0]["metadata"]["ipc"] == 1
    assert data["protocol"]["epochs"] == 2 and data["protocol"]["augmentation"] == "dsa"
    assert 0.0 <= data["results"][0]["metrics"]["lrs"]["mean"] <= 1.0


# ---------------------------------------------------------------------------------------------
# the `lightning-eff rank` command
# ---------------------------------------------------------------------------------------------
def _rank_args(tmp_path, *extra: str) -> list[str]:
    ev = "--trainer.callbacks.init_args.evaluator.init_args."
    return [
        "--config",
        str(ROOT / "configs/ranking/digits_quick.yaml"),
        f"{ev}net.init_args.width=8",
        f"{ev}net.init_args.depth=2",
        f"{ev}num_eval=1",
        f"{ev}protocol.epochs=2",
        f"{ev}protocol.eval_every=1",
        f"{ev}protocol.lr=[0.01,0.05]",
        f"{ev}full_epochs=1",
        f"{ev}cache_dir={tmp_path / 'cache'}",
        f"{ev}progress=false",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.accelerator=cpu",
        *extra,
    ]


def test_rank_command_ranks_saved_sets(tmp_path, capsys):
    from lightning_eff.ranking.cli import main

    dm = DigitsDataModule(image_size=16)
    SyntheticSet.random_subset(dm, 1, seed=3).save(tmp_path / "a.pt")
    SyntheticSet.from_noise(dm, 1, seed=3).save(tmp_path / "b.pt")
    rc = main(
        _rank_args(
            tmp_path, "--synthetic", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--name", "real", "noise"
        )
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "| real | 1 |" in out and "| noise | 1 |" in out and "ranking.json" in out
    report = RankingReport.load(tmp_path / "ranking" / "ranking.json")
    assert report.names == ["real", "noise"] and report.stats["trainings_run"] == 1 + 2 * 2 + 2 * 2 * 2
    # the same command again, composed with a distillation config (its model/optimizer keys are ignored): the
    # full-data and random-real trainings come from the cache file
    args = ["--config", str(ROOT / "configs/distill/dm_digits_ipc10.yaml"), *_rank_args(tmp_path)]
    assert main([*args, "--synthetic", str(tmp_path / "a.pt"), "--output_dir", str(tmp_path / "o2")]) == 0
    again = RankingReport.load(tmp_path / "o2" / "ranking.json")
    assert again.names == ["random_real"] and again.stats["trainings_reused"] == 1 + 2 * 2
    assert again.results[0].runs == report["real"].runs


def test_rank_command_errors(tmp_path, capsys):
    from lightning_eff.ranking.cli import main

    assert main(_rank_args(tmp_path, "--synthetic", str(tmp_path / "missing.pt"))) == 1
    assert "no synthetic set" in capsys.readouterr().err
    dm = DigitsDataModule(image_size=8)  # 8 px set, 16 px config
    SyntheticSet.random_subset(dm, 1).save(tmp_path / "small.pt")
    assert main(_rank_args(tmp_path, "--synthetic", str(tmp_path / "small.pt"))) == 1
    assert "shape" in capsys.readouterr().err
    assert main(_rank_args(tmp_path, "--synthetic", str(tmp_path / "small.pt"), "--name", "a", "b")) == 1
    assert "--name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(ROOT / "configs/ranking/digits_quick.yaml")])  # --synthetic is required


# ---------------------------------------------------------------------------------------------
# DDP: trainings spread over 2 CPU processes (gloo) and gathered
# ---------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, folder: str) -> None:
    import torch.distributed as td

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dm = DigitsDataModule(image_size=8)
        rep = tiny(num_eval=2).rank({"noise": SyntheticSet.from_noise(dm, 1, seed=1)}, dm)
        Path(folder, f"rank{rank}.json").write_text(json.dumps(rep.to_dict()))
    finally:
        td.destroy_process_group()


@pytest.mark.slow
def test_ddp_spreads_trainings_and_every_rank_gets_the_same_report(dm8, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["results"] == r1["results"] and r0["stats"]["world_size"] == 2
    by_rank = r0["stats"]["trainings_by_rank"]
    assert len(by_rank) == 2 and min(by_rank) > 0 and sum(by_rank) == r0["stats"]["trainings_run"]
    single = tiny(num_eval=2).rank({"noise": SyntheticSet.from_noise(dm8, 1, seed=1)}, dm8)
    # the shared cells (full data, random subsets) have seeds of their own: same accuracies on 1 or 2 ranks
    assert r0["full_data"]["accuracies"] == single.full_data["accuracies"]
    for a, b in zip(r0["results"][0]["runs"], single["noise"].runs):
        assert a["rdm_acc"] == b["rdm_acc"] and a["rdm_noaug_acc"] == b["rdm_noaug_acc"]
