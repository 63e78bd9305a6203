"""Run directory: resolved config, provenance, JSONL metrics, checkpoints and PNG plots.

Layout::

    RUN/config.yaml        resolved configuration (reload with ``bissl ... --run-dir RUN``)
    RUN/meta.json          git commit, library versions, command line, host, start and end time
    RUN/metrics.jsonl      one JSON object per line: {"stage", "step", "time", <metrics>}
    RUN/checkpoints/       <stage>.pt (in progress) and <stage>-final.pt (stage done)
    RUN/results/           small JSON results (search trials, seeds, evaluation)
    RUN/plots/             <stage>.png curves
    RUN/search.db          Optuna SQLite storage
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bissl.config import RunConfig, config_to_yaml

_LIBRARIES = ("torch", "torchvision", "numpy", "pydantic", "optuna", "scikit-learn", "tqdm",
              "matplotlib", "pyyaml")


def git_commit() -> dict[str, Any]:
    """Commit hash and dirty flag of the repository holding this package (or why unknown)."""
    repo = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                             timeout=10, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError) as exc:
        return {"commit": None, "dirty": None, "note": f"git unavailable: {exc}"}
    return {"commit": commit or None, "dirty": dirty,
            "note": "" if commit else "no commit found (not a git checkout or no commits yet)"}


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries a run depends on."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass(frozen=True)
class RunDir:
    """A run directory. Only the main process (``writer=True``) writes files."""

    path: Path
    writer: bool = True

    @classmethod
    def create(cls, path: str | Path, cfg: RunConfig, *, writer: bool = True) -> RunDir:
        """Create (or reopen) ``path`` and write config.yaml and meta.json."""
        run = cls(Path(path), writer)
        if writer:
            for sub in ("checkpoints", "results", "plots"):
                (run.path / sub).mkdir(parents=True, exist_ok=True)
            (run.path / "config.yaml").write_text(config_to_yaml(cfg))
            meta_path = run.path / "meta.json"
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"sessions": []}
            meta.update(git=git_commit(), libraries=library_versions())
            meta["sessions"].append({"argv": sys.argv, "host": platform.node(),
                                     "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
            meta_path.write_text(json.dumps(meta, indent=2))
        return run

    def end_session(self, status: str) -> None:
        """Record the end time and ``status`` ("ok" or the error's type) of the latest session
        in ``meta.json`` (main process only)."""
        meta_path = self.path / "meta.json"
        if not self.writer or not meta_path.is_file():
            return
        meta = json.loads(meta_path.read_text())
        if meta.get("sessions"):
            meta["sessions"][-1].update(ended=time.strftime("%Y-%m-%dT%H:%M:%S"), status=status)
            meta_path.write_text(json.dumps(meta, indent=2))

    def checkpoint(self, name: str) -> Path:
        """Path of checkpoint ``name`` (e.g. "pretext", "pretext-final")."""
        return self.path / "checkpoints" / f"{name}.pt"

    def result(self, name: str) -> Path:
        """Path of JSON result ``name``."""
        return self.path / "results" / f"{name}.json"

    def write_result(self, name: str, data: dict[str, Any]) -> None:
        """Write a small JSON result (main process only)."""
        if self.writer:
            path = self.result(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2))
            tmp.replace(path)

    def read_result(self, name: str) -> dict[str, Any] | None:
        """Read a JSON result, or None if absent."""
        path = self.result(name)
        return json.loads(path.read_text()) if path.is_file() else None

    def log(self, stage: str, step: int, **metrics: float) -> None:
        """Append one metrics record to metrics.jsonl (main process only)."""
        if not self.writer:
            return
        record = {"stage": stage, "step": int(step), "time": round(time.time(), 3)}
        record.update({k: float(v) for k, v in metrics.items()})
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """All metric records in order."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def drop_metrics_after(self, stage: str, step: int) -> None:
        """Remove records of ``stage`` with step > ``step`` (logged after the last checkpoint)."""
        if not self.writer:
            return
        keep = [r for r in self.read_metrics() if r["stage"] != stage or r["step"] <= step]
        path = self.path / "metrics.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        tmp.replace(path)

    def write_plots(self) -> list[Path]:
        """One PNG per stage with a panel per metric (matplotlib Agg); returns the paths.

        Search trials are summarised by the "search" stage (lr, wd, val accuracy per trial).
        """
        if not self.writer:
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
        for rec in self.read_metrics():
            if rec["stage"].startswith("trial-"):  # one panel per trial would flood plots/;
                continue  # the "search" stage plots every trial's result
            for key, value in rec.items():
                if key not in ("stage", "step", "time", "epoch"):
                    series[rec["stage"]][key].append((rec["step"], value))
        paths = []
        for stage, metrics in series.items():
            fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3), squeeze=False)
            for ax, (key, points) in zip(axes[0], sorted(metrics.items()), strict=True):
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
                ax.set_title(key)
                ax.set_xlabel("step")
                ax.grid(alpha=0.3)
            fig.suptitle(stage)
            fig.tight_layout()
            path = self.path / "plots" / f"{stage.replace('/', '_')}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=90)
            plt.close(fig)
            paths.append(path)
        return paths
