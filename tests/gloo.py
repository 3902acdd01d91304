"""Runs a test function in several gloo processes on the CPU, for cross-worker losses and statistics.

    def _worker(rank, world_size, x):          # module level, so spawned processes can import it
        return {"loss": loss_fn(x[rank::world_size])}

    results = run_gloo(_worker, 2, tmp_path, x)  # [rank 0's dict, rank 1's dict]
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch


def _entry(rank: int, fn: Callable, world_size: int, folder: str, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world_size)
    try:
        torch.save(fn(rank, world_size, *args), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_gloo(fn: Callable, world_size: int, tmp_path: Path, *args) -> list:
    """`fn(rank, world_size, *args)` in `world_size` processes joined by gloo; each rank's return
    value (tensors, or dicts and lists of them), in rank order."""
    import torch.multiprocessing as mp

    folder = Path(tmp_path) / "gloo"
    folder.mkdir(parents=True, exist_ok=True)
    mp.spawn(_entry, args=(fn, world_size, str(folder), args), nprocs=world_size, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
