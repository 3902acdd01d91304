"""Writing datasets as WebDataset tar shards plus a manifest (counts, classes, shards, checksums),
and finding them again: a local (or NFS) folder, or a URL (http(s)://, s3://, any fsspec protocol)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.storage import MANIFEST, ShardUrl, describe_error, display_url, is_url, join_url, manifest_location, open_url
from tqdm import tqdm



@dataclass
class Sample:
    key: str  # stable, unique, no dots (WebDataset splits extensions at the first dot)
    image: bytes  # encoded image file
    ext: str  # png, jpg, ...
    label: int | None
    source: str = ""  # where the image came from, for error messages
    extra: dict[str, bytes] = field(default_factory=dict)  # more entries by extension: "wav", "json" (audio-visual samples)


@dataclass
class ChannelStats:
    """Running per-channel mean and std of pixel values in [0, 1]."""

    total: np.ndarray = field(default_factory=lambda: np.zeros(0))
    total_sq: np.ndarray = field(default_factory=lambda: np.zeros(0))
    count: int = 0

    def add(self, pixels: np.ndarray) -> None:  # (H, W, C) float in [0, 1]
        flat = pixels.reshape(-1, pixels.shape[-1]).astype(np.float64)
        if self.count == 0:
            self.total, self.total_sq = np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
        self.total += flat.sum(0)
        self.total_sq += (flat**2).sum(0)
        self.count += flat.shape[0]

    def mean_std(self) -> tuple[list[float], list[float]]:
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.total_sq / self.count - mean**2, 1e-12))
        return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


SHARD_MTIME = 1_700_000_000  # 2023-11-14, any fixed integer will do


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_wav(pcm: np.ndarray, sample_rate: int) -> bytes:
    """Mono 16-bit PCM samples (int16) as a .wav file."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(np.asarray(pcm, dtype="<i2").tobytes())
    return buffer.getvalue()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Shard sizing when the caller does not fix it (samples_per_shard=0): enough shards per split for
# many Ray workers x loader workers to each get their own (a 1,797-image folder written as one
# 5,000-sample shard could not train on the default 2 workers), at most MAX_SAMPLES_PER_SHARD each.
MIN_SHARDS_PER_SPLIT = 16
MAX_SAMPLES_PER_SHARD = 5000


