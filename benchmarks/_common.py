"""Shared pieces of the benchmark suites: models, a SimCLR-like problem, timing, tables.

Nothing here imports the BiSSL app: the NT-Xent loss and the encoders are written inline so the
benchmarks measure the library alone. Every builder is seeded; every timing helper measures the
contenders side by side (interleaved rounds, median), because the machines these run on are
shared and only ratios measured in one process are meaningful.
"""

from __future__ import annotations

import functools
import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg

# BiSSL's damped system (I + H/(lam + delta)) x = v, with the reference code's constants.
BISSL_LAM = 0.001
BISSL_DELTA = 10.0

# ---------------------------------------------------------------------------------------------
# Losses and models


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """SimCLR's NT-Xent loss: cosine similarity, diagonal masked, mean over the 2N anchors.

    Args:
        z1, z2: projections of the two views, shape (N, d).
        temperature: softmax temperature (BiSSL uses 0.5).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2N, d)
    sim = z @ z.T / temperature  # (2N, 2N)
    # A finite mask value keeps forward-mode tangents finite (-inf * 0 = nan).
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, -1e9)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # (2N,)
    return F.cross_entropy(sim, targets)


class SmallCNN(nn.Module):
    """Two strided conv-BN-ReLU blocks and global average pooling: (B, 3, H, W) -> (B, width)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus a (projected) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """A narrow CIFAR-style ResNet: 3x3 stem, one basic block per stage, (B, 3, 32, 32) -> (B, out)."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64), out: int | None = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c_in = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(c_in, w, stride=1 if i == 0 else 2))
            c_in = w
        self.blocks = nn.Sequential(*blocks)
        self.head: nn.Module = nn.Linear(c_in, out) if out is not None else nn.Identity()
        self.features = c_in

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """Linear layers with ``activation`` between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def two_views(x: Tensor, generator: torch.Generator, noise: float = 0.1) -> tuple[Tensor, Tensor]:
    """Cheap stand-ins for SimCLR augmentations: independent flips and Gaussian noise."""
    views = []
    for _ in range(2):
        flip = torch.rand(x.shape[0], 1, 1, 1, generator=generator, dtype=x.dtype) < 0.5
        v = torch.where(flip, x.flip(-1), x)
        views.append(v + noise * torch.randn(x.shape, generator=generator, dtype=x.dtype))
    return views[0], views[1]


# ---------------------------------------------------------------------------------------------
# The BiSSL-style problem


@dataclass
class SimCLRProblem:
    """A lower-level (pretext) Hessian and a downstream right-hand side, as in one BiSSL upper step.

    Attributes:
        f: the pretext loss as a pure function of the backbone parameters (projector fixed, BN in
            train mode with the module's running statistics untouched).
        params: the backbone parameters ``theta_P`` (detached).
        v: the right-hand side ``grad_theta CE(head(backbone(x_d)), y_d)``.
        upper: the downstream loss as a function of the backbone parameters (for end-to-end tests).
        backbone, projector: the modules (their parameters are ``params`` and constants).
    """

    f: Callable[[hg.Tree], Tensor]
    params: dict[str, Tensor]
    v: dict[str, Tensor]
    upper: Callable[[hg.Tree], Tensor]
    backbone: nn.Module
    projector: nn.Module

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.params.values())


