"""Helpers shared by the core tests: random systems, a counting operator, a host-sync guard,
closed-form bilevel problems and the worker of the distributed test.

Every expected value in the tests comes from here or from the test itself (``torch.linalg``,
``torch.func``, hand-written formulas), never from the code under test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

import hypergrad as hg

F64 = torch.float64


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_orthogonal(n: int, g: torch.Generator, dtype: torch.dtype = F64) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def sym_with_spectrum(eigenvalues: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q``; returns ``(A, Q)``."""
    q = random_orthogonal(eigenvalues.numel(), g)
    a = q @ torch.diag(eigenvalues.to(F64)) @ q.T
    return (a + a.T) / 2, q


def spd(n: int, cond: float, g: torch.Generator) -> Tensor:
    """A random SPD matrix with eigenvalues log-spaced in ``[1, cond]``."""
    return sym_with_spectrum(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=F64), g)[0]


# --- trees <-> flat vectors, written independently of hypergrad._tree ----------------------

TREE_SHAPES: dict[str, tuple[int, ...]] = {"a": (3, 4), "b": (5,), "c": (2, 2), "d": ()}
TREE_SIZE = 12 + 5 + 4 + 1


def flatten(tree: dict[str, Tensor], shapes: dict[str, tuple[int, ...]] = TREE_SHAPES) -> Tensor:
    """Concatenate the leaves in the order of ``shapes``; batched leaves give ``(k, n)``."""
    lead = tree[next(iter(shapes))].dim() - len(next(iter(shapes.values())))
    if lead == 0:
        return torch.cat([tree[k].reshape(-1) for k in shapes])
    k = tree[next(iter(shapes))].shape[0]
    return torch.cat([tree[key].reshape(k, -1) for key in shapes], dim=1)


def unflatten(vec: Tensor, shapes: dict[str, tuple[int, ...]] = TREE_SHAPES) -> dict[str, Tensor]:
    out, start = {}, 0
    lead = tuple(vec.shape[:-1])
    for key, shape in shapes.items():
        size = 1
        for s in shape:
            size *= s
        out[key] = vec[..., start:start + size].reshape(lead + shape)
        start += size
    return out


def tree_operator(matrix: Tensor, *, symmetric: bool = True) -> hg.FunctionOperator:
    """``matrix`` acting on the multi-leaf tree with :data:`TREE_SHAPES` (batched too)."""
    return hg.FunctionOperator(
        lambda x: unflatten(matrix @ flatten(x)),
        symmetric=symmetric,
        batched_fn=lambda xs: unflatten(flatten(xs) @ matrix.T),
    )


class CountingOperator(hg.LinearOperator):
    """Wraps an operator and counts products: 1 per ``mv``, ``k`` per ``matmat`` of k trees."""

    def __init__(self, base: hg.LinearOperator) -> None:
        self.base = base
        self.calls = 0

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        return self.base.symmetric

    @property
    def positive_definite(self) -> bool:  # type: ignore[override]
        return self.base.positive_definite

    def mv(self, x):
        self.calls += 1
        return self.base.mv(x)

    def matmat(self, X):
        self.calls += next(iter(X.values())).shape[0]
        return self.base.matmat(X)


# --- a guard against host synchronisation ------------------------------------------------

class HostSyncError(RuntimeError):
    """Raised by the patched tensor methods inside :func:`no_host_sync`."""


