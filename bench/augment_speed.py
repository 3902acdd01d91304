"""Where view augmentation runs: per sample in the loader (data.augment_on=loader) against per
batch in the training process (data.augment_on=device), side by side in one run.

    python -m bench.augment_speed [--config configs/demo_fmnist.yaml] [--steps 120] [--repeats 2]

For each placement it measures (1) the augmentation alone: views of one batch of decoded images,
per sample as a loader worker makes them against one `on_batch` call, in samples/s on one thread;
(2) the loader alone: batches/s the train loader yields with that placement's transform; (3) the
whole training loop (`pretrain_local`, one process, all threads) in images/s from its own
metrics log, the first window dropped. Medians over repeats, with the host's steal and idle.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.host import HostWindow
from pipeline.config import Config


def augmentation_rates(cfg: Config, count: int = 512) -> dict[str, float]:
    """Samples/s of the task's views, per sample and per batch, one thread (what a loader worker has)."""
    from pipeline.data.decode import decoder_for
    from pipeline.data.shards import read_manifest, split_urls
    from pipeline.data.streaming import first_decoded
    from pipeline.train.tasks import build_task

    manifest = read_manifest(cfg.data.root)
    decoder = decoder_for(manifest, cfg.data.train_split, cfg.data.image_size)
    views = build_task(cfg, manifest, decoder).sample_transform()
    samples = first_decoded(split_urls(cfg.data.root, manifest, cfg.data.train_split), decoder, count)
    images = torch.stack([s["image"] for s in samples])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        views.on_batch(images[:64])  # warm-up
        start = time.perf_counter()
        for sample in samples:
            views(sample)
        per_sample = count / (time.perf_counter() - start)
        start = time.perf_counter()
        views.on_batch(images)
        per_batch = count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {"per_sample": per_sample, "per_batch": per_batch}


def loader_rate(cfg: Config, batches: int = 20) -> float:
    """Samples/s the train loader yields (decode, shuffle and the loader-side transform)."""
    from pipeline.data.decode import decoder_for
    from pipeline.data.shards import read_manifest, split_urls
    from pipeline.data.streaming import train_loader
    from pipeline.train.loop import split_augmentation
    from pipeline.train.tasks import build_task

    manifest = read_manifest(cfg.data.root)
    decoder = decoder_for(manifest, cfg.data.train_split, cfg.data.image_size)
    transform, _ = split_augmentation(cfg, build_task(cfg, manifest, decoder))
    loader = train_loader(split_urls(cfg.data.root, manifest, cfg.data.train_split), 0, 1, decoder, transform,
                          cfg.train.global_batch_size, cfg.data.shuffle_buffer, cfg.data.loader_workers, seed=0)
    batches_iter = iter(loader)
    next(batches_iter)
    start = time.perf_counter()
    for _ in range(batches):
        next(batches_iter)
    return batches * cfg.train.global_batch_size / (time.perf_counter() - start)


def training_rate(cfg: Config) -> float:
    from pipeline.train.launch import pretrain_local
    from pipeline.train.metrics import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        cfg.run_dir = str(Path(tmp) / "run")
        pretrain_local(cfg)
        rows = read_metrics(cfg.run_dir)
    rates = [r["images_per_s"] for r in rows[1:]]  # the first window holds start-up
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo_fmnist.yaml")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-augment/augment_speed.json")
    args = parser.parse_args(argv)

    results, host = {}, HostWindow.start()
    for repeat in range(args.repeats):
        for place in ("loader", "device"):
            cfg = Config.load(args.config, [f"--data.augment_on={place}", f"--train.steps={args.steps}", "--train.log_every=20",
                                            f"--train.checkpoint_every={args.steps}", "--eval.online_every=0", "--scaling.num_workers=1"])
            entry = results.setdefault(place, {"loader": [], "training": []})
            entry["loader"].append(loader_rate(cfg))
            entry["training"].append(training_rate(cfg))
            print(f"repeat {repeat + 1}/{args.repeats} {place}: loader {entry['loader'][-1]:.0f} samples/s, "
                  f"training {entry['training'][-1]:.0f} img/s", flush=True)
    rates = augmentation_rates(Config.load(args.config, []))
    report = {"config": args.config, "steps": args.steps, "repeats": args.repeats, **host.stop(),
              "augmentation_samples_per_s": {k: round(v) for k, v in rates.items()},
              **{place: {k: round(statistics.median(v), 1) for k, v in entry.items()} for place, entry in results.items()}}
    report["training_ratio_device_over_loader"] = round(report["device"]["training"] / report["loader"]["training"], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nviews of one batch, one thread: per sample {rates['per_sample']:.0f} samples/s, per batch {rates['per_batch']:.0f} "
          f"({rates['per_batch'] / rates['per_sample']:.1f}x)")
    print("| augment_on | loader samples/s | training img/s |\n|---|---|---|")
    for place in ("loader", "device"):
        print(f"| {place} | {report[place]['loader']:.0f} | {report[place]['training']:.0f} |")
    print(f"device / loader training throughput: {report['training_ratio_device_over_loader']}x "
          f"(steal {report.get('steal_pct', '-')}%, idle {report.get('idle_pct', '-')}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
