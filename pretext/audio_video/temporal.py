"""Shared parts of the temporal tasks (`temporal_order`, `odd_one_out`): reading a sample's frame
group, flips and frame embeddings.

Both tasks declare `frames_per_sample`; the training loader, and the examples figure, then group
that many consecutive frames of one clip into {"frames": (T, C, H, W) in time order, "time",
"video", "label", "key"} (`pipeline.data.frames.GroupFrames`), and their transforms build tuples
from "frames".
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def clip_frames(sample: dict, count: int, task: str) -> Tensor:
    """The (count, C, H, W) frames of a grouped sample; raises naming what the task needs."""
    frames = sample.get("frames")
    if not isinstance(frames, Tensor) or frames.ndim != 4 or frames.shape[0] != count:
        found = tuple(frames.shape) if isinstance(frames, Tensor) else sorted(sample)
        raise ValueError(f"task {task!r} needs samples grouped into {count} frames of one clip (\"frames\": ({count}, C, H, W), "
                         f"from the loader's frames_per_sample={count} on video shards); got {found}")
    return frames


def random_flip(frames: Tensor) -> Tensor:
    """All frames of a tuple flipped horizontally together, or none: flipping some would let the
    network spot the odd frame by its mirrored layout instead of its time."""
    return frames.flip(-1) if torch.rand(()) < 0.5 else frames


def embed_frames(encoder: nn.Module, project: nn.Module, frames: Tensor) -> Tensor:
    """(..., C, H, W) frames -> (..., dim): the shared backbone on every frame in one pass, then the
    towers' own projection `project` (Shuffle and Learn's and O3N's per-frame fc layer)."""
    lead = frames.shape[:-3]
    return project(encoder(frames.flatten(0, len(lead) - 1))).view(*lead, -1)
