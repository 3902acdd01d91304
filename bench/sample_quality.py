"""Sample quality of the benchmark's generative models: the Frechet distance (FID's formula,
Heusel et al. 2017) between generated images and the real test set.

FID proper measures in an ImageNet Inception network's features, which cannot be downloaded here.
The distance is measured instead in two feature spaces the eval stage itself computes:
- `exemplar`: pooled features of this benchmark's own InfoNCE (exemplar) backbone, the encoder of
  the table trained without labels on Fashion-MNIST (256-d);
- `pixels`: the normalized pixels (784-d).
Numbers are comparable within one benchmark run, not with published FIDs. The floor is the same
distance between as many real training images and the test set.

    python -m bench.quality --tasks vae,gan --rerun-samples     (recomputes from stored runs)
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("sslpipe.bench")

# Pixel-by-pixel sampling costs H * W forward passes per batch: PixelCNN gets fewer samples (and
# its own floor at the same count, since the distance's bias grows as the count falls).
SAMPLE_COUNTS = {"pixelcnn": 256}


def real_images(data_root: str, split: str, limit: int | None = None) -> torch.Tensor:
    """A split's images as the training decoder delivers them (normalized, native size)."""
    from pipeline.data.decode import decoder_for
    from pipeline.data.shards import read_manifest, split_urls
    from pipeline.data.streaming import eval_loader

    manifest = read_manifest(data_root)
    decoder = decoder_for(manifest, split, 0)
    chunks, count = [], 0
    for images, _, _ in eval_loader(split_urls(data_root, manifest, split), 0, 1, decoder, 500, 1):
        chunks.append(images)
        count += len(images)
        if limit and count >= limit:
            break
    return torch.cat(chunks)[:limit]


def sample_quality(report: dict, data_root: str, out: Path, count: int) -> dict:
    from eval.evaluate import load_pretrained, scored_model
    from eval.generative import embed, frechet_distance, generate

    entries = {name: e for name, e in report["tasks"].items() if e.get("samples")}
    exemplar = report["tasks"].get("exemplar", {}).get("run_dir")
    spaces: dict[str, torch.nn.Module | None] = {"pixels": None}
    if exemplar:
        spaces["exemplar"] = load_pretrained(exemplar)[1]
    else:
        log.warning("no exemplar run in this benchmark: sample quality is measured in pixel space only")
    test = real_images(data_root, "test")
    train = real_images(data_root, "train", count)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    test_features = {space: embed(model, test, device=device) for space, model in spaces.items()}
    result: dict = {"feature_spaces": list(spaces), "test_images": len(test), "models": {}, "floor": {}}
    for n in sorted({count, *[SAMPLE_COUNTS.get(name, count) for name in entries]}):
        result["floor"][str(n)] = {space: round(frechet_distance(embed(model, train[:n], device=device), test_features[space]), 3)
                                   for space, model in spaces.items()}
    for name, entry in entries.items():
        n = SAMPLE_COUNTS.get(name, count)
        cfg, backbone, state = load_pretrained(entry["run_dir"])
        _, task = scored_model(cfg, backbone, state)
        start = time.perf_counter()
        samples = generate(task.to(device), n, batch_size=min(n, 500))
        seconds = time.perf_counter() - start
        result["models"][name] = {
            "samples": n,
            "sampling_s": round(seconds, 1),
            **{space: round(frechet_distance(embed(model, samples, device=device), test_features[space]), 3) for space, model in spaces.items()},
        }
        log.info("%s: %s", name, result["models"][name])
    plot(result, entries, out / "sample_quality.png")
    return result


def plot(result: dict, entries: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["models"])
    space = "exemplar" if "exemplar" in result["feature_spaces"] else "pixels"
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(3.2 * (1 + len(names)), 3.6),
                             gridspec_kw={"width_ratios": [1.3] + [1] * len(names)})
    axes = axes if len(names) else [axes]
    values = [result["models"][n][space] for n in names]
    floors = [result["floor"][str(result["models"][n]["samples"])][space] for n in names]
    bars = axes[0].bar(names, values, color="tab:blue", label="generated vs test")
    axes[0].bar_label(bars, fmt="%.1f", fontsize=7)
    axes[0].scatter(names, floors, color="black", marker="_", s=400, zorder=3, label="real train vs test (floor)")
    axes[0].set_ylabel(f"Frechet distance ({space} features)")
    axes[0].set_title("sample quality (lower is better)", fontsize=9)
    axes[0].tick_params(axis="x", rotation=20, labelsize=8)
    axes[0].set_ylim(0, 1.35 * max(values + floors))  # room for the legend above the bars
    axes[0].legend(fontsize=7, loc="upper right")
    for ax, name in zip(axes[1:], names):
        ax.imshow(plt.imread(entries[name]["samples"]))
        ax.set_title(f"{name}: {result['models'][name][space]:.1f}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
