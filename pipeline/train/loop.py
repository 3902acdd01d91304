"""The per-worker training loop: the same code under Ray Train and in one plain process."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import socket
import time
from pathlib import Path

import torch

from core.errors import ConfigError
from pipeline.config import Config
from pipeline.data.bad_samples import BadSamples
from pipeline.data.dataset import Dataset
from pipeline.data.streaming import train_loader
from pipeline.train.checkpoint import CheckpointError
from pipeline.train.metrics import MetricsLog, memory_mb
from pipeline.train.online_eval import OnlineKNN
from pipeline.train.preemption import Preempted, PreemptionMonitor, training
from pipeline.train.run_storage import local_run_dir, pull, push
from pipeline.train.schedules import warmup_cosine
from pipeline.train.sync_batchnorm import convert_sync_batchnorm
from pipeline.train.tasks import build_task
from pipeline.train.tracking import open_trackers
from pretext.base import ImageOnly

log = logging.getLogger("sslpipe.train")

RUN_LOGS = ["metrics.jsonl", "metrics.csv", "samples", "tensorboard", "mlflow_run.json"]  # what rank 0 uploads at checkpoints (URL runs)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: runs in every worker process."""
    from pipeline.train.session import RaySession

    cfg = Config.from_dict(config)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per report is noise next to ours
    if not torch.cuda.is_available():
        torch.set_num_threads(cfg.scaling.cpus_per_worker)
    train_worker(cfg, RaySession())


