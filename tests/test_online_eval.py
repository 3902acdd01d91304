"""Online kNN during pretraining: logged on schedule, equal to the eval stage's kNN on the same subset."""
from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from core.knn import knn_accuracy
from eval.evaluate import checkpoint_decoder, load_pretrained
from eval.features import extract_features
from pipeline.data.shards import read_manifest, split_urls
from pipeline.train.loop import train_worker
from pipeline.train.metrics import plot_metrics, read_metrics
from pipeline.train.session import LocalSession
from tests.test_train import tiny_config


def test_online_knn_is_logged_on_schedule_and_matches_the_eval_stage(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path / "run", train__steps=30, train__checkpoint_every=30,
                      eval__online_every=20, eval__online_bank=64, eval__online_queries=32)
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    rows = read_metrics(cfg.run_dir)
    scored = {r["step"]: r["online_knn"] for r in rows if "online_knn" in r}
    assert sorted(scored) == [20, 30]  # every online_every steps, and at the last step
    assert all(0 <= v <= 1 for v in scored.values()) and all(r["online_eval_s"] >= 0 for r in rows if "online_knn" in r)

    # The eval stage's features of the final checkpoint, restricted to the same subset (the first
    # 64 train and 32 test samples in shard order), give the same kNN.
    _, backbone, state = load_pretrained(cfg.run_dir)
    decoder = checkpoint_decoder(state, require_label=True)
    manifest = read_manifest(shards)
    features = {split: extract_features(backbone, split_urls(shards, manifest, split), decoder, loader_workers=0)
                for split in ("train", "test")}
    bank = [features["train"].keys.index(f"train_{i:05d}") for i in range(64)]
    queries = [features["test"].keys.index(f"test_{i:05d}") for i in range(32)]
    expected = knn_accuracy(features["train"].features[bank], features["train"].labels[bank],
                            features["test"].features[queries], features["test"].labels[queries], cfg.eval.knn_k[0], cfg.eval.knn_temperature)
    assert scored[30] == pytest.approx(expected, abs=1e-4)
    assert (Path(cfg.run_dir) / "tensorboard").is_dir()
    assert plot_metrics(cfg.run_dir).is_file()


def test_online_knn_is_off_by_default(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path / "run", train__steps=10, train__checkpoint_every=10)
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    assert not any("online_knn" in r for r in read_metrics(cfg.run_dir))


def test_online_subset_sizes_must_be_positive(shards, tmp_path):
    with pytest.raises(ConfigError, match="eval.online_bank"):
        tiny_config(shards, tmp_path / "run", eval__online_every=5, eval__online_bank=0)
