"""Fine-tuning search: Optuna random search over (lr, wd), then several seeds at the best.

Trials live in ``RUN/search.db`` (SQLite), so a killed search resumes: finished trials are kept,
a trial that was running is marked failed and re-queued with the same parameters (its own
checkpoint lets it continue where it stopped). Trial ``k`` draws its parameters from a
``RandomSampler`` seeded from ``(search.sampler_seed, k)``, so a resumed search proposes the same
parameters as an uninterrupted one. lr and wd are log-uniform in ``search.lr_range`` and
``search.wd_range``; the objective is the best validation top-1 accuracy over the trial's epochs.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from bissl.config import RunConfig
from bissl.distributed import DistInfo, broadcast_object
from bissl.rundir import RunDir
from bissl.stages._common import Splits, StepHook
from bissl.stages.finetune import FinetuneInit, TrainResult, run_finetune

STUDY = "finetune-search"


@dataclass(frozen=True)
class SearchResult:
    """Best (lr, wd) of the search and the per-seed results at it."""

    lr: float
    weight_decay: float
    best_trial_val_top1: float
    trials: int
    seed_runs: list[TrainResult]

    def seed_names(self) -> list[str]:
        """Stage names of the seed runs (their checkpoints hold the best-val weights)."""
        return [r.name for r in self.seed_runs]


def _open_study(run: RunDir, cfg: RunConfig, completed: int) -> optuna.Study:
    """The run's study; its RandomSampler is seeded from (sampler seed, completed trials)."""
    base = cfg.seed if cfg.search.sampler_seed is None else cfg.search.sampler_seed
    # SeedSequence decorrelates consecutive trials (first draws of MT19937 with seeds k, k+1
    # are close to each other)
    seed = int(np.random.SeedSequence([base, completed]).generate_state(1)[0])
    return optuna.create_study(
        study_name=STUDY, storage=f"sqlite:///{run.path / 'search.db'}", direction="maximize",
        load_if_exists=True, sampler=optuna.samplers.RandomSampler(seed=seed))


def _requeue_interrupted(study: optuna.Study) -> None:
    """Mark trials left RUNNING by a killed process as failed and queue their parameters again."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params)
        print(f"[search] trial {trial.number} was interrupted; re-queued {trial.params}", flush=True)


def _ask(run: RunDir, cfg: RunConfig) -> tuple[int, float, float] | None:
    """Next trial (number, lr, wd) or None when enough trials are complete (rank 0 only)."""
    study = _open_study(run, cfg, 0)
    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if completed >= cfg.search.trials:
        return None
    study = _open_study(run, cfg, completed)
    trial = study.ask({"lr": FloatDistribution(*cfg.search.lr_range, log=True),
                       "weight_decay": FloatDistribution(*cfg.search.wd_range, log=True)})
    return trial.number, trial.params["lr"], trial.params["weight_decay"]


def _trial_name(lr: float, wd: float) -> str:
    return f"trial-lr{lr:.4e}-wd{wd:.4e}"


def seed_run_seeds(cfg: RunConfig) -> list[int]:
    """Seeds of the ``search.seeds`` runs at the best setting: never the trials' seed (``cfg.seed``).

    ``seed + 1 + search.seed_offset + i``: the offset shifts only these seeds (pretext, splits and
    trials keep ``cfg.seed``), e.g. seed 0, offset 5, 16 seeds -> runs 6..21.
    """
    first = cfg.seed + 1 + cfg.search.seed_offset
    return [first + i for i in range(cfg.search.seeds)]


def seed_run_name(cfg: RunConfig, i: int) -> str:
    """Stage name of the ``i``-th seed run (``seed<k>``, k counted from the first seed run without
    offset), so runs with different offsets in one run dir never share checkpoints."""
    return f"seed{cfg.search.seed_offset + i}"


@dataclass(frozen=True)
class Best:
    """The search's best (lr, wd), its validation top-1 and the number of finished trials."""

    lr: float
    weight_decay: float
    val_top1: float
    trials: int


def search_hyperparameters(cfg: RunConfig, run: RunDir, info: DistInfo, splits: Splits, *,
                           init: FinetuneInit | None = None, resume: bool = False,
                           step_hook: StepHook | None = None) -> Best:
    """Random search over fine-tuning (lr, wd) on the validation split, trials seeded ``cfg.seed``.

    Args:
        init: where every trial starts (default: the run's pretext backbone).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if info.is_main:
        if not resume and (run.path / "search.db").exists():
            from bissl.config import ConfigError

            raise ConfigError(f"{run.path} already has a search (search.db). "
                              "Fix: pass --resume to continue it, or use a new --run-dir")
        _requeue_interrupted(_open_study(run, cfg, 0))

    # Trials, one at a time (all ranks train; rank 0 talks to the SQLite storage).
    while True:
        ask = broadcast_object(info, _ask(run, cfg) if info.is_main else None)
        if ask is None:
            break
        number, lr, wd = ask
        if info.is_main:
            print(f"[search] trial {number}: lr={lr:.3e} wd={wd:.3e}", flush=True)
        result = run_finetune(cfg, run, info, splits, lr=lr, weight_decay=wd, seed=cfg.seed,
                              name=_trial_name(lr, wd), epochs=cfg.trial_epochs, resume=True,
                              keep_final=False, init=init, step_hook=step_hook)
        if info.is_main:
            _open_study(run, cfg, 0).tell(number, result.best_val_top1)
            run.log("search", number, lr=lr, weight_decay=wd, val_top1=result.best_val_top1)

    best: dict[str, Any] = {}
    if info.is_main:
        study = _open_study(run, cfg, 0)
        trial = study.best_trial
        best = {"lr": trial.params["lr"], "weight_decay": trial.params["weight_decay"],
                "val_top1": trial.value,
                "trials": len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))}
        print(f"[search] best of {best['trials']} trials: lr={best['lr']:.3e} "
              f"wd={best['weight_decay']:.3e} (val top-1 {best['val_top1']:.2f}%)", flush=True)
    return Best(**broadcast_object(info, best))


def run_search(cfg: RunConfig, run: RunDir, info: DistInfo, splits: Splits, *,
               resume: bool = False, step_hook: StepHook | None = None) -> SearchResult:
    """Random search over fine-tuning (lr, wd), then ``search.seeds`` runs at the best setting.

    The seed runs use :func:`seed_run_seeds`, none of which a trial used.

    Returns:
        Best parameters, the best trial's val accuracy and the seed runs' results.
    """
    best = search_hyperparameters(cfg, run, info, splits, resume=resume, step_hook=step_hook)
    seed_runs = [run_finetune(cfg, run, info, splits, lr=best.lr, weight_decay=best.weight_decay,
                              seed=seed, name=seed_run_name(cfg, i), resume=True,
                              step_hook=step_hook)
                 for i, seed in enumerate(seed_run_seeds(cfg))]
    vals = [r.best_val_top1 for r in seed_runs]
    run.write_result("search", {
        "best": best.__dict__, "seed_val_top1": vals,
        "seed_val_top1_mean": statistics.fmean(vals),
        "seed_val_top1_std": statistics.stdev(vals) if len(vals) > 1 else 0.0})
    return SearchResult(best.lr, best.weight_decay, best.val_top1, best.trials, seed_runs)
