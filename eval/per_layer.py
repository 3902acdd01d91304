"""Per-layer protocol (Goyal et al. 2019; VISSL's per-layer linear benchmarks): the frozen
backbone's every stage, average-pooled to one vector, scored by kNN and the linear probe like the
last layer. Stages are what timm's `forward_intermediates` returns (ResNets: the stem and each
stage; ViTs: each block), in the order of the model's `feature_info`."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


class PooledStages(nn.Module):
    """The backbone's stage outputs, each averaged over space, side by side in one (B, sum of
    widths) tensor; `widths` and `names` say where each stage's columns are."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        if not hasattr(backbone, "forward_intermediates"):
            raise ValueError(f"per-layer protocol: backbone {type(backbone).__name__} has no forward_intermediates()")
        self.backbone = backbone
        info = getattr(backbone, "feature_info", None) or []
        self.names = [entry.get("module", f"stage{i}") if isinstance(entry, dict) else f"stage{i}" for i, entry in enumerate(info)]
        self.widths: list[int] = []

    def forward(self, images: Tensor) -> Tensor:
        maps = self.backbone.forward_intermediates(images, intermediates_only=True)
        pooled = [m.mean(dim=(2, 3)) if m.dim() == 4 else m.mean(dim=1) for m in maps]
        self.widths = [p.shape[1] for p in pooled]
        if len(self.names) != len(pooled):
            self.names = [f"stage{i}" for i in range(len(pooled))]
        return torch.cat(pooled, dim=1)

    def split(self, features: Tensor) -> dict[str, Tensor]:
        """(N, sum of widths) -> {stage name: (N, width)}."""
        return dict(zip(self.names, features.split(self.widths, dim=1)))


def plot_per_layer(per_layer: dict[str, dict], pixels: dict | None, path: Path, knn_k: int) -> Path:
    """kNN and linear top-1 per stage, one line per backbone, raw pixels as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, metric, title in ((axes[0], "knn", f"kNN top-1 (k={knn_k})"), (axes[1], "linear", "linear top-1")):
        for row, stages in per_layer.items():
            values = [100 * (s["knn"][str(knn_k)] if metric == "knn" else s["linear"]) for s in stages.values()]
            ax.plot(range(len(values)), values, marker="o", label=row.replace("_", " "))
            ax.set_xticks(range(len(values)), list(stages), rotation=30, ha="right", fontsize=8)
        if pixels is not None:
            ax.axhline(100 * (pixels["knn"][str(knn_k)] if metric == "knn" else pixels["linear"]), color="gray", ls="--", label="raw pixels")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
