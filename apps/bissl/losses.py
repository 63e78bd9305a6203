"""SimCLR NT-Xent loss, single-process and across distributed ranks.

Public names: :func:`nt_xent`, :class:`NTXentLoss`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NTXentLoss", "nt_xent"]


def _check_temperature(temperature: float) -> None:
    if not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0, e.g. 0.5")


class _GatherWithGrad(torch.autograd.Function):
    """All-gather with a gradient: forward concatenates every rank's (n, D) rows in rank order;
    backward sums the gathered gradient over ranks (every rank's loss uses every row) and
    returns this rank's n rows."""

    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        ctx.rows = (dist.get_rank() * z.shape[0], z.shape[0])
        return torch.cat(parts, dim=0)  # (W * n, D)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start, n = ctx.rows
        return grad[start : start + n]


def _gather(z: Tensor) -> Tensor:
    """Concatenate ``z`` (n, D) from all ranks in rank order -> (W * n, D), differentiable."""
    return _GatherWithGrad.apply(z)


def nt_xent(
    z1: Tensor, z2: Tensor, temperature: float, *, gather_distributed: bool = True
) -> Tensor:
    r"""SimCLR NT-Xent loss of two batches of embeddings.

    With :math:`\hat z` the L2-normalised embeddings of both views (2N anchors) and
    :math:`s_{ij} = \hat z_i \cdot \hat z_j / \tau`, anchor :math:`i` with positive :math:`p(i)`
    (the other view of the same image) has loss
    :math:`-s_{i p(i)} + \log \sum_{j \ne i} e^{s_{ij}}`; the result is the mean over anchors.

    Distributed: when ``torch.distributed`` is initialised with world size W > 1 and
    ``gather_distributed`` is True, every rank's embeddings are all-gathered (gradient flows back
    to the rank that produced them). Each rank returns the mean loss of its **local** 2n anchors
    against all 2Wn **global** candidates. The mean of these losses over ranks equals the
    single-process loss on the concatenated batch, and after DDP's gradient averaging (or an
    all-reduce mean of the parameter gradients) the parameter gradients equal the single-process
    ones. All ranks must pass the same batch size n.

    Args:
        z1: embeddings of view 1, (n, D).
        z2: embeddings of view 2, (n, D); row i is the positive of ``z1`` row i.
        temperature: :math:`\tau > 0`.
        gather_distributed: use negatives from all ranks (see above).

    Returns:
        Scalar loss tensor.

    Example:
        >>> z = torch.eye(4)
        >>> round(nt_xent(z, z, 0.5).item(), 4)  # log(e^2 + 6) - 2
        0.5944
    """
    _check_temperature(temperature)
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must both be (n, D) with equal shapes, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if z1.shape[0] == 0:
        raise ValueError("z1 and z2 are empty (n = 0); pass at least one pair")
    n = z1.shape[0]
    z1 = F.normalize(z1, dim=1)  # (n, D)
    z2 = F.normalize(z2, dim=1)  # (n, D)

    distributed = gather_distributed and dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    if world > 1:
        rank = dist.get_rank()
        candidates = torch.cat([_gather(z1), _gather(z2)], dim=0)  # (2N, D), N = W * n
    else:
        rank = 0
        candidates = torch.cat([z1, z2], dim=0)  # (2N, D), N = n
    big_n = world * n

    anchors = torch.cat([z1, z2], dim=0)  # (2n, D): local anchors
    logits = anchors @ candidates.T / temperature  # (2n, 2N)
    local = (
        torch.arange(n, device=z1.device) + rank * n
    )  # global index of local row in a view block
    self_cols = torch.cat([local, local + big_n])  # (2n,): each anchor's own column
    positive_cols = torch.cat([local + big_n, local])  # (2n,): the other view of the same image
    rows = torch.arange(2 * n, device=z1.device)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[rows, self_cols] = True
    logits = logits.masked_fill(is_self, float("-inf"))  # mask self-similarity
    return F.cross_entropy(logits, positive_cols)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent`; the temperature is validated at construction.

    Args:
        temperature: :math:`\\tau > 0` (reference: 0.5).
        gather_distributed: use negatives from all ranks when distributed.
    """

    def __init__(self, temperature: float, *, gather_distributed: bool = True) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """Loss of embeddings ``z1``, ``z2`` (n, D) -> scalar."""
        return nt_xent(z1, z2, self.temperature, gather_distributed=self.gather_distributed)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"
