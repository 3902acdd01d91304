"""SYNTHETIC audio-visual clips (`sslpipe data av-synth`): a procedural stand-in for a video dataset
with sound, since none can be downloaded here. Nothing in it is real footage or real recordings.

Each of N classes has its own look and its own sound, so which sound goes with which picture is
learnable, and labels allow a linear probe:
- look: a shape (circle, square, triangle, ...) in a class colour (hues evenly spaced), moving along a
  class Lissajous path and spinning at a class rate, over a per-clip background (a low-saturation
  gradient with a smooth texture, plus a little per-frame noise); the path's centre and reach and the
  shape's size are random per clip;
- sound: a tone at a class pitch (3 semitones apart for 10 classes) with a class mix of harmonics
  (timbre) under a class rhythm (beats per second, and how fast each beat decays); per clip a small
  detune (up to 2%), random harmonic phases, beat phase, loudness and background noise.
The shape swells with each beat, so picture and sound are also in sync within a clip (for
synchronization tasks), not only matched in class.

Clips go straight to shards as the very samples `sslpipe data video` makes from a video (frames
picked every 1/fps s from a video_fps timeline, each with the audio window centred on it; frames whose
window leaves the clip are skipped: pipeline/data/video.py), and optionally also as .mp4 files (H.264 and
48 kHz stereo AAC, through PyAV) in class folders, to run that ingest end to end.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import av
import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.shards import Sample, encode_png, write_manifest, write_split
from pipeline.data.video import FramePicker, audio_window, av_sample, held_out

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "diamond", "bar", "arrow")
SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down: antialiased edges


@dataclass(frozen=True)
class ClassStyle:
    name: str
    colour: tuple[int, int, int]
    shape: str
    path: tuple[float, float]  # Lissajous frequencies of x and y, Hz
    spin: float  # radians per second
    pitch: float  # fundamental, Hz
    harmonics: tuple[float, ...]  # amplitudes of harmonics 1, 2, ...; the fundamental is the loudest
    beat_rate: float  # beats per second
    decay: float  # 1/s: how fast a beat fades


def class_styles(num_classes: int) -> list[ClassStyle]:
    """The classes' looks and sounds; they depend on the class index only, never on the seed."""
    spacing = min(3.0, 36.0 / num_classes)  # semitones; 10 classes span 196..932 Hz
    width = max(2, len(str(num_classes - 1)))  # names sort in class order (mp4 class folders)
    styles = []
    for c in range(num_classes):
        rng = np.random.default_rng(1000 + c)
        shape = SHAPES[c % len(SHAPES)]
        styles.append(ClassStyle(
            name=f"{c:0{width}d}-{shape}",
            colour=tuple(int(round(255 * v)) for v in colorsys.hsv_to_rgb(c / num_classes, 0.9, 1.0)),
            shape=shape,
            path=(0.2 * (1 + c % 3), 0.15 * (1 + (c // 3) % 4)),
            spin=(-1) ** c * 0.9 * (c % 4),
            pitch=196.0 * 2 ** (spacing * c / 12),
            harmonics=(1.0, *np.round(rng.uniform(0.0, 0.7, 5), 3)),
            beat_rate=1.0 + 0.5 * (c % 6),
            decay=(2.0, 6.0, 14.0)[(c // 2) % 3],
        ))
    return styles


@dataclass(frozen=True)
class Clip:
    """One clip's random draw; picture and sound are functions of time (`render_frame`, `render_audio`)."""

    index: int
    label: int
    style: ClassStyle
    duration: float
    seed: int
    centre: tuple[float, float]  # scene coordinates: the frame's central square is [0, 1]^2
    reach: float
    radius: float
    path_phase: tuple[float, float]
    spin_phase: float
    background: tuple[tuple[float, float, float], tuple[float, float, float]]
    gradient_angle: float
    texture: tuple[tuple[float, float, float, float], ...]  # (kx, ky, phase, amplitude) of smooth waves
    detune: float
    phases: tuple[float, ...]
    beat_phase: float
    loudness: float
    noise: float

    @property
    def video_id(self) -> str:
        return f"synth{self.index:06d}"

    def envelope(self, t: np.ndarray | float) -> np.ndarray:
        """The beat: a 5 ms attack, then exponential decay, beat_rate times a second."""
        since = np.mod(np.asarray(t, dtype=np.float64) * self.style.beat_rate + self.beat_phase, 1.0) / self.style.beat_rate
        return np.minimum(since / 0.005, 1.0) * np.exp(-self.style.decay * since)


def make_clip(index: int, label: int, style: ClassStyle, duration: float, seed: int) -> Clip:
    rng = np.random.default_rng([seed, index])

    def pale() -> tuple[float, float, float]:
        return colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.25), rng.uniform(0.15, 0.75))

    return Clip(
        index=index, label=label, style=style, duration=duration, seed=seed,
        centre=tuple(rng.uniform(0.35, 0.65, 2)), reach=rng.uniform(0.08, 0.2), radius=rng.uniform(0.11, 0.18),
        path_phase=tuple(rng.uniform(0, 2 * math.pi, 2)), spin_phase=rng.uniform(0, 2 * math.pi),
        background=(pale(), pale()), gradient_angle=rng.uniform(0, 2 * math.pi),
        texture=tuple((*rng.uniform(-3, 3, 2), rng.uniform(0, 2 * math.pi), rng.uniform(0.02, 0.06)) for _ in range(3)),
        detune=2 ** (rng.uniform(-0.35, 0.35) / 12),  # at most 0.35 semitone (2%): classes stay 3 apart
        phases=tuple(rng.uniform(0, 2 * math.pi, len(style.harmonics))), beat_phase=rng.uniform(),
        loudness=rng.uniform(0.25, 0.6), noise=rng.uniform(0.0, 0.03),
    )


def outline(shape: str) -> list[tuple[float, float]]:
    """Polygon vertices of a shape of radius 1 (circle and ring are drawn as ellipses)."""
    def ring(n: int, start: float, radii=(1.0,)) -> list[tuple[float, float]]:
        return [(radii[i % len(radii)] * math.cos(start + 2 * math.pi * i / n), radii[i % len(radii)] * math.sin(start + 2 * math.pi * i / n))
                for i in range(n)]

    w = 0.35
    return {
        "square": ring(4, math.pi / 4),
        "triangle": ring(3, -math.pi / 2),
        "star": ring(10, -math.pi / 2, (1.0, 0.45)),
        "hexagon": ring(6, 0.0),
        "diamond": [(0, -1), (0.55, 0), (0, 1), (-0.55, 0)],
        "cross": [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)],
        "bar": [(-1, -w), (1, -w), (1, w), (-1, w)],
        "arrow": [(1, 0), (0.2, 0.7), (0.2, 0.3), (-1, 0.3), (-1, -0.3), (0.2, -0.3), (0.2, -0.7)],
    }[shape]


def render_frame(clip: Clip, t: float, width: int, height: int, frame_index: int = 0) -> np.ndarray:
    """(height, width, 3) uint8 picture at time t; the central height x height square is the scene's
    [0, 1]^2, so a wide frame centre-cropped shows what a square one does."""
    x = 0.5 + (np.arange(width) + 0.5 - width / 2) / height
    y = (np.arange(height) + 0.5) / height
    xx, yy = np.meshgrid(x, y)  # (H, W)
    along = np.clip(0.5 + (xx - 0.5) * math.cos(clip.gradient_angle) + (yy - 0.5) * math.sin(clip.gradient_angle), 0, 1)
    low, high = np.array(clip.background[0]), np.array(clip.background[1])
    image = low + along[..., None] * (high - low)  # (H, W, 3) in [0, 1]
    image += sum(a * np.sin(2 * math.pi * (kx * xx + ky * yy) + p) for kx, ky, p, a in clip.texture)[..., None]
    image += np.random.default_rng([clip.seed, clip.index, frame_index, 1]).normal(0, 0.012, image.shape)  # sensor noise

    style = clip.style
    cx = clip.centre[0] + clip.reach * math.sin(2 * math.pi * style.path[0] * t + clip.path_phase[0])
    cy = clip.centre[1] + clip.reach * math.sin(2 * math.pi * style.path[1] * t + clip.path_phase[1])
    radius = clip.radius * (0.85 + 0.35 * float(clip.envelope(t)))  # swells on each beat
    scale = SUPERSAMPLE * height  # scene units -> supersampled pixels
    px, py, pr = (cx - 0.5) * scale + SUPERSAMPLE * width / 2, cy * scale, radius * scale
    mask = Image.new("L", (SUPERSAMPLE * width, SUPERSAMPLE * height), 0)
    draw = ImageDraw.Draw(mask)
    if style.shape in ("circle", "ring"):
        draw.ellipse([px - pr, py - pr, px + pr, py + pr], fill=255)
        if style.shape == "ring":
            draw.ellipse([px - 0.55 * pr, py - 0.55 * pr, px + 0.55 * pr, py + 0.55 * pr], fill=0)
    else:
        angle = style.spin * t + clip.spin_phase
        cos, sin = math.cos(angle), math.sin(angle)
        draw.polygon([(px + pr * (u * cos - v * sin), py + pr * (u * sin + v * cos)) for u, v in outline(style.shape)], fill=255)
    alpha = np.asarray(mask.resize((width, height), Image.BOX), dtype=np.float64)[..., None] / 255.0
    image = image * (1 - alpha) + np.array(style.colour) / 255.0 * alpha
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def render_audio(clip: Clip, sample_rate: int, channels: int = 1) -> np.ndarray:
    """(channels, duration * sample_rate) float32 in [-1, 1]: the whole clip's sound."""
    t = np.arange(round(clip.duration * sample_rate)) / sample_rate
    pitch = clip.style.pitch * clip.detune
    tone, total = np.zeros_like(t), 0.0
    for h, (amplitude, phase) in enumerate(zip(clip.style.harmonics, clip.phases), start=1):
        if h * pitch < 0.45 * sample_rate:  # nothing above Nyquist: it would alias
            tone += amplitude * np.sin(2 * math.pi * h * pitch * t + phase)
            total += amplitude
    signal = clip.loudness * clip.envelope(t) * tone / total
    noise = np.random.default_rng([clip.seed, clip.index, sample_rate, 2]).normal(0, clip.noise, (channels, len(t)))
    return np.clip(signal[None, :] + noise, -1, 1).astype(np.float32)


def clip_samples(clip: Clip, fps: float, window: float, sample_rate: int, image_size: int, video_fps: float) -> Iterator[Sample]:
    """The clip's shard samples, as `sslpipe data video` makes them from its .mp4: the frames of a
    video_fps timeline that FramePicker takes at fps, each with its centred audio window."""
    pcm = np.round(render_audio(clip, sample_rate)[0] * 32767).astype(np.int16)
    picker, samples = FramePicker(fps), round(window * sample_rate)
    for index in range(round(clip.duration * video_fps)):
        time = index / video_fps
        if not picker.take(time):
            continue
        audio = audio_window(pcm, 0.0, time, sample_rate, samples)
        if audio is not None:
            png = encode_png(render_frame(clip, time, image_size, image_size, index))
            yield av_sample(clip.video_id, index, time, png, audio, sample_rate, clip.label, f"av-synth clip {clip.index}")


def write_mp4(clip: Clip, path: Path, video_fps: int = 25, size: tuple[int, int] = (96, 64), audio_rate: int = 48000) -> Path:
    """The clip as an .mp4: H.264 (yuv420p) at video_fps, `size` (width, height), and stereo AAC."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=video_fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = container.add_stream("aac", rate=audio_rate, layout="stereo")
        for index in range(round(clip.duration * video_fps)):
            frame = av.VideoFrame.from_ndarray(render_frame(clip, index / video_fps, width, height, index), format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode())
        sound = render_audio(clip, audio_rate, channels=2)
        for start in range(0, sound.shape[1], 1024):  # AAC's frame size
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(sound[:, start : start + 1024]), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = audio_rate, start
            container.mux(audio.encode(frame))
        container.mux(audio.encode())
    return path


@dataclass
class ClipSource:
    """A SampleSource of synthetic clips: position p is sample p % per_clip of clip
    indices[p // per_clip], so a pool process renders only the clips of its own shards."""

    indices: list[int]
    labels: list[int]
    styles: list[ClassStyle]
    duration: float
    seed: int
    fps: float
    window: float
    sample_rate: int
    image_size: int
    video_fps: float
    per_clip: int

    def __len__(self) -> int:
        return len(self.indices) * self.per_clip

    def samples(self, start: int, stop: int) -> Iterator[Sample]:
        for position in range(start // self.per_clip, -(-stop // self.per_clip)):
            i = self.indices[position]
            clip = make_clip(i, self.labels[i], self.styles[self.labels[i]], self.duration, self.seed)
            made = list(clip_samples(clip, self.fps, self.window, self.sample_rate, self.image_size, self.video_fps))
            if len(made) != self.per_clip:  # every clip has the same timeline; a guard, not an input error
                raise RuntimeError(f"av-synth clip {i}: {len(made)} samples, expected {self.per_clip}")
            first = position * self.per_clip
            yield from made[max(start - first, 0):stop - first]


def write_av_synth(out: str | Path, clips: int = 500, classes: int = 10, duration: float = 4.0, fps: float = 2.0,
                   image_size: int = 32, sample_rate: int = 16000, window: float = 1.0, test_fraction: float = 0.2,
                   seed: int = 0, mp4: int = 0, mp4_out: str | Path | None = None, video_fps: int = 25,
                   samples_per_shard: int = 5000, workers: int = 1) -> Path:
    """SYNTHETIC clips as train/test audio-visual shards plus manifest.json; with `mp4`, the first
    `mp4` clips also as `<mp4_out>/<class>/<video id>.mp4` (default mp4_out: OUT/mp4)."""
    for option, value, ok in (("--clips", clips, clips >= 1), ("--classes", classes, classes >= 2), ("--duration", duration, duration > 0),
                              ("--fps", fps, fps > 0), ("--image-size", image_size, image_size >= 8), ("--sample-rate", sample_rate, sample_rate >= 8000),
                              ("--window", window, 0 < window <= duration), ("--test-fraction", test_fraction, 0 <= test_fraction < 1),
                              ("--mp4", mp4, 0 <= mp4 <= clips)):
        if not ok:
            raise ValueError(f"{option} {value}: out of range")
    out = Path(out)
    styles = class_styles(classes)
    labels = [i % classes for i in range(clips)]
    test = held_out(labels, test_fraction, seed)
    audio = {"sample_rate": sample_rate, "samples": round(window * sample_rate)}

    def make(i: int) -> Clip:
        return make_clip(i, labels[i], styles[labels[i]], duration, seed)

    # Samples per clip at the real rate (the audio window's edges round with it), on tiny frames.
    per_clip = sum(1 for _ in clip_samples(make(0), fps, window, sample_rate, 8, video_fps))
    if per_clip == 0:
        raise ValueError(f"--duration {duration} s gives no frame with a whole --window {window} s audio window")
    splits = {}
    for split in ("train", "test"):
        indices = [i for i in range(clips) if (i in test) == (split == "test")]
        if indices:
            source = ClipSource(indices, labels, styles, duration, seed, fps, window, sample_rate, image_size, video_fps, per_clip)
            splits[split] = write_split(source, out, split, len(source), "RGB", samples_per_shard, audio=audio, workers=workers)
    mp4_out = Path(mp4_out) if mp4_out else out / "mp4"
    height = max(64, 2 * image_size)
    for i in range(mp4):
        clip = make(i)
        write_mp4(clip, mp4_out / clip.style.name / f"{clip.video_id}.mp4", video_fps, (height * 3 // 2 // 2 * 2, height))
    return write_manifest(out, "av-synth", [s.name for s in styles], "RGB", splits, audio=audio)
