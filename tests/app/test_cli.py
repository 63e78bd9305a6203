"""CLI smoke tests: help, validate (incl. the stl10-paper dry run), error exits, run-dir rules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from bissl.cli import main
from bissl.config import load_config
from bissl.pipeline import validate

COMMANDS = ["pretrain", "bilevel", "finetune", "evaluate", "search", "run", "conventional", "validate", "report"]


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out
    for command in COMMANDS:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        if command == "report":  # works on finished run directories only
            assert "RUN_DIR" in text
            continue
        assert "--config" in text and "--set" in text and "--resume" in text and "--run-dir" in text


def test_stl10_paper_validates_and_dry_runs() -> None:
    """The paper preset (ResNet-18, 96 px, ImageNet stem) builds and trains one shrunk step."""
    cfg = load_config("stl10-paper")
    out = validate(cfg, batch=2)
    assert out["pretext_loss"] > 0 and out["finetune_loss"] > 0


def test_validate_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "-c", "digits", "--set", "pretext.epochs=3",
                 "--set", "pretext.warmup_epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "config OK" in out and "dry run OK" in out and "data OK" in out


def test_fashion_mnist_without_root_still_dry_runs(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    assert main(["validate", "-c", "fashion-mnist", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dry run OK" in out and "not found" in out and "FashionMNIST/raw" in out


@pytest.mark.parametrize(("argv", "text"), [
    (["validate", "--set", "pretext.temperature=-1"], "pretext.temperature"),
    (["validate", "-c", "nope"], "unknown preset"),
    (["validate", "--set", "pretext.batch_size=4096"], "pretext.batch_size: got 4096"),
    (["search", "--run-dir", "/nonexistent/run"], "does not exist"),
])
def test_errors_exit_2_with_message(argv: list[str], text: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert text in capsys.readouterr().err


def test_run_dir_config_mismatch_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bissl.rundir import RunDir

    RunDir.create(tmp_path, load_config("digits"))
    assert main(["pretrain", "--run-dir", str(tmp_path), "--resume",
                 "--set", "pretext.epochs=7"]) == 2
    err = capsys.readouterr().err
    assert "pretext.epochs: saved 15, requested 7" in err


def test_console_script_module_entry() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bissl.cli", "--help"], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0 and "pretrain" in proc.stdout


def test_rejected_run_leaves_no_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "r"
    assert main(["run", "--set", "pretext.batch_size=100000", "--run-dir", str(run_dir)]) == 2
    assert "pretext.batch_size" in capsys.readouterr().err
    assert not run_dir.exists()
