"""SyntheticSetDataModule: train on a saved synthetic set, validate and test on the real data."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import cpu_trainer, digits_fixture

from lightning_eff.data import ClassificationDataModule, DigitsDataModule, SyntheticSetDataModule
from lightning_eff.distill import DSA, SyntheticSet
from lightning_eff.models import ConvNet, ImageClassifier

real8 = digits_fixture(8)


@pytest.fixture
def set_path(real8, tmp_path):
    synset = SyntheticSet.from_real(real8, ipc=3, seed=1)
    return str(synset.save(tmp_path / "synthetic_set.pt")), synset


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    return cpu_trainer(tmp_path, **kwargs)


def test_trains_on_the_set_and_evaluates_on_the_real_splits(set_path, real8):
    path, synset = set_path
    dm = SyntheticSetDataModule(path, DigitsDataModule(image_size=8), batch_size=7)
    assert isinstance(dm, ClassificationDataModule)
    dm.setup("fit")
    assert (dm.num_classes, dm.image_shape) == (10, (1, 8, 8))
    assert dm.mean == pytest.approx(real8.mean) and dm.std == pytest.approx(real8.std)
    assert len(dm.train_set) == 30
    assert torch.equal(dm.train_targets, synset.labels)
    # every training sample is the saved image and label, in order
    xs, ys = zip(*(dm.train_set[i] for i in range(len(dm.train_set))))
    assert torch.equal(torch.stack(xs), synset.images) and list(ys) == synset.labels.tolist()
    # validation and test are the real DataModule's splits (same images and labels)
    assert len(dm.val_set) == len(real8.val_set) == 180 and len(dm.test_set) == len(real8.test_set) == 359
    assert torch.equal(dm.test_set[17][0], real8.test_set[17][0]) and dm.test_set[17][1] == real8.test_set[17][1]
    batches = list(dm.train_dataloader())
    assert [len(b[0]) for b in batches] == [7, 7, 7, 7, 2]
    assert sum(len(b[0]) for b in dm.test_dataloader()) == 359
    # per-class access reads the synthetic set
    assert torch.equal(dm.class_images(4), synset.class_images(4))
    assert dm.synthetic_set.equals(synset)


def test_missing_path_is_a_clear_error(tmp_path):
    dm = SyntheticSetDataModule(str(tmp_path / "nope.pt"), DigitsDataModule())
    with pytest.raises(FileNotFoundError, match=r"SyntheticSetDataModule: path=.*nope\.pt.*no such file"):
        dm.setup("fit")
    dm = SyntheticSetDataModule(str(tmp_path), DigitsDataModule())
    with pytest.raises(FileNotFoundError, match="a folder, not a file"):
        dm.setup("fit")


def test_corrupt_or_foreign_file_is_a_clear_error(tmp_path, set_path):
    path, _ = set_path
    data = open(path, "rb").read()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"SyntheticSetDataModule: path=.*broken\.pt.*cannot be used.*corrupt"):
        SyntheticSetDataModule(str(broken), DigitsDataModule()).setup("fit")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="not a lightning-eff synthetic set"):
        SyntheticSetDataModule(str(foreign), DigitsDataModule()).setup("fit")


def test_shape_class_and_normalisation_mismatch(set_path, tmp_path, real8):
    path, synset = set_path
    with pytest.raises(ValueError, match=r"images of shape \(1, 8, 8\) but DigitsDataModule yields \(1, 16, 16\)"):
        SyntheticSetDataModule(path, DigitsDataModule(image_size=16)).setup("fit")
    fewer = SyntheticSet(synset.images[:6], torch.tensor([0, 0, 1, 1, 2, 2]), metadata={"num_classes": 3})
    p = fewer.save(tmp_path / "three.pt")
    with pytest.raises(ValueError, match="num_classes=3 but DigitsDataModule has 10"):
        SyntheticSetDataModule(str(p), DigitsDataModule()).setup("fit")
    meta = dict(synset.metadata, mean=[0.0], std=[1.0])
    p = SyntheticSet(synset.images, synset.labels, metadata=meta).save(tmp_path / "raw.pt")
    with pytest.raises(ValueError, match=r"normalised with mean=\[0\.0\] but DigitsDataModule uses mean="):
        SyntheticSetDataModule(str(p), DigitsDataModule()).setup("fit")
    # the same set is fine with a real DataModule in the same space
    SyntheticSetDataModule(str(p), DigitsDataModule(normalize=False)).setup("fit")


def test_made_from_another_dataset_warns(set_path, tmp_path):
    _, synset = set_path
    p = SyntheticSet(synset.images, synset.labels, metadata=dict(synset.metadata, dataset="OtherData")).save(
        tmp_path / "other.pt"
    )
    with pytest.warns(UserWarning, match="made from OtherData but is used with DigitsDataModule"):
        SyntheticSetDataModule(str(p), DigitsDataModule()).setup("fit")


def test_soft_labels_are_served_as_probabilities(set_path, tmp_path):
    path, synset = set_path
    with pytest.raises(ValueError, match="has no soft labels"):
        SyntheticSetDataModule(path, DigitsDataModule(), use_soft_labels=True).setup("fit")
    logits = torch.randn(len(synset), 10, generator=torch.Generator().manual_seed(0))
    p = SyntheticSet(synset.images, synset.labels, soft_labels=logits, metadata=dict(synset.metadata)).save(
        tmp_path / "soft.pt"
    )
    dm = SyntheticSetDataModule(str(p), DigitsDataModule(), use_soft_labels=True)
    dm.setup("fit")
    x, target = dm.train_set[5]
    assert torch.allclose(target, torch.softmax(logits[5], dim=0)) and x.shape == (1, 8, 8)
    assert torch.equal(dm.train_targets, synset.labels)  # hard labels stay the per-class index
    probs = torch.softmax(logits, dim=1)
    meta = dict(synset.metadata, soft_label_kind="probabilities")
    p = SyntheticSet(synset.images, synset.labels, soft_labels=probs, metadata=meta).save(tmp_path / "probs.pt")
    dm = SyntheticSetDataModule(str(p), DigitsDataModule(), use_soft_labels=True)
    dm.setup("fit")
    assert torch.equal(dm.train_set[3][1], probs[3])


def test_bad_arguments(set_path):
    path, _ = set_path
    with pytest.raises(TypeError, match="`path` must be the path of a saved synthetic set"):
        SyntheticSetDataModule(3, DigitsDataModule())
    with pytest.raises(TypeError, match="`real` must be a lightning_eff ClassificationDataModule"):
        SyntheticSetDataModule(path, "digits")
    with pytest.raises(TypeError, match="`augment` must be None or a callable"):
        SyntheticSetDataModule(path, DigitsDataModule(), augment=3)
    with pytest.raises(ValueError, match="batch_size"):
        SyntheticSetDataModule(path, DigitsDataModule(), batch_size=0)
    with pytest.raises(TypeError, match="not another SyntheticSetDataModule"):
        SyntheticSetDataModule(path, SyntheticSetDataModule(path, DigitsDataModule()))


class _CountingAugment:
    """Records the batch sizes it sees and negates the images (so the effect is visible)."""

    def __init__(self):
        self.sizes: list[int] = []

    def __call__(self, x, generator=None):
        assert isinstance(generator, torch.Generator)
        self.sizes.append(x.shape[0])
        return -x


class _SeenImages(L.Callback):
    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append(batch[0].clone())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(batch[0].clone())


def test_augment_applies_to_training_batches_only(set_path, tmp_path, real8):
    path, synset = set_path
    aug = _CountingAugment()
    dm = SyntheticSetDataModule(path, DigitsDataModule(), batch_size=30, augment=aug)
    seen = _SeenImages()
    model = ImageClassifier(ConvNet(in_channels=1, num_classes=10, width=8, depth=2, image_size=8))
    _trainer(tmp_path, max_epochs=2, callbacks=[seen], num_sanity_val_steps=1).fit(model, datamodule=dm)
    assert aug.sizes == [30, 30]  # one full batch per epoch, two epochs; no validation batch
    # training batches are the negated synthetic images (shuffled), validation batches the real ones
    assert len(seen.train) == 2 and torch.allclose(seen.train[0].sum(0), -synset.images.sum(0), atol=1e-4)
    real_val = torch.stack([real8.val_set[i][0] for i in range(len(seen.val[0]))])
    assert torch.equal(seen.val[0], real_val)


def test_augmentation_draws_are_seeded_and_resumable(set_path):
    path, _ = set_path
    x = torch.randn(6, 1, 8, 8)
    dsa = DSA(strategy="color_crop_cutout")

    class _Training:
        training = True

    def draws(dm, n):
        dm.trainer = _Training()
        return [dm.on_after_batch_transfer((x, torch.zeros(6)), 0)[0] for _ in range(n)]

    a = SyntheticSetDataModule(path, DigitsDataModule(), augment=dsa, seed=3)
    a.setup("fit")
    first = draws(a, 2)
    state = a.state_dict()
    after = draws(a, 2)
    b = SyntheticSetDataModule(path, DigitsDataModule(), augment=dsa, seed=3)
    b.setup("fit")
    assert all(torch.equal(u, v) for u, v in zip(draws(b, 2), first))  # same seed, same draws
    c = SyntheticSetDataModule(path, DigitsDataModule(), augment=dsa, seed=3)
    c.load_state_dict(state)
    c.setup("fit")
    assert all(torch.equal(u, v) for u, v in zip(draws(c, 2), after))  # resumed: continues the sequence
    assert not torch.equal(first[0], first[1])


def test_student_learns_from_a_real_subset_and_reports_real_test_accuracy(real8, tmp_path):
    """A real run: ConvNet trained on 10 real images per class reaches far above chance on the real test split."""
    path = SyntheticSet.from_real(real8, ipc=10, seed=0).save(tmp_path / "subset.pt")
    dm = SyntheticSetDataModule(str(path), DigitsDataModule(image_size=8), batch_size=20)
    torch.manual_seed(0)
    model = ImageClassifier(ConvNet(in_channels=1, num_classes=10, width=16, depth=2, image_size=8))
    trainer = _trainer(tmp_path, max_epochs=30, check_val_every_n_epoch=30)
    trainer.fit(model, datamodule=dm)
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    assert result["test/acc"] > 0.6, result  # chance is 0.1


def test_cli_builds_it_from_yaml(set_path, tmp_path, monkeypatch):
    from lightning_eff.cli import LightningEffCLI

    monkeypatch.setattr(sys, "argv", ["lightning-eff"])
    path, _ = set_path
    config = tmp_path / "student.yaml"
    config.write_text(
        f"""
