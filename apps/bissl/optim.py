"""LARS optimiser, its parameter groups and the warm-up + cosine learning-rate schedule.

Public names: :class:`LARS`, :func:`lars_param_groups`, :func:`warmup_cosine`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LARS", "lars_param_groups", "warmup_cosine"]


class LARS(Optimizer):
    r"""Layer-wise Adaptive Rate Scaling (You et al., 2017) with heavy-ball momentum.

    Per parameter tensor :math:`p` with gradient :math:`g`, for groups with
    ``lars_exclude=False``:

    .. math::
        d = g + \text{wd}\, p, \qquad
        q = \frac{\eta \lVert p \rVert}{\lVert d \rVert + \epsilon}
            \text{ if } \lVert p \rVert > 0 \text{ and } \lVert d \rVert > 0 \text{ else } 1,

    then :math:`u \leftarrow \mu u + q d` and :math:`p \leftarrow p - \text{lr}\, u`.
    Groups with ``lars_exclude=True`` (biases and norm weights, see :func:`lars_param_groups`)
    skip the weight decay and the trust ratio: :math:`d = g`, :math:`q = 1`.

    Args:
        params: parameters or param-group dicts (a group may set ``lars_exclude``).
        lr: learning rate (> 0 or 0).
        momentum: :math:`\mu` in [0, 1).
        weight_decay: wd >= 0 (reference 1e-6).
        trust_coefficient: :math:`\eta > 0` (reference 0.001).
        eps: :math:`\epsilon \ge 0` in the trust-ratio denominator.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"LARS lr={lr!r} must be >= 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS momentum={momentum!r} must be in [0, 1)")
        if not weight_decay >= 0:
            raise ValueError(f"LARS weight_decay={weight_decay!r} must be >= 0")
        if not trust_coefficient > 0:
            raise ValueError(
                f"LARS trust_coefficient={trust_coefficient!r} must be > 0, e.g. 0.001"
            )
        if not eps >= 0:
            raise ValueError(f"LARS eps={eps!r} must be >= 0")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:  # type: ignore[override]
        """Apply one update to every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not group["lars_exclude"]:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm = torch.linalg.vector_norm(p)
                    d_norm = torch.linalg.vector_norm(d)
                    ratio = group["trust_coefficient"] * p_norm / (d_norm + group["eps"])
                    ones = torch.ones_like(ratio)
                    q = torch.where((p_norm > 0) & (d_norm > 0), ratio, ones)
                    d = d.mul(q)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def lars_param_groups(model: nn.Module, *, exclude_bias_and_norm: bool) -> list[dict[str, Any]]:
    """Parameter groups for :class:`LARS`.

    Args:
        model: module whose trainable parameters (``requires_grad``) are grouped.
        exclude_bias_and_norm: put every parameter with ``ndim <= 1`` (biases, BatchNorm weights)
            into a group with ``lars_exclude=True`` (no weight decay, no trust ratio). False gives
            one group with all parameters under LARS.

    Returns:
        List of param-group dicts (empty groups are left out).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not exclude_bias_and_norm:
        return [{"params": params, "lars_exclude": False}] if params else []
    groups = [
        {"params": [p for p in params if p.ndim > 1], "lars_exclude": False},
        {"params": [p for p in params if p.ndim <= 1], "lars_exclude": True},
    ]
    return [g for g in groups if g["params"]]


def warmup_cosine(
    optimizer: Optimizer, *, warmup_steps: int, total_steps: int, final_lr_ratio: float = 0.001,
    first_step_full_lr: bool = False,
) -> LambdaLR:
    r"""Linear warm-up, then cosine decay to ``final_lr_ratio`` times the base learning rate.

    Multiplier at step t (the scheduler is stepped once per optimiser step):

    - :math:`t < T_w`: :math:`(t + 1) / T_w`;
    - otherwise :math:`r + (1 - r)\,\tfrac12 (1 + \cos(\pi \min(1, (t - T_w) / (T - T_w))))`;
    - with ``first_step_full_lr`` (the released BiSSL code's indexing: its scheduler sets the
      rate *after* each step, starting from the base rate): step 0 runs at multiplier 1 and
      warm-up step :math:`1 \le t < T_w` at :math:`t / T_w`; the cosine phase is unchanged.

    Args:
        optimizer: optimiser whose groups' ``lr`` are the base rates.
        warmup_steps: :math:`T_w \ge 0`.
        total_steps: :math:`T > T_w`; after it the multiplier stays at :math:`r`.
        final_lr_ratio: :math:`r` in [0, 1].
        first_step_full_lr: run step 0 at the full base rate (see above).

    Returns:
        A ``LambdaLR`` scheduler.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps!r} must be >= 0")
    if total_steps <= warmup_steps:
        raise ValueError(
            f"total_steps={total_steps!r} must exceed warmup_steps={warmup_steps!r}; "
            "shorten the warm-up or train longer"
        )
    if not 0 <= final_lr_ratio <= 1:
        raise ValueError(f"final_lr_ratio={final_lr_ratio!r} must be in [0, 1], e.g. 0.001")

    def multiplier(step: int) -> float:
        if first_step_full_lr and step < warmup_steps:
            return step / warmup_steps if step > 0 else 1.0
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return final_lr_ratio + (1 - final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, multiplier)
