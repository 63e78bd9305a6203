"""``docs/benchmarks.md`` and its plots, rebuilt from the raw JSON of the runs (nothing re-measured)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from .._common import markdown_table

TARGET_SPEEDUP = 3.0
TARGET_OVERHEAD = 0.05
# "Equal error" is strict: a contender qualifies at a budget only if its median error is at most
# the reference's. The one exception is the reference's own method in its own precision on a
# reused graph, which differs from it only by float32 rounding in the last digits: 1 % there.
SAME_METHOD_AS_REFERENCE = frozenset({"layerwise-reuse"})
SAME_METHOD_RTOL = 0.01
MODE_TITLES = {
    "full": "Full mode: ResNet-18",
    "quick": "Quick mode: narrow ResNet",
    "smoke": "Smoke mode: tiny CNN, float64",
}
# Result files in the order the page shows them (file stem after "alternation-").
RESULT_FILES = ("full", "quick-levers", "quick")
FILE_TITLES = {"quick-levers": "Quick mode, the solve levers: narrow ResNet"}


def _title(result: dict[str, Any]) -> str:
    title = FILE_TITLES.get(result.get("_file", ""), MODE_TITLES.get(result["mode"], result["mode"]))
    return f"{title} (run of {result['started'][:10]})"


def _allowance(name: str) -> float:
    return SAME_METHOD_RTOL if name in SAME_METHOD_AS_REFERENCE else 0.0


def machine_line(m: dict[str, str]) -> str:
    """The machine a result file was measured on, with the CPU flags that decide bf16 speed."""
    flags = (f"CPU flags {m['cpu_flags']} (bf16 instructions: {m['bf16_instructions']})" if "cpu_flags" in m
             else "CPU flags not recorded (run before they were)")
    return (f"{m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, {flags}"
            + (f", GPU {m['gpu']}" if "gpu" in m else ", no GPU"))


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-2:
        return f"{x:.2e}"
    return f"{x:.{digits}g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    return markdown_table([dict(zip(header, r, strict=True)) for r in rows], header)


# ---------------------------------------------------------------------------------------------
# Aggregation over seeds


def pooled(result: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per contender and budget: seconds (median over seeds), errors pooled over RHS x seeds."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for seed in result["seeds"]:
        cs = seed.get("contenders", {})
        ref = max(cs["reference"]["points"], key=lambda p: p["iterations"])["seconds"] if "reference" in cs else None
        for name, c in cs.items():
            for p in c["points"]:
                slot = out.setdefault(name, {}).setdefault(p["iterations"], {
                    "label": c["label"], "iterations": p["iterations"], "seconds": [], "errors": [], "products": [],
                    "ratios": []})
                slot["seconds"].append(p["seconds"])
                if ref is not None and p["seconds"] > 0:
                    slot["ratios"].append(ref / p["seconds"])
                slot["errors"] += p["errors"]
                slot["products"].append(p["products"])
    table: dict[str, list[dict[str, Any]]] = {}
    for name, by_k in out.items():
        rows = []
        for k in sorted(by_k):
            s = by_k[k]
            err = np.array(s["errors"])
            rows.append({"label": s["label"], "iterations": k, "seconds": statistics.median(s["seconds"]),
                         "products": statistics.median(s["products"]), "median_error": float(np.median(err)),
                         "q25": float(np.quantile(err, 0.25)), "q75": float(np.quantile(err, 0.75)),
                         "n": len(err), "seeds": len(s["seconds"]),
                         "ratio": statistics.median(s["ratios"]) if s["ratios"] else None})
        table[name] = rows
    return table


def speedups(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per contender: reference time / contender time at an error no worse than the reference's.

    For each seed: the reference's median error (over right-hand sides) after its 5 iterations
    is the bar; the contender's fastest point whose median error is at or below it gives the
    ratio. Strict: no allowance, except 1 % for the reference's own method and precision
    (:data:`SAME_METHOD_AS_REFERENCE`). Reported: the median ratio over seeds, its range, the
    per-seed ratios and the point used.
    """
    per: dict[str, list[tuple[float, int]]] = {}
    for seed in result["seeds"]:
        cs = seed.get("contenders", {})
        if "reference" not in cs:
            continue
        ref = max(cs["reference"]["points"], key=lambda p: p["iterations"])
        for name, c in cs.items():
            ok = [p for p in c["points"] if p["median_error"] <= ref["median_error"] * (1 + _allowance(name))]
            if ok:
                best = min(ok, key=lambda p: p["seconds"])
                per.setdefault(name, []).append((ref["seconds"] / best["seconds"], best["iterations"]))
            else:
                per.setdefault(name, []).append((float("nan"), -1))
    out = {}
    for name, vals in per.items():
        ratios = [r for r, _ in vals]
        finite = [r for r in ratios if r == r]
        out[name] = {"median": statistics.median(finite) if len(finite) == len(ratios) else None,
                     "min": min(finite) if finite else None, "max": max(finite) if finite else None,
                     "iterations": sorted({k for _, k in vals if k >= 0}), "seeds": len(vals),
                     "reached": len(finite), "per_seed": ratios}
    return out


