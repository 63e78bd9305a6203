r"""The pretext-loss interface: ``loss(backbone_params, batch) -> scalar``.

One function of the backbone parameters serves SimCLR pretext training, BiSSL's lower steps and
the Hessian of BiSSL's implicit gradient, so the loss the lower level minimises is exactly the
loss whose Hessian the implicit function theorem needs. Another self-supervised objective (BYOL,
as in the paper's later versions) plugs in by writing one function of this shape.

The function is built with :func:`hypergrad.functional`: parameters missing from
``backbone_params`` (the projector's) keep the module's own tensors, so a backward through a
loss called with the module's own parameters trains backbone and projector, while a Hessian
taken with respect to ``backbone_params`` holds the projector fixed.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import Tensor, nn

import hypergrad
from bissl.losses import nt_xent

PretextBatch = tuple[Tensor, Tensor]
"""Two augmented views of the same images, each (n, C, H, W)."""

ViewPasses = Literal["separate", "joint"]


class PretextLoss(Protocol):
    """A self-supervised loss of the backbone parameters on one batch."""

    def __call__(self, backbone_params: hypergrad.Tree, batch: PretextBatch) -> Tensor:
        """Scalar loss; ``backbone_params`` maps the backbone's parameter names to tensors."""
        ...


def simclr_loss(net: nn.Module, *, temperature: float, view_passes: ViewPasses,
                update_buffers: bool, gather_distributed: bool = True) -> PretextLoss:
    r"""SimCLR's NT-Xent loss of ``net.projector(net.backbone(x))`` as a :class:`PretextLoss`.

    Args:
        net: a module with ``backbone`` and ``projector`` children (:class:`SimCLRNet`).
        temperature: NT-Xent temperature :math:`\tau`.
        view_passes: ``"separate"``: each view is its own forward pass, so BatchNorm normalises
            each view with its own batch statistics (reference); ``"joint"``: one pass over the
            2n images of both views.
        update_buffers: BatchNorm running statistics are updated in place on every call
            (training, or the reference's HVPs); False leaves them untouched.
        gather_distributed: negatives from every rank (training); False keeps each rank's loss
            on its own shard (BiSSL's Hessian under torchrun: the per-rank losses' mean).
    """
    if view_passes not in ("separate", "joint"):
        raise ValueError(f"view_passes={view_passes!r}; use 'separate' or 'joint'")
    forward = hypergrad.functional(net, update_buffers=update_buffers)

    def loss(backbone_params: hypergrad.Tree, batch: PretextBatch) -> Tensor:
        params = {f"backbone.{k}": v for k, v in backbone_params.items()}
        x1, x2 = batch  # (n, C, H, W) each
        if view_passes == "separate":
            z1, z2 = forward(params, x1), forward(params, x2)  # (n, D) each
        else:
            z1, z2 = forward(params, torch.cat([x1, x2])).split(x1.shape[0])
        return nt_xent(z1, z2, temperature, gather_distributed=gather_distributed)

    return loss
