"""Backbones, SimCLR projector and classification heads for the BiSSL app.

Public names: :func:`build_backbone`, :class:`Projector`, :class:`LinearHead`, :class:`Classifier`.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock

__all__ = ["Arch", "Classifier", "LinearHead", "Projector", "build_backbone"]

Arch = Literal["resnet18", "resnet-small"]
_ARCHS: tuple[str, ...] = get_args(Arch)


def _stem_conv(in_channels: int, out_channels: int, *, small_images: bool) -> nn.Conv2d:
    """First convolution: 3x3 stride 1 for small images, else the ImageNet 7x7 stride 2."""
    if small_images:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    else:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


class _SmallResNet(nn.Module):
    """Narrow ResNet with one BasicBlock per stage (widths w, 2w, 4w, 8w) and no classifier.

    Input (N, C, H, W) -> features (N, 8 * width).
    """

    def __init__(self, *, in_channels: int, width: int, small_images: bool) -> None:
        super().__init__()
        self.conv1 = _stem_conv(in_channels, width, small_images=small_images)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.Identity() if small_images else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        )
        stages = []
        in_planes = width
        for i, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or in_planes != planes:
                downsample = nn.Sequential(
                    nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            stages.append(BasicBlock(in_planes, planes, stride=stride, downsample=downsample))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, w, H', W')
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (N, 8w, H'/8, W'/8)
        return torch.flatten(self.avgpool(x), 1)  # (N, 8w)


def build_backbone(
    arch: Arch, *, small_images: bool, in_channels: int = 3, width: int = 64
) -> tuple[nn.Module, int]:
    """Build a ResNet feature extractor without its classifier.

    Args:
        arch: ``"resnet18"`` (torchvision ResNet-18, random init, ``fc = nn.Identity()``) or
            ``"resnet-small"`` (one BasicBlock per stage, widths ``width * (1, 2, 4, 8)``).
        small_images: replace the ImageNet stem (7x7/2 conv + max-pool) by a 3x3 stride-1 conv
            without max-pool, for 16-32 px inputs.
        in_channels: input channels (1 feeds greyscale images directly).
        width: base width of ``"resnet-small"``; ``"resnet18"`` only accepts its fixed 64.

    Returns:
        ``(backbone, feat_dim)``: ``backbone(x)`` maps (N, in_channels, H, W) to (N, feat_dim).

    Example:
        >>> net, d = build_backbone("resnet-small", small_images=True, in_channels=1, width=8)
        >>> net(torch.zeros(2, 1, 16, 16)).shape, d
        (torch.Size([2, 64]), 64)
    """
    if arch not in _ARCHS:
        raise ValueError(f"arch={arch!r} is not supported; use one of {list(_ARCHS)}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels={in_channels!r} must be a positive int (1 greyscale, 3 RGB)")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width={width!r} must be a positive int, e.g. 16 for resnet-small")
    if arch == "resnet18":
        if width != 64:
            raise ValueError(
                f"width={width} is not configurable for arch='resnet18' (fixed at 64); "
                "use arch='resnet-small' for a narrower network or set width=64"
            )
        net = resnet18(weights=None)
        net.fc = nn.Identity()
        if small_images or in_channels != 3:
            net.conv1 = _stem_conv(in_channels, 64, small_images=small_images)
        if small_images:
            net.maxpool = nn.Identity()
        return net, 512
    return _SmallResNet(in_channels=in_channels, width=width, small_images=small_images), 8 * width


class Projector(nn.Sequential):
    """SimCLR projection head: Linear-BN-ReLU, Linear-BN-ReLU, Linear (no bias).

    Reference widths: ``Projector(512, 256, 256)``. Input (N, in_dim) -> (N, out_dim).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Projector {name}={value!r} must be a positive int")
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False),
        )


class LinearHead(nn.Linear):
    """Downstream classification head: one ``nn.Linear(in_dim, num_classes)``.

    Input (N, in_dim) -> logits (N, num_classes).
    """

    def __init__(self, in_dim: int, num_classes: int) -> None:
        for name, value in (("in_dim", in_dim), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LinearHead {name}={value!r} must be a positive int")
        super().__init__(in_dim, num_classes)


class Classifier(nn.Module):
    """Backbone followed by a head: ``forward(x) = head(backbone(x))``.

    Args:
        backbone: maps (N, C, H, W) to features (N, D).
        head: maps (N, D) to logits (N, num_classes).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))
