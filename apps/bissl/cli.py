"""``bissl`` command line: pretrain, finetune, search, evaluate, run, validate.

Examples::

    bissl run                                   # BiSSL vs conventional on digits, <10 min on 2 CPU cores
    bissl run --arms conventional,bissl,scratch --seeds 5
    bissl run --run-dir runs/a --resume --seeds 8 --seed-offset 5   # seed runs 6..13 on runs/a
    bissl run -c fashion-mnist --data-root DATA
    bissl pretrain -c digits --set pretext.epochs=5 --run-dir runs/a
    bissl pretrain --run-dir runs/a --resume    # continue a killed run (config read from runs/a)
    bissl bilevel --run-dir runs/a              # BiSSL stage on runs/a's pretext checkpoint
    bissl search --run-dir runs/a               # fine-tuning search + seeds on runs/a's backbone
    bissl validate -c stl10-paper               # check config + dry run on random tensors
    bissl report runs/a                         # table and plots again from runs/a/results/runs.jsonl
    torchrun --nproc-per-node 2 -m bissl.cli pretrain -c digits --run-dir runs/ddp
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from bissl.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    available_presets,
    load_config,
    validate_config,
)

_COMMANDS = {
    "pretrain": "SimCLR pretext training (logs kNN accuracy and a linear probe every few epochs)",
    "bilevel": "the BiSSL stage (alternating pretext and downstream steps with implicit gradients) "
               "on a run dir holding a pretext checkpoint; runs the linear warm-up first if missing",
    "finetune": "linear warm-up, then one fine-tuning run at finetune.lr / finetune.weight_decay",
    "search": "Optuna random search over fine-tuning (lr, wd), then search.seeds runs at the best",
    "evaluate": "test accuracy of the fine-tuned models in a run directory (mean ± std)",
    "run": "BiSSL vs the conventional pipeline: shared pretext checkpoint -> every arm (extra "
           "training, search on the first seed, paired seed runs) -> test once -> table and plots",
    "conventional": "the conventional pipeline alone: pretrain -> warm-up -> search -> seeds -> evaluate",
    "validate": "validate the config, then build the models and run one forward/backward step "
                "on random tensors of the preset's image shape (no data, no training)",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (sub-commands share the config/run-dir options)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="PRESET_OR_YAML", default=None,
                        help=f"preset name ({', '.join(available_presets())}) or YAML file; default "
                             "digits, or the run dir's config.yaml when it exists")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set pretext.epochs=5 (repeatable; "
                             "values parsed as YAML)")
    common.add_argument("--run-dir", type=Path, default=None,
                        help="run directory (default runs/<name>-<timestamp>)")
    common.add_argument("--resume", action="store_true",
                        help="continue from the run dir's checkpoints (finished stages are skipped)")
    common.add_argument("--data-root", default=None, help="dataset root folder (sets data.root)")
    parser = argparse.ArgumentParser(
        prog="bissl", description=__doc__.split("\n")[0],
        epilog="Examples:\n" + __doc__.split("Examples::\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    rep = sub.add_parser("report", help="rebuild the comparison table, JSON and plots of `bissl run` "
                         "directories from their results/runs.jsonl",
                         description="rebuild the comparison table, JSON and plots from results/runs.jsonl")
    rep.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    for name, text in _COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        if name == "validate":
            p.add_argument("--batch", type=int, default=4, help="shrunk batch size of the dry run")
        if name == "run":
            p.add_argument("--arms", default=None, metavar="A,B,...",
                           help="arms to compare (sets `arms`): conventional, conventional+, bissl, "
                                "bissl-identity, scratch")
            p.add_argument("--seeds", type=int, default=None, metavar="N",
                           help="paired seed runs per arm (sets search.seeds)")
            p.add_argument("--seed-offset", type=int, default=None, metavar="K",
                           help="run the seed runs seed+1+K ... instead of seed+1 ... (sets "
                                "search.seed_offset; pretext, splits and trial seed unchanged)")
    return parser


_EXTENSIBLE = ("arms:", "search.seeds:", "search.seed_offset:")
"""Fields `bissl run --resume` may change: which arms and which seeds to run, not how."""


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: saved {a!r}, requested {b!r}")
    return diffs


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Config from --config/--set/--data-root, checked against the run dir's saved config."""
    saved = args.run_dir / "config.yaml" if args.run_dir is not None else None
    if saved is not None and saved.is_file():
        saved_raw = yaml.safe_load(saved.read_text())
        if args.config is None and not args.overrides and args.data_root is None:
            return validate_config(saved_raw)
        raw = yaml.safe_load(yaml.safe_dump(saved_raw)) if args.config is None else None
        cfg = _from_args(args, raw)
        diffs = [d for d in _config_diff(saved_raw, cfg.model_dump(mode="json"))
                 if not (args.command == "run" and d.startswith(_EXTENSIBLE))]
        if diffs:
            raise ConfigError(
                f"--run-dir {args.run_dir} already holds a run with a different config:\n  "
                + "\n  ".join(diffs)
                + "\nFix: drop --config/--set to reuse the saved config, or use a new --run-dir")
        return cfg
    return _from_args(args, None)


