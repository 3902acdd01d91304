"""Run tracking: TensorBoard scalars and an MLflow file store hold exactly what metrics.jsonl holds;
eval results join the same MLflow run; a resume continues it; a missing MLflow is a ConfigError."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError
from pipeline.config import Config, absolute_store_uri
from pipeline.train.loop import train_worker
from pipeline.train.metrics import read_metrics
from pipeline.train.session import LocalSession
from pipeline.train.tracking import MLFLOW_RUN_FILE, scalars
from tests.test_train import tiny_config


def tracked_config(shards: Path, run_dir: Path, tracking: dict, task: dict | None = None, **overrides) -> Config:
    """tiny_config plus a tracking section (and task), validated again so the URI is resolved."""
    values = tiny_config(shards, run_dir, **overrides).to_dict()
    values["tracking"].update(tracking)
    values["task"].update(task or {})
    return Config.from_dict(values)


def tensorboard_scalars(run_dir: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def latest_rows(rows: list[dict]) -> list[dict]:
    """One row per step, the last one written (what a resume after a crash leaves valid)."""
    return sorted({row["step"]: row for row in rows}.values(), key=lambda row: row["step"])


def assert_tensorboard_matches(run_dir: Path, rows: list[dict]) -> None:
    logged = tensorboard_scalars(run_dir)
    assert set(logged) == set(scalars(rows[0])) and "loss" in logged and "lr" in logged
    for tag, events in logged.items():
        # TensorBoard stores scalars as float32: compare with the row's value rounded the same way.
        assert [(e.step, e.value, e.wall_time) for e in events] == [
            (row["step"], float(np.float32(row[tag])), row["time"]) for row in rows
        ], tag


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_tensorboard_scalars_equal_the_metrics_log_by_default(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path / "run", train__steps=8, train__log_every=2, train__checkpoint_every=8)
    assert cfg.tracking.tensorboard and not cfg.tracking.mlflow_uri  # the defaults
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    rows = read_metrics(cfg.run_dir)
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert_tensorboard_matches(Path(cfg.run_dir), rows)
    assert not (Path(cfg.run_dir) / MLFLOW_RUN_FILE).exists()


def test_mlflow_run_holds_config_metrics_and_then_eval_results(shards, tmp_path, monkeypatch):
    from eval.evaluate import evaluate

    monkeypatch.chdir(tmp_path)  # the relative store must resolve here, once, and stay there for eval
    cfg = tracked_config(shards, tmp_path / "vae-run", {"mlflow_uri": "file:./mlruns", "tensorboard": False},
                         task={"name": "vae", "options": {"latent_dim": 6, "decoder_width": 8}},
                         train__steps=12, train__log_every=4, train__checkpoint_every=12)
    assert cfg.tracking.mlflow_uri == (tmp_path / "mlruns").as_uri()
    cfg.eval.knn_k, cfg.eval.linear_C = [5], [1.0]  # eval reads these from the checkpoint's config
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    run_dir = Path(cfg.run_dir)
    assert not (run_dir / "tensorboard").exists()

    client = mlflow_client(cfg.tracking.mlflow_uri)
    run_id = json.loads((run_dir / MLFLOW_RUN_FILE).read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.run_name == "vae-run" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "sslpipe"
    params = run.data.params
    assert {k: params[k] for k in ("task.name", "task.options.latent_dim", "train.steps", "optim.lr", "optim.name",
                                   "model.backbone_kwargs.channels", "eval.knn_k", "run_dir")} == {
        "task.name": "vae", "task.options.latent_dim": "6", "train.steps": "12", "optim.lr": "0.05", "optim.name": "adamw",
        "model.backbone_kwargs.channels": "[8, 16, 32, 64]", "eval.knn_k": "[5]", "run_dir": str(tmp_path / "vae-run")}
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert set(run.data.metrics) == set(scalars(rows[0])) and "loss" in run.data.metrics
    for key in run.data.metrics:
        history = client.get_metric_history(run_id, key)
        assert [(m.step, m.value, m.timestamp) for m in history] == [(r["step"], r[key], int(r["time"] * 1000)) for r in rows], key

    results = evaluate(run_dir, device="cpu", baselines=["raw_pixels"])
    run = client.get_run(run_id)
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the same run, not a new one
    for row in ("raw_pixels", "pretrained"):
        assert run.data.metrics[f"eval/{row}/knn_top1_k5"] == results["rows"][row]["knn"]["5"]
        assert run.data.metrics[f"eval/{row}/linear_top1"] == results["rows"][row]["linear"]
    assert run.data.metrics["eval/generative/bits_per_dim"] == results["generative"]["bits_per_dim"]
    assert [m.step for m in client.get_metric_history(run_id, "eval/pretrained/linear_top1")] == [12]
    artifacts = {Path(a.path).name: a.file_size for a in client.list_artifacts(run_id, "eval")}
    written = [run_dir / "eval" / "results.md", run_dir / "eval" / "results.json", *(run_dir / "eval").glob("*.png")]
    assert artifacts == {path.name: path.stat().st_size for path in written}  # every PNG eval wrote, whole
    assert {"results.md", "results.png", "samples.png"} <= set(artifacts)


def test_resume_continues_the_mlflow_run_and_tensorboard_keeps_the_redone_steps(shards, tmp_path):
    uri = str(tmp_path / "mlruns")  # a bare folder works too
    cfg = tracked_config(shards, tmp_path / "run", {"mlflow_uri": uri, "mlflow_experiment": "resume-test"},
                         train__steps=8, train__log_every=2, train__checkpoint_every=4)
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    run_dir = Path(cfg.run_dir)
    run_id = json.loads((run_dir / MLFLOW_RUN_FILE).read_text())["run_id"]
    # As if the run had died after logging step 8 but before its checkpoint: the resume starts
    # after step 4 and logs 6 and 8 again.
    shutil.rmtree(run_dir / "checkpoints" / "step_00000008")
    longer = tracked_config(shards, tmp_path / "run", {"mlflow_uri": uri, "mlflow_experiment": "resume-test"},
                            train__steps=12, train__log_every=2, train__checkpoint_every=4)
    train_worker(longer, LocalSession(longer.run_dir, device="cpu"))

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 6, 8, 10, 12]
    assert json.loads((run_dir / MLFLOW_RUN_FILE).read_text())["run_id"] == run_id
    client = mlflow_client(cfg.tracking.mlflow_uri)
    experiment = client.get_experiment_by_name("resume-test")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "8"  # params are logged once, as first configured
    # MLflow keeps every row in order, the redone steps too, like metrics.jsonl.
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(r["step"], r["loss"]) for r in rows]
    # TensorBoard hides what the dead attempt logged after the checkpoint it resumed from.
    assert_tensorboard_matches(run_dir, latest_rows(rows))
    assert latest_rows(rows)[2] == rows[4]  # step 6 is the resumed run's row


def test_missing_mlflow_is_a_config_error_before_anything_runs(shards, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` sees when it is not installed
    with pytest.raises(ConfigError, match=r"tracking\.mlflow_uri.*pip install 'sslpipe\[mlflow\]'"):
        Config.load(None, ["--tracking.mlflow_uri=file:./mlruns"])
    run_dir = tmp_path / "run"
    assert main(["pretrain", "--local", f"--run_dir={run_dir}", f"--data.root={shards}", "--scaling.num_workers=1",
                 f"--tracking.mlflow_uri={tmp_path / 'mlruns'}"]) == 2
    assert "error: tracking.mlflow_uri is set but MLflow is not installed" in capsys.readouterr().err
    assert not run_dir.exists() and not (tmp_path / "mlruns").exists()
    assert Config.load(None, []).tracking.tensorboard  # without a URI, MLflow is never needed


def test_local_store_uris_become_absolute_once():
    assert absolute_store_uri("") == ""
    assert absolute_store_uri("file:./mlruns") == (Path.cwd() / "mlruns").as_uri()
    assert absolute_store_uri("runs/ml flow") == (Path.cwd() / "runs" / "ml flow").as_uri()
    assert absolute_store_uri(absolute_store_uri("runs/ml flow")) == absolute_store_uri("runs/ml flow")
    assert absolute_store_uri("sqlite:///mlflow.db") == f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    for remote in ("http://mlflow.internal:5000", "databricks", "sqlite:////abs/mlflow.db", "file:///abs/mlruns"):
        assert absolute_store_uri(remote) == remote
