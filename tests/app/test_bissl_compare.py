"""`bissl run`: every arm on tiny digits, matched budgets, paired seeds, one test read, resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from bissl.checkpoint import load_checkpoint
from scipy import stats

ARMS = ["conventional", "conventional+", "bissl", "bissl-identity", "scratch"]
SEEDS = [1, 2]  # seed runs of a run with seed 0 (the trials' seed)
ALTERNATIONS, LOWER, UPPER, LOWER_BATCH = 2, 3, 2, 64
TINY = ["deterministic=true", "model.width=8", "pretext.epochs=2", "pretext.warmup_epochs=1",
        "pretext.eval_every_epochs=2", "pretext.probe_epochs=10", "warmup.epochs=1", "finetune.epochs=1",
        "search.trials=2", "search.trial_epochs=1", f"bissl.alternations={ALTERNATIONS}",
        f"bissl.lower_steps={LOWER}", f"bissl.upper_steps={UPPER}", f"bissl.lower_batch_size={LOWER_BATCH}",
        "bissl.hessian_batch_size=16", "bissl.upper_batch_size=32",
        "bissl.delta=100"]  # a 2-epoch backbone: more damping keeps the system positive definite
KILL = ("bissl-s2", 1)  # inside the bissl arm's second seed, after its first checkpoint

_KILLED = textwrap.dedent("""
    import os, signal, sys
    from bissl.config import load_config
    from bissl.distributed import DistInfo
    from bissl.pipeline import run
    from bissl.rundir import RunDir

    run_dir, stage, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = load_config("digits", sys.argv[4:])

    def hook(name, n):
        if name == stage and n == step:
            os.kill(os.getpid(), signal.SIGKILL)

    run(cfg, RunDir.create(run_dir, cfg), DistInfo(), step_hook=hook)
