"""The confirmatory study's registered analysis (bissl.confirm) against scipy, hand computations
and simulation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from bissl.confirm import (
    REGISTERED_SEEDS,
    analyse,
    complete_seeds,
    detectable_effect,
    holm,
    main,
    paired_t,
    power_paired_t,
    prob_equivalent,
    read_test_values,
    verdict,
)
from scipy import stats

N = len(REGISTERED_SEEDS)
Z = np.array([1, -1] * (N // 2), dtype=float)  # mean 0; sd sqrt(16/15)
Z = Z / Z.std(ddof=1)  # exactly mean 0, sample sd 1


def _diffs(mean: float, sd: float) -> list[float]:
    """16 paired differences with exactly this mean and sample sd."""
    return list(mean + sd * Z)


def _values(diffs: dict[str, list[float]]) -> dict[str, dict[int, float]]:
    """Arm values whose differences to conventional (for bissl) and from bissl (for the
    secondary arms) are the given ones: bissl = conventional + d, other = bissl - d."""
    base = {s: 80.0 + 0.3 * math.sin(s) for s in REGISTERED_SEEDS}
    bissl = {s: base[s] + d for s, d in zip(REGISTERED_SEEDS, diffs["primary"], strict=True)}
    out = {"conventional": base, "bissl": bissl}
    for arm in ("conventional+", "bissl-identity"):
        out[arm] = {s: bissl[s] - d for s, d in zip(REGISTERED_SEEDS, diffs[arm], strict=True)}
    return out


def test_paired_t_matches_scipy() -> None:
    rng = np.random.default_rng(3)
    a, b = 80 + rng.normal(size=N), 79.5 + rng.normal(size=N)
    for level in (0.95, 0.975):
        got = paired_t(list(a), list(b), level)
        ref = stats.ttest_rel(a, b)
        ci = ref.confidence_interval(level)
        assert got["p"] == pytest.approx(ref.pvalue, rel=1e-10)
        assert (got["low"], got["high"]) == pytest.approx((ci.low, ci.high), rel=1e-10)
        assert got["mean"] == pytest.approx(np.mean(a - b)) and got["n"] == N


@pytest.mark.parametrize(("mean", "sd", "expected"), [
    (1.5, 1.0, "better"),         # 1.5 ± 2.131 * 0.25 = [0.97, 2.03]
    (-1.5, 1.0, "worse"),
    (0.2, 1.0, "equivalent"),     # [-0.33, 0.73], inside ±1
    (0.3, 2.5, "inconclusive"),   # [-1.03, 1.63]
    (-0.6, 1.0, "worse"),         # [-1.13, -0.07]: excluding 0 decides before the margin
])
def test_primary_rule_in_the_registered_order(mean: float, sd: float, expected: str) -> None:
    half = 2.131449545559323 * sd / 4  # t(0.975, 15), from tables, times sd / sqrt(16)
    low, high = mean - half, mean + half
    vals = _values({"primary": _diffs(mean, sd), "conventional+": _diffs(0, 1), "bissl-identity": _diffs(0, 1)})
    primary = analyse(vals)["primary"]
    assert (primary["low"], primary["high"]) == pytest.approx((low, high), abs=1e-9)
    assert primary["decision"] == expected


def test_verdict_boundaries() -> None:
    assert verdict(0.01, 2.0) == "better" and verdict(-2.0, -0.01) == "worse"
    assert verdict(-0.99, 0.99) == "equivalent" and verdict(-1.0, 0.5) == "inconclusive"
    assert verdict(0.5, 0.9) == "better"  # excluding 0 decides before the margin


@pytest.mark.parametrize(("ps", "adjusted", "rejected"), [
    ([0.01, 0.04], [0.02, 0.04], [True, True]),     # 0.01 <= 0.025, then 0.04 <= 0.05
    ([0.04, 0.01], [0.04, 0.02], [True, True]),
    ([0.03, 0.04], [0.06, 0.06], [False, False]),   # 0.03 > 0.025: stop
    ([0.001, 0.2], [0.002, 0.2], [True, False]),
    ([0.6, 0.7], [1.0, 1.0], [False, False]),       # 2 * 0.6 capped at 1
])
def test_holm_by_hand(ps: list[float], adjusted: list[float], rejected: list[bool]) -> None:
    got_adj, got_rej = holm(ps)
    assert got_adj == pytest.approx(adjusted) and got_rej == rejected


def test_secondary_holm_and_equivalence_on_97_5_intervals() -> None:
    # bissl - conventional+ : d = -(diffs) so bissl - plus = +mean. Target p-values by construction:
    # mean = t_{1 - p/2, 15} * sd / 4 gives a two-sided p of exactly p.
    p_plus, p_ident = 0.004, 0.04
    m_plus = stats.t.isf(p_plus / 2, 15) * 1.0 / 4
    m_ident = stats.t.isf(p_ident / 2, 15) * 0.5 / 4
    vals = _values({"primary": _diffs(0.0, 1.0), "conventional+": _diffs(m_plus, 1.0),
                    "bissl-identity": _diffs(m_ident, 0.5)})
    res = analyse(vals)
    plus, ident = res["secondary"]
    assert plus["contrast"] == "bissl - conventional+" and ident["contrast"] == "bissl - bissl-identity"
    assert plus["p"] == pytest.approx(p_plus) and ident["p"] == pytest.approx(p_ident)
    # Holm by hand: 0.004 <= 0.025 rejected (adjusted 0.008); 0.04 <= 0.05 rejected (adjusted 0.04)
    assert plus["p_holm"] == pytest.approx(0.008) and ident["p_holm"] == pytest.approx(0.04)
    assert plus["decision"] == "better" and ident["decision"] == "better"
    # 97.5 % intervals: mean ± t(0.9875, 15) * sd / 4
    t975 = stats.t.ppf(0.9875, 15)
    assert (ident["low"], ident["high"]) == pytest.approx((m_ident - t975 * 0.125, m_ident + t975 * 0.125))
    assert ident["level"] == 0.975 and ident["equivalent"]  # inside ±1 but Holm-significant: "better" first

    # same identity contrast, but the other p is 0.03: Holm stops at the first step (0.03 > 0.025)
    m_plus = stats.t.isf(0.03 / 2, 15) * 1.0 / 4
    res = analyse(_values({"primary": _diffs(0.0, 1.0), "conventional+": _diffs(m_plus, 1.0),
                           "bissl-identity": _diffs(m_ident, 0.5)}))
    plus, ident = res["secondary"]
    assert not plus["superiority"] and not ident["superiority"]
    assert plus["p_holm"] == pytest.approx(0.06) and ident["p_holm"] == pytest.approx(0.06)
    # bissl - identity: 97.5 % interval inside ±1 -> equivalent; conventional+ by hand below
    assert ident["decision"] == "equivalent"
    half = t975 * 1.0 / 4
    expect = "equivalent" if (m_plus + half < 1 and m_plus - half > -1) else "inconclusive"
    assert plus["decision"] == expect == "inconclusive"  # 0.59 + 0.63 > 1


def test_missing_seeds_decide_nothing(tmp_path: Path) -> None:
    vals = _values({"primary": _diffs(0.5, 1.0), "conventional+": _diffs(0, 1), "bissl-identity": _diffs(0, 1)})
    del vals["bissl-identity"][21]
    with pytest.raises(ValueError, match="missing"):
        analyse(vals)
    assert complete_seeds(vals, REGISTERED_SEEDS) == list(range(6, 21))
    (tmp_path / "results").mkdir()
    with open(tmp_path / "results" / "runs.jsonl", "w") as f:
        for arm, by_seed in vals.items():
            for s, v in by_seed.items():
                f.write(json.dumps({"arm": arm, "kind": "test", "seed": s, "metrics": {"top1": v}}) + "\n")
    assert read_test_values(tmp_path) == vals
    assert main([str(tmp_path)]) == 1  # "in progress: 15 of 16"


def test_power_matches_simulation() -> None:
    rng = np.random.default_rng(0)
    n, sd, delta, reps = 16, 1.05, 1.0, 40_000
    d = rng.normal(delta, sd, size=(reps, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    simulated = np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1))
    got = power_paired_t(delta, sd, n)
    assert got == pytest.approx(simulated, abs=0.006)  # 3 standard errors of the simulation
    assert 0.93 < got < 0.96
    # the first study: 5 seeds, power 0.37 and a detectable effect of 1.77 points (80 % power)
    assert power_paired_t(1.0, 1.05, 5) == pytest.approx(0.37, abs=0.005)
    assert detectable_effect(1.05, 5) == pytest.approx(1.77, abs=0.01)
    assert power_paired_t(detectable_effect(1.05, 16), 1.05, 16) == pytest.approx(0.8, abs=1e-6)


@pytest.mark.parametrize("delta", [0.0, 0.5])
def test_probability_of_equivalence_matches_simulation(delta: float) -> None:
    rng = np.random.default_rng(1)
    n, sd, reps = 16, 1.05, 40_000
    d = rng.normal(delta, sd, size=(reps, n))
    half = stats.t.ppf(0.975, n - 1) * d.std(1, ddof=1) / math.sqrt(n)
    m = d.mean(1)
    simulated = np.mean((m - half > -1.0) & (m + half < 1.0))
    assert prob_equivalent(delta, sd, n) == pytest.approx(simulated, abs=0.008)
