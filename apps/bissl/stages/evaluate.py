"""Evaluation stage: test-split top-k accuracy of fine-tuned runs, summarised as mean ± std."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from bissl.config import RunConfig
from bissl.distributed import DistInfo, on_main
from bissl.rundir import RunDir
from bissl.stages._common import Splits
from bissl.stages.finetune import test_metrics


def summarise(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def run_evaluate(cfg: RunConfig, run: RunDir, info: DistInfo, splits: Splits,
                 names: Sequence[str]) -> dict[str, Any]:
    """Test metrics of the best-val weights of each fine-tuning run in ``names``.

    Writes ``results/evaluate.json``: per-run metrics and, per metric, mean/std over runs.

    Returns:
        ``{"runs": {name: {metric: value}}, "summary": {metric: {"mean", "std", "n"}}}``.
    """
    if not names:
        raise ValueError("nothing to evaluate: no fine-tuned runs in this run dir. Fix: run "
                         "`bissl finetune`, `bissl search` or `bissl run` first")

    def evaluate_all() -> dict[str, Any]:
        runs = {name: test_metrics(cfg, run, info, splits, name) for name in names}
        metrics = next(iter(runs.values())).keys()
        summary = {m: summarise([r[m] for r in runs.values()]) for m in metrics}
        return {"runs": runs, "summary": summary}

    result = on_main(info, evaluate_all)
    run.write_result("evaluate", result)
    return result
