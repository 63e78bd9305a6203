"""Lost upper steps of the BiSSL stage on digits: what each remedy keeps, how well, at what cost.

``python -m benchmarks.bissl_skips [--seeds 1 2 3] [--out benchmarks/results/bissl-skips.json]``

With the ``digits`` preset as it was (15-epoch backbone, 32-pair Hessian batch, 5 CG iterations) some solves
meet non-positive curvature of the damped system ``(I + H/(lam+delta)) x = v``; CG freezes its
iterate there and the stage skips that upper step. This script runs the stage (one shared pretext
checkpoint and linear warm-up, run seed 0; stage seeds as given) and measures, on the systems the
stage meets:

* ``paired``: today's stage (``cg``, ``on_bad_solve: skip``) drives the trajectory; at every upper
  step the *same* ``v`` is also solved by each alternative: ``cg-truncate`` (the iterate CG froze
  before the non-positive direction, Steihaug's rule), ``minres`` (5 iterations), ``cg-delta30``
  (more damping, the same H), ``cg-hessian128`` (a 128-pair Hessian batch, drawn at the same
  theta_P). Each solve is compared with a long MINRES solve of its own system (the truth; for
  ``cg-delta30`` also with the truth of the delta = 10 system, which is the bias of damping).
  A solve is "kept" when the stage would use it (:func:`bissl.stages.bilevel.solve_decision`).
  Time per alternation of an alternative = the measured stage time with the measured solve times
  of today's CG replaced by the alternative's (truth solves are not counted).
* ``trajectory``: the stage run as configured by each listed alternative (no truths): the upper
  steps it skips along its own trajectory, and its seconds per alternation.

Run with a fixed thread count (``OMP_NUM_THREADS=1``): it sets the arithmetic, not only the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from bissl.config import RunConfig, load_config
from bissl.distributed import DistInfo
from bissl.rundir import RunDir
from bissl.stages import bilevel
from bissl.stages._common import Splits, load_splits, seed_everything
from bissl.stages.linear_warmup import run_linear_warmup
from bissl.stages.pretext import run_pretext

import hypergrad
from benchmarks._common import machine_summary, markdown_table, rel_err

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parents[1] / "runs" / "bissl-skips-cache"

# name -> --set overrides of the digits preset. "cg-skip" is the preset as it was when measured
# (a 32-pair Hessian batch); the preset has since taken the 128-pair batch these numbers chose.
BEFORE = ["bissl.hessian_batch_size=32"]
ALTERNATIVES: dict[str, list[str]] = {
    "cg-skip": BEFORE,
    "cg-truncate": [*BEFORE, "bissl.on_bad_solve=truncate"],
    "minres": [*BEFORE, "bissl.solver=minres"],
    "cg-delta30": [*BEFORE, "bissl.delta=30"],
    "cg-hessian128": ["bissl.hessian_batch_size=128"],
}
TRUTH = hypergrad.MINRES(maxiter=200, tol=1e-5, check_every=2)


def log(msg: str) -> None:
    print(f"[bissl_skips {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare(cfg: RunConfig, info: DistInfo) -> tuple[RunDir, Splits]:
    """The shared pretext checkpoint and linear warm-up (made once, reused from ``CACHE``)."""
    run = RunDir.create(CACHE, cfg)
    splits = load_splits(cfg, info)
    run_pretext(cfg, run, info, splits, resume=True)
    run_linear_warmup(cfg, run, info, splits, resume=True)
    return run, splits


def fresh_state(cfg: RunConfig, run: RunDir, splits: Splits, info: DistInfo, seed: int) -> bilevel.BiSSLState:
    """The stage's starting state, as :func:`bilevel.run_bissl` builds it for ``seed``."""
    seed_everything(seed, deterministic=cfg.deterministic)
    return bilevel.load_initial_state(cfg, run, splits.spec, info)


@dataclass
class Alternative:
    """One alternative's system for the current alternation and its solver."""

    cfg: RunConfig
    operator: hypergrad.LinearOperator
    solver: hypergrad.Solver
    base_operator: hypergrad.LinearOperator | None = None  # the delta = 10 system (damping's bias)


