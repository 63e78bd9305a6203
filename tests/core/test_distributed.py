"""Two gloo ranks on CPU, each with a shard of a ridge regression: ``distributed=True`` equals the
single-process hypergradient on the concatenated data."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from core_helpers import (
    distributed_worker,
    rel_err,
    ridge_with_intercept,
    ridge_with_intercept_solution,
    sharded_ridge_data,
)

import hypergrad as hg

WORLD = 2


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_distributed_implicit_grad_equals_single_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    init_method = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(distributed_worker, args=(WORLD, init_method, str(tmp_path)), nprocs=WORLD,
                       join=True, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    data = sharded_ridge_data(WORLD)
    lower, upper = ridge_with_intercept(data["X"], data["y"], data["Xv"], data["yv"])
    inner = ridge_with_intercept_solution(data["X"], data["y"], data["log_lam"])
    reference, stats = hg.implicit_grad(lower, upper, inner, {"log_lam": data["log_lam"]},
                                        solver=hg.CG(maxiter=50, tol=1e-13))
    assert stats.result is hg.Result.CONVERGED
    expected = reference["log_lam"]
    for res in results:
        assert res["result"] == "CONVERGED"
        assert float(res["stationarity"]) < 1e-12  # the averaged gradient is stationary
        assert rel_err(res["dist"], expected) < 1e-10
        assert rel_err(res["local"], expected) > 1e-2  # each shard alone gives something else
    assert torch.equal(results[0]["dist"], results[1]["dist"])
