"""`sslpipe data video`: video files with sound -> audio-visual shards (frame + audio window + record).

Each video is one job (`decode_video`; --workers runs them in a process pool): PyAV demuxes its first
video and first audio stream in one pass. Frames are sampled every 1/fps seconds (the first frame at
or after each multiple of 1/fps), centre-cropped to a square and resized to image_size. The audio track
is resampled to mono 16-bit PCM at the fixed rate by PyAV's AudioResampler (it is assumed continuous,
as cameras and encoders write it), and each sampled frame gets the window of `window` seconds centred
on the frame's timestamp.

Clip edges: a frame whose window would reach more than EDGE_TOLERANCE (50 ms) beyond the decoded audio
is skipped, so the first and last window/2 seconds of a clip give no sample; a shortfall within the
tolerance (codec padding, an audio track a frame shorter than the picture) is zero-padded.

Whole videos are held out for the test split (`held_out`: per class, seeded), so test clips are really
unseen. A video without an audio stream, an unreadable file or a clip shorter than the window is
skipped with a warning naming it, and listed again in a summary at the end; nothing else is lost.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import multiprocessing
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import av
import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.data.shards import (
    Sample,
    encode_png,
    encode_wav,
    write_manifest,
    write_split,
)

log = logging.getLogger("sslpipe.data")

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".ogv", ".flv", ".wmv", ".3gp")
EDGE_TOLERANCE = 0.05  # seconds of zero padding allowed where a window meets the end of the audio


@dataclass
class VideoJob:
    path: str
    video_id: str  # key prefix and the json "video": unique, no dots (WebDataset splits keys at the first dot)
    label: int | None
    fps: float
    sample_rate: int
    window: float
    image_size: int


@dataclass
class VideoResult:
    job: VideoJob
    samples: list[Sample] = field(default_factory=list)
    problem: str | None = None  # why the video gave no samples


class FramePicker:
    """Takes the first frame at or after each multiple of 1/fps seconds; a frame that reaches past
    several multiples (a video slower than fps) is taken once."""

    def __init__(self, fps: float):
        self.step, self.next = 1.0 / fps, 0

    def take(self, time: float) -> bool:
        if time < self.next * self.step - 1e-6:
            return False
        while self.next * self.step <= time + 1e-6:
            self.next += 1
        return True


def audio_window(pcm: np.ndarray, pcm_start: float, time: float, sample_rate: int, samples: int,
                 tolerance: float = EDGE_TOLERANCE) -> np.ndarray | None:
    """The `samples` values of `pcm` (which starts at `pcm_start` s) centred on `time`, zero-padded
    where they reach at most `tolerance` s beyond it; None where they reach further."""
    start = round((time - pcm_start) * sample_rate) - samples // 2
    end = start + samples
    missing = max(0, -start) + max(0, end - len(pcm))
    if missing > tolerance * sample_rate:
        return None
    window = np.zeros(samples, dtype=np.int16)
    lo, hi = max(start, 0), min(end, len(pcm))
    if hi > lo:
        window[lo - start : hi - start] = pcm[lo:hi]
    return window


def square_frame(rgb: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the centre square of an (H, W, 3) frame, resized (antialiased)."""
    height, width = rgb.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    img = Image.fromarray(np.ascontiguousarray(rgb[top : top + side, left : left + side]))
    if side != size:
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img)


def av_sample(video_id: str, index: int, time: float, png: bytes, pcm: np.ndarray, sample_rate: int,
              label: int | None, source: str) -> Sample:
    """One shard sample: `<video>_<frame index:06d>` with .png, .wav and .json {"video", "time"}."""
    record = json.dumps({"video": video_id, "time": round(float(time), 6)}).encode()
    return Sample(f"{video_id}_{index:06d}", png, "png", label, source, {"wav": encode_wav(pcm, sample_rate), "json": record})


