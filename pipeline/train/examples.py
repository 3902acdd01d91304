"""examples.png: what the configured task feeds the network and what it must predict, drawn by the
task's `write_examples` from the first training samples (`sslpipe examples`, and once at the start
of `sslpipe pretrain`)."""
from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.data.dataset import Dataset

log = logging.getLogger("sslpipe.examples")

EXAMPLES = "examples.png"


def first_samples(cfg: Config, count: int, dataset: Dataset | None = None) -> list[dict]:
    """The first `count` good samples of the training split, in shard order, decoded as the training
    loader decodes them: {"image": normalized (C, H, W), "label", "key"} (+ "audio", "video", "time"
    for audio-visual data)."""
    from pipeline.data.bad_samples import BadSamples, ShardError
    from pipeline.data.streaming import first_decoded

    if count < 1:
        raise ValueError(f"count={count}: draw at least one example")
    dataset = dataset or Dataset.for_data(cfg.data)
    urls = dataset.urls(cfg.data.train_split)
    decoder = dataset.decoder(cfg.data.train_split, cfg.data.image_size)
    # Shards in order, once, in this process: the same samples every time.
    samples = first_decoded(urls, decoder, count, BadSamples.for_config(cfg.data))
    if not samples:
        raise ShardError(f"split {cfg.data.train_split!r} of {cfg.data.root} has no readable sample to draw")
    return samples


@contextlib.contextmanager
def seeded(seed: int):
    """Runs the block with Python's and torch's CPU generators seeded, then restores them: the
    transforms' random draws give the same examples each time and leave training's draws as they were."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def as_loaded(samples: list[dict], task) -> list[dict]:
    """Decoded samples as the training loader hands them to `task`: frame groups of one clip for
    the tasks that declare `frames_per_sample` (the temporal tasks), else as they are."""
    from pipeline.data.frames import GroupFrames

    frames = getattr(task, "frames_per_sample", 0)
    return list(GroupFrames(frames)(iter(samples))) if frames else samples


def write_examples(cfg: Config, path: str | Path, count: int = 8, task=None, checkpoint: str | Path | None = None,
                   dataset: Dataset | None = None) -> Path | None:
    """Draws `count` training samples through the configured task into the PNG `path`. `task`: one
    already built for this config (else a fresh one is built); `checkpoint`: a run directory or
    checkpoint whose trained task to draw (colorization then adds its predicted colours)."""
    from pipeline.train.tasks import build_task

    dataset = dataset or Dataset.for_data(cfg.data)
    with seeded(cfg.train.seed):  # reading samples (a loader seed) and building weights draw random numbers too
        samples = first_samples(cfg, count, dataset)
        if task is None:
            task = build_task(cfg, dataset.manifest, dataset.decoder(cfg.data.train_split, cfg.data.image_size))
        samples = as_loaded(samples, task)
        if checkpoint is not None:
            from pipeline.train.checkpoint import CheckpointError, load_valid_checkpoint

            file, state = load_valid_checkpoint(checkpoint)
            try:
                task.load_state_dict(state["task"], strict=True)
            except RuntimeError as err:
                raise CheckpointError(f"{file} does not fit task {cfg.task.name!r} / {cfg.model.backbone}: {err}") from err
        return task.write_examples(samples, Path(path))


def write_run_examples(cfg: Config, run_dir: Path, task, dataset: Dataset | None = None) -> Path | None:
    """<run_dir>/examples.png, drawn on the driver before training; a resumed run keeps the one it
    started with."""
    path = Path(run_dir) / EXAMPLES
    if path.exists():
        return path
    written = write_examples(cfg, path, task=task, dataset=dataset)
    if written:
        log.info("examples of what task %s learns from: %s", cfg.task.name, written)
    return written
