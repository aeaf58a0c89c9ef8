"""Tests for lightning_eff.data: digits, CIFAR (fake local folders), ImageFolder and the shared base API."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from lightning_eff.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    ClassificationDataModule,
    DigitsDataModule,
    ImageFolderDataModule,
)


@pytest.fixture(scope="module")
def digits_raw() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32) / 16.0, torch.tensor(d.target)


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule()
    dm.setup()
    return dm


# ------------------------------------------------------------------------------------------------
# DigitsDataModule
# ------------------------------------------------------------------------------------------------
def test_digits_split_sizes_disjoint_and_complete(digits):
    assert (len(digits.train_set), len(digits.val_set), len(digits.test_set)) == (1258, 180, 359)
    idx = digits.split_indices
    all_idx = torch.cat([idx["train"], idx["val"], idx["test"]])
    assert len(all_idx) == 1797
    assert torch.equal(all_idx.sort().values, torch.arange(1797))


def test_digits_split_is_stratified(digits, digits_raw):
    _, targets = digits_raw
    overall = torch.bincount(targets, minlength=10).double() / len(targets)
    for split, n in (("train", 1258), ("val", 180), ("test", 359)):
        counts = torch.bincount(targets[digits.split_indices[split]], minlength=10).double()
        # stratified: every class within one sample of its expected share (a random split would be off by ~5)
        assert (counts - overall * n).abs().max() <= 1.0, (split, counts)


def test_digits_labels_match_source(digits, digits_raw):
    _, targets = digits_raw
    assert torch.equal(digits.train_targets, targets[digits.split_indices["train"]])
    assert digits.train_targets.dtype == torch.long
    labels = torch.tensor([digits.test_set[i][1] for i in range(len(digits.test_set))])
    assert torch.equal(labels, targets[digits.split_indices["test"]])
    assert all(isinstance(digits.train_set[i][1], int) for i in range(3))


def test_digits_seed_determinism():
    a, b, c = DigitsDataModule(seed=3), DigitsDataModule(seed=3), DigitsDataModule(seed=4)
    for dm in (a, b, c):
        dm.setup()
    for split in ("train", "val", "test"):
        assert torch.equal(a.split_indices[split], b.split_indices[split])
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    assert not torch.equal(a.split_indices["test"], c.split_indices["test"])


def test_digits_val_fraction_zero_validates_on_test():
    dm = DigitsDataModule(val_fraction=0.0, test_fraction=0.25)
    dm.setup()
    assert dm.val_set is dm.test_set
    assert len(dm.train_set) + len(dm.test_set) == 1797
    assert len(dm.test_set) == round(0.25 * 1797)


@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits_resize_shapes_and_bilinear_values(size, digits_raw):
    dm = DigitsDataModule(image_size=size, normalize=False)
    assert dm.image_shape == (1, size, size)
    dm.setup()
    x, _ = dm.train_set[0]
    assert x.shape == (1, size, size)
    images, _ = digits_raw
    first = images[dm.split_indices["train"][0]][None, None]
    expected = F.interpolate(first, size=(size, size), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(x, expected)
    assert dm.mean == (0.0,) and dm.std == (1.0,)
    assert 0.0 <= float(dm.train_set.tensors[0].min()) and float(dm.train_set.tensors[0].max()) <= 1.0


def test_digits_three_channels_replicate_grey():
    dm = DigitsDataModule(image_size=16, channels=3)
    assert dm.image_shape == (3, 16, 16)
    dm.setup()
    x = dm.train_set.tensors[0]
    assert x.shape[1:] == (3, 16, 16)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    assert len(dm.mean) == len(dm.std) == 3
    assert dm.mean[0] == pytest.approx(dm.mean[2])


@pytest.mark.parametrize("channels", [1, 3])
def test_digits_normalisation_stats(channels, digits_raw):
    dm = DigitsDataModule(channels=channels)
    dm.setup()
    x = dm.train_set.tensors[0]
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(channels), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), correction=0), torch.ones(channels), atol=1e-5, rtol=0)
    images, _ = digits_raw
    raw_train = images[dm.split_indices["train"]]
    assert dm.mean[0] == pytest.approx(float(raw_train.mean()), abs=1e-6)
    assert dm.std[0] == pytest.approx(float(raw_train.std(correction=0)), abs=1e-6)
    # val/test use the training statistics, so they are only approximately standardised
    assert abs(float(dm.test_set.tensors[0].mean())) < 0.1


def test_normalize_denormalize(digits, digits_raw):
    images, _ = digits_raw
    raw = images[digits.split_indices["train"][:5]].unsqueeze(1)
    torch.testing.assert_close(digits.normalize(raw), digits.train_set.tensors[0][:5])
    torch.testing.assert_close(digits.denormalize(digits.normalize(raw)), raw)
    with pytest.raises(ValueError, match="C=1"):
        digits.normalize(torch.zeros(2, 3, 8, 8))


def test_properties_before_setup():
    dm = DigitsDataModule(image_size=32, channels=3)
    assert dm.num_classes == 10 and dm.image_shape == (3, 32, 32) and dm.image_size == 32
    assert dm.class_names == [str(i) for i in range(10)]
    for name in ("mean", "std", "train_set", "val_set", "test_set", "train_targets"):
        with pytest.raises(RuntimeError, match=r"Call `datamodule.setup\(\)`"):
            getattr(dm, name)
    with pytest.raises(RuntimeError, match="setup"):
        dm.class_images(0)
    assert DigitsDataModule(normalize=False, channels=3).mean == (0.0, 0.0, 0.0)


def test_setup_is_idempotent(digits):
    train = digits.train_set
    digits.setup("fit")
    digits.setup("test")
    assert digits.train_set is train
    assert isinstance(digits, ClassificationDataModule)


def test_class_indices(digits):
    total = 0
    for c in range(10):
        idx = digits.class_indices(c)
        assert idx.dtype == torch.long
        assert torch.all(digits.train_targets[idx] == c)
        total += len(idx)
    assert total == len(digits.train_set)
    for bad in (-1, 10):
        with pytest.raises(ValueError, match=r"\[0, 9\]"):
            digits.class_indices(bad)
    with pytest.raises(TypeError, match="`c`"):
        digits.class_indices(1.5)


def test_class_images(digits):
    train_x = digits.train_set.tensors[0]
    c = 4
    idx = digits.class_indices(c)
    everything = digits.class_images(c)
    assert torch.equal(everything, train_x[idx])
    assert torch.equal(everything, torch.stack([digits.train_set[int(i)][0] for i in idx]))

    g = torch.Generator().manual_seed(7)
    some = digits.class_images(c, n=10, generator=g)
    assert some.shape == (10, 1, 8, 8)
    # every drawn image is a distinct image of class c
    matches = (some[:, None] == everything[None]).flatten(2).all(-1)
    assert torch.all(matches.sum(1) >= 1)
    assert len({int(m.nonzero()[0]) for m in matches}) == 10

    again = digits.class_images(c, n=10, generator=torch.Generator().manual_seed(7))
    other = digits.class_images(c, n=10, generator=torch.Generator().manual_seed(8))
    assert torch.equal(some, again)
    assert not torch.equal(some, other)
    assert digits.class_images(c, n=len(idx), generator=g).shape[0] == len(idx)

    with pytest.raises(ValueError, match=rf"class {c} has {len(idx)} training images"):
        digits.class_images(c, n=len(idx) + 1)
    with pytest.raises(ValueError, match="`c`"):
        digits.class_images(10, n=1)


def test_dataloaders(digits):
    train = digits.train_dataloader()
    x, y = next(iter(train))
    assert x.shape == (64, 1, 8, 8) and y.shape == (64,) and y.dtype == torch.long
    assert not train.persistent_workers
    first = [next(iter(digits.train_dataloader()))[1] for _ in range(2)]
    assert not torch.equal(first[0], first[1])  # shuffled
    val = [b[1] for b in digits.val_dataloader()]
    assert torch.equal(torch.cat(val), digits.val_set.tensors[1])  # in order
    assert sum(len(b[0]) for b in digits.test_dataloader()) == 359
    dm = DigitsDataModule(num_workers=1, batch_size=16)
    dm.setup()
    assert dm.train_dataloader().persistent_workers and dm.train_dataloader().batch_size == 16


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"image_size": 12}, ValueError, r"`image_size` must be one of \(8, 16, 32\), got 12"),
        ({"image_size": 8.0}, TypeError, "`image_size` must be an int"),
        ({"channels": 2}, ValueError, r"`channels` must be one of \(1, 3\), got 2"),
        ({"val_fraction": 1.0}, ValueError, r"`val_fraction` must be a fraction in \[0, 1\), got 1.0"),
        ({"test_fraction": 0.0}, ValueError, r"`test_fraction` must be a fraction in \(0, 1\), got 0.0"),
        ({"test_fraction": 0.001}, ValueError, "`test_fraction`=0.001 gives 2"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, ValueError, "leave 1 training images"),
        ({"batch_size": 0}, ValueError, "`batch_size` must be an int >= 1, got 0"),
        ({"num_workers": -1}, ValueError, "`num_workers` must be an int >= 0, got -1"),
        ({"normalize": "yes"}, TypeError, "`normalize` must be a bool, got 'yes'"),
        ({"seed": "0"}, TypeError, "`seed` must be an int"),
    ],
)
def test_digits_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        DigitsDataModule(**kwargs)


# ------------------------------------------------------------------------------------------------
# CIFAR: fake folders written here in the official pickle format (independently of the loader)
# ------------------------------------------------------------------------------------------------
def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """Official row layout: 1024 red values, then 1024 green, then 1024 blue, each row-major."""
    return np.concatenate([images[:, c].reshape(len(images), 1024) for c in range(3)], axis=1)


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _write_fake_cifar10(root: Path, per_batch: int = 10, n_test: int = 20, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_images, train_labels = [], []
    for b in range(1, 6):
        images = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        labels = [int(v) for v in (np.arange(per_batch) + b) % 10]
        _dump(
            folder / f"data_batch_{b}",
            {
                "batch_label": f"training batch {b} of 5",
                "labels": labels,
                "data": _cifar_rows(images),
                "filenames": [f"img_{b}_{i}.png" for i in range(per_batch)],
            },
        )
        train_images.append(images)
        train_labels += labels
    test_images = rng.integers(0, 256, size=(n_test, 3, 32, 32), dtype=np.uint8)
    test_labels = [i % 10 for i in range(n_test)]
    _dump(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": test_labels,
            "data": _cifar_rows(test_images),
            "filenames": [],
        },
    )
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(folder / "batches.meta", {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072})
    return {
        "train_images": np.concatenate(train_images),
        "train_labels": np.array(train_labels),
        "test_images": test_images,
        "test_labels": np.array(test_labels),
        "names": names,
    }


def _write_fake_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> dict:
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        fine = [i % 100 for i in range(n)]
        _dump(
            folder / split,
            {
                "filenames": [],
                "batch_label": split,
                "fine_labels": fine,
                "coarse_labels": [f // 5 for f in fine],
                "data": _cifar_rows(images),
            },
        )
        out[split] = (images, np.array(fine))
    names = [f"class_{i:03d}" for i in range(100)]
    _dump(
        folder / "meta", {"fine_label_names": names, "coarse_label_names": [f"super_{i}" for i in range(20)]}
    )
    out["names"] = names
    return out


def _expected(images_u8: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(images_u8).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_cifar10_reads_fake_folder(tmp_path):
    ref = _write_fake_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=tmp_path, batch_size=8)
    assert dm.mean == (0.4914, 0.4822, 0.4465) and dm.std == (0.2023, 0.1994, 0.2010)
    dm.prepare_data()
    dm.setup()
    assert dm.class_names == ref["names"]
    assert len(dm.train_set) == 50 and len(dm.test_set) == 20
    assert dm.val_set is dm.test_set  # val_fraction=0 -> validate on the test set
    assert torch.equal(dm.train_targets, torch.from_numpy(ref["train_labels"]))
    want = _expected(ref["train_images"], dm.mean, dm.std)
    for i in (0, 17, 49):
        x, y = dm.train_set[i]
        torch.testing.assert_close(x, want[i])
        assert y == int(ref["train_labels"][i]) and isinstance(y, int)
    x, y = dm.test_set[5]
    torch.testing.assert_close(x, _expected(ref["test_images"], dm.mean, dm.std)[5])
    assert y == 5
    c = 3
    torch.testing.assert_close(dm.class_images(c), want[ref["train_labels"] == c])
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (8, 3, 32, 32) and yb.dtype == torch.long


def test_cifar10_matches_torchvision_reader(tmp_path, monkeypatch):
    """torchvision's own CIFAR10 (MD5 checks disabled: the fake files are not the official ones) agrees."""
    import torchvision.datasets.cifar as tv_cifar

    _write_fake_cifar10(tmp_path)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    tv = tv_cifar.CIFAR10(str(tmp_path), train=True, download=False)
    dm = CIFAR10DataModule(root=str(tmp_path))
    dm.setup()
    assert dm.class_names == tv.classes
    assert dm.train_targets.tolist() == tv.targets
    tv_images = torch.from_numpy(tv.data).permute(0, 3, 1, 2)  # HWC -> CHW
    torch.testing.assert_close(dm.class_images(7), dm.normalize(tv_images[dm.class_indices(7)].float() / 255))


