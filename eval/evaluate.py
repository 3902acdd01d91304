"""`sslpipe eval`: frozen features of a checkpoint's backbone against raw pixels and a random-init
backbone of the same architecture, scored by weighted kNN and a linear probe on the test split."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from core.grids import save_grid
from core.knn import knn_accuracy
from eval.audio_visual import evaluate_audio_visual, is_audio_visual
from eval.baseline_cache import baseline_key, entry_path, load_row, store_row
from eval.clustering import cluster_scores
from eval.embedding import plot_embedding
from eval.features import Features, extract_features
from eval.generative import generate, test_log_likelihood
from eval.linear_probe import linear_probe
from eval.low_shot import k_shot_svm, low_shot_probe
from eval.per_layer import PooledStages, plot_per_layer
from eval.precise_bn import recompute_batchnorm
from eval.report import write_results
from models.backbone import create_backbone
from pipeline.config import Config, reset_security_switches
from pipeline.data.bad_samples import BadSamples
from pipeline.data.dataset import Dataset
from pipeline.data.decode import ImageDecoder
from pipeline.train.checkpoint import (
    CheckpointError,
    encoder_state,
    load_valid_checkpoint,
)
from pipeline.train.run_storage import local_run_dir, push
from pipeline.train.tasks import rebuild_task
from pipeline.train.tracking import log_eval

log = logging.getLogger("sslpipe.eval")


def load_pretrained(path: str | Path, data_root: str | None = None) -> tuple[Config, nn.Module, dict]:
    """The run's config and its pretrained backbone, rebuilt with timm (no pretext code involved)."""
    file, state = load_valid_checkpoint(path)  # the newest readable one (a corrupted newest is reported and skipped)
    # Eval needs the backbone, not the task; the stored config may be someone else's: its security
    # switches (shell URLs) are off unless this user's command line turns them on.
    cfg = reset_security_switches(Config.from_dict(state["config"], check_task=False))
    if data_root:
        cfg.data.root = data_root
    backbone = create_backbone(cfg.model, state["manifest"]["channels"])
    try:
        backbone.load_state_dict(encoder_state(state), strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {file}: encoder weights do not fit {cfg.model.backbone} {cfg.model.backbone_kwargs}: {err}") from err
    return cfg, backbone, state


def scored_model(cfg: Config, backbone: nn.Module, state: dict):
    """The network eval scores and, for tasks that need it, the whole rebuilt task (generative
    objectives: likelihood, samples, features other than the pooled backbone's); else (backbone, None)."""
    task = rebuild_task(state, cfg)
    if task is None:
        return backbone, None
    return task.feature_extractor(), task


def checkpoint_decoder(state: dict, require_label: bool = True, image_size: int = 0, num_classes: int = 0) -> ImageDecoder:
    """Decodes as pretraining did: the checkpoint's colour mode and normalization, and its size
    unless `image_size` asks for another (patch tasks train on upscaled images, whole images at the
    native size are what a downstream user feeds)."""
    info = state["manifest"]
    return ImageDecoder(info["mode"], image_size or info["image_size"], info["mean"], info["std"], require_label, num_classes)


def score(train: Features, test: Features, cfg: Config) -> dict:
    if (train.labels < 0).any() or (test.labels < 0).any():
        raise ValueError("evaluation needs labels on every train and test sample (.cls entries in the shards)")
    result = {"dim": int(train.features.shape[1]), "knn": {}}
    for k in cfg.eval.knn_k:
        result["knn"][str(k)] = knn_accuracy(train.features, train.labels, test.features, test.labels, k, cfg.eval.knn_temperature)
    probe = linear_probe(train.features, train.labels, test.features, test.labels, cfg.eval.linear_C, cfg.eval.linear_val_fraction)
    result.update(linear=probe.accuracy, linear_C=probe.best_C, linear_val_accuracy={str(c): a for c, a in probe.val_accuracy.items()},
                  linear_converged=probe.converged)
    if "low_shot" in cfg.eval.protocols:
        result["low_shot"] = {
            **low_shot_probe(train.features, train.labels, test.features, test.labels, cfg.eval.low_shot_fractions, cfg.eval.linear_C,
                             cfg.eval.linear_val_fraction, cfg.eval.low_shot_seeds),
            **k_shot_svm(train.features, train.labels, test.features, test.labels, cfg.eval.low_shot_shots, seeds=cfg.eval.low_shot_seeds),
        }
    if "clustering" in cfg.eval.protocols:
        result["clustering"] = cluster_scores(test.features, test.labels, int(max(train.labels.max(), test.labels.max())) + 1)
    return result


def read_complete(read: dict) -> bool:
    """Whether every split so far was read whole (no bad or missing samples, no failed shard): the
    baseline cache stores and serves rows only then."""
    return all(not (r["bad_samples"] or r["missing_samples"] or r["bad_shards"]) for r in read.values())


def brief(row: dict) -> dict:
    """A row for the log: the low-shot settings by their means, the probe's validation scores left out."""
    shown = {k: v for k, v in row.items() if k not in ("linear_val_accuracy", "low_shot")}
    if "low_shot" in row:
        shown["low_shot"] = {k: round(v["mean"], 4) for k, v in row["low_shot"].items() if "mean" in v}
    return shown


def score_per_layer(models: dict[str, nn.Module], splits: dict, decoder: ImageDecoder, manifest: dict, cfg: Config, device) -> dict:
    """{model: {stage: {"dim", "knn", "linear"}}}: every stage of each backbone that exposes its
    stages (timm's forward_intermediates), pooled and scored by kNN and the linear probe."""
    out = {}
    for name, model in models.items():
        if not hasattr(model, "forward_intermediates"):
            log.info("per-layer protocol: %s (%s) has no stages to read; skipped", name, type(model).__name__)
            continue
        stages = PooledStages(model)
        features = {split: extract_features(stages, urls, decoder, cfg.eval.batch_size, cfg.eval.loader_workers, device,
                                            desc=f"{name} stages {split}", total=manifest["splits"][split]["count"],
                                            bad_samples=BadSamples.for_config(cfg.data))
                    for split, urls in splits.items()}
        train, test = (features[s] for s in (cfg.data.train_split, cfg.data.test_split))
        test_stages = stages.split(test.features)
        out[name] = {}
        for stage, train_x in stages.split(train.features).items():
            test_x = test_stages[stage]
            probe = linear_probe(train_x, train.labels, test_x, test.labels, cfg.eval.linear_C, cfg.eval.linear_val_fraction)
            out[name][stage] = {"dim": int(train_x.shape[1]), "linear": probe.accuracy,
                                "knn": {str(k): knn_accuracy(train_x, train.labels, test_x, test.labels, k, cfg.eval.knn_temperature)
                                        for k in cfg.eval.knn_k}}
            log.info("%s %s: %s", name, stage, out[name][stage])
    return out


def evaluate(path: str | Path, out_dir: str | Path | None = None, data_root: str | None = None, device: str | None = None,
             baselines: list[str] | None = None, image_size: int | None = None, data_options: dict | None = None,
             protocols: list[str] | None = None, precise_bn: int | None = None) -> dict:
    """Evaluates the latest checkpoint under `path`; writes results.json, results.md and results.png.
    `baselines`, `image_size`, `protocols` and `precise_bn` replace the config's eval.baselines,
    eval.image_size, eval.protocols and eval.precise_bn (a benchmark scores baselines once for many runs)."""
    start = time.perf_counter()
    checkpoint, _ = load_valid_checkpoint(path)
    cfg, pretrained, state = load_pretrained(checkpoint, data_root)
    if baselines is not None:
        cfg.eval.baselines = baselines
    if protocols is not None:
        cfg.eval.protocols = protocols
    if precise_bn is not None:
        cfg.eval.precise_bn = precise_bn
    if image_size is not None:
        cfg.eval.image_size = image_size
    for key, value in (data_options or {}).items():  # --strict, --allow-shell-urls
        setattr(cfg.data, key, value)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pretrained, task = scored_model(cfg, pretrained, state)
    dataset = Dataset.for_data(cfg.data)
    manifest = dataset.manifest
    decoder = checkpoint_decoder(state, require_label=True, image_size=cfg.eval.image_size, num_classes=len(dataset.classes))
    splits = {s: dataset.urls(s) for s in (cfg.data.train_split, cfg.data.test_split)}

    models: dict[str, nn.Module | None] = {"pretrained": pretrained}  # scored first: its read decides whether cached rows apply
    if "raw_pixels" in cfg.eval.baselines:
        models["raw_pixels"] = None
    if "random_init" in cfg.eval.baselines:
        torch.manual_seed(cfg.train.seed)
        models["random_init"] = create_backbone(cfg.model, state["manifest"]["channels"])

    rows, read, cached = {}, {}, []
    for name, model in models.items():
        key = baseline_key(name, cfg, manifest, decoder, state["manifest"]["channels"]) if name != "pretrained" and cfg.eval.cache_baselines else None
        row = load_row(key) if read_complete(read) else None
        if row is not None:
            rows[name] = row
            cached.append(name)
            log.info("%s: cached scores from %s", name, entry_path(key))
            continue
        if model is not None and cfg.eval.precise_bn:
            recompute_batchnorm(model, splits[cfg.data.train_split], decoder, cfg.eval.precise_bn, cfg.eval.batch_size,
                                cfg.eval.loader_workers, device, BadSamples.for_config(cfg.data))
        features, policies = {}, {}
        for split, urls in splits.items():
            policies[split] = BadSamples.for_config(cfg.data)
            features[split] = extract_features(model, urls, decoder, cfg.eval.batch_size, cfg.eval.loader_workers, device,
                                               desc=f"{name} {split}", total=manifest["splits"][split]["count"],
                                               bad_samples=policies[split])
            # What was scored against what the manifest lists (every model reads the same shards).
            read[split] = {"listed": manifest["splits"][split]["count"], "scored": len(features[split].labels), **policies[split].counts()}
        rows[name] = score(features[cfg.data.train_split], features[cfg.data.test_split], cfg)
        if name == "pretrained":  # its test features are drawn into embedding.png
            embedded = features[cfg.data.test_split]
        elif read_complete(read):
            store_row(key, rows[name])
        log.info("%s: %s", name, brief(rows[name]))
    rows = {name: rows[name] for name in ("raw_pixels", "random_init", "pretrained") if name in rows}  # table order
    per_layer = {}
    if "per_layer" in cfg.eval.protocols:
        per_layer = score_per_layer({n: m for n, m in models.items() if m is not None}, splits, decoder, manifest, cfg, device)

    results = {
        "checkpoint": str(checkpoint),
        "task": cfg.task.name,
        "backbone": cfg.model.backbone,
        "dataset": manifest["name"],
        "step": state["step"],
        "image_size": decoder.image_size,
        "knn_k": cfg.eval.knn_k,
        "knn_temperature": cfg.eval.knn_temperature,
        "rows": rows,
        "input": read,  # scored against listed samples per split (shards read short show here)
        "precise_bn_images": cfg.eval.precise_bn,  # batch-norm statistics recomputed on this many train images (0: as trained)
        "cached_baselines": cached,  # rows taken from eval/baseline_cache.py's cache, not scored again
        **({"per_layer": per_layer} if per_layer else {}),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if is_audio_visual(task):  # audio features scored like the frames', retrieval both ways, AVC accuracy
        audio_visual = evaluate_audio_visual(task, cfg, splits, manifest, embedded, device, score)
        rows.update(audio_visual.pop("rows"))
        results["audio_visual"] = audio_visual
        results["seconds"] = round(time.perf_counter() - start, 1)
    # A run on object storage: eval/ in its local mirror, uploaded below (pipeline/train/run_storage.py).
    out = Path(out_dir) if out_dir else local_run_dir(cfg.run_dir) / "eval"
    if task is not None and task.likelihood_kind is not None:
        results["generative"] = test_log_likelihood(task, splits[cfg.data.test_split], checkpoint_decoder(state, require_label=False),
                                                    cfg.eval.batch_size, device, manifest["splits"][cfg.data.test_split]["count"],
                                                    BadSamples.for_config(cfg.data))
        log.info("test log-likelihood: %s", results["generative"])
    if task is not None and hasattr(task, "sample"):
        grid = save_grid(task.to_unit_range(generate(task.to(device), 64)), out / "samples.png", nrow=8)
        results["samples"] = str(grid)
        results["seconds"] = round(time.perf_counter() - start, 1)
    plot_embedding(embedded.features.numpy(), embedded.labels.numpy(), out / "embedding.png", manifest.get("classes"),
                   seed=cfg.train.seed, title=f"{cfg.task.name} / {cfg.model.backbone}: t-SNE of {cfg.data.test_split} features")
    if per_layer:
        out.mkdir(parents=True, exist_ok=True)
        plot_per_layer(per_layer, rows.get("raw_pixels"), out / "per_layer.png", cfg.eval.knn_k[0])
    write_results(results, out)
    log_eval(cfg, results, out)  # into the run's MLflow run, when tracking.mlflow_uri is set
    if not out_dir:
        push(cfg.run_dir, ["eval"])  # a URL run: the results beside its checkpoints
    log.info("wrote %s", out / "results.md")
    return results
