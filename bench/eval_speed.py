"""Eval-stage speed, measured side by side in one run (medians over repeats):

- feature extraction: images/s of shards -> decoder -> backbone -> pooled features;
- weighted kNN: ours (torch, chunked matrix product + top-k) against scikit-learn's
  KNeighborsClassifier configured to the same rule (cosine distance, weights exp(-d / T), which
  is exp(similarity / T) up to a constant), predictions checked identical;
- linear probe wall time (L-BFGS in torch, C chosen on a held-out tenth of train).

    python -m bench.eval_speed [--data data/fashion-mnist] [--repeats 3] [--features exemplar-run-dir]

Features are those of a random-init backbone of the demo's config unless a run directory is given
(what is timed does not depend on the weights).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/fashion-mnist")
    parser.add_argument("--config", default="configs/rotation_fmnist.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args(argv)

    from sklearn.neighbors import KNeighborsClassifier

    from core.knn import knn_predict
    from eval.features import extract_features
    from eval.linear_probe import linear_probe
    from models.backbone import create_backbone
    from pipeline.config import Config
    from pipeline.data.decode import decoder_for
    from pipeline.data.ingest import write_fashion_mnist
    from pipeline.data.shards import MANIFEST, read_manifest, split_urls

    if not (Path(args.data) / MANIFEST).is_file():
        write_fashion_mnist(args.data)
    cfg = Config.load(args.config, [f"--data.root={args.data}"])
    manifest = read_manifest(args.data)
    decoder = decoder_for(manifest, "train", 0, require_label=True)
    torch.manual_seed(0)
    backbone = create_backbone(cfg.model, manifest["channels"])
    threads = torch.get_num_threads()

    rows = []
    extract_s, train = timed(lambda: extract_features(backbone, split_urls(args.data, manifest, "train"), decoder, 512, 1, "cpu", desc="train"), 1)
    test = extract_features(backbone, split_urls(args.data, manifest, "test"), decoder, 512, 1, "cpu", desc="test")
    rows.append(("feature extraction (train split, 1 loader worker)", f"{len(train.keys) / extract_s:.0f} img/s", f"{extract_s:.1f} s"))

    temperature = cfg.eval.knn_temperature
    ours_s, ours = timed(lambda: knn_predict(train.features, train.labels, test.features, args.k, temperature), args.repeats)
    x_train, x_test = train.features.numpy().astype(np.float64), test.features.numpy().astype(np.float64)
    sklearn = KNeighborsClassifier(n_neighbors=args.k, metric="cosine", algorithm="brute", weights=lambda d: np.exp(-d / temperature),
                                   n_jobs=threads)
    sklearn_s, theirs = timed(lambda: sklearn.fit(x_train, train.labels.numpy()).predict(x_test), args.repeats)
    agree = float((ours.numpy() == theirs).mean())
    rows.append((f"kNN k={args.k}, 60k x 10k, ours", f"{ours_s:.2f} s", ""))
    rows.append((f"kNN k={args.k}, scikit-learn brute cosine", f"{sklearn_s:.2f} s", f"ours {sklearn_s / ours_s:.1f}x faster; predictions identical on {100 * agree:.2f}%"))

    probe_s, probe = timed(lambda: linear_probe(train.features, train.labels, test.features, test.labels, cfg.eval.linear_C,
                                                cfg.eval.linear_val_fraction), 1)
    rows.append((f"linear probe ({len(cfg.eval.linear_C)} C values + refit)", f"{probe_s:.1f} s", f"top-1 {100 * probe.accuracy:.2f}%"))

    print(f"\neval speed on {manifest['name']} ({torch.get_num_threads()} torch threads, {cfg.model.backbone} random init, {train.features.shape[1]}-d)")
    print("| measurement | value | note |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
