"""The hand-written reference: what the BiSSL code does, in plain PyTorch (no hypergrad).

Every product rebuilds the first-order graph (a fresh forward pass and a ``create_graph=True``
backward, then a second backward), and the solver is the reference code's "layerwise" CG:
step sizes per parameter tensor, 5 iterations from zero, no tolerance, so exactly 5 products.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .workload import Params


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


def layerwise_cg(product: Callable[[Mapping[str, Tensor]], Params], b: Mapping[str, Tensor], iterations: int,
                 callback: Callable[[int, Params], None] | None = None) -> Params:
    """The reference code's CG: per tensor, alpha = r.r / d.Ad and beta = r'.r' / r.r; x0 = 0."""
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