@dataclass
class Recorder:
    """Stands in for the stage's solver: solves with it, then measures every alternative."""

    solver: hypergrad.Solver
    alternatives: dict[str, Alternative]
    records: list[dict[str, Any]]
    alternation: int
    extra_s: float = 0.0  # time spent on alternatives and truths (not part of the stage)
    step: int = 0
    truths: dict[int, hypergrad.Tree] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.solver, name)

    def solve(self, operator: hypergrad.LinearOperator, v: hypergrad.Tree,
              x0: hypergrad.Tree | None = None) -> hypergrad.Solution:
        t0 = time.perf_counter()
        used = self.solver.solve(operator, v, x0)
        used_s = time.perf_counter() - t0
        t_extra = time.perf_counter()
        truths: dict[int, hypergrad.Tree] = {}

        def truth(op: hypergrad.LinearOperator) -> tuple[hypergrad.Tree, hypergrad.SolveStats]:
            if id(op) not in truths:
                sol = TRUTH.solve(op, v)
                truths[id(op)] = (sol.value, sol.stats)
            return truths[id(op)]

        for name, alt in self.alternatives.items():
            if name == "cg-skip" or name == "cg-truncate":
                sol, solve_s = used, used_s
            else:
                t0 = time.perf_counter()
                sol = alt.solver.solve(alt.operator, v)
                solve_s = time.perf_counter() - t0
            x_true, true_stats = truth(alt.operator)
            result = sol.result
            rec = {"alternative": name, "alternation": self.alternation, "step": self.step,
                   "result": result.name, "kept": bilevel.solve_decision(result, alt.solver, alt.cfg.bissl) == "use",
                   "iterations": sol.stats.iterations, "solve_s": solve_s,
                   "rel_residual": float(sol.stats.relative_residual),
                   "min_curvature": float(sol.stats.min_curvature) if sol.stats.min_curvature is not None else None,
                   "rel_err": rel_err(sol.value, x_true),
                   "truth_rel_residual": float(true_stats.relative_residual),
                   "truth_iterations": true_stats.iterations,
                   "truth_min_curvature": float(true_stats.min_curvature)}
            if alt.base_operator is not None:
                rec["rel_err_vs_delta10"] = rel_err(sol.value, truth(alt.base_operator)[0])
            self.records.append(rec)
        self.step += 1
        self.extra_s += time.perf_counter() - t_extra
        return used


@contextmanager
def recording(cfg: RunConfig, streams_128: bilevel.Streams, records: list[dict[str, Any]],
              alternation: int, recorders: list[Recorder]) -> Iterator[None]:
    """Patch the stage's ``build_system`` so that its system carries a :class:`Recorder`."""
    original = bilevel.build_system

    def build(state: bilevel.BiSSLState, hessian_loss: Any, batch: Any, b: Any, info: DistInfo,
              *, generator: torch.Generator | None = None) -> bilevel.LinearSystem:
        system = original(state, hessian_loss, batch, b, info, generator=generator)
        alternatives = {}
        for name, overrides in ALTERNATIVES.items():
            alt_cfg = load_config("digits", overrides)
            ab = alt_cfg.bissl
            if name == "cg-hessian128":
                big = bilevel.hessian_batch(streams_128, alternation, alt_cfg)
                operator = original(state, hessian_loss, big, ab, info).operator
                alternatives[name] = Alternative(alt_cfg, operator, bilevel.make_solver(ab))
            elif name == "cg-delta30":
                hessian = system.operator.base  # the same H (and graph), more damping
                operator = hypergrad.DampedOperator.bissl_system(hessian, ab.lam, ab.delta)
                alternatives[name] = Alternative(alt_cfg, operator, bilevel.make_solver(ab), system.operator)
            else:
                alternatives[name] = Alternative(alt_cfg, system.operator, bilevel.make_solver(ab))
        recorder = Recorder(system.solver, alternatives, records, alternation)
        recorders.append(recorder)
        return bilevel.LinearSystem(system.operator, recorder, system.setup_hvp)  # type: ignore[arg-type]

    with mock.patch.object(bilevel, "build_system", build):
        yield


