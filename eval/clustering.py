"""Clustering protocol: k-means with k = the number of classes on L2-normalized features, scored
against the labels by NMI, ARI (scikit-learn) and Hungarian-matched accuracy (each cluster is
assigned one class, one-to-one, maximizing the matches: scipy's linear_sum_assignment), as
DeepCluster and SCAN report unsupervised classification."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def matched_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Fraction of samples whose cluster maps to their class under the best one-to-one mapping."""
    from scipy.optimize import linear_sum_assignment

    size = int(max(labels.max(), clusters.max())) + 1
    counts = np.zeros((size, size), dtype=np.int64)  # counts[cluster, class]
    np.add.at(counts, (clusters, labels), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(labels))


def cluster_scores(features: Tensor, labels: Tensor, num_classes: int, seed: int = 0, n_init: int = 3) -> dict[str, float]:
    """k-means (k = num_classes, k-means++ starts, best of `n_init`) on the L2-normalized features."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    x = torch.nn.functional.normalize(features.float(), dim=1).numpy()
    y = labels.numpy()
    clusters = KMeans(n_clusters=num_classes, n_init=n_init, random_state=seed).fit_predict(x)
    return {"nmi": float(normalized_mutual_info_score(y, clusters)), "ari": float(adjusted_rand_score(y, clusters)),
            "accuracy": matched_accuracy(y, clusters)}
