"""The workload: a SimCLR-trained backbone, one alternation's Hessian batch and right-hand sides.

Everything here is plain PyTorch (``torch.func.functional_call`` and autograd): the reference
contender and the truth check must not depend on hypergrad, so hypergrad only ever sees the
pretext loss ``f(params)`` that a user would hand it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.func import functional_call

from .._common import SmallCNN, TinyResNet, nt_xent

Params = dict[str, Tensor]
# BiSSL's damped system (I + H/(lam + delta)) x = v with the reference code's constants.
LAM, DELTA = 0.001, 10.0


@dataclass(frozen=True)
class Sizes:
    """What one mode measures (see ``MODES`` in :mod:`.run`)."""

    arch: str  # "resnet18" | "narrow" | "tiny"
    dtype: str  # "float32" | "float64"
    image: int  # side of the square inputs
    pairs: int  # Hessian batch, in SimCLR pairs
    rhs: int  # right-hand sides per alternation (upper steps)
    downstream_batch: int
    pretrain_steps: int  # SimCLR steps of the cached backbone
    pretrain_pairs: int
    nystrom_rank: int
    delta: float = DELTA  # damping of the solved system (BiSSL: 10)

    @property
    def c(self) -> float:
        """``lambda + delta``: the system is ``(I + H/c) x = v``."""
        return LAM + self.delta


# ---------------------------------------------------------------------------------------------
# Data: scikit-learn's digits (ships with the package), resized to image x image, 3 channels


def digits(image: int) -> tuple[Tensor, Tensor]:
    """All 1,797 digits as (N, 3, image, image) float32 in [-1, 1], and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(image, image), mode="bilinear", align_corners=False)
    return (x.repeat(1, 3, 1, 1) - 0.5) / 0.5, torch.tensor(data.target)


def augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """A SimCLR-style view: a random resized crop (scale 0.5-1) per image plus Gaussian noise."""
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(n):
        scale = 0.5 + 0.5 * float(torch.rand((), generator=gen))
        ch, cw = max(2, round(h * scale**0.5)), max(2, round(w * scale**0.5))
        top = int(torch.randint(0, h - ch + 1, (), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (), generator=gen))
        crop = x[i : i + 1, :, top : top + ch, left : left + cw]
        out[i] = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
    return out + 0.1 * torch.randn(out.shape, generator=gen, dtype=out.dtype)


# ---------------------------------------------------------------------------------------------
# Models


