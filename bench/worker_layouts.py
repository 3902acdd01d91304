"""How to spend a node's cores: Ray workers x torch threads x loader processes, side by side.

    python -m bench.worker_layouts [--config configs/demo_fmnist.yaml] [--steps 60] [--repeats 2]

Each layout trains the same config (same global batch) under Ray Train for `--steps` steps;
layouts run interleaved (A B C D A B C D) so host drift spreads over all of them. Per layout:
samples/s from the run's own metrics (first window dropped), samples per CPU-second of every
process (Ray's and the loaders' included, start-up too), the host's steal and idle, and the nice
value each process of the run had (Ray starts its workers at its own niceness).

Layouts (on a 2-core node; `--cores` sets how many the layouts split):
- `1 x 2 threads + loader`: one worker with every core's thread, one loader process;
- `2 x 1 thread + loader each`: the cluster layout shrunk to one node (DDP over gloo);
- `2 x 1 thread, loading in-process`: no loader processes, so each worker owns one core;
- `1 x 1 thread, loading in-process`: the per-core reference for the previous one, whose ratio to it
  is the 2-worker scaling when each worker has a core to itself (what this machine can simulate of
  a node with a core per worker and per loader);
- `2 x 1 thread, in-process, per-worker batch norm`: the same without train.sync_batchnorm (global
  batch norm all-reduces each BN layer's statistics, forward and backward), to see what it costs.

`--only 3,5` runs a subset (1-based), still interleaved.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time
from pathlib import Path

from bench.host import CpuMeter, HostWindow
from bench.train_speed import pipeline_ray_rate
from pipeline.config import Config


def layouts(cores: int) -> dict[str, dict]:
    half = max(1, cores // 2)
    return {
        f"1 x {cores} threads + loader": {"workers": 1, "cpus": cores, "loaders": 1},
        f"2 x {half} thread{'s' if half > 1 else ''} + loader each": {"workers": 2, "cpus": half, "loaders": 1},
        f"2 x {half} thread{'s' if half > 1 else ''}, loading in-process": {"workers": 2, "cpus": half, "loaders": 0},
        f"1 x {half} thread{'s' if half > 1 else ''}, loading in-process": {"workers": 1, "cpus": half, "loaders": 0},
        f"2 x {half} thread{'s' if half > 1 else ''}, in-process, per-worker batch norm": {"workers": 2, "cpus": half, "loaders": 0,
                                                                                         "sync_batchnorm": False},
    }


def niceness_sampler(after_s: float) -> tuple[threading.Thread, dict]:
    """Records {process name: nice} of this process's descendants once, `after_s` into the run."""
    import psutil

    seen: dict[str, int] = {}

    def sample() -> None:
        time.sleep(after_s)
        for process in psutil.Process().children(recursive=True):
            try:
                name = " ".join(process.cmdline()[:3])[-60:] or process.name()
                if "ray::" in name or "python" in name or "raylet" in name or "gcs_server" in name:
                    seen[name.split("/")[-1]] = process.nice()
            except psutil.Error:
                continue

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return thread, seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo_fmnist.yaml")
    parser.add_argument("--data", default="data/fashion-mnist")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--only", help="comma-separated 1-based layout numbers to run (default: all)")
    parser.add_argument("--out", default="runs/bench-worker-layouts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    base = Config.load(args.config, [f"--data.root={args.data}"])
    out = Path(args.out)
    plan = layouts(args.cores)
    if args.only:
        keep = {int(i) - 1 for i in args.only.split(",")}
        plan = {name: layout for i, (name, layout) in enumerate(plan.items()) if i in keep}
    results: dict[str, list[dict]] = {name: [] for name in plan}
    for repeat in range(args.repeats):
        for name, layout in plan.items():
            cfg = Config.from_dict(base.to_dict())
            cfg.run_dir = str(out / f"{layout['workers']}w{layout['cpus']}t{layout['loaders']}l-{time.strftime('%H%M%S')}")
            cfg.scaling.num_workers, cfg.scaling.cpus_per_worker = layout["workers"], layout["cpus"]
            cfg.data.loader_workers = layout["loaders"]
            cfg.train.sync_batchnorm = layout.get("sync_batchnorm", cfg.train.sync_batchnorm)
            cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every = args.steps, max(5, args.steps // 6), 10**6
            cfg.eval.online_every = 0
            sampler, nice = niceness_sampler(20.0)
            window, cpu = HostWindow.start(), CpuMeter.start()
            rate, _ = pipeline_ray_rate(cfg)
            cpu_s, host = cpu.stop(), window.stop()
            sampler.join(timeout=1)
            results[name].append({"rate": rate, "per_cpu": args.steps * cfg.train.global_batch_size / cpu_s, "nice": dict(nice), **host})
            print(f"repeat {repeat + 1}/{args.repeats} {name}: {rate:.0f} samples/s, "
                  f"{results[name][-1]['per_cpu']:.0f}/CPU-s (steal {host.get('steal_pct', 0)}%, idle {host.get('idle_pct', 0)}%)", flush=True)

    median = {name: statistics.median(r["rate"] for r in rows) for name, rows in results.items()}
    per_cpu = {name: statistics.median(r["per_cpu"] for r in rows) for name, rows in results.items()}
    first = next(iter(plan))
    names = list(plan)
    print(f"\n{base.task.name} on {base.model.backbone}, global batch {base.train.global_batch_size}, {args.steps} steps per run, "
          f"median of {args.repeats} interleaved repeats (Ray start-up in the per-CPU figure, not in samples/s)\n")
    print(f"| layout ({args.cores} cores) | samples/s | vs `{first}` | samples/CPU-s | steal % | idle % |")
    print("|---|---|---|---|---|---|")
    for name, rows in results.items():
        print(f"| {name} | {median[name]:.0f} | {median[name] / median[first]:.2f} | {per_cpu[name]:.0f} | "
              f"{statistics.median(r.get('steal_pct', 0) for r in rows):.1f} | {statistics.median(r.get('idle_pct', 0) for r in rows):.1f} |")
    full = list(layouts(args.cores))
    if full[2] in median and full[3] in median:
        print(f"\n2 workers with a core each over 1 worker on one core (both loading in-process): {median[full[2]] / median[full[3]]:.2f}x")
    if full[2] in median and full[4] in median:
        print(f"global batch norm costs 2 in-process workers {1 - median[full[2]] / median[full[4]]:.0%} of their rate")
    print(f"nice values seen: {results[names[-1]][-1]['nice']}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "worker_layouts.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
