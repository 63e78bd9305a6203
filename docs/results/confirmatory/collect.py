"""Copy the confirmatory study's raw records here and derive the figures the page quotes.

    python docs/results/confirmatory/collect.py RUN_A RUN_B LOG...

RUN_A ran part 1 and seeds 6-13, RUN_B (a copy of RUN_A made after part 1) seeds 14-21.
Copies, for each run dir, ``config.yaml``, ``meta.json``, ``metrics.jsonl``, ``results/`` (JSON,
``runs.jsonl``, ``table.txt``) and each arm's ``config.yaml``, ``meta.json``, ``metrics.jsonl``,
``results/`` and Optuna ``search.db``, into ``a/`` and ``b/`` (checkpoints are not copied); the
console logs into ``logs/``. Writes ``runs-merged.jsonl`` (A's records, then the records B added
after the copy) and ``stage_stats.json`` (per BiSSL stage: solve residuals, curvature, skipped
solves, theta_P / theta_D validation top-1, stage seconds; per arm: wall time and HVPs).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_BYTES = 5_000_000


def _copy(src: Path, dst: Path) -> None:
    if src.is_file() and src.stat().st_size <= MAX_BYTES:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    elif src.is_file():
        print(f"not copied (> 5 MB): {src}")


def copy_run(run: Path, out: Path) -> None:
    for name in ("config.yaml", "meta.json", "metrics.jsonl"):
        _copy(run / name, out / name)
    for f in sorted((run / "results").glob("*")):
        _copy(f, out / "results" / f.name)
    for arm in sorted((run / "arms").glob("*")):
        for name in ("config.yaml", "meta.json", "metrics.jsonl", "search.db"):
            _copy(arm / name, out / "arms" / arm.name / name)
        for f in sorted((arm / "results").glob("*")):
            _copy(f, out / "arms" / arm.name / "results" / f.name)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def merged_runs(a: Path, b: Path) -> list[str]:
    la = (a / "results" / "runs.jsonl").read_text().splitlines()
    lb = (b / "results" / "runs.jsonl").read_text().splitlines() if (b / "results" / "runs.jsonl").is_file() else []
    # B is a copy of A after part 1: its first lines are part 1's
    part1 = next((i for i, (x, y) in enumerate(zip(la, lb, strict=False)) if x != y), min(len(la), len(lb)))
    return la + lb[part1:]


def stage_stats(runs: list[Path], records: list[dict]) -> dict:
    metrics = [r for run in runs for r in _jsonl(run / "metrics.jsonl")]
    out: dict = {"stages": {}, "arms": {}}
    for run in runs:
        for res in sorted((run / "results").glob("bissl*-s*.json")):
            name = res.stem
            if name in out["stages"]:
                continue
            result = json.loads(res.read_text())
            upper = {r["step"]: r for r in metrics if r["stage"] == f"{name}-upper"}  # copies dedup by step
            checked = [r["solve_rel_residual"] for r in upper.values() if r.get("solve_checked", 1.0)]
            curv = [r["solve_min_curvature"] for r in upper.values()
                    if r.get("solve_min_curvature") is not None and r["solve_min_curvature"] == r["solve_min_curvature"]]
            out["stages"][name] = {
                "solves": len(upper), "skipped": int(sum(r.get("skipped", 0.0) for r in upper.values())),
                "median_rel_residual": statistics.median(checked) if checked else None,
                "max_rel_residual": max(checked) if checked else None,
                "min_curvature": min(curv) if curv else None,
                "theta_p_val_top1": result.get("lower_val_top1"), "theta_d_val_top1": result.get("upper_val_top1"),
                "stage_seconds": result.get("seconds_per_alternation", 0.0) * result.get("alternations", 0),
                "num_hvp": result.get("num_hvp"),
            }
    seeds: dict = {}
    for r in records:
        if r["kind"] == "seed":
            seeds.setdefault(r["arm"], {})[r["seed"]] = r["result"]
    for arm, by_seed in seeds.items():
        out["arms"][arm] = {
            "seeds": len(by_seed),
            "wall_s_total": sum(v["seconds"] for v in by_seed.values()),
            "wall_s_per_seed_median": statistics.median(v["seconds"] for v in by_seed.values()),
            "stage_s_per_seed_median": statistics.median(v["stage_seconds"] for v in by_seed.values()),
            "num_hvp_per_seed": sorted({v["num_hvp"] for v in by_seed.values()}),
            "search": next(({"lr": v["lr"], "weight_decay": v["weight_decay"]} for v in by_seed.values()), None),
        }
    return out


def per_seed_table(records: list[dict]) -> str:
    """Markdown: test top-1 per arm and seed (the seeds with a test record so far)."""
    test = {(r["arm"], r["seed"]): r["metrics"]["top1"] for r in records if r["kind"] == "test"}
    arms = ["bissl", "conventional", "conventional+", "bissl-identity"]
    seeds = sorted({s for _, s in test})
    lines = ["| seed | " + " | ".join(arms) + " | bissl − conventional |",
             "|---|" + "---|" * (len(arms) + 1)]
    for s in seeds:
        cells = [f"{test[(a, s)]:.2f}" if (a, s) in test else "—" for a in arms]
        d = f"{test[('bissl', s)] - test[('conventional', s)]:+.2f}" if ("bissl", s) in test and \
            ("conventional", s) in test else "—"
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {d} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    a, b, *logs = map(Path, argv)
    copy_run(a, HERE / "a")
    if b.is_dir():
        copy_run(b, HERE / "b")
    for log in logs:
        _copy(log, HERE / "logs" / log.name)
    lines = merged_runs(a, b) if b.is_dir() else (a / "results" / "runs.jsonl").read_text().splitlines()
    (HERE / "runs-merged.jsonl").write_text("\n".join(lines) + "\n")
    records = [json.loads(line) for line in lines if line.strip()]
    stats = stage_stats([a, b] if b.is_dir() else [a], records)
    (HERE / "stage_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    (HERE / "per_seed.md").write_text(per_seed_table(records))
    print(json.dumps(stats, indent=1)[:4000])


if __name__ == "__main__":
    main(sys.argv[1:])
