"""Hessian-vector products against dense Hessians from ``torch.func`` (float64).

The truth for each net is a pure function of one flat parameter vector, written here from
elementary ops (BatchNorm with batch statistics and no buffers), and differentiated by
``torch.func.hessian``; hypergrad sees the same net through :func:`hypergrad.functional`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from core_helpers import F64, flatten, generator, unflatten
from torch import nn

import hypergrad as hg


def _mlp(seed: int):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)

    def pure(p, x):
        return F.linear(torch.tanh(F.linear(x, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"])

    return net, pure


def _bn_net(seed: int):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(F64).train()
    with torch.no_grad():  # non-trivial affine parameters
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)

    def pure(p, x):
        h = F.linear(x, p["0.weight"], p["0.bias"])
        # BatchNorm with batch statistics, from elementary ops: torch.func.hessian of
        # F.batch_norm(training=True) is wrong in torch 2.14.1 (non-symmetric, error ~0.8).
        mean = h.mean(0)
        var = ((h - mean) ** 2).mean(0)
        h = (h - mean) / torch.sqrt(var + net[1].eps) * p["1.weight"] + p["1.bias"]
        return F.linear(torch.tanh(h), p["3.weight"], p["3.bias"])

    return net, pure


NETS = {"mlp": _mlp, "bn": _bn_net}


class Problem:
    """A net, its data, hypergrad's objective on trees and the dense truth."""

    def __init__(self, kind: str, seed: int = 0) -> None:
        self.net, pure = NETS[kind](seed)
        g = generator(seed + 100)
        self.x = torch.randn(10, 3, generator=g, dtype=F64)
        self.y = torch.randn(10, 2, generator=g, dtype=F64)
        self.params = {k: v.detach().clone() for k, v in self.net.named_parameters()}
        self.shapes = {k: tuple(v.shape) for k, v in self.params.items()}
        fwd = hg.functional(self.net)
        self.f = lambda p: ((fwd(p, self.x) - self.y) ** 2).mean()
        self.pure_loss = lambda p: ((pure(p, self.x) - self.y) ** 2).mean()
        flat = flatten(self.params, self.shapes)
        self.hessian = torch.func.hessian(lambda t: self.pure_loss(unflatten(t, self.shapes)))(flat)

    def tangents(self, k: int, seed: int = 1) -> dict[str, torch.Tensor]:
        g = generator(seed)
        return {key: torch.randn((k, *s), generator=g, dtype=F64) for key, s in self.shapes.items()}

    def dense_products(self, V: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return unflatten(flatten(V, self.shapes) @ self.hessian, self.shapes)  # H symmetric


def _rel(out, truth, shapes) -> float:
    a, b = flatten(out, shapes), flatten(truth, shapes)
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=sorted(NETS))
def problem(request) -> Problem:
    return Problem(request.param)


def test_truth_matches_the_module(problem):
    """Control: the hand-written pure function is the net hypergrad differentiates."""
    assert torch.allclose(problem.pure_loss(problem.params), problem.f(problem.params), rtol=1e-14, atol=0)
    evals = torch.linalg.eigvalsh(problem.hessian)
    assert evals.abs().max() > 1e-3  # a non-trivial Hessian


EXACT = [("reverse", True), ("reverse", False), ("forward", True)]


@pytest.mark.parametrize(("method", "reuse"), EXACT)
def test_exact_hvp_matches_dense_hessian(problem, method, reuse):
    V = problem.tangents(1)
    v = {k: x[0] for k, x in V.items()}
    truth = {k: x[0] for k, x in problem.dense_products(V).items()}
    op = hg.HessianOperator(problem.f, problem.params, method=method, reuse_graph=reuse)
    assert _rel(op.mv(v), truth, problem.shapes) < 1e-10
    assert _rel(hg.hvp(problem.f, problem.params, v, method=method), truth, problem.shapes) < 1e-10


