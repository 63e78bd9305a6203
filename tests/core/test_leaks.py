"""No leaks over long bilevel loops: 1,000 outer steps of ``implicit_grad`` and of
``custom_root`` + ``backward`` keep the number of live tensors (and, on CUDA, the allocated
bytes) flat between step 100 and step 1,000, and no reference cycle keeps a graph alive.

Positive controls: a loop that keeps every step's graph in a list fails the flatness check, and
a step that parks its graph in a reference cycle fails the cycle check.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch
from core_helpers import F64, generator

import hypergrad as hg

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA device"))]
SOLVER = hg.CG(maxiter=6, tol=1e-10)


class _TinyRidge:
    """Ridge regression with d = 3 on the given device; outer variable log L2 strength."""

    def __init__(self, device: str) -> None:
        g = generator(0)
        self.X = torch.randn(12, 3, generator=g, dtype=F64).to(device)
        self.y = torch.randn(12, generator=g, dtype=F64).to(device)
        self.Xv = torch.randn(8, 3, generator=g, dtype=F64).to(device)
        self.yv = torch.randn(8, generator=g, dtype=F64).to(device)
        self.eye = torch.eye(3, dtype=F64, device=device)

    def lower(self, i, o):
        return 0.5 * ((self.X @ i["w"] - self.y) ** 2).mean() + 0.5 * torch.exp(o["l"]) * (i["w"] ** 2).sum()

    def upper(self, i, o):
        return 0.5 * ((self.Xv @ i["w"] - self.yv) ** 2).mean() + 0.01 * o["l"] ** 2

    def solve(self, log_lam):
        A = self.X.T @ self.X / len(self.y) + torch.exp(log_lam) * self.eye
        return torch.linalg.solve(A, self.X.T @ self.y / len(self.y))


def _steps(prob: _TinyRidge) -> dict[str, Callable[[dict], torch.Tensor]]:
    """One outer SGD step of each kind; each returns the upper loss it differentiated."""

    @hg.custom_root(prob.lower, solver=SOLVER)
    def fit(outer):
        return {"w": prob.solve(outer["l"])}

    def implicit(state):
        outer = {"l": state["l"]}
        grads, stats = hg.implicit_grad(prob.lower, prob.upper, {"w": prob.solve(state["l"])}, outer,
                                        solver=SOLVER)
        state["l"] = state["l"] - 0.01 * grads["l"]
        return stats.upper_loss

    def root(state):
        log_lam = state["l"].clone().requires_grad_(True)
        outer = {"l": log_lam}
        loss = prob.upper(fit(outer), outer)
        loss.backward()
        state["l"] = (log_lam - 0.01 * log_lam.grad).detach()
        return loss

    return {"implicit_grad": implicit, "custom_root": root}


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def _footprint(step: Callable[[dict], torch.Tensor], device: str, keep: list | None = None) -> dict[int, tuple]:
    """(live tensors, CUDA bytes) after step 100 and step 1,000; ``keep`` collects every loss."""
    state = {"l": torch.tensor(-0.5, dtype=F64, device=device)}
    seen = {}
    for n in range(1, 1001):
        loss = step(state)
        if keep is not None:
            keep.append(loss)
        del loss
        if n in (100, 1000):
            cuda = torch.cuda.memory_allocated() if device == "cuda" else 0
            seen[n] = (_live_tensors(), cuda)
    return seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["implicit_grad", "custom_root"])
def test_thousand_outer_steps_keep_memory_flat(kind, device):
    seen = _footprint(_steps(_TinyRidge(device))[kind], device)
    assert seen[1000] == seen[100]


def test_a_loop_that_keeps_its_graphs_fails_the_check():
    """Positive control: keeping every loss (with its graph) grows the count by ~1 per step."""
    kept: list = []
    seen = _footprint(_steps(_TinyRidge("cpu"))["custom_root"], "cpu", keep=kept)
    assert seen[1000][0] - seen[100][0] >= 900
    assert seen[1000] != seen[100]


def _cyclic_tensors(step: Callable[[dict], torch.Tensor], park_in_cycle: bool = False) -> tuple[int, bool]:
    """Run one step with the cycle collector off and drop every reference: returns how many
    tensors only the collector can free (held by a cycle) and whether the loss outlived its
    last reference."""
    state = {"l": torch.tensor(-0.5, dtype=F64)}
    step(state)  # warm-up (lazy imports, caches)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        loss = step(state)
        ref = weakref.ref(loss)
        if park_in_cycle:
            holder: dict = {"loss": loss}
            holder["self"] = holder
            del holder
        del loss
        alive = ref() is not None
        gc.collect()
        cyclic = sum(1 for obj in gc.garbage if issubclass(type(obj), torch.Tensor))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    return cyclic, alive


@pytest.mark.parametrize("kind", ["implicit_grad", "custom_root"])
def test_no_reference_cycle_keeps_a_graph_alive(kind):
    cyclic, alive = _cyclic_tensors(_steps(_TinyRidge("cpu"))[kind])
    assert cyclic == 0 and not alive


def test_a_graph_parked_in_a_cycle_fails_the_check():
    """Positive control for the cycle check."""
    cyclic, alive = _cyclic_tensors(_steps(_TinyRidge("cpu"))["custom_root"], park_in_cycle=True)
    assert cyclic >= 1 and alive