def _from_args(args: argparse.Namespace, raw: dict | None) -> RunConfig:
    if raw is None:
        cfg = load_config(args.config or "digits", args.overrides)
    else:
        cfg = validate_config(apply_overrides(raw, args.overrides))
    if args.data_root is not None:
        data = cfg.data.model_copy(update={"root": str(args.data_root)})
        cfg = cfg.model_copy(update={"data": data})
    return cfg


def _run_overrides(args: argparse.Namespace) -> list[str]:
    """``--arms`` / ``--seeds`` of ``bissl run`` as ``--set`` overrides."""
    extra = []
    if getattr(args, "arms", None):
        extra.append(f"arms=[{','.join(a.strip() for a in args.arms.split(','))}]")
    if getattr(args, "seeds", None) is not None:
        extra.append(f"search.seeds={args.seeds}")
    if getattr(args, "seed_offset", None) is not None:
        extra.append(f"search.seed_offset={args.seed_offset}")
    return extra


def _run_command(args: argparse.Namespace, cfg: RunConfig) -> None:
    from bissl import pipeline
    from bissl.data import DatasetNotFoundError
    from bissl.distributed import broadcast_object, init_distributed, shutdown
    from bissl.rundir import RunDir

    if args.command == "validate":
        pipeline.validate(cfg, batch=args.batch)
        return
    info = init_distributed(cfg.device)
    try:
        if args.run_dir is None:
            stamp = broadcast_object(info, time.strftime("%Y%m%d-%H%M%S"))
            args.run_dir = Path("runs") / f"{cfg.name}-{stamp}"
        if args.command not in ("run", "conventional", "pretrain") and not args.run_dir.exists():
            raise ConfigError(f"--run-dir {args.run_dir} does not exist; `bissl {args.command}` "
                              "works on a run made by `bissl pretrain` (or `bissl run`). "
                              "Fix: pass the run dir of an earlier pretrain")
        fresh = not args.run_dir.exists()
        run = RunDir.create(args.run_dir, cfg, writer=info.is_main)
        if info.is_main:
            print(f"run dir: {run.path}", flush=True)
        stage = {"pretrain": pipeline.pretrain, "bilevel": pipeline.bilevel,
                 "finetune": pipeline.finetune_once,
                 "search": pipeline.search, "evaluate": pipeline.evaluate,
                 "run": pipeline.run, "conventional": pipeline.run_conventional}[args.command]
        try:
            stage(cfg, run, info, resume=args.resume)
        except (ConfigError, DatasetNotFoundError):
            # Rejected before any work: leave no empty run directory behind.
            if fresh and info.is_main and not any((run.path / "checkpoints").iterdir()):
                shutil.rmtree(run.path, ignore_errors=True)
            else:
                run.end_session("rejected")
            raise
        except BaseException as exc:
            run.end_session(type(exc).__name__)
            raise
        run.end_session("ok")
    finally:
        shutdown(info)


def _report(run_dirs: Sequence[Path]) -> int:
    from bissl.compare import report

    try:
        for run_dir in run_dirs:
            print(report(run_dir), flush=True)
    except (FileNotFoundError, ConfigError) as exc:
        print(f"bissl: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bissl`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "report":
        return _report(args.run_dirs)
    args.overrides = [*args.overrides, *_run_overrides(args)]
    from bissl.data import DatasetNotFoundError

    try:
        cfg = resolve_config(args)
        _run_command(args, cfg)
    except ConfigError as exc:
        print(f"bissl: error: {exc}", file=sys.stderr)
        return 2
    except DatasetNotFoundError as exc:
        print(f"bissl: error: dataset missing: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"bissl: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