@pytest.mark.parametrize(("method", "reuse"), EXACT)
def test_batched_hvp_matches_dense_hessian(problem, method, reuse):
    V = problem.tangents(3)
    truth = problem.dense_products(V)
    op = hg.HessianOperator(problem.f, problem.params, method=method, reuse_graph=reuse)
    out = op.matmat(V)
    assert {k: tuple(x.shape) for k, x in out.items()} == {k: tuple(x.shape) for k, x in V.items()}
    for j in range(3):
        col = {k: x[j] for k, x in out.items()}
        assert _rel(col, {k: x[j] for k, x in truth.items()}, problem.shapes) < 1e-10
    assert _rel(hg.hvp_batched(problem.f, problem.params, V, method=method), truth, problem.shapes) < 1e-10


def test_finite_difference_hvp_on_smooth_nets(problem):
    V = problem.tangents(2, seed=3)
    truth = problem.dense_products(V)
    out = hg.hvp_batched(problem.f, problem.params, V, method="finite_difference")
    err = _rel(out, truth, problem.shapes)
    assert err < 1e-6
    op = hg.HessianOperator(problem.f, problem.params, method="finite_difference")
    v = {k: x[0] for k, x in V.items()}
    assert _rel(op.mv(v), {k: x[0] for k, x in truth.items()}, problem.shapes) < 1e-6


def test_hvp_is_linear_in_the_tangent_scale(problem):
    """A scaled tangent gives the scaled product (the FD step adapts to ||v||)."""
    V = problem.tangents(1, seed=5)
    v = {k: 1e-3 * x[0] for k, x in V.items()}
    truth = {k: 1e-3 * x[0] for k, x in problem.dense_products(V).items()}
    for method in ("reverse", "forward"):
        assert _rel(hg.hvp(problem.f, problem.params, v, method=method), truth, problem.shapes) < 1e-10
    assert _rel(hg.hvp(problem.f, problem.params, v, method="finite_difference"), truth, problem.shapes) < 1e-6


# --- BatchNorm running statistics --------------------------------------------------------

def _buffers(net):
    return {k: b.clone() for k, b in net.named_buffers()}


def _same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["reverse", "forward", "finite_difference"])
def test_hvp_leaves_buffers_alone_without_update_buffers(method):
    prob = Problem("bn", seed=2)
    before = _buffers(prob.net)
    v = {k: x[0] for k, x in prob.tangents(1).items()}
    hg.hvp(prob.f, prob.params, v, method=method)
    hg.HessianOperator(prob.f, prob.params, method=method).matmat(prob.tangents(2))
    assert _same(before, _buffers(prob.net))
    # Control: a plain train-mode forward does change them.
    prob.net(prob.x)
    after = _buffers(prob.net)
    assert not torch.equal(before["1.running_mean"], after["1.running_mean"])
    assert int(after["1.num_batches_tracked"]) == int(before["1.num_batches_tracked"]) + 1


def test_hvp_updates_buffers_with_update_buffers_true():
    prob = Problem("bn", seed=3)
    fwd = hg.functional(prob.net, update_buffers=True)
    f = lambda p: ((fwd(p, prob.x) - prob.y) ** 2).mean()  # noqa: E731
    v = {k: x[0] for k, x in prob.tangents(1).items()}
    hg.hvp(f, prob.params, v, method="reverse")
    # One forward ran: running_mean = (1 - m) * 0 + m * batch mean of the first layer's output.
    h = prob.x @ prob.params["0.weight"].T + prob.params["0.bias"]
    m = prob.net[1].momentum
    assert torch.allclose(prob.net[1].running_mean, m * h.mean(0), rtol=1e-12, atol=1e-14)
    assert int(prob.net[1].num_batches_tracked) == 1


@pytest.mark.parametrize(("reuse", "forwards"), [(True, 1), (False, 3)])
def test_reuse_graph_controls_how_often_f_runs(reuse, forwards):
    prob = Problem("bn", seed=4)
    fwd = hg.functional(prob.net, update_buffers=True)
    f = lambda p: ((fwd(p, prob.x) - prob.y) ** 2).mean()  # noqa: E731
    op = hg.HessianOperator(f, prob.params, method="reverse", reuse_graph=reuse)
    V = prob.tangents(3)
    for j in range(3):
        out = op.mv({k: x[j] for k, x in V.items()})
        truth = {k: x[j] for k, x in prob.dense_products(V).items()}
        assert _rel(out, truth, prob.shapes) < 1e-10
    assert int(prob.net[1].num_batches_tracked) == forwards