def paired(run: RunDir, splits: Splits, info: DistInfo, seed: int) -> dict[str, Any]:
    """Today's stage on ``seed``, every alternative solved on the same systems."""
    cfg = load_config("digits", ALTERNATIVES["cg-skip"])
    b = cfg.bissl
    state = fresh_state(cfg, run, splits, info, seed)
    losses = bilevel.stage_losses(cfg, state.lower)
    streams = bilevel.Streams.for_seed(cfg, splits, info, seed)
    streams_128 = bilevel.Streams.for_seed(load_config("digits", ALTERNATIVES["cg-hessian128"]), splits, info, seed)
    records: list[dict[str, Any]] = []
    alternations = []
    for a in range(b.alternations):
        recorders: list[Recorder] = []
        generator = torch.Generator().manual_seed(bilevel.stream_seed(seed, 3 + a))
        with recording(cfg, streams_128, records, a, recorders):
            _, upper, timing = bilevel.alternation(
                state, losses, streams.lower.batches(a * b.lower_steps, b.lower_steps, cfg),
                bilevel.hessian_batch(streams, a, cfg),
                streams.upper.batches(a * b.upper_steps, b.upper_steps, cfg), b, info, generator=generator)
        stage_s = timing["lower_s"] + timing["upper_s"] - recorders[0].extra_s
        alternations.append({"alternation": a, "stage_s": stage_s, "lower_s": timing["lower_s"],
                             "skipped": sum(r["skipped"] for r in upper)})
        log(f"seed {seed} alternation {a}: stage {stage_s:.2f} s, skipped {alternations[-1]['skipped']:.0f}, "
            f"measurement {recorders[0].extra_s:.1f} s")
    return {"seed": seed, "solves": records, "alternations": alternations}


def trajectory(run: RunDir, splits: Splits, info: DistInfo, seed: int, name: str) -> dict[str, Any]:
    """The stage as configured by alternative ``name``, on its own trajectory."""
    cfg = load_config("digits", ALTERNATIVES[name])
    b = cfg.bissl
    state = fresh_state(cfg, run, splits, info, seed)
    losses = bilevel.stage_losses(cfg, state.lower)
    streams = bilevel.Streams.for_seed(cfg, splits, info, seed)
    times, skipped, truncated = [], 0, 0
    for a in range(b.alternations):
        generator = torch.Generator().manual_seed(bilevel.stream_seed(seed, 3 + a))
        _, upper, timing = bilevel.alternation(
            state, losses, streams.lower.batches(a * b.lower_steps, b.lower_steps, cfg),
            bilevel.hessian_batch(streams, a, cfg),
            streams.upper.batches(a * b.upper_steps, b.upper_steps, cfg), b, info, generator=generator)
        times.append(timing["lower_s"] + timing["upper_s"])
        skipped += int(sum(r["skipped"] for r in upper))
        truncated += int(sum(r.get("truncated", 0.0) for r in upper))
    steps = b.alternations * b.upper_steps
    log(f"trajectory {name} seed {seed}: skipped {skipped}/{steps}, truncated {truncated}, "
        f"{statistics.median(times):.2f} s/alternation")
    return {"alternative": name, "seed": seed, "upper_steps": steps, "skipped": skipped, "truncated": truncated,
            "seconds_per_alternation": statistics.median(times)}