def to_device(batch, device: torch.device, channels_last: bool = False):
    """Copies a batch (tensors in lists, tuples, dicts) to the device; non-blocking from pinned memory,
    4-D float tensors in NHWC layout when `channels_last`."""
    if isinstance(batch, torch.Tensor):
        if channels_last and batch.dim() == 4 and batch.is_floating_point():
            return batch.to(device, non_blocking=True, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


def write_worker_record(run_dir: Path, session, shards: list[str]) -> Path:
    """<run_dir>/workers/rank_N.json: where this rank runs and which shards it streams, so a
    multi-node run can be checked (placement, no shard read by two ranks) after the fact."""
    record = {"rank": session.rank, "world_size": session.world_size, "node": session.node, "host": socket.gethostname(),
              "pid": os.getpid(), "device": str(session.device), "shards": shards}
    path = run_dir / "workers" / f"rank_{session.rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return path


def autocast_factory(device: torch.device, enabled: bool):
    """Mixed precision on CUDA only: bf16 where supported (no loss scaling needed), else fp16."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext, torch.amp.GradScaler("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return functools.partial(torch.autocast, device_type="cuda", dtype=dtype), scaler




def split_augmentation(cfg: Config, task):
    """(loader transform, batch augmentation or None) for `data.augment_on`: with "device" the
    loader only decodes and the task's view augmentation runs per batch in this process."""
    transform = task.sample_transform()
    if cfg.data.augment_on == "loader" or (cfg.data.augment_on == "auto" and not hasattr(transform, "on_batch")):
        return transform, None
    if not hasattr(transform, "on_batch"):
        raise ConfigError(f"data.augment_on=device: task {cfg.task.name!r} transforms samples one at a time "
                          f"({type(transform).__name__} has no batched form); use data.augment_on=loader")
    return ImageOnly(), transform


def resumed_schedule(cfg: Config, state: dict, lr: float) -> dict:
    """The span of the learning-rate curve after a resume: the run's own (a crashed run, or an
    extension with train.resume_schedule=continue), or a new one over the added steps (restart)."""
    span = state.get("schedule") or {"start": 0, "steps": state["config"]["train"]["steps"]}  # checkpoints before spans
    if cfg.train.resume_schedule == "restart":
        return {"start": state["step"], "steps": max(1, cfg.train.steps - state["step"])}
    saved = state["config"]
    saved_lr = saved["optim"]["lr"] * saved["train"]["global_batch_size"] / 256
    if abs(saved_lr - lr) > 1e-12 * max(1.0, abs(lr)):
        raise ConfigError(f"optim.lr (scaled to the batch: {lr:g}) differs from the run's ({saved_lr:g}); the resumed learning-rate "
                          f"curve is the run's own: pass --train.resume_schedule=restart to start a new one from optim.lr")
    if cfg.train.steps > span["start"] + span["steps"]:
        log.warning("train.steps=%d extends the run past its learning-rate curve (steps %d-%d): the last value holds for the "
                    "added steps; --train.resume_schedule=restart runs a new warm-up and cosine over them instead",
                    cfg.train.steps, span["start"], span["start"] + span["steps"])
    return span


def span_schedule(curve, span: dict):
    """The curve `curve(step - start)` over `span`, holding its last value after the span ends."""
    def multiplier(step: int) -> float:
        return curve(min(max(step - span["start"], 0), span["steps"]))
    return multiplier


def train_worker(cfg: Config, session, dataset: Dataset | None = None) -> dict:
    """Trains `cfg.train.steps` steps (resuming from the session's latest checkpoint); returns the
    last metrics. `dataset`: the driver's, when it runs in this process (`--local`); else opened here."""
    run_dir = local_run_dir(cfg.run_dir)  # a URL run's local mirror (pipeline/train/run_storage.py)
    # Python's random drives some tasks' transforms (rotation, jigsaw, context): loader worker
    # processes get it seeded by torch's DataLoader; with data.loader_workers=0 they run here.
    torch.manual_seed(cfg.train.seed + session.rank)
    random.seed(cfg.train.seed * 1000 + session.rank)
    device = session.device
    dataset = dataset or Dataset.for_data(cfg.data)
    manifest = dataset.manifest
    urls = dataset.urls(cfg.data.train_split)
    decoder = dataset.decoder(cfg.data.train_split, cfg.data.image_size)

    task = build_task(cfg, manifest, decoder)
    if cfg.train.sync_batchnorm and session.world_size > 1:
        task = convert_sync_batchnorm(task, device)  # before DDP wraps it and the optimizers take its parameters
    task = task.to(device)
    channels_last = cfg.train.channels_last
    if channels_last:
        task = task.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        task.encoder.compile()  # in place: state_dict keys keep their names, checkpoints stay portable
    total = cfg.train.steps
    # Linear scaling rule: optim.lr is quoted for a global batch of 256.
    lr = cfg.optim.lr * cfg.train.global_batch_size / 256
    optimizers = task.make_optimizers(cfg.optim, lr)
    fresh_lrs = {name: [group["lr"] for group in opt.param_groups] for name, opt in optimizers.items()}
    autocast, scaler = autocast_factory(device, cfg.train.amp)

    start = 0
    schedule_span = {"start": 0, "steps": total}  # the steps the learning-rate curve runs over
    state = session.load_latest(cfg.train.resume_from)
    if state is not None:
        try:
            task.load_state_dict(state["task"], strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint at step {state['step']} does not fit task {cfg.task.name!r} / {cfg.model.backbone}: {err}") from err
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        if state["scaler"]:  # empty when saved without fp16 loss scaling (CPU, bf16)
            scaler.load_state_dict(state["scaler"])
        start = state["step"]
        schedule_span = resumed_schedule(cfg, state, lr)
        if start >= total and session.rank == 0:
            log.warning("the checkpoint is at step %d and train.steps=%d: nothing to train; raise train.steps to continue", start, total)
    schedule = span_schedule(warmup_cosine(schedule_span["steps"], cfg.optim.warmup_steps, cfg.optim.schedule), schedule_span)
    schedulers = {}
    for name, opt in optimizers.items():
        if state is not None and schedule_span["start"] > 0:  # a new curve from the task's configured rates
            for group, fresh in zip(opt.param_groups, fresh_lrs[name]):
                group["initial_lr"] = fresh
        schedulers[name] = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        if state is not None:
            if schedule_span["start"] == 0:  # the run's own curve: its base rates and position
                schedulers[name].load_state_dict(state["schedulers"][name])
            schedulers[name].last_epoch = start
            for group in opt.param_groups:  # the rate of step start + 1, the next one to run
                group["lr"] = group["initial_lr"] * schedule(start)
            schedulers[name]._last_lr = [group["lr"] for group in opt.param_groups]
    if state is not None and session.rank == 0:
        log.info("resumed from step %d at lr %.4g (%s schedule over steps %d-%d)", start, schedulers[next(iter(schedulers))].get_last_lr()[0],
                 "restarted" if schedule_span["start"] else "the run's", schedule_span["start"], schedule_span["start"] + schedule_span["steps"])
    task.prepare_distributed(session.wrap)

    batch_size = cfg.train.global_batch_size // session.world_size
    transform, batch_augment = split_augmentation(cfg, task)
    loader = train_loader(
        urls, session.rank, session.world_size, decoder, transform, batch_size,
        cfg.data.shuffle_buffer, cfg.data.loader_workers, seed=cfg.train.seed + start, pin_memory=device.type == "cuda",
        bad_samples=BadSamples.for_config(cfg.data), frames_per_sample=getattr(task, "frames_per_sample", 0),
    )
    write_worker_record(run_dir, session, loader.rank_shards)
    push(cfg.run_dir, [f"workers/rank_{session.rank}.json"])
    if session.rank == 0:
        pull(cfg.run_dir, ["metrics.jsonl", "metrics.csv"])  # a restart on another node continues the run's log
    metrics_log = MetricsLog(run_dir, open_trackers(cfg, start)) if session.rank == 0 else None
    # How eval must decode for this backbone (the task may feed it other channels than the data's).
    encoder_input = task.encoder_input({"channels": manifest["channels"], "mode": manifest["mode"], "image_size": decoder.image_size,
                                        "mean": decoder.mean.flatten().tolist(), "std": decoder.std.flatten().tolist()})
    online_knn = OnlineKNN(cfg, dataset, encoder_input) if cfg.eval.online_every and session.rank == 0 else None
    if session.rank == 0:
        log.info("%d worker%s, %d samples each per step (global batch %d)", session.world_size, "s" if session.world_size > 1 else "",
                 batch_size, cfg.train.global_batch_size)
    preemption = PreemptionMonitor(session, cfg.train.preemption_poll_every)
    resumed = state is not None
    batches = iter(loader)
    task.train()
    metrics: dict = {}
    sums: dict[str, float] = {}
    window_start, window_steps = time.perf_counter(), 0
    with training():  # SIGTERM from here on: a checkpoint at the next step boundary (pipeline/train/preemption.py)
        for step in range(start + 1, total + 1):
            batch = to_device(next(batches), device, channels_last)
            if batch_augment is not None:
                batch = (batch_augment.on_batch(batch[0]), batch[1])
            task.set_progress(step, total)
            out = task.train_step(batch, optimizers, scaler, autocast)
            for scheduler in schedulers.values():
                scheduler.step()
            for name, value in out.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())  # syncs; cheap next to a step
            window_steps += 1

            last = step == total
            notice = preemption.check(step)  # "sigterm", "drain" or None
            checkpoint_now = step % cfg.train.checkpoint_every == 0 or last or notice is not None
            if session.rank == 0 and (step % (cfg.train.figures_every or cfg.train.checkpoint_every) == 0 or last):
                figures = task.write_figures(run_dir / "samples", step, batch[0])
                if figures:
                    log.info("step %d: wrote %s", step, ", ".join(p.name for p in figures))
            if step % cfg.train.log_every == 0 or checkpoint_now:
                elapsed = time.perf_counter() - window_start
                metrics = session.all_reduce_mean({k: v / window_steps for k, v in sums.items()})
                # Summed over ranks: the bad samples skipped so far (this run, since the last start).
                metrics["bad_samples"] = round(session.all_reduce_mean({"bad": float(loader.bad_samples.bad.value)})["bad"] * session.world_size)
                if notice is not None:
                    metrics["notice"] = notice  # why this step has a checkpoint off the interval
                if resumed and step - window_steps == start:
                    metrics["resumed_from"] = start  # the first row after a (re)start from a checkpoint
                metrics.update(step=step, world_size=session.world_size, worker_batch=batch_size, lr=schedulers[next(iter(schedulers))].get_last_lr()[0],
                               images_per_s=round(window_steps * cfg.train.global_batch_size / elapsed, 1),
                               epoch=round(step * cfg.train.global_batch_size / manifest["splits"][cfg.data.train_split]["count"], 3))
                # The largest worker's memory (its loader processes apart), and wall time for throughput over any span.
                metrics.update({k: round(v, 1) for k, v in session.all_reduce_max(memory_mb()).items()}, time=round(time.time(), 3))
                if online_knn is not None and (step % cfg.eval.online_every == 0 or last):
                    # Rank 0 only: the other ranks wait at the next all-reduce, so the cost is wall time (online_eval_s).
                    metrics.update(online_knn(task.feature_extractor(), device))
                if metrics_log is not None:
                    metrics_log.write(metrics)
                    eta = (total - step) * elapsed / window_steps
                    online = f"  online_knn {metrics['online_knn']:.4f}" if "online_knn" in metrics else ""
                    log.info("step %d/%d  %s%s  %.0f img/s  eta %.0fs", step, total,
                             "  ".join(f"{k} {metrics[k]:.4f}" for k in out), online, metrics["images_per_s"], eta)
                state = None
                if checkpoint_now and session.rank == 0:
                    state = {
                        "task": task.state_dict(),
                        "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
                        "schedulers": {n: s.state_dict() for n, s in schedulers.items()},
                        "scaler": scaler.state_dict(),
                        "step": step,
                        "schedule": schedule_span,
                        "config": cfg.to_dict(),
                        "manifest": encoder_input,
                        "eval_encoder": task.eval_encoder,
                    }
                if checkpoint_now:
                    # Every rank reports at the same steps; only rank 0 passes a checkpoint. Only at
                    # checkpoints: a Ray Train report blocks on a barrier and on the controller taking
                    # the previous result (about 1 s here), which cut 1-worker throughput to 0.57 of the
                    # bare loop when every log row was reported (bench/train_speed.py). Our own log
                    # (metrics.jsonl, console) has every row.
                    session.report(metrics, state)
                    if session.rank == 0:
                        push(cfg.run_dir, RUN_LOGS)
                sums, window_start, window_steps = {}, time.perf_counter(), 0
            if notice == "sigterm" and not last:
                if metrics_log is not None:
                    metrics_log.close()
                raise Preempted(f"SIGTERM: stopped at step {step} of {total} after writing its checkpoint; "
                                f"the run continues from it (Ray Train restarts it within scaling.max_failures; "
                                f"otherwise `sslpipe pretrain --resume {run_dir}`)")
    if session.rank == 0:
        metrics_log.close()  # flushes TensorBoard, marks the MLflow run finished
        push(cfg.run_dir, RUN_LOGS)
        log.info("input: %s (rank 0; the metrics' bad_samples sums all ranks)", loader.bad_samples.summary())
    return metrics
