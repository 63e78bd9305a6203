"""`bissl run` (the conventional and BiSSL arms) under torchrun with 2 gloo processes on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["pretext.epochs=2", "pretext.warmup_epochs=1", "pretext.eval_every_epochs=2",
        "pretext.probe_epochs=10", "warmup.epochs=1", "search.trials=1", "search.trial_epochs=1",
        "search.seeds=1", "finetune.epochs=1", "bissl.alternations=2", "bissl.lower_steps=2",
        "bissl.upper_steps=2", "bissl.hessian_batch_size=16", "bissl.upper_batch_size=32",
        "bissl.delta=100", "arms=[conventional,bissl]"]


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_torchrun_two_processes_gloo(tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--standalone", "-m", "bissl.cli", "run", "--run-dir", str(run_dir),
           *[a for s in TINY for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=360)
    except subprocess.TimeoutExpired:
        # SIGTERM lets torchrun stop its workers (each runs in its own session and would
        # survive a SIGKILL of torchrun alone)
        proc.terminate()
        try:
            stdout, stderr = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun run timed out:\n{stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("BiSSL vs conventional") == 1  # only rank 0 prints and writes
    runs = [json.loads(x) for x in (run_dir / "results" / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["arm"], r["seed"]) for r in runs if r["kind"] == "test") == [("bissl", 1), ("conventional", 1)]
    # every upper step of the BiSSL stage was logged once, each solve with its 5 products
    solves = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    solves = [r for r in solves if r["stage"] == "bissl-s1-upper"]
    assert [r["step"] for r in solves] == [1, 2, 3, 4] and all(r["solve_num_hvp"] == 5 for r in solves)
    # each optimisation step was logged once, by rank 0 (2 epochs x 1222 // 128 steps)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["stage"] == "pretext" and "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 2 * (1222 // 128)