def test_cifar10_val_split_and_augment(tmp_path):
    ref = _write_fake_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=tmp_path, val_fraction=0.2, augment=True, seed=1)
    dm.setup()
    assert len(dm.train_set) == 40 and len(dm.val_set) == 10 and len(dm.test_set) == 20
    assert torch.bincount(dm.train_targets, minlength=10).tolist() == [4] * 10  # stratified
    val_labels = sorted(dm.val_set[i][1] for i in range(10))
    assert val_labels == list(range(10))
    # the split is seeded
    other = CIFAR10DataModule(root=tmp_path, val_fraction=0.2, seed=1)
    other.setup()
    assert torch.equal(other.train_targets, dm.train_targets)
    assert torch.equal(other.class_images(2), dm.class_images(2))
    # training items are augmented (crop+flip differ between draws), class_images and val/test never are
    torch.manual_seed(0)
    draws = torch.stack([dm.train_set[0][0] for _ in range(20)])
    assert not torch.all(draws == draws[0])
    plain = dm.class_images(dm.train_targets[0].item())[0]
    assert not torch.all(draws == plain)  # at least one draw differs from the un-augmented image
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])
    all_train = _expected(ref["train_images"], dm.mean, dm.std)
    for c in range(10):
        imgs = dm.class_images(c)
        assert imgs.shape == (4, 3, 32, 32)
        assert all(any(torch.allclose(img, ref_img) for ref_img in all_train) for img in imgs)


