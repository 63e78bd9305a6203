"""NT-Xent: against a loop-based reference, a closed form, and across 2 gloo processes."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bissl.losses import NTXentLoss, nt_xent
from torch import nn


def _loop_nt_xent(z1: list[list[float]], z2: list[list[float]], tau: float) -> float:
    """Plain-Python NT-Xent: 2N anchors, cosine similarity, positive = other view, mean."""
    z = [*z1, *z2]
    n = len(z1)

    def cos(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    total = 0.0
    for i in range(2 * n):
        pos = i + n if i < n else i - n
        denom = sum(math.exp(cos(z[i], z[j]) / tau) for j in range(2 * n) if j != i)
        total += -cos(z[i], z[pos]) / tau + math.log(denom)
    return total / (2 * n)


@pytest.mark.parametrize(("n", "d", "tau"), [(1, 3, 0.5), (5, 4, 0.5), (8, 16, 0.1), (6, 2, 2.0)])
def test_matches_loop_reference(n: int, d: int, tau: float) -> None:
    g = torch.Generator().manual_seed(n * 100 + d)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = torch.randn(n, d, generator=g, dtype=torch.float64)
    got = nt_xent(z1, z2, tau).item()
    assert got == pytest.approx(_loop_nt_xent(z1.tolist(), z2.tolist(), tau), rel=1e-10, abs=1e-12)


def test_identical_orthogonal_views_closed_form() -> None:
    # z1 == z2 = orthonormal rows: each anchor's positive has cosine 1, its 2N - 2 negatives
    # cosine 0, so loss = -1/tau + log(e^{1/tau} + 2(N - 1)) for every anchor.
    n, tau = 6, 0.5
    z = torch.eye(n, 10, dtype=torch.float64) * 3.0  # scale must not matter (cosine)
    expected = -1 / tau + math.log(math.exp(1 / tau) + 2 * (n - 1))
    assert nt_xent(z, z.clone(), tau).item() == pytest.approx(expected, rel=1e-12)


def test_identical_views_general_closed_form() -> None:
    # z1 == z2 with Gram matrix C of normalised rows: anchor i's loss is
    # -1/tau + log(e^{1/tau} + 2 * sum_{j != i} e^{C_ij / tau}).
    n, tau = 7, 0.3
    z = torch.randn(n, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u = z / z.norm(dim=1, keepdim=True)
    gram = (u @ u.T).tolist()
    per_anchor = [
        -1 / tau
        + math.log(
            math.exp(1 / tau) + 2 * sum(math.exp(gram[i][j] / tau) for j in range(n) if j != i)
        )
        for i in range(n)
    ]
    assert nt_xent(z, z, tau).item() == pytest.approx(sum(per_anchor) / n, rel=1e-12)


def test_module_validates_temperature_and_shapes() -> None:
    for bad in (0.0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            NTXentLoss(bad)
    loss = NTXentLoss(0.5)
    with pytest.raises(ValueError, match="equal shapes"):
        loss(torch.zeros(3, 4), torch.zeros(2, 4))
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    assert loss(z1, z2).item() == pytest.approx(nt_xent(z1, z2, 0.5).item())


@pytest.mark.parametrize("tau", [0.1, 0.7, 2.0])
def test_module_uses_its_temperature(tau: float) -> None:
    """The class at non-default temperatures against the plain-Python loop (not against nt_xent)."""
    g = torch.Generator().manual_seed(11)
    z1 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    z2 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    expected = _loop_nt_xent(z1.tolist(), z2.tolist(), tau)
    assert NTXentLoss(tau)(z1, z2).item() == pytest.approx(expected, rel=1e-10)
    assert expected != pytest.approx(_loop_nt_xent(z1.tolist(), z2.tolist(), 0.5), rel=1e-3)


def _gather_worker(rank: int, world: int, init_file: str) -> None:
    """Each rank checks its distributed loss/gradients against the single-process ones."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n, d_in, d, tau = 3, 5, 4, 0.5
        g = torch.Generator().manual_seed(0)
        x1 = torch.randn(world * n, d_in, generator=g, dtype=torch.float64)
        x2 = torch.randn(world * n, d_in, generator=g, dtype=torch.float64)
        enc = nn.Linear(d_in, d, dtype=torch.float64)
        with torch.no_grad():
            enc.weight.copy_(torch.randn(d, d_in, generator=g, dtype=torch.float64))
            enc.bias.copy_(torch.randn(d, generator=g, dtype=torch.float64))

        # single process on the concatenated batch
        ref_loss = nt_xent(enc(x1), enc(x2), tau, gather_distributed=False)
        ref_w, ref_b = torch.autograd.grad(ref_loss, [enc.weight, enc.bias])
        z1_full = enc(x1).detach().requires_grad_(True)
        z2_full = enc(x2).detach().requires_grad_(True)
        ref_z1, ref_z2 = torch.autograd.grad(
            nt_xent(z1_full, z2_full, tau, gather_distributed=False), [z1_full, z2_full]
        )

        # this rank's shard, global negatives
        part = slice(rank * n, (rank + 1) * n)
        loss = nt_xent(enc(x1[part]), enc(x2[part]), tau)
        loss.backward()
        local_only = nt_xent(enc(x1[part]), enc(x2[part]), tau, gather_distributed=False)
        assert abs(loss.item() - local_only.item()) > 1e-6, "gather had no effect"

        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        torch.testing.assert_close(mean_loss, ref_loss.detach(), rtol=1e-12, atol=1e-12)
        for p, ref in ((enc.weight, ref_w), (enc.bias, ref_b)):  # DDP-style gradient averaging
            grad = p.grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad / world, ref, rtol=1e-10, atol=1e-12)

        # leaf embeddings: gradient reaches the owning rank through the gather's backward
        z1 = z1_full.detach()[part].clone().requires_grad_(True)
        z2 = z2_full.detach()[part].clone().requires_grad_(True)
        nt_xent(z1, z2, tau).backward()
        torch.testing.assert_close(z1.grad / world, ref_z1[part], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(z2.grad / world, ref_z2[part], rtol=1e-10, atol=1e-12)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_distributed_gather_matches_single_process(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    init_file = os.path.join(tmp_path, "dist_init")
    mp.spawn(_gather_worker, args=(2, init_file), nprocs=2, join=True)
