"""Baseline scores cached across runs: raw pixels and a random-init backbone score the same on the
same data, backbone, seed and eval settings, so a second `sslpipe eval` (or demo) reuses them.

An entry is a JSON file named by the SHA-256 of its key, and it stores the key itself: a file whose
stored key differs from the one asked for (a hash collision, a hand-edited or truncated file) is
ignored, never trusted. The key holds everything the score depends on:
- the data: every train and test shard's file name, sample count and SHA-256 from the manifest
  (data without checksums is never cached);
- the decoding: colour mode, image size, mean and std;
- the scoring: kNN k and temperature, the probe's C grid and held-out fraction, the protocols
  and their settings, and
  SCORING_VERSION, raised whenever core/knn.py or eval/linear_probe.py changes what they compute;
- for the random-init backbone: the model config, the seed, the input channels, the torch and
  timm versions (their initializers draw the weights) and eval.precise_bn.

Rows are stored only from a complete read (no bad or missing samples) and used only when the
current run's own read is complete too. The folder is `$SSLPIPE_CACHE/baselines`, default
`~/.cache/sslpipe/baselines`; `--eval.cache_baselines=false` turns the cache off.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from pipeline.train.run_storage import cache_root

log = logging.getLogger("sslpipe.eval")

SCORING_VERSION = 1


def cache_folder() -> Path:
    return cache_root() / "baselines"


def baseline_key(name: str, cfg, manifest: dict, decoder, channels: int) -> dict | None:
    """What baseline `name`'s scores depend on; None where the data cannot be identified (a
    manifest without shard checksums)."""
    shards = {}
    for split in (cfg.data.train_split, cfg.data.test_split):
        listed = manifest["splits"][split]["shards"]
        if not all(shard.get("sha256") for shard in listed):
            return None
        shards[split] = [[shard["file"], shard["count"], shard["sha256"]] for shard in listed]
    key = {
        "scoring_version": SCORING_VERSION,
        "baseline": name,
        "dataset": manifest.get("name"),
        "shards": shards,
        "decoder": {"mode": decoder.mode, "image_size": decoder.image_size,
                    "mean": [round(float(v), 8) for v in decoder.mean.flatten()], "std": [round(float(v), 8) for v in decoder.std.flatten()]},
        "eval": {"knn_k": list(cfg.eval.knn_k), "knn_temperature": cfg.eval.knn_temperature, "linear_C": list(cfg.eval.linear_C),
                 "linear_val_fraction": cfg.eval.linear_val_fraction, "protocols": sorted(cfg.eval.protocols),
                 "low_shot": [list(cfg.eval.low_shot_fractions), list(cfg.eval.low_shot_shots), cfg.eval.low_shot_seeds]},
    }
    if name == "random_init":
        import timm
        import torch

        key["model"] = dataclasses.asdict(cfg.model)
        key.update(seed=cfg.train.seed, channels=channels, torch=torch.__version__.split("+")[0], timm=timm.__version__,
                   precise_bn=cfg.eval.precise_bn)
    return key


def entry_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_folder() / f"{key['baseline']}-{digest[:32]}.json"


def load_row(key: dict | None) -> dict | None:
    """The cached row for `key`, or None (no entry, unreadable, or stored under another key)."""
    if key is None:
        return None
    path = entry_path(key)
    try:
        entry = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("baseline cache %s: unreadable (%s); scoring %s again", path, err, key["baseline"])
        return None
    if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("row"), dict):
        log.warning("baseline cache %s: stored for another key; ignored, scoring %s again", path, key["baseline"])
        return None
    return entry["row"]


def store_row(key: dict | None, row: dict) -> Path | None:
    """Writes the entry atomically (a reader sees the old file or the whole new one); a cache that
    cannot be written costs a warning, never the evaluation."""
    if key is None:
        return None
    path = entry_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
            json.dump({"key": key, "row": row}, tmp, indent=1)
        os.replace(tmp.name, path)
    except OSError as err:
        log.warning("baseline cache %s: not written (%s)", path, err)
        return None
    return path
