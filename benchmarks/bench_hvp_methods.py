"""Hessian-vector product methods side by side: time per product and error vs reverse mode.

Models (float32, cross-entropy on random data, train mode):

* ``mlp``: a tanh MLP 64-256-256-10, batch 128 (smooth, so finite differences are fair).
* ``resnet``: a narrow CIFAR-style ResNet (widths 16/32/64, one basic block per stage,
  BatchNorm, ReLU) on 32x32 images, batch 8. (torchvision's resnet18 costs ~1 s per gradient
  on the shared 2-core machine, too slow for the whole suite to stay under a few minutes.)

Methods: reverse-over-reverse rebuilding the graph per product (the BiSSL reference code's
way), reverse reusing one ``create_graph`` gradient graph, reverse batched over k tangents
(``is_grads_batched``), forward-over-reverse (``torch.func.jvp`` of ``grad``), ``vmap`` of
forward-over-reverse over k tangents, and central finite differences of gradients.

Run: ``python -m pytest benchmarks/bench_hvp_methods.py --benchmark-enable -s``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from _common import TinyResNet, markdown_table, median_times, mlp, quick_mode, rel_err
from torch import Tensor

import hypergrad as hg

K = 4  # tangents per batched call


@dataclass
class Model:
    name: str
    f: Callable[[hg.Tree], Tensor]
    params: dict[str, Tensor]
    tangents: dict[str, Tensor]  # (K, *shape) per leaf
    description: str

    def tangent(self, i: int = 0) -> dict[str, Tensor]:
        return {k: t[i] for k, t in self.tangents.items()}


def _model(name: str, net: torch.nn.Module, x: Tensor, y: Tensor, description: str) -> Model:
    run = hg.functional(net)  # BN buffers cloned per call: pure, usable under torch.func

    def f(p: hg.Tree) -> Tensor:
        return F.cross_entropy(run(p, x), y)

    params = {k: t.detach() for k, t in net.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    tangents = {k: torch.randn((K, *t.shape), generator=gen) for k, t in params.items()}
    n = sum(t.numel() for t in params.values())
    return Model(name, f, params, tangents, f"{description}, {n} parameters")


@functools.cache
def models() -> dict[str, Model]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    batch = 32 if quick_mode() else 128
    out = {"mlp": _model("mlp", mlp([64, 256, 256, 10]), torch.randn(batch, 64, generator=gen),
                         torch.randint(0, 10, (batch,), generator=gen), f"tanh MLP 64-256-256-10, batch {batch}")}
    net = TinyResNet((8, 16, 32) if quick_mode() else (16, 32, 64)).train()
    out["resnet"] = _model("resnet", net, torch.randn(8, 3, 32, 32, generator=gen),
                           torch.randint(0, 10, (8,), generator=gen),
                           "narrow ResNet (BN, ReLU) 32x32, batch 8")
    return out


@dataclass
class Method:
    name: str
    products: int  # products per call
    make: Callable[[Model], Callable[[], hg.Tree]]  # -> a call returning the products (tangent 0 first)


def _reuse(model: Model, batched: bool) -> Callable[[], hg.Tree]:
    op = hg.HessianOperator(model.f, model.params)
    op.gradient_graph()  # built once outside the timed call (its cost is the "gradient graph" row)
    if batched:
        return lambda: op.matmat(model.tangents)
    v = model.tangent()
    return lambda: op.mv(v)


METHODS = [
    Method("gradient (unit of cost)", 1, lambda m: functools.partial(hg.gradient, m.f, m.params)),
    Method("gradient graph build (create_graph, once per point)", 1,
           lambda m: lambda: hg.HessianOperator(m.f, m.params).gradient_graph()),
    Method("reverse, rebuild graph per product", 1,
           lambda m: functools.partial(hg.hvp, m.f, m.params, m.tangent())),
    Method("reverse, reuse graph", 1, lambda m: _reuse(m, batched=False)),
    Method(f"reverse, reuse graph, batched (is_grads_batched, k={K})", K, lambda m: _reuse(m, batched=True)),
    Method("forward-over-reverse", 1,
           lambda m: functools.partial(hg.hvp, m.f, m.params, m.tangent(), method="forward")),
    Method(f"forward-over-reverse, vmap (k={K})", K,
           lambda m: functools.partial(hg.hvp_batched, m.f, m.params, m.tangents, method="forward")),
    Method("finite differences (central)", 1,
           lambda m: functools.partial(hg.hvp, m.f, m.params, m.tangent(), method="finite_difference")),
]


def _first(out: hg.Tree | object, batched: bool) -> hg.Tree | None:
    if not isinstance(out, dict):
        return None
    return {k: t[0] for k, t in out.items()} if batched else out


def measure(rounds: int = 5, budget_s: float = 20.0) -> dict[str, tuple[str, list[dict[str, object]]]]:
    results = {}
    for name, model in models().items():
        calls = {m.name: m.make(model) for m in METHODS}
        times = median_times(calls, rounds=rounds, budget_s=budget_s)
        reference = hg.hvp(model.f, model.params, model.tangent())
        grad_time = times[METHODS[0].name]
        rebuild_time = times["reverse, rebuild graph per product"]
        rows = []
        for m in METHODS:
            per_product = times[m.name] / m.products
            is_hvp = "gradient" not in m.name
            first = _first(calls[m.name](), batched=m.products > 1) if is_hvp else None
            rows.append({
                "method": m.name,
                "products / call": m.products if is_hvp else "-",
                "time / product (ms)": 1e3 * per_product,
                "÷ gradient": per_product / grad_time,
                "÷ reverse rebuild": per_product / rebuild_time,
                "rel. error vs reverse": rel_err(first, reference) if first is not None else "-",
            })
        results[name] = (model.description, rows)
    return results


COLUMNS = ["method", "products / call", "time / product (ms)", "÷ gradient", "÷ reverse rebuild",
           "rel. error vs reverse"]


def tables(results: dict[str, tuple[str, list[dict[str, object]]]]) -> str:
    return "\n".join(f"#### `{name}`: {description}\n\n{markdown_table(rows, COLUMNS)}\n"
                     for name, (description, rows) in results.items())


# ---------------------------------------------------------------------------------------------
# pytest-benchmark entry points

IDS = [(model, i) for model in ("mlp", "resnet") for i in range(len(METHODS))]


@pytest.mark.parametrize(("model_name", "index"), IDS, ids=[f"{m}-{i}" for m, i in IDS])
def test_hvp_method(benchmark: pytest.FixtureRequest, model_name: str, index: int) -> None:
    model, method = models()[model_name], METHODS[index]
    call = method.make(model)
    out = benchmark.pedantic(call, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update({"model": model_name, "method": method.name, "products": method.products})
    first = _first(out, batched=method.products > 1) if "gradient" not in method.name else None
    if first is not None:
        err = rel_err(first, hg.hvp(model.f, model.params, model.tangent()))
        benchmark.extra_info["rel_error_vs_reverse"] = err
        if "finite" not in method.name:
            assert err < 1e-4


def test_table(capsys: pytest.CaptureFixture[str]) -> None:
    """All methods timed side by side in one process; prints the markdown tables."""
    text = tables(measure(rounds=3, budget_s=5.0))
    with capsys.disabled():
        print("\n" + text)
    assert "reverse" in text
