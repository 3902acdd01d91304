"""Low-shot and clustering protocols: balanced seeded subsets, clear errors, metrics on known answers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.clustering import cluster_scores, matched_accuracy
from eval.low_shot import balanced_subset, k_shot_svm, low_shot_probe


def blobs(per_class: int, classes: int = 4, dim: int = 8, spread: float = 0.1, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(classes, dim) * 3
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=generator), labels


def test_balanced_subsets_are_balanced_seeded_and_name_a_class_that_is_too_small():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    subset = balanced_subset(labels, seed=0, per_class=5)
    assert torch.bincount(labels[subset]).tolist() == [5, 5, 5] and len(subset.unique()) == 15
    assert torch.equal(subset, balanced_subset(labels, seed=0, per_class=5))
    assert not torch.equal(subset, balanced_subset(labels, seed=1, per_class=5))
    tenth = balanced_subset(labels, seed=0, fraction=0.1)  # 10% of each class, at least one
    assert torch.bincount(labels[tenth]).tolist() == [5, 3, 2]
    with pytest.raises(ValueError, match="25 labels per class asked for, but class 2 has only 20"):
        balanced_subset(labels, seed=0, per_class=25)
    with pytest.raises(ValueError, match="exactly one"):
        balanced_subset(labels, seed=0, per_class=2, fraction=0.5)


def test_low_shot_probe_and_svm_learn_separable_blobs_and_skip_a_k_larger_than_a_class():
    train, train_labels = blobs(60)
    test, test_labels = blobs(20, seed=1)
    probe = low_shot_probe(train, train_labels, test, test_labels, [0.1, 0.5], [1.0], 0.2, seeds=2)
    assert set(probe) == {"10%", "50%"} and probe["50%"]["mean"] == 1.0 and len(probe["10%"]["runs"]) == 2
    shots = k_shot_svm(train, train_labels, test, test_labels, [1, 5, 100], seeds=2)
    assert shots["5-shot"]["mean"] == 1.0 and shots["1-shot"]["std"] >= 0
    assert "class 0 has only 60" in shots["100-shot"]["skipped"]


def test_matched_accuracy_finds_the_best_one_to_one_mapping():
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert matched_accuracy(labels, np.array([2, 2, 0, 0, 1, 1])) == 1.0  # relabelled clusters
    # Clusters 1 -> class 0 (2 hits), 2 -> class 2 (2), 0 -> class 1 (1): 5 of 6; no mapping does better.
    assert matched_accuracy(labels, np.array([1, 1, 0, 2, 2, 2])) == pytest.approx(5 / 6)


def test_k_means_recovers_separated_blobs_and_scores_equal_scikit_learn():
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    features, labels = blobs(30, spread=0.05)
    scores = cluster_scores(features, labels, 4)
    assert scores == {"nmi": pytest.approx(1.0), "ari": pytest.approx(1.0), "accuracy": 1.0}
    noisy, labels = blobs(30, spread=2.0, seed=3)
    scores = cluster_scores(noisy, labels, 4)
    clusters = KMeans(n_clusters=4, n_init=3, random_state=0).fit_predict(torch.nn.functional.normalize(noisy, dim=1).numpy())
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(labels.numpy(), clusters))
    assert scores["ari"] == pytest.approx(adjusted_rand_score(labels.numpy(), clusters))
    assert scores["accuracy"] < 1.0


def test_per_layer_scores_every_stage_with_timm_feature_info_widths(shards, tmp_path, monkeypatch):
    from eval.evaluate import evaluate
    from eval.per_layer import PooledStages
    from tests.test_baseline_cache import tiny_run

    monkeypatch.setenv("SSLPIPE_CACHE", str(tmp_path / "cache"))
    cfg = tiny_run(shards, tmp_path / "run")
    results = evaluate(tmp_path / "run", tmp_path / "eval", protocols=["per_layer"])
    from models.backbone import create_backbone

    widths = [entry["num_chs"] for entry in create_backbone(cfg.model, 1).feature_info]
    for name in ("random_init", "pretrained"):
        stages = results["per_layer"][name]
        assert [s["dim"] for s in stages.values()] == widths
        assert all(0 <= s["linear"] <= 1 and set(s["knn"]) == {"5"} for s in stages.values())
    # The last stage pooled is the backbone's own pooled output: the same scores as the main row.
    last = list(results["per_layer"]["pretrained"].values())[-1]
    assert last["knn"]["5"] == pytest.approx(results["rows"]["pretrained"]["knn"]["5"], abs=1e-6)
    assert (tmp_path / "eval" / "per_layer.png").stat().st_size > 0
    assert "Per layer, pretrained backbone" in (tmp_path / "eval" / "results.md").read_text()
    with pytest.raises(ValueError, match="forward_intermediates"):
        PooledStages(torch.nn.Linear(2, 2))


def test_digits_shards_are_deterministic_and_a_run_is_scored_on_them_by_transfer(shards, tmp_path, monkeypatch):
    import json

    from eval.evaluate import evaluate
    from pipeline.data.ingest import write_digits
    from tests.test_baseline_cache import tiny_run

    monkeypatch.setenv("SSLPIPE_CACHE", str(tmp_path / "cache"))
    first = json.loads(write_digits(tmp_path / "digits").read_text())
    again = json.loads(write_digits(tmp_path / "digits-again").read_text())
    assert first["splits"] == again["splits"]  # same shards, same checksums
    counts = {split: first["splits"][split]["count"] for split in ("train", "test")}
    assert counts == {"train": 1257, "test": 540} and first["splits"]["train"]["image_size"] == [8, 8]
    tiny_run(shards, tmp_path / "run")  # pretrained on 16 px glyphs
    results = evaluate(tmp_path / "run", tmp_path / "eval", data_root=str(tmp_path / "digits"), protocols=[])
    assert results["dataset"] == "sklearn-digits" and results["image_size"] == 16  # the run's size: 8 px digits resized
    assert results["input"]["test"]["scored"] == 540 and results["rows"]["raw_pixels"]["dim"] == 256
    assert results["rows"]["pretrained"]["linear"] > 0.3  # a 4-step run, far above chance (10%) on another dataset


def test_precise_bn_replaces_running_statistics_by_the_train_images_average(shards):
    from eval.precise_bn import recompute_batchnorm
    from pipeline.data.decode import decoder_for
    from pipeline.data.shards import read_manifest, split_urls
    from pipeline.data.streaming import eval_loader

    manifest = read_manifest(shards)
    decoder = decoder_for(manifest, "train", 0)
    urls = split_urls(shards, manifest, "train")
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(1), torch.nn.Dropout(0.5))
    model[0].running_mean.fill_(5.0)  # what an augmented pretraining left behind
    seen = recompute_batchnorm(model, urls, decoder, images=64, batch_size=16, loader_workers=0)
    images = torch.cat([batch for batch, _, _ in eval_loader(urls, 0, 1, decoder, 16, 0)])[:64]
    assert seen == 64
    assert torch.allclose(model[0].running_mean, images.mean().view(1), atol=1e-5)  # 4 equal batches: their average
    assert model[0].momentum == 0.1 and not model.training  # the norm's settings are restored, eval mode
    assert recompute_batchnorm(torch.nn.Linear(2, 2), urls, decoder, images=64) == 0  # nothing to recompute
