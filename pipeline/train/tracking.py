"""Run tracking beyond metrics.jsonl: TensorBoard event files and an optional MLflow run.

Rank 0 writes every metrics row through `Tracker.log_metrics` (called by `MetricsLog`);
`sslpipe eval` adds its results with `log_eval`. Both are configured by `tracking.*`.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from pipeline.config import Config, require_mlflow

log = logging.getLogger("sslpipe.tracking")

# The run id of a run directory's MLflow run, so a resumed run (or a restarted Ray worker group,
# or `sslpipe eval`) continues that run instead of starting another.
MLFLOW_RUN_FILE = "mlflow_run.json"


class Tracker:
    """One destination for metrics rows; the base class does nothing."""

    def log_metrics(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def open_trackers(cfg: Config, start_step: int = 0) -> list[Tracker]:
    """The trackers `cfg.tracking` asks for (rank 0 only). `start_step` is the step training
    resumes after: rows a crashed attempt logged beyond it are hidden in TensorBoard."""
    from pipeline.train.run_storage import local_run_dir

    run_dir = local_run_dir(cfg.run_dir)
    trackers: list[Tracker] = []
    if cfg.tracking.tensorboard:
        trackers.append(TensorBoardTracker(run_dir / "tensorboard", purge_step=start_step + 1))
    if cfg.tracking.mlflow_uri:
        trackers.append(MLflowTracker(cfg, training=True))
    return trackers


def scalars(row: dict) -> dict[str, float]:
    """The row's numeric values, without its x axes ("step", "time") and the restart marker
    ("resumed_from": one row's bookkeeping, not a curve; metrics.jsonl keeps it)."""
    return {k: float(v) for k, v in row.items()
            if k not in ("step", "time", "resumed_from") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker(Tracker):
    """Every row as scalars at the row's step, with the row's wall time."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import (
            SummaryWriter,  # here: only rank 0 with tensorboard on needs it
        )

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def log_metrics(self, row: dict) -> None:
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, row["step"], walltime=row.get("time"))
        self.writer.flush()  # rows come every train.log_every steps: readable while the run goes on

    def close(self) -> None:
        self.writer.close()


def flatten(values: dict, prefix: str = "") -> dict[str, str]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": "0.1"}; lists and empty mappings as JSON."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return flat


class MLflowTracker(Tracker):
    """The run directory's MLflow run: created (params = the flattened config) the first time,
    continued afterwards through the run id in <run_dir>/mlflow_run.json."""

    def __init__(self, cfg: Config, training: bool):
        require_mlflow()
        # MLflow 3 sends usage telemetry and keeps an id in ~/.config/mlflow: a run writes only to
        # the places it is told to, and needs no network for a local store. MLFLOW_DISABLE_TELEMETRY=false opts in.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        uri = cfg.tracking.mlflow_uri
        if uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked to (it prefers a database); a local
            # folder is what `tracking.mlflow_uri=file:./mlruns` means, so ask. An explicit setting wins.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        from pipeline.train.run_storage import local_run_dir

        self.run_dir = local_run_dir(cfg.run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = self._existing_run(uri)
        if self.run_id is not None:
            if training:
                self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(cfg.tracking.mlflow_experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.tracking.mlflow_experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_dir.name).info.run_id
        if self.run_dir.is_dir():  # eval of a moved checkpoint must not create its stale run directory
            (self.run_dir / MLFLOW_RUN_FILE).write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}))
        # Params are immutable in MLflow, so they are logged once, as the run was first configured
        # (a resume's changed train.steps stays in config.yaml).
        self._log_batch(params=flatten(cfg.to_dict()))
        log.info("MLflow run %s (%s) in %s", self.run_id, self.run_dir.name, uri)

    def _existing_run(self, uri: str) -> str | None:
        path = self.run_dir / MLFLOW_RUN_FILE
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        if saved["tracking_uri"] != uri:
            log.warning("%s names a run in %s, not in tracking.mlflow_uri=%s: starting a new run", path, saved["tracking_uri"], uri)
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(saved["run_id"])
        except MlflowException:
            run = None
        if run is None or run.info.lifecycle_stage != "active":
            log.warning("MLflow run %s of %s is gone or deleted: starting a new run", saved["run_id"], path)
            return None
        return run.info.run_id

    def _log_batch(self, metrics: dict[str, float] | None = None, step: int = 0, timestamp_ms: int | None = None,
                   params: dict[str, str] | None = None) -> None:
        from mlflow.entities import Metric, Param

        timestamp_ms = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        metrics = [Metric(k, v, timestamp_ms, step) for k, v in (metrics or {}).items()]
        params = [Param(k, v) for k, v in (params or {}).items()]
        for i in range(0, max(len(metrics), len(params)), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 100], params=params[i : i + 100])

    def log_metrics(self, row: dict) -> None:
        self._log_batch(scalars(row), row["step"], int(row["time"] * 1000) if "time" in row else None)

    def log_eval(self, results: dict, out_dir: Path) -> None:
        self._log_batch(eval_metrics(results), results["step"])
        for path in [out_dir / "results.md", out_dir / "results.json", *sorted(out_dir.glob("*.png"))]:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path), artifact_path="eval")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def eval_metrics(results: dict) -> dict[str, float]:
    """`sslpipe eval` results as flat metrics: top-1 (fractions) per features row, test likelihood."""
    metrics = {}
    for name, row in results["rows"].items():
        for k, accuracy in row["knn"].items():
            metrics[f"eval/{name}/knn_top1_k{k}"] = accuracy
        metrics[f"eval/{name}/linear_top1"] = row["linear"]
    for key, value in results.get("generative", {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[f"eval/generative/{key}"] = float(value)
    return metrics


def log_eval(cfg: Config, results: dict, out_dir: Path) -> None:
    """Adds eval results and files (results.md/.json, PNGs) to the run's MLflow run, if it has one."""
    if cfg.tracking.mlflow_uri:
        MLflowTracker(cfg, training=False).log_eval(results, out_dir)
