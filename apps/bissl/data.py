"""Dataset registry and split loading for the BiSSL app (offline only: nothing is downloaded).

Every split is a map-style dataset whose items are ``(image, label)``: ``image`` a ``torch.uint8``
tensor (C, H, W) at the dataset's native size (transforms do any resizing), ``label`` an ``int``
(``-1`` for the ``"unlabeled"`` split).

Split rules:

- ``"train"`` / ``"val"``: the official val split where the dataset has one; otherwise ``"val"`` is a
  seeded random ``val_fraction`` of the official train split and ``"train"`` is the rest. The
  returned :class:`torch.utils.data.Subset` records the chosen indices in ``.indices``.
- ``"test"``: the official test split; datasets without one (``digits``, ``caltech101``,
  ``sun397``) hold out a fixed ``TEST_FRACTION`` of all images with seed ``TEST_SEED``, independent
  of the run's ``seed``, so every run is scored on the same images.
- ``"unlabeled"``: STL10's official unlabeled split; for other datasets, the ``"train"`` images
  (val excluded) with labels replaced by ``-1``.

Public names: :class:`DatasetSpec`, :data:`DATASETS`, :func:`get_spec`, :func:`load_split`,
:func:`split_indices`, :class:`DatasetNotFoundError`, :class:`UnknownDatasetError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision.transforms.v2.functional import pil_to_tensor

__all__ = [
    "DATASETS",
    "TEST_FRACTION",
    "TEST_SEED",
    "DatasetNotFoundError",
    "DatasetSpec",
    "Split",
    "UnknownDatasetError",
    "get_spec",
    "load_split",
    "split_indices",
]

Split = Literal["train", "val", "test", "unlabeled"]
_SPLITS: tuple[str, ...] = get_args(Split)

TEST_FRACTION = 0.2
"""Share of all images held out as the test split for datasets without an official one."""
TEST_SEED = 0
"""Seed of that held-out test split (fixed: independent of the run seed)."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says where they were looked for and what to put there."""


