"""Streaming WebDataset shards into batches, split over Ray workers (ranks) and loader workers.

Training streams each rank's own shards forever, reshuffled every pass; evaluation reads every
sample exactly once (no resampling, disjoint shards per rank and loader worker, a partial last batch).
Samples are decoded by `ImageDecoder`, which accepts image files and integer labels only (plus, for
audio-visual datasets, PCM audio and a JSON record), so nothing in a shard can run code (WebDataset's
default decoders unpickle `.pyd` entries).
Shards are local files (or `pipe:` commands, when allowed) or URLs that fsspec reads: http(s)://,
s3:// and any other installed protocol (`read_shards`).
"""
from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import multiprocessing
import random
import wave
from pathlib import Path
from typing import Callable, Iterator

import fsspec
import numpy as np
import torch
import torch.utils.data
import webdataset as wds
from PIL import Image
from torchvision.io import decode_png

from pipeline.data.storage import display_url, opens_with_fsspec, read_shards

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "tiff")
LABEL_EXTS = ("cls", "label")
AUDIO_EXTS = ("wav", "npy")
UNSAFE_EXTS = ("pyd", "pickle", "pkl", "pth", "pt")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


log = logging.getLogger("sslpipe.data")


class ShardError(RuntimeError):
    """A shard cannot be read or holds a bad sample; the message names shard and key."""


def add(counter, amount: int) -> int:
    """Adds to a shared multiprocessing counter under its lock; returns the new value."""
    with counter.get_lock():
        counter.value += amount
        return counter.value


class BadSamples:
    """The bad-input policy, with counts shared by all loader worker processes of one loader.

    Default: a sample that cannot be used (image that does not decode, zero bytes, no image, no
    or out-of-range label where labels are needed, pickled entries) is skipped with a warning
    naming shard and key, and a truncated or unreadable shard is skipped from the point it
    breaks; the loader aborts with ShardError once more than `max_fraction` of the samples seen
    (after `min_seen`) were bad. `strict` raises on the first bad sample or shard instead.
    """

    def __init__(self, strict: bool = False, max_fraction: float = 0.01, min_seen: int = 100):
        self.strict, self.max_fraction, self.min_seen = strict, max_fraction, min_seen
        self.max_unreadable_shards = 20
        # Shared memory: DataLoader workers inherit these, so the counts cover every worker.
        self.seen = multiprocessing.Value("q", 0)
        self.bad = multiprocessing.Value("q", 0)
        self.bad_shards = multiprocessing.Value("q", 0)
        self.short = multiprocessing.Value("q", 0)  # samples missing from shards read short (also in bad)
        self.failed_in_a_row = multiprocessing.Value("q", 0)  # shard reads failed since the last good sample

    @classmethod
    def for_config(cls, data_cfg) -> "BadSamples":
        """The policy a run's `data` section sets (strict, max_bad_fraction)."""
        return cls(data_cfg.strict, data_cfg.max_bad_fraction)

    def counts(self) -> dict[str, int]:
        return {"seen": self.seen.value, "bad_samples": self.bad.value, "bad_shards": self.bad_shards.value,
                "missing_samples": self.short.value}

    def summary(self) -> str:
        c = self.counts()
        missing = f" ({c['missing_samples']} sample(s) missing from shards shorter than their manifest count)" if c["missing_samples"] else ""
        return f"{c['bad_samples']} bad sample(s) skipped of {c['seen']} read, {c['bad_shards']} shard(s) cut short{missing}"

    def sample_failed(self, err: ShardError) -> None:
        if self.strict:
            raise err
        bad = add(self.bad, 1)
        log.warning("skipping bad sample (%d so far): %s", bad, err)
        self.check_fraction(err)

    def check_fraction(self, last) -> None:
        """Raises once more than max_fraction of the samples seen (after min_seen) were bad or missing."""
        bad, seen = self.bad.value, max(self.seen.value, 1)
        if seen >= self.min_seen and bad / seen > self.max_fraction:
            raise ShardError(f"{bad} of {seen} samples were bad or missing, more than data.max_bad_fraction={self.max_fraction} "
                             f"(last: {last}); fix the shards or raise the fraction")

    def shard_failed(self, exn: Exception) -> bool:
        """WebDataset handler for shard-level errors (truncated tar, unreadable file)."""
        if self.strict:
            raise_with_shard(exn)
        bad_shards, in_a_row = add(self.bad_shards, 1), add(self.failed_in_a_row, 1)
        url = next((a for a in reversed(exn.args[1:]) if isinstance(a, str)), "?")
        message = exn.args[0] if exn.args else repr(exn)
        # The training stream repeats its shards forever: without these it would retry forever when
        # no shard was ever readable, or when every shard stopped being readable mid-run (storage gone).
        if self.seen.value == 0 and bad_shards >= self.max_unreadable_shards:
            raise ShardError(f"{bad_shards} shard reads failed and not one sample was read (last: shard {url}: {message})")
        if in_a_row >= self.max_unreadable_shards:
            raise ShardError(f"{in_a_row} shard reads in a row failed, with no good sample between them (last: shard {url}: "
                             f"{message}); is the storage gone?")
        log.warning("shard %s: %s; skipping the rest of this shard", url, message)
        return True  # go on with the next shard

    def shard_short(self, url: str, read: int, listed: int) -> None:
        """A shard ended cleanly after `read` of the `listed` samples its manifest lists (a truncated
        file): warned and counted (the missing samples count as bad toward max_fraction), or raised when strict."""
        message = f"shard {url}: read {read} of {listed} samples its manifest lists; the file is cut short (truncated download or copy?)"
        if self.strict:
            raise ShardError(message)
        missing = listed - read
        for counter, amount in ((self.bad_shards, 1), (self.short, missing), (self.seen, missing), (self.bad, missing)):
            add(counter, amount)
        log.warning("%s; going on without the missing %d", message, missing)
        self.check_fraction(message)

    def decode(self, decoder: "ImageDecoder") -> "GuardedDecoder":
        return GuardedDecoder(decoder, self)


