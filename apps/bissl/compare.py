r"""``bissl run``: BiSSL against the conventional pipeline, honest by construction.

Every arm starts from one shared pretext checkpoint (``RUN/checkpoints/pretext-final.pt``):

=================  ====================================================================
conventional       ``alternations x lower_steps`` more SimCLR steps (same images as BiSSL's
                   lower steps), then fine-tuning
conventional+      conventional, then ``alternations x upper_steps`` supervised SGD steps
bissl              linear warm-up -> BiSSL stage -> fine-tuning from the handed-over backbone
bissl-identity     the same with the identity solver (x = v): what the IHVP adds
scratch            fine-tuning from random initialisation
=================  ====================================================================

Step counts come from the ``bissl:`` section only. Per arm, the fine-tuning search runs once,
on the first seed's backbone, on the validation split (trial seed ``cfg.seed``, every arm the
same budget, one Optuna study per arm under ``RUN/arms/<arm>/``). Each reported seed
:math:`S_i = \text{seed} + 1 + \text{search.seed\_offset} + i` (never a trial's seed) reruns everything after the shared
pretext checkpoint with :math:`S_i` — the arm's extra training, then fine-tuning at the arm's
chosen (lr, wd) — so arms pair by seed. The test split is read once per seed run, at the end.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bissl.checkpoint import load_checkpoint
from bissl.config import RunConfig
from bissl.distributed import DistInfo, broadcast_object, on_main
from bissl.rundir import RunDir
from bissl.stages._common import Splits, StepHook, load_splits, warmup_parts
from bissl.stages.bilevel import run_bissl
from bissl.stages.continued import run_continued_pretext, run_supervised_steps
from bissl.stages.finetune import FinetuneInit, run_finetune, test_metrics
from bissl.stages.linear_warmup import run_linear_warmup
from bissl.stages.pretext import run_pretext
from bissl.stages.search import search_hyperparameters, seed_run_name, seed_run_seeds

BASELINE = "conventional"


def arm_config(cfg: RunConfig, arm: str) -> RunConfig:
    """The arm's config: bissl-identity swaps the solver for the identity (x = v)."""
    if arm != "bissl-identity":
        return cfg
    b = cfg.bissl.model_copy(update={"solver": "identity", "warm_start": False})
    return cfg.model_copy(update={"bissl": b})


@dataclass(frozen=True)
class ArmStage:
    """An arm's backbone for one seed and what producing it spent."""

    init: FinetuneInit
    pretext_images: int = 0
    supervised_steps: int = 0
    num_hvp: int = 0
    seconds: float = 0.0


def arm_stage(cfg: RunConfig, run: RunDir, info: DistInfo, splits: Splits, arm: str, seed: int, *,
              step_hook: StepHook | None = None) -> ArmStage:
    """Run (or resume, or reload) arm ``arm``'s training after the pretext checkpoint, for ``seed``.

    Checkpoints and logs of these stages live in the shared run dir, named ``<what>-s<seed>``,
    so the conventional and conventional+ arms share one continued pretext run per seed.
    """
    if arm == "scratch":
        return ArmStage(FinetuneInit(backbone=None))
    if arm in ("bissl", "bissl-identity"):
        res = run_bissl(arm_config(cfg, arm), run, info, splits, seed=seed, name=f"{arm}-s{seed}", resume=True,
                        step_hook=step_hook)
        final = load_checkpoint(run.checkpoint(f"{arm}-s{seed}-final"))
        return ArmStage(FinetuneInit(final["backbone"]), res.pretext_images, res.upper_steps, res.num_hvp,
                        res.seconds_per_alternation * res.alternations)
    pretext = load_checkpoint(run.checkpoint("pretext-final"))
    cont = run_continued_pretext(cfg, run, info, splits, seed=seed, name=f"continued-s{seed}",
                                 pretext=pretext, resume=True, step_hook=step_hook)
    backbone = load_checkpoint(run.checkpoint(f"continued-s{seed}-final"))["backbone"]
    if arm == "conventional":
        return ArmStage(FinetuneInit(backbone), cont.pretext_images, 0, 0, cont.seconds)
    head = warmup_parts(run)[1] if cfg.warmup.epochs > 0 else None
    sup = run_supervised_steps(cfg, run, info, splits, seed=seed, name=f"supervised-s{seed}",
                               backbone=backbone, head=head, resume=True, step_hook=step_hook)
    backbone = load_checkpoint(run.checkpoint(f"supervised-s{seed}-final"))["backbone"]
    return ArmStage(FinetuneInit(backbone), cont.pretext_images, sup.supervised_steps, 0,
                    cont.seconds + sup.seconds)