class UnknownDatasetError(ValueError):
    """A dataset name is not in :data:`DATASETS`; the message lists the valid names."""


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about one dataset.

    Attributes:
        name: registry key, e.g. ``"fashion-mnist"``.
        num_classes: number of classes.
        in_channels: 1 (greyscale) or 3 (RGB).
        native_size: side length of the stored images, or ``None`` when sizes vary.
        has_official_val: the dataset ships a val split (``val_fraction`` is then ignored).
        has_unlabeled: the dataset ships an unlabeled split (STL10).
        has_official_test: the dataset ships a test split (else see ``TEST_FRACTION``).
        needs_root: the files must be supplied in a local ``root`` folder.
        folder: path under ``root`` where the files must be (``""`` if no root is needed).
        how_to_install: what to put into ``folder`` (``ROOT`` stands for the root folder).
    """

    name: str
    num_classes: int
    in_channels: int
    native_size: int | None
    has_official_val: bool = False
    has_unlabeled: bool = False
    has_official_test: bool = True
    needs_root: bool = True
    folder: str = ""
    how_to_install: str = ""


_FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"

_SPECS = (
    DatasetSpec(
        name="digits",
        num_classes=10,
        in_channels=1,
        native_size=8,
        has_official_test=False,
        needs_root=False,
    ),
    DatasetSpec(
        name="fashion-mnist",
        num_classes=10,
        in_channels=1,
        native_size=28,
        folder="FashionMNIST/raw",
        how_to_install=(
            "gunzip "
            + " ".join(f + ".gz" for f in _FASHION_FILES)
            + " into ROOT/FashionMNIST/raw/ "
            "(the Debian package dataset-fashion-mnist ships these .gz files in "
            f"{_DEBIAN_FASHION_DIR}/)"
        ),
    ),
    DatasetSpec(
        name="stl10",
        num_classes=10,
        in_channels=3,
        native_size=96,
        has_unlabeled=True,
        folder="stl10_binary",
        how_to_install=(
            "extract stl10_binary.tar.gz so that ROOT/stl10_binary/ holds train_X.bin, train_y.bin, "
            "test_X.bin, test_y.bin, unlabeled_X.bin, class_names.txt and fold_indices.txt"
        ),
    ),
    DatasetSpec(
        name="cifar10",
        num_classes=10,
        in_channels=3,
        native_size=32,
        folder="cifar-10-batches-py",
        how_to_install=(
            "extract cifar-10-python.tar.gz so that ROOT/cifar-10-batches-py/ holds "
            "data_batch_1 ... data_batch_5, test_batch and batches.meta"
        ),
    ),
    DatasetSpec(
        name="cifar100",
        num_classes=100,
        in_channels=3,
        native_size=32,
        folder="cifar-100-python",
        how_to_install=(
            "extract cifar-100-python.tar.gz so that ROOT/cifar-100-python/ holds train, test and meta"
        ),
    ),
    DatasetSpec(
        name="food101",
        num_classes=101,
        in_channels=3,
        native_size=None,
        folder="food-101",
        how_to_install="extract food-101.tar.gz so that ROOT/food-101/ holds images/ and meta/",
    ),
    DatasetSpec(
        name="dtd",
        num_classes=47,
        in_channels=3,
        native_size=None,
        has_official_val=True,
        folder="dtd/dtd",
        how_to_install=(
            "extract dtd-r1.0.1.tar.gz into ROOT/dtd/ so that ROOT/dtd/dtd/ holds images/ and labels/"
        ),
    ),
    DatasetSpec(
        name="oxford-pets",
        num_classes=37,
        in_channels=3,
        native_size=None,
        folder="oxford-iiit-pet",
        how_to_install=(
            "extract images.tar.gz and annotations.tar.gz into ROOT/oxford-iiit-pet/ "
            "(giving images/ and annotations/)"
        ),
    ),
    DatasetSpec(
        name="flowers102",
        num_classes=102,
        in_channels=3,
        native_size=None,
        has_official_val=True,
        folder="flowers-102",
        how_to_install=(
            "extract 102flowers.tgz into ROOT/flowers-102/ (giving jpg/) and put imagelabels.mat and "
            "setid.mat beside it"
        ),
    ),
    DatasetSpec(
        name="fgvc-aircraft",
        num_classes=100,
        in_channels=3,
        native_size=None,
        has_official_val=True,
        folder="fgvc-aircraft-2013b",
        how_to_install=(
            "extract fgvc-aircraft-2013b.tar.gz so that ROOT/fgvc-aircraft-2013b/ holds data/"
        ),
    ),
    DatasetSpec(
        name="caltech101",
        num_classes=101,
        in_channels=3,
        native_size=None,
        has_official_test=False,
        folder="caltech101/101_ObjectCategories",
        how_to_install=(
            "extract 101_ObjectCategories.tar.gz and Annotations.tar into ROOT/caltech101/"
        ),
    ),
    DatasetSpec(
        name="sun397",
        num_classes=397,
        in_channels=3,
        native_size=None,
        has_official_test=False,
        folder="SUN397",
        how_to_install=(
            "extract SUN397.tar.gz so that ROOT/SUN397/ holds ClassName.txt and the class folders"
        ),
    ),
    DatasetSpec(
        name="stanford-cars",
        num_classes=196,
        in_channels=3,
        native_size=None,
        folder="stanford_cars",
        how_to_install=(
            "put the Stanford Cars files in ROOT/stanford_cars/: devkit/, cars_train/, cars_test/ "
            "and cars_test_annos_withlabels.mat (torchvision cannot download them)"
        ),
    ),
)

DATASETS: Mapping[str, DatasetSpec] = MappingProxyType({s.name: s for s in _SPECS})
"""Registry of supported datasets, keyed by name."""

_NOT_SUPPORTED = {
    "voc2007": "it is multi-label (scored by 11-point mAP), which this (image, int label) loader does not model",
    "cub2011": "torchvision has no loader for it",
}


def get_spec(name: str) -> DatasetSpec:
    """Return the :class:`DatasetSpec` of ``name``; raise :class:`UnknownDatasetError` if unknown."""
    if name in DATASETS:
        return DATASETS[name]
    reason = f" ({name} is not supported: {_NOT_SUPPORTED[name]})" if name in _NOT_SUPPORTED else ""
    raise UnknownDatasetError(
        f"unknown dataset {name!r}{reason}; valid names: {', '.join(sorted(DATASETS))}"
    )


def split_indices(num_items: int, val_fraction: float, seed: int, *,
                  val_size: int | None = None) -> tuple[list[int], list[int]]:
    """Seeded random split of ``range(num_items)`` into (train, val) index lists, each sorted.

    ``val_size`` items go to val when given, else ``round(num_items * val_fraction)`` (at least 1
    when ``val_fraction > 0``).

    Args:
        num_items: number of items to split.
        val_fraction: share for val, in [0, 1) (ignored when ``val_size`` is given).
        seed: seed of the permutation (a private ``torch.Generator``).
        val_size: number of items for val, in [1, num_items).

    Returns:
        ``(train_indices, val_indices)``, disjoint, covering ``range(num_items)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be in [0, 1), e.g. 0.1")
    n_val = round(num_items * val_fraction)
    if val_fraction > 0:
        n_val = max(n_val, 1)
    if val_size is not None:
        if not 1 <= val_size < num_items:
            raise ValueError(f"val_size={val_size!r} must be in [1, {num_items}) for {num_items} items; "
                             f"e.g. {max(num_items // 5, 1)}")
        n_val = val_size
    if n_val >= num_items and num_items > 0:
        raise ValueError(
            f"val_fraction={val_fraction} leaves no training items out of {num_items}; lower it"
        )
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_items, generator=generator).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