def read_streams(container, job: VideoJob) -> tuple[list[tuple[int, float, bytes]], np.ndarray, float]:
    """One pass over the first video and audio streams: the picked frames as (index, time, png),
    the whole audio as mono int16 at job.sample_rate, and the time its first sample plays."""
    video, audio = container.streams.video[0], container.streams.audio[0]
    video.thread_type = "AUTO"  # frame-threaded decoding: every frame must be decoded, few are kept
    resampler = av.AudioResampler(format="s16", layout="mono", rate=job.sample_rate)
    picker = FramePicker(job.fps)
    frames, chunks, pcm_start, index = [], [], None, 0
    for packet in container.demux(video, audio):
        for frame in packet.decode():
            if isinstance(frame, av.AudioFrame):
                if pcm_start is None:
                    pcm_start = float(frame.time or 0.0)
                chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
                continue
            time = frame.time if frame.time is not None else index / float(video.average_rate or job.fps)
            if picker.take(time):
                frames.append((index, time, encode_png(square_frame(frame.to_ndarray(format="rgb24"), job.image_size))))
            index += 1
    chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]  # flush
    pcm = np.concatenate(chunks).astype(np.int16) if chunks else np.zeros(0, dtype=np.int16)
    return frames, pcm, pcm_start or 0.0


def decode_video(job: VideoJob) -> VideoResult:
    """One video's samples, or the reason it has none (no audio, unreadable, shorter than the window)."""
    try:
        with av.open(job.path, metadata_errors="ignore") as container:
            if not container.streams.video:
                return VideoResult(job, problem="no video stream")
            if not container.streams.audio:
                return VideoResult(job, problem="no audio stream")
            frames, pcm, pcm_start = read_streams(container, job)
    except (av.FFmpegError, OSError, ValueError, EOFError) as err:
        return VideoResult(job, problem=f"unreadable ({err})")
    samples = round(job.window * job.sample_rate)
    if len(pcm) + EDGE_TOLERANCE * job.sample_rate < samples:
        return VideoResult(job, problem=f"clip shorter than the {job.window:g} s audio window ({len(pcm) / job.sample_rate:.2f} s of audio)")
    result = VideoResult(job)
    for index, time, png in frames:
        window = audio_window(pcm, pcm_start, time, job.sample_rate, samples)
        if window is not None:  # frames within window/2 of either end of the audio have no whole window
            result.samples.append(av_sample(job.video_id, index, time, png, window, job.sample_rate, job.label, job.path))
    if not result.samples:
        result.problem = (f"no sampled frame has a whole {job.window:g} s audio window "
                          f"({len(frames)} frame(s), {len(pcm) / job.sample_rate:.2f} s of audio from {pcm_start:.2f} s)")
    return result


def held_out(labels: list[int | None], test_fraction: float, seed: int) -> set[int]:
    """Indices of the videos that go to the test split: round(test_fraction * n) of each class's n
    videos (unlabelled videos form one group), chosen by a seeded shuffle; at least one video of
    each class stays in train, so no class is missing from training."""
    rng = np.random.default_rng(seed)
    test: set[int] = set()
    groups: dict[int | None, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    for label in sorted(groups, key=lambda l: -1 if l is None else l):
        members = groups[label]
        order = rng.permutation(len(members))
        test.update(members[i] for i in order[: min(math.floor(len(members) * test_fraction + 0.5), len(members) - 1)])
    return test


def scan_videos(path: Path, labels_file: str | Path | None = None) -> tuple[list[tuple[Path, int | None]], list[str]]:
    """(video, label) pairs under `path` (a file or a folder) and the class names.

    Labels come from class subfolders (`path/<class>/**/video`, like `sslpipe data folder`), or from
    `labels_file`, a JSON object mapping a video's path relative to `path` (or its file name) to its
    class name, or from neither (unlabelled).
    """
    if not path.exists():
        raise FileNotFoundError(f"video path {str(path)!r} does not exist")
    root = path if path.is_dir() else path.parent
    if path.is_file():
        videos, classes = [(path, None)], []
    else:
        class_dirs = sorted(d for d in path.iterdir() if d.is_dir() and any(is_video(p) for p in d.rglob("*")))
        classes = [d.name for d in class_dirs]
        videos = [(p, None) for p in sorted(path.iterdir()) if is_video(p)]
        if classes and videos:
            raise ValueError(f"{videos[0][0]}: video outside any class folder while {path} has class folders {classes}")
        videos += [(p, label) for label, d in enumerate(class_dirs) for p in sorted(d.rglob("*")) if is_video(p)]
        if not videos:
            raise ValueError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) found under {path}")
    if labels_file is None:
        return videos, classes
    if classes:
        raise ValueError(f"--labels {labels_file}: {path} already has class folders {classes}; use one or the other")
    try:
        table = json.loads(Path(labels_file).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--labels {labels_file}: cannot read it as JSON ({err})") from err
    if not isinstance(table, dict) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in table.values()):
        raise ValueError(f"--labels {labels_file}: expected a JSON object {{\"<video file>\": \"<class name>\", ...}}")
    names = [table.get(p.relative_to(root).as_posix(), table.get(p.name)) for p, _ in videos]
    missing = [str(p) for (p, _), name in zip(videos, names) if name is None]
    if missing:
        raise ValueError(f"--labels {labels_file} has no label for {len(missing)} video(s): {', '.join(missing[:5])}")
    if all(isinstance(n, int) for n in names):  # class indices: keep their numbers
        classes = [str(i) for i in range(max(names) + 1)]
    else:
        classes = sorted({str(n) for n in names})
    return [(p, classes.index(str(n))) for (p, _), n in zip(videos, names)], classes


