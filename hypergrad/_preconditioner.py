r"""Randomised Nystrom preconditioner for :math:`(A + \mu I)\,x = b` with ``A`` positive semi-definite.

Following Frangella, Tropp & Udell (2023), a rank-``r`` sketch :math:`Y = A\Omega` with an
orthonormal Gaussian :math:`\Omega` (``r`` batched products) gives
:math:`\hat A = U \hat\Lambda U^\top \approx A`, and the preconditioner

.. math::
    P^{-1} = (\hat\lambda_r + \mu)\, U (\hat\Lambda + \mu I)^{-1} U^\top + (I - U U^\top),

which maps the top ``r`` eigenvalues of :math:`A + \mu I` close to :math:`\hat\lambda_r + \mu`.
Built once, it is reused for every solve with the same operator (BiSSL: 8 upper steps share one
Hessian).

**Indefinite operators.** The construction needs :math:`\Omega^\top A \Omega \succ 0`. When
the sketch shows a non-positive eigenvalue, :meth:`NystromPreconditioner.build` raises
:class:`IndefiniteSketchError` (sketch a damped operator instead, e.g. ``H + shift I``). When
the sketch happens to be positive definite although ``A`` is not, the eigenvalues are clamped
at 0 and ``P`` is still symmetric positive definite, so preconditioned CG stays well defined;
its curvature checks then report the indefiniteness.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ._errors import IndefiniteSketchError
from ._operator import DampedOperator, LinearOperator
from ._tree import Tree, accum_dtype

__all__ = ["NystromPreconditioner"]


def _flatten_batched(X: Mapping[str, Tensor], keys: list[str]) -> Tensor:
    k = X[keys[0]].shape[0]
    return torch.cat([X[key].reshape(k, -1) for key in keys], dim=1)


def _unflatten_batched(M: Tensor, like: Mapping[str, Tensor], keys: list[str]) -> Tree:
    sizes = [like[key].numel() for key in keys]
    parts = torch.split(M, sizes, dim=1)
    return {key: p.reshape((M.shape[0], *like[key].shape)).to(like[key].dtype)
            for key, p in zip(keys, parts, strict=True)}


@dataclass(frozen=True)
class NystromPreconditioner:
    r"""The map :math:`r \mapsto P^{-1} r` on batched trees; pass it as ``CG(preconditioner=...)``.

    Attributes:
        basis: ``U``, shape ``(n, r)`` (n = number of parameters).
        eigenvalues: :math:`\hat\Lambda` (clamped at 0), shape ``(r,)``, descending.
        mu: the shift :math:`\mu`.
        num_hvp: products spent on the sketch.
    """

    basis: Tensor
    eigenvalues: Tensor
    mu: float
    num_hvp: int
    like: dict[str, Tensor]

    @classmethod
    def build(cls, operator: LinearOperator, like: Mapping[str, Tensor], rank: int, *, mu: float = 0.0,
              generator: torch.Generator | None = None) -> NystromPreconditioner:
        r"""Sketch ``operator`` (assumed PSD) with ``rank`` batched products.

        Args:
            operator: the PSD part ``A``.
            like: a tree with the operator's shapes, dtypes and device (e.g. the parameters).
            rank: sketch size ``r`` (1 <= r <= n).
            mu: shift of the system being preconditioned, :math:`A + \mu I`.
            generator: random generator for the Gaussian test matrix.
        """
        keys = list(like)
        n = sum(like[k].numel() for k in keys)
        if not isinstance(rank, int) or not 1 <= rank <= n:
            raise ValueError(f"rank must be an int in [1, {n}] (the number of parameters), got {rank!r}")
        if mu < 0:
            raise ValueError(f"mu must be >= 0, got {mu}")
        ref = like[keys[0]]
        dtype = accum_dtype(ref.dtype)
        omega = torch.randn(n, rank, generator=generator, dtype=dtype, device="cpu").to(ref.device)
        omega, _ = torch.linalg.qr(omega)  # (n, r), orthonormal columns
        Y = _flatten_batched(operator.matmat(_unflatten_batched(omega.mT, like, keys)), keys).mT.to(dtype)
        shift = torch.finfo(dtype).eps * n**0.5 * torch.linalg.matrix_norm(Y, ord=2)
        Y = Y + shift * omega
        core = omega.mT @ Y
        core = (core + core.mT) / 2
        chol, info = torch.linalg.cholesky_ex(core)
        if int(info) != 0:
            smallest = float(torch.linalg.eigvalsh(core)[0] - shift)
            raise IndefiniteSketchError(
                f"the Nystrom sketch Omega^T A Omega has eigenvalue {smallest:.3g} <= 0, so the operator "
                f"is not positive semi-definite; sketch a damped operator (H + shift*I with shift > "
                f"{-smallest:.3g}) or solve with MINRES without this preconditioner"
            )
        B = torch.linalg.solve_triangular(chol, Y.mT, upper=False).mT  # Y C^{-T}, (n, r)
        U, sigma, _ = torch.linalg.svd(B, full_matrices=False)
        eig = (sigma**2 - shift).clamp_min(0.0)
        # Keep only the numerically positive part of the sketch: a zero lambda_r with mu = 0 would
        # make the numerator lambda_r + mu vanish and P^{-1} singular.
        keep = eig > eig[0] * n * torch.finfo(dtype).eps if eig[0] > 0 else torch.zeros_like(eig, dtype=torch.bool)
        U, eig = U[:, keep], eig[keep]
        return cls(basis=U, eigenvalues=eig, mu=float(mu), num_hvp=rank,
                   like={k: v.detach() for k, v in like.items()})

    @classmethod
    def from_damped(cls, operator: DampedOperator, like: Mapping[str, Tensor], rank: int, *,
                    generator: torch.Generator | None = None) -> NystromPreconditioner:
        r"""For :math:`aI + bB`: sketch ``B`` (must be PSD) with :math:`\mu = a/b` (scale is irrelevant to CG)."""
        if operator.operator_coeff <= 0:
            raise ValueError(f"operator_coeff must be > 0 to precondition, got {operator.operator_coeff}")
        return cls.build(operator.base, like, rank, mu=operator.identity_coeff / operator.operator_coeff,
                         generator=generator)

    def __call__(self, R: Tree) -> Tree:
        if self.eigenvalues.numel() == 0:  # the sketch saw only zero eigenvalues: P = I
            return dict(R)
        keys = list(self.like)
        flat = _flatten_batched(R, keys).to(self.basis.dtype)  # (k, n)
        coeff = flat @ self.basis  # (k, r)
        denom = self.eigenvalues + self.mu
        top = self.eigenvalues[-1] + self.mu
        ratio = torch.where(denom > 0, top / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.ones_like(denom))
        out = flat + (coeff * (ratio - 1)) @ self.basis.mT
        return _unflatten_batched(out, self.like, keys)
