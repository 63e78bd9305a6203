"""hypergrad under torch.func.vmap and torch.compile: batched tasks and compiled solves.

**vmap vs loop.** An iMAML-style batch of tasks, each with its own inner solution and a shared
outer regulariser (centre ``w0``, strength ``exp(log_lam)``): per-task ridge regression (16
features) and per-task tanh MLPs (8-16-1, 161 parameters, inner solution from 100 full-batch
gradient steps under vmap). Contenders: a Python loop of ``implicit_grad`` calls (autograd
backend, what works without vmap) vs ``vmap(implicit_grad)`` (the ``torch.func`` backend), at
given inner solutions; and, for ``custom_root``, inner solve plus hypergradient (closed form for
ridge, 50 gradient steps for the MLP) by a loop of ``.backward()`` vs ``vmap(grad)``. Every
linear solve is a fixed 10-iteration CG (``tol=0``); the contenders' hypergradients agree to the
quoted relative difference.

**eager vs compiled.** A fixed-iteration solve (CG or MINRES, 10 iterations) on the
``HessianOperator`` of a tanh MLP 16-64-64-1 (batch 128, float32, 5,313 parameters), and
``implicit_grad`` with it, each timed per call including the Hessian's linearisation:
eager on the autograd backend (the default outside transforms), eager on the ``torch.func``
backend, and ``torch.compile(fullgraph=True)`` (inductor). The one-off compile time is reported
separately.

Run: ``python -m pytest benchmarks/bench_func_transforms.py --benchmark-enable -s``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from _common import markdown_table, median_times, mlp, quick_mode, rel_err
from torch import Tensor
from torch.func import functional_call, grad, vmap

import hypergrad as hg

ITERS = 10

# ---------------------------------------------------------------------------------------------
# vmap vs loop: per-task problems


@dataclass
class Tasks:
    name: str
    description: str
    lower: Callable[..., Tensor]  # (inner, outer, X, y) -> scalar
    upper: Callable[..., Tensor]  # (inner, outer, V, z) -> scalar
    solve: Callable[..., dict[str, Tensor]]  # (outer, X, y) -> the task's inner solution
    inner: dict[str, Tensor]  # per-task inner solutions, leading task dimension
    outer: dict[str, Tensor]  # shared
    data: tuple[Tensor, ...]  # (X, y, V, z), leading task dimension

    @property
    def count(self) -> int:
        return self.data[0].shape[0]


def _prox(inner: dict[str, Tensor], outer: dict[str, Tensor]) -> Tensor:
    r""":math:`\tfrac{\lambda}{2}\|w - w_0\|^2` over every leaf (``outer["w0"]`` holds one entry per leaf)."""
    return 0.5 * outer["log_lam"].exp() * sum(((inner[k] - outer["w0." + k]) ** 2).sum() for k in inner)


def ridge_tasks(count: int, d: int = 16, n: int = 32) -> Tasks:
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(count, n, d, generator=g), torch.randn(count, n, generator=g)
    V, z = torch.randn(count, n, d, generator=g), torch.randn(count, n, generator=g)
    outer = {"w0.w": 0.1 * torch.randn(d, generator=g), "log_lam": torch.tensor(-1.0)}

    def lower(i, o, X, y):
        return 0.5 * ((X @ i["w"] - y) ** 2).mean() + _prox(i, o)

    def upper(i, o, V, z):
        return 0.5 * ((V @ i["w"] - z) ** 2).mean()

    def solve(o: dict[str, Tensor], X: Tensor, y: Tensor) -> dict[str, Tensor]:
        lam = o["log_lam"].exp()
        A = X.mT @ X / n + lam * torch.eye(d)
        return {"w": torch.linalg.solve(A, (X.mT @ y.unsqueeze(-1)).squeeze(-1) / n + lam * o["w0.w"])}

    return Tasks("ridge", f"{count} ridge tasks, {d} features, {n} samples each", lower, upper, solve,
                 solve(outer, X, y), outer, (X, y, V, z))


def mlp_tasks(count: int, n: int = 32) -> Tasks:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    net = mlp([8, 16, 1])
    meta_init = {k: v.detach() for k, v in net.named_parameters()}
    X, y = torch.randn(count, n, 8, generator=g), torch.randn(count, n, 1, generator=g)
    V, z = torch.randn(count, n, 8, generator=g), torch.randn(count, n, 1, generator=g)
    outer: dict[str, Tensor] = {"w0." + k: v for k, v in meta_init.items()}
    outer["log_lam"] = torch.tensor(-1.0)

    def lower(i, o, X, y):
        return 0.5 * ((functional_call(net, i, (X,)) - y) ** 2).mean() + _prox(i, o)

    def upper(i, o, V, z):
        return 0.5 * ((functional_call(net, i, (V,)) - z) ** 2).mean()

    def solve(o: dict[str, Tensor], X: Tensor, y: Tensor) -> dict[str, Tensor]:
        """The inner solve: 50 gradient steps from the meta-initialisation (vmappable)."""
        p = {k: o["w0." + k] for k in meta_init}
        for _ in range(50):
            gp = grad(lower)(p, o, X, y)
            p = {k: p[k] - 0.5 * gp[k] for k in p}
        return p

    n_params = sum(v.numel() for v in meta_init.values())
    return Tasks("mlp", f"{count} tanh MLP 8-16-1 tasks ({n_params} parameters each), {n} samples each",
                 lower, upper, solve, vmap(solve, in_dims=(None, 0, 0))(outer, X, y), outer, (X, y, V, z))


def _one_task(tasks: Tasks) -> Callable[..., hg.Tree]:
    solver = hg.CG(maxiter=ITERS, tol=0.0)

    def one(inner: dict[str, Tensor], X: Tensor, y: Tensor, V: Tensor, z: Tensor) -> hg.Tree:
        return hg.implicit_grad(lambda i, o: tasks.lower(i, o, X, y), lambda i, o: tasks.upper(i, o, V, z),
                                inner, tasks.outer, solver=solver, stationarity_tol=None)[0]

    return one


def _root_task(tasks: Tasks) -> Callable[..., Tensor]:
    fit = hg.custom_root(tasks.lower, solver=hg.CG(maxiter=ITERS, tol=0.0))(tasks.solve)

    def loss(outer: dict[str, Tensor], X: Tensor, y: Tensor, V: Tensor, z: Tensor) -> Tensor:
        return tasks.upper(fit(outer, X, y), outer, V, z)

    return loss


def _task(tasks: Tasks, t: int) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
    return {k: v[t] for k, v in tasks.inner.items()}, tuple(d[t] for d in tasks.data)


def vmap_contenders(tasks: Tasks) -> dict[str, Callable[[], Any]]:
    one, loss = _one_task(tasks), _root_task(tasks)

    def loop_implicit() -> hg.Tree:
        outs = []
        for t in range(tasks.count):
            inner, data = _task(tasks, t)
            outs.append(one(inner, *data))
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}

    def loop_root() -> hg.Tree:
        outs = []
        for t in range(tasks.count):
            outer = {k: v.clone().requires_grad_(True) for k, v in tasks.outer.items()}
            loss(outer, *_task(tasks, t)[1]).backward()
            outs.append({k: v.grad for k, v in outer.items()})
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}

    return {
        "implicit_grad: loop": loop_implicit,
        "implicit_grad: vmap": lambda: vmap(one)(tasks.inner, *tasks.data),
        "custom_root (inner solve + hypergradient): loop of .backward()": loop_root,
        "custom_root (inner solve + hypergradient): vmap(grad)": lambda: vmap(
            grad(loss), in_dims=(None, 0, 0, 0, 0))(tasks.outer, *tasks.data),
    }


@functools.cache
def all_tasks() -> dict[str, Tasks]:
    count = 8 if quick_mode() else 32
    return {"ridge": ridge_tasks(count), "mlp": mlp_tasks(count)}


def measure_vmap(rounds: int, budget_s: float) -> dict[str, tuple[str, list[dict[str, object]]]]:
    results = {}
    for name, tasks in all_tasks().items():
        calls = vmap_contenders(tasks)
        times = median_times(calls, rounds=rounds, budget_s=budget_s)
        outs = {label: fn() for label, fn in calls.items()}
        rows = []
        labels = list(calls)
        for loop_label, vmap_label in zip(labels[::2], labels[1::2], strict=True):
            for label in (loop_label, vmap_label):
                rows.append({
                    "contender": label,
                    "time / batch (ms)": 1e3 * times[label],
                    "time / task (ms)": 1e3 * times[label] / tasks.count,
                    "loop ÷ this": times[loop_label] / times[label],
                    "rel. diff vs loop": rel_err(outs[label], outs[loop_label]),
                })
        results[name] = (tasks.description, rows)
    return results


# ---------------------------------------------------------------------------------------------
# eager vs compiled


@dataclass
class Network:
    lower: Callable[..., Tensor]
    upper: Callable[..., Tensor]
    params: dict[str, Tensor]
    outer: dict[str, Tensor]
    b: dict[str, Tensor]
    description: str


@functools.cache
def network() -> Network:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    width, batch = (32, 64) if quick_mode() else (64, 128)
    net = mlp([16, width, width, 1])
    X, y = torch.randn(batch, 16, generator=g), torch.randn(batch, 1, generator=g)
    Xv, yv = torch.randn(batch, 16, generator=g), torch.randn(batch, 1, generator=g)
    run = hg.functional(net)

    def lower(p, o):
        return ((run(p, X) - y) ** 2).mean() + 0.5 * o["log_lam"].exp() * sum((t ** 2).sum() for t in p.values())

    def upper(p, o):
        return ((run(p, Xv) - yv) ** 2).mean()

    params = {k: v.detach() for k, v in net.named_parameters()}
    b = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
    n = sum(v.numel() for v in params.values())
    return Network(lower, upper, params, {"log_lam": torch.tensor(-2.0)}, b,
                   f"tanh MLP 16-{width}-{width}-1, batch {batch}, float32, {n} parameters")


def compile_cases(net: Network) -> dict[str, Callable[..., Any]]:
    def solve_with(solver: hg.Solver) -> Callable[..., Any]:
        def solve(params: hg.Tree, b: hg.Tree, backend: str = "auto") -> hg.Tree:
            op = hg.HessianOperator(lambda p: net.lower(p, net.outer), params, backend=backend)  # type: ignore[arg-type]
            return solver.solve(op, b).value

        return solve

    def hypergrad(params: hg.Tree, b: hg.Tree, backend: str = "auto") -> hg.Tree:
        return hg.implicit_grad(net.lower, net.upper, params, net.outer, solver=hg.CG(maxiter=ITERS, tol=0.0),
                                stationarity_tol=None, backend=backend)[0]  # type: ignore[arg-type]

    return {f"CG x{ITERS}": solve_with(hg.CG(maxiter=ITERS, tol=0.0)),
            f"MINRES x{ITERS}": solve_with(hg.MINRES(maxiter=ITERS, tol=0.0)),
            f"implicit_grad (CG x{ITERS})": hypergrad}


def measure_compile(rounds: int, budget_s: float) -> dict[str, tuple[str, list[dict[str, object]]]]:
    net = network()
    rows = []
    for name, fn in compile_cases(net).items():
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True)
        t0 = time.perf_counter()
        out_c = compiled(net.params, net.b)
        compile_s = time.perf_counter() - t0
        calls = {"eager, autograd": lambda fn=fn: fn(net.params, net.b, "autograd"),
                 "eager, func": lambda fn=fn: fn(net.params, net.b, "func"),
                 "compiled": functools.partial(compiled, net.params, net.b)}
        times = median_times(calls, rounds=rounds, budget_s=budget_s)
        ref = calls["eager, autograd"]()
        for label in calls:
            rows.append({
                "computation": name,
                "contender": label,
                "time / call (ms)": 1e3 * times[label],
                "eager autograd ÷ this": times["eager, autograd"] / times[label],
                "rel. diff vs eager": rel_err(calls[label]() if label != "compiled" else out_c, ref),
                "compile time (s)": compile_s if label == "compiled" else "-",
            })
    return {"mlp": (net.description, rows)}


def measure(rounds: int = 5, budget_s: float = 20.0) -> dict[str, tuple[str, list[dict[str, object]]]]:
    out = {f"vmap-{k}": v for k, v in measure_vmap(rounds, budget_s).items()}
    out.update({f"compile-{k}": v for k, v in measure_compile(rounds, budget_s).items()})
    return out


VMAP_COLUMNS = ["contender", "time / batch (ms)", "time / task (ms)", "loop ÷ this", "rel. diff vs loop"]
COMPILE_COLUMNS = ["computation", "contender", "time / call (ms)", "eager autograd ÷ this", "rel. diff vs eager",
                   "compile time (s)"]


def tables(results: dict[str, tuple[str, list[dict[str, object]]]]) -> str:
    return "\n".join(
        f"#### `{name}`: {description}\n\n"
        f"{markdown_table(rows, VMAP_COLUMNS if name.startswith('vmap') else COMPILE_COLUMNS)}\n"
        for name, (description, rows) in results.items())


# ---------------------------------------------------------------------------------------------
# pytest-benchmark entry points

VMAP_IDS = [(t, i) for t in ("ridge", "mlp") for i in range(4)]


@pytest.mark.parametrize(("task_name", "index"), VMAP_IDS, ids=[f"{t}-{i}" for t, i in VMAP_IDS])
def test_vmap_vs_loop(benchmark: pytest.FixtureRequest, task_name: str, index: int) -> None:
    tasks = all_tasks()[task_name]
    calls = vmap_contenders(tasks)
    labels = list(calls)
    out = benchmark.pedantic(calls[labels[index]], rounds=3, warmup_rounds=1)
    benchmark.extra_info["contender"] = labels[index]
    loop = calls[labels[index - index % 2]]()  # contenders come in (loop, vmap) pairs
    benchmark.extra_info.update({"tasks": tasks.count, "rel_diff_vs_loop": rel_err(out, loop)})
    assert rel_err(out, loop) < 1e-4


@pytest.mark.parametrize("case", [f"CG x{ITERS}", f"MINRES x{ITERS}", f"implicit_grad (CG x{ITERS})"])
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_eager_vs_compiled(benchmark: pytest.FixtureRequest, case: str, mode: str) -> None:
    net = network()
    fn = compile_cases(net)[case]
    torch._dynamo.reset()
    call = (lambda: fn(net.params, net.b)) if mode == "eager" else functools.partial(
        torch.compile(fn, fullgraph=True), net.params, net.b)
    out = benchmark.pedantic(call, rounds=3, warmup_rounds=1)
    assert rel_err(out, fn(net.params, net.b)) < 1e-4


def test_table(capsys: pytest.CaptureFixture[str]) -> None:
    """All contenders timed side by side in one process; prints the markdown tables."""
    text = tables(measure(rounds=3, budget_s=3.0))
    with capsys.disabled():
        print("\n" + text)
    assert "vmap" in text