def test_hessian_operator_does_not_modify_params():
    prob = Problem("mlp", seed=5)
    before = {k: v.clone() for k, v in prob.params.items()}
    for method in ("reverse", "forward", "finite_difference"):
        hg.HessianOperator(prob.f, prob.params, method=method).matmat(prob.tangents(2))
    assert _same(before, prob.params)
    assert all(not v.requires_grad for v in prob.params.values())


# --- mixed second derivatives ------------------------------------------------------------

def test_mixed_vjp_matches_dense_mixed_hessian():
    g = generator(11)
    X = torch.randn(12, 4, generator=g, dtype=F64)
    ishapes = {"w": (4,), "v": (2,)}
    oshapes = {"a": (), "b": (4,), "unused": (3,)}

    def f(i, o):
        z = X @ i["w"]
        return (F.softplus(z) * torch.exp(o["a"])).mean() + (i["w"] ** 2 * o["b"]).sum() \
            + (torch.sin(i["v"]) * o["a"]).sum() + (o["unused"] ** 2).sum()

    inner = {k: torch.randn(s, generator=g, dtype=F64) for k, s in ishapes.items()}
    outer = {k: torch.randn(s, generator=g, dtype=F64) for k, s in oshapes.items()}
    u = {k: torch.randn(s, generator=g, dtype=F64) for k, s in ishapes.items()}

    def flat_f(ti, to):
        return f(unflatten(ti, ishapes), unflatten(to, oshapes))

    ti, to = flatten(inner, ishapes), flatten(outer, oshapes)
    J = torch.func.jacrev(torch.func.jacrev(flat_f, argnums=0), argnums=1)(ti, to)  # (n_i, n_o)
    truth = unflatten(flatten(u, ishapes) @ J, oshapes)
    out = hg.mixed_vjp(f, inner, outer, u)
    assert set(out) == set(oshapes)
    err = (flatten(out, oshapes) - flatten(truth, oshapes)).norm() / flatten(truth, oshapes).norm()
    assert float(err) < 1e-12
    assert torch.equal(out["unused"], torch.zeros(3, dtype=F64))
    assert float(flatten(truth, oshapes).norm()) > 1e-3


# --- the loop fallback of batched products (an operation with no batching rule) ------------

class _CubeGrad(torch.autograd.Function):
    """``3 g x^2`` whose backward runs in NumPy: it cannot be vmapped (no batching rule)."""

    @staticmethod
    def forward(ctx, g, x):
        ctx.save_for_backward(g, x)
        return 3 * g * x**2

    @staticmethod
    def backward(ctx, gg):
        g, x = (t.numpy() for t in ctx.saved_tensors)
        ggn = gg.numpy()
        return torch.from_numpy(3 * ggn * x**2), torch.from_numpy(6 * ggn * g * x)


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        return _CubeGrad.apply(g, ctx.saved_tensors[0])


def test_batched_products_fall_back_to_a_loop_without_a_batching_rule():
    g = generator(21)
    W = torch.randn(5, 4, generator=g, dtype=F64)
    a = torch.randn(5, generator=g, dtype=F64)
    x0 = torch.randn(4, generator=g, dtype=F64)
    V = torch.randn(3, 4, generator=g, dtype=F64)

    def f(p):
        return (a * _Cube.apply(W @ p["x"])).sum() + 0.5 * (p["x"] ** 2).sum()

    truth = V @ torch.func.hessian(lambda x: (a * (W @ x) ** 3).sum() + 0.5 * (x**2).sum())(x0)
    # Control: the one-backward batched product cannot run on this graph.
    p = {"x": x0.clone().requires_grad_(True)}
    grad = torch.autograd.grad(f(p), p["x"], create_graph=True)[0]
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad, p["x"], V, is_grads_batched=True)
    op = hg.HessianOperator(f, {"x": x0})
    for _ in range(2):  # the first call falls back; the second goes straight to the loop
        assert torch.allclose(op.matmat({"x": V})["x"], truth, rtol=1e-12, atol=1e-12)
