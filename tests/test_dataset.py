"""The dataset is opened once per command: one manifest read and one training decoder for a whole
`pretrain --local` (driver checks, examples figure, training loop, online kNN) and for `eval`."""
from __future__ import annotations

import sys

import pytest

from pipeline.data.dataset import Dataset
from pipeline.data.shards import read_manifest


def count_calls(monkeypatch, name: str) -> list[str]:
    """Wraps `name` in every loaded sslpipe module that holds it, recording each call's caller."""
    calls: list[str] = []
    for module in list(sys.modules.values()):
        original = getattr(module, name, None)
        if original is None or not getattr(module, "__name__", "").startswith(("pipeline", "eval", "pretext", "models", "core")):
            continue

        def counted(*args, _original=original, **kwargs):
            calls.append(sys._getframe(1).f_code.co_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def test_a_local_pretraining_run_reads_the_manifest_once_and_builds_one_decoder(shards, tmp_path, monkeypatch):
    import eval.evaluate  # noqa: F401  (every module that could read a manifest is loaded, so all are counted)
    import pipeline.train.examples  # noqa: F401
    import pipeline.train.loop  # noqa: F401
    from pipeline.train.launch import pretrain_local
    from tests.test_train import tiny_config

    cfg = tiny_config(shards, tmp_path / "run", train__steps=4, train__log_every=2, train__checkpoint_every=4,
                      eval__online_every=4, eval__online_bank=16, eval__online_queries=8)
    reads, decoders = count_calls(monkeypatch, "read_manifest"), count_calls(monkeypatch, "decoder_for")
    pretrain_local(cfg)
    assert reads == ["open"], reads  # Dataset.open, on the driver; the loop in this process gets it
    assert len(decoders) == 1, decoders


def test_eval_reads_the_manifest_once(shards, tmp_path, monkeypatch):
    from eval.evaluate import evaluate
    from pipeline.train.launch import pretrain_local
    from tests.test_train import tiny_config

    run = pretrain_local(tiny_config(shards, tmp_path / "run", train__steps=2, train__log_every=2, train__checkpoint_every=2))
    reads = count_calls(monkeypatch, "read_manifest")
    evaluate(run, baselines=[], protocols=[])
    assert reads == ["open"], reads


def test_a_dataset_checks_each_split_once_and_names_what_is_missing(shards, tmp_path):
    dataset = Dataset.open(shards)
    assert dataset.manifest == read_manifest(shards) and dataset.channels == 1
    urls = dataset.urls("train")
    assert dataset.urls("train") is urls and len(urls) == len(dataset.manifest["splits"]["train"]["shards"])
    assert dataset.decoder("train", 0) is dataset.decoder("train", 0)
    assert dataset.decoder("train", 24).image_size == 24
    with pytest.raises(KeyError, match="split 'val'"):
        dataset.urls("val")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        Dataset.open(tmp_path / "empty")
