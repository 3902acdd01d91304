"""Where a training loop runs: under Ray Train (`RaySession`) or in one plain process (`LocalSession`).

The loop in `pipeline/train/loop.py` talks only to this interface, so the same code trains on a Ray
cluster and in a single process (GPU benchmarks, debugging) without Ray installed.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from pipeline.train.checkpoint import (
    CheckpointError,
    checkpoint_files,
    checkpoint_step,
    load_checkpoint,
    read_checkpoint,
    write_checkpoint,
    write_local_checkpoint,
)


class LocalSession:
    """One process, rank 0 of 1; checkpoints in `<run_dir>/checkpoints/step_*`."""

    rank = 0
    world_size = 1
    node = "local"

    def __init__(self, run_dir: Path, device: torch.device | str | None = None, keep: int = 2):
        self.run_dir = Path(run_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.keep = keep

    def wrap(self, module: nn.Module) -> nn.Module:
        return module

    def load_latest(self, resume_from: str = "") -> dict | None:
        """This run's latest local checkpoint, else `resume_from` (a checkpoint to start from), else None."""
        if any((self.run_dir / "checkpoints").glob("step_*/checkpoint.pt")):
            return load_checkpoint(self.run_dir / "checkpoints")  # the newest readable one
        return load_checkpoint(resume_from) if resume_from else None

    def report(self, metrics: dict, state: dict | None) -> None:
        if state is not None:
            write_local_checkpoint(state, self.run_dir / "checkpoints", self.keep)

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def all_reduce_max(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def preemption_info(self):
        return None  # no Ray: only SIGTERM announces a preemption


class RaySession:
    """A Ray Train worker. Every rank calls `report` at the same steps (unequal calls hang Ray)."""

    def __init__(self):
        import ray
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.node = ray.get_runtime_context().get_node_id()  # the raylet this worker runs under

    def wrap(self, module: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module)

    def load_latest(self, resume_from: str = "") -> dict | None:
        """Ray's latest checkpoint of this run (after a worker-group restart), else `resume_from`."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return load_checkpoint(resume_from) if resume_from else None
        run_checkpoints = Path(checkpoint.path).parent
        if run_checkpoints.is_dir():
            # Storage this node can read (local or shared): every checkpoint of this launch is there.
            # Use the newest readable one, not only the one Ray registered: its controller registers
            # reports when it polls, so after a crash a newer complete checkpoint can be on disk
            # already, and a corrupted newest one falls back to the previous.
            return self.agree_on_step(run_checkpoints, load_checkpoint(run_checkpoints))
        with checkpoint.as_directory() as directory:
            try:
                return load_checkpoint(directory)
            except CheckpointError as err:
                raise CheckpointError(f"{err} (Ray checkpoint {checkpoint.path})") from err

    def agree_on_step(self, directory: Path, state: dict) -> dict:
        """Every rank must start at the same step (or the collectives hang): when one rank could
        not read the newest checkpoint (a file still arriving on shared storage), all take the
        oldest step any rank chose."""
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return state
        step = torch.tensor([state["step"]], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(step, op=torch.distributed.ReduceOp.MIN)
        if int(step) == state["step"]:
            return state
        for file in checkpoint_files(directory):
            if checkpoint_step(file.parent) == int(step):
                return read_checkpoint(file)
        raise CheckpointError(f"rank {self.rank}: no checkpoint of step {int(step)} under {directory}, which another rank resumes from")

    def report(self, metrics: dict, state: dict | None) -> None:
        import ray.train

        if state is None:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="sslpipe-ckpt-") as tmp:
            write_checkpoint(state, Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def preemption_info(self):
        """Ray Train's notice that a node of this run is being drained (None when not; a
        collective: every rank asks at the same steps)."""
        import ray.train

        ask = getattr(ray.train, "get_preemption_info", None)  # Ray Train >= 2.60
        return ask() if ask is not None else None

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return values
        return {n: v / self.world_size for n, v in self.all_reduce(values, torch.distributed.ReduceOp.SUM).items()}

    def all_reduce_max(self, values: dict[str, float]) -> dict[str, float]:
        return self.all_reduce(values, torch.distributed.ReduceOp.MAX)

    def all_reduce(self, values: dict[str, float], op) -> dict[str, float]:
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return values
        names = sorted(values)
        tensor = torch.tensor([values[n] for n in names], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor, op=op)
        return {n: float(v) for n, v in zip(names, tensor.tolist())}