class GuardedDecoder:
    """Runs the decoder under the policy: a bad sample becomes None (dropped by `is_sample`)."""

    def __init__(self, decoder: "ImageDecoder", policy: BadSamples):
        self.decoder, self.policy = decoder, policy

    def __call__(self, sample: dict) -> dict | None:
        with self.policy.seen.get_lock():
            self.policy.seen.value += 1
        try:
            decoded = self.decoder(sample)
        except ShardError as err:
            self.policy.sample_failed(err)
            return None
        if self.policy.failed_in_a_row.value:
            self.policy.failed_in_a_row.value = 0
        return decoded


def is_sample(sample) -> bool:
    return sample is not None


def check_urls(urls: list[str], allow_shell_urls: bool = False) -> list[str]:
    """Checks without touching the network: local shards exist, `pipe:` is allowed, and fsspec
    knows each URL's protocol (its package, e.g. s3fs for s3://, is installed)."""
    if not urls:
        raise ShardError("the shard list is empty")
    protocols = set()
    for url in urls:
        if url.lower().startswith("pipe:") and not allow_shell_urls:
            raise ShardError(f"shard URL {url!r} runs a shell command; pass --allow-shell-urls (data.allow_shell_urls=true) to allow it")
        if opens_with_fsspec(url):
            protocol = url.split("://", 1)[0].lower()
            if protocol not in protocols:
                try:
                    fsspec.get_filesystem_class(protocol)
                except (ValueError, ImportError) as err:
                    raise ShardError(f"shard {display_url(url)!r}: cannot read {protocol}:// URLs ({err})") from None
                protocols.add(protocol)
        elif "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
            raise ShardError(f"shard {url!r} does not exist")
    return urls


def worker_slot() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class EvalShards(torch.utils.data.IterableDataset):
    """Every shard once: rank r takes urls[r::world], loader worker w takes every w-th of those."""

    def __init__(self, urls: list[str], rank: int, world_size: int):
        self.urls, self.rank, self.world_size = list(urls), rank, world_size

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = worker_slot()
        for url in self.urls[self.rank :: self.world_size][worker::num_workers]:
            yield {"url": url}


