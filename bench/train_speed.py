"""Training throughput: the whole pipeline against a bare PyTorch loop, and 2 Ray workers against 1.

    python -m bench.train_speed [--config configs/rotation_fmnist.yaml] [--steps 300] [--repeats 2]
    python -m bench.train_speed --memory-epochs 5      # adds the 5-epoch memory run

Measured side by side in one run, with the same model, per-worker batch and one torch thread per
worker (the demo's scaling on a 2-core machine):

- bare loop: one process, forward/backward/step of the task's model on batches made once by the
  task's own transform and held in memory (no shards, no loader, no Ray, no logging, no checkpoints);
- pipeline without Ray: `train_worker` in this process (shards, loader process, metrics, checkpoints);
- pipeline under Ray Train with 1 worker, then with 2 workers (DDP over gloo, global batch doubled).

Pipeline throughput is taken from the run's own metrics log (wall clock between log rows, the first
window of warm-up dropped), so it includes loading, logging and checkpointing. Medians over repeats,
which run interleaved (bare, local, Ray 1, Ray 2, bare, ...). Beside each figure: samples per
CPU-second (every sample of the run over the CPU seconds of all its processes, Ray's and the
loaders' included, start-up too; `bench/host.py` CpuMeter) and the host's steal and idle time.
With --memory-epochs N the demo's 2-worker run trains N epochs and reports each worker's peak
RSS (process and loader workers) and its growth from the end of epoch 1 to the end.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from bench.host import CpuMeter, HostWindow
from pipeline.config import Config


def bare_loop_rate(cfg: Config, batch_size: int, steps: int, warmup: int = 5) -> float:
    """Samples/s of a plain training loop on in-memory batches (the floor any pipeline pays)."""
    from pipeline.data.decode import decoder_for
    from pipeline.data.shards import read_manifest, split_urls
    from pipeline.data.streaming import train_loader
    from pipeline.train.tasks import build_task

    torch.manual_seed(cfg.train.seed)
    manifest = read_manifest(cfg.data.root)
    decoder = decoder_for(manifest, cfg.data.train_split, cfg.data.image_size)
    task = build_task(cfg, manifest, decoder)
    loader = iter(train_loader(split_urls(cfg.data.root, manifest, cfg.data.train_split), 0, 1, decoder, task.sample_transform(),
                               batch_size, cfg.data.shuffle_buffer, 0, seed=0))
    batches = [next(loader) for _ in range(8)]
    del loader
    optimizer = task.make_optimizers(cfg.optim, cfg.optim.lr)["main"]
    task.train()
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        inputs, target = batches[step % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        task(inputs, target)["loss"].backward()
        optimizer.step()
    return steps * batch_size / (time.perf_counter() - start)


def logged_rate(run_dir: Path, global_batch: int) -> float:
    """Samples/s between the first and last metrics rows (the first window, warm-up, left out)."""
    from pipeline.train.metrics import read_metrics

    rows = read_metrics(run_dir)
    first, last = rows[0], rows[-1]
    return (last["step"] - first["step"]) * global_batch / (last["time"] - first["time"])


def run_config(base: Config, out: Path, name: str, workers: int, batch: int, steps: int, log_every: int) -> Config:
    cfg = Config.from_dict(base.to_dict())
    cfg.run_dir = str(out / f"{name}-{time.strftime('%H%M%S')}-{time.perf_counter_ns() % 10**6}")
    cfg.scaling.num_workers, cfg.scaling.cpus_per_worker = workers, 1
    cfg.train.global_batch_size, cfg.train.steps, cfg.train.log_every = batch * workers, steps, log_every
    return cfg


def pipeline_local_rate(cfg: Config) -> float:
    from pipeline.train.launch import pretrain_local

    return logged_rate(pretrain_local(cfg), cfg.train.global_batch_size)


def pipeline_ray_rate(cfg: Config) -> tuple[float, list[dict]]:
    from pipeline.train.launch import pretrain
    from pipeline.train.metrics import read_metrics

    run_dir = pretrain(cfg)
    return logged_rate(run_dir, cfg.train.global_batch_size), read_metrics(run_dir)


def memory_report(rows: list[dict]) -> dict:
    """Peak RSS, and growth from the first row at or past epoch 1 (buffers full) to the last row."""
    settled = next((r for r in rows if r["epoch"] >= 1.0), rows[0])
    last = rows[-1]
    return {
        "epochs": last["epoch"],
        "peak_rss_mb": max(r["rss_mb"] for r in rows),
        "peak_loader_rss_mb": max(r["loader_rss_mb"] for r in rows),
        "rss_epoch1_mb": settled["rss_mb"], "rss_last_mb": last["rss_mb"],
        "loader_rss_epoch1_mb": settled["loader_rss_mb"], "loader_rss_last_mb": last["loader_rss_mb"],
        "growth": (last["rss_mb"] + last["loader_rss_mb"]) / (settled["rss_mb"] + settled["loader_rss_mb"]) - 1,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/rotation_fmnist.yaml")
    parser.add_argument("--data", default="data/fashion-mnist")
    parser.add_argument("--batch-size", type=int, default=128, help="per worker")
    parser.add_argument("--steps", type=int, default=300, help="steps per pipeline run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-epochs", type=float, default=0.0, help="also run the 2-worker demo for this many epochs")
    parser.add_argument("--out", default="runs/bench-train-speed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from pipeline.data.ingest import write_fashion_mnist
    from pipeline.data.shards import MANIFEST

    if not (Path(args.data) / MANIFEST).is_file():
        write_fashion_mnist(args.data)
    base = Config.load(args.config, [f"--data.root={args.data}"])
    out = Path(args.out)
    torch.set_num_threads(1)  # the worker's thread count, in the bare loop and the in-process pipeline
    log_every = max(10, args.steps // 15)

    results: dict[str, list[float]] = {"bare": [], "local": [], "ray1": [], "ray2": []}
    per_cpu: dict[str, list[float]] = {k: [] for k in results}  # samples per CPU-second of the whole run
    host: dict[str, list[dict]] = {k: [] for k in results}
    loops = {
        "bare": lambda: (bare_loop_rate(base, args.batch_size, args.steps), (args.steps + 5) * args.batch_size),
        "local": lambda: (pipeline_local_rate(run_config(base, out, "local", 1, args.batch_size, args.steps, log_every)), args.steps * args.batch_size),
        "ray1": lambda: (pipeline_ray_rate(run_config(base, out, "ray1", 1, args.batch_size, args.steps, log_every))[0], args.steps * args.batch_size),
        "ray2": lambda: (pipeline_ray_rate(run_config(base, out, "ray2", 2, args.batch_size, args.steps, log_every))[0], 2 * args.steps * args.batch_size),
    }
    for repeat in range(args.repeats):  # interleaved: bare, local, ray1, ray2, bare, ... so drift hits all alike
        for name, loop in loops.items():
            window, cpu = HostWindow.start(), CpuMeter.start()
            rate, samples = loop()
            cpu_s = cpu.stop()
            results[name].append(rate)
            per_cpu[name].append(samples / cpu_s if cpu_s else float("nan"))
            host[name].append(window.stop() | {"cpu_s": cpu_s})
        print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.0f}/s ({per_cpu[k][-1]:.0f}/CPU-s)" for k, v in results.items()), flush=True)
    median = {k: statistics.median(v) for k, v in results.items()}
    median_cpu = {k: statistics.median(v) for k, v in per_cpu.items()}
    steal = {k: statistics.fmean(h.get("steal_pct", 0.0) for h in v) for k, v in host.items()}
    idle = {k: statistics.fmean(h.get("idle_pct", 0.0) for h in v) for k, v in host.items()}

    memory = None
    if args.memory_epochs:
        cfg = Config.load(args.config, [f"--data.root={args.data}"])
        count = json.loads((Path(args.data) / MANIFEST).read_text())["splits"][cfg.data.train_split]["count"]
        steps = round(args.memory_epochs * count / cfg.train.global_batch_size)
        cfg.run_dir = str(out / f"memory-{time.strftime('%H%M%S')}")
        cfg.train.steps, cfg.train.log_every = steps, 20
        memory_rate, rows = pipeline_ray_rate(cfg)
        memory = memory_report(rows) | {"rate": memory_rate, "workers": cfg.scaling.num_workers, "steps": steps}

    print(f"\ntraining throughput, {base.task.name} on {base.model.backbone} ({args.batch_size} per worker, 1 torch thread per worker, "
          f"{base.data.loader_workers} loader worker(s) per Ray worker; samples/s, median of {args.repeats})")
    print("(samples per CPU-second: every sample of the run over the CPU time of all its processes, start-up included; on a shared\n"
          " host it is the figure to compare, as steal and neighbours move wall-clock rates)")
    print("| loop | samples/s | ratio | samples/CPU-s | ratio | steal % | idle % |\n|---|---|---|---|---|---|---|")
    rows = [("bare loop, in-memory batches, 1 process", "bare", "bare", "1.00", "1.00"),
            ("pipeline without Ray (shards, loader, logs, checkpoints)", "local", "bare", "of bare", "of bare"),
            ("pipeline, Ray Train, 1 worker", "ray1", "bare", "of bare (target 0.9)", "of bare"),
            ("pipeline, Ray Train, 2 workers", "ray2", "ray1", "x 1 worker (target 1.7)", "x 1 worker")]
    for label, name, against, wall_note, cpu_note in rows:
        wall = "1.00" if name == against else f"{median[name] / median[against]:.2f} {wall_note}"
        per = "1.00" if name == against else f"{median_cpu[name] / median_cpu[against]:.2f} {cpu_note}"
        print(f"| {label} | {median[name]:.0f} | {wall} | {median_cpu[name]:.0f} | {per} | {steal[name]:.1f} | {idle[name]:.1f} |")
    if memory:
        print(f"\nmemory over {memory['epochs']:.2f} epochs ({memory['workers']} Ray workers, {memory['steps']} steps, {memory['rate']:.0f} samples/s): "
              f"largest worker peak RSS {memory['peak_rss_mb']:.0f} MiB + its loader process(es) {memory['peak_loader_rss_mb']:.0f} MiB; "
              f"epoch 1 -> end: worker {memory['rss_epoch1_mb']:.0f} -> {memory['rss_last_mb']:.0f} MiB, "
              f"loader {memory['loader_rss_epoch1_mb']:.0f} -> {memory['loader_rss_last_mb']:.0f} MiB, "
              f"growth {100 * memory['growth']:+.1f}% (target under 5%)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_speed.json").write_text(json.dumps({"samples_per_s": results, "median": median, "samples_per_cpu_s": per_cpu,
                                                                   "median_per_cpu_s": median_cpu, "host": host, "memory": memory}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
