"""Dataset registry and splits: digits split sizes/disjointness, error messages, fashion-mnist."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from bissl.data import (
    DATASETS,
    TEST_FRACTION,
    DatasetNotFoundError,
    UnknownDatasetError,
    load_split,
    split_indices,
)
from sklearn.datasets import load_digits

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _image_keys(ds) -> set[bytes]:
    return {ds[i][0].numpy().tobytes() + bytes([ds[i][1] % 256]) for i in range(len(ds))}


def test_registry_has_required_datasets() -> None:
    for name in ("digits", "fashion-mnist", "stl10", "cifar10", "cifar100"):
        assert name in DATASETS
    assert DATASETS["digits"].needs_root is False and DATASETS["digits"].in_channels == 1
    assert DATASETS["stl10"].has_unlabeled and DATASETS["stl10"].native_size == 96
    assert DATASETS["cifar100"].num_classes == 100


def test_digits_split_sizes_disjoint_and_seeded() -> None:
    n_all = len(load_digits().target)  # 1797
    n_test = round(n_all * TEST_FRACTION)
    n_val = round((n_all - n_test) * 0.1)
    splits = {
        s: load_split("digits", s, root=None, val_fraction=0.1, seed=1)
        for s in ("train", "val", "test")
    }
    assert {s: len(d) for s, d in splits.items()} == {
        "train": n_all - n_test - n_val,
        "val": n_val,
        "test": n_test,
    }
    idx = {s: set(d.indices) for s, d in splits.items()}
    assert (
        not idx["train"] & idx["val"]
        and not idx["train"] & idx["test"]
        and not idx["val"] & idx["test"]
    )
    assert idx["train"] | idx["val"] | idx["test"] == set(range(n_all))

    again = load_split("digits", "val", root=None, val_fraction=0.1, seed=1)
    other = load_split("digits", "val", root=None, val_fraction=0.1, seed=2)
    assert again.indices == splits["val"].indices
    assert other.indices != splits["val"].indices
    # the test split does not depend on the run seed
    assert (
        load_split("digits", "test", root=None, val_fraction=0.2, seed=7).indices
        == splits["test"].indices
    )


def test_digits_items_match_sklearn() -> None:
    bunch = load_digits()
    ds = load_split("digits", "train", root=None, val_fraction=0.1, seed=0)
    image, label = ds[5]
    j = ds.indices[5]
    assert image.dtype == torch.uint8 and image.shape == (1, 8, 8)
    assert isinstance(label, int) and label == int(bunch.target[j])
    expected = np.rint(bunch.images[j] / 16 * 255)
    assert np.array_equal(image[0].numpy(), expected)


def test_unlabeled_is_train_without_labels() -> None:
    train = load_split("digits", "train", root=None, val_fraction=0.1, seed=3)
    unl = load_split("digits", "unlabeled", root=None, val_fraction=0.1, seed=3)
    assert len(unl) == len(train)
    assert all(unl[i][1] == -1 for i in range(0, len(unl), 97))
    assert torch.equal(unl[10][0], train[10][0])


def test_split_indices_validation_and_cover() -> None:
    tr, va = split_indices(10, 0.25, seed=0)
    assert len(va) == 2 and sorted(tr + va) == list(range(10))
    assert split_indices(10, 0.0, seed=0) == (list(range(10)), [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, 1.0, seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        load_split("digits", "val", root=None, val_fraction=0.0, seed=0)
    with pytest.raises(ValueError, match="split"):
        load_split("digits", "validation", root=None, val_fraction=0.1, seed=0)


def test_unknown_dataset_names_valid_ones() -> None:
    with pytest.raises(UnknownDatasetError, match="digits") as info:
        load_split("mnistt", "train", root=None, val_fraction=0.1, seed=0)
    assert isinstance(info.value, ValueError)
    assert "fashion-mnist" in str(info.value) and "'mnistt'" in str(info.value)


def test_missing_root_gives_documented_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_split("fashion-mnist", "train", root=tmp_path, val_fraction=0.1, seed=0)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "fashion-mnist" in msg and str(tmp_path / "FashionMNIST" / "raw") in msg
    assert (
        "gunzip" in msg and "train-images-idx3-ubyte.gz" in msg and "dataset-fashion-mnist" in msg
    )
    assert not (tmp_path / "FashionMNIST").exists()  # nothing was created

    # .gz files present but not unzipped: the message says so
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError, match="found there but not unzipped"):
        load_split("fashion-mnist", "test", root=tmp_path, val_fraction=0.1, seed=0)

    with pytest.raises(DatasetNotFoundError, match="root=None"):
        load_split("cifar10", "train", root=None, val_fraction=0.1, seed=0)
    with pytest.raises(DatasetNotFoundError, match="stl10_binary"):
        load_split("stl10", "unlabeled", root=tmp_path, val_fraction=0.1, seed=0)
    with pytest.raises(DatasetNotFoundError, match="caltech101"):
        load_split("caltech101", "test", root=tmp_path, val_fraction=0.1, seed=0)
    assert not (tmp_path / "caltech101").exists()


def test_corrupt_files_are_reported(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in FASHION_FILES:
        (raw / f).write_bytes(b"\x00" * 16)
    with pytest.raises(DatasetNotFoundError, match="incomplete or corrupted"):
        load_split("fashion-mnist", "train", root=tmp_path, val_fraction=0.1, seed=0)


@pytest.mark.skipif(
    not all((DEBIAN_FASHION / (f + ".gz")).is_file() for f in FASHION_FILES),
    reason="Fashion-MNIST files absent (apt-get install dataset-fashion-mnist puts them in /usr/share/datasets/fashion-mnist)",
)
def test_fashion_mnist_real_files(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in FASHION_FILES:
        with gzip.open(DEBIAN_FASHION / (f + ".gz"), "rb") as src, open(raw / f, "wb") as dst:
            shutil.copyfileobj(src, dst)
    train = load_split("fashion-mnist", "train", root=tmp_path, val_fraction=0.1, seed=0)
    val = load_split("fashion-mnist", "val", root=tmp_path, val_fraction=0.1, seed=0)
    test = load_split("fashion-mnist", "test", root=tmp_path, val_fraction=0.1, seed=0)
    assert (len(train), len(val), len(test)) == (54_000, 6_000, 10_000)
    image, label = test[0]
    assert image.dtype == torch.uint8 and image.shape == (1, 28, 28) and isinstance(label, int)
    # first test item read independently from the idx files: label byte 8, image bytes 16..
    with open(raw / "t10k-labels-idx1-ubyte", "rb") as f:
        assert label == f.read()[8]
    with open(raw / "t10k-images-idx3-ubyte", "rb") as f:
        first = np.frombuffer(f.read()[16 : 16 + 784], dtype=np.uint8).reshape(28, 28)
    assert np.array_equal(image[0].numpy(), first)