class _ImageTensorDataset(Dataset):
    """In-memory images (N, C, H, W) uint8 with labels (N,)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(
                f"images must be uint8 (N, C, H, W) matching labels, got {images.dtype} "
                f"{tuple(images.shape)} and {len(labels)} labels"
            )
        self.images = images
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


class _PILDataset(Dataset):
    """Wraps a torchvision dataset yielding (PIL image, int): converts to uint8 (C, H, W)."""

    def __init__(self, base: Any, mode: Literal["L", "RGB"]) -> None:
        self.base = base
        self.mode = mode

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.base[index]
        return pil_to_tensor(image.convert(self.mode)), int(label)


class _Unlabeled(Dataset):
    """Items of ``base`` with the label replaced by -1."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.base[index][0], -1


# --- per-dataset loaders: (root, official split) -> dataset; split "all" when there is no test set.


def _load_digits(root: Path | None, split: str) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
    return _ImageTensorDataset(
        torch.from_numpy(images).unsqueeze(1), torch.as_tensor(bunch.target, dtype=torch.int64)
    )


def _load_fashion_mnist(root: Path, split: str) -> Dataset:
    from torchvision.datasets import FashionMNIST

    base = FashionMNIST(str(root), train=split == "train", download=False)
    return _ImageTensorDataset(base.data.unsqueeze(1).contiguous(), base.targets)


def _load_stl10(root: Path, split: str) -> Dataset:
    from torchvision.datasets import STL10

    base = STL10(str(root), split=split, download=False)
    return _ImageTensorDataset(torch.from_numpy(base.data), torch.from_numpy(base.labels))


