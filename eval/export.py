"""`sslpipe export`: frozen features (.npy + keys + labels) and backbone weights as safetensors.

The weights keep timm's key names, so
`timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH), num_classes=0, in_chans=C)`
loads them directly.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from eval.audio_visual import audio_decoder, is_audio_visual
from eval.embedding import plot_embedding
from eval.evaluate import checkpoint_decoder, load_pretrained, scored_model
from eval.features import extract_features
from pipeline.data.bad_samples import BadSamples
from pipeline.data.dataset import Dataset


def export_backbone(path: str | Path, out_dir: str | Path) -> Path:
    cfg, backbone, state = load_pretrained(path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    info = state["manifest"]
    size = cfg.eval.image_size or info["image_size"]  # the size eval scored it at (patch tasks pretrain larger)
    metadata = {
        "backbone": cfg.model.backbone,
        "backbone_kwargs": json.dumps(cfg.model.backbone_kwargs),
        "in_chans": str(info["channels"]),
        "image_size": str(size),
        "mean": json.dumps(info["mean"]),
        "std": json.dumps(info["std"]),
        "task": cfg.task.name,
        "step": str(state["step"]),
    }
    file = out_dir / "backbone.safetensors"
    save_file(weights, str(file), metadata=metadata)
    _, task = scored_model(cfg, backbone, state)
    if is_audio_visual(task):  # the audio network too, as its own timm model (in_chans=1 on the log-mel)
        export_audio_network(task, out_dir, metadata)
    usage = {
        "model_name": cfg.model.backbone,
        "create_model_kwargs": {"pretrained": True, "num_classes": 0, "in_chans": info["channels"], **cfg.model.backbone_kwargs},
        "pretrained_cfg_overlay": {"file": str(file.resolve()), "mean": info["mean"], "std": info["std"],
                                   "input_size": [info["channels"], size, size]},
    }
    (out_dir / "backbone.json").write_text(json.dumps(usage, indent=2))
    return file


def export_audio_network(task, out_dir: Path, metadata: dict) -> Path:
    """`audio_network.safetensors` (the timm CNN's weights, timm key names) and `audio_network.json`
    (timm name and kwargs, and the log-mel front end to compute its input with)."""
    network = task.audio_feature_extractor()
    weights = {k: v.detach().contiguous().cpu() for k, v in network.backbone.state_dict().items()}
    file = out_dir / "audio_network.safetensors"
    save_file(weights, str(file), metadata={**metadata, "audio_network": json.dumps(network.options())})
    (out_dir / "audio_network.json").write_text(json.dumps({
        "model_name": network.name, "create_model_kwargs": {"pretrained": True, "num_classes": 0, "in_chans": 1, **network.backbone_kwargs},
        "pretrained_cfg_overlay": {"file": str(file.resolve())}, "log_mel": network.frontend.describe(),
        "rebuild": "models.audio.create_audio_encoder(**options) then load the weights into .backbone", "options": network.options(),
    }, indent=2))
    return file


def export_features(path: str | Path, out_dir: str | Path, splits: list[str] | None = None, device: str | None = None,
                    data_root: str | None = None, data_options: dict | None = None) -> dict[str, int]:
    """Writes `<split>_features.npy` (N, D) float32, `<split>_labels.npy` (N,), `<split>_keys.txt` and
    `embedding_<split>.png` (t-SNE of a 2,000-sample subsample, coloured by class); for audio-visual
    runs also `<split>_audio_features.npy`, the audio network's features of the same samples."""
    cfg, backbone, state = load_pretrained(path, data_root)
    for key, value in (data_options or {}).items():  # --strict, --allow-shell-urls
        setattr(cfg.data, key, value)
    model, task = scored_model(cfg, backbone, state)  # what `sslpipe eval` scores (the VAE may score its posterior mean)
    dataset = Dataset.for_data(cfg.data)
    manifest = dataset.manifest
    decoder = checkpoint_decoder(state, require_label=False, image_size=cfg.eval.image_size)  # as `sslpipe eval` scores them
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in splits or list(manifest["splits"]):
        urls = dataset.urls(split)
        features = extract_features(model, urls, decoder, cfg.eval.batch_size, cfg.eval.loader_workers, device,
                                    desc=f"export {split}", total=manifest["splits"][split]["count"],
                                    bad_samples=BadSamples.for_config(cfg.data))
        np.save(out_dir / f"{split}_features.npy", features.features.numpy())
        np.save(out_dir / f"{split}_labels.npy", features.labels.numpy())
        (out_dir / f"{split}_keys.txt").write_text("\n".join(features.keys) + "\n")
        plot_embedding(features.features.numpy(), features.labels.numpy(), out_dir / f"embedding_{split}.png", manifest.get("classes"),
                       seed=cfg.train.seed, title=f"{cfg.task.name} / {cfg.model.backbone}: t-SNE of {split} features")
        counts[split] = len(features.keys)
        if is_audio_visual(task):  # `<split>_audio_features.npy`, rows in the same key order as the frames'
            audio = extract_features(task.audio_feature_extractor(), urls, audio_decoder(manifest, cfg, require_label=False),
                                     cfg.eval.batch_size, cfg.eval.loader_workers, device, desc=f"export {split} audio",
                                     total=manifest["splits"][split]["count"], bad_samples=BadSamples.for_config(cfg.data), field="audio")
            if audio.keys != features.keys:
                raise ValueError(f"split {split}: frames and audio were not read in the same order (a sample failed in one pass only?)")
            np.save(out_dir / f"{split}_audio_features.npy", audio.features.numpy())
    return counts