_SYNC_METHODS = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy", "nonzero", "argwhere")
# Functions of the torch namespace whose output shape depends on values (a device -> host copy).
_SYNC_FUNCTIONS = ("nonzero", "argwhere")


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Make every tensor -> host transfer raise :class:`HostSyncError` inside the block: Python
    conversions (``item``, ``bool``, ``float``, ``int``, ``tolist``), copies to the host (``.cpu()``,
    ``.numpy()``) and value-dependent shapes (``nonzero``, ``argwhere``, method and function)."""
    targets = [(torch.Tensor, name) for name in _SYNC_METHODS] + [(torch, name) for name in _SYNC_FUNCTIONS]
    saved = [(owner, name, getattr(owner, name)) for owner, name in targets]

    def make(where: str):
        def raiser(*args, **kwargs):
            raise HostSyncError(f"{where} called inside a no-sync block")
        return raiser

    try:
        for owner, name in targets:
            setattr(owner, name, make(f"{'Tensor' if owner is torch.Tensor else 'torch'}.{name}"))
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


# --- ridge-regression HPO with a closed-form hypergradient ---------------------------------

class Ridge:
    r"""Lower: :math:`\tfrac{1}{2n}\|Xw - y\|^2 + \tfrac{\lambda}{2}\|w\|^2`, :math:`\lambda = e^{\ell}`.
    Upper: :math:`\tfrac{1}{2m}\|X_v w - y_v\|^2 + c\,\ell^2` (a direct term in the outer variable).

    Closed form: :math:`A = X^\top X/n + \lambda I`, :math:`w^* = A^{-1} X^\top y / n`,
    :math:`dw^*/d\lambda = -A^{-1} w^*`, so
    :math:`dF/d\ell = -\lambda\, g^\top A^{-1} w^* + 2 c \ell` with :math:`g = X_v^\top (X_v w^* - y_v)/m`.
    """

    def __init__(self, seed: int = 0, n: int = 40, m: int = 30, d: int = 6, log_lam: float = -0.4,
                 c: float = 0.1) -> None:
        g = generator(seed)
        self.X = torch.randn(n, d, generator=g, dtype=F64)
        self.y = self.X @ torch.randn(d, generator=g, dtype=F64) + 0.3 * torch.randn(n, generator=g, dtype=F64)
        self.Xv = torch.randn(m, d, generator=g, dtype=F64)
        self.yv = torch.randn(m, generator=g, dtype=F64)
        self.log_lam = torch.tensor(log_lam, dtype=F64)
        self.c = c
        self.n, self.m, self.d = n, m, d

    def lower(self, i: dict[str, Tensor], o: dict[str, Tensor]) -> Tensor:
        w = i["w"]
        return 0.5 * ((self.X @ w - self.y) ** 2).mean() + 0.5 * torch.exp(o["log_lam"]) * (w**2).sum()

    def upper(self, i: dict[str, Tensor], o: dict[str, Tensor]) -> Tensor:
        return 0.5 * ((self.Xv @ i["w"] - self.yv) ** 2).mean() + self.c * o["log_lam"] ** 2

    def matrix(self, log_lam: Tensor | None = None) -> Tensor:
        lam = torch.exp(self.log_lam if log_lam is None else log_lam)
        return self.X.T @ self.X / self.n + lam * torch.eye(self.d, dtype=F64)

    def w_star(self, log_lam: Tensor | None = None) -> Tensor:
        return torch.linalg.solve(self.matrix(log_lam), self.X.T @ self.y / self.n)

    def hypergrad(self) -> Tensor:
        lam = torch.exp(self.log_lam)
        w = self.w_star()
        g = self.Xv.T @ (self.Xv @ w - self.yv) / self.m
        return -lam * (g @ torch.linalg.solve(self.matrix(), w)) + 2 * self.c * self.log_lam

    def direct(self) -> Tensor:
        """:math:`\\partial F/\\partial \\ell` at fixed ``w``."""
        return 2 * self.c * self.log_lam

    def lambda_max(self) -> float:
        return float(torch.linalg.eigvalsh(self.matrix())[-1])


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- the distributed test's problem and worker (module level so that spawned processes can import it)

def sharded_scaled_ridge_data(world: int, per_rank: int = 12, d: int = 3, seed: int = 7) -> dict[str, Tensor]:
    """Data whose shards differ on purpose (each rank's features have their own scale and offset)."""
    g = generator(seed)
    n = world * per_rank
    rank_scale = torch.repeat_interleave(torch.linspace(0.5, 2.0, world, dtype=F64), per_rank)[:, None]
    X = rank_scale * torch.randn(n, d, generator=g, dtype=F64) + rank_scale
    y = X @ torch.randn(d, generator=g, dtype=F64) + 0.5 + 0.3 * torch.randn(n, generator=g, dtype=F64)
    Xv = rank_scale * torch.randn(n, d, generator=g, dtype=F64)
    yv = torch.randn(n, generator=g, dtype=F64) + rank_scale[:, 0]
    outer = {"log_scale": torch.tensor([0.2, -0.4, 0.1], dtype=F64), "log_lam": torch.tensor(-0.7, dtype=F64)}
    return {"X": X, "y": y, "Xv": Xv, "yv": yv, **outer}


def scaled_ridge(X: Tensor, y: Tensor, Xv: Tensor, yv: Tensor):
    r"""Mean-reduced losses of ridge on learned feature scales: features :math:`x \odot e^{s}`,
    an unregularised intercept, L2 strength :math:`e^{\ell}`; the upper loss also sees the scales
    and has a direct term :math:`0.05\|s\|^2`. The outer variable meets the data in both the
    mixed term and the direct term, so every rank's shard contributes its own part of each."""

    def lower(i, o):
        r = (X * torch.exp(o["log_scale"])) @ i["w"] + i["b"] - y
        return 0.5 * (r**2).mean() + 0.5 * torch.exp(o["log_lam"]) * (i["w"] ** 2).sum()

    def upper(i, o):
        r = (Xv * torch.exp(o["log_scale"])) @ i["w"] + i["b"] - yv
        return 0.5 * (r**2).mean() + 0.05 * (o["log_scale"] ** 2).sum()

    return lower, upper


def scaled_ridge_solution(X: Tensor, y: Tensor, log_scale: Tensor, log_lam: Tensor) -> dict[str, Tensor]:
    """The inner minimiser on all of ``X`` by a dense solve of the normal equations."""
    Z = torch.cat([X * torch.exp(log_scale), torch.ones(X.shape[0], 1, dtype=X.dtype)], dim=1)
    reg = torch.exp(log_lam) * torch.diag(torch.cat([torch.ones_like(log_scale), torch.zeros(1, dtype=X.dtype)]))
    theta = torch.linalg.solve(Z.T @ Z / X.shape[0] + reg, Z.T @ y / X.shape[0])
    return {"w": theta[:-1], "b": theta[-1]}


def distributed_worker(rank: int, world: int, init_method: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        data = sharded_scaled_ridge_data(world)
        per_rank = data["X"].shape[0] // world
        shard = slice(rank * per_rank, (rank + 1) * per_rank)
        lower, upper = scaled_ridge(data["X"][shard], data["y"][shard], data["Xv"][shard], data["yv"][shard])
        inner = scaled_ridge_solution(data["X"], data["y"], data["log_scale"], data["log_lam"])
        outer = {"log_scale": data["log_scale"], "log_lam": data["log_lam"]}
        solver = hg.CG(maxiter=50, tol=1e-13)
        g_dist, stats = hg.implicit_grad(lower, upper, inner, outer, solver=solver, distributed=True)
        g_local, _ = hg.implicit_grad(lower, upper, inner, outer, solver=solver, distributed=False,
                                      stationarity_tol=None)
        torch.save({"dist": g_dist, "local": g_local, "stationarity": stats.stationarity,
                    "result": stats.result.name}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
