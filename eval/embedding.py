"""A 2-D t-SNE picture of frozen features, coloured by class: embedding.png.

t-SNE (van der Maaten & Hinton 2008) on a stratified, seeded subsample, after PCA to 50
dimensions when the features are wider (their recommendation: it removes noise and makes the
pairwise affinities cheap). Cluster sizes and distances between clusters in t-SNE maps carry
little meaning; which points share a neighbourhood does.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger("sslpipe.eval")

MAX_POINTS = 2000  # Barnes-Hut t-SNE is O(N log N) per iteration; 2,000 points take about 15 s on one core
PCA_DIM = 50
MIN_POINTS = 4  # t-SNE needs perplexity < N, and a map of fewer points says nothing
MAX_LEGEND = 20  # more classes than this get colours but no legend (it would cover the plot)


def stratified_subsample(labels: np.ndarray, max_points: int = MAX_POINTS, seed: int = 0) -> np.ndarray:
    """Sorted indices of about `max_points` samples, each class (label value, -1 included) kept in
    proportion and with at least one sample, so rare classes still appear; all indices when fewer."""
    labels = np.asarray(labels)
    if len(labels) <= max_points:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        take = min(len(members), max(1, round(max_points * len(members) / len(labels))))
        chosen.append(rng.choice(members, take, replace=False))
    return np.sort(np.concatenate(chosen))


def tsne_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, D) features -> (N, 2) t-SNE coordinates (PCA to 50 dims first when D > 50)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or len(x) < MIN_POINTS:
        raise ValueError(f"t-SNE needs (N, D) features with N >= {MIN_POINTS}, got shape {x.shape}")
    if x.shape[1] > PCA_DIM:
        x = PCA(n_components=min(PCA_DIM, len(x)), random_state=seed).fit_transform(x)
    # scikit-learn needs perplexity < N and looks up 3 * perplexity + 1 neighbours: (N - 1) / 3 is the most N can serve
    perplexity = min(30.0, (len(x) - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    # One OpenMP thread: libgomp's spinning threads made t-SNE 10-20x slower on the busy 2-core
    # machine (300 points: 40 s with 2 threads, 2 s with 1), and one thread gives the same map on
    # every machine (no thread-order-dependent sums in the Barnes-Hut gradient).
    with threadpool_limits(limits=1, user_api="openmp"):
        return tsne.fit_transform(x)


def plot_embedding(features, labels, path: str | Path, class_names: Sequence[str] | None = None, max_points: int = MAX_POINTS,
                   seed: int = 0, title: str | None = None) -> Path | None:
    """Writes a t-SNE scatter of a stratified subsample of `features` (N, D), coloured by `labels`
    (N,) (-1: unlabelled, grey), with a legend of `class_names` (indexed by label)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    features, labels = np.asarray(features), np.asarray(labels).astype(np.int64)
    if len(features) != len(labels):
        raise ValueError(f"plot_embedding: {len(features)} feature rows but {len(labels)} labels")
    if len(features) < MIN_POINTS:  # a picture is a by-product of eval and export: no reason to fail them
        log.warning("%s not written: t-SNE needs at least %d samples, got %d", path, MIN_POINTS, len(features))
        return None
    index = stratified_subsample(labels, max_points, seed)
    xy, labels = tsne_2d(features[index], seed), labels[index]

    classes = [int(c) for c in np.unique(labels) if c >= 0]
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "hsv")
    size = float(np.clip(8000 / len(xy), 4, 20))  # marker area: 4 at 2,000 points, larger for small sets
    fig, ax = plt.subplots(figsize=(7, 6))
    if (labels < 0).any():
        ax.scatter(*xy[labels < 0].T, s=size, c="0.6", label="unlabelled", linewidths=0)
    for i, c in enumerate(classes):
        name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
        colour = colours(i if len(classes) <= 20 else i / len(classes))
        ax.scatter(*xy[labels == c].T, s=size, color=colour, label=name, linewidths=0)
    if len(classes) <= MAX_LEGEND:
        ax.legend(fontsize=8, markerscale=6 / np.sqrt(size), loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of {len(index)} of {len(features)} samples ({features.shape[1]}-d features)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
