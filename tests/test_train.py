"""The training loop in one process (LocalSession) and under Ray Train with 2 workers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import Config
from pipeline.train.checkpoint import CheckpointError, find_checkpoint, load_checkpoint
from pipeline.train.loop import train_worker
from pipeline.train.metrics import read_metrics
from pipeline.train.session import LocalSession
from tests.conftest import TINY_BACKBONE


def tiny_config(shards: Path, run_dir: Path, **overrides) -> Config:
    values = {
        "run_dir": str(run_dir),
        "data": {"root": str(shards), "loader_workers": 1, "shuffle_buffer": 64},
        "model": TINY_BACKBONE,
        "task": {"name": "rotation"},
        "optim": {"name": "adamw", "lr": 0.05, "warmup_steps": 5, "weight_decay": 0.0},
        "train": {"steps": 60, "global_batch_size": 32, "log_every": 10, "checkpoint_every": 30},
        "scaling": {"num_workers": 1},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        values.setdefault(section, {})[name] = value
    return Config.from_dict(values)


def test_local_training_lowers_loss_writes_checkpoints_and_metrics(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path / "run")
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    metrics = read_metrics(cfg.run_dir)
    assert [m["step"] for m in metrics] == [10, 20, 30, 40, 50, 60]
    assert metrics[-1]["loss"] < 0.8 * metrics[0]["loss"]
    assert (Path(cfg.run_dir) / "metrics.csv").read_text().splitlines()[0].startswith("loss,accuracy")
    state = load_checkpoint(cfg.run_dir)
    assert state["step"] == 60 and set(state["optimizers"]) == {"main"}
    assert sorted(p.name for p in (Path(cfg.run_dir) / "checkpoints").iterdir()) == ["step_00000030", "step_00000060"]


class RecordingSession(LocalSession):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reported: list[tuple[int, bool]] = []

    def report(self, metrics: dict, state: dict | None) -> None:
        self.reported.append((metrics["step"], state is not None))
        super().report(metrics, state)


def test_only_checkpoints_are_reported_while_every_row_is_logged_with_time_and_memory(shards, tmp_path):
    """A Ray Train report costs about 1 s (a barrier, then waiting for the controller): reporting
    every log row cut throughput to 0.57 of the bare loop. Rows go to our own log; Ray gets checkpoints."""
    cfg = tiny_config(shards, tmp_path / "run", train__steps=12, train__log_every=2, train__checkpoint_every=5)
    session = RecordingSession(cfg.run_dir, device="cpu")
    train_worker(cfg, session)
    assert session.reported == [(5, True), (10, True), (12, True)]
    rows = read_metrics(cfg.run_dir)
    assert [r["step"] for r in rows] == [2, 4, 5, 6, 8, 10, 12]
    assert all(rows[i]["time"] <= rows[i + 1]["time"] for i in range(len(rows) - 1))
    # The process's own memory plus its loader worker (one here).
    assert all(r["rss_mb"] > 50 and r["loader_rss_mb"] > 10 for r in rows)


def test_resume_continues_from_the_saved_step_with_optimizer_state(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path / "run", train__steps=30)
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    first = load_checkpoint(cfg.run_dir)
    longer = tiny_config(shards, tmp_path / "run", train__steps=50)
    train_worker(longer, LocalSession(longer.run_dir, device="cpu"))
    steps = [m["step"] for m in read_metrics(cfg.run_dir)]
    assert steps == [10, 20, 30, 40, 50]  # continued at 31, nothing repeated
    final = load_checkpoint(cfg.run_dir)
    assert final["step"] == 50
    # The scheduler continued its count and Adam its moment estimates (not reset to 0).
    assert final["schedulers"]["main"]["last_epoch"] == 50
    assert final["optimizers"]["main"]["state"][0]["step"] == first["optimizers"]["main"]["state"][0]["step"] + 20


def test_crash_resume_keeps_the_learning_rate_of_an_uninterrupted_run(shards, tmp_path):
    whole = tiny_config(shards, tmp_path / "whole", train__steps=40, train__log_every=5, train__checkpoint_every=40)
    train_worker(whole, LocalSession(whole.run_dir, device="cpu"))
    crashed = tiny_config(shards, tmp_path / "crashed", train__steps=20, train__log_every=5, train__checkpoint_every=20)
    train_worker(crashed, LocalSession(crashed.run_dir, device="cpu"))
    # What a crash at step 20 of a 40-step run leaves: rewrite the checkpoint's config as the 40-step run's.
    resumed = tiny_config(shards, tmp_path / "crashed", train__steps=40, train__log_every=5, train__checkpoint_every=40)
    from pipeline.train.checkpoint import write_local_checkpoint

    state = load_checkpoint(crashed.run_dir)
    state["config"]["train"]["steps"], state["schedule"] = 40, {"start": 0, "steps": 40}
    write_local_checkpoint(state, Path(crashed.run_dir) / "checkpoints", keep=5)
    train_worker(resumed, LocalSession(resumed.run_dir, device="cpu"))
    lrs = lambda run: {r["step"]: r["lr"] for r in read_metrics(run)}  # noqa: E731
    assert all(abs(lrs(resumed.run_dir)[s] - lrs(whole.run_dir)[s]) < 1e-12 for s in (25, 30, 35, 40))


def test_extending_a_finished_run_continues_its_decayed_rate_or_restarts_on_purpose(shards, tmp_path, caplog):
    import logging

    from core.errors import ConfigError

    cfg = tiny_config(shards, tmp_path / "run", train__steps=20, train__log_every=5, train__checkpoint_every=20)
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    final_lr = read_metrics(cfg.run_dir)[-1]["lr"]
    assert final_lr < 1e-3 * 0.05 * 32 / 256  # the cosine has decayed to (almost) 0
    longer = tiny_config(shards, tmp_path / "run", train__steps=30, train__log_every=5, train__checkpoint_every=30)
    with caplog.at_level(logging.INFO, logger="sslpipe.train"):
        train_worker(longer, LocalSession(longer.run_dir, device="cpu"))
    extra = [r["lr"] for r in read_metrics(cfg.run_dir) if r["step"] > 20]
    assert extra == [final_lr, final_lr]  # not back up to 0.05: the run's curve holds its last value
    assert "extends the run past its learning-rate curve" in caplog.text and "resumed from step 20 at lr" in caplog.text
    # A new optim.lr with the run's own curve is refused, not silently ignored.
    with pytest.raises(ConfigError, match="resume_schedule=restart"):
        train_worker(tiny_config(shards, tmp_path / "run", train__steps=40, optim__lr=0.01), LocalSession(longer.run_dir, device="cpu"))
    # Restart: a new warm-up (5 steps) and cosine over steps 30-50 from the new rate.
    restart = tiny_config(shards, tmp_path / "run", train__steps=50, train__log_every=1, train__checkpoint_every=50,
                          optim__lr=0.01, train__resume_schedule="restart")
    train_worker(restart, LocalSession(restart.run_dir, device="cpu"))
    rates = {r["step"]: r["lr"] for r in read_metrics(cfg.run_dir) if r["step"] > 30}
    # Logged after each step: the rate the next step will use (step 31 ran at 1/5 of it). The
    # rate is quoted for a batch of 256 and scaled to the tiny config's 32.
    base = 0.01 * 32 / 256
    assert rates[31] == pytest.approx(base * 2 / 5) and rates[34] == pytest.approx(base) and rates[50] < 1e-3 * base


class NotATensor:
    pass


def test_checkpoint_carrying_code_is_refused(tmp_path):
    file = tmp_path / "checkpoint.pt"
    torch.save({"task": {}, "step": 1, "config": {}, "manifest": {}, "payload": NotATensor()}, file)
    with pytest.raises(CheckpointError, match=str(file)):
        load_checkpoint(file)


def test_fewer_shards_than_workers_fails_before_ray(shards, tmp_path):
    from core.errors import ConfigError
    from pipeline.train.launch import check_data

    cfg = tiny_config(shards, tmp_path / "run", scaling__num_workers=8, train__global_batch_size=32)
    with pytest.raises(ConfigError, match=r"6 shard\(s\) for scaling.num_workers=8"):
        check_data(cfg)


@pytest.mark.parametrize("task, options, message", [
    ("colorization", {}, "needs RGB data"),
    ("jigsaw", {"grid": 5}, "grid=5"),
    ("cpc", {"patch_size": 20}, "patch_size=20"),
])
def test_impossible_task_for_the_data_fails_before_ray(shards, tmp_path, task, options, message):
    from core.errors import ConfigError
    from pipeline.train.launch import check_data

    cfg = tiny_config(shards, tmp_path / "run", task__name=task)
    cfg.task.options = options
    with pytest.raises(ConfigError, match=message):
        check_data(cfg)


def test_unreadable_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=str(bad)):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path / "missing")


@pytest.mark.ray
def test_ray_two_workers_lower_loss_checkpoint_then_resume_and_eval(shards, tmp_path, ray_local):
    from eval.evaluate import evaluate
    from pipeline.train.launch import pretrain

    cfg = tiny_config(shards, tmp_path / "ray-run", scaling__num_workers=2, train__steps=60)
    run_dir = pretrain(cfg)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [10, 20, 30, 40, 50, 60]
    assert metrics[-1]["loss"] < 0.8 * metrics[0]["loss"]
    checkpoint = find_checkpoint(run_dir)
    assert "ray-" in str(checkpoint) and load_checkpoint(checkpoint)["step"] == 60
    assert (run_dir / "config.yaml").is_file() and (run_dir / "training_curves.png").is_file()

    # Resume with a larger budget: continues at step 61 from the 2-worker checkpoint.
    longer = Config.load(run_dir / "config.yaml", ["train.steps=80"])
    pretrain(longer, resume=run_dir)
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == [10, 20, 30, 40, 50, 60, 70, 80]
    assert load_checkpoint(run_dir)["step"] == 80

    results = evaluate(run_dir)
    assert set(results["rows"]) == {"raw_pixels", "random_init", "pretrained"}
    saved = json.loads((run_dir / "eval" / "results.json").read_text())
    assert saved["rows"]["pretrained"]["linear"] == results["rows"]["pretrained"]["linear"]
    assert (run_dir / "eval" / "results.md").read_text().count("|") > 10


def test_colorization_trains_on_rgb_shards_and_is_evaluated_on_grayscale(tmp_path):
    """End to end without Ray: RGB shards -> colorization -> checkpoint -> eval decodes grayscale."""
    import numpy as np

    from eval.evaluate import checkpoint_decoder, evaluate, load_pretrained
    from pipeline.data.shards import Sample, encode_png, write_manifest, write_split
    from tests.conftest import synthetic_images

    root = tmp_path / "rgb"
    splits = {}
    for split, count, seed in (("train", 64, 0), ("test", 32, 1)):
        images, labels = synthetic_images(count, 16, seed)
        tints = np.array([[255, 80, 40], [40, 200, 90], [60, 90, 255], [220, 200, 40]], dtype=np.float32) / 255
        rgb = (images[..., None] * tints[labels][:, None, None, :]).astype(np.uint8)  # each class its own colour
        samples = (Sample(f"{split}_{i:05d}", encode_png(img), "png", int(lab)) for i, (img, lab) in enumerate(zip(rgb, labels)))
        splits[split] = write_split(samples, root, split, count, "RGB", 16)
    write_manifest(root, "synthetic-rgb", ["L", "F", "S", "T"], "RGB", splits)

    cfg = tiny_config(root, tmp_path / "run", task__name="colorization", train__steps=10, train__checkpoint_every=10)
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    _, backbone, state = load_pretrained(cfg.run_dir)
    assert backbone.conv1.in_channels == 1
    decoder = checkpoint_decoder(state)
    assert (decoder.mode, len(state["manifest"]["mean"])) == ("L", 1)
    results = evaluate(cfg.run_dir, baselines=["random_init"])
    assert set(results["rows"]) == {"random_init", "pretrained"}


@pytest.mark.parametrize("task", ["jigsaw", "context_prediction"])
def test_in_process_loading_is_seeded_so_two_runs_agree(shards, tmp_path, task):
    """With data.loader_workers=0 the transforms' Python `random` runs in the training process; it
    is seeded per rank like torch, so the same config trains the same way twice."""
    losses = []
    for attempt in range(2):
        cfg = tiny_config(shards, tmp_path / f"run{attempt}", task__name=task, data__loader_workers=0, train__steps=4,
                          train__log_every=1, train__checkpoint_every=4)
        train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
        losses.append([row["loss"] for row in read_metrics(cfg.run_dir)])
    assert losses[0] == losses[1]