def simclr_problem(make_backbone: Callable[[], nn.Module], feature_dim: int, *, batch: int, image: int,
                   dtype: torch.dtype, pretrain_steps: int, seed: int = 0) -> SimCLRProblem:
    """Pre-train ``make_backbone()`` + a projector briefly with NT-Xent, then freeze one Hessian batch.

    The pretext images are a fixed pool of random "prototypes" seen through :func:`two_views`,
    so a few Adam steps (in float32) move the encoder away from its random initialisation (where
    the BiSSL operator can be indefinite) towards a trained-like point. The projector follows
    BiSSL's (Linear-BN-ReLU-Linear, no bias at the end), scaled down. Then everything is cast to
    ``dtype``.
    """
    torch.manual_seed(seed)  # before any module is built: initialisations are reproducible
    gen = torch.Generator().manual_seed(seed)
    backbone = make_backbone()
    hidden = 2 * feature_dim
    projector = nn.Sequential(nn.Linear(feature_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                              nn.Linear(hidden, feature_dim, bias=False))
    pool = torch.randn(4 * batch, 3, image, image, generator=gen)
    opt = torch.optim.Adam([*backbone.parameters(), *projector.parameters()], lr=3e-3)
    backbone.train()
    projector.train()
    for _ in range(pretrain_steps):
        idx = torch.randperm(pool.shape[0], generator=gen)[:batch]
        x1, x2 = two_views(pool[idx], gen)
        loss = nt_xent(projector(backbone(x1)), projector(backbone(x2)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    backbone, projector = backbone.to(dtype), projector.to(dtype)

    idx = torch.randperm(pool.shape[0], generator=gen)[:batch]
    x1, x2 = two_views(pool[idx].to(dtype), gen)  # the alternation's Hessian batch
    # Fresh BN buffers per call: HVPs leave both modules' running statistics untouched, and the
    # functions stay pure under torch.func transforms. The projector is a constant (BiSSL).
    run, project = hg.functional(backbone), hg.functional(projector)
    no_params: dict[str, Tensor] = {}

    def f(p: hg.Tree) -> Tensor:
        return nt_xent(project(no_params, run(p, x1)), project(no_params, run(p, x2)))

    head = nn.Linear(feature_dim, 10).to(dtype)
    xd = torch.randn(batch, 3, image, image, generator=gen, dtype=dtype)
    yd = torch.randint(0, 10, (batch,), generator=gen)

    def upper(p: hg.Tree) -> Tensor:
        return F.cross_entropy(head(run(p, xd)), yd)

    for m in (projector, head):
        m.requires_grad_(False)
    params = {k: t.detach() for k, t in backbone.named_parameters()}
    v = hg.gradient(upper, params)
    return SimCLRProblem(f, params, v, upper, backbone, projector)


def bissl_operator(problem: SimCLRProblem, *, reuse_graph: bool = True) -> hg.DampedOperator:
    """:math:`I + H/(\\lambda + \\delta)` for the problem's pretext Hessian."""
    H = hg.HessianOperator(problem.f, problem.params, reuse_graph=reuse_graph)
    return hg.DampedOperator.bissl_system(H, BISSL_LAM, BISSL_DELTA)


# ---------------------------------------------------------------------------------------------
# The BiSSL reference code's solver, hand-written


def layerwise_cg(product: Callable[[Mapping[str, Tensor]], dict[str, Tensor]], b: Mapping[str, Tensor], iterations: int,
                 callback: Callable[[int, dict[str, Tensor]], None] | None = None) -> dict[str, Tensor]:
    """The BiSSL reference code's CG: per tensor, alpha = r.r / d.Ad and beta = r'.r' / r.r; x0 = 0.

    Plain PyTorch (no hypergrad): the hand-written reference of the benchmarks. ``callback(k, x)``
    sees the iterate after every iteration.
    """
    x = {k: torch.zeros_like(t) for k, t in b.items()}
    r = {k: t.clone() for k, t in b.items()}
    d = {k: t.clone() for k, t in b.items()}
    rr = {k: (t * t).sum() for k, t in r.items()}
    for it in range(1, iterations + 1):
        ad = product(d)
        for k in b:
            alpha = rr[k] / (d[k] * ad[k]).sum()
            x[k] = x[k] + alpha * d[k]
            r[k] = r[k] - alpha * ad[k]
            rr_new = (r[k] * r[k]).sum()
            d[k] = r[k] + (rr_new / rr[k]) * d[k]
            rr[k] = rr_new
        if callback is not None:
            callback(it, x)
    return x


# ---------------------------------------------------------------------------------------------
# Flat-vector helpers for dense references


def ravel(tree: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tree.values()])


def unravel(vec: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    parts = torch.split(vec, [t.numel() for t in like.values()])
    return {k: p.reshape(t.shape) for (k, t), p in zip(like.items(), parts, strict=True)}


def dense_hessian(f: Callable[[hg.Tree], Tensor], params: Mapping[str, Tensor], chunk_size: int = 256) -> Tensor:
    """The dense Hessian of ``f`` at ``params`` via ``torch.func`` (forward-over-reverse), shape (n, n)."""
    flat = ravel(params).detach()
    grad = torch.func.grad(lambda w: f(unravel(w, params)))

    def column(e: Tensor) -> Tensor:
        return torch.func.jvp(grad, (flat,), (e,))[1]

    # What torch.func.hessian (jacfwd of jacrev) computes, with the vmap chunked to bound memory.
    eye = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
    H = torch.func.vmap(column, chunk_size=chunk_size)(eye)
    return (H + H.mT) / 2


def rel_err(x: Mapping[str, Tensor] | Tensor, ref: Mapping[str, Tensor] | Tensor) -> float:
    a = x if isinstance(x, Tensor) else ravel(x)
    b = ref if isinstance(ref, Tensor) else ravel(ref)
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------
# Timing and reporting


def median_times(fns: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                 budget_s: float = 0.0, max_rounds: int = 50) -> dict[str, float]:
    """Median wall time (seconds) of each function, measured side by side.

    Rounds are interleaved (the order alternates every round), so slow phases of a shared
    machine hit every contender alike and the ratios stay meaningful. With ``budget_s``, cheap
    contenders get more rounds (up to ``max_rounds``) so that the whole measurement takes about
    ``budget_s`` seconds; never fewer than ``rounds``.
    """
    names = list(fns)
    t0 = time.perf_counter()
    for _ in range(warmup):
        for name in names:
            fns[name]()
    per_round = (time.perf_counter() - t0) / max(warmup, 1)
    if budget_s > 0 and per_round > 0:
        rounds = max(rounds, min(max_rounds, int(budget_s / per_round)))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns`` (in that order)."""

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            if value == 0:
                return "0"
            if abs(value) >= 1e4 or abs(value) < 1e-2:
                return f"{value:.2e}"
            return f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# CPU features that decide how fast low-precision products run (bf16 speed differs by 2x and
# more between Xeons with and without them, under the same model name).
LOW_PRECISION_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


def machine_summary() -> dict[str, str]:
    """CPU model, its low-precision instruction flags, core count, torch version, threads."""
    return dict(_machine_summary())


@functools.cache
def _machine_summary() -> dict[str, str]:
    model = platform.processor() or "unknown"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):  # the first CPU's block ends here: model and flags read
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    present = [f for f in LOW_PRECISION_FLAGS if f in flags]
    bf16 = any(f in flags for f in ("avx512_bf16", "amx_bf16"))
    return {
        "cpu": model,
        "cpu_flags": " ".join(present) or "none of " + " ".join(LOW_PRECISION_FLAGS),
        "bf16_instructions": "yes" if bf16 else "no",
        "torch_cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def quick_mode() -> bool:
    """``HYPERGRAD_BENCH_QUICK=1`` shrinks problem sizes and rounds (smoke runs)."""
    return os.environ.get("HYPERGRAD_BENCH_QUICK", "0") == "1"
