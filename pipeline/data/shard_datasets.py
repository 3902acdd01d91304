"""Which shards each Ray worker (rank) and loader process reads: every sample once for evaluation,
each rank's own shards forever, reshuffled every pass, for training."""
from __future__ import annotations

import random
from typing import Iterator

import torch
import torch.utils.data

from pipeline.data.bad_samples import ShardError


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

