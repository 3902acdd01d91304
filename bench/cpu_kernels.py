"""CPU training kernels: memory layout and torch.compile on the configs' models, side by side.

    python -m bench.cpu_kernels [--configs configs/demo_fmnist.yaml,configs/rotation_fmnist.yaml] [--steps 12] [--repeats 3]

For each config, the task's training step (forward, backward, SGD step) on one fixed batch of its
own views, held in memory, in one process with all of the machine's threads, under four settings:
eager NCHW (the default before this benchmark), channels_last (NHWC weights: oneDNN's blocked
convolutions skip their layout reorders), torch.compile (inductor) of the backbone, and both.
Settings are interleaved (ABCD ABCD ..., not AAAA BBBB) so that a noisy neighbour hits them alike;
each figure is the median step over the repeats, with the host's steal and idle beside it. FLOPs per
step are counted by torch's FlopCounterMode, and the achieved GFLOP/s are set against the cores'
float32 matrix-multiply peak, measured here on a 2048^3 matmul.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.host import HostWindow

SETTINGS = {"eager": (False, False), "channels_last": (True, False), "compile": (False, True), "channels_last + compile": (True, True)}


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build_step(config: str, channels_last: bool, compiled: bool):
    """(one training step on a fixed batch, images per step, FLOPs per step) for the config's task."""
    from pipeline.config import Config
    from pipeline.data.decode import decoder_for
    from pipeline.data.shards import read_manifest
    from pipeline.train.tasks import build_task

    cfg = Config.load(config, [])
    torch.manual_seed(cfg.train.seed)
    manifest = read_manifest(cfg.data.root)
    task = build_task(cfg, manifest, decoder_for(manifest, cfg.data.train_split, cfg.data.image_size))
    batch = cfg.train.global_batch_size
    images = torch.randn(batch, manifest["channels"], *([task.image_size] * 2))
    transform = task.sample_transform()
    if hasattr(transform, "on_batch"):
        inputs, target = transform.on_batch(images), torch.zeros(batch, dtype=torch.long)
    else:
        from pipeline.data.streaming import collate

        inputs, target = collate([transform({"image": image, "label": 0}) for image in images])
    if channels_last:
        task = task.to(memory_format=torch.channels_last)
    if compiled:
        task.encoder.compile()
    optimizer = torch.optim.SGD(task.parameters(), lr=0.01, momentum=0.9)
    task.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        task(inputs, target)["loss"].backward()
        optimizer.step()

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        task(inputs, target)["loss"].backward()
    optimizer.zero_grad(set_to_none=True)
    return step, batch, counter.get_total_flops()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="configs/demo_fmnist.yaml,configs/rotation_fmnist.yaml")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per repeat (after 3 warm-up steps)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    peak = matmul_peak_gflops()
    print(f"threads: {torch.get_num_threads()}, float32 matmul peak: {peak:.0f} GFLOP/s")
    print("| config | setting | images/s | vs eager | GFLOP/s | of peak | steal % | idle % |\n|---|---|---|---|---|---|---|---|")
    for config in args.configs.split(","):
        steps = {name: build_step(config, *flags) for name, flags in SETTINGS.items()}
        for step, _, _ in steps.values():
            for _ in range(3):  # warm-up (and compilation)
                step()
        times = {name: [] for name in SETTINGS}
        host = {name: [] for name in SETTINGS}
        for _ in range(args.repeats):
            for name, (step, _, _) in steps.items():
                window = HostWindow.start()
                for _ in range(args.steps):
                    times[name].append(_timed(step))
                host[name].append(window.stop())
        eager = None
        for name, (_, batch, flops) in steps.items():
            rate = batch / statistics.median(times[name])
            eager = eager or rate
            gflops = flops * rate / batch / 1e9
            steal = statistics.fmean(h.get("steal_pct", 0) for h in host[name])
            idle = statistics.fmean(h.get("idle_pct", 0) for h in host[name])
            print(f"| {config} | {name} | {rate:.0f} | {rate / eager:.2f}x | {gflops:.0f} | {100 * gflops / peak:.0f}% | {steal:.1f} | {idle:.1f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
