r"""The registered analysis of the confirmatory replica (``docs/results.md``, "Confirmatory study").

Test top-1 of paired seed runs 6..21 (16), four arms. Written and tested before the study ran.

* **Primary**: BiSSL - conventional, 95 % paired-t interval. Decision, in this order: "better"
  if the interval lies above 0, "worse" if below; else "equivalent" if it lies inside
  ±``MARGIN`` points; else "inconclusive".
* **Secondary**: BiSSL - conventional+ and BiSSL - bissl-identity. Superiority by Holm over the
  two (two-sided paired-t p-values, family-wise α = 0.05): a rejected contrast is "better" or
  "worse" by its sign; otherwise "equivalent" if its 97.5 % paired-t interval lies inside
  ±``MARGIN``; otherwise "inconclusive".
* Power of the two-sided paired t-test from scipy's noncentral t.

``python -m bissl.confirm RUN_DIR... [--seeds 6-21] [--json OUT] [--plot OUT.png]`` prints the
analysis; with seeds missing it says "in progress: N of 16 seeds" and decides nothing. Other
``--seeds`` (e.g. a pooled 1-21 over two studies' ``runs.jsonl``) are labelled exploratory.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REGISTERED_SEEDS = tuple(range(6, 22))
MARGIN = 1.0
ALPHA = 0.05
PRIMARY = ("bissl", "conventional")
SECONDARY = (("bissl", "conventional+"), ("bissl", "bissl-identity"))
ARMS = ("bissl", "conventional", "conventional+", "bissl-identity")


def paired_t(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """``a - b`` paired by position: mean, sd, n, two-sided ``level`` paired-t interval, p-value."""
    from scipy import stats

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    if n < 2:
        raise ValueError(f"a paired t needs at least 2 pairs, got {n}")
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    if sd == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    return {"mean": mean, "sd": sd, "n": n, "level": level, "low": mean - half, "high": mean + half, "p": p}


def verdict(low: float, high: float, margin: float = MARGIN) -> str:
    """The registered rule on an interval: better / worse / equivalent / inconclusive, in this order."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    if -margin < low and high < margin:
        return "equivalent"
    return "inconclusive"


def holm(pvalues: Sequence[float], alpha: float = ALPHA) -> tuple[list[float], list[bool]]:
    """Holm's step-down procedure: adjusted p-values and which hypotheses are rejected."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, rejected = [0.0] * m, [False] * m
    running, stopped = 0.0, False
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
        stopped = stopped or pvalues[i] > alpha / (m - rank)
        rejected[i] = not stopped
    return adjusted, rejected


def analyse(values: Mapping[str, Mapping[int, float]], seeds: Sequence[int] = REGISTERED_SEEDS, *,
            margin: float = MARGIN, alpha: float = ALPHA) -> dict[str, Any]:
    """The registered analysis on ``values[arm][seed]`` (test top-1, %), over ``seeds``.

    All four arms must have every seed; otherwise :class:`ValueError`.
    """
    missing = {arm: [s for s in seeds if s not in values.get(arm, {})] for arm in ARMS}
    missing = {arm: m for arm, m in missing.items() if m}
    if missing:
        raise ValueError(f"seeds missing: {missing}")

    def col(arm: str) -> list[float]:
        return [values[arm][s] for s in seeds]

    primary = paired_t(col(PRIMARY[0]), col(PRIMARY[1]), 0.95)
    primary.update(contrast=f"{PRIMARY[0]} - {PRIMARY[1]}", decision=verdict(primary["low"], primary["high"], margin))
    secondary = []
    for a, b in SECONDARY:
        c = paired_t(col(a), col(b), 1 - alpha / 2)
        c["contrast"] = f"{a} - {b}"
        secondary.append(c)
    adjusted, rejected = holm([c["p"] for c in secondary], alpha)
    for c, p_holm, rej in zip(secondary, adjusted, rejected, strict=True):
        c["p_holm"], c["superiority"] = p_holm, rej
        c["equivalent"] = bool(-margin < c["low"] and c["high"] < margin)
        c["decision"] = ("better" if c["mean"] > 0 else "worse") if rej else \
            "equivalent" if c["equivalent"] else "inconclusive"
    arms = {arm: {"mean": statistics.fmean(col(arm)), "sd": statistics.stdev(col(arm))} for arm in ARMS}
    return {"seeds": list(seeds), "margin": margin, "alpha": alpha, "arms": arms,
            "primary": primary, "secondary": secondary}


def power_paired_t(delta: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` (noncentral t, df = n - 1)."""
    from scipy import stats

    df, ncp = n - 1, delta * math.sqrt(n) / sd
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    # P(T' > c) + P(T' < -c), the lower tail as P(T'(-ncp) > c) (nct.cdf is NaN far in its tail)
    return float(stats.nct.sf(crit, df, ncp) + stats.nct.sf(crit, df, -ncp))


def detectable_effect(sd: float, n: int, power: float = 0.8, alpha: float = ALPHA) -> float:
    """The smallest true difference the two-sided paired t-test detects with ``power``."""
    from scipy import optimize

    return float(optimize.brentq(lambda d: power_paired_t(d, sd, n, alpha) - power, 1e-9, 10 * sd))