def resnet18_small_stem() -> nn.Module:
    """torchvision's ResNet-18 with the small-image stem (3x3 stride-1 conv, no max-pool), 512-d."""
    net = torchvision.models.resnet18(weights=None)
    net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def build_models(arch: str) -> tuple[nn.Module, nn.Module, int]:
    """(backbone, BiSSL-style projector, feature dimension) for ``arch``."""
    if arch == "resnet18":
        backbone, feat, hidden = resnet18_small_stem(), 512, 256
    elif arch == "narrow":
        backbone, feat, hidden = TinyResNet((16, 32, 64), out=None), 64, 128
    elif arch == "tiny":
        backbone, feat, hidden = SmallCNN(width=4), 4, 8
    else:
        raise ValueError(f"arch must be 'resnet18', 'narrow' or 'tiny', got {arch!r}")
    # BiSSL's projector: Linear-BN-ReLU-Linear-BN-ReLU-Linear(no bias), held fixed in the solves.
    projector = nn.Sequential(nn.Linear(feat, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                              nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                              nn.Linear(hidden, hidden, bias=False))
    return backbone, projector, feat


def cache_dir() -> Path:
    return Path(os.environ.get("HYPERGRAD_BENCH_CACHE", Path.home() / ".cache" / "hypergrad-bench"))


def pretrained_models(sizes: Sizes, device: torch.device) -> tuple[nn.Module, nn.Module, int, dict[str, Any]]:
    """Backbone and projector after ``sizes.pretrain_steps`` SimCLR steps on digits (cached).

    SGD with momentum 0.9 (lr 0.05, weight decay 1e-6: the reference's LARS is SGD-like) on
    NT-Xent (tau 0.5), batches of ``pretrain_pairs`` pairs, both views through separate forward
    passes, BN in train mode, float32. (Adam was tried first: after 500 steps on the narrow net
    the damped operator was still indefinite, min curvature -0.14 in an exploratory run that no
    JSON records. With SGD, the quick mode's committed truth solves see a smallest curvature
    d.Ad/d.d of 0.947, over 20 CG iterations per right-hand side: see ``benchmarks/results/
    alternation-quick.json``, ``seeds[0].truth.solves[*].min_curvature``.) The
    result is cached on disk (atomic write, loaded with ``weights_only=True``) keyed by the
    settings, so repeated runs reuse it.
    """
    torch.manual_seed(0)
    backbone, projector, feat = build_models(sizes.arch)
    key = {"arch": sizes.arch, "image": sizes.image, "steps": sizes.pretrain_steps,
           "pairs": sizes.pretrain_pairs, "version": 2}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / f"simclr-{sizes.arch}-{digest}.pt"
    info: dict[str, Any] = {"pretrain_steps": float(sizes.pretrain_steps)}
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        backbone.load_state_dict(state["backbone"])
        projector.load_state_dict(state["projector"])
        info.update(state["info"])
        info["cached"] = 1.0
    else:
        info.update(_simclr(backbone, projector, sizes, device))
        if sizes.arch != "tiny":  # the smoke mode trains in a second; keep the cache clean
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"backbone": backbone.state_dict(), "projector": projector.state_dict(), "info": info}, tmp)
            os.replace(tmp, path)
        info["cached"] = 0.0
    return backbone.to(device), projector.to(device), feat, info