class TrainShards(torch.utils.data.IterableDataset):
    """The rank's shards, endlessly, in a new order each pass (seeded by seed, rank and pass).

    Loader workers split the rank's shards when there are enough to go round; otherwise each
    worker reads all of them in its own order (the shuffle buffer mixes samples either way).
    """

    def __init__(self, urls: list[str], rank: int, world_size: int, seed: int):
        self.rank_urls = list(urls)[rank::world_size]
        if not self.rank_urls:
            raise ShardError(f"rank {rank} of {world_size} gets no shard: {len(urls)} shards for {world_size} workers")
        self.rank, self.seed = rank, seed

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = worker_slot()
        urls = self.rank_urls
        split = len(urls) >= num_workers
        # Workers that split the shards share a seed, so each pass they agree on one order.
        rng = random.Random(f"{self.seed}-{self.rank}-{0 if split else worker}")
        while True:
            order = list(urls)
            rng.shuffle(order)
            for url in order[worker::num_workers] if split else order:
                yield {"url": url}


def raise_with_shard(exn: Exception) -> bool:
    """WebDataset error handler: re-raise naming the shard (WebDataset appends the URL to args)."""
    url = next((a for a in reversed(exn.args[1:]) if isinstance(a, str)), None)
    raise ShardError(f"shard {url or '?'}: {exn.args[0] if exn.args else repr(exn)}") from exn


class ImageDecoder:
    """Decodes a raw sample into {"image": float (C, H, W) normalized, "label": int (-1: none), "key"}.

    Only image bytes (through libpng or PIL) and integer labels are read; a sample holding pickled data is
    rejected, never unpickled. With `audio` (the manifest's {"sample_rate", "samples"}) each sample also
    gives "audio": float32 (1, samples) in [-1, 1] from its `.wav` (mono 16-bit PCM) or `.npy` entry,
    and "video": str and "time": float (seconds) from its `.json`; a missing, short or wrong-rate audio
    entry makes it a bad sample.
    """

    def __init__(self, mode: str, image_size: int, mean: list[float], std: list[float], require_label: bool = False,
                 num_classes: int = 0, audio: dict | None = None):
        self.mode, self.image_size, self.require_label, self.num_classes = mode, image_size, require_label, num_classes
        self.audio = audio
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        # uint8 -> normalized float in one fused op: (x / 255 - mean) / std = x * scale + shift.
        self.scale, self.shift = 1.0 / (255.0 * self.std), -self.mean / self.std
        self.png_colour_type = {"L": 0, "RGB": 2}.get(mode)

    def __call__(self, sample: dict) -> dict:
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        unsafe = [ext for ext in sample if ext.split(".")[-1] in UNSAFE_EXTS]
        if unsafe:
            raise ShardError(f"shard {url}, key {key}: refusing pickled entry {unsafe[0]!r}; shards may hold images, labels, "
                             f"audio (wav, npy without objects) and json only")
        image_ext = next((ext for ext in IMAGE_EXTS if ext in sample), None)
        if image_ext is None:
            raise ShardError(f"shard {url}, key {key}: no image (expected one of {list(IMAGE_EXTS)}, found {sorted(k for k in sample if not k.startswith('__'))})")
        try:
            data = sample[image_ext]
            if not data:
                raise ValueError("zero bytes")
            pixels = self.decode_plain_png(data) if image_ext == "png" else None
            if pixels is None:
                pixels = self.decode_pil(data)
        except Exception as err:
            raise ShardError(f"shard {url}, key {key}: {image_ext} image does not decode ({err})") from err
        label_ext = next((ext for ext in LABEL_EXTS if ext in sample), None)
        if label_ext is None:
            if self.require_label:
                raise ShardError(f"shard {url}, key {key}: sample has no label (.cls) but labels are required here")
            label = -1
        else:
            try:
                label = int(sample[label_ext].decode().strip())
            except ValueError as err:
                raise ShardError(f"shard {url}, key {key}: label {sample[label_ext][:20]!r} is not an integer") from err
            if self.num_classes and not 0 <= label < self.num_classes:
                raise ShardError(f"shard {url}, key {key}: label {label} is outside the {self.num_classes} classes of the manifest (0..{self.num_classes - 1})")
        decoded = {"image": torch.addcmul(self.shift, pixels.float(), self.scale), "label": label, "key": key}
        if self.audio:
            decoded.update(self.decode_av(sample, url, key))
        return decoded

    def decode_av(self, sample: dict, url: str, key: str) -> dict:
        """{"audio": float32 (1, samples), "video": str, "time": float} of an audio-visual sample."""
        audio_ext = next((ext for ext in AUDIO_EXTS if ext in sample), None)
        if audio_ext is None:
            raise ShardError(f"shard {url}, key {key}: no audio (expected one of {list(AUDIO_EXTS)}, "
                             f"found {sorted(k for k in sample if not k.startswith('__'))})")
        try:
            waveform = decode_audio(sample[audio_ext], audio_ext, self.audio["sample_rate"], self.audio["samples"])
        except ValueError as err:
            raise ShardError(f"shard {url}, key {key}: {audio_ext} audio {err}") from err
        try:
            record = json.loads(sample["json"])
            video, time = record["video"], record["time"]
            if not isinstance(video, str) or isinstance(time, bool) or not isinstance(time, (int, float)):
                raise ValueError(f"wrong types ({type(video).__name__}, {type(time).__name__})")
        except (KeyError, TypeError, ValueError) as err:
            raise ShardError(f"shard {url}, key {key}: no valid json record {{\"video\": str, \"time\": seconds}} ({err!r})") from err
        return {"audio": torch.from_numpy(waveform).view(1, -1), "video": video, "time": float(time)}

    def decode_plain_png(self, data: bytes) -> torch.Tensor | None:
        """(C, H, W) uint8 through libpng (torchvision) for the common case, an 8-bit PNG already in
        the target mode and size: 2.2x faster than PIL on 28 px images (bench/loader_speed.py), and
        per-sample decode is most of a light task's loader time. None: take the general PIL path."""
        if (self.png_colour_type is None or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR"
                or data[24] != 8 or data[25] != self.png_colour_type):
            return None
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if self.image_size and (width, height) != (self.image_size, self.image_size):
            return None
        return decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def decode_pil(self, data: bytes) -> torch.Tensor:
        """(C, H, W) uint8 from any image PIL reads, converted to the mode and resized."""
        with Image.open(io.BytesIO(data)) as img:
            img = convert_image(img, self.mode)
            if self.image_size and img.size != (self.image_size, self.image_size):
                img = img.resize((self.image_size, self.image_size), Image.BICUBIC)
            pixels = np.array(img, dtype=np.uint8)
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels
        return torch.from_numpy(pixels).permute(2, 0, 1)


