"""Driver side of pretraining: checks resources, starts or joins Ray, runs a TorchTrainer."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from core.errors import ConfigError
from pipeline.config import Config
from pipeline.data.dataset import Dataset
from pipeline.data.storage import display_url, is_url
from pipeline.train.checkpoint import load_valid_checkpoint
from pipeline.train.examples import write_run_examples
from pipeline.train.metrics import plot_metrics
from pipeline.train.run_storage import (
    fetch_run,
    local_run_dir,
    pull,
    push,
    ray_storage,
    source_url,
)

log = logging.getLogger("sslpipe.launch")


def prepare_run_dir(cfg: Config) -> Path:
    """Fixes cfg.run_dir (absolute, so Ray workers on any node agree, or a URL: pipeline/train/run_storage.py)
    and writes the resolved config; returns the local folder this process writes the run's files in."""
    if not cfg.run_dir:
        cfg.run_dir = f"runs/{cfg.task.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not is_url(cfg.run_dir):
        cfg.run_dir = str(Path(cfg.run_dir).resolve())
    cfg.data.root = str(Path(cfg.data.root).resolve()) if "://" not in cfg.data.root else cfg.data.root
    run_dir = local_run_dir(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    push(cfg.run_dir, ["config.yaml"])
    return run_dir


def check_local_resources(cfg: Config) -> None:
    """Ray waits forever for resources that never come: refuse impossible requests up front."""
    s = cfg.scaling
    import ray

    if ray.is_initialized():
        return  # this process joined a cluster already: check_cluster_resources judges it
    # An embedded Ray never gains a node, so even an elastic run's maximum must fit this machine.
    if s.use_gpu:
        import torch

        if not s.address and torch.cuda.device_count() < s.max_workers:
            raise ConfigError(f"scaling.num_workers={s.num_workers} with scaling.use_gpu=true needs {s.max_workers} GPUs; "
                              f"this machine has {torch.cuda.device_count()}")
    needed = s.max_workers * s.cpus_per_worker
    if not s.address and needed > (os.cpu_count() or 1):
        raise ConfigError(
            f"scaling.num_workers={s.num_workers} x scaling.cpus_per_worker={s.cpus_per_worker} = {needed} CPUs, "
            f"but this machine has {os.cpu_count()}; lower them or join a cluster with scaling.address"
        )


def check_data(cfg: Config, dataset: Dataset | None = None):
    """Every Ray worker needs its own training shards; a shortfall would only show inside the workers.
    Returns the task it built (on the driver: the examples are drawn with it)."""
    dataset = dataset or Dataset.for_data(cfg.data)
    urls = dataset.urls(cfg.data.train_split)
    decoder = dataset.decoder(cfg.data.train_split, cfg.data.image_size)
    # Building the task once here surfaces impossible combinations (colorization on grayscale data,
    # a jigsaw grid larger than the image) before any Ray worker starts.
    from pipeline.train.tasks import build_task

    task = build_task(cfg, dataset.manifest, decoder)
    if len(urls) < cfg.scaling.max_workers:
        raise ConfigError(
            f"split {cfg.data.train_split!r} of {cfg.data.root} has {len(urls)} shard(s) for scaling.num_workers={cfg.scaling.num_workers}: "
            f"each worker needs at least one; rewrite the shards smaller (--samples-per-shard) or use fewer workers"
        )
    return task


def check_cluster_resources(cfg: Config) -> None:
    """A fixed-size run must fit the cluster as it is. An elastic run needs room for its minimum:
    beyond that it grows into nodes as they join (an autoscaler's or a returning spot node)."""
    import ray

    available = ray.cluster_resources()
    s = cfg.scaling

    def wants(workers: int) -> dict[str, int]:
        return {"CPU": workers * s.cpus_per_worker, "GPU": workers if s.use_gpu else 0}

    for resource, amount in wants(s.min_workers).items():
        if amount > available.get(resource, 0):
            raise ConfigError(
                f"the Ray cluster has {available.get(resource, 0):g} {resource}s, but scaling asks for {amount} "
                f"({s.min_workers} {'workers at least' if s.elastic else 'workers'}); Ray would wait for them forever"
            )
    if s.elastic:
        room = min(int(available.get(r, 0) // per) for r, per in wants(1).items() if per)
        log.info("elastic training: %d-%d workers, room for %d now; Ray Train looks for more every %g s",
                 s.min_workers, s.max_workers, min(room, s.max_workers), s.resize_interval_s)
        if s.max_failures == 0:
            log.warning("scaling.max_failures=0: a node that is lost without a drain notice ends the run "
                        "(drained, preempted nodes are retried anyway); set -1 to restart smaller every time")


def init_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.scaling.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address)
    else:
        # A private, embedded cluster for this process (not whatever else uses /tmp/ray).
        log.info("starting an embedded local Ray instance")
        ray.init(address="local", num_cpus=os.cpu_count(), logging_level=logging.WARNING)


def start_run(cfg: Config, resume: str | Path | None) -> tuple[Path, Dataset]:
    """Resolves the checkpoint to resume from (on the driver, so every worker starts from exactly
    that one), fixes and writes the run directory, opens the dataset and checks it before any
    training starts, and draws <run_dir>/examples.png. Returns the run directory and the dataset."""
    if resume:
        # The newest readable checkpoint: a corrupted newest one is named and the previous one used.
        # One on object storage is passed on by its URL, which workers on any node can read.
        file = load_valid_checkpoint(resume)[0]
        cfg.train.resume_from = source_url(file.parent) or str(file.resolve())
        if is_url(cfg.run_dir):
            fetch_run(cfg.run_dir)  # the run's examples and metrics so far, into this machine's mirror
    run_dir = prepare_run_dir(cfg)
    log.info("run directory: %s%s", display_url(cfg.run_dir), f" (local mirror {run_dir})" if is_url(cfg.run_dir) else "")
    dataset = Dataset.for_data(cfg.data)
    write_run_examples(cfg, run_dir, check_data(cfg, dataset), dataset)
    push(cfg.run_dir, ["examples.png"])
    return run_dir, dataset


def pretrain_local(cfg: Config, resume: str | Path | None = None) -> Path:
    """The same training loop in this one process, without Ray (checkpoints in RUN_DIR/checkpoints)."""
    from pipeline.train.loop import train_worker
    from pipeline.train.preemption import install_sigterm_handler
    from pipeline.train.session import LocalSession

    if is_url(cfg.run_dir):
        raise ConfigError(f"run_dir={display_url(cfg.run_dir)}: `--local` runs write checkpoints to a local folder; give a local "
                          f"run_dir (object storage is for Ray runs, whose checkpoints Ray Train uploads)")
    run_dir, dataset = start_run(cfg, resume)
    install_sigterm_handler()  # SIGTERM: a checkpoint at the next step, then Preempted (when called from the main thread)
    train_worker(cfg, LocalSession(run_dir, device="cuda" if cfg.scaling.use_gpu else "cpu", keep=cfg.train.keep_checkpoints), dataset)
    plot_metrics(run_dir)
    return run_dir


def pretrain(cfg: Config, resume: str | Path | None = None) -> Path | str:
    """Runs pretraining under Ray Train and returns the run directory (its URL for a run on
    object storage).

    `resume` (a run directory or checkpoint) continues from its latest checkpoint: model,
    optimizers, schedulers, scaler and step.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.train.preemption import RayTrainLoop

    run_dir, _ = start_run(cfg, resume)  # each Ray worker opens the dataset in its own process
    check_local_resources(cfg)
    init_ray(cfg)
    check_cluster_resources(cfg)
    s = cfg.scaling
    # Ray's folder (checkpoint_* directories) lives inside our run directory, on a URL uploaded by Ray.
    storage_path, storage_filesystem = ray_storage(cfg.run_dir) if is_url(cfg.run_dir) else (str(run_dir), None)
    trainer = TorchTrainer(
        RayTrainLoop(),  # pipeline.train.loop.train_loop_per_worker, with a SIGTERM handler in each worker
        train_loop_config=cfg.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=(s.min_workers, s.max_workers) if s.elastic else s.num_workers, use_gpu=s.use_gpu,
            resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})},
            **({"elastic_resize_monitor_interval_s": s.resize_interval_s} if s.elastic else {}),
        ),
        run_config=ray.train.RunConfig(
            # A new name per launch: reusing one makes Ray silently restore that earlier attempt;
            # resuming is explicit.
            name=f"ray-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
        ),
    )
    start = time.perf_counter()
    result = trainer.fit()
    log.info("pretraining finished in %.0f s; checkpoint %s", time.perf_counter() - start, result.checkpoint.path if result.checkpoint else None)
    if result.error:
        raise result.error
    pull(cfg.run_dir, ["metrics.jsonl"])  # rank 0 may have run on another node
    plot_metrics(run_dir)
    push(cfg.run_dir, ["training_curves.png"])
    return cfg.run_dir if is_url(cfg.run_dir) else run_dir
