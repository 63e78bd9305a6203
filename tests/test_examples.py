"""The examples run in their small mode, and their first hypergradients are right.

Each example's first hypergradient (the one its outer loop steps along) is compared with float64
central finite differences of the outer loss *through the inner solver*: for every perturbed
outer point the inner problem is re-solved and then polished by dense Newton steps
(``torch.func.hessian`` + ``torch.linalg.solve``, independent of hypergrad) until the inner
gradient is at round-off level. Outcomes are checked too: the HPO example lowers its validation
loss, and the learned hyper-cleaning weights separate corrupted from clean examples.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
Tree = dict[str, torch.Tensor]


def _load(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _newton_polish(lower_loss: Callable[[Tree, Tree], torch.Tensor], outer: Tree, inner: Tree,
                   steps: int = 3) -> Tree:
    """Dense Newton steps on the flattened inner variables; asserts round-off stationarity."""
    keys = list(inner)
    shapes = [inner[k].shape for k in keys]
    sizes = [inner[k].numel() for k in keys]

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        return lower_loss({k: p.reshape(s) for k, p, s in zip(keys, parts, shapes, strict=True)}, outer)

    x = torch.cat([inner[k].reshape(-1) for k in keys]).detach()
    for _ in range(steps):
        g = torch.func.grad(f)(x)
        x = x - torch.linalg.solve(torch.func.hessian(f)(x), g)
    assert float(torch.func.grad(f)(x).norm()) < 1e-12
    parts = torch.split(x, sizes)
    return {k: p.reshape(s) for k, p, s in zip(keys, parts, shapes, strict=True)}


def _fd_check(module: ModuleType, problem, outer: Tree, key: str, h: float) -> None:
    """The example's first hypergradient vs central differences on its 3 largest coordinates."""
    inner, _ = module.solve_inner(problem.lower_loss, outer, problem.zeros())
    grads, stats = module.hypergradient(problem, inner, outer)
    assert stats.result.name == "CONVERGED"
    g = grads[key]
    coords = g.abs().argsort(descending=True)[:3].tolist()

    def outer_loss(o: Tree) -> float:
        solved, _ = module.solve_inner(problem.lower_loss, o, inner, tol=1e-12)  # warm start
        return float(problem.upper_loss(_newton_polish(problem.lower_loss, o, solved), o))

    for j in coords:
        e = torch.zeros_like(outer[key])
        e[j] = h
        fd = (outer_loss({key: outer[key] + e}) - outer_loss({key: outer[key] - e})) / (2 * h)
        assert abs(float(g[j]) - fd) <= 1e-5 * abs(fd), (j, float(g[j]), fd)


def test_digits_l2_hpo_first_hypergradient_matches_finite_differences() -> None:
    hpo = _load("digits_l2_hpo")
    problem = hpo.make_problem(n_train=200, n_val=200)  # the small mode's data
    outer = {"log_lam": torch.full((problem.num_features,), -4.0, dtype=torch.float64)}
    _fd_check(hpo, problem, outer, "log_lam", h=1e-4)


def test_digits_l2_hpo_small_mode_beats_its_start_and_plots(tmp_path: Path) -> None:
    hpo = _load("digits_l2_hpo")
    png = tmp_path / "hpo.png"
    traces = hpo.main(small=True, plot_path=str(png))
    descent, grid, rand = traces
    assert descent.val[-1] < descent.val[0]
    # the baselines get the same number of inner solves
    assert len(descent.val) == len(grid.val) == len(rand.val) >= 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_hypercleaning_first_hypergradient_matches_finite_differences() -> None:
    hc = _load("data_hypercleaning")
    problem = hc.make_problem(n_train=300, n_val=100)  # the small mode's data
    outer = {"a": torch.zeros(300, dtype=torch.float64)}
    _fd_check(hc, problem, outer, "a", h=1e-3)


def test_data_hypercleaning_small_mode_separates_corrupted_examples() -> None:
    hc = _load("data_hypercleaning")
    report = hc.main(small=True)
    # a broken hypergradient leaves the weights uninformative (AUC ~ 0.5)
    assert report.auc >= 0.75
    assert report.cleaned_acc > report.unweighted_acc


@pytest.mark.parametrize("name", ["digits_l2_hpo", "data_hypercleaning"])
def test_examples_use_only_the_public_api(name: str) -> None:
    source = (EXAMPLES / f"{name}.py").read_text()
    assert "hypergrad._" not in source and "from hypergrad." not in source
