"""Writing datasets as WebDataset tar shards plus a manifest (counts, classes, shards, checksums),
and finding them again: a local (or NFS) folder, or a URL (http(s)://, s3://, any fsspec protocol)."""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import multiprocessing
import os
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipeline.data.audio import AUDIO_EXTS, decode_audio
from pipeline.data.storage import (
    MANIFEST,
    ShardUrl,
    describe_error,
    display_url,
    is_url,
    join_url,
    manifest_location,
    open_url,
)


@dataclass
class Sample:
    key: str  # stable, unique, no dots (WebDataset splits extensions at the first dot)
    image: bytes  # encoded image file
    ext: str  # png, jpg, ...
    label: int | None
    source: str = ""  # where the image came from, for error messages
    extra: dict[str, bytes] = field(default_factory=dict)  # more entries by extension: "wav", "json" (audio-visual samples)
    # The decoded image (uint8, in the dataset's mode) when the writer encoded `image` itself from
    # it: write_shard then takes the statistics from it and skips decoding its own PNG again.
    pixels: np.ndarray | None = None


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

    def merge(self, other: "ChannelStats") -> None:
        if other.count == 0:
            return
        if self.count == 0:
            self.total, self.total_sq = np.zeros_like(other.total), np.zeros_like(other.total_sq)
        self.total += other.total
        self.total_sq += other.total_sq
        self.count += other.count

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


class SampleSource(Protocol):
    """Samples by position: `samples(start, stop)` makes the samples at positions [start, stop) on
    its own, so that each process of a pool can build the shards it writes (`write_split(workers=N)`),
    encoding included, from a picklable description instead of a stream the parent must produce."""

    def __len__(self) -> int: ...

    def samples(self, start: int, stop: int) -> Iterator[Sample]: ...


@dataclass
class ShardPart:
    """One written shard: its manifest entry and what the split's entry sums over shards."""

    entry: dict  # {"file", "count", "sha256"}
    stats: ChannelStats
    sizes: set[tuple[int, int]]
    labelled: int


def write_shard(samples: Iterable[Sample], final: Path, mode: str, audio: dict | None = None) -> ShardPart | None:
    """Writes `samples` as the shard `final` (None when there are none) under a temporary name,
    renamed when complete, so an interrupted write never leaves a truncated shard that looks finished.

    Every image is decoded once while writing: a file that does not decode fails here, named, not
    in the middle of a training run; the decoded pixels also give the channel statistics."""
    partial = final.with_name(final.name + ".partial")
    stats, sizes, labelled, count = ChannelStats(), set(), 0, 0
    writer = None
    for sample in samples:
        if writer is None:
            # An integer mtime: WebDataset's default (time.time(), a float) makes tarfile add a PAX
            # header to every member, which doubled shard size and halved read speed (bench/loader_speed.py).
            # A fixed one also makes shards byte-for-byte reproducible (same sha256 on every rewrite).
            writer = wds.TarWriter(str(partial), mtime=SHARD_MTIME)
        if sample.pixels is not None:
            pixels = sample.pixels.astype(np.float32) / 255.0
        else:
            try:
                with Image.open(io.BytesIO(sample.image)) as img:
                    pixels = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
            except Exception as err:
                writer.close()
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
        return None
    writer.close()
    os.replace(partial, final)
    return ShardPart({"file": final.name, "count": count, "sha256": sha256(final)}, stats, sizes, labelled)


# What a pool process writes from: set once per process by the pool's initializer, so the source
# (Fashion-MNIST's 47 MB of pixels) is not sent again with every shard.
_pool_source: SampleSource | None = None


def _set_pool_source(source: SampleSource) -> None:
    global _pool_source
    _pool_source = source


def _write_source_shard(job: tuple[int, int, Path, str, dict | None]) -> ShardPart | None:
    start, stop, final, mode, audio = job
    return write_shard(_pool_source.samples(start, stop), final, mode, audio)


