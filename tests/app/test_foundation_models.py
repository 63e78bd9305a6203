"""Backbones (both archs, both stems), projector and classifier shapes and structure."""

from __future__ import annotations

import pytest
import torch
from bissl.models import Classifier, LinearHead, Projector, build_backbone
from torch import nn


@pytest.mark.parametrize(
    ("arch", "small", "channels", "width", "size", "feat_dim"),
    [
        ("resnet18", True, 3, 64, 16, 512),
        ("resnet18", False, 3, 64, 64, 512),
        ("resnet18", True, 1, 64, 16, 512),
        ("resnet-small", True, 1, 16, 16, 128),
        ("resnet-small", False, 3, 8, 64, 64),
    ],
)
def test_backbone_output_shapes(
    arch: str, small: bool, channels: int, width: int, size: int, feat_dim: int
) -> None:
    torch.manual_seed(0)
    net, dim = build_backbone(arch, small_images=small, in_channels=channels, width=width)
    assert dim == feat_dim
    out = net(torch.randn(2, channels, size, size))
    assert out.shape == (2, feat_dim)
    assert net.conv1.in_channels == channels


def test_stems_differ_as_documented() -> None:
    small, _ = build_backbone("resnet18", small_images=True)
    big, _ = build_backbone("resnet18", small_images=False)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2)
    assert isinstance(big.maxpool, nn.MaxPool2d) and isinstance(big.fc, nn.Identity)
    # spatial resolution: small stem keeps 16 px at layer1, ImageNet stem divides by 4
    x = torch.randn(1, 3, 16, 16)
    assert small.layer1(small.relu(small.bn1(small.conv1(x)))).shape[-1] == 16
    assert big.layer1(big.maxpool(big.relu(big.bn1(big.conv1(x))))).shape[-1] == 4
    # resnet18 parameter count without fc: 11,689,512 - (512 * 1000 + 1000)
    assert sum(p.numel() for p in big.parameters()) == 11_689_512 - 513_000


def test_backbone_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="arch"):
        build_backbone("resnet50", small_images=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="width"):
        build_backbone("resnet18", small_images=True, width=16)
    with pytest.raises(ValueError, match="in_channels"):
        build_backbone("resnet-small", small_images=True, in_channels=0)


def test_projector_and_classifier() -> None:
    proj = Projector(512, 256, 128)
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (512, 256),
        (256, 256),
        (256, 128),
    ]
    assert linears[-1].bias is None and sum(isinstance(m, nn.BatchNorm1d) for m in proj) == 2
    assert proj(torch.randn(4, 512)).shape == (4, 128)

    backbone, dim = build_backbone("resnet-small", small_images=True, in_channels=1, width=8)
    head = LinearHead(dim, 10)
    assert isinstance(head, nn.Linear) and head.weight.shape == (10, dim)
    model = Classifier(backbone, head)
    x = torch.randn(3, 1, 16, 16)
    model.eval()
    torch.testing.assert_close(model(x), head(backbone(x)))
    assert model(x).shape == (3, 10)
