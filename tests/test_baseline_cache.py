"""The baseline cache: hit on a rerun, missed when the data, the backbone or the eval settings
change, stale or broken entries ignored, never used when the run's own read is incomplete."""
from __future__ import annotations

import json
import logging

import pytest

from eval.baseline_cache import baseline_key, entry_path, load_row, store_row
from eval.evaluate import checkpoint_decoder, evaluate
from pipeline.config import Config
from pipeline.data.shards import read_manifest
from pipeline.train.launch import pretrain_local
from tests.conftest import write_synthetic_shards


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSLPIPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "baselines"


def tiny_run(shards, run_dir):
    cfg = Config.load(None, [f"--data.root={shards}", f"--run_dir={run_dir}", "--model.backbone_kwargs={channels: [8, 16, 32, 64]}",
                             "--train.steps=4", "--train.global_batch_size=16", "--train.checkpoint_every=4", "--optim.warmup_steps=1",
                             "--eval.linear_C=[1.0]", "--eval.knn_k=[5]", "--data.loader_workers=0", "--eval.loader_workers=0"])
    pretrain_local(cfg)
    return cfg


def test_a_rerun_takes_both_baselines_from_the_cache_and_other_data_misses(shards, tmp_path, cache):
    tiny_run(shards, tmp_path / "run")
    first = evaluate(tmp_path / "run", tmp_path / "eval1")
    assert first["cached_baselines"] == [] and len(list(cache.glob("*.json"))) == 2
    second = evaluate(tmp_path / "run", tmp_path / "eval2")
    assert second["cached_baselines"] == ["raw_pixels", "random_init"]
    assert second["rows"] == first["rows"]  # the same numbers, the pretrained row scored again
    assert list(second["rows"]) == ["raw_pixels", "random_init", "pretrained"]

    # Other shards (other images, so other checksums) under the same run: a miss, then two more entries.
    other = write_synthetic_shards(tmp_path / "other", size=16, train=64, test=32)
    third = evaluate(tmp_path / "run", tmp_path / "eval3", data_root=str(other))
    assert third["cached_baselines"] == [] and len(list(cache.glob("*.json"))) == 4


def key_for(cfg, shards, name="random_init"):
    manifest = read_manifest(shards)
    info = {"mode": manifest["mode"], "image_size": 16, "mean": manifest["splits"]["train"]["mean"], "std": manifest["splits"]["train"]["std"]}
    return baseline_key(name, cfg, manifest, checkpoint_decoder({"manifest": info}), manifest["channels"])


def test_the_key_follows_what_the_scores_depend_on(shards):
    cfg = Config.load(None, [f"--data.root={shards}"])
    base = key_for(cfg, shards)
    for override in ("--train.seed=1", "--model.backbone=resnet10_s2_w16", "--eval.knn_k=[7]", "--eval.linear_C=[0.5]"):
        changed = key_for(Config.load(None, [f"--data.root={shards}", override]), shards)
        assert entry_path(changed) != entry_path(base), override
    # Raw pixels do not depend on the backbone or the seed.
    pixels = key_for(cfg, shards, "raw_pixels")
    assert key_for(Config.load(None, [f"--data.root={shards}", "--train.seed=1", "--model.backbone=resnet10_s2_w16"]), shards, "raw_pixels") == pixels


def test_stale_or_broken_entries_are_ignored_and_data_without_checksums_is_not_cached(shards, cache, caplog):
    cfg = Config.load(None, [f"--data.root={shards}"])
    key = key_for(cfg, shards)
    path = store_row(key, {"knn": {"5": 0.5}})
    assert load_row(key) == {"knn": {"5": 0.5}}
    entry = json.loads(path.read_text())
    entry["key"]["seed"] = 99  # stored for another key under this name
    path.write_text(json.dumps(entry))
    with caplog.at_level(logging.WARNING, logger="sslpipe.eval"):
        assert load_row(key) is None
        path.write_text('{"key": ')  # truncated
        assert load_row(key) is None
    assert "another key" in caplog.text and "unreadable" in caplog.text
    manifest = read_manifest(shards)
    for shard in manifest["splits"]["test"]["shards"]:
        shard.pop("sha256")
    assert baseline_key("raw_pixels", cfg, manifest, checkpoint_decoder({"manifest": {"mode": "L", "image_size": 16, "mean": [0.0], "std": [1.0]}}), 1) is None


def test_a_run_whose_own_read_is_short_scores_its_baselines_again(tmp_path, cache):
    shards = write_synthetic_shards(tmp_path / "shards")
    tiny_run(shards, tmp_path / "run")
    evaluate(tmp_path / "run", tmp_path / "eval1")
    test_shard = sorted(shards.glob("test-*.tar"))[-1]
    test_shard.write_bytes(test_shard.read_bytes()[: len(test_shard.read_bytes()) // 2])  # cut mid-shard
    again = evaluate(tmp_path / "run", tmp_path / "eval2")
    assert again["cached_baselines"] == []
    assert again["input"]["test"]["scored"] < again["input"]["test"]["listed"]