# ---------------------------------------------------------------------------------------------
# Plots


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pooled(result)
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    markers = "os^Dv<>pP*hX"
    for i, (name, rows) in enumerate(table.items()):
        t = [r["seconds"] for r in rows]
        m = [r["median_error"] for r in rows]
        style = {"color": "black", "linewidth": 2.2} if name == "reference" else {}
        ax.plot(t, m, marker=markers[i % len(markers)], label=rows[0]["label"], **style)
        ax.fill_between(t, [r["q25"] for r in rows], [r["q75"] for r in rows], alpha=0.15,
                        color=ax.lines[-1].get_color())
    if "reference" in table:
        ax.axhline(table["reference"][-1]["median_error"], color="black", linestyle="--", linewidth=0.8,
                   label="the bar: reference's error after its 5 iterations")
    ax.set_yscale("log")
    ax.set_xlabel("seconds per alternation (all right-hand sides' solves)")
    ax.set_ylabel("relative error vs the truth (median, 25-75% band)")
    seeds = len(result["seeds"])
    rhs = result["sizes"]["rhs"]
    ax.set_title(f"{_title(result)}: {rhs} right-hand sides x {seeds} seed(s), "
                 f"{result['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Markdown


def section(result: dict[str, Any], image: str) -> str:
    sizes, mode = result["sizes"], result["mode"]
    seeds = result["seeds"]
    lines = [f"## {_title(result)}", "", f"Machine: {machine_line(result['machine'])}.", ""]
    train = result["training"]
    lines.append(
        f"{result.get('num_params', 0):,} backbone parameters; Hessian batch {sizes['pairs']} SimCLR pairs of "
        f"{sizes['image']}x{sizes['image']} digits, BN in train mode, projector fixed; {sizes['rhs']} right-hand "
        f"sides per alternation (downstream batches of {sizes['downstream_batch']}); system "
        f"(I + H/{0.001 + sizes['delta']:g}) x = v; {sizes['dtype']}; seeds {[s['seed'] for s in seeds]} "
        f"(each seed draws its own Hessian batch and downstream batches); timed alternations per "
        f"contender: {result['rounds']} (median). Backbone: {int(train['pretrain_steps'])} SimCLR steps "
        f"(NT-Xent {train.get('loss_first10', float('nan')):.2f} -> {train.get('loss_last10', float('nan')):.2f}). "
        f"Run {result['started']} – {result['finished']}.")
    lines.append("")
    solves = [s for seed in seeds for s in seed["truth"]["solves"]]
    curv = [s["min_curvature"] for s in solves if s["min_curvature"] is not None]
    lines.append(
        f"**Truth**: CG to relative residual {seeds[0]['truth']['tol']:g} for each v: "
        f"{min(s['iterations'] for s in solves)}–{max(s['iterations'] for s in solves)} iterations; its residual "
        f"re-checked with the hand-written product: at most {_fmt(max(s['relative_residual'] for s in solves))}. "
        f"Smallest curvature d·Ad/d·d met by the truth solves: {_fmt(min(curv))} "
        f"({'positive: the damped operator behaved as positive definite' if min(curv) > 0 else 'NOT positive'}).")
    lines.append("")
    lines += [f"![error vs time, {mode}]({image})", ""]

    table = pooled(result)
    ups = speedups(result)
    rows = []
    for name, pts in table.items():
        for r in pts:
            rows.append([f"`{name}`", str(r["iterations"]), str(r["seeds"]), _fmt(r["products"]), _fmt(r["seconds"]),
                         _fmt(r["ratio"]),
                         _fmt(r["median_error"]), f"{_fmt(r['q25'])} – {_fmt(r['q75'])}"])
    all_seeds = len(seeds)
    partial = sorted(name for name, pts in table.items() if max(r["seeds"] for r in pts) < all_seeds)
    note = (f" Contenders measured on fewer seeds (to fit the session's time): {', '.join(f'`{n}`' for n in partial)}."
            if partial else "")
    lines += ["Every point: one alternation's solves (median time over the timed repetitions, median over "
              "seeds); errors pooled over right-hand sides and seeds; the ratio is taken per seed against that "
              f"seed's reference, then the median.{note}", "",
              _table(["contender", "iterations", "seeds", "products / alternation", "seconds / alternation",
                      "reference time / this", "median rel. error", "25–75 %"], rows), ""]

    rows = []
    for name, u in ups.items():
        if name == "reference":
            continue
        label = f"`{name}`" + (f" (within {SAME_METHOD_RTOL:.0%}: same method and precision)"
                               if name in SAME_METHOD_AS_REFERENCE else "")
        rows.append([label, _fmt(u["median"]) if u["median"] is not None else "not reached",
                     ", ".join(_fmt(r) if r == r else "–" for r in u["per_seed"]),
                     ", ".join(map(str, u["iterations"])) or "–", f"{u['reached']}/{u['seeds']}"])
    lines += ["**At equal or better error** (strict, per seed: the contender's fastest point whose median "
              "error is at most the reference's after its 5 iterations; ratio = reference time / that time):",
              "", _table(["contender", "speed-up (median over seeds)", "per seed", "iterations used",
                          "seeds where reached"], rows), ""]
    lines += _section2(seeds[0])
    lines += provenance(result)
    return "\n".join(lines)


def provenance(result: dict[str, Any]) -> list[str]:
    """Which process measured each seed's figures (several when a file was merged with --append)."""
    rows = []
    for seed in result["seeds"]:
        runs = seed.get("runs")
        if not runs:
            sections = [k for k in ("truth", "contenders", "overhead", "peers") if k in seed]
            rows.append([str(seed["seed"]), "not recorded: measured before runs were stamped; file written by "
                         f"`{' '.join(result['argv'][1:])}` ({result['started']} – {result['finished']})",
                         ", ".join(sections), "–"])
            continue
        present = {"alternation": "contenders", "overhead": "overhead", "peers": "peers"}
        for r in runs:
            contenders = r["contenders"] if isinstance(r["contenders"], str) else ", ".join(r["contenders"])
            # A run asks for sections; overhead and peers are measured on the mode's first seed only.
            measured = [name for name in r["sections"] if present[name] in seed]
            rows.append([str(seed["seed"]), f"pid {r['pid']} on {r['host']}, started {r['started']}: "
                         f"`{' '.join(r['argv'][1:])}`", ", ".join(measured), contenders])
    return ["**Provenance** (each row: one process; a seed's figures come from the processes listed for it):", "",
            _table(["seed", "process", "sections", "contenders"], rows), ""]


def _section2(seed: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if "overhead" in seed:
        o = seed["overhead"]
        rows = [[name, _fmt(sec * 1000)] for name, sec in o["seconds"].items()]
        lines += [f"**Overhead per Hessian product** ({_overhead_text(o)}; results agree to "
                  f"{_fmt(o['max_rel_difference'])}) vs hand-written `torch.autograd.grad`.", "",
                  _table(["product", "milliseconds (median)"], rows), ""]
    if "peers" in seed:
        p = seed["peers"]
        rows = [[name, str(r["iterations"]), _fmt(r["products_per_solve"]), _fmt(r["products_per_iteration"]),
                 _fmt(r["host_reads_per_solve"]), _fmt(r["cuda_syncs_per_solve"]), _fmt(r["median_error"])]
                for name, r in p["rows"].items()]
        lines += [f"**Peers and host synchronisations** (same reused-graph operator for everyone; torchopt: "
                  f"{p['torchopt']}). Host reads = tensor-to-Python conversions per solve, counted by wrapping "
                  f"`Tensor.item`/`tolist`/`__bool__`/`__float__`/…; each is a device synchronisation on a GPU.",
                  "", _table(["solver", "iterations", "products / solve", "products / iteration",
                              "host reads / solve", "CUDA syncs / solve", "median rel. error"], rows), ""]
    return lines


def targets(results: dict[str, dict[str, Any]]) -> str:
    """One paragraph per target and mode: met or not, with the measured number."""
    lines = ["## Targets", ""]
    for stem in RESULT_FILES:
        if stem in results:
            lines += _targets(results[stem])
    return "\n".join(lines) + "\n"


def _targets(main: dict[str, Any]) -> list[str]:
    lines = [f"### {_title(main)}", "", f"Measured on: {machine_line(main['machine'])}.", ""]
    every = speedups(main)
    ups = {k: v for k, v in every.items() if k != "reference" and v["median"] is not None}
    pts = pooled(main)
    if ups:
        best = max(ups, key=lambda k: ups[k]["median"])
        b = ups[best]
        met = b["median"] >= TARGET_SPEEDUP
        same = _same_budget_ratio(pts, "layerwise-reuse", 5)
        lines.append(
            f"- **≥ {TARGET_SPEEDUP:g}× faster than the reference at equal or better error**: "
            f"{'met' if met else 'not met'}. Best: `{best}` at {b['median']:.2f}× (median over "
            f"{b['seeds']} seed(s), per seed {', '.join(f'{r:.2f}' for r in b['per_seed'])}×, "
            f"{', '.join(map(str, b['iterations']))} "
            f"iteration(s) per solve)."
            + (f" Graph reuse alone (`layerwise-reuse`, the reference's 5 layerwise iterations): {_fmt(same)}×."
               if same is not None else ""))
        lines.append(_where_time_goes(main, pts, best, b))
    lines += lever_verdicts(every)
    o = main["seeds"][0].get("overhead")
    if o:
        lines.append(f"- **Library overhead per product ≤ {TARGET_OVERHEAD:.0%}**: {overhead_verdict(o)}: "
                     f"{_overhead_text(o)}.")
    p = main["seeds"][0].get("peers")
    if p:
        rows = p["rows"]
        ours = rows.get("hypergrad CG, 5 iterations")
        theirs = rows.get("torchopt.linalg.cg, maxiter 4")
        if ours and theirs:
            lines.append(
                f"- **Peers at equal product budget (5 products)**: hypergrad CG 5 iterations, median error "
                f"{_fmt(ours['median_error'])}, {ours['host_reads_per_solve']:.0f} host reads per solve; torchopt "
                f"0.7.3 CG (maxiter 4, it spends one product on the initial residual) "
                f"{_fmt(theirs['median_error'])}, {theirs['host_reads_per_solve']:.0f} host reads per solve "
                f"({theirs['products_per_iteration']:.2f} products per iteration).")
    if "cg-bf16" in pts and "cg" in pts:
        b16 = next(r for r in pts["cg-bf16"] if r["iterations"] == 5)
        f32 = next(r for r in pts["cg"] if r["iterations"] == 5)
        lines.append(f"- **bfloat16 products** (5 iterations): median error {_fmt(b16['median_error'])} vs "
                     f"{_fmt(f32['median_error'])} in float32; time per alternation {_fmt(b16['seconds'])} s vs "
                     f"{_fmt(f32['seconds'])} s.")
    if not main.get("gpu_measured"):
        lines.append("- **GPU**: not measured (no GPU was available; `--device cuda` times with CUDA events and "
                     "counts synchronisations with `torch.cuda.set_sync_debug_mode`).")
    return [*lines, ""]


BASELINES = frozenset({"reference", "cg", "identity"})


def lever_verdicts(ups: dict[str, dict[str, Any]]) -> list[str]:
    """Each other contender against plain ``cg``'s strict ratio (``ups``: :func:`speedups`)."""
    bar = ups.get("cg", {}).get("median")
    if bar is None:
        return []
    accepted, rejected = [], []
    for name, u in ups.items():
        if name in BASELINES:
            continue
        ratio = u["median"]
        if ratio is not None:
            text = f"`{name}` {ratio:.2f}×"
        elif u["reached"]:
            per_seed = ", ".join(f"{r:.2f}×" if r == r else "not reached" for r in u["per_seed"])
            text = f"`{name}` reaches the bar on {u['reached']} of {u['seeds']} seed(s) only ({per_seed})"
        else:
            text = f"`{name}` never reaches the bar"
        (accepted if ratio is not None and ratio > bar else rejected).append(text)
    return [f"- **Levers against plain `cg` ({bar:.2f}×, strict)**: accepted: {', '.join(accepted) or 'none'}; "
            f"rejected: {', '.join(rejected) or 'none'}."]


def _overhead_text(o: dict[str, Any]) -> str:
    if "pairs" not in o:  # files written before the overhead was measured in pairs
        return (f"median of {o['rounds']} interleaved rounds, spread not measured: reused graph "
                f"{o['overhead_reused']:+.1%}, rebuilt graph {o['overhead_rebuilt']:+.1%}")
    parts = []
    for strategy in ("reused", "rebuilt"):
        lo, hi = o[f"overhead_{strategy}_range"]
        parts.append(f"{strategy} graph {o[f'overhead_{strategy}']:+.1%} (range {lo:+.1%} to {hi:+.1%})")
    return f"median over {o['pairs']} interleaved pairs: " + ", ".join(parts)


def overhead_verdict(o: dict[str, Any]) -> str:
    """'met' only if every measured pair is within the target; 'not shown' if the spread crosses it."""
    if "pairs" not in o:
        return "not shown (no spread measured)" if o["overhead_reused"] <= TARGET_OVERHEAD else "not met"
    worst = max(o["overhead_reused_range"][1], o["overhead_rebuilt_range"][1])
    median = max(o["overhead_reused"], o["overhead_rebuilt"])
    if worst <= TARGET_OVERHEAD:
        return "met"
    return "not shown (the spread crosses the target)" if median <= TARGET_OVERHEAD else "not met"


def _same_budget_ratio(pts: dict[str, list[dict[str, Any]]], name: str, iterations: int) -> float | None:
    ref = next((r for r in pts.get("reference", []) if r["iterations"] == iterations), None)
    row = next((r for r in pts.get(name, []) if r["iterations"] == iterations), None)
    return ref["seconds"] / row["seconds"] if ref and row else None


def _per_product(rows: list[dict[str, Any]]) -> float | None:
    """Marginal seconds per product: the slope of time over products between the outer budgets."""
    if len(rows) < 2 or rows[-1]["products"] == rows[0]["products"]:
        return None
    return (rows[-1]["seconds"] - rows[0]["seconds"]) / (rows[-1]["products"] - rows[0]["products"])


def _where_time_goes(main: dict[str, Any], pts: dict[str, list[dict[str, Any]]], best: str,
                     b: dict[str, Any]) -> str:
    """Products x their marginal cost (from each contender's own curve) against its total time."""
    ref_rows, rows = pts["reference"], pts[best]
    t_ref, t_row = _per_product(ref_rows), _per_product(rows)
    if t_ref is None or t_row is None:
        return ""
    ref = ref_rows[-1]
    row = next(r for r in rows if r["iterations"] == max(b["iterations"]))
    bound = ref["products"] * t_ref / (row["products"] * t_row)
    return (f"- **Where the time goes**: from the slopes of the curves, one more product costs "
            f"{t_ref * 1000:.0f} ms in the reference (graph rebuilt) and {t_row * 1000:.0f} ms in `{best}` "
            f"({t_ref / t_row:.2f}× less). The reference's {ref['products']:.0f} products account for "
            f"≈ {ref['products'] * t_ref / ref['seconds']:.0%} of its {ref['seconds']:.3g} s per alternation; "
            f"`{best}`'s {row['products']:.0f} for ≈ {row['products'] * t_row / row['seconds']:.0%} of its "
            f"{row['seconds']:.3g} s (the rest: building the graph once, the recycled space, vector arithmetic). "
            f"Products dominate, so the speed-up is about (products saved) × (cheaper products) = "
            f"{ref['products']:.0f}/{row['products']:.0f} × {t_ref / t_row:.2f} ≈ {bound:.2f}×: reaching "
            f"{TARGET_SPEEDUP:g}× takes the reference's error in fewer iterations, or cheaper products. "
            + _what_would_reach(ref, row, t_row, best, main["sizes"]["rhs"]))


def _what_would_reach(ref: dict[str, Any], row: dict[str, Any], t_row: float, best: str, rhs: int) -> str:
    """From the measured costs: the product cost, or product count, at which the target is met."""
    budget = ref["seconds"] / TARGET_SPEEDUP
    other = max(row["seconds"] - row["products"] * t_row, 0.0)  # what is not products
    if budget <= other:
        return f"Even free products would not reach {TARGET_SPEEDUP:g}×: the rest of `{best}`'s time exceeds it."
    cost_fraction = (budget - other) / (row["products"] * t_row)
    products = (budget - other) / t_row / rhs
    return (f"At {TARGET_SPEEDUP:g}×, the reference's {ref['seconds']:.3g} s allow {budget:.3g} s: with "
            f"`{best}`'s {row['products'] / rhs:.0f} products per solve, one product may cost at most "
            f"{cost_fraction:.2f}× what it costs now (a lower precision, the reference staying in float32), or, at today's cost, "
            f"a solve may spend at most {products:.1f} products (a method that reaches the reference's error in "
            "that many).")


def write_report(results_dir: Path, docs: Path) -> Path:
    results = {}
    for stem in RESULT_FILES:
        path = results_dir / f"alternation-{stem}.json"
        if path.exists():
            results[stem] = {**json.loads(path.read_text()), "_file": stem}
    if not results:
        raise FileNotFoundError(f"no alternation-*.json in {results_dir}: run `python -m benchmarks.alternation run` first")
    first = next(iter(results.values()))
    v = first["versions"]
    parts = [
        "# Benchmarks: one BiSSL alternation's solves",
        "",
        "<!-- Generated by `python -m benchmarks.alternation report` from benchmarks/results/*.json; "
        "do not edit by hand. -->",
        "",
        "What BiSSL spends most of its time on: within one alternation the lower backbone and the Hessian "
        "batch are fixed, and each upper step solves (I + H/(λ+δ)) x = v_k for a new right-hand side. "
        "Contenders run the alternation's solves one after the other (no batching across right-hand "
        "sides: v_k depends on the previous upper step) and are compared with the **reference**, a "
        "hand-written loop in plain PyTorch that does what the BiSSL code does (graph rebuilt for every "
        "product, 5 layerwise-CG iterations from zero, exactly 5 products per solve, counted), and with "
        "the **truth** (a long CG solve of the same system). Errors are relative 2-norm errors against "
        "the truth. Within one seed of one section, every time comes from one process with the "
        "contenders interleaved; each section's provenance table says which process measured which seed. "
        "Ratios are compared only within one machine: each section names its CPU and whether it has "
        "bf16 instructions (bf16 products are fast on a Xeon with AMX and slow on one without, under the "
        "same model name).",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "Reproduce: `python -m benchmarks.alternation run --mode quick` (≤ 20 minutes on 2 cores), "
        "`python -m benchmarks.alternation run --mode full` (hours on a CPU; `--device cuda` on a GPU), then "
        "`python -m benchmarks.alternation report` rebuilds this page from the JSON files. "
        "The smoke mode (`--mode smoke`) runs in CI as `tests/bench/test_alternation_smoke.py`.",
        "",
        targets(results),
    ]
    docs_img = docs / "img" / "benchmarks"
    for stem, result in results.items():
        name = f"alternation-{stem}.png"
        plot(result, docs_img / name)
        parts += [section(result, f"img/benchmarks/{name}"), ""]
    out = docs / "benchmarks.md"
    out.write_text("\n".join(parts).rstrip() + "\n")
    return out