def auto_samples_per_shard(total: int) -> int:
    """Samples per shard for a split of `total` samples (0: unknown in advance): MIN_SHARDS_PER_SPLIT
    shards where the data allows, none larger than MAX_SAMPLES_PER_SHARD."""
    if total <= 0:
        return MAX_SAMPLES_PER_SHARD
    return max(1, min(MAX_SAMPLES_PER_SHARD, -(-total // MIN_SHARDS_PER_SPLIT)))


def write_split(
    samples: Iterable[Sample],
    out_dir: Path,
    split: str,
    total: int,
    mode: str,
    samples_per_shard: int = 0,
    audio: dict | None = None,
    progress: bool = True,
) -> dict:
    """Writes one split as `<split>-000000.tar`, ... and returns its manifest entry.
    `samples_per_shard` 0 sizes shards from `total` (`auto_samples_per_shard`).

    `audio` (the manifest's {"sample_rate", "samples"}) marks an audio-visual dataset: each sample
    must then carry an audio entry of exactly that rate and length in `Sample.extra`, checked here
    like the image. `progress=False` hides the per-sample bar (for callers that show their own).

    Every image is decoded once while writing: a file that does not decode fails here, named, not
    in the middle of a training run; the decoded pixels also give the split's channel statistics.
    Each shard is written under a temporary name and renamed when complete, so an interrupted write
    never leaves a truncated shard that looks finished.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_per_shard = samples_per_shard or auto_samples_per_shard(total)
    shards: list[dict] = []
    stats = ChannelStats()
    sizes: set[tuple[int, int]] = set()
    labelled = 0
    writer, partial, count = None, None, 0

    def close() -> None:
        writer.close()
        final = partial.with_suffix("")  # drop ".partial"
        os.replace(partial, final)
        shards.append({"file": final.name, "count": count, "sha256": sha256(final)})

    for sample in tqdm(samples, total=total, desc=f"writing {split} shards", unit="img", mininterval=1.0, disable=not progress):
        if writer is None or count == samples_per_shard:
            if writer is not None:
                close()
            partial = out_dir / f"{split}-{len(shards):06d}.tar.partial"
            # An integer mtime: WebDataset's default (time.time(), a float) makes tarfile add a PAX
            # header to every member, which doubled shard size and halved read speed (bench/loader_speed.py).
            # A fixed one also makes shards byte-for-byte reproducible (same sha256 on every rewrite).
            writer, count = wds.TarWriter(str(partial), mtime=SHARD_MTIME), 0
        try:
            with Image.open(io.BytesIO(sample.image)) as img:
                pixels = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
        except Exception as err:
            raise ValueError(f"sample {sample.key!r}{f' ({sample.source})' if sample.source else ''}: image does not decode ({err})") from err
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels
        stats.add(pixels)
        sizes.add(pixels.shape[:2])
        if audio:
            check_audio(sample, audio)
        record = {"__key__": sample.key, sample.ext: sample.image, **sample.extra}
        if sample.label is not None:
            record["cls"] = str(int(sample.label)).encode()
            labelled += 1
        writer.write(record)
        count += 1
    if writer is None:
        raise ValueError(f"split {split!r} has no samples")
    close()
    mean, std = stats.mean_std()
    return {
        "count": sum(s["count"] for s in shards),
        "labelled": labelled,
        "image_size": list(next(iter(sizes))) if len(sizes) == 1 else None,
        "mean": mean,
        "std": std,
        "shards": shards,
    }


def check_audio(sample: Sample, audio: dict) -> None:
    """Decodes the sample's audio entry as the loader will: a bad one fails the write, named."""
    from pipeline.data import AUDIO_EXTS, decode_audio  # lazy: data.py imports torch

    ext = next((ext for ext in AUDIO_EXTS if ext in sample.extra), None)
    where = f"sample {sample.key!r}{f' ({sample.source})' if sample.source else ''}"
    if ext is None:
        raise ValueError(f"{where}: no audio entry (one of {list(AUDIO_EXTS)}) in an audio-visual dataset")
    try:
        decode_audio(sample.extra[ext], ext, audio["sample_rate"], audio["samples"])
    except ValueError as err:
        raise ValueError(f"{where}: {ext} audio {err}") from err


def write_manifest(out_dir: Path, name: str, classes: list[str], mode: str, splits: dict[str, dict],
                   audio: dict | None = None) -> Path:
    """`audio`: {"sample_rate", "samples"} of every sample's audio window (audio-visual datasets only)."""
    manifest = {"name": name, "format": "sslpipe-shards/1", "mode": mode, "channels": len(mode),
                "classes": classes, "num_classes": len(classes), "splits": splits}
    if audio:
        manifest["audio"] = {"sample_rate": int(audio["sample_rate"]), "samples": int(audio["samples"])}
    path = out_dir / MANIFEST
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)
    return path


def read_manifest(root: str | Path) -> dict:
    if is_url(root):
        return read_remote_manifest(str(root))
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST} in {str(root)!r}: write shards first, e.g. `sslpipe data fashion-mnist --out {root}`"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def read_remote_manifest(root: str) -> dict:
    url = join_url(root, MANIFEST)
    try:
        with open_url(url) as f:
            text = f.read()
        failure = None
    except Exception as err:
        reason = describe_error(err, url)
        failure = (FileNotFoundError(f"no {MANIFEST} at {display_url(url)!r}: upload the whole folder `sslpipe data` wrote "
                                     f"({MANIFEST} and the .tar shards) under {display_url(root)!r}")
                   if reason == "not found" else OSError(f"cannot read {display_url(url)!r}: {reason}"))
    if failure is not None:
        raise failure  # outside the except block: the original, which may quote credentials, is not chained
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{display_url(url)}: not valid JSON ({err})") from err


def split_urls(root: str | Path, manifest: dict, split: str) -> list[str]:
    """The split's shard URLs (local paths or URLs under `root`), each carrying its manifest count (`ShardUrl`)."""
    if split not in manifest["splits"]:
        raise KeyError(f"split {split!r} is not in {manifest_location(root)}; available: {sorted(manifest['splits'])}")
    shards = manifest["splits"][split]["shards"]
    place = (lambda file: join_url(str(root), file)) if is_url(root) else (lambda file: str(Path(root) / file))
    return [ShardUrl(place(shard["file"]), shard.get("count")) for shard in shards]


def fashion_mnist_samples(images: np.ndarray, labels: np.ndarray, split: str) -> Iterator[Sample]:
    for index, (image, label) in enumerate(zip(images, labels)):
        yield Sample(f"{split}_{index:06d}", encode_png(image), "png", int(label))