def summarise(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per alternative over all seeds (see the module docstring)."""
    rows = []
    solves = [r for seed in result["paired"] for r in seed["solves"]]
    base_kept = {(r["seed"], r["alternation"], r["step"]) for r in solves
                 if r["alternative"] == "cg-skip" and r["kept"]}
    seed_stage = {s["seed"]: statistics.median(a["stage_s"] for a in s["alternations"]) for s in result["paired"]}
    for name in ALTERNATIVES:
        mine = [r for r in solves if r["alternative"] == name]
        kept = [r for r in mine if r["kept"]]
        on_base = [r["rel_err"] for r in kept if (r["seed"], r["alternation"], r["step"]) in base_kept]
        extra = [r["rel_err"] for r in kept if (r["seed"], r["alternation"], r["step"]) not in base_kept]
        # time per alternation: the stage's, with CG's solve time replaced by this alternative's
        per_alt = []
        for seed in result["paired"]:
            s = seed["seed"]
            for a in seed["alternations"]:
                base = sum(r["solve_s"] for r in solves if r["seed"] == s and r["alternation"] == a["alternation"]
                           and r["alternative"] == "cg-skip")
                alt = sum(r["solve_s"] for r in mine if r["seed"] == s and r["alternation"] == a["alternation"])
                per_alt.append(a["stage_s"] - base + alt)
        traj = [t for t in result.get("trajectory", []) if t["alternative"] == name]
        rows.append({
            "alternative": name,
            "kept": f"{len(kept)}/{len(mine)}",
            "kept_fraction": len(kept) / max(len(mine), 1),
            "kept_per_seed": "/".join(str(sum(r["kept"] for r in mine if r["seed"] == s)) for s in seed_stage),
            "median_err_kept": statistics.median(r["rel_err"] for r in kept) if kept else float("nan"),
            "max_err_kept": max(r["rel_err"] for r in kept) if kept else float("nan"),
            "median_err_on_cg_kept": statistics.median(on_base) if on_base else float("nan"),
            "max_err_on_cg_kept": max(on_base) if on_base else float("nan"),
            "median_err_extra": statistics.median(extra) if extra else float("nan"),
            "max_err_extra": max(extra) if extra else float("nan"),
            "median_err_vs_delta10": statistics.median(r["rel_err_vs_delta10"] for r in mine)
            if mine and "rel_err_vs_delta10" in mine[0] else float("nan"),
            "s_per_alternation": statistics.median(per_alt) if per_alt else float("nan"),
            "trajectory_skipped": "/".join(str(t["skipped"]) for t in traj) if traj else "",
            "trajectory_s_per_alternation": statistics.median(t["seconds_per_alternation"] for t in traj)
            if traj else float("nan"),
        })
    return rows


COLUMNS = ["alternative", "kept", "kept_per_seed", "median_err_kept", "max_err_kept", "median_err_on_cg_kept",
           "max_err_on_cg_kept", "median_err_extra", "max_err_extra", "median_err_vs_delta10",
           "s_per_alternation", "trajectory_skipped", "trajectory_s_per_alternation"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bissl_skips", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="stage seeds (bissl run's first three)")
    parser.add_argument("--sections", nargs="+", default=["paired", "trajectory"], choices=["paired", "trajectory"])
    parser.add_argument("--trajectory", nargs="*", default=["cg-skip", "cg-hessian128"],
                        choices=list(ALTERNATIVES), help="alternatives run on their own trajectory")
    parser.add_argument("--merge-from", type=Path, help="take the trajectory section from this JSON (a run "
                        "with --sections trajectory, e.g. in another process) and only re-summarise")
    parser.add_argument("--out", type=Path, default=RESULTS / "bissl-skips.json",
                        help="JSON path; an existing file keeps the sections not measured now")
    args = parser.parse_args(argv)
    if args.merge_from is not None:
        result = json.loads(args.out.read_text())
        other = json.loads(args.merge_from.read_text())
        result["trajectory"] = other["trajectory"]
        result["wall_s"] = {**result.get("wall_s", {}), **other.get("wall_s", {})}
        result["alternatives"] = ALTERNATIVES
        result["summary"] = summarise(result)
        args.out.write_text(json.dumps(result, indent=1))
        print(markdown_table(result["summary"], COLUMNS))
        return
    if os.environ.get("OMP_NUM_THREADS") != "1":
        log("warning: OMP_NUM_THREADS is not 1; the numbers depend on the thread count")
    start = time.perf_counter()
    cfg, info = load_config("digits", ALTERNATIVES["cg-skip"]), DistInfo()
    run, splits = prepare(cfg, info)
    result: dict[str, Any] = {"wall_s": {}, "benchmark": "bissl_skips", "preset": "digits", "alternatives": ALTERNATIVES,
                              "truth": {"solver": "MINRES", "maxiter": TRUTH.maxiter, "tol": TRUTH.tol},
                              "seeds": args.seeds, "machine": machine_summary(),
                              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "paired": [], "trajectory": []}
    if args.out.exists():  # keep what is not measured now
        old = json.loads(args.out.read_text())
        result["paired"], result["trajectory"] = old.get("paired", []), old.get("trajectory", [])
        result["wall_s"] = old.get("wall_s", {})
    if "paired" in args.sections:
        result["paired"] = []
        for seed in args.seeds:
            entry = paired(run, splits, info, seed)
            for r in entry["solves"]:
                r["seed"] = seed
            result["paired"].append(entry)
    if "trajectory" in args.sections:
        result["trajectory"] = [t for t in result["trajectory"] if t["alternative"] not in args.trajectory]
        for name in args.trajectory:
            for seed in args.seeds:
                result["trajectory"].append(trajectory(run, splits, info, seed, name))
    result["summary"] = summarise(result)
    result["wall_s"] = {**result.get("wall_s", {}), "+".join(args.sections): time.perf_counter() - start}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, args.out)
    print(markdown_table(result["summary"], COLUMNS))
    log(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