def _cifar_loader(cls_name: str) -> Callable[[Path, str], Dataset]:
    def load(root: Path, split: str) -> Dataset:
        import torchvision.datasets

        base = getattr(torchvision.datasets, cls_name)(
            str(root), train=split == "train", download=False
        )
        images = torch.from_numpy(base.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        return _ImageTensorDataset(images, torch.as_tensor(base.targets))

    return load


def _pil_loader(
    cls_name: str, split_names: Mapping[str, str] | None, **kwargs: Any
) -> Callable[[Path, str], Dataset]:
    def load(root: Path, split: str) -> Dataset:
        import torchvision.datasets

        cls = getattr(torchvision.datasets, cls_name)
        split_kw = {} if split_names is None else {"split": split_names[split]}
        return _PILDataset(cls(str(root), download=False, **split_kw, **kwargs), "RGB")

    return load


_IDENTITY_SPLITS = {"train": "train", "val": "val", "test": "test"}

_LOADERS: Mapping[str, Callable[[Any, str], Dataset]] = {
    "digits": _load_digits,
    "fashion-mnist": _load_fashion_mnist,
    "stl10": _load_stl10,
    "cifar10": _cifar_loader("CIFAR10"),
    "cifar100": _cifar_loader("CIFAR100"),
    "food101": _pil_loader("Food101", _IDENTITY_SPLITS),
    "dtd": _pil_loader("DTD", _IDENTITY_SPLITS, partition=1),
    "oxford-pets": _pil_loader(
        "OxfordIIITPet", {"train": "trainval", "test": "test"}, target_types="category"
    ),
    "flowers102": _pil_loader("Flowers102", _IDENTITY_SPLITS),
    "fgvc-aircraft": _pil_loader("FGVCAircraft", _IDENTITY_SPLITS, annotation_level="variant"),
    "caltech101": _pil_loader("Caltech101", None, target_type="category"),
    "sun397": _pil_loader("SUN397", None),
    "stanford-cars": _pil_loader("StanfordCars", _IDENTITY_SPLITS),
}


def _missing_files_message(spec: DatasetSpec, root: Path) -> str | None:
    """Describe what is missing under ``root`` for ``spec``, or None if the folder looks complete."""
    folder = root / spec.folder
    if spec.name == "fashion-mnist":
        missing = [f for f in _FASHION_FILES if not (folder / f).is_file()]
        if not missing:
            return None
        zipped = [f for f in missing if (folder / (f + ".gz")).is_file()]
        found = (
            f" ({', '.join(f + '.gz' for f in zipped)} found there but not unzipped)"
            if zipped
            else ""
        )
        return f"missing {', '.join(missing)} in {folder}{found}"
    if not folder.is_dir():
        return f"folder {folder} does not exist"
    return None


def _open_official(spec: DatasetSpec, root: str | Path | None, split: str) -> Dataset:
    """Load one official split (or ``"all"``), turning missing files into DatasetNotFoundError."""
    if not spec.needs_root:
        return _LOADERS[spec.name](None, split)
    fix = (
        f"To fix: {spec.how_to_install}, then pass ROOT as the data root (--data-root / data.root)."
    )
    if root is None:
        raise DatasetNotFoundError(
            f"dataset {spec.name!r} is read from local files but root=None. {fix}"
        )
    root_path = Path(root).expanduser()
    problem = _missing_files_message(spec, root_path)
    if problem is not None:
        raise DatasetNotFoundError(
            f"dataset {spec.name!r} not found under root {str(root_path)!r}: {problem}. {fix}"
        )
    try:
        return _LOADERS[spec.name](root_path, split)
    except (RuntimeError, AssertionError, EOFError, OSError) as err:  # torchvision's own checks
        raise DatasetNotFoundError(
            f"dataset {spec.name!r} under root {str(root_path)!r} is incomplete or corrupted "
            f"(torchvision: {type(err).__name__}: {err}). {fix}"
        ) from err


def _train_pool(spec: DatasetSpec, root: str | Path | None) -> tuple[Dataset, list[int]]:
    """The official train split (or the non-test part of all images) and its indices."""
    if spec.has_official_test:
        full = _open_official(spec, root, "train")
        return full, list(range(len(full)))  # type: ignore[arg-type]
    full = _open_official(spec, root, "all")
    pool, _ = split_indices(len(full), TEST_FRACTION, TEST_SEED)  # type: ignore[arg-type]
    return full, pool


def labels_of(dataset: Dataset) -> list[int]:
    """The integer labels of ``dataset``, read without decoding images where the loader allows."""
    if isinstance(dataset, Subset):
        inner = labels_of(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if isinstance(dataset, _ImageTensorDataset):
        return [int(v) for v in dataset.labels.tolist()]
    if isinstance(dataset, _PILDataset) and hasattr(dataset.base, "targets"):
        return [int(v) for v in torch.as_tensor(dataset.base.targets).tolist()]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]


def balanced_subset(dataset: Dataset, per_class: int, seed: int, *, field: str) -> Subset:
    """``per_class`` items of every class, drawn with ``seed`` (a label-scarce, class-balanced set).

    Raises:
        ValueError: a class has fewer than ``per_class`` items (naming ``field``).
    """
    labels = labels_of(dataset)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    smallest = min(len(v) for v in by_class.values())
    if per_class > smallest:
        raise ValueError(f"{field}: got {per_class}, but a class has only {smallest} items in this split. "
                         f"Fix: --set {field}={smallest}")
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for y in sorted(by_class):
        idx = by_class[y]
        chosen += [idx[int(j)] for j in torch.randperm(len(idx), generator=generator)[:per_class]]
    return Subset(dataset, sorted(chosen))


def load_split(
    name: str,
    split: Split,
    *,
    root: str | Path | None,
    val_fraction: float,
    seed: int,
    val_size: int | None = None,
) -> Dataset:
    """Load one split of a registered dataset (see the module docstring for the split rules).

    Args:
        name: key of :data:`DATASETS`, e.g. ``"digits"``.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"unlabeled"``.
        root: folder holding the dataset files (unused by ``"digits"``).
        val_fraction: share of the official train split held out as val, in [0, 1); must be > 0
            to ask for ``"val"`` of a dataset without an official val split.
        seed: seed of that train/val split.
        val_size: number of images held out as val instead of the ``val_fraction`` share.

    Returns:
        A dataset of ``(uint8 image (C, H, W), int label)``; a ``Subset`` (with ``.indices``)
        whenever items were selected from a larger official split.

    Raises:
        UnknownDatasetError: ``name`` is not registered.
        DatasetNotFoundError: the files are missing under ``root`` (or ``root`` is None).
        ValueError: bad ``split`` or ``val_fraction``.

    Example:
        >>> ds = load_split("digits", "train", root=None, val_fraction=0.1, seed=0)
        >>> ds[0][0].shape, ds[0][0].dtype
        (torch.Size([1, 8, 8]), torch.uint8)
    """
    spec = get_spec(name)
    if split not in _SPLITS:
        raise ValueError(f"split={split!r} is not valid; use one of {list(_SPLITS)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r} must be an int")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be in [0, 1), e.g. 0.1")

    if split == "unlabeled":
        if spec.has_unlabeled:
            return _open_official(spec, root, "unlabeled")
        train = load_split(name, "train", root=root, val_fraction=val_fraction, seed=seed, val_size=val_size)
        return _Unlabeled(train)
    if split == "test":
        if spec.has_official_test:
            return _open_official(spec, root, "test")
        full = _open_official(spec, root, "all")
        _, test_idx = split_indices(len(full), TEST_FRACTION, TEST_SEED)  # type: ignore[arg-type]
        return Subset(full, test_idx)
    if spec.has_official_val and split in ("train", "val"):
        return _open_official(spec, root, split)
    if split == "val" and val_fraction == 0 and val_size is None:
        raise ValueError(
            f"dataset {name!r} has no official val split and val_fraction=0; "
            "set val_fraction > 0 (e.g. 0.1) to hold out a val split"
        )

    full, pool = _train_pool(spec, root)
    train_pos, val_pos = split_indices(len(pool), val_fraction, seed, val_size=val_size)
    positions = val_pos if split == "val" else train_pos
    return Subset(full, [pool[i] for i in positions])