def prob_equivalent(delta: float, sd: float, n: int, margin: float = MARGIN, level: float = 0.95) -> float:
    """P(the ``level`` paired-t interval lies inside ±``margin``) at true difference ``delta``.

    The interval is mean ± c·S/√n with mean ~ N(delta, sd²/n) independent of
    S² ~ sd²·χ²(n-1)/(n-1); integrated over the χ² variable.
    """
    from scipy import integrate, stats

    df = n - 1
    c = float(stats.t.ppf(0.5 + level / 2, df))
    se = sd / math.sqrt(n)

    def inside(u: float) -> float:
        half = c * sd * math.sqrt(u / df) / math.sqrt(n)
        if half >= margin:
            return 0.0
        prob = stats.norm.cdf((margin - half - delta) / se) - stats.norm.cdf((-margin + half - delta) / se)
        return float(prob * stats.chi2.pdf(u, df))

    u_max = df * (margin * math.sqrt(n) / (c * sd)) ** 2
    return float(integrate.quad(inside, 0.0, u_max, limit=200)[0])


def read_test_values(*paths: Path) -> dict[str, dict[int, float]]:
    """``{arm: {seed: test top-1}}`` from runs' ``results/runs.jsonl`` (a run dir or the file
    itself; later records win)."""
    out: dict[str, dict[int, float]] = {}
    files = [p / "results" / "runs.jsonl" if p.is_dir() else p for p in paths]
    for line in (line for f in files for line in f.read_text().splitlines()):
        if line.strip():
            rec = json.loads(line)
            if rec["kind"] == "test":
                out.setdefault(rec["arm"], {})[int(rec["seed"])] = rec["metrics"]["top1"]
    return out


def complete_seeds(values: Mapping[str, Mapping[int, float]], seeds: Sequence[int]) -> list[int]:
    """The seeds every arm has."""
    return [s for s in seeds if all(s in values.get(arm, {}) for arm in ARMS)]


def table(result: dict[str, Any]) -> str:
    """The analysis as plain text."""
    seeds = result["seeds"]
    lines = [f"seeds {seeds[0]}..{seeds[-1]} (n = {len(seeds)}); margin ±{result['margin']}; "
             f"family-wise alpha {result['alpha']}"]
    for arm, row in result["arms"].items():
        lines.append(f"  {arm:15s} test top-1 {row['mean']:.2f} ± {row['sd']:.2f}")
    p = result["primary"]
    lines.append(f"primary   {p['contrast']}: {p['mean']:+.2f} points (sd {p['sd']:.2f}), 95% paired-t "
                 f"[{p['low']:+.2f}, {p['high']:+.2f}], p = {p['p']:.3g} -> {p['decision'].upper()}")
    for c in result["secondary"]:
        lines.append(f"secondary {c['contrast']}: {c['mean']:+.2f} (sd {c['sd']:.2f}), 97.5% paired-t "
                     f"[{c['low']:+.2f}, {c['high']:+.2f}], p = {c['p']:.3g}, Holm p = {c['p_holm']:.3g} "
                     f"-> {c['decision'].upper()}")
    return "\n".join(lines)


def plot(path: Path, values: Mapping[str, Mapping[int, float]], result: dict[str, Any]) -> Path:
    """Per-seed paired differences of the three contrasts with their registered intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contrasts = [result["primary"], *result["secondary"]]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for k, c in enumerate(contrasts):
        a, b = c["contrast"].split(" - ")
        diffs = [values[a][s] - values[b][s] for s in result["seeds"]]
        ax.scatter([k + 0.15] * len(diffs), diffs, s=12, alpha=0.6, color="grey")
        ax.errorbar([k - 0.1], [c["mean"]], yerr=[[c["mean"] - c["low"]], [c["high"] - c["mean"]]],
                    fmt="o", color="black", capsize=4)
    m = result["margin"]
    ax.axhline(0, color="black", lw=0.8)
    ax.axhspan(-m, m, color="tab:green", alpha=0.12, label=f"±{m} (equivalence margin)")
    ax.set_xticks(range(len(contrasts)),
                  [f"{c['contrast']}\n({'95' if i == 0 else '97.5'} % CI)" for i, c in enumerate(contrasts)],
                  fontsize=8)
    ax.set_ylabel("test top-1 difference (points)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _seed_range(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bissl.confirm", description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR_OR_RUNS_JSONL")
    parser.add_argument("--seeds", type=_seed_range, default=list(REGISTERED_SEEDS), help="e.g. 6-21")
    parser.add_argument("--json", type=Path, default=None, help="write the analysis as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write the contrasts' plot here")
    args = parser.parse_args(argv)
    values = read_test_values(*args.runs)
    done = complete_seeds(values, args.seeds)
    if len(done) < len(args.seeds):
        print(f"in progress: {len(done)} of {len(args.seeds)} seeds complete for all four arms ({done}); "
              "no decision before every registered seed is in")
        return 1
    result = analyse(values, args.seeds)
    if list(args.seeds) != list(REGISTERED_SEEDS):
        result["note"] = "EXPLORATORY: not the registered seeds 6-21"
        print(result["note"])
    print(table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot is not None:
        plot(args.plot, values, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
