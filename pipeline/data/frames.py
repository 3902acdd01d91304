"""Grouping consecutive frames of one clip into one sample (the temporal tasks' input)."""
from __future__ import annotations

from typing import Iterator

import torch

from pipeline.data.bad_samples import ShardError


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
