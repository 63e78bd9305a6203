"""The examples run, and their hypergradients are descent directions of the outer loss."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_l2_hpo_decreases_the_validation_loss():
    history = _load("digits_l2_hpo").main(steps=3, lr=1.0)
    # A normalised step of length 1 along -hypergradient must lower the re-solved outer loss;
    # a wrong sign or a wrong implicit term makes it rise.
    assert history[1] < history[0] and history[2] < history[1]
