"""Tiny `bissl conventional` on digits: the whole conventional pipeline, its outputs, and that SSL helps."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from bissl.cli import main
from bissl.config import load_config, validate_config
from bissl.distributed import DistInfo
from bissl.rundir import RunDir
from bissl.stages._common import load_splits
from bissl.stages.pretext import build_simclr, pretext_backbone_state, probe_metrics

TINY = ["pretext.epochs=8", "pretext.warmup_epochs=1", "pretext.batch_size=128",
        "pretext.eval_every_epochs=4", "warmup.epochs=1", "finetune.epochs=2", "search.trials=2",
        "search.trial_epochs=1", "search.seeds=2", "checkpoint_every_steps=1000"]


@pytest.mark.timeout(600)
def test_tiny_pipeline_on_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    argv = ["conventional", "--run-dir", str(run_dir), *[a for s in TINY for a in ("--set", s)]]
    assert main(argv) == 0
    out = capsys.readouterr().out

    # result table printed at the end
    assert "Results: digits" in out and "fine-tuned, test (2 seeds)" in out and "±" in out

    # run directory contents
    cfg = load_config("digits", TINY)
    assert validate_config(yaml.safe_load((run_dir / "config.yaml").read_text())) == cfg
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["libraries"]["torch"].startswith(torch.__version__.split("+")[0])
    assert "commit" in meta["git"] and meta["sessions"][0]["argv"]
    assert (run_dir / "search.db").is_file()
    assert {p.name for p in (run_dir / "plots").glob("*.png")} >= {"pretext.png", "warmup.png"}
    evaluation = json.loads((run_dir / "results" / "evaluate.json").read_text())
    assert set(evaluation["runs"]) == {"seed0", "seed1"}
    top1 = [r["top1"] for r in evaluation["runs"].values()]
    assert evaluation["summary"]["top1"]["mean"] == pytest.approx(statistics.fmean(top1))
    assert min(top1) > 50.0  # 10 classes: chance is 10%

    # pretext loss decreases (mean of the first vs the last three logged steps)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["stage"] == "pretext" and "loss" in r]
    assert statistics.fmean(losses[-3:]) < statistics.fmean(losses[:3]) - 0.2
    assert any("knn_acc" in r and "probe_acc" in r for r in records if r["stage"] == "pretext")

    # a linear probe on the SSL backbone beats the same backbone at its random init (seeded:
    # run_pretext seeds torch with cfg.seed right before building the network)
    info = DistInfo()
    splits = load_splits(cfg, info)
    torch.manual_seed(cfg.seed)
    random_init = build_simclr(cfg, splits.spec.in_channels).backbone
    trained = build_simclr(cfg, splits.spec.in_channels).backbone
    trained.load_state_dict(pretext_backbone_state(RunDir(run_dir)))
    assert not torch.equal(next(random_init.parameters()), next(trained.parameters()))
    ssl = probe_metrics(cfg, trained, splits, info)["probe_acc"]
    rnd = probe_metrics(cfg, random_init, splits, info)["probe_acc"]
    assert ssl > rnd + 3.0, (ssl, rnd)
