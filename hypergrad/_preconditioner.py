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
the sketch happens to be positive definite although ``A`` is not, eigenvalues at rounding
level are dropped and ``P`` is still symmetric positive definite, so preconditioned CG stays
well defined; its curvature checks then report the indefiniteness.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ._errors import IndefiniteSketchError, NystromRankWarning
from ._operator import DampedOperator, LinearOperator
from ._tree import Tree, accum_dtype

__all__ = ["NystromPreconditioner"]


def _flatten_batched(X: Mapping[str, Tensor], keys: list[str]) -> Tensor:
    k = X[keys[0]].shape[0]
    return torch.cat([X[key].reshape(k, -1) for key in keys], dim=1)


def _gram64(A: Tensor, B: Tensor, chunk: int = 1 << 20) -> Tensor:
    """``A^T B`` accumulated in float64 over row chunks (no float64 copy of a tall ``A`` or ``B``)."""
    out = A.new_zeros((A.shape[1], B.shape[1]), dtype=torch.float64)
    for start in range(0, A.shape[0], chunk):
        out += A[start:start + chunk].double().mT @ B[start:start + chunk].double()
    return out


def _unflatten_batched(M: Tensor, like: Mapping[str, Tensor], keys: list[str]) -> Tree:
    sizes = [like[key].numel() for key in keys]
    parts = torch.split(M, sizes, dim=1)
    return {key: p.reshape((M.shape[0], *like[key].shape)).to(like[key].dtype)
            for key, p in zip(keys, parts, strict=True)}


@dataclass(frozen=True)
class NystromPreconditioner:
    r"""The map :math:`r \mapsto P^{-1} r` on batched trees; pass it as ``CG(preconditioner=...)``.

    The sketch's small ``r x r`` algebra (core, eigendecompositions, Gram matrices) runs in
    float64 and the ``n x r`` matrices in the operator's precision (at least float32).
    :math:`\hat A = Y (\Omega^\top Y)^+ Y^\top` with the pseudo-inverse over the core's
    eigenvalues above its rounding level :math:`\tau = 10\,\epsilon\sqrt r\,\max|d|` (relative,
    so it does not grow with n; no stabilising shift, whose n copies would bias the sketch at
    large n); :attr:`rank` says how many were kept, and keeping none warns
    (:class:`NystromRankWarning`).

    Attributes:
        basis: ``U``, shape ``(n, rank)`` (n = number of parameters).
        eigenvalues: :math:`\hat\Lambda` above the rounding level, shape ``(rank,)``, descending.
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
        work = accum_dtype(ref.dtype)  # the sketch's n x r matrices: float32 at least
        omega = torch.randn(n, rank, generator=generator, dtype=work, device="cpu").to(ref.device)
        omega, _ = torch.linalg.qr(omega)  # (n, r), orthonormal columns
        Y = _flatten_batched(operator.matmat(_unflatten_batched(omega.mT, like, keys)), keys).mT.to(work)
        # The core Omega^T A Omega, accumulated in float64. Rounding of the products perturbs it by
        # about eps * sqrt(r) * ||core|| whatever n is, so its eigenvalues above
        # tau = 10 eps sqrt(r) max|eig| are measured; the pseudo-inverse over them (no stabilising
        # shift, whose n - r copies would bias the sketch as n grows) gives A_hat = Y core^+ Y^T.
        core = _gram64(omega, Y)  # r x r
        core = (core + core.mT) / 2
        d, V = torch.linalg.eigh(core)  # ascending
        tau = 10.0 * torch.finfo(work).eps * rank**0.5 * float(d.abs().max())
        if float(d[0]) < -tau:
            smallest = float(d[0])
            raise IndefiniteSketchError(
                f"the Nystrom sketch Omega^T A Omega has eigenvalue {smallest:.3g} < 0, so the operator "
                f"is not positive semi-definite; sketch a damped operator (H + shift*I with shift > "
                f"{-smallest:.3g}) or solve with MINRES without this preconditioner"
            )
        measured = d > tau
        if not bool(measured.any()):
            warnings.warn(
                f"NystromPreconditioner: none of the {rank} sketched eigenvalues is above the rounding level "
                f"(largest {float(d[-1]):.3g}), so the preconditioner is the identity and CG runs "
                f"unpreconditioned after {rank} products; the operator's top eigenvalues are ~0 at this "
                f"precision: check the operator, or drop the preconditioner",
                NystromRankWarning, stacklevel=2)
            return cls(basis=Y.new_zeros(n, 0), eigenvalues=Y.new_zeros(0), mu=float(mu), num_hvp=rank,
                       like={k: v.detach() for k, v in like.items()})
        B = Y @ (V[:, measured] * d[measured].rsqrt()).to(work)  # B B^T = A_hat, (n, m), full column rank
        sigma2, W = torch.linalg.eigh(_gram64(B, B))  # ascending; the eigenvalues of A_hat
        sigma2, W = sigma2.flip(0).clamp_min(torch.finfo(torch.float64).tiny), W.flip(1)
        U = B @ (W * sigma2.rsqrt()).to(work)  # left singular vectors of B, (n, m)
        return cls(basis=U, eigenvalues=sigma2.to(work), mu=float(mu), num_hvp=rank,
                   like={k: v.detach() for k, v in like.items()})

    @property
    def rank(self) -> int:
        """Eigenpairs kept from the sketch (at most the sketch size ``num_hvp``)."""
        return int(self.basis.shape[1])

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
