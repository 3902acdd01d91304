"""GPU training throughput: precision and layout settings on a bare loop, and the pipeline against it.

    python -m bench.gpu_speed [--models resnet50@224,resnet18@32] [--batch-size 256] [--steps 60]
                              [--loader-workers 12] [--compile] [--peak-tflops 989]

Runs without Ray (one process, `train_worker` with a `LocalSession`): the per-worker loop is what a
GPU node runs, and GPU machines may lack Ray. For each backbone at its image size:

- bare loop on random tensors already on the GPU (rotation task: backbone + 4-way head), in fp32,
  then AMP bf16, then bf16 + channels_last, then (--compile) + torch.compile;
- loader alone: samples/s of the shard pipeline (JPEG decode, rotation, collate, pinned memory)
  with --loader-workers processes, no model: what the CPU side can feed;
- pipeline: shards -> loader -> bf16 + channels_last (+ compile) training -> logs and checkpoint,
  throughput from its own metrics log; ratio against the bare loop with the same settings.

Model FLOPs per image (forward + backward) are counted by torch's FlopCounterMode, so the achieved
TFLOP/s and the fraction of the GPU's peak (--peak-tflops: dense bf16 of the GPU, 989 for an H100
SXM) are measured, not assumed. Shards are synthetic RGB JPEGs (smooth random blobs, quality 90),
written once under --out. Prints a table; writes OUT/gpu_speed.json. On a CPU it runs too (small
--steps), which is how the test suite checks it.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config


def synthetic_shards(root: Path, size: int, count: int) -> Path:
    """`count` RGB JPEGs of `size` px (smooth colour blobs: JPEG sizes like photos, not like noise)."""
    from PIL import Image

    from pipeline.data.shards import MANIFEST, Sample, write_manifest, write_split

    if (root / MANIFEST).is_file():
        return root
    rng = np.random.default_rng(0)

    def samples():
        for i in range(count):
            low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            image = Image.fromarray(low).resize((size, size), Image.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            yield Sample(f"s{i:06d}", buffer.getvalue(), "jpg", int(rng.integers(0, 10)))

    splits = {"train": write_split(samples(), root, "train", count, "RGB", samples_per_shard=max(1, count // 32))}
    write_manifest(root, f"synthetic-jpeg-{size}px", [str(c) for c in range(10)], "RGB", splits)
    return root


def bench_config(data: Path, backbone: str, size: int, batch: int, steps: int, loader_workers: int, compile_model: bool,
                 device: str, run_dir: Path) -> Config:
    cfg = Config.from_dict({
        "data": {"root": str(data), "image_size": size, "loader_workers": loader_workers, "shuffle_buffer": 2000},
        "model": {"backbone": backbone},
        "task": {"name": "rotation", "options": {"head_hidden": []}},
        "optim": {"name": "sgd", "lr": 0.1, "warmup_steps": 0},
        "train": {"steps": steps, "global_batch_size": batch, "log_every": max(1, steps // 6), "checkpoint_every": steps,
                  "amp": True, "channels_last": True, "compile": compile_model},
        "scaling": {"num_workers": 1, "use_gpu": device == "cuda"},
        "run_dir": str(run_dir),
    })
    return cfg


def flops_per_image(task, size: int, device: torch.device) -> float:
    """Forward + backward FLOPs of one training image, counted on a batch of 2."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = torch.randn(2, 3, size, size, device=device)
    target = torch.zeros(2, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        task(inputs, target)["loss"].backward()
    task.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def bare_rate(task, size: int, batch: int, steps: int, device: torch.device, amp: bool, channels_last: bool,
              compile_model: bool, warmup: int = 10) -> float:
    """Images/s of forward/backward/step on random tensors resident on the device."""
    from pipeline.train.loop import autocast_factory

    task = task.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    forward = torch.compile(task) if compile_model else task
    optimizer = torch.optim.SGD(task.parameters(), lr=0.01, momentum=0.9)
    autocast, scaler = autocast_factory(device, amp)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    inputs = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    target = torch.randint(0, 4, (batch,), device=device)
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = forward(inputs, target)["loss"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def loader_rate(cfg: Config, batches: int) -> float:
    from pipeline.data.decode import decoder_for
    from pipeline.data.shards import read_manifest, split_urls
    from pipeline.data.streaming import train_loader
    from pretext.spatial.rotation import RotationTransform

    manifest = read_manifest(cfg.data.root)
    decoder = decoder_for(manifest, "train", cfg.data.image_size)
    loader = train_loader(split_urls(cfg.data.root, manifest, "train"), 0, 1, decoder, RotationTransform(False),
                          cfg.train.global_batch_size, cfg.data.shuffle_buffer, cfg.data.loader_workers, seed=0,
                          pin_memory=torch.cuda.is_available())
    it = iter(loader)
    for _ in range(max(3, cfg.data.loader_workers)):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * cfg.train.global_batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50@224,resnet18@32", help="backbone@image_size, comma separated")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3, help="bare-loop repeats (median)")
    parser.add_argument("--loader-workers", type=int, default=12)
    parser.add_argument("--images", type=int, default=8192, help="synthetic images per size")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/bench-gpu-speed")
    args = parser.parse_args(argv)

    from pipeline.train.launch import pretrain_local
    from pipeline.train.metrics import read_metrics
    from pipeline.train.tasks import build_task

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "models": {}}
    for spec in args.models.split(","):
        backbone, size = spec.split("@")
        size = int(size)
        data = synthetic_shards(out / f"data-{size}px", size, args.images)
        settings = [("fp32", False, False, False), ("bf16", True, False, False), ("bf16 + channels_last", True, True, False)]
        if args.compile:
            settings.append(("bf16 + channels_last + compile", True, True, True))
        cfg = bench_config(data, backbone, size, args.batch_size, args.steps, args.loader_workers, args.compile, device.type,
                           out / f"run-{backbone}-{size}-{time.strftime('%H%M%S')}")
        from pipeline.data.decode import decoder_for
        from pipeline.data.shards import read_manifest

        manifest = read_manifest(data)
        task = build_task(cfg, manifest, decoder_for(manifest, "train", size)).to(device)
        flops = flops_per_image(task, size, device)
        row = {"flops_per_image": flops, "bare": {}}
        for name, amp, channels_last, compile_model in settings:
            rates = [bare_rate(task, size, args.batch_size, args.steps, device, amp, channels_last, compile_model) for _ in range(args.repeats)]
            row["bare"][name] = statistics.median(rates)
            print(f"{spec} bare {name}: {row['bare'][name]:.0f} img/s", flush=True)
        row["loader"] = loader_rate(cfg, max(5, args.steps // 3))
        print(f"{spec} loader alone ({args.loader_workers} workers): {row['loader']:.0f} img/s", flush=True)
        run_dir = pretrain_local(cfg)
        rows = read_metrics(run_dir)
        row["pipeline"] = (rows[-1]["step"] - rows[0]["step"]) * args.batch_size / (rows[-1]["time"] - rows[0]["time"])
        print(f"{spec} pipeline: {row['pipeline']:.0f} img/s", flush=True)
        report["models"][spec] = row

    print(f"\nGPU training throughput on {report['device']} (batch {args.batch_size}, images/s, bare loop median of {args.repeats})")
    print("| model | FLOPs/img (fwd+bwd) | setting | bare loop img/s | TFLOP/s | of peak |\n|---|---|---|---|---|---|")
    for spec, row in report["models"].items():
        for name, rate in row["bare"].items():
            tflops = rate * row["flops_per_image"] / 1e12
            print(f"| {spec} | {row['flops_per_image'] / 1e9:.2f} G | {name} | {rate:.0f} | {tflops:.1f} | {100 * tflops / args.peak_tflops:.1f}% |")
    print("\n| model | bare (pipeline's settings) | loader alone | pipeline | pipeline / bare (target 0.85) | CPU decode |\n|---|---|---|---|---|---|")
    for spec, row in report["models"].items():
        bare = list(row["bare"].values())[-1]
        verdict = "keeps up" if row["loader"] >= bare else (
            f"short by {100 * (1 - row['loader'] / bare):.0f}%: pre-resize shards to the training size, add loader workers, "
            f"or decode/augment on the GPU")
        print(f"| {spec} | {bare:.0f} | {row['loader']:.0f} | {row['pipeline']:.0f} | {row['pipeline'] / bare:.2f} | {verdict} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_speed.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
