"""Eval of audio-visual runs (tasks with `modalities` holding "audio"): the audio side scored like
the image side (kNN and linear probe on pooled audio features, against a random-init audio
network), cross-modal retrieval recall@K both ways on the test split, and for AVC the
correspondence accuracy on held-out clips."""
from __future__ import annotations

import logging

import torch

from core.clips import clip_code
from eval.features import Features, extract_features
from eval.retrieval import ranks_from_scores
from pipeline.data.bad_samples import BadSamples
from pipeline.data.decode import ImageDecoder, decoder_for

log = logging.getLogger("sslpipe.eval")


def is_audio_visual(task) -> bool:
    return task is not None and "audio" in getattr(task, "modalities", ())


def clip_of(key: str) -> str:
    """Keys of AV shards are `<video id>_<frame index>`."""
    return key.rsplit("_", 1)[0]


def audio_decoder(manifest: dict, cfg, require_label: bool) -> ImageDecoder:
    """Decodes the waveforms (and frames) of an AV dataset for the audio network."""
    if not manifest.get("audio"):
        raise ValueError(f"task {cfg.task.name!r} is audio-visual but dataset {manifest.get('name', '?')!r} has no audio in its manifest")
    return decoder_for(manifest, cfg.data.train_split, cfg.data.image_size, require_label)


def audio_features(model, splits: dict, decoder: ImageDecoder, cfg, device, manifest, name: str) -> dict[str, Features]:
    return {
        split: extract_features(model, urls, decoder, cfg.eval.batch_size, cfg.eval.loader_workers, device, desc=f"{name} {split}",
                                total=manifest["splits"][split]["count"], bad_samples=BadSamples.for_config(cfg.data), field="audio")
        for split, urls in splits.items()
    }


@torch.no_grad()
def evaluate_audio_visual(task, cfg, splits: dict, manifest: dict, image_test: Features, device, score) -> dict:
    """`image_test`: the pretrained backbone's test features (sorted by key, as extract_features
    returns them); `score(train, test, cfg)` is the eval stage's kNN + linear scorer."""
    decoder = audio_decoder(manifest, cfg, require_label=True)
    task = task.to(device).eval()
    rows, features = {}, {}
    features["pretrained_audio"] = audio_features(task.audio_feature_extractor(), splits, decoder, cfg, device, manifest, "audio")
    if "random_init" in cfg.eval.baselines:
        from models.audio import create_audio_encoder

        torch.manual_seed(cfg.train.seed)
        random_audio = create_audio_encoder(**task.audio_feature_extractor().options())
        features["random_init_audio"] = audio_features(random_audio, splits, decoder, cfg, device, manifest, "random-init audio")
    for name, by_split in features.items():
        rows[name] = score(by_split[cfg.data.train_split], by_split[cfg.data.test_split], cfg)
        log.info("%s: %s", name, {k: v for k, v in rows[name].items() if k != "linear_val_accuracy"})

    audio_test = features["pretrained_audio"][cfg.data.test_split]
    if image_test.keys != audio_test.keys:
        raise ValueError("image and audio features of the test split are not paired sample by sample (a bad sample skipped in one pass only?)")
    clips = [clip_of(k) for k in audio_test.keys]
    codes = torch.tensor([clip_code(c) for c in clips])
    scores = task.cross_modal_scores(image_test.features.to(device), audio_test.features.to(device)).cpu()
    result = {"rows": rows, "retrieval": cross_modal_retrieval_from_scores(scores, codes), "test_clips": len(set(clips))}
    if hasattr(task, "correspondence_accuracy"):
        result["correspondence_accuracy"] = task.correspondence_accuracy(image_test.features.to(device), audio_test.features.to(device),
                                                                         codes.to(device))
    return result


def cross_modal_retrieval_from_scores(scores: torch.Tensor, groups: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """Recall@K from a (queries = images, items = audio) score matrix, both directions; a hit is
    any audio (image) of the query's clip."""
    out = {}
    for direction, matrix in (("image_to_audio", scores), ("audio_to_image", scores.T)):
        ranks = ranks_from_scores(matrix, groups)
        out[direction] = {f"R@{k}": float((ranks < k).float().mean()) for k in ks}
    candidates = len(torch.unique(groups))
    out["chance"] = {f"R@{k}": min(1.0, k / candidates) for k in ks}
    out["queries"] = int(scores.shape[0])
    return out