model:
  class_path: ImageClassifier
  init_args:
    net: {{class_path: ConvNet, init_args: {{in_channels: 1, num_classes: 10, width: 8, image_size: 8}}}}
optimizer: {{class_path: lightning_eff.optim.KO, init_args: {{lr: 0.001}}}}
data:
  class_path: SyntheticSetDataModule
  init_args:
    path: {path}
    batch_size: 16
    real: {{class_path: DigitsDataModule, init_args: {{image_size: 8}}}}
    augment: {{class_path: lightning_eff.distill.DSA, init_args: {{strategy: crop}}}}
"""
    )
    cli = LightningEffCLI(run=False, args=["--config", str(config), "--trainer.logger=false"])
    dm = cli.datamodule
    assert isinstance(dm, SyntheticSetDataModule) and isinstance(dm.real, DigitsDataModule)
    assert isinstance(dm.augment, DSA) and dm.batch_size == 16 and dm.path == path


def test_image_classifier_trains_on_soft_labels(set_path, tmp_path):
    """Soft targets reach ImageClassifier as probabilities: CE against them, accuracy against their arg-max."""
    path, synset = set_path
    # soft labels that point at a *wrong* class: the student must follow them, not the hard labels
    wrong = (synset.labels + 1) % 10
    soft = torch.nn.functional.one_hot(wrong, 10).float() * 0.9 + 0.01
    p = SyntheticSet(synset.images, synset.labels, soft_labels=soft,
                     metadata=dict(synset.metadata, soft_label_kind="probabilities")).save(tmp_path / "soft.pt")
    dm = SyntheticSetDataModule(str(p), DigitsDataModule(image_size=8), use_soft_labels=True, batch_size=30)
    torch.manual_seed(0)
    model = ImageClassifier(ConvNet(in_channels=1, num_classes=10, width=16, depth=2, image_size=8))
    _trainer(tmp_path, max_epochs=60, limit_val_batches=0).fit(model, datamodule=dm)
    model.eval()
    with torch.no_grad():
        pred = model(synset.images).argmax(1)
    assert (pred == wrong).float().mean() > 0.9
    with pytest.raises(ValueError, match="soft targets of shape"):
        model.training_step((synset.images[:2], torch.rand(2, 7)), 0)


def test_image_classifier_trains_on_privileged_labels(set_path, tmp_path):
    """DRUPI's labels reach ImageClassifier: the feature term is applied and pulls E(x) toward F."""
    path, synset = set_path
    # attention labels for a width-16 ConvNet, far from what CE alone produces: 0 on 8 channels, 2 on 8
    target = torch.cat([torch.zeros(len(synset), 8), torch.full((len(synset), 8), 2.0)], dim=1)
    meta = dict(synset.metadata, privileged={"kind": "attention", "pooling": "avg", "layer": "encoder", "weight": 50.0})
    p = SyntheticSet(synset.images, synset.labels, privileged=target, metadata=meta).save(tmp_path / "priv.pt")
    with pytest.raises(ValueError, match="no privileged information"):
        SyntheticSetDataModule(path, DigitsDataModule(image_size=8), use_privileged=True).setup("fit")

    def fit(weight):
        dm = SyntheticSetDataModule(str(p), DigitsDataModule(image_size=8), use_privileged=True, batch_size=30,
                                    augment=DSA(strategy="flip"))
        torch.manual_seed(0)
        model = ImageClassifier(ConvNet(in_channels=1, num_classes=10, width=16, depth=2, image_size=8),
                                optimizer=functools.partial(torch.optim.Adam, lr=0.02), privileged_weight=weight)
        _trainer(tmp_path, max_epochs=150, limit_val_batches=0).fit(model, datamodule=dm)
        model.eval()
        with torch.no_grad():
            pooled = model.net.encoder(synset.images).mean(dim=(-2, -1))
        return (pooled - target).square().mean().item()

    assert fit(None) < 0.5 * fit(0.0)  # weight from the set (50) vs the term switched off
    with pytest.raises(ValueError, match="privileged_weight"):
        ImageClassifier(ConvNet(in_channels=1, num_classes=10, width=16, depth=2, image_size=8), privileged_weight=-1)