def decode_audio(data: bytes, ext: str, sample_rate: int, samples: int) -> np.ndarray:
    """float32 (samples,) in [-1, 1] from a mono 16-bit PCM .wav of exactly `sample_rate` and `samples`,
    or from a .npy array (int16, or float in [-1, 1]) of `samples` values, loaded without pickle.
    Raises ValueError saying what is wrong."""
    if not data:
        raise ValueError("has zero bytes")
    if ext == "wav":
        try:
            with wave.open(io.BytesIO(data), "rb") as f:
                channels, width, rate, frames = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
                pcm = f.readframes(samples + 1)
        except (wave.Error, EOFError, OSError) as err:
            raise ValueError(f"does not decode ({err})") from err
        if (channels, width) != (1, 2):
            raise ValueError(f"is {channels}-channel {8 * width}-bit; expected mono 16-bit PCM")
        if rate != sample_rate:
            raise ValueError(f"is at {rate} Hz; the manifest says {sample_rate} Hz")
        if frames != samples or len(pcm) != 2 * samples:
            # A truncated file still carries the header's frame count: count the bytes that are there.
            raise ValueError(f"has {len(pcm) // 2} samples (header: {frames}); the manifest says {samples}")
        return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    if ext == "npy":
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)  # object arrays (pickles) raise here
        except Exception as err:
            raise ValueError(f"does not decode ({err})") from err
        if not isinstance(array, np.ndarray) or array.size != samples or array.squeeze().ndim > 1:
            raise ValueError(f"has shape {getattr(array, 'shape', '?')}; the manifest says ({samples},)")
        if array.dtype == np.int16:
            return array.reshape(-1).astype(np.float32) / 32768.0
        if array.dtype.kind != "f" or not np.all(np.abs(array) <= 1.0):  # also rejects NaN
            raise ValueError(f"of dtype {array.dtype} is not int16 or float in [-1, 1]")
        return array.reshape(-1).astype(np.float32)
    raise ValueError(f"extension {ext!r} is not one of {list(AUDIO_EXTS)}")


