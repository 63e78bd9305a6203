"""Run the three benchmark suites side by side and write ``benchmarks/RESULTS.md``.

Usage (from the repository root)::

    python benchmarks/make_tables.py                # full sizes, ~10 minutes on 2 cores (compiles)
    python benchmarks/make_tables.py --quick        # smaller problems (smoke run)
    python benchmarks/make_tables.py --threads 2 --out /tmp/RESULTS.md

Times are medians over interleaved rounds of all contenders of a table, measured in this one
process; on a shared machine only the ratios are meaningful.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller problems and fewer rounds")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: steadier ratios on a shared machine)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        os.environ["HYPERGRAD_BENCH_QUICK"] = "1"
    sys.path.insert(0, str(HERE))

    import torch

    torch.set_num_threads(args.threads)
    import bench_func_transforms as func_transforms
    import bench_hvp_methods as hvp_methods
    import bench_ihvp_solvers as ihvp_solvers
    import bench_vs_baselines as vs_baselines
    from _common import machine_summary

    sections = []
    started = time.perf_counter()
    budget = 4.0 if args.quick else 1.0
    for title, module, kwargs in [
        ("1. IHVP solvers", ihvp_solvers, {"rounds": 3, "budget_s": 15.0 / budget}),
        ("2. Hessian-vector product methods", hvp_methods, {"rounds": 5, "budget_s": 20.0 / budget}),
        ("3. hypergrad vs hand-written PyTorch and torchopt", vs_baselines,
         {"rounds": 3, "budget_s": 40.0 / budget}),
        ("4. torch.func transforms: vmap vs loop, eager vs compiled", func_transforms,
         {"rounds": 5, "budget_s": 10.0 / budget}),
    ]:
        t0 = time.perf_counter()
        text = module.tables(module.measure(**kwargs))
        print(f"{title}: {time.perf_counter() - t0:.0f} s", flush=True)
        sections.append((title, module.__doc__ or "", text))

    machine = machine_summary()
    try:
        import torchopt

        peers = f"torchopt {torchopt.__version__}"
    except ImportError:
        peers = "torchopt not installed (its rows are absent)"
    lines = [
        "# Benchmark results",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, **shared with other jobs** "
        f"(absolute times are noisy; compare the ratios, which were measured side by side in one process "
        f"with interleaved rounds)",
        f"- torch {machine['torch']}, {args.threads} intra-op thread(s), Python {machine['python']}; {peers}",
        f"- mode: {'quick' if args.quick else 'full'}; total run time {time.perf_counter() - started:.0f} s",
        "- regenerate: `python benchmarks/make_tables.py`; pytest-benchmark suites: "
        "`python -m pytest benchmarks --benchmark-enable -s`",
        "",
        "Relative errors are ||x - x_ref|| / ||x_ref||. HVP counts are operator products (a batched "
        "product of k tangents counts k). `setup HVPs` are spent once per Hessian (BiSSL reuses one "
        "Hessian for the 8 upper steps of an alternation).",
        "",
    ]
    for title, doc, text in sections:
        summary = doc.strip().split("\n\n")[0].replace("\n", " ")
        lines += [f"## {title}", "", summary, "", text, ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