def test_privileged_labels_of_another_architecture_are_a_clear_error(set_path, tmp_path):
    path, synset = set_path
    meta = dict(synset.metadata, privileged={"kind": "attention", "pooling": "avg", "layer": "encoder", "weight": 1.0})
    p = SyntheticSet(synset.images, synset.labels, privileged=torch.zeros(len(synset), 7), metadata=meta)
    dm = SyntheticSetDataModule(str(p.save(tmp_path / "p.pt")), DigitsDataModule(image_size=8), use_privileged=True)
    model = ImageClassifier(ConvNet(in_channels=1, num_classes=10, width=16, depth=2, image_size=8))
    with pytest.raises(ValueError, match="architecture the labels were learned with"):
        _trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(model, datamodule=dm)


# ---------------------------------------------------------------- the artefact's new home (issue 21)
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_synthetic_set_lives_in_data_and_the_old_paths_still_work():
    import lightning_eff.data as data
    import lightning_eff.distill as distill
    import lightning_eff.distill.synthetic as old
    from lightning_eff.data.synthetic_set import SyntheticSet as home

    assert data.SyntheticSet is home is distill.SyntheticSet is old.SyntheticSet
    assert old.SyntheticSetDataset is data.SyntheticSetDataset
    assert (old.FORMAT_NAME, old.FORMAT_VERSION) == ("lightning-eff/synthetic-set", 1)