""")


def _cli_args() -> list[str]:
    return [a for s in TINY for a in ("--set", s)] + ["--arms", ",".join(ARMS), "--seeds", str(len(SEEDS))]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("compare") / "clean"
    proc = _run("-m", "bissl.cli", "run", "--run-dir", str(run_dir), *_cli_args())
    assert not proc.returncode, proc.stderr[-3000:]
    assert "BiSSL vs conventional" in proc.stdout
    return run_dir


@pytest.mark.timeout(1200)
def test_every_arm_runs_with_matched_budgets(clean: Path) -> None:
    assert (clean / "results" / "table.txt").is_file()
    assert {p.name for p in (clean / "plots").glob("comparison_*.png")} == {
        "comparison_accuracy.png", "comparison_bissl_stage.png"}
    records = _jsonl(clean / "results" / "runs.jsonl")
    seed_recs = {(r["arm"], r["seed"]): r["result"] for r in records if r["kind"] == "seed"}
    assert set(seed_recs) == {(a, s) for a in ARMS for s in SEEDS}

    for s in SEEDS:
        conv, plus, bissl = seed_recs[("conventional", s)], seed_recs[("conventional+", s)], seed_recs[("bissl", s)]
        # conventional's extra pretext images = bissl's lower-step images (one number, from bissl:)
        assert conv["pretext_images"] == bissl["pretext_images"] == ALTERNATIONS * LOWER * LOWER_BATCH
        assert plus["pretext_images"] == conv["pretext_images"]
        # conventional+'s extra supervised steps = bissl's upper steps
        assert plus["supervised_steps"] == bissl["supervised_steps"] == ALTERNATIONS * UPPER
        assert conv["supervised_steps"] == 0 and seed_recs[("scratch", s)]["pretext_images"] == 0
        assert bissl["num_hvp"] == ALTERNATIONS * UPPER * 5 and seed_recs[("bissl-identity", s)]["num_hvp"] == 0
        # theta_P after the BiSSL stage is not the conventional arm's backbone
        a = load_checkpoint(clean / "checkpoints" / f"bissl-s{s}-final.pt")["backbone"]
        b = load_checkpoint(clean / "checkpoints" / f"continued-s{s}-final.pt")["backbone"]
        assert any(v.is_floating_point() and not torch.equal(v, b[k]) for k, v in a.items())

    metrics = _jsonl(clean / "metrics.jsonl")
    for arm in ("bissl", "bissl-identity"):
        for s in SEEDS:
            solves = [r for r in metrics if r["stage"] == f"{arm}-s{s}-upper"]
            assert len(solves) == ALTERNATIONS * UPPER  # one solve record per upper step

    # no seed run used a trial's seed; the test split was read once per seed run
    searches = [r for r in records if r["kind"] == "search"]
    assert len(searches) == len(ARMS) and all(r["trial_seed"] not in SEEDS for r in searches)
    tests = [(r["arm"], r["seed"]) for r in records if r["kind"] == "test"]
    assert sorted(tests) == sorted({(a, s) for a in ARMS for s in SEEDS})
    reads = [(r["stage"], r["step"]) for r in metrics if r["stage"].startswith("test/")]
    assert sorted(reads) == sorted((f"test/{a}", s) for a in ARMS for s in SEEDS)


@pytest.mark.timeout(1200)
def test_paired_differences_match_an_independent_computation(clean: Path) -> None:
    summary = json.loads((clean / "results" / "comparison.json").read_text())["summary"]
    records = _jsonl(clean / "results" / "runs.jsonl")
    test = {(r["arm"], r["seed"]): r["metrics"]["top1"] for r in records if r["kind"] == "test"}
    for arm in ARMS[1:]:
        diffs = [test[(arm, s)] - test[("conventional", s)] for s in SEEDS]
        mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
        half = stats.t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
        got = summary[arm]["top1_vs_conventional"]
        assert got["mean"] == pytest.approx(mean, abs=1e-9)
        assert got["low"] == pytest.approx(mean - half, abs=1e-9)
        assert summary[arm]["top1"]["mean"] == pytest.approx(statistics.fmean(test[(arm, s)] for s in SEEDS))


@pytest.mark.timeout(1800)
def test_killed_run_resumes_to_the_same_table(clean: Path) -> None:
    killed = clean.parent / "killed"
    proc = _run("-c", _KILLED, str(killed), *map(str, KILL), *TINY, f"arms=[{','.join(ARMS)}]",
                f"search.seeds={len(SEEDS)}")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (killed / "results" / "comparison.json").exists()
    proc = _run("-m", "bissl.cli", "run", "--run-dir", str(killed), "--resume")
    assert not proc.returncode, proc.stderr[-3000:]
    a = json.loads((clean / "results" / "comparison.json").read_text())
    b = json.loads((killed / "results" / "comparison.json").read_text())
    for arm in ARMS:
        for s in map(str, SEEDS):
            assert a["arms"][arm]["seeds"][s]["test"] == b["arms"][arm]["seeds"][s]["test"], (arm, s)
    # the report command rebuilds the same table from runs.jsonl
    shutil.copy(killed / "results" / "table.txt", killed / "table-run.txt")
    proc = _run("-m", "bissl.cli", "report", str(killed))
    assert not proc.returncode, proc.stderr[-2000:]
    rows = lambda p: [line for line in p.read_text().splitlines() if line.startswith(tuple(ARMS))]  # noqa: E731
    assert rows(killed / "results" / "table.txt") == rows(killed / "table-run.txt")


def _fake_results(values: dict[str, list[float]]) -> dict:
    return {"arms": {arm: {"seeds": {str(i + 1): {"test": {"top1": v}} for i, v in enumerate(vals)}}
                     for arm, vals in values.items()}}


@pytest.mark.parametrize(("shift", "expected"), [(2.0, "helps"), (-2.0, "hurts"), (0.05, "equivalent"),
                                                 (0.6, "inconclusive")])
def test_primary_decision_rule(shift: float, expected: str) -> None:
    from bissl.compare import decide

    base = [80.0, 81.0, 79.5, 80.5, 80.2]
    noise = [0.1, -0.1, 0.05, -0.05, 0.0] if expected != "inconclusive" else [0.9, -0.8, 0.7, -0.9, 0.6]
    results = _fake_results({"conventional": base, "bissl": [b + shift + n for b, n in zip(base, noise, strict=True)]})
    d = decide(results)["primary"]
    diffs = [shift + n for n in noise]
    half = stats.t.ppf(0.975, 4) * statistics.stdev(diffs) / math.sqrt(5)
    assert d["low"] == pytest.approx(statistics.fmean(diffs) - half)
    assert d["decision"] == expected


def test_secondary_contrasts_are_holm_corrected() -> None:
    from bissl.compare import decide

    base = [80.0, 81.0, 79.5, 80.5, 80.2]
    noise = {"bissl": [0.3, -0.2, 0.1, 0.0, -0.1], "conventional+": [0.1, 0.0, -0.3, 0.2, 0.1],
             "bissl-identity": [0.0, 0.2, -0.1, 0.1, 0.0], "scratch": [-3.0, -2.0, -2.5, -3.5, -2.2]}
    vals = {"conventional": base, **{a: [b + n for b, n in zip(base, ns, strict=True)] for a, ns in noise.items()}}
    d = decide(_fake_results(vals))
    ps = {c["contrast"]: c["p"] for c in d["secondary"]}
    pairs = {"bissl - conventional+": ("bissl", "conventional+"), "bissl - bissl-identity": ("bissl", "bissl-identity"),
             "conventional - scratch": ("conventional", "scratch")}
    for name, (a, b) in pairs.items():
        assert ps[name] == pytest.approx(stats.ttest_rel(vals[a], vals[b]).pvalue)
    # Holm by hand: the smallest p against alpha/3, the next against alpha/2, the last against alpha
    ordered = sorted(ps.items(), key=lambda kv: kv[1])
    expect, going = {}, True
    for rank, (name, p) in enumerate(ordered):
        going = going and p <= 0.05 / (3 - rank)
        expect[name] = going
    assert {c["contrast"]: c["significant"] for c in d["secondary"]} == expect
    assert expect["conventional - scratch"]  # a 2.6-point gap with small noise is detected


def test_an_undefined_p_value_is_never_significant() -> None:
    from bissl.compare import decide

    # One seed: no paired-t test exists (scipy's p is NaN), so nothing may be called significant.
    vals = {"conventional": [80.0], "bissl": [85.0], "conventional+": [70.0], "bissl-identity": [60.0],
            "scratch": [50.0]}
    d = decide(_fake_results(vals))
    assert all(math.isnan(c["p"]) for c in d["secondary"])
    assert not any(c["significant"] for c in d["secondary"])


@pytest.fixture(scope="module")
def offset_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Scratch arm only: seeds 1, 2 (no offset); a fresh run with --seed-offset 1 (seed 2); and a
    copy of the first resumed with --seeds 1 --seed-offset 2 (seed 3, as a split part would)."""
    root = tmp_path_factory.mktemp("offset")
    tiny = [a for s in TINY for a in ("--set", s)]
    for name, extra in (("base", ["--seeds", "2"]), ("offset", ["--seeds", "1", "--seed-offset", "1"])):
        proc = _run("-m", "bissl.cli", "run", "--run-dir", str(root / name), *tiny, "--arms", "scratch", *extra)
        assert not proc.returncode, proc.stderr[-3000:]
    shutil.copytree(root / "base", root / "part")
    proc = _run("-m", "bissl.cli", "run", "--run-dir", str(root / "part"), "--resume", "--seeds", "1",
                "--seed-offset", "2")
    assert not proc.returncode, proc.stderr[-3000:]
    return root