def is_video(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES


def video_ids(paths: list[Path], root: Path) -> list[str]:
    """File stems made key-safe; a stem that two videos share becomes its relative path."""
    def safe(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "video"

    stems = [safe(p.stem) for p in paths]
    ids = [safe(p.relative_to(root).with_suffix("").as_posix()) if stems.count(s) > 1 else s for p, s in zip(paths, stems)]
    seen: dict[str, int] = {}
    for i, vid in enumerate(ids):  # still equal after making them safe: number them
        seen[vid] = seen.get(vid, 0) + 1
        if seen[vid] > 1:
            ids[i] = f"{vid}-{seen[vid]}"
    return ids


def write_video_dataset(path: str | Path, out: str | Path, fps: float = 2.0, sample_rate: int = 16000, window: float = 1.0,
                        image_size: int = 64, labels: str | Path | None = None, test_fraction: float = 0.2, seed: int = 0,
                        workers: int = 1, samples_per_shard: int = 0) -> Path:
    """Videos under `path` as train/test audio-visual shards plus manifest.json (with "audio")."""
    for option, value, ok in (("--fps", fps, fps > 0), ("--sample-rate", sample_rate, sample_rate > 0), ("--window", window, window > 0),
                              ("--image-size", image_size, image_size > 0), ("--test-fraction", test_fraction, 0 <= test_fraction < 1),
                              ("--workers", workers, workers >= 1)):
        if not ok:
            raise ValueError(f"{option} {value}: out of range")
    path, out = Path(path), Path(out)
    videos, classes = scan_videos(path, labels)
    root = path if path.is_dir() else path.parent
    ids = video_ids([p for p, _ in videos], root)
    test = held_out([label for _, label in videos], test_fraction, seed)
    jobs = [VideoJob(str(p), vid, label, fps, sample_rate, window, image_size) for (p, label), vid in zip(videos, ids)]
    audio = {"sample_rate": sample_rate, "samples": round(window * sample_rate)}
    skipped: list[str] = []
    splits = {}
    # Ordered results (imap): the shards come out the same whatever the number of workers.
    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for split in ("train", "test"):
            split_jobs = [job for i, job in enumerate(jobs) if (i in test) == (split == "test")]
            if not split_jobs:
                continue
            results = pool.imap(decode_video, split_jobs) if pool else map(decode_video, split_jobs)
            bar = tqdm(results, total=len(split_jobs), desc=f"{split} videos", unit="video")
            samples = peek(good_samples(bar, skipped))
            if samples is None:
                log.warning("split %r: none of its %d video(s) gave a sample; not written", split, len(split_jobs))
                continue
            splits[split] = write_split(samples, out, split, 0, "RGB", samples_per_shard, audio=audio, progress=False)
    if skipped:
        log.warning("skipped %d of %d video(s):\n  %s", len(skipped), len(jobs), "\n  ".join(skipped))
    if "train" not in splits:
        raise ValueError(f"no training sample from the videos under {path}" + (f" (skipped: {'; '.join(skipped)})" if skipped else ""))
    if test_fraction > 0 and "test" not in splits:
        log.warning("no test split: too few videos for --test-fraction %g", test_fraction)
    return write_manifest(out, path.resolve().stem, classes, "RGB", splits, audio=audio)


def good_samples(results: Iterable[VideoResult], skipped: list[str]) -> Iterator[Sample]:
    for result in results:
        if result.problem:
            log.warning("skipping video %s: %s", result.job.path, result.problem)
            skipped.append(f"{result.job.path} ({result.problem})")
        yield from result.samples


def peek(samples: Iterator[Sample]) -> Iterator[Sample] | None:
    """The same stream, or None when it is empty (write_split refuses an empty split)."""
    first = next(samples, None)
    return None if first is None else itertools.chain([first], samples)
