"""Image transforms (torchvision.transforms.v2) and dataset wrappers for the BiSSL app.

All transforms take a ``torch.uint8`` image (C, H, W) and return a float32 normalised tensor
(C, image_size, image_size). Randomness comes from torch's global RNG (seed it, or the DataLoader
worker seeds, for reproducibility).

Public names: :func:`simclr_views`, :func:`downstream_transforms`, :func:`blur_kernel_size`,
:func:`normalization_stats`, :data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`, :class:`TwoViewDataset`,
:class:`TransformedDataset`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .data import get_spec

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TransformedDataset",
    "TwoViewDataset",
    "blur_kernel_size",
    "downstream_transforms",
    "normalization_stats",
    "simclr_views",
]

Transform = Callable[[Tensor], Tensor]

IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)

# Greyscale datasets: per-pixel mean/std of the uint8 images / 255 (digits: all 1,797 images after
# the 0..16 -> 0..255 scaling in bissl.data; fashion-mnist: the 60,000 training images).
_GREYSCALE_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3053,), (0.3759,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}

_ASPECT_RATIO_QUIRK = (0.5, 1.0)  # the released code passes its "min ratio 0.5" as aspect ratio
_DEFAULT_ASPECT_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision's default
_INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


def normalization_stats(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` to normalise ``dataset``'s images scaled to [0, 1].

    ImageNet statistics for RGB datasets (as the reference), the dataset's own for greyscale ones.
    """
    spec = get_spec(dataset)
    if spec.name in _GREYSCALE_STATS:
        return _GREYSCALE_STATS[spec.name]
    if spec.in_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    raise ValueError(f"no normalisation statistics recorded for greyscale dataset {dataset!r}")


def blur_kernel_size(image_size: int) -> int:
    """Gaussian-blur kernel: about 10% of the image side, odd, at least 3 (96 px -> 9)."""
    k = int(0.1 * image_size)
    return max(3, k if k % 2 == 1 else k + 1)


def _check_common(
    image_size: int, in_channels: int, mean: Sequence[float], std: Sequence[float]
) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive int, e.g. 32")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels={in_channels!r} must be 1 (greyscale) or 3 (RGB)")
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(
            f"mean={tuple(mean)} and std={tuple(std)} must have in_channels={in_channels} entries; "
            "use normalization_stats(dataset)"
        )
    if any(s <= 0 for s in std):
        raise ValueError(f"std={tuple(std)} must be positive")


def _to_normalised_float(mean: Sequence[float], std: Sequence[float]) -> list[Any]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def simclr_views(
    image_size: int,
    *,
    in_channels: int,
    aspect_ratio_quirk: bool,
    scale: tuple[float, float] = (0.08, 1.0),
    blur: bool = True,
    hflip: bool = True,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[Transform, Transform]:
    """The reference's asymmetric pair of SimCLR view transforms.

    Both views: RandomResizedCrop (bicubic), horizontal flip p=0.5, ColorJitter(0.4, 0.4, 0.2, 0.1)
    p=0.8, grayscale p=0.2. View 1 adds Gaussian blur p=1.0; view 2 blur p=0.1 then solarize
    (threshold 128 of 255) p=0.2. Blur sigma is drawn from [0.1, 2.0], kernel
    :func:`blur_kernel_size`. Greyscale inputs (``in_channels=1``) only get brightness/contrast
    jitter and no grayscale op.

    Args:
        image_size: output side length.
        in_channels: 1 or 3, channels of the input and output.
        aspect_ratio_quirk: crop aspect ratio (0.5, 1.0) as the released code; else (3/4, 4/3).
        scale: RandomResizedCrop area range.
        blur: False drops the Gaussian blur from both views (e.g. for tiny images).
        hflip: False drops the horizontal flip (for data whose mirror image is another class,
            such as digits).
        mean, std: per-channel normalisation, see :func:`normalization_stats`.

    Returns:
        ``(view1, view2)``: callables uint8 (C, H, W) -> float32 (C, image_size, image_size).
    """
    _check_common(image_size, in_channels, mean, std)
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"scale={scale!r} must satisfy 0 < min <= max <= 1, e.g. (0.08, 1.0)")
    ratio = _ASPECT_RATIO_QUIRK if aspect_ratio_quirk else _DEFAULT_ASPECT_RATIO
    if in_channels == 3:
        color: list[Any] = [
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
    else:
        color = [v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8)]
    common: list[Any] = [
        v2.RandomResizedCrop(
            image_size,
            scale=scale,
            ratio=ratio,
            interpolation=v2.InterpolationMode.BICUBIC,
            antialias=True,
        ),
        *([v2.RandomHorizontalFlip(p=0.5)] if hflip else []),
        *color,
    ]
    kernel = blur_kernel_size(image_size)

    def blur_op(p: float) -> list[Any]:
        if not blur:
            return []
        return [v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=p)]

    view1 = v2.Compose([*common, *blur_op(1.0), *_to_normalised_float(mean, std)])
    view2 = v2.Compose(
        [
            *common,
            *blur_op(0.1),
            v2.RandomSolarize(threshold=128, p=0.2),
            *_to_normalised_float(mean, std),
        ]
    )
    return view1, view2


def downstream_transforms(
    image_size: int,
    *,
    in_channels: int,
    aspect_ratio_quirk: bool,
    mean: Sequence[float],
    std: Sequence[float],
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True,
    interpolation: Literal["bilinear", "bicubic"] = "bilinear",
) -> tuple[Transform, Transform]:
    """Fine-tuning transforms of the reference.

    Train: RandomResizedCrop(image_size) (aspect ratio as in :func:`simclr_views`) and
    horizontal flip p=0.5. Test: Resize(round(image_size * 109 / 96)) of the shorter side, then
    CenterCrop(image_size) (96 px -> Resize(109) + CenterCrop(96)). ``hflip=False`` drops the flip.
    Crop and resize use ``interpolation`` (the released code: bicubic).

    Returns:
        ``(train_tf, test_tf)``: uint8 (C, H, W) -> float32 (C, image_size, image_size).
    """
    _check_common(image_size, in_channels, mean, std)
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"scale={scale!r} must satisfy 0 < min <= max <= 1, e.g. (0.08, 1.0)")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} must be one of {sorted(_INTERPOLATIONS)}")
    mode = _INTERPOLATIONS[interpolation]
    ratio = _ASPECT_RATIO_QUIRK if aspect_ratio_quirk else _DEFAULT_ASPECT_RATIO
    train_tf = v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=scale, ratio=ratio, interpolation=mode, antialias=True),
            *([v2.RandomHorizontalFlip(p=0.5)] if hflip else []),
            *_to_normalised_float(mean, std),
        ]
    )
    test_tf = v2.Compose(
        [
            v2.Resize(round(image_size * 109 / 96), interpolation=mode, antialias=True),
            v2.CenterCrop(image_size),
            *_to_normalised_float(mean, std),
        ]
    )
    return train_tf, test_tf


class TwoViewDataset(Dataset):
    """Pairs of augmented views of ``base``'s images: item ``i`` is ``(view1(img), view2(img))``."""

    def __init__(self, base: Dataset, view1: Transform, view2: Transform) -> None:
        self.base = base
        self.view1 = view1
        self.view2 = view2

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.base[index][0]
        return self.view1(image), self.view2(image)


class TransformedDataset(Dataset):
    """``base`` with a transform on the image: item ``i`` is ``(tf(img), label)``."""

    def __init__(self, base: Dataset, tf: Transform) -> None:
        self.base = base
        self.tf = tf

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.base[index]
        return self.tf(image), label
