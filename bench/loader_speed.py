"""Loader throughput: the shard pipeline against the same samples served from memory, per task.

    python -m bench.loader_speed [--tasks rotation,jigsaw,exemplar] [--workers 0,1,2] [--repeats 3]

For each task, samples/s of the training loader (tar read, decode, shuffle buffer, the task's
transform, collate into batches) with 0 (in the calling process), 1 and 2 loader worker
processes, next to the floor every loader pays: the same decoded samples, held in memory, through
the task's transform and collate in one process. Also the read-only and decode-only rates, which
say where a slow loader spends its time. Medians over repeats; one rank, the first training shard
(5,000 samples) for the memory rows. Compare with the training step's own rate (bench.train_speed):
a loader is fast enough when it outruns the step on the cores it gets.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch

DEFAULT_TASKS = "rotation,jigsaw,exemplar"


def task_config(name: str, data: str):
    from bench.quality import TASK_CONFIGS
    from pipeline.config import Config

    return Config.load(TASK_CONFIGS.get(name, "configs/rotation_fmnist.yaml"), [f"--data.root={data}", f"--task.name={name}"])


def rate(batches, batch_size: int, count: int, repeats: int, warmup: int = 3) -> float:
    """Median samples/s over `repeats` runs of `count` batches from one iterator (after warm-up)."""
    for _ in range(warmup):
        next(batches)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(count):
            next(batches)
        rates.append(count * batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/fashion-mnist")
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--workers", default="0,1,2", help="loader worker counts to measure")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=30, help="batches per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import webdataset as wds

    from pipeline.data.decode import decoder_for
    from pipeline.data.ingest import write_fashion_mnist
    from pipeline.data.shards import MANIFEST, read_manifest, split_urls
    from pipeline.data.streaming import collate, train_loader
    from pipeline.train.tasks import build_task

    if not (Path(args.data) / MANIFEST).is_file():
        write_fashion_mnist(args.data)
    torch.set_num_threads(1)  # as in a Ray worker with one CPU
    manifest = read_manifest(args.data)
    urls = split_urls(args.data, manifest, "train")
    worker_counts = [int(w) for w in args.workers.split(",")]
    n = args.batch_size * args.batches

    # Stages without a task: what reading and decoding alone cost per sample.
    decoder = decoder_for(manifest, "train", 0)
    start = time.perf_counter()
    raw = list(itertools.islice(iter(wds.DataPipeline(wds.SimpleShardList(urls[:1]), wds.tarfile_to_samples())), n))
    read_rate = len(raw) / (time.perf_counter() - start)
    start = time.perf_counter()
    decoded = [decoder(s) for s in raw]
    decode_rate = len(decoded) / (time.perf_counter() - start)

    rows = []
    for name in args.tasks.split(","):
        cfg = task_config(name, args.data)
        decoder = decoder_for(manifest, "train", cfg.data.image_size)
        transform = build_task(cfg, manifest, decoder).sample_transform()
        samples = decoded if decoder.image_size == manifest["splits"]["train"]["image_size"][0] else [decoder(s) for s in raw]

        def from_memory():
            for i in itertools.cycle(range(0, len(samples) - args.batch_size + 1, args.batch_size)):
                yield collate([transform(s) for s in samples[i : i + args.batch_size]])

        memory = rate(from_memory(), args.batch_size, args.batches, args.repeats)
        row = {"task": name, "memory": memory}
        for workers in worker_counts:
            loader = train_loader(urls, 0, 1, decoder, transform, args.batch_size, cfg.data.shuffle_buffer, workers, seed=0)
            batches = iter(loader)
            row[workers] = rate(batches, args.batch_size, args.batches, args.repeats, warmup=3 + 2 * workers)
            del batches, loader  # stops the worker processes before the next measurement
        rows.append(row)
        print(f"{name}: memory {memory:.0f}/s, " + ", ".join(f"{w} loader worker(s) {row[w]:.0f}/s" for w in worker_counts), flush=True)

    print(f"\nloader throughput, samples/s ({manifest['name']}, batch {args.batch_size}, median of {args.repeats}; "
          f"{torch.get_num_threads()} torch thread in the main process)")
    print(f"read only (tar, 1 process): {read_rate:.0f}/s; decode only (PNG -> normalized tensor): {decode_rate:.0f}/s\n")
    print("| task | from memory (transform + collate) | " + " | ".join(f"{w} loader worker(s)" for w in worker_counts)
          + " | " + " | ".join(f"{w} workers / memory" for w in worker_counts) + " |")
    print("|---" * (2 + 2 * len(worker_counts)) + "|")
    for row in rows:
        print(f"| {row['task']} | {row['memory']:.0f} | " + " | ".join(f"{row[w]:.0f}" for w in worker_counts)
              + " | " + " | ".join(f"{row[w] / row['memory']:.2f}" for w in worker_counts) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
