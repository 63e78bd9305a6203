"""Atomic checkpoints, RNG round-trip, and kill -9 / --resume reproducing an uninterrupted run."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from bissl.checkpoint import load_checkpoint, restore_rng_state, save_checkpoint

# Tiny deterministic pretext run: 1222 train images / 128 = 9 steps per epoch, 2 epochs.
TINY = ["deterministic=true", "pretext.epochs=2", "pretext.warmup_epochs=1", "pretext.batch_size=128",
        "model.width=8", "checkpoint_every_steps=5", "pretext.eval_every_epochs=2",
        "pretext.probe_epochs=10", "log_every_steps=1"]
KILL_AT = 12  # checkpoints at steps 5 and 10 (second epoch): resume at step 11, mid-epoch

_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from bissl.config import load_config
    from bissl.distributed import DistInfo
    from bissl.rundir import RunDir
    from bissl.stages._common import load_splits
    from bissl.stages.pretext import run_pretext

    cfg = load_config("digits", sys.argv[3:])
    run = RunDir.create(sys.argv[1], cfg)
    kill_at = int(sys.argv[2])

    def hook(stage, step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    run_pretext(cfg, run, DistInfo(), load_splits(cfg, DistInfo()), step_hook=hook)
""")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bissl.cli", *args], capture_output=True,
                          text=True, env=_env(), timeout=400, check=False)


def test_checkpoint_roundtrip_weights_only(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model(torch.randn(8, 3))  # moves BN running stats away from their init
    path = save_checkpoint(tmp_path / "c.pt", {"model": model.state_dict(), "step": 7})
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    state = torch.load(path, weights_only=True)  # must not need the unsafe unpickler
    assert state["step"] == 7
    for key, value in model.state_dict().items():
        assert torch.equal(state["model"][key], value), key
    restore_rng_state(load_checkpoint(path)["rng"])
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind


def test_missing_checkpoint_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="bissl pretrain"):
        load_checkpoint(tmp_path / "none.pt")


@pytest.mark.timeout(900)
def test_sigkill_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(killed), str(KILL_AT), *TINY],
                          capture_output=True, text=True, env=_env(), timeout=400, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert load_checkpoint(killed / "checkpoints" / "pretext.pt")["step"] == 10
    assert not (killed / "checkpoints" / "pretext-final.pt").exists()

    resumed = _cli("pretrain", "--run-dir", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint at step 10; continuing at step 11 of 18" in resumed.stdout

    sets = [a for s in TINY for a in ("--set", s)]
    fresh = _cli("pretrain", "--run-dir", str(clean), *sets)
    assert fresh.returncode == 0, fresh.stderr[-3000:]

    a = load_checkpoint(killed / "checkpoints" / "pretext-final.pt")
    b = load_checkpoint(clean / "checkpoints" / "pretext-final.pt")
    assert a["step"] == b["step"] == 18
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:  # parameters and BN buffers, bit for bit
        assert torch.equal(a["model"][key], b["model"][key]), key

    # the metric log has each step once (records after the checkpoint were dropped on resume)
    steps = [r["step"] for r in _metrics(killed) if r["stage"] == "pretext" and "loss" in r]
    assert steps == list(range(1, 19))
    assert _metrics(killed)[-1].keys() >= {"knn_acc", "probe_acc"}

    # restarting a finished stage without --resume is refused; with --resume it is skipped
    again = _cli("pretrain", "--run-dir", str(clean))
    assert again.returncode == 2 and "--resume" in again.stderr
    skip = _cli("pretrain", "--run-dir", str(clean), "--resume")
    assert skip.returncode == 0 and "already finished" in skip.stdout


def _metrics(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# Whole pipeline, killed inside the second search trial (19 steps/epoch at batch 64).
PIPE = ["deterministic=true", "pretext.epochs=1", "pretext.warmup_epochs=0", "pretext.batch_size=128",
        "pretext.probe_epochs=10", "model.width=8", "warmup.epochs=0", "search.trials=2",
        "search.trial_epochs=2", "search.seeds=1", "finetune.epochs=1", "checkpoint_every_steps=10"]

_KILLED_PIPELINE = textwrap.dedent("""
    import os, signal, sys
    from bissl.config import load_config
    from bissl.distributed import DistInfo
    from bissl.pipeline import run_conventional
    from bissl.rundir import RunDir

    cfg = load_config("digits", sys.argv[2:])
    run = RunDir.create(sys.argv[1], cfg)
    trials = []

    def hook(stage, step):
        if stage.startswith("trial-") and stage not in trials:
            trials.append(stage)
        if len(trials) == 2 and step == 25:
            os.kill(os.getpid(), signal.SIGKILL)

    run_conventional(cfg, run, DistInfo(), step_hook=hook)
""")


@pytest.mark.timeout(900)
def test_search_killed_mid_trial_resumes_to_same_result(tmp_path: Path) -> None:
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.run([sys.executable, "-c", _KILLED_PIPELINE, str(killed), *PIPE],
                          capture_output=True, text=True, env=_env(), timeout=400, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]

    resumed = _cli("conventional", "--run-dir", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[pretext] already finished" in resumed.stdout
    assert "was interrupted; re-queued" in resumed.stdout
    assert "resumed from checkpoint at step 20; continuing at step 21" in resumed.stdout

    fresh = _cli("conventional", "--run-dir", str(clean), *[a for s in PIPE for a in ("--set", s)])
    assert fresh.returncode == 0, fresh.stderr[-3000:]

    def summary(run: Path) -> tuple:
        import json

        search = json.loads((run / "results" / "search.json").read_text())
        trials = sorted(p.name for p in (run / "results").glob("trial-*.json"))
        return search["best"]["lr"], search["best"]["val_top1"], search["seed_val_top1"], trials

    assert summary(killed) == summary(clean)
    a = load_checkpoint(killed / "checkpoints" / "seed0-final.pt")["best"]
    b = load_checkpoint(clean / "checkpoints" / "seed0-final.pt")["best"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