def convert_image(img: Image.Image, mode: str) -> Image.Image:
    """Any PIL image to `mode` ("L" or "RGB") the way a user expects, not PIL's bare convert():
    16-bit and 32-bit integer grayscale are scaled to 8 bits (convert() would clip at 255),
    transparency is composited over black (convert() would expose whatever colour hides under
    alpha 0), palettes are expanded through their colours, CMYK goes through PIL's CMYK->RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        wide = np.asarray(img, dtype=np.int64)
        img = Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), "L")  # 16-bit range to 8-bit
    elif img.mode == "F":
        img = Image.fromarray((np.clip(np.asarray(img, dtype=np.float64), 0.0, 1.0) * 255).round().astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return img.convert(mode)


class GroupFrames:
    """Pipeline stage of the temporal tasks: consecutive decoded samples of one clip become one
    sample {"frames": (T, C, H, W) in time order, "time": (T,) seconds, "video", "label", "key" (the
    first frame's)}, T = `frames`.

    Video shards keep a clip's samples contiguous and in time order (pipeline/data/video.py, av_synth.py),
    so a run of samples with the same "video" and rising "time" is one clip. A run ends where the
    video changes or time does not rise (another shard, or the same shard again on the next pass),
    so a group never mixes clips. A clip cut by a shard boundary is joined only when the next shard
    read continues it in time order, which is still one clip in order. Runs are cut into
    consecutive, non-overlapping groups of T; a remainder shorter than T is dropped.
    """

    def __init__(self, frames: int):
        if frames < 2:
            raise ValueError(f"frames_per_sample={frames}: a frame group needs at least 2 frames")
        self.frames = frames

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        run: list[dict] = []
        for sample in samples:
            if "video" not in sample or "time" not in sample:
                raise ShardError(f"sample {sample.get('key', '?')!r} has no clip id and time (\"video\", \"time\"): tasks that "
                                 "read several frames of a clip need video shards (`sslpipe data video` or `data av-synth`)")
            if run and (sample["video"] != run[-1]["video"] or sample["time"] <= run[-1]["time"]):
                run = []
            run.append(sample)
            if len(run) == self.frames:
                yield {"frames": torch.stack([s["image"] for s in run]),
                       "time": torch.tensor([s["time"] for s in run], dtype=torch.float64),
                       "video": run[0]["video"], "label": run[0]["label"], "key": run[0]["key"]}
                run = []


def eval_item(sample: dict, field: str = "image") -> tuple[torch.Tensor, int, str]:
    """(the sample's `field`: "image", or "audio" for the audio side of an AV dataset, label, key)."""
    return sample[field], sample["label"], sample["key"]


def collate(items: list) -> tuple:
    return torch.utils.data.default_collate(items)


def make_loader(pipeline: wds.DataPipeline, loader_workers: int, pin_memory: bool) -> wds.WebLoader:
    # batch_size=None: the pipeline batches itself, so workers hand over whole batches.
    return wds.WebLoader(
        pipeline,
        batch_size=None,
        num_workers=loader_workers,
        pin_memory=pin_memory,
        persistent_workers=loader_workers > 0,
        prefetch_factor=4 if loader_workers > 0 else None,
    )


def train_loader(
    urls: list[str],
    rank: int,
    world_size: int,
    decoder: ImageDecoder,
    transform: Callable[[dict], tuple],
    batch_size: int,
    shuffle_buffer: int,
    loader_workers: int,
    seed: int,
    pin_memory: bool = False,
    bad_samples: BadSamples | None = None,
    frames_per_sample: int = 0,
) -> wds.WebLoader:
    """An endless stream of collated `(inputs, target)` batches of `batch_size` for this rank;
    `loader.bad_samples` holds the bad-input policy and its counts, `loader.rank_shards` its shards.
    `frames_per_sample` > 0 (temporal tasks): the transform gets groups of that many frames of one
    clip (`GroupFrames`) instead of single samples."""
    policy = bad_samples or BadSamples()
    shards = TrainShards(urls, rank, world_size, seed)
    shuffle = wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 500), seed=seed * 1000 + rank)
    decode = [wds.map(policy.decode(decoder)), wds.select(is_sample)]
    # Frames are grouped in shard order (a clip's samples are contiguous there), so that path decodes
    # before the shuffle buffer, which then mixes whole groups; every other task keeps raw-sample shuffling.
    stages = [*decode, GroupFrames(frames_per_sample), shuffle] if frames_per_sample else [shuffle, *decode]
    pipeline = wds.DataPipeline(
        shards,
        read_shards(handler=policy.shard_failed, on_short=policy.shard_short),
        *stages,
        wds.map(transform),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    )
    loader = make_loader(pipeline, loader_workers, pin_memory)
    loader.bad_samples, loader.rank_shards = policy, shards.rank_urls
    return loader


def eval_loader(
    urls: list[str],
    rank: int,
    world_size: int,
    decoder: ImageDecoder,
    batch_size: int,
    loader_workers: int,
    pin_memory: bool = False,
    bad_samples: BadSamples | None = None,
    field: str = "image",
) -> wds.WebLoader:
    """Every good sample of this rank's shards exactly once as `(images, labels, keys)` batches
    (`field="audio"`: the waveforms instead of the frames; bad samples are skipped and counted in
    `loader.bad_samples`, or raise under the strict policy)."""
    policy = bad_samples or BadSamples()
    pipeline = wds.DataPipeline(
        EvalShards(urls, rank, world_size),
        read_shards(handler=policy.shard_failed, on_short=policy.shard_short),
        wds.map(policy.decode(decoder)),
        wds.select(is_sample),
        wds.map(functools.partial(eval_item, field=field)),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
    loader = make_loader(pipeline, loader_workers, pin_memory)
    loader.bad_samples = policy
    return loader


def first_decoded(urls: list[str], decoder: ImageDecoder, count: int, bad_samples: BadSamples | None = None) -> list[dict]:
    """The first `count` good samples of the shards, in order, as the decoder's whole dicts (image,
    label, key, and audio, video, time for AV data), in this process."""
    policy = bad_samples or BadSamples()
    pipeline = wds.DataPipeline(EvalShards(urls, 0, 1), read_shards(handler=policy.shard_failed, on_short=policy.shard_short), wds.map(policy.decode(decoder)),
                                wds.select(is_sample))
    return list(itertools.islice(iter(pipeline), count))


def decoder_for(manifest: dict, split: str, image_size: int, require_label: bool = False) -> ImageDecoder:
    """Decoder with the manifest's colour mode and the channel statistics of `split` (the training split),
    and its audio spec when the dataset is audio-visual (manifest "audio")."""
    if split not in manifest["splits"]:
        raise ShardError(f"split {split!r} is not in the manifest of {manifest.get('name', '?')!r}; available: {sorted(manifest['splits'])}")
    stats = manifest["splits"][split]
    size = image_size or (stats["image_size"] or [0])[0]
    if not size:
        raise ShardError(f"images of split {split!r} in {manifest.get('name', '?')!r} differ in size: set data.image_size to resize them to one size")
    audio = manifest.get("audio")
    if audio is not None and not (isinstance(audio, dict) and all(isinstance(audio.get(k), int) and audio[k] > 0 for k in ("sample_rate", "samples"))):
        raise ShardError(f"manifest of {manifest.get('name', '?')!r}: \"audio\" must be {{\"sample_rate\": int, \"samples\": int}}, not {audio!r}")
    return ImageDecoder(manifest["mode"], size, stats["mean"], stats["std"], require_label, len(manifest.get("classes") or []), audio)
