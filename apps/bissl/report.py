"""Plots of a comparison run: accuracy per arm and seed, and the BiSSL stage's curves.

``write_comparison_plots(run, results)`` writes

* ``plots/comparison_accuracy.png`` — test top-1 per arm, one line per seed (paired seeds), and
  each arm's wall time;
* ``plots/comparison_bissl_stage.png`` — for every BiSSL arm and seed, per alternation: mean
  lower loss, mean upper loss (at theta_P), the worst solve's relative residual, cumulative HVPs.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from bissl.rundir import RunDir


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(path: Path, results: dict[str, Any], metric: str = "top1") -> Path:
    """Test accuracy per arm (x) with one line per seed joining its arms; wall time per arm."""
    plt = _pyplot()
    arms = list(results["summary"])
    fig, (ax, ax_time) = plt.subplots(1, 2, figsize=(2.4 * len(arms) + 3.5, 3.6),
                                      gridspec_kw={"width_ratios": [3, 2]})
    seeds = [str(s) for s in results["seeds"]]
    for seed in seeds:
        ys = [results["arms"][a]["seeds"][seed]["test"][metric] for a in arms]
        ax.plot(range(len(arms)), ys, marker="o", alpha=0.7, label=f"seed {seed}")
    means = [results["summary"][a][metric]["mean"] for a in arms]
    ax.scatter(range(len(arms)), means, marker="_", s=600, color="black", zorder=3, label="mean")
    ax.set_xticks(range(len(arms)), arms, rotation=15)
    ax.set_ylabel(f"test {metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax_time.bar(range(len(arms)), [results["summary"][a]["wall_s"] / 60 for a in arms], color="grey")
    ax_time.set_xticks(range(len(arms)), arms, rotation=15)
    ax_time.set_ylabel("wall time, all seeds (min)")
    ax_time.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def bissl_stage_series(records: list[dict[str, Any]], prefix: str) -> dict[str, list[tuple[int, float]]]:
    """Per-alternation series of a BiSSL stage named ``prefix`` from the metrics log.

    Losses are means over the alternation's steps; the residual is the worst solve of the
    alternation; HVPs are cumulative.
    """
    per_alt = [r for r in records if r["stage"] == prefix]
    out: dict[str, list[tuple[int, float]]] = {}
    if not per_alt:
        return out
    lower = [r for r in records if r["stage"] == f"{prefix}-lower"]
    upper = [r for r in records if r["stage"] == f"{prefix}-upper"]
    n_lower, n_upper = max(1, len(lower) // len(per_alt)), max(1, len(upper) // len(per_alt))
    groups: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in lower:
        groups["lower loss"][(r["step"] - 1) // n_lower + 1].append(r["loss"])
    for r in upper:
        alt = (r["step"] - 1) // n_upper + 1
        groups["upper loss (theta_P)"][alt].append(r["loss_lower_model"])
        if r.get("solve_checked", 1.0):
            groups["solve rel. residual"][alt].append(r["solve_rel_residual"])
    for key, by_alt in groups.items():
        reduce = max if "residual" in key else (lambda v: sum(v) / len(v))
        out[key] = [(a, float(reduce(v))) for a, v in sorted(by_alt.items())]
    out["HVPs (cumulative)"] = [(r["step"], r["hvp_total"]) for r in per_alt]
    return out


def plot_bissl_stages(path: Path, records: list[dict[str, Any]], prefixes: list[str]) -> Path | None:
    """One panel per series, one line per BiSSL stage (arm and seed)."""
    series = {p: bissl_stage_series(records, p) for p in prefixes}
    series = {p: s for p, s in series.items() if s}
    if not series:
        return None
    plt = _pyplot()
    keys = ["lower loss", "upper loss (theta_P)", "solve rel. residual", "HVPs (cumulative)"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.3))
    for ax, key in zip(axes, keys, strict=True):
        for prefix, s in series.items():
            if s.get(key):
                xs, ys = zip(*s[key], strict=True)
                ax.plot(xs, ys, marker="." if len(xs) < 60 else None, label=prefix, alpha=0.7)
        if "residual" in key:
            ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("alternation")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_comparison_plots(run: RunDir, results: dict[str, Any]) -> list[Path]:
    """Write the comparison's plots under ``RUN/plots``; returns the paths written."""
    if not run.writer:
        return []
    plots = run.path / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    paths = [plot_accuracy(plots / "comparison_accuracy.png", results)]
    prefixes = [f"{arm}-s{seed}" for arm in results["summary"] if arm.startswith("bissl")
                for seed in results["seeds"]]
    stage = plot_bissl_stages(plots / "comparison_bissl_stage.png", run.read_metrics(), prefixes)
    return paths + ([stage] if stage else [])
