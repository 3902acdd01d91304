"""Run metrics as JSON lines and CSV in the run directory (written by rank 0)."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Sequence

from pipeline.train.tracking import Tracker


class MetricsLog:
    """metrics.jsonl and metrics.csv, and every row on to `trackers` (TensorBoard, MLflow: pipeline/train/tracking.py)."""

    def __init__(self, run_dir: Path, trackers: Sequence[Tracker] = ()):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.trackers = list(trackers)
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.columns: list[str] | None = None
        if self.csv.exists():
            with open(self.csv) as f:
                self.columns = next(csv.reader(f), None)

    def write(self, metrics: dict) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.columns is None:
            self.columns = list(metrics)
            with open(self.csv, "w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerow([metrics.get(c, "") for c in self.columns])
        for tracker in self.trackers:
            tracker.log_metrics(metrics)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def memory_mb() -> dict[str, float]:
    """Resident memory (MiB) of this process ("rss_mb") and of its child processes, the loader
    workers that hold the shuffle buffer ("loader_rss_mb"): logged so leaks show over epochs."""
    try:
        import psutil
    except ImportError:  # e.g. a bare GPU box: this process only, from /proc
        with open(f"/proc/{os.getpid()}/statm") as f:
            return {"rss_mb": int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, "loader_rss_mb": 0.0}
    process = psutil.Process()
    children = 0
    for child in process.children(recursive=True):
        try:
            children += child.memory_info().rss
        except psutil.Error:  # exited meanwhile
            pass
    return {"rss_mb": process.memory_info().rss / 2**20, "loader_rss_mb": children / 2**20}


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def resizes(metrics: list[dict]) -> list[tuple[int, int, int]]:
    """(step, world size before, after) wherever consecutive rows differ in world_size (an elastic
    run that shrank or grew; rows from before world_size was logged count as unknown)."""
    changes, before = [], None
    for row in metrics:
        size = row.get("world_size")
        if size is not None and before is not None and size != before:
            changes.append((row["step"], before, size))
        before = size if size is not None else before
    return changes


def plot_metrics(run_dir: str | Path) -> Path | None:
    """training_curves.png: one panel per logged metric (loss, accuracy, lr, throughput) against the
    step, with a dashed line and the new worker count at every resize of an elastic run."""
    metrics = read_metrics(run_dir)
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Every metric any row has (online_knn appears only on the rows it was computed for).
    names = [k for k in dict.fromkeys(k for m in metrics for k in m) if k not in ("step", "epoch", "time", "online_eval_s", "world_size", "worker_batch", "resumed_from")]
    changes = resizes(metrics)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [m for m in metrics if isinstance(m.get(name), (int, float))]
        ax.plot([m["step"] for m in rows], [m[name] for m in rows], marker="o" if len(rows) < 30 else None, markersize=3)
        for step, _, size in changes:
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(f"{size}w", (step, 1), xycoords=("data", "axes fraction"), fontsize=7, ha="left", va="top", color="grey")
        ax.set_title(name)
        ax.set_xlabel("step")
    fig.tight_layout()
    path = Path(run_dir) / "training_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
