"""Atomic checkpoints loadable with ``torch.load(weights_only=True)``.

A checkpoint is a flat dict of state dicts (model incl. BN buffers, optimiser, scheduler), RNG
states (python, numpy, torch CPU, CUDA) stored as tensors and plain types, and counters. Saving
writes a temporary file in the same folder and ``os.replace``-s it, so a killed process leaves
either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """All RNG states as tensors/plain types (weights_only-safe)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict[str, Any], *, with_rng: bool = True) -> Path:
    """Atomically write ``state`` (plus RNG states) to ``path``.

    Args:
        path: destination file.
        state: tensors, state dicts, numbers, strings, lists/dicts of those.
        with_rng: add the current RNG states under key ``"rng"``.
    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(state)
    if with_rng:
        payload["rng"] = capture_rng_state()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``.

    Raises:
        FileNotFoundError: naming the path and how checkpoints are produced.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} not found. Fix: run the stage that writes it first "
            "(e.g. `bissl pretrain --run-dir RUN`), or point --run-dir at the right run"
        )
    return torch.load(path, map_location=map_location, weights_only=True)
