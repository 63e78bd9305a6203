"""``python -m benchmarks.alternation {run,report}``: see the package docstring."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent.parent / "results"


def merge(previous: dict, new: dict) -> dict:
    """``new``'s seeds into ``previous``: whole new seeds appended, known seeds updated per key."""
    by_seed = {s["seed"]: s for s in previous["seeds"]}
    for entry in new["seeds"]:
        old = by_seed.get(entry["seed"])
        if old is None:
            previous["seeds"].append(entry)
            continue
        for key, value in entry.items():
            if key == "contenders" and "contenders" in old:
                old["contenders"].update(value)
            elif key == "runs":  # provenance accumulates: which process measured which part
                old["runs"] = [*old.get("runs", []), *value]
            else:
                old[key] = value
    previous["finished"] = new["finished"]
    return previous


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.alternation", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure one mode and write its raw JSON")
    run.add_argument("--mode", choices=["smoke", "quick", "full"], default="quick")
    run.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (times with CUDA events there)")
    run.add_argument("--seeds", type=int, nargs="*", help="override the mode's seeds")
    run.add_argument("--contenders", nargs="*", help="only these contenders (names as in the JSON)")
    run.add_argument("--rounds", type=int, help="timed rounds per contender (interleaved, reversed every other "
                                                "round; default: the mode's)")
    run.add_argument("--budgets", type=int, nargs="*", help="iteration budgets of the per-budget contenders "
                                                                "(default: the mode's)")
    run.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/alternation-MODE.json)")
    run.add_argument("--sections", nargs="*", default=["alternation", "overhead", "peers"],
                     choices=["alternation", "overhead", "peers"], help="what to measure (default: all)")
    run.add_argument("--append", action="store_true",
                     help="merge into an existing JSON file (new seeds are added; for a seed already there, "
                          "the measured sections and contenders replace the old ones)")
    report = sub.add_parser("report", help="write docs/benchmarks.md and its plots from the JSON files")
    report.add_argument("--results", type=Path, default=RESULTS)
    report.add_argument("--docs", type=Path, default=Path(__file__).resolve().parents[2] / "docs")
    args = parser.parse_args(argv)

    if args.command == "report":
        from .report import write_report

        print(write_report(args.results, args.docs))
        return

    from .run import run_mode

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    out = args.out or RESULTS / f"alternation-{args.mode}.json"
    result = run_mode(args.mode, device, tuple(args.seeds) if args.seeds else None, args.contenders,
                      tuple(args.sections), args.rounds, tuple(args.budgets) if args.budgets else None)
    if args.append and out.exists():
        result = merge(json.loads(out.read_text()), result)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