def test_cifar100_reads_fake_folder(tmp_path):
    ref = _write_fake_cifar100(tmp_path)
    dm = CIFAR100DataModule(root=tmp_path)
    assert (
        dm.num_classes == 100 and dm.mean == (0.5071, 0.4866, 0.4409) and dm.std == (0.2673, 0.2564, 0.2762)
    )
    dm.setup()
    assert dm.class_names == ref["names"]
    assert len(dm.train_set) == 200 and len(dm.test_set) == 100
    images, labels = ref["train"]
    assert dm.train_targets.tolist() == labels.tolist()
    torch.testing.assert_close(dm.class_images(42), _expected(images[labels == 42], dm.mean, dm.std))


@pytest.mark.parametrize(
    ("cls", "folder"), [(CIFAR10DataModule, "cifar-10-batches-py"), (CIFAR100DataModule, "cifar-100-python")]
)
def test_cifar_missing_folder_message(tmp_path, cls, folder):
    root = tmp_path / "nowhere"
    dm = cls(root=root)  # constructing does not touch the disk
    expected = str(root / folder)
    for hook in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError) as info:
            hook()
        message = str(info.value)
        assert f"'{expected}'" in message
        assert "extract" in message and "Nothing is downloaded" in message
    assert not root.exists()  # nothing was created or downloaded


