"""Ingest throughput: writing Fashion-MNIST's 60,000 training images as shards, as `sslpipe data
fashion-mnist` does, in one process and with a process pool.

    python -m bench.ingest_speed [--workers 1,2] [--repeats 3] [--split train]

Settings, interleaved over repeats (ABC ABC, so host drift spreads over all of them):
- `decode check, 1 process`: the writer as it was before `--workers`: it decodes every PNG it has
  just encoded, for the statistics (a stream of samples; what `data folder` still does);
- `N process(es)`: `write_split` of an `ImageArraySource`, which hands the writer its pixels.

Each row: samples/s (median), samples per CPU-second of all processes (`bench.host.CpuMeter`), the
host's steal and idle, and whether every shard's sha256 matches the 1-process output.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.host import CpuMeter, HostWindow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", help="folder of the Fashion-MNIST idx .gz files (default: the usual places)")
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--workers", default="1,2", help="process counts to measure")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from pipeline.data.shards import ImageArraySource, Sample, encode_png, write_split
    from pipeline.data.sources import find_fashion_mnist, load_fashion_mnist

    images, labels = load_fashion_mnist(find_fashion_mnist(args.src), args.split)

    def decoding_stream():  # the pre-`--workers` writer: no pixels, so it decodes each PNG again
        for index, (image, label) in enumerate(zip(images, labels)):
            yield Sample(f"{args.split}_{index:06d}", encode_png(image), "png", int(label))

    settings = {"decode check, 1 process": (decoding_stream, 1)}
    for workers in (int(w) for w in args.workers.split(",")):
        settings[f"{workers} process{'es' if workers > 1 else ''}"] = (lambda: ImageArraySource(images, labels, args.split), workers)
    results: dict[str, list[dict]] = {name: [] for name in settings}
    scratch = Path(tempfile.mkdtemp(prefix="ingest-speed-"))
    try:
        for repeat in range(args.repeats):
            for name, (make, workers) in settings.items():
                out = scratch / f"{repeat}-{len(results[name])}-{workers}"
                window, cpu = HostWindow.start(), CpuMeter.start()
                start = time.perf_counter()
                entry = write_split(make(), out, args.split, len(images), "L", progress=False, workers=workers)
                seconds = time.perf_counter() - start
                cpu_seconds, host = cpu.stop(), window.stop()
                results[name].append({"rate": len(images) / seconds, "per_cpu": len(images) / max(cpu_seconds, 1e-9),
                                      "shas": [s["sha256"] for s in entry["shards"]], **host})
                print(f"repeat {repeat + 1}/{args.repeats} {name}: {results[name][-1]['rate']:,.0f} samples/s "
                      f"(steal {host.get('steal_pct', 0)}%, idle {host.get('idle_pct', 0)}%)", flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    reference = results["1 process"][0]["shas"] if "1 process" in results else None
    base = statistics.median(r["rate"] for r in results["decode check, 1 process"])
    base_cpu = statistics.median(r["per_cpu"] for r in results["decode check, 1 process"])
    one = statistics.median(r["rate"] for r in results.get("1 process", results["decode check, 1 process"]))
    print(f"\nFashion-MNIST {args.split} ({len(images):,} images) -> shards, median of {args.repeats} interleaved repeats\n")
    print("| writer | samples/s | vs before | vs 1 process | samples/CPU-s | vs before | steal % | idle % | same bytes as 1 process |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        rate = statistics.median(r["rate"] for r in rows)
        per_cpu = statistics.median(r["per_cpu"] for r in rows)
        same = "yes" if reference and all(r["shas"] == reference for r in rows) else "no"
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x | {rate / one:.2f}x | {per_cpu:,.0f} | {per_cpu / base_cpu:.2f}x | "
              f"{statistics.median(r.get('steal_pct', 0) for r in rows):.1f} | {statistics.median(r.get('idle_pct', 0) for r in rows):.1f} | {same} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