def paired_difference(values: Sequence[float], baseline: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean of ``values - baseline`` (paired by position) and its two-sided paired-t interval.

    With fewer than two pairs the interval is undefined (NaN).
    """
    from scipy import stats

    diffs = [a - b for a, b in zip(values, baseline, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": len(diffs)}
    half = float(stats.t.ppf(0.5 + level / 2, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(diffs)}


def _append(run: RunDir, record: dict[str, Any]) -> None:
    """Append one finished piece of work to ``RUN/results/runs.jsonl`` (main process only)."""
    if run.writer:
        path = run.path / "results" / "runs.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_runs(run_dir: Path) -> dict[str, Any]:
    """Arms as recorded in ``runs.jsonl``: ``{arm: {"search": ..., "seeds": {seed: {...}}}}``.

    Later records of the same (arm, seed, kind) replace earlier ones; "test" records add the
    test metrics to the seed's fine-tuning record.
    """
    arms: dict[str, Any] = {}
    path = run_dir / "results" / "runs.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    for rec in map(json.loads, filter(None, lines)):
        arm = arms.setdefault(rec["arm"], {"search": None, "seeds": {}})
        if rec["kind"] == "search":
            arm["search"] = rec["best"]
        elif rec["kind"] == "seed":
            arm["seeds"].setdefault(str(rec["seed"]), {}).update(rec["result"])
        elif rec["kind"] == "test":
            arm["seeds"].setdefault(str(rec["seed"]), {})["test"] = rec["metrics"]
    return arms


def projected_seconds(cfg: RunConfig, splits: Splits, info: DistInfo) -> dict[str, float]:
    """A rough projection of ``bissl run``'s wall time on this machine, from timed single steps.

    Times one lower step, one HVP and one upper step on random tensors (:func:`dry_run` at the
    Hessian batch size, scaled linearly to each batch size) plus loading one pretext and one
    downstream batch through the real augmentation; evaluation passes are left out.
    """
    import torch

    from bissl.stages.bilevel import Streams, dry_run

    b, f, p = cfg.bissl, cfg.finetune, cfg.pretext
    with torch.random.fork_rng(devices=[]):
        dry = dry_run(cfg, splits.spec, batch=b.hessian_batch, generator=torch.Generator().manual_seed(0))
        streams = Streams.for_seed(cfg, splits, info, cfg.seed)
        t0 = time.perf_counter()
        next(streams.lower.batches(0, 1, cfg))
        load_pair = (time.perf_counter() - t0) / b.lower_batch_size
        t0 = time.perf_counter()
        next(streams.upper.batches(0, 1, cfg))
        load_image = (time.perf_counter() - t0) / b.upper_batch_size
    per_pair = dry["lower_step_s"] / b.hessian_batch + load_pair
    hvps = dry["hvp_per_solve"] * dry["hvp_s"]
    per_image = max(dry["upper_step_s"] - hvps, 0.0) / (2 * b.hessian_batch) + load_image
    ft_epoch = len(splits.train) // f.batch_size * f.batch_size * per_image  # type: ignore[arg-type]
    lower = b.total_lower_steps * b.lower_batch_size * per_pair
    upper_grads = b.total_upper_steps * b.upper_batch_size * 2 * per_image
    solves = b.total_upper_steps * hvps
    stage = {"conventional": lower, "conventional+": lower + upper_grads / 2, "scratch": 0.0,
             "bissl": lower + upper_grads + solves, "bissl-identity": lower + upper_grads}
    finetune = (cfg.search.trials * cfg.trial_epochs + cfg.search.seeds * f.epochs) * ft_epoch
    seeds = cfg.search.seeds
    shared_stage = {"conventional+": stage["conventional"]} if "conventional" in cfg.arms else {}
    arms = {a: seeds * (stage[a] - shared_stage.get(a, 0.0)) + finetune for a in cfg.arms}
    pretext = p.epochs * (len(splits.pretext) // p.batch_size) * p.batch_size * per_pair  # type: ignore[arg-type]
    return {"pretext": pretext, **arms, "total": pretext + sum(arms.values())}


def _recorded(run: RunDir, info: DistInfo) -> dict[str, Any]:
    """``runs.jsonl`` as rank 0 wrote it, on every rank (no rank reads a half-written file)."""
    return broadcast_object(info, read_runs(run.path) if info.is_main else None)


def run_comparison(cfg: RunConfig, run: RunDir, info: DistInfo, *, resume: bool = False,
                   step_hook: StepHook | None = None) -> dict[str, Any]:
    """Pretext -> warm-up -> every arm (search on the first seed, then each seed) -> test -> table.

    Each finished piece (a search, a seed run, a test evaluation) is appended to
    ``RUN/results/runs.jsonl``, the source of the table (``bissl report RUN`` rebuilds it), so an
    interrupted comparison still reports what finished and ``--resume`` continues where it
    stopped; finished stages are reloaded, not rerun. ``RUN/results/comparison.json`` holds the
    summary: per arm mean ± std and paired differences to the conventional arm.
    """
    start = time.perf_counter()
    splits = load_splits(cfg, info)
    seeds = seed_run_seeds(cfg)
    b = cfg.bissl
    if info.is_main:
        print(f"[run] arms {', '.join(cfg.arms)}; seeds {seeds}; BiSSL stage {b.alternations} alternations x "
              f"({b.lower_steps} lower + {b.upper_steps} upper steps), solver {b.solver} "
              f"({b.solver_iterations} iterations); search {cfg.search.trials} trials per arm", flush=True)
        if not info.distributed:  # the timed steps would enter collectives on one rank only
            projection = projected_seconds(cfg, splits, info)
            print("[run] projected wall time on this machine (timed single steps, evaluation left out): "
                  + ", ".join(f"{k} {v / 60:.1f} min" for k, v in projection.items()), flush=True)
    run_pretext(cfg, run, info, splits, resume=resume, step_hook=step_hook)
    run_linear_warmup(cfg, run, info, splits, resume=True, step_hook=step_hook)

    for arm in cfg.arms:
        acfg = arm_config(cfg, arm)
        arm_run = RunDir.create(run.path / "arms" / arm, acfg, writer=info.is_main)
        recorded = _recorded(run, info).get(arm, {"search": None, "seeds": {}})
        best = None
        for i, seed in enumerate(seeds):
            if str(seed) in recorded["seeds"] and recorded["search"] is not None:
                continue
            if info.is_main:
                print(f"[run] arm {arm}, seed {seed}", flush=True)
            stage = arm_stage(cfg, run, info, splits, arm, seed, step_hook=step_hook)
            t0 = time.perf_counter()
            if best is None:  # the search runs once, on the first seed's backbone
                best = search_hyperparameters(acfg, arm_run, info, splits, init=stage.init if i == 0 else
                                              arm_stage(cfg, run, info, splits, arm, seeds[0]).init,
                                              resume=True, step_hook=step_hook)
                if recorded["search"] is None:
                    _append(run, {"arm": arm, "kind": "search", "best": best.__dict__, "trial_seed": cfg.seed})
                    recorded["search"] = best.__dict__
            ft = run_finetune(acfg, arm_run, info, splits, lr=best.lr, weight_decay=best.weight_decay,
                              seed=seed, name=seed_run_name(cfg, i), resume=True, init=stage.init,
                              step_hook=step_hook)
            _append(run, {"arm": arm, "kind": "seed", "seed": seed, "result": {
                "val_top1": ft.best_val_top1, "pretext_images": stage.pretext_images,
                "supervised_steps": stage.supervised_steps, "num_hvp": stage.num_hvp,
                "stage_seconds": stage.seconds, "finetune_name": seed_run_name(cfg, i), "lr": best.lr,
                "weight_decay": best.weight_decay,
                # the arm's compute for this seed: its extra training (shared parts included,
                # measured when they ran) plus its search (first seed) and fine-tuning
                "seconds": stage.seconds + time.perf_counter() - t0}})

    # The test split, read once per seed run, at the end.
    arms = _recorded(run, info)
    for arm in cfg.arms:
        arm_run = RunDir(run.path / "arms" / arm, writer=info.is_main)
        for seed in seeds:
            rec = arms[arm]["seeds"][str(seed)]
            if "test" not in rec:
                metrics = on_main(info, lambda arm=arm, arm_run=arm_run, rec=rec: test_metrics(
                    arm_config(cfg, arm), arm_run, info, splits, rec["finetune_name"]))
                _append(run, {"arm": arm, "kind": "test", "seed": seed, "metrics": metrics})
                run.log(f"test/{arm}", seed, **metrics)
    results = summarise(cfg, _recorded(run, info))
    results["wall_s"] = time.perf_counter() - start
    if info.is_main:
        print("\n" + publish(cfg, run, results), flush=True)
    return results


def publish(cfg: RunConfig, run: RunDir, results: dict[str, Any]) -> str:
    """Add the decisions, write ``comparison.json``, ``table.txt`` and the plots; return the table."""
    from bissl.report import write_comparison_plots

    results["decisions"] = decide(results)
    run.write_result("comparison", results)
    table = comparison_table(cfg, results) + "\n" + decision_table(results["decisions"])
    (run.path / "results" / "table.txt").write_text(table + "\n")
    write_comparison_plots(run, results)
    return table


def summarise(cfg: RunConfig, recorded: dict[str, Any]) -> dict[str, Any]:
    """Mean ± std per arm and metric over the seed runs with a test result, and paired
    differences to the conventional arm (over the seeds both have)."""
    metrics = [f"top{k}" for k in cfg.eval.topk]
    arms = {a: recorded[a] for a in cfg.arms if a in recorded}
    for rec in arms.values():
        rec["seeds"] = {s: r for s, r in rec["seeds"].items() if "test" in r}
    arms = {a: r for a, r in arms.items() if r["seeds"]}
    seeds_all = sorted({int(s) for r in arms.values() for s in r["seeds"]})
    out: dict[str, Any] = {"arms": arms, "summary": {}, "seeds": seeds_all, "baseline": BASELINE}
    for arm, rec in arms.items():
        seeds = sorted(rec["seeds"], key=int)
        row: dict[str, Any] = {"n": len(seeds), "wall_s": sum(rec["seeds"][s]["seconds"] for s in seeds),
                               "num_hvp": sum(rec["seeds"][s]["num_hvp"] for s in seeds),
                               "search": rec["search"]}
        for m in metrics:
            vals = [rec["seeds"][s]["test"][m] for s in seeds]
            row[m] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
            if BASELINE in arms and arm != BASELINE:
                both = [s for s in seeds if s in arms[BASELINE]["seeds"]]
                if both:
                    row[f"{m}_vs_{BASELINE}"] = paired_difference(
                        [rec["seeds"][s]["test"][m] for s in both],
                        [arms[BASELINE]["seeds"][s]["test"][m] for s in both])
        out["summary"][arm] = row
    return out


def comparison_table(cfg: RunConfig, results: dict[str, Any]) -> str:
    """Plain-text table: per arm top-1/top-5 mean ± std, paired Δ top-1 vs conventional, time, HVPs."""
    metrics = [f"top{k}" for k in cfg.eval.topk]
    head = ["arm", *[f"test {m} (%)" for m in metrics], f"Δ top1 vs {BASELINE} [95% paired-t]",
            "wall (s)", "HVPs"]
    rows = []
    for arm, row in results["summary"].items():
        diff = row.get(f"top1_vs_{BASELINE}")
        if diff is None:
            d = "—"
        elif math.isnan(diff["low"]):
            d = f"{diff['mean']:+.2f} (n=1)"
        else:
            d = f"{diff['mean']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}]"
        rows.append([arm, *[f"{row[m]['mean']:.2f} ± {row[m]['std']:.2f}" for m in metrics], d,
                     f"{row['wall_s']:.0f}", str(row["num_hvp"])])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    n = len(results["seeds"])
    lines = [f"BiSSL vs conventional: {cfg.name} ({cfg.data.dataset}), {n} paired seed{'s' * (n > 1)} "
             f"{results['seeds']}, test split read once per seed run",
             "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append("wall (s): the arm's extra training (shared parts included), search and fine-tuning, "
                 "summed over its seed runs")
    if "wall_s" in results:
        lines.append(f"wall time of this invocation: {results['wall_s']:.1f} s")
    return "\n".join(lines)


def report(run_dir: Path) -> str:
    """Rebuild ``comparison.json``, ``table.txt`` and the plots of a run from its ``runs.jsonl``."""
    import yaml

    from bissl.config import validate_config

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found. Fix: pass the run directory of a `bissl run`")
    cfg = validate_config(yaml.safe_load(cfg_path.read_text()))
    results = summarise(cfg, read_runs(run_dir))
    if not results["arms"]:
        raise FileNotFoundError(f"{run_dir / 'results' / 'runs.jsonl'} holds no evaluated seed run yet")
    return publish(cfg, RunDir(run_dir), results)


def contrast(results: dict[str, Any], a: str, b: str, metric: str = "top1") -> dict[str, float]:
    """Paired difference ``a - b`` over the seeds both arms have: mean, 95 % paired-t interval and
    the two-sided paired-t p-value."""
    from scipy import stats

    seeds = [s for s in results["arms"][a]["seeds"] if s in results["arms"][b]["seeds"]]
    va = [results["arms"][a]["seeds"][s]["test"][metric] for s in seeds]
    vb = [results["arms"][b]["seeds"][s]["test"][metric] for s in seeds]
    out = paired_difference(va, vb)
    diffs = [x - y for x, y in zip(va, vb, strict=True)]
    if len(seeds) < 2:
        out["p"] = math.nan
    elif statistics.pstdev(diffs) == 0:  # identical differences: t is 0 or infinite
        out["p"] = 1.0 if out["mean"] == 0 else 0.0
    else:
        out["p"] = float(stats.ttest_rel(va, vb).pvalue)
    return out


def decide(results: dict[str, Any], *, margin: float = 0.5, alpha: float = 0.05) -> dict[str, Any]:
    """The pre-registered decision rule of ``docs/results.md``.

    Primary (BiSSL - conventional, test top-1): "helps" if the 95 % paired-t interval lies above
    0, "hurts" if below, "equivalent" if inside ±``margin`` points, else "inconclusive".
    Secondary (BiSSL - conventional+, BiSSL - bissl-identity, conventional - scratch): Holm-
    corrected paired-t tests at family-wise ``alpha``; BiSSL - identity also as an equivalence
    question (interval inside ±``margin``). Contrasts whose arms are missing are left out.
    """
    def verdict(c: dict[str, float]) -> str:
        if c["low"] > 0:
            return "helps"
        if c["high"] < 0:
            return "hurts"
        if -margin < c["low"] and c["high"] < margin:
            return "equivalent"
        return "inconclusive"

    arms = results["arms"]
    out: dict[str, Any] = {"margin": margin, "alpha": alpha}
    if {"bissl", "conventional"} <= set(arms):
        primary = contrast(results, "bissl", "conventional")
        out["primary"] = {"contrast": "bissl - conventional", **primary, "decision": verdict(primary)}
    pairs = [("bissl", "conventional+"), ("bissl", "bissl-identity"), ("conventional", "scratch")]
    secondary = [{"contrast": f"{a} - {b}", **contrast(results, a, b)} for a, b in pairs if {a, b} <= set(arms)]
    # An undefined p-value (one seed, or zero variance) sorts last and is never significant.
    order = sorted(range(len(secondary)), key=lambda i: (math.isnan(secondary[i]["p"]), secondary[i]["p"]))
    running, stopped = 0.0, False
    for rank, i in enumerate(order):  # Holm step-down
        c = secondary[i]
        running = max(running, min(1.0, (len(secondary) - rank) * c["p"]))
        c["p_holm"] = running
        stopped = stopped or not c["p"] <= alpha / (len(secondary) - rank)
        c["significant"] = not stopped
    for c in secondary:
        if c["contrast"] == "bissl - bissl-identity":
            c["equivalent"] = bool(-margin < c["low"] and c["high"] < margin)
    out["secondary"] = secondary
    return out


def decision_table(decisions: dict[str, Any]) -> str:
    """The decisions as plain text."""
    lines = []
    if "primary" in decisions:
        p = decisions["primary"]
        lines.append(f"primary  {p['contrast']}: {p['mean']:+.2f} points, 95% paired-t [{p['low']:+.2f}, "
                     f"{p['high']:+.2f}] (p = {p['p']:.3f}) -> {p['decision'].upper()} "
                     f"(margin ±{decisions['margin']})")
    for c in decisions["secondary"]:
        extra = f"; equivalent within ±{decisions['margin']}: {'yes' if c['equivalent'] else 'no'}" \
            if "equivalent" in c else ""
        lines.append(f"secondary {c['contrast']}: {c['mean']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}], "
                     f"p = {c['p']:.3f}, Holm p = {c['p_holm']:.3f}, "
                     f"{'significant' if c['significant'] else 'not significant'} at family-wise "
                     f"{decisions['alpha']}{extra}")
    return "\n".join(lines)
