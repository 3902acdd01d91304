"""Streaming WebDataset shards into batches, split over Ray workers (ranks) and loader workers:
the training loader (forever, shuffled, the task's transform in the loader processes) and the
evaluation loader (every sample once, a partial last batch), built from `shard_datasets`,
`storage.read_shards`, `bad_samples` and `decode`."""
from __future__ import annotations

import functools
import itertools
from typing import Callable

import torch
import torch.utils.data
import webdataset as wds

from pipeline.data.bad_samples import BadSamples, is_sample
from pipeline.data.decode import ImageDecoder
from pipeline.data.frames import GroupFrames
from pipeline.data.shard_datasets import EvalShards, TrainShards
from pipeline.data.storage import read_shards


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
