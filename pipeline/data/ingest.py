"""`sslpipe data ...`: raw datasets in, WebDataset shards and a manifest out."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline.data.shards import ImageArraySource, Sample, write_manifest, write_split
from pipeline.data.sources import (
    FASHION_MNIST_CLASSES,
    FolderItem,
    find_fashion_mnist,
    iter_folder_bytes,
    load_fashion_mnist,
    scan_image_folder,
)

log = logging.getLogger("sslpipe.data")


def write_fashion_mnist(out: str | Path, src: str | None = None, samples_per_shard: int = 0, workers: int = 1) -> Path:
    """Fashion-MNIST (60k train, 10k test, 28x28 grayscale) as PNG + class-label shards; `workers`
    processes write them (the same bytes for any number)."""
    folder = find_fashion_mnist(src)
    log.info("reading Fashion-MNIST from %s", folder.resolve())
    out = Path(out)
    splits = {}
    for split in ("train", "test"):
        images, labels = load_fashion_mnist(folder, split)
        splits[split] = write_split(ImageArraySource(images, labels, split), out, split, len(images), "L", samples_per_shard,
                                    workers=workers)
    return write_manifest(out, "fashion-mnist", FASHION_MNIST_CLASSES, "L", splits)


@dataclass
class FolderSource:
    """A SampleSource of image files, read (not re-encoded) when written."""

    items: list[FolderItem]
    split: str

    def __len__(self) -> int:
        return len(self.items)

    def samples(self, start: int, stop: int) -> Iterator[Sample]:
        for index, (data, ext, label, source) in enumerate(iter_folder_bytes(self.items[start:stop]), start):
            yield Sample(f"{self.split}_{index:07d}", data, ext, label, source)


def write_image_folder(path: str | Path, out: str | Path, mode: str = "RGB", samples_per_shard: int = 0, workers: int = 1) -> Path:
    """A class-per-subfolder image tree (labels optional) as shards, keeping the original encoded bytes."""
    if mode not in ("L", "RGB"):
        raise ValueError(f"--mode {mode!r}: choose from ['L', 'RGB']")
    splits_items, classes = scan_image_folder(Path(path))
    out = Path(out)
    splits = {}
    for split, items in splits_items.items():
        splits[split] = write_split(FolderSource(items, split), out, split, len(items), mode, samples_per_shard, workers=workers)
    return write_manifest(out, Path(path).resolve().name, classes, mode, splits)


def write_digits(out: str | Path, test_fraction: float = 0.3, seed: int = 0, samples_per_shard: int = 0, workers: int = 1) -> Path:
    """scikit-learn's handwritten digits (1,797 images of 8x8, 17 grey levels, 10 classes; shipped
    with scikit-learn, no download) as train/test shards: a small second dataset to score transfer
    on (`sslpipe eval RUN --data-root DIR`: the run's decoder resizes them to its input size).
    The split is stratified and seeded, so the same shards come out every time."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"--test-fraction={test_fraction} must be in (0, 1)")
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    index = np.arange(len(images))
    train, test = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=digits.target)
    out = Path(out)
    splits = {}
    for split, rows in (("train", np.sort(train)), ("test", np.sort(test))):
        splits[split] = write_split(ImageArraySource(images[rows], digits.target[rows], split), out, split, len(rows), "L",
                                    samples_per_shard, workers=workers)
    return write_manifest(out, "sklearn-digits", [str(d) for d in range(10)], "L", splits)
