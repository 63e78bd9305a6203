"""Two gloo ranks on CPU, each with a differently distributed shard of a ridge regression on
learned feature scales: ``distributed=True`` equals a dense single-process truth on all the data.

The outer variables (feature scales) multiply the data, so each rank's shard shapes its own part
of the mixed term and of the direct term: dropping any of the all-reduces changes the answer.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from core_helpers import (
    distributed_worker,
    rel_err,
    scaled_ridge,
    scaled_ridge_solution,
    sharded_scaled_ridge_data,
)

WORLD = 2


def _dense_truth(data):
    """d/do of upper(theta*(o), o) on all the data: closed-form inner solution + torch.func."""
    _, upper = scaled_ridge(data["X"], data["y"], data["Xv"], data["yv"])

    def objective(log_scale, log_lam):
        inner = scaled_ridge_solution(data["X"], data["y"], log_scale, log_lam)
        return upper(inner, {"log_scale": log_scale, "log_lam": log_lam})

    g_scale, g_lam = torch.func.grad(objective, argnums=(0, 1))(data["log_scale"], data["log_lam"])
    return {"log_scale": g_scale, "log_lam": g_lam}


def _flat(tree):
    return torch.cat([tree["log_scale"], tree["log_lam"].reshape(1)])


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_distributed_implicit_grad_equals_dense_single_process_truth(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    init_method = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(distributed_worker, args=(WORLD, init_method, str(tmp_path)), nprocs=WORLD,
                       join=True, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    expected = _flat(_dense_truth(sharded_scaled_ridge_data(WORLD)))
    for res in results:
        assert res["result"] == "CONVERGED"
        assert float(res["stationarity"]) < 1e-12  # the averaged inner gradient is stationary
        assert rel_err(_flat(res["dist"]), expected) < 1e-10
        assert rel_err(_flat(res["local"]), expected) > 1e-2  # each shard alone gives something else
    assert torch.equal(_flat(results[0]["dist"]), _flat(results[1]["dist"]))
    # The shards disagree with each other too: the data really shapes each rank's terms.
    assert rel_err(_flat(results[0]["local"]), _flat(results[1]["local"])) > 1e-2
