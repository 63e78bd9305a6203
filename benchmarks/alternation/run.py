"""Run a mode: train (or load) the backbone, then for every seed the truth and all contenders.

Also the library's own overhead per product against hand-written autograd, torchopt at an equal
product budget, and host synchronisations per solve. Writes one JSON file (the report reads it).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

import hypergrad as hg

from .._common import machine_summary, rel_err
from .contenders import CONTENDERS, Clock, Contender, CountingOperator, Recorder
from .reference import CountingProduct, layerwise_cg
from .workload import Alternation, Sizes, alternation, pretrained_models


@dataclass(frozen=True)
class Mode:
    sizes: Sizes
    seeds: tuple[int, ...]
    iterations: int  # K: curve contenders run K iterations, the reference exactly 5
    budgets: tuple[int, ...]  # per-budget contenders (warm start, recycling)
    rounds: int  # timed repetitions of each contender's alternation (median)
    truth_tol: float
    overhead_pairs: int  # interleaved (ours, hand-written) pairs per graph strategy
    peer_rhs: int | None = None  # right-hand sides for the peer comparison (None: all)


MODES = {
    # The tiny CNN's SimCLR Hessian is strongly indefinite: the smoke mode damps with delta = 50
    # so that CG's convergence bounds apply (it checks correctness, not BiSSL's numbers).
    "smoke": Mode(Sizes("tiny", "float64", 16, 32, 3, 8, 300, 32, 4, delta=50.0), (0,), 5, (1, 2, 3), 1, 1e-13, 2),
    "quick": Mode(Sizes("narrow", "float32", 32, 16, 8, 32, 500, 64, 8), (0,), 5, (1, 2, 3), 3, 1e-6, 10),
    "full": Mode(Sizes("resnet18", "float32", 32, 32, 8, 32, 300, 64, 8), (0, 1, 2), 5, (2, 3), 2, 1e-6, 7,
                 peer_rhs=2),
}
REFERENCE_ITERATIONS = 5


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class IndefiniteSystemError(RuntimeError):
    """The benchmark's damped system showed non-positive curvature: CG comparisons are void."""


# ---------------------------------------------------------------------------------------------
# Truth


def truth(w: Alternation, tol: float, min_iterations: int = 20) -> tuple[list[dict[str, Tensor]], dict[str, Any]]:
    """Long CG solves of each system, re-checked with the hand-written product.

    First ``min_iterations`` iterations with no stopping rule (so the curvature d.Ad/d.d is
    seen along that many directions: the trained-backbone criterion), then on from there until
    the relative residual is at most ``tol``.
    """
    A = hg.DampedOperator(hg.HessianOperator(w.f, w.params), 1.0, 1.0 / w.c)
    first = hg.CG(maxiter=min_iterations, tol=0.0, on_breakdown="continue")
    rest = hg.CG(maxiter=300, tol=tol, on_breakdown="continue")
    check = CountingProduct(w.f, w.params, w.c)
    xs, info = [], []
    for v in w.rhs:
        s1 = first.solve(A, v)
        x, iterations, curvature = s1.value, s1.stats.iterations, s1.stats.min_curvature
        breakdown = bool(s1.stats.breakdown)
        if float(s1.stats.residual_norm) > tol * float(s1.stats.rhs_norm):
            s2 = rest.solve(A, v, x0=x)
            x, iterations = s2.value, iterations + s2.stats.iterations
            breakdown = breakdown or bool(s2.stats.breakdown)
            if s2.stats.min_curvature is not None:
                curvature = torch.minimum(curvature, s2.stats.min_curvature) if curvature is not None else s2.stats.min_curvature
        ax = check(x)
        resid = rel_err(ax, v)  # ||v - A x|| / ||v||
        xs.append(x)
        info.append({"iterations": iterations, "relative_residual": float(resid),
                     "min_curvature": float(curvature) if curvature is not None else None,
                     "breakdown": breakdown})
    return xs, {"tol": tol, "min_iterations": min_iterations, "solves": info}


# ---------------------------------------------------------------------------------------------
# Contenders, side by side


