"""Augmentations: output shapes/dtypes, the aspect-ratio quirk, normalisation constants."""

from __future__ import annotations

import pytest
import torch
from bissl.augment import (
    IMAGENET_MEAN,
    TransformedDataset,
    TwoViewDataset,
    blur_kernel_size,
    downstream_transforms,
    normalization_stats,
    simclr_views,
)
from bissl.data import load_split
from torchvision.transforms import v2


def _ops(tf) -> list:
    """All transforms inside ``tf``, walking Compose/RandomApply containers."""
    inner = getattr(tf, "transforms", None)
    return [tf] if inner is None else [op for t in inner for op in _ops(t)]


def _crops(tf) -> list[v2.RandomResizedCrop]:
    return [t for t in _ops(tf) if isinstance(t, v2.RandomResizedCrop)]


@pytest.mark.parametrize(("channels", "native", "size"), [(3, 40, 32), (1, 8, 16), (3, 96, 96)])
def test_simclr_views_shapes_and_dtypes(channels: int, native: int, size: int) -> None:
    torch.manual_seed(0)
    mean, std = (IMAGENET_MEAN, (0.2, 0.2, 0.2)) if channels == 3 else ((0.3,), (0.4,))
    v1, v2_ = simclr_views(size, in_channels=channels, aspect_ratio_quirk=True, mean=mean, std=std)
    image = torch.randint(0, 256, (channels, native, native), dtype=torch.uint8)
    for view in (v1, v2_):
        for _ in range(3):  # random ops differ per call
            out = view(image)
            assert out.dtype == torch.float32 and out.shape == (channels, size, size)
            assert torch.isfinite(out).all()
    assert not torch.equal(v1(image), v1(image))  # random


def test_greyscale_views_skip_colour_ops() -> None:
    v1, _ = simclr_views(16, in_channels=1, aspect_ratio_quirk=False, mean=(0.3,), std=(0.4,))
    jitters = [t for t in _ops(v1) if isinstance(t, v2.ColorJitter)]
    assert len(jitters) == 1 and jitters[0].saturation is None and jitters[0].hue is None
    assert jitters[0].brightness == (0.6, 1.4) and jitters[0].contrast == (0.6, 1.4)
    assert not any(isinstance(t, v2.RandomGrayscale) for t in _ops(v1))
    v1c, v2c = simclr_views(
        32, in_channels=3, aspect_ratio_quirk=False, mean=IMAGENET_MEAN, std=(0.2,) * 3
    )
    assert (
        "RandomGrayscale" in repr(v1c)
        and "RandomSolarize" in repr(v2c)
        and "RandomSolarize" not in repr(v1c)
    )


def test_aspect_ratio_quirk_and_interpolation() -> None:
    kw = {"in_channels": 3, "mean": IMAGENET_MEAN, "std": (0.2, 0.2, 0.2)}
    quirk = _crops(simclr_views(96, aspect_ratio_quirk=True, **kw)[0])[0]
    plain = _crops(simclr_views(96, aspect_ratio_quirk=False, **kw)[1])[0]
    assert tuple(quirk.ratio) == (0.5, 1.0) and tuple(quirk.scale) == (0.08, 1.0)
    assert tuple(plain.ratio) == pytest.approx((3 / 4, 4 / 3))
    assert quirk.interpolation == v2.InterpolationMode.BICUBIC
    train_tf, _ = downstream_transforms(96, aspect_ratio_quirk=True, **kw)
    assert tuple(_crops(train_tf)[0].ratio) == (0.5, 1.0)


def test_blur_kernel_and_toggle() -> None:
    assert [blur_kernel_size(s) for s in (16, 32, 64, 96, 224)] == [3, 3, 7, 9, 23]
    kw = {"in_channels": 3, "aspect_ratio_quirk": True, "mean": IMAGENET_MEAN, "std": (0.2,) * 3}
    assert "GaussianBlur" in repr(simclr_views(32, **kw)[0])
    assert "GaussianBlur" not in repr(simclr_views(32, blur=False, **kw)[0])


def test_downstream_test_transform_is_deterministic_resize_crop() -> None:
    # a constant image stays constant: test output = (value / 255 - mean) / std exactly
    _, test_tf = downstream_transforms(
        96, in_channels=1, aspect_ratio_quirk=True, mean=(0.5,), std=(0.25,)
    )
    out = test_tf(torch.full((1, 120, 150), 51, dtype=torch.uint8))
    assert out.shape == (1, 96, 96)
    assert torch.allclose(out, torch.full_like(out, (51 / 255 - 0.5) / 0.25), atol=1e-5)
    resize = next(t for t in test_tf.transforms if isinstance(t, v2.Resize))
    assert resize.size == [109]


def test_normalisation_stats_match_data() -> None:
    assert normalization_stats("cifar10") == (IMAGENET_MEAN, (0.229, 0.224, 0.225))
    mean, std = normalization_stats("digits")
    ds = load_split("digits", "test", root=None, val_fraction=0.1, seed=0)
    pixels = torch.stack([ds[i][0] for i in range(len(ds))]).float() / 255
    assert pixels.mean().item() == pytest.approx(mean[0], abs=0.02)
    assert pixels.std().item() == pytest.approx(std[0], abs=0.02)
    with pytest.raises(ValueError, match="in_channels"):
        simclr_views(16, in_channels=1, aspect_ratio_quirk=True, mean=IMAGENET_MEAN, std=(0.2,) * 3)


def test_dataset_wrappers() -> None:
    base = load_split("digits", "train", root=None, val_fraction=0.1, seed=0)
    mean, std = normalization_stats("digits")
    v1, v2_ = simclr_views(16, in_channels=1, aspect_ratio_quirk=True, mean=mean, std=std)
    pairs = TwoViewDataset(base, v1, v2_)
    x1, x2 = pairs[3]
    assert len(pairs) == len(base) and x1.shape == x2.shape == (1, 16, 16)
    train_tf, _ = downstream_transforms(
        16, in_channels=1, aspect_ratio_quirk=True, mean=mean, std=std
    )
    labelled = TransformedDataset(base, train_tf)
    x, y = labelled[3]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and y == base[3][1]
