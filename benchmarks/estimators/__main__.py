"""``python -m benchmarks.estimators {run,report}``: see the package docstring."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"
DOCS = Path(__file__).resolve().parents[2] / "docs"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.estimators", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure one mode and write its raw JSON")
    run.add_argument("--mode", choices=["smoke", "full"], default="full")
    run.add_argument("--seeds", type=int, nargs="*", help="override the mode's seeds")
    run.add_argument("--problems", nargs="*", choices=["digits-l2", "hypercleaning"],
                     help="only these outer-loop problems (the quadratic always runs)")
    run.add_argument("--contenders", nargs="*", help="only these outer-loop contenders (names as in the JSON)")
    run.add_argument("--threads", type=int, default=1,
                     help="torch intra-op threads (default 1: these problems are small, and 2 threads on a "
                          "machine with any other load ran a gradient 100x slower, by spinning)")
    run.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/estimators.json; "
                                               "smoke: estimators-smoke.json)")
    report = sub.add_parser("report", help="rebuild docs/estimators.md's measured part and its plots from the JSON")
    report.add_argument("--results", type=Path, default=RESULTS / "estimators.json")
    report.add_argument("--docs", type=Path, default=DOCS)
    args = parser.parse_args(argv)

    if args.command == "report":
        from .report import write_report

        print(write_report(args.results, args.docs))
        return

    import torch

    from .run import run_mode

    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)  # before run_mode records the machine summary
    out = args.out or RESULTS / ("estimators.json" if args.mode == "full" else f"estimators-{args.mode}.json")
    result = run_mode(args.mode, tuple(args.seeds) if args.seeds else None, args.problems, args.contenders)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
