"""Readers for raw datasets that `sslpipe data` turns into shards."""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp", ".bmp": "bmp", ".tif": "tiff", ".tiff": "tiff"}


class DatasetNotFoundError(FileNotFoundError):
    pass


def fashion_mnist_candidates(src: str | None) -> list[Path]:
    """Where Fashion-MNIST is looked for, in order: --src, $FASHION_MNIST_DIR, ../shared, Debian's package."""
    candidates = []
    if src:
        candidates.append(Path(src))
    if os.environ.get("FASHION_MNIST_DIR"):
        candidates.append(Path(os.environ["FASHION_MNIST_DIR"]))
    candidates += [Path("../shared/data/fashion-mnist"), Path("/usr/share/datasets/fashion-mnist")]
    return candidates


def find_fashion_mnist(src: str | None = None) -> Path:
    candidates = fashion_mnist_candidates(src)
    needed = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    for folder in candidates:
        if all((folder / name).is_file() for name in needed):
            return folder
    looked = "\n".join(f"  - {folder.resolve()}" for folder in candidates)
    raise DatasetNotFoundError(
        "Fashion-MNIST not found. Looked for " + ", ".join(needed) + " in:\n" + looked + "\n"
        "Get it with `sudo apt-get install dataset-fashion-mnist` (Debian; installs to "
        "/usr/share/datasets/fashion-mnist), or put the four idx .gz files from the Fashion-MNIST "
        "release in a folder and pass --src DIR or set FASHION_MNIST_DIR."
    )


def read_idx(path: Path) -> np.ndarray:
    """Reads a gzipped IDX file (the MNIST format: magic, dims, big-endian uint8 payload)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values for shape {shape}, found {payload.size}")
    return payload.reshape(shape)


def load_fashion_mnist(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = FASHION_MNIST_FILES[split]
    images, labels = read_idx(folder / images_name), read_idx(folder / labels_name)
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {split} has {len(images)} images but {len(labels)} labels")
    return images, labels  # (N, 28, 28) uint8, (N,) uint8


@dataclass
class FolderItem:
    path: Path
    label: int | None


def scan_image_folder(root: Path) -> tuple[dict[str, list[FolderItem]], list[str]]:
    """Lists images under `root` by split.

    Layouts: `root/<split>/<class>/img` (splits train/val/test), `root/<class>/img` (one split
    "train"), or `root/img` (one unlabelled split "train"). Classes are sorted subfolder names.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    split_dirs = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}
    if not split_dirs:
        split_dirs = {"train": root}
    classes = sorted({d.name for folder in split_dirs.values() for d in folder.iterdir() if d.is_dir()})
    splits: dict[str, list[FolderItem]] = {}
    for split, folder in split_dirs.items():
        items = [FolderItem(p, None) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        for label, name in enumerate(classes):
            class_dir = folder / name
            if class_dir.is_dir():
                items += [
                    FolderItem(p, label)
                    for p in sorted(class_dir.rglob("*"))
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                ]
        if classes and any(item.label is None for item in items):
            loose = next(item.path for item in items if item.label is None)
            raise ValueError(f"{loose}: image outside any class folder while {folder} has class folders {classes}")
        if not items:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {folder}")
        splits[split] = items
    return splits, classes


def iter_folder_bytes(items: list[FolderItem]) -> Iterator[tuple[bytes, str, int | None, str]]:
    for item in items:
        yield item.path.read_bytes(), IMAGE_SUFFIXES[item.path.suffix.lower()], item.label, str(item.path)