def test_cifar_missing_file_message(tmp_path):
    _write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="missing: test_batch"):
        CIFAR10DataModule(root=tmp_path).setup()


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"root": 3}, TypeError, "`root` must be a str or pathlib.Path, got 3"),
        (
            {"root": "x", "val_fraction": -0.1},
            ValueError,
            r"`val_fraction` must be a fraction in \[0, 1\), got -0.1",
        ),
        ({"root": "x", "augment": 1}, TypeError, "`augment` must be a bool, got 1"),
        ({"root": "x", "batch_size": -4}, ValueError, "`batch_size` must be an int >= 1, got -4"),
    ],
)
def test_cifar_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        CIFAR10DataModule(**kwargs)


# ------------------------------------------------------------------------------------------------
# ImageFolderDataModule
# ------------------------------------------------------------------------------------------------
COLOURS = {
    "apple": [(200, 10, 10), (180, 40, 20), (220, 0, 30), (150, 60, 60)],
    "kiwi": [(20, 160, 20), (40, 200, 60), (10, 120, 0), (90, 180, 90)],
    "plum": [(90, 20, 150), (120, 40, 200), (60, 0, 100), (100, 30, 170)],
}


def _write_folder(root: Path, split: str, per_class: int, classes=COLOURS) -> None:
    from PIL import Image

    for name, colours in classes.items():
        (root / split / name).mkdir(parents=True)
        for i, colour in enumerate(colours[:per_class]):
            Image.new("RGB", (24, 20), colour).save(root / split / name / f"{i}.png")


