"""The BiSSL stage end to end on digits: `bissl bilevel`, its logs, and kill -9 / --resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from bissl.checkpoint import load_checkpoint

TINY = ["deterministic=true", "pretext.epochs=2", "pretext.warmup_epochs=1", "pretext.batch_size=128",
        "model.width=8", "pretext.eval_every_epochs=2", "pretext.probe_epochs=10", "warmup.epochs=1",
        "log_every_steps=1", "bissl.alternations=3", "bissl.lower_steps=2", "bissl.upper_steps=3",
        "bissl.lower_batch_size=64", "bissl.hessian_batch_size=16", "bissl.upper_batch_size=32",
        "bissl.delta=100"]  # a 2-epoch backbone: more damping keeps the system positive definite
KILL_AT = 2  # alternation after whose checkpoint the process kills itself

_PREPARE = textwrap.dedent("""
    import sys
    from bissl.config import load_config
    from bissl.distributed import DistInfo
    from bissl.rundir import RunDir
    from bissl.stages._common import load_splits
    from bissl.stages.linear_warmup import run_linear_warmup
    from bissl.stages.pretext import run_pretext

    cfg = load_config("digits", sys.argv[2:])
    run, info = RunDir.create(sys.argv[1], cfg), DistInfo()
    splits = load_splits(cfg, info)
    run_pretext(cfg, run, info, splits)
    run_linear_warmup(cfg, run, info, splits)
""")

_KILLED = textwrap.dedent("""
    import os, signal, sys
    from bissl.config import validate_config
    from bissl.distributed import DistInfo
    from bissl.rundir import RunDir
    from bissl.stages._common import load_splits
    from bissl.stages.bilevel import run_bissl
    import yaml

    run_dir, kill_at = sys.argv[1], int(sys.argv[2])
    cfg = validate_config(yaml.safe_load(open(os.path.join(run_dir, "config.yaml"))))
    run = RunDir.create(run_dir, cfg)

    def hook(stage, alternation):
        if alternation == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    run_bissl(cfg, run, DistInfo(), load_splits(cfg, DistInfo()), step_hook=hook)
""")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def _records(run_dir: Path, stage: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["stage"] == stage]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir holding a tiny pretext checkpoint and linear warm-up (deterministic)."""
    base = tmp_path_factory.mktemp("bissl") / "base"
    proc = _run("-c", _PREPARE, str(base), *TINY)
    assert not proc.returncode, proc.stderr[-3000:]
    return base


@pytest.fixture(scope="module")
def clean(prepared: Path) -> Path:
    """`bissl bilevel` run to the end on a copy of the prepared run dir."""
    run_dir = prepared.parent / "clean"
    shutil.copytree(prepared, run_dir)
    proc = _run("-m", "bissl.cli", "bilevel", "--run-dir", str(run_dir))
    assert not proc.returncode, proc.stderr[-3000:]
    return run_dir


@pytest.mark.timeout(600)
def test_stage_run_logs_every_solve_and_moves_theta_p(clean: Path) -> None:
    upper = _records(clean, "bissl-upper")
    assert [r["step"] for r in upper] == list(range(1, 3 * 3 + 1))  # alternations x upper_steps
    for r in upper:
        assert r["solve_num_hvp"] == r["solve_iterations"] == 5  # cg, no warm start
        assert r["skipped"] == 0.0 and 0.0 < r["solve_rel_residual"] < 1.0
    assert [r["step"] for r in _records(clean, "bissl-lower")] == list(range(1, 3 * 2 + 1))
    result = json.loads((clean / "results" / "bissl.json").read_text())
    assert result["num_hvp"] == sum(int(r["solve_num_hvp"]) for r in upper)
    final = load_checkpoint(clean / "checkpoints" / "bissl-final.pt")
    pretext = load_checkpoint(clean / "checkpoints" / "pretext-final.pt")["backbone"]
    moved = [k for k, v in pretext.items() if v.is_floating_point() and not torch.equal(v, final["backbone"][k])]
    assert moved, "theta_P did not change"
    assert not (clean / "checkpoints" / "bissl.pt").exists()  # the in-progress checkpoint is gone


@pytest.mark.timeout(600)
def test_sigkill_then_resume_matches_uninterrupted(prepared: Path, clean: Path) -> None:
    killed = prepared.parent / "killed"
    shutil.copytree(prepared, killed)
    proc = _run("-c", _KILLED, str(killed), str(KILL_AT))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert load_checkpoint(killed / "checkpoints" / "bissl.pt")["alternation"] == KILL_AT
    proc = _run("-m", "bissl.cli", "bilevel", "--run-dir", str(killed), "--resume")
    assert not proc.returncode, proc.stderr[-3000:]
    assert f"resumed at alternation {KILL_AT}" in proc.stdout
    a = load_checkpoint(clean / "checkpoints" / "bissl-final.pt")
    b = load_checkpoint(killed / "checkpoints" / "bissl-final.pt")
    for part in ("lower", "upper"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k}"
    # the resumed log has each step once, as the uninterrupted one
    assert [r["step"] for r in _records(killed, "bissl-upper")] == list(range(1, 10))
