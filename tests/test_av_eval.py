"""An audio-visual run end to end in one process: procedural AV shards -> AVC / cross-modal
InfoNCE training -> eval of the frames and of the audio, retrieval both ways, AVC accuracy."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import Config
from pipeline.train.loop import train_worker
from pipeline.train.session import LocalSession
from tests.conftest import TINY_BACKBONE
from tests.test_av_tasks import AV_OPTIONS


@pytest.fixture(scope="module")
def av_data(tmp_path_factory):
    from pipeline.data.av_synth import write_av_synth

    root = tmp_path_factory.mktemp("av")
    write_av_synth(root, clips=24, classes=3, duration=2.0, image_size=16, test_fraction=0.25, samples_per_shard=8)
    return root


@pytest.mark.parametrize("task", ["avc", "av_contrastive"])
def test_audio_visual_run_is_evaluated_on_both_modalities_with_retrieval(av_data, tmp_path, task):
    from eval.evaluate import evaluate

    cfg = Config.from_dict({
        "run_dir": str(tmp_path / "run"), "data": {"root": str(av_data), "loader_workers": 0, "shuffle_buffer": 32},
        "model": TINY_BACKBONE, "task": {"name": task, "options": AV_OPTIONS},
        "optim": {"name": "adamw", "lr": 0.003, "warmup_steps": 2, "weight_decay": 0.0},
        "train": {"steps": 12, "global_batch_size": 16, "log_every": 6, "checkpoint_every": 12},
        "scaling": {"num_workers": 1}, "eval": {"knn_k": [5], "linear_C": [1.0], "batch_size": 32, "loader_workers": 0},
    })
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    results = evaluate(cfg.run_dir, device="cpu")
    rows = results["rows"]
    assert {"pretrained", "pretrained_audio", "random_init_audio"} <= set(rows)
    assert rows["pretrained_audio"]["dim"] > 0 and 0 <= rows["pretrained_audio"]["linear"] <= 1
    av = results["audio_visual"]
    manifest = json.loads((av_data / "manifest.json").read_text())
    assert av["retrieval"]["queries"] == manifest["splits"]["test"]["count"] and av["test_clips"] == 6
    for direction in ("image_to_audio", "audio_to_image"):
        recalls = av["retrieval"][direction]
        assert 0 <= recalls["R@1"] <= recalls["R@5"] <= recalls["R@10"] <= 1
    assert av["retrieval"]["chance"]["R@1"] == pytest.approx(1 / 6)
    assert ("correspondence_accuracy" in av) == (task == "avc")
    text = (Path(cfg.run_dir) / "eval" / "results.md").read_text()
    assert "pretrained audio network" in text and "image to audio" in text

    # Both modalities export: frame and audio features of the same samples, and the audio network
    # as a timm model whose features equal the task's audio features.
    import numpy as np
    import timm
    import torch

    from eval.export import export_backbone, export_features
    from models.audio import LogMel

    out = tmp_path / "export"
    counts = export_features(cfg.run_dir, out, splits=["test"], device="cpu")
    frames, audio = np.load(out / "test_features.npy"), np.load(out / "test_audio_features.npy")
    assert len(frames) == len(audio) == counts["test"]
    export_backbone(cfg.run_dir, out)
    usage = json.loads((out / "audio_network.json").read_text())
    network = timm.create_model(usage["model_name"], **usage["create_model_kwargs"],
                                pretrained_cfg_overlay=usage["pretrained_cfg_overlay"]).eval()
    frontend = LogMel(**{k: usage["log_mel"][k] for k in ("sample_rate", "n_mels", "window_ms", "hop_ms")})
    from pipeline.data.decode import decoder_for
    from pipeline.data.shards import read_manifest, split_urls
    from pipeline.data.streaming import first_decoded

    manifest = read_manifest(av_data)
    sample = first_decoded(split_urls(av_data, manifest, "test"), decoder_for(manifest, "test", 0), 1)[0]
    keys = (out / "test_keys.txt").read_text().split()
    with torch.no_grad():
        mine = network(frontend(sample["audio"][None]))[0].numpy()
    np.testing.assert_allclose(mine, audio[keys.index(sample["key"])], rtol=1e-4, atol=1e-4)