@pytest.mark.timeout(1200)
def test_seed_offset_moves_only_the_seed_runs(offset_runs: Path) -> None:
    base, offset, part = (_jsonl(offset_runs / n / "results" / "runs.jsonl") for n in ("base", "offset", "part"))
    tests = lambda recs: {r["seed"]: r["metrics"] for r in recs if r["kind"] == "test"}  # noqa: E731
    searches = lambda recs: [r for r in recs if r["kind"] == "search"]  # noqa: E731
    # the offset run ran seed 2 only, and reproduces the unshifted run's seed 2 exactly: same split,
    # same trials (trial seed 0, same chosen lr/wd), same seed run
    assert set(tests(offset)) == {2} and set(tests(base)) == {1, 2}
    assert tests(offset)[2] == tests(base)[2]
    assert searches(offset)[0]["best"] == searches(base)[0]["best"] and searches(offset)[0]["trial_seed"] == 0
    seed_rec = {r["seed"]: r["result"] for r in offset if r["kind"] == "seed"}
    assert seed_rec[2]["finetune_name"] == "seed1"  # named by position from seed + 1, as in the base run
    # the resumed copy added seed 3 under its own name, reused the search, left seeds 1-2 alone
    assert set(tests(part)) == {1, 2, 3} and {s: tests(part)[s] for s in (1, 2)} == tests(base)
    assert len(searches(part)) == 1
    assert [r["result"]["finetune_name"] for r in part if r["kind"] == "seed" and r["seed"] == 3] == ["seed2"]
    assert (offset_runs / "part" / "arms" / "scratch" / "checkpoints" / "seed2-final.pt").is_file()
    meta = json.loads((offset_runs / "part" / "meta.json").read_text())
    assert [s["status"] for s in meta["sessions"]] == ["ok", "ok"] and all("ended" in s for s in meta["sessions"])


def test_seed_run_seeds_offset() -> None:
    from bissl.config import load_config
    from bissl.stages.search import seed_run_name, seed_run_seeds

    cfg = load_config("fashion-mnist-replica", ["search.seeds=16", "search.seed_offset=5"])
    assert cfg.seed == 0 and seed_run_seeds(cfg) == list(range(6, 22))
    assert [seed_run_name(cfg, i) for i in (0, 15)] == ["seed5", "seed20"]
    assert seed_run_seeds(load_config("fashion-mnist-replica", [])) == [1, 2, 3, 4, 5]  # default: as before
