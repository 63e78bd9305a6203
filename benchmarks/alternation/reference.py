"""The hand-written reference: what the BiSSL code does, in plain PyTorch (no hypergrad).

Every product rebuilds the first-order graph (a fresh forward pass and a ``create_graph=True``
backward, then a second backward), and the solver is the reference code's "layerwise" CG:
step sizes per parameter tensor, 5 iterations from zero, no tolerance, so exactly 5 products.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .._common import layerwise_cg
from .workload import Params

__all__ = ["CountingProduct", "layerwise_cg"]


class CountingProduct:
    """``u -> (I + H/c) u`` by double backward with the graph rebuilt per call; counts calls."""

    def __init__(self, f: Callable[[Mapping[str, Tensor]], Tensor], params: Mapping[str, Tensor], c: float) -> None:
        self.f, self.params, self.c = f, params, c
        self.calls = 0

    def hessian(self, u: Mapping[str, Tensor]) -> Params:
        """``H u`` alone."""
        self.calls += 1
        p = {k: t.detach().requires_grad_(True) for k, t in self.params.items()}
        grads = torch.autograd.grad(self.f(p), list(p.values()), create_graph=True)
        dot = sum((g * u[k]).sum() for g, k in zip(grads, p, strict=True))
        hu = torch.autograd.grad(dot, list(p.values()))
        return dict(zip(p, hu, strict=True))

    def __call__(self, u: Mapping[str, Tensor]) -> Params:
        hu = self.hessian(u)
        return {k: u[k] + hu[k] / self.c for k in u}
