"""Shared fixtures: small synthetic shards made on the fly (no data is committed), one Ray instance."""
from __future__ import annotations

import gzip
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.shards import Sample, encode_png, write_manifest, write_split

# Small, asymmetric glyphs (so rotations are distinguishable), one per class.
GLYPHS = [
    np.array([[1, 0, 0], [1, 0, 0], [1, 1, 1]]),  # L
    np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]]),  # F-like
    np.array([[1, 1, 0], [0, 1, 0], [0, 1, 1]]),  # S-like
    np.array([[1, 1, 1], [0, 1, 0], [0, 1, 0]]),  # T
]
# The baseline cache (eval/baseline_cache.py) of a test session lives and dies with it: no test reads
# a user's cache or leaves entries in it. Set at import, so Ray workers started by tests inherit it.
os.environ["SSLPIPE_CACHE"] = tempfile.mkdtemp(prefix="sslpipe-test-cache-")

TINY_BACKBONE = {"backbone": "resnet18", "backbone_kwargs": {"channels": [8, 16, 32, 64]}}


def synthetic_images(count: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(count, size, size) uint8 glyph images on noise and their class labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(GLYPHS), count)
    images = rng.integers(0, 40, (count, size, size)).astype(np.uint8)
    scale = size // 4
    for image, label in zip(images, labels):
        glyph = np.kron(GLYPHS[label], np.ones((scale, scale), dtype=np.int64)) * 215
        y, x = rng.integers(0, size - glyph.shape[0] + 1, 2)
        image[y : y + glyph.shape[0], x : x + glyph.shape[1]] += glyph.astype(np.uint8)
    return images, labels


def write_synthetic_shards(root: Path, train: int = 96, test: int = 48, per_shard: int = 16, size: int = 16) -> Path:
    splits = {}
    for split, count, seed in (("train", train, 0), ("test", test, 1)):
        images, labels = synthetic_images(count, size, seed)
        samples = (Sample(f"{split}_{i:05d}", encode_png(img), "png", int(lab)) for i, (img, lab) in enumerate(zip(images, labels)))
        splits[split] = write_split(samples, root, split, count, "L", per_shard)
    write_manifest(root, "synthetic-glyphs", ["L", "F", "S", "T"], "L", splits)
    return root


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """96 train / 48 test 16x16 glyph images, 16 per shard (6 + 3 shards)."""
    return write_synthetic_shards(tmp_path_factory.mktemp("shards"))


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def fake_fashion_mnist(tmp_path_factory) -> Path:
    """The four Fashion-MNIST idx .gz files, with a few synthetic 28x28 images each."""
    folder = tmp_path_factory.mktemp("fmnist-src")
    for prefix, count, seed in (("train", 30, 0), ("t10k", 10, 1)):
        images, labels = synthetic_images(count, 28, seed)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One private Ray instance for every Ray test (starting Ray costs seconds, Train runs ~20 s more)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(address="local", num_cpus=2)
    yield ray
    ray.shutdown()