def run_contender(c: Contender, w: Alternation, clock: Clock, iterations: int, rank: int) -> tuple[Recorder, dict[str, Any]]:
    kwargs = {"rank": rank} if c.name == "nystrom-pcg" else {}
    return c.run(w, clock, iterations, **kwargs)


def contenders(w: Alternation, xs: list[dict[str, Tensor]], mode: Mode, clock: Clock,
               names: list[str] | None) -> dict[str, Any]:
    """Every contender's points (median time over rounds; errors per right-hand side)."""
    chosen = [c for c in CONTENDERS if names is None or c.name in names]
    jobs: list[tuple[Contender, int]] = []
    for c in chosen:
        if c.name == "reference":
            jobs.append((c, REFERENCE_ITERATIONS))
        elif c.per_budget:
            jobs += [(c, k) for k in mode.budgets]
        else:
            jobs.append((c, mode.iterations))
    times: dict[tuple[str, int], list[list[float]]] = {}
    points: dict[tuple[str, int], list[dict[str, Any]]] = {}
    extras: dict[str, Any] = {}
    for rnd in range(mode.rounds):
        for c, k in jobs if rnd % 2 == 0 else list(reversed(jobs)):
            rec, extra = run_contender(c, w, clock, k, mode.sizes.nystrom_rank)
            full = rec.curve()
            first = len(full) - 1 if c.per_budget else 0  # a per-budget run keeps only its last point
            curve = full[first:]
            times.setdefault((c.name, k), []).append([p["seconds"] for p in curve])
            if rnd == mode.rounds - 1 or (c.name, k) not in points:
                for depth, p in enumerate(curve, start=first):
                    p["errors"] = [rel_err(rec.iterates[i][depth], xs[i]) for i in range(len(xs))]
                points[(c.name, k)] = curve
                extras[c.name] = extra
            del rec  # its iterates: one tree per iteration and right-hand side
        log(f"  round {rnd + 1}/{mode.rounds} done")
    out: dict[str, Any] = {}
    for c in chosen:
        pts = []
        for (name, _k), curve in points.items():
            if name != c.name:
                continue
            per_round = times[(name, _k)]
            for j, p in enumerate(curve):
                p["seconds_rounds"] = [r[j] for r in per_round]
                p["seconds"] = statistics.median(p["seconds_rounds"])
                p["median_error"] = statistics.median(p["errors"])
                pts.append(p)
        pts.sort(key=lambda p: (p["iterations"], p["seconds"]))
        out[c.name] = {"label": c.label, "hypergrad": c.hypergrad, "per_budget": c.per_budget,
                       "points": pts, "extra": extras.get(c.name, {})}
    return out


# ---------------------------------------------------------------------------------------------
# Section 2: overhead per product, torchopt, host synchronisations