def test_a_file_saved_before_the_move_loads_identically(tmp_path):
    """tests/fixtures/synthetic_set_v1.pt was written by ``lightning_eff.distill.synthetic.SyntheticSet.save``
    before issue 21 moved the class; its content is rebuilt here from the same seeded draws."""
    g = torch.Generator().manual_seed(0)
    images, soft, privileged = torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 2, generator=g), torch.randn(
        4, 3, generator=g
    )
    old = SyntheticSet.load(FIXTURES / "synthetic_set_v1.pt")
    assert torch.equal(old.images, images) and torch.equal(old.labels, torch.tensor([0, 0, 1, 1]))
    assert torch.equal(old.soft_labels, soft) and torch.equal(old.privileged, privileged) and old.lr == 0.05
    assert old.metadata == {"num_classes": 2, "mean": [0.5], "std": [0.25], "method": "fixture", "ipc": 2, "seed": 7,
                            "image_shape": [1, 4, 4], "library_version": "0.1.0"}
    # and a set saved now is the same file content (same format, same fields)
    path = old.save(tmp_path / "again.pt")
    raw_old = torch.load(FIXTURES / "synthetic_set_v1.pt", weights_only=True)
    raw_new = torch.load(path, weights_only=True)
    assert raw_old.keys() == raw_new.keys()
    assert all(
        torch.equal(raw_old[k], raw_new[k]) if isinstance(raw_old[k], torch.Tensor) else raw_old[k] == raw_new[k]
        for k in raw_old
    )
