"""LARS against hand-computed updates; param groups; the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from bissl.optim import LARS, lars_param_groups, warmup_cosine
from torch import nn


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def test_lars_two_steps_match_hand_computation() -> None:
    lr, mom, wd, eta = 2.0, 0.9, 0.1, 0.01
    p = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    opt = LARS([p], lr=lr, momentum=mom, weight_decay=wd, trust_coefficient=eta, eps=0.0)
    grad = [0.6, 0.8]

    # step 1 by hand: d = g + wd p = (0.9, 1.2), |d| = 1.5, |p| = 5, q = 0.01 * 5 / 1.5
    q1 = eta * 5.0 / 1.5
    u = [q1 * 0.9, q1 * 1.2]
    expected = [3.0 - lr * u[0], 4.0 - lr * u[1]]  # = (2.94, 3.92)
    p.grad = torch.tensor(grad, dtype=torch.float64)
    opt.step()
    assert p.tolist() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx([2.94, 3.92], rel=1e-12)

    # step 2 by hand, with the momentum buffer
    d = [g + wd * x for g, x in zip(grad, expected, strict=True)]
    q2 = eta * _norm(expected) / _norm(d)
    u = [mom * ui + q2 * di for ui, di in zip(u, d, strict=True)]
    expected = [x - lr * ui for x, ui in zip(expected, u, strict=True)]
    p.grad = torch.tensor(grad, dtype=torch.float64)
    opt.step()
    assert p.tolist() == pytest.approx(expected, rel=1e-12)


def test_lars_excluded_group_is_plain_momentum_sgd() -> None:
    w = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = LARS(
        [{"params": [w]}, {"params": [b], "lars_exclude": True}],
        lr=0.1,
        momentum=0.5,
        weight_decay=0.3,
        trust_coefficient=0.001,
        eps=0.0,
    )
    for _ in range(2):
        w.grad = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
        b.grad = torch.tensor([0.5, 0.5], dtype=torch.float64)
        opt.step()
    # bias: u1 = g, u2 = 0.5 g + g = 1.5 g; total step 0.1 * 2.5 * 0.5 = 0.125 (no wd, no trust)
    assert b.tolist() == pytest.approx([1.0 - 0.125, -2.0 - 0.125], rel=1e-12)
    # weight: zero grad, so d = wd w and q d = eta |w| / (wd |w|) * wd w = eta w at every step:
    # w1 = (1 - lr eta) w0; u2 = mom eta w0 + eta w1; w2 = w1 - lr u2
    eta, lr, mom = 0.001, 0.1, 0.5
    c1 = 1 - lr * eta
    c2 = c1 - lr * (mom * eta + eta * c1)
    assert w.tolist()[0] == pytest.approx([c2 * 1.0, c2 * 2.0], rel=1e-12)


def test_lars_zero_parameter_uses_unit_trust_ratio() -> None:
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = LARS([p], lr=0.5, momentum=0.9, weight_decay=1e-6, trust_coefficient=0.001)
    p.grad = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    opt.step()
    assert p.tolist() == pytest.approx([-0.5, 1.0, -0.25], rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": 1.0, "momentum": 1.0}, "momentum"),
        ({"lr": 1.0, "weight_decay": -1e-3}, "weight_decay"),
        ({"lr": 1.0, "trust_coefficient": 0.0}, "trust_coefficient"),
    ],
)
def test_lars_rejects_bad_settings(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LARS([torch.zeros(1, requires_grad=True)], **kwargs)


def test_lars_param_groups_split_bias_and_norm() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    model[3].bias.requires_grad_(False)
    groups = lars_param_groups(model, exclude_bias_and_norm=True)
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert [g["lars_exclude"] for g in groups] == [False, True]
    assert ids[0] == {id(model[0].weight), id(model[3].weight)}
    assert ids[1] == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    single = lars_param_groups(model, exclude_bias_and_norm=False)
    assert len(single) == 1 and not single[0]["lars_exclude"] and len(single[0]["params"]) == 5
    LARS(groups, lr=0.1)  # groups are accepted by the optimiser


def test_warmup_cosine_values() -> None:
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=2.0)
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=6, final_lr_ratio=0.1)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()

    def cosine(t: int) -> float:
        progress = min(1.0, (t - 2) / 4)
        return 2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    expected = [1.0, 2.0] + [cosine(t) for t in range(2, 8)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert (
        lrs[2] == pytest.approx(2.0)
        and lrs[6] == pytest.approx(0.2)
        and lrs[7] == pytest.approx(0.2)
    )


def test_warmup_cosine_validates() -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine(opt, warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="final_lr_ratio"):
        warmup_cosine(opt, warmup_steps=0, total_steps=10, final_lr_ratio=1.5)
