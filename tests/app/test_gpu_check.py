"""``scripts/gpu-check`` runs on a CPU with tiny sizes and writes a JSON report part by part."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check"


@pytest.mark.timeout(400)
def test_gpu_check_runs_on_cpu_with_tiny_sizes(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=390)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert set(report["parts"]) == {"tests", "validate", "alternations", "benchmark"}
    assert all(p["status"] == "ok" and p["wall_s"] <= p["cap_s"] for p in report["parts"].values())
    assert "skipped" in report["parts"]["tests"]["result"]["summary"]  # CUDA-only tests skip on a CPU
    alt = report["parts"]["alternations"]["result"]
    assert len(alt["alternations"]) == 2
    assert all(a["lower_images_per_s"] > 0 and a["upper_images_per_s"] > 0 for a in alt["alternations"])
    assert alt["hvp_per_s_reuse_graph_false"] > 0 and alt["hvp_per_s_reuse_graph_true"] > 0
    assert report["parts"]["validate"]["result"]["bissl_projected_alternation_s"] > 0