def hvp_overhead(w: Alternation, pairs: int, device: torch.device) -> dict[str, Any]:
    """hypergrad's Hessian products vs hand-written double backward with the same graph strategy.

    Measured as ``pairs`` interleaved pairs per graph strategy (ours then theirs, the order swapped
    every other pair, after one warm-up pair): each pair gives one ratio ours/theirs - 1, and the
    result is the median of those ratios with their range, so a claim like "at most 5 %" can be
    checked against the spread rather than one median.
    """
    gen = torch.Generator().manual_seed(7)
    u = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for k, t in w.params.items()}
    keys = list(w.params)
    p = {k: t.detach().requires_grad_(True) for k, t in w.params.items()}
    grads = torch.autograd.grad(w.f(p), list(p.values()), create_graph=True)
    H = hg.HessianOperator(w.f, w.params, reuse_graph=True)
    H.mv(u)  # builds the reused graph
    hand_rebuild = CountingProduct(w.f, w.params, w.c)

    def timed(fn: Callable[[], Any]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    strategies = {
        "reused": (("hypergrad HessianOperator, reused graph", lambda: H.mv(u)),
                   ("hand-written, reused graph",
                    lambda: torch.autograd.grad(grads, list(p.values()), [u[k] for k in keys], retain_graph=True))),
        "rebuilt": (("hypergrad hvp, graph rebuilt", lambda: hg.hvp(w.f, w.params, u)),
                    ("hand-written, graph rebuilt", lambda: hand_rebuild.hessian(u))),
    }
    seconds: dict[str, list[float]] = {}
    out: dict[str, Any] = {"pairs": pairs}
    for strategy, ((ours_name, ours), (theirs_name, theirs)) in strategies.items():
        timed(ours), timed(theirs)  # warm-up pair
        ratios = []
        for i in range(pairs):
            if i % 2 == 0:
                t_ours, t_theirs = timed(ours), timed(theirs)
            else:
                t_theirs, t_ours = timed(theirs), timed(ours)
            seconds.setdefault(ours_name, []).append(t_ours)
            seconds.setdefault(theirs_name, []).append(t_theirs)
            ratios.append(t_ours / t_theirs - 1)
        out[f"overhead_{strategy}"] = statistics.median(ratios)
        out[f"overhead_{strategy}_pairs"] = ratios
        out[f"overhead_{strategy}_range"] = [min(ratios), max(ratios)]
    out["seconds"] = {name: statistics.median(ts) for name, ts in seconds.items()}
    out["seconds_pairs"] = seconds
    ours_reuse = hg.HessianOperator(w.f, w.params).mv(u)
    theirs_value = dict(zip(keys, torch.autograd.grad(grads, list(p.values()), [u[k] for k in keys],
                                                      retain_graph=True), strict=True))
    out["max_rel_difference"] = rel_err(ours_reuse, theirs_value)
    return out


_CONVERSIONS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_host_reads() -> Iterator[list[int]]:
    """Counts tensor-to-Python conversions (each one is a host synchronisation on a GPU)."""
    counter = [0]
    saved = {name: getattr(torch.Tensor, name) for name in _CONVERSIONS}

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            counter[0] += 1
            return original(self, *args, **kwargs)
        return counted

    for name, fn in saved.items():
        setattr(torch.Tensor, name, wrap(fn))
    try:
        yield counter
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@contextlib.contextmanager
def count_cuda_syncs(device: torch.device) -> Iterator[list[int]]:
    """On a GPU, counts the synchronisations torch reports under ``set_sync_debug_mode('warn')``."""
    counter = [0]
    if device.type != "cuda":
        yield counter
        return
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counter
        finally:
            torch.cuda.set_sync_debug_mode("default")
    counter[0] = sum("synchroniz" in str(w.message) for w in caught)


def peers(w: Alternation, xs: list[dict[str, Tensor]], device: torch.device) -> dict[str, Any]:
    """torchopt's CG and hypergrad's on the same reused-graph operator: accuracy, products, syncs."""
    H = CountingOperator(hg.HessianOperator(w.f, w.params, reuse_graph=True))
    A = hg.DampedOperator(H, 1.0, 1.0 / w.c)
    rows: dict[str, Any] = {}
    hessian = H.base
    assert isinstance(hessian, hg.HessianOperator)
    hessian.gradient_graph()  # built before counting: every contender reuses it

    def measure(name: str, solve: Callable[[dict[str, Tensor]], dict[str, Tensor]], iterations: int) -> None:
        errors, products, reads, syncs = [], [], [], []
        for v, x in zip(w.rhs[: len(xs)], xs, strict=True):
            before = H.n
            with count_host_reads() as n_reads, count_cuda_syncs(device) as n_syncs:
                out = solve(v)
            products.append(H.n - before)
            reads.append(n_reads[0])
            syncs.append(n_syncs[0])
            errors.append(rel_err(out, x))
        rows[name] = {"iterations": iterations, "products_per_solve": statistics.median(products),
                      "products_per_iteration": statistics.median(products) / iterations,
                      "host_reads_per_solve": statistics.median(reads),
                      "cuda_syncs_per_solve": statistics.median(syncs) if device.type == "cuda" else None,
                      "median_error": statistics.median(errors), "errors": errors}

    for k in (4, 5):
        measure(f"hypergrad CG, {k} iterations", lambda v, k=k: hg.CG(maxiter=k, tol=0.0).solve(A, v).value, k)
    measure("hand-written layerwise CG loop (the reference's solver), 5 iterations",
            lambda v: layerwise_cg(A.mv, v, REFERENCE_ITERATIONS), REFERENCE_ITERATIONS)
    if importlib.util.find_spec("torchopt") is None:
        return {"torchopt": "not installed (pip install torchopt==0.7.3): its rows are skipped", "rows": rows}
    import torchopt

    for k in (4, 5):
        measure(f"torchopt.linalg.cg, maxiter {k}",
                lambda v, k=k: torchopt.linalg.cg(lambda d: A.mv(d), v, maxiter=k, rtol=0.0), k)
    return {"torchopt": importlib.metadata.version("torchopt"), "rows": rows}


# ---------------------------------------------------------------------------------------------
# The mode


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "hypergrad": hg.__version__}
    for name in ("torchvision", "torchopt", "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def run_mode(name: str, device: torch.device, seeds: tuple[int, ...] | None = None,
             names: list[str] | None = None, sections: tuple[str, ...] = ("alternation", "overhead", "peers"),
             rounds: int | None = None, budgets: tuple[int, ...] | None = None) -> dict[str, Any]:
    mode = MODES[name] if rounds is None else replace(MODES[name], rounds=rounds)
    mode = mode if budgets is None else replace(mode, budgets=budgets)
    seeds = mode.seeds if seeds is None else seeds
    clock = Clock(device)
    log(f"mode {name}: {mode.sizes.arch}, {mode.sizes.pairs} pairs, {mode.sizes.rhs} right-hand sides, "
        f"seeds {list(seeds)}, device {device}")
    backbone, projector, feat, train_info = pretrained_models(mode.sizes, device)
    log(f"backbone ready ({'cached' if train_info.get('cached') else 'trained'}): {train_info}")
    result: dict[str, Any] = {
        "mode": name, "device": str(device), "machine": machine_summary(), "versions": versions(),
        "argv": sys.argv, "sizes": asdict(mode.sizes), "iterations": mode.iterations,
        "budgets": list(mode.budgets), "rounds": mode.rounds, "training": train_info,
        "gpu_measured": device.type == "cuda", "seeds": [],
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    # Stamped on every seed, so a merged file (--append) still says which process measured what.
    provenance = {"started": result["started"], "argv": sys.argv, "pid": os.getpid(), "host": platform.node(),
                  "sections": list(sections), "contenders": names or "all", "rounds": mode.rounds,
                  "budgets": list(mode.budgets)}
    if device.type == "cuda":
        result["machine"]["gpu"] = torch.cuda.get_device_name(device)
    for seed in seeds:
        w = alternation(mode.sizes, backbone, projector, feat, seed, device)
        result["num_params"] = w.num_params
        entry: dict[str, Any] = {"seed": seed, "runs": [provenance]}
        first = seed == mode.seeds[0]
        if "alternation" in sections or "peers" in sections:
            log(f"seed {seed}: {w.num_params:,} parameters; truth solves")
            t0 = time.perf_counter()
            # The trained-backbone criterion (positive curvature over 20 CG iterations) is checked on
            # the mode's first seed; other seeds stop at the tolerance. Overhead and peers: first seed.
            xs, truth_info = truth(w, mode.truth_tol, 20 if first else 1)
            truth_info["seconds"] = time.perf_counter() - t0
            curvature = min(s["min_curvature"] for s in truth_info["solves"] if s["min_curvature"] is not None)
            log(f"  truth: iterations {[s['iterations'] for s in truth_info['solves']]}, residuals "
                f"{max(s['relative_residual'] for s in truth_info['solves']):.1e} max, min curvature {curvature:.3g}")
            entry["truth"] = truth_info
            if curvature <= 0:
                raise IndefiniteSystemError(
                    f"seed {seed}: the truth solves met curvature d.Ad/d.d = {curvature:.3g} <= 0, so the damped "
                    "system is not positive definite and CG's numbers would not mean what the report says. "
                    "Train the backbone longer (Sizes.pretrain_steps) or raise the damping (Sizes.delta).")
        if "alternation" in sections:
            entry["contenders"] = contenders(w, xs, mode, clock, names)
        if first and "overhead" in sections:
            log("  overhead per product")
            entry["overhead"] = hvp_overhead(w, mode.overhead_pairs, device)
        if first and "peers" in sections:
            log("  peers and host synchronisations")
            k = mode.peer_rhs or len(xs)
            entry["peers"] = peers(w, xs[:k], device)
        entry["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        result["seeds"].append(entry)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return result