@pytest.fixture
def folder_root(tmp_path) -> Path:
    _write_folder(tmp_path, "train", 4)
    _write_folder(tmp_path, "val", 2)
    return tmp_path


def test_image_folder_basics_and_computed_stats(folder_root):
    dm = ImageFolderDataModule(folder_root, image_size=16, batch_size=4)
    assert dm.num_classes == 3 and dm.class_names == ["apple", "kiwi", "plum"]  # before setup
    assert dm.image_shape == (3, 16, 16)
    with pytest.raises(RuntimeError, match="setup"):
        _ = dm.mean
    dm.setup()
    colours = torch.tensor([c for cs in COLOURS.values() for c in cs], dtype=torch.float64) / 255
    torch.testing.assert_close(torch.tensor(dm.mean, dtype=torch.float64), colours.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        torch.tensor(dm.std, dtype=torch.float64), colours.std(0, correction=0), atol=1e-6, rtol=0
    )
    assert len(dm.train_set) == 12 and len(dm.val_set) == 6
    assert dm.test_set is dm.val_set  # test_dir=None -> test on the val folder
    x = torch.stack([dm.train_set[i][0] for i in range(12)])
    assert x.shape == (12, 3, 16, 16)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-4, rtol=0)
    assert dm.train_targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    kiwi = dm.class_images(1)
    expected = dm.normalize(
        (torch.tensor(COLOURS["kiwi"], dtype=torch.float32) / 255).view(4, 3, 1, 1).expand(-1, -1, 16, 16)
    )
    torch.testing.assert_close(kiwi, expected, atol=1e-5, rtol=0)
    xb, yb = next(iter(dm.val_dataloader()))
    assert xb.shape == (4, 3, 16, 16) and yb.tolist() == [0, 0, 1, 1]