def _simclr(backbone: nn.Module, projector: nn.Module, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    images, _ = digits(sizes.image)
    gen = torch.Generator().manual_seed(0)
    backbone.to(device).train()
    projector.to(device).train()
    opt = torch.optim.SGD([*backbone.parameters(), *projector.parameters()], lr=0.05, momentum=0.9,
                          weight_decay=1e-6)
    t0, losses = time.perf_counter(), []
    for step in range(sizes.pretrain_steps):
        idx = torch.randperm(images.shape[0], generator=gen)[: sizes.pretrain_pairs]
        x1, x2 = augment(images[idx], gen).to(device), augment(images[idx], gen).to(device)
        loss = nt_xent(projector(backbone(x1)), projector(backbone(x2)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if sizes.arch == "resnet18" and (step + 1) % 25 == 0:
            print(f"  SimCLR step {step + 1}/{sizes.pretrain_steps}: loss {losses[-1]:.3f}", flush=True)
    backbone.cpu()
    projector.cpu()
    first, last = sum(losses[:10]) / max(1, len(losses[:10])), sum(losses[-10:]) / max(1, len(losses[-10:]))
    return {"pretrain_seconds": time.perf_counter() - t0, "loss_first10": first, "loss_last10": last,
            "recipe": f"SGD lr 0.05 momentum 0.9 wd 1e-6, NT-Xent tau 0.5, {sizes.pretrain_pairs} pairs/step, "
                      f"digits at {sizes.image}px, seed 0",
            "trained_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------
# One alternation


def pure(module: nn.Module) -> Callable[[Mapping[str, Tensor], Tensor], Tensor]:
    """``module`` as a function of its parameters; BN in train mode on fresh buffer copies."""

    def run(params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        buffers = {k: b.clone() for k, b in module.named_buffers()}
        return functional_call(module, {**dict(params), **buffers}, (x,))

    return run


def pretext_loss(backbone: nn.Module, projector: nn.Module, x1: Tensor, x2: Tensor) -> Callable[[Mapping[str, Tensor]], Tensor]:
    """``f(theta) = NT-Xent(g(h_theta(x1)), g(h_theta(x2)))``: views in separate passes, g fixed."""
    run, project = pure(backbone), pure(projector)
    no_params: dict[str, Tensor] = {}

    def f(params: Mapping[str, Tensor]) -> Tensor:
        return nt_xent(project(no_params, run(params, x1)), project(no_params, run(params, x2)))

    return f


@dataclass
class Alternation:
    """Everything one alternation's solves need.

    Attributes:
        f: the pretext loss on the Hessian batch (``pairs`` pairs) as a function of the backbone.
        f_sub: the same on the first half of the pairs (the subsampled-Hessian contender).
        params: the lower backbone ``theta_P`` (detached).
        rhs: the ``v_k``: gradients of the downstream cross-entropy on ``rhs`` batches.
        views, backbone, projector: what ``f`` is built from (for the low-precision contender).
    """

    f: Callable[[Mapping[str, Tensor]], Tensor]
    f_sub: Callable[[Mapping[str, Tensor]], Tensor]
    params: Params
    rhs: list[Params]
    views: tuple[Tensor, Tensor]
    backbone: nn.Module
    projector: nn.Module
    c: float

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.params.values())


def alternation(sizes: Sizes, backbone: nn.Module, projector: nn.Module, feat: int, seed: int,
                device: torch.device) -> Alternation:
    """Draw seed ``seed``'s Hessian batch and right-hand sides at the trained backbone.

    The downstream head is a linear probe fitted (Adam, 200 steps) on the frozen features, so
    the ``v_k`` look like those of a BiSSL run after its linear warm-up.
    """
    dtype = getattr(torch, sizes.dtype)
    images, labels = digits(sizes.image)
    gen = torch.Generator().manual_seed(1000 + seed)
    backbone, projector = backbone.to(device=device, dtype=dtype), projector.to(device=device, dtype=dtype)
    for m in (backbone, projector):
        m.train()
        m.requires_grad_(False)
    idx = torch.randperm(images.shape[0], generator=gen)[: sizes.pairs]
    x1 = augment(images[idx], gen).to(device=device, dtype=dtype)
    x2 = augment(images[idx], gen).to(device=device, dtype=dtype)
    half = max(1, sizes.pairs // 2)
    f = pretext_loss(backbone, projector, x1, x2)
    f_sub = pretext_loss(backbone, projector, x1[:half], x2[:half])

    head = _linear_probe(backbone, feat, images, labels, gen, device, dtype)
    params = {k: t.detach().clone() for k, t in backbone.named_parameters()}
    run = pure(backbone)
    rhs = []
    for _ in range(sizes.rhs):
        j = torch.randperm(images.shape[0], generator=gen)[: sizes.downstream_batch]
        xd, yd = images[j].to(device=device, dtype=dtype), labels[j].to(device)
        p = {k: t.clone().requires_grad_(True) for k, t in params.items()}
        loss = F.cross_entropy(head(run(p, xd)), yd)
        rhs.append(dict(zip(p, torch.autograd.grad(loss, list(p.values())), strict=True)))
    return Alternation(f, f_sub, params, rhs, (x1, x2), backbone, projector, sizes.c)


def _linear_probe(backbone: nn.Module, feat: int, images: Tensor, labels: Tensor, gen: torch.Generator,
                  device: torch.device, dtype: torch.dtype) -> nn.Module:
    idx = torch.randperm(images.shape[0], generator=gen)[:512]
    with torch.no_grad():
        backbone.eval()
        z = torch.cat([backbone(images[idx[i : i + 128]].to(device=device, dtype=dtype))
                       for i in range(0, len(idx), 128)])
        backbone.train()
    y = labels[idx].to(device)
    head = nn.Linear(feat, 10).to(device=device, dtype=dtype)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(200):
        loss = F.cross_entropy(head(z), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.requires_grad_(False)
    return head