def write_split(
    samples: Iterable[Sample] | SampleSource,
    out_dir: Path,
    split: str,
    total: int,
    mode: str,
    samples_per_shard: int = 0,
    audio: dict | None = None,
    progress: bool = True,
    workers: int = 1,
) -> dict:
    """Writes one split as `<split>-000000.tar`, ... (`write_shard` each) and returns its manifest
    entry. `samples_per_shard` 0 sizes shards from `total` (`auto_samples_per_shard`).

    `samples` is a stream, or a `SampleSource` (then `total` is its length); with a source,
    `workers` > 1 writes its shards in a process pool. The bytes are the same for any number of
    workers: shard k holds positions [k*n, (k+1)*n) either way, and the split's statistics are
    summed per shard in shard order.

    `audio` (the manifest's {"sample_rate", "samples"}) marks an audio-visual dataset: each sample
    must then carry an audio entry of exactly that rate and length in `Sample.extra`, checked here
    like the image. `progress=False` hides the per-sample bar (for callers that show their own).
    """
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be at least 1")
    is_source = hasattr(samples, "samples") and hasattr(samples, "__len__")
    if workers > 1 and not is_source:
        raise ValueError("write_split(workers > 1) needs a SampleSource, not a stream of samples")
    total = len(samples) if is_source else total
    out_dir.mkdir(parents=True, exist_ok=True)
    per_shard = samples_per_shard or auto_samples_per_shard(total)
    bar = tqdm(total=total or None, desc=f"writing {split} shards", unit="img", mininterval=1.0, disable=not progress)

    def path(index: int) -> Path:
        return out_dir / f"{split}-{index:06d}.tar"

    parts: list[ShardPart] = []
    if is_source:
        jobs = [(start, min(start + per_shard, total), path(k), mode, audio) for k, start in enumerate(range(0, total, per_shard))]
        if workers > 1 and len(jobs) > 1:
            # Ordered results (imap): the manifest lists shards in order whatever finishes first.
            with multiprocessing.Pool(min(workers, len(jobs)), initializer=_set_pool_source, initargs=(samples,)) as pool:
                for part in pool.imap(_write_source_shard, jobs):
                    parts.append(part)
                    bar.update(part.entry["count"])
        else:
            for start, stop, final, _, _ in jobs:
                parts.append(write_shard(samples.samples(start, stop), final, mode, audio))
                bar.update(parts[-1].entry["count"])
    else:
        stream = iter(samples)

        def counted(chunk: Iterable[Sample]) -> Iterator[Sample]:
            for sample in chunk:
                yield sample
                bar.update(1)

        while True:
            part = write_shard(counted(itertools.islice(stream, per_shard)), path(len(parts)), mode, audio)
            if part is None:
                break
            parts.append(part)
    bar.close()
    if not parts:
        raise ValueError(f"split {split!r} has no samples")
    stats, sizes = ChannelStats(), set()
    for part in parts:
        stats.merge(part.stats)
        sizes |= part.sizes
    mean, std = stats.mean_std()
    return {
        "count": sum(p.entry["count"] for p in parts),
        "labelled": sum(p.labelled for p in parts),
        "image_size": list(next(iter(sizes))) if len(sizes) == 1 else None,
        "mean": mean,
        "std": std,
        "shards": [p.entry for p in parts],
    }


def check_audio(sample: Sample, audio: dict) -> None:
    """Decodes the sample's audio entry as the loader will: a bad one fails the write, named."""
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
    return ImageArraySource(images, labels, split).samples(0, len(images))


@dataclass
class ImageArraySource:
    """A SampleSource of uint8 pixel arrays and their labels, encoded as PNG when written:
    Fashion-MNIST, scikit-learn's digits. Grayscale only ((N, H, W), mode "L"): the arrays are the
    decoded pixels the writer's statistics come from."""

    images: np.ndarray
    labels: np.ndarray
    split: str

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.images.dtype != np.uint8 or len(self.images) != len(self.labels):
            raise ValueError(f"ImageArraySource({self.split!r}): needs (N, H, W) uint8 images and N labels, got "
                             f"{self.images.dtype} {self.images.shape} and {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def samples(self, start: int, stop: int) -> Iterator[Sample]:
        for index in range(start, stop):
            image = self.images[index]
            yield Sample(f"{self.split}_{index:06d}", encode_png(image), "png", int(self.labels[index]), pixels=image)