def test_image_folder_given_stats_grey_and_augment(folder_root):
    dm = ImageFolderDataModule(folder_root, image_size=8, channels=1, mean=[0.5], std=[0.25], augment=True)
    assert dm.mean == (0.5,) and dm.std == (0.25,)
    dm.setup()
    x, y = dm.train_set[0]
    assert x.shape == (1, 8, 8) and y == 0
    assert dm.class_images(0, n=2, generator=torch.Generator().manual_seed(0)).shape == (2, 1, 8, 8)
    plain = dm.class_images(0)
    # un-augmented images of solid colours are constant; augmented ones get zero padding at some draws
    assert torch.all(plain == plain[:, :, :1, :1])
    torch.manual_seed(0)
    assert any(not torch.all(dm.train_set[0][0] == plain[0]) for _ in range(20))


def test_image_folder_stats_subset_is_seeded(folder_root):
    a = ImageFolderDataModule(folder_root, stats_max_images=3, seed=5)
    b = ImageFolderDataModule(folder_root, stats_max_images=3, seed=5)
    c = ImageFolderDataModule(folder_root, stats_max_images=12)
    for dm in (a, b, c):
        dm.setup()
    assert a.mean == b.mean and a.std == b.std
    assert a.mean != c.mean


def test_image_folder_missing_folders(tmp_path, folder_root):
    missing = tmp_path / "absent"
    dm = ImageFolderDataModule(missing)
    with pytest.raises(FileNotFoundError, match=f"'{missing / 'train'}'"):
        _ = dm.num_classes
    with pytest.raises(FileNotFoundError, match=f"'{missing / 'train'}'"):
        dm.setup()
    dm = ImageFolderDataModule(folder_root, test_dir="test")
    with pytest.raises(FileNotFoundError, match=f"'{folder_root / 'test'}'"):
        dm.prepare_data()
    with pytest.raises(FileNotFoundError, match=f"'{folder_root / 'test'}'"):
        dm.setup()


def test_image_folder_class_mismatch(tmp_path):
    _write_folder(tmp_path, "train", 2)
    _write_folder(tmp_path, "val", 2, classes={"apple": COLOURS["apple"], "kiwi": COLOURS["kiwi"]})
    with pytest.raises(ValueError, match="differ from those of the training folder"):
        ImageFolderDataModule(tmp_path).setup()


def test_image_folder_val_none_uses_test(tmp_path):
    _write_folder(tmp_path, "train", 2)
    _write_folder(tmp_path, "test", 1)
    dm = ImageFolderDataModule(tmp_path, val_dir=None, test_dir="test", image_size=4)
    dm.setup()
    assert dm.val_set is dm.test_set and len(dm.test_set) == 3


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"val_dir": None}, ValueError, "`val_dir` and `test_dir` are both None"),
        ({"mean": [0.5, 0.5, 0.5]}, ValueError, "give both `mean` and `std` or neither"),
        ({"mean": [0.5], "std": [0.2]}, ValueError, r"`mean` must have one float per channel \(3\)"),
        ({"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}, ValueError, "`std` must be positive finite floats"),
        ({"channels": 4}, ValueError, r"`channels` must be one of \(1, 3\), got 4"),
        ({"image_size": 0}, ValueError, "`image_size` must be an int >= 1, got 0"),
        ({"train_dir": ""}, TypeError, "`train_dir` must be a non-empty str, got ''"),
        ({"stats_max_images": 0}, ValueError, "`stats_max_images` must be an int >= 1, got 0"),
    ],
)
def test_image_folder_bad_arguments(tmp_path, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        ImageFolderDataModule(tmp_path, **kwargs)
