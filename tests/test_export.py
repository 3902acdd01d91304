"""Export: features (.npy + keys + labels) and safetensors weights that timm.create_model loads."""
from __future__ import annotations

import json

import numpy as np
import timm
import torch

from eval.export import export_backbone, export_features
from pipeline.train.checkpoint import encoder_state, load_checkpoint
from pipeline.train.loop import train_worker
from pipeline.train.session import LocalSession
from tests.conftest import TINY_BACKBONE
from tests.test_train import tiny_config


def test_export_features_and_weights_that_timm_loads(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path / "run", train__steps=10, train__checkpoint_every=10)
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    out = tmp_path / "export"

    weights_file = export_backbone(cfg.run_dir, out)
    model = timm.create_model("resnet18", pretrained=True, num_classes=0, in_chans=1, **TINY_BACKBONE["backbone_kwargs"],
                              pretrained_cfg_overlay=dict(file=str(weights_file)))
    trained = encoder_state(load_checkpoint(cfg.run_dir))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    usage = json.loads((out / "backbone.json").read_text())
    assert usage["create_model_kwargs"]["in_chans"] == 1 and len(usage["pretrained_cfg_overlay"]["mean"]) == 1

    counts = export_features(cfg.run_dir, out, device="cpu")
    assert counts == {"train": 96, "test": 48}
    features = np.load(out / "train_features.npy")
    labels = np.load(out / "train_labels.npy")
    keys = (out / "train_keys.txt").read_text().split()
    assert features.shape == (96, model.num_features) and features.dtype == np.float32
    assert keys == sorted(keys) and len(set(keys)) == 96 and labels.shape == (96,)
    # The exported features are the loaded timm model's own pooled features on the same inputs.
    from pipeline.data.decode import decoder_for
    from pipeline.data.shards import read_manifest, split_urls
    from pipeline.data.streaming import eval_loader

    manifest = read_manifest(shards)
    images, _, batch_keys = next(iter(eval_loader(split_urls(shards, manifest, "train")[:1], 0, 1, decoder_for(manifest, "train", 0), 16, 0)))
    with torch.no_grad():
        expected = model.eval()(images).numpy()
    rows = [keys.index(k) for k in batch_keys]
    assert np.allclose(features[rows], expected, atol=1e-4)
