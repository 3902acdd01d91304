"""Frozen-feature extraction: every sample of a split exactly once, in pooled backbone features."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.data.bad_samples import BadSamples
from pipeline.data.decode import ImageDecoder
from pipeline.data.streaming import eval_loader

log = logging.getLogger("sslpipe.eval")


@dataclass
class Features:
    features: Tensor  # (N, D) float32
    labels: Tensor  # (N,) int64, -1 where a sample has no label
    keys: list[str]

    def sorted_by_key(self) -> "Features":
        """Loader workers interleave shards; sorting by key makes the order reproducible."""
        order = sorted(range(len(self.keys)), key=self.keys.__getitem__)
        index = torch.tensor(order, dtype=torch.long)
        return Features(self.features[index], self.labels[index], [self.keys[i] for i in order])


@torch.no_grad()
def extract_features(
    model: nn.Module | None,
    urls: list[str],
    decoder: ImageDecoder,
    batch_size: int = 512,
    loader_workers: int = 1,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    desc: str = "features",
    total: int | None = None,
    bad_samples: BadSamples | None = None,
    field: str = "image",
) -> Features:
    """Pooled features of `model` (None: the normalized pixels, flattened) for this rank's samples;
    `field="audio"` feeds the waveforms of an audio-visual dataset instead of the frames."""
    device = torch.device(device)
    if model is not None:
        model.eval().to(device)
    loader = eval_loader(urls, rank, world_size, decoder, batch_size, loader_workers, pin_memory=device.type == "cuda",
                         bad_samples=bad_samples, field=field)
    chunks, labels, keys = [], [], []
    with tqdm(total=total, desc=desc, unit="img", mininterval=2.0) as progress:
        for images, batch_labels, batch_keys in loader:
            if model is None:
                output = images.flatten(1)
            else:
                with torch.autocast(device.type, enabled=device.type == "cuda"):
                    output = model(images.to(device, non_blocking=True))
            chunks.append(output.float().cpu())
            labels.append(torch.as_tensor(batch_labels))
            keys.extend(batch_keys)
            progress.update(len(batch_keys))
    counts = loader.bad_samples.counts()
    if counts["bad_samples"] or counts["bad_shards"]:
        log.warning("%s: %s", desc, loader.bad_samples.summary())
    if not chunks:
        return Features(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), [])
    return Features(torch.cat(chunks), torch.cat(labels).long(), keys).sorted_by_key()
