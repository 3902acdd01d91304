"""Results as JSON, a Markdown table, and PNG plots (training curves, accuracy bars)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

ROW_NAMES = {"raw_pixels": "raw pixels", "random_init": "random-init backbone", "pretrained": "pretrained backbone",
             "pretrained_audio": "pretrained audio network", "random_init_audio": "random-init audio network"}


def markdown_table(results: dict) -> str:
    ks = results["knn_k"]
    header = "| features | dim | " + " | ".join(f"kNN top-1 (k={k})" for k in ks) + " | linear top-1 |"
    lines = [header, "|" + "---|" * (3 + len(ks))]
    for name, row in results["rows"].items():
        knn = " | ".join(f"{100 * row['knn'][str(k)]:.2f}" for k in ks)
        lines.append(f"| {ROW_NAMES.get(name, name)} | {row['dim']} | {knn} | {100 * row['linear']:.2f} |")
    return "\n".join(lines)


def protocol_tables(results: dict) -> str:
    """Markdown tables of the low-shot and clustering protocols, for the rows that ran them."""
    text = ""
    shot_rows = {name: row["low_shot"] for name, row in results["rows"].items() if "low_shot" in row}
    if shot_rows:
        settings = list(next(iter(shot_rows.values())))
        text += ("\nLow-shot top-1 (mean ± std over seeds; % of train labels: linear probe, k-shot: linear SVM):\n\n"
                 "| features | " + " | ".join(settings) + " |\n|---|" + "---|" * len(settings) + "\n")
        for name, shots in shot_rows.items():
            text += f"| {ROW_NAMES.get(name, name)} | " + " | ".join(f"{100 * shots[s]['mean']:.2f} ± {100 * shots[s]['std']:.2f}" if "mean" in shots[s] else "–" for s in settings) + " |\n"
    for name, stages in results.get("per_layer", {}).items():
        ks = results["knn_k"]
        text += (f"\nPer layer, {ROW_NAMES.get(name, name)} (each stage average-pooled):\n\n| stage | dim | "
                 + " | ".join(f"kNN (k={k})" for k in ks) + " | linear |\n|---|---|" + "---|" * (len(ks) + 1) + "\n")
        for stage, scores in stages.items():
            text += (f"| {stage} | {scores['dim']} | " + " | ".join(f"{100 * scores['knn'][str(k)]:.2f}" for k in ks)
                     + f" | {100 * scores['linear']:.2f} |\n")
    clustered = {name: row["clustering"] for name, row in results["rows"].items() if "clustering" in row}
    if clustered:
        text += "\nk-means on the test features (k = classes):\n\n| features | NMI | ARI | matched accuracy |\n|---|---|---|---|\n"
        for name, c in clustered.items():
            text += f"| {ROW_NAMES.get(name, name)} | {100 * c['nmi']:.2f} | {100 * c['ari']:.2f} | {100 * c['accuracy']:.2f} |\n"
    return text


def write_results(results: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(results, indent=2))
    title = f"# {results['task']} on {results['dataset']} ({results['backbone']}, step {results['step']})\n\n"
    text = title + markdown_table(results) + "\n" + protocol_tables(results)
    if results.get("cached_baselines"):
        names = ", ".join(ROW_NAMES.get(n, n) for n in results["cached_baselines"])
        text += f"\nCached from an earlier eval on the same shards and settings (eval/baseline_cache.py): {names}.\n"
    if "generative" in results:
        gen = results["generative"]
        bound = {"elbo": "ELBO (a lower bound of log p(x) of the 8-bit images)", "exact": "exact log p(x) of the 8-bit images",
                 "elbo_binarized": "ELBO of dynamically binarized images (bits per binary pixel; not comparable with 8-bit bits/dim)"}[gen["kind"]]
        text += (f"\nTest {bound}: {gen['nats_per_image']:.1f} nats per image, {gen['bits_per_dim']:.3f} bits/dim "
                 f"over {gen['images']} images.\n")
    if "samples" in results:
        text += f"\nSamples: {results['samples']}\n"
    if "audio_visual" in results:
        av = results["audio_visual"]
        text += (f"\nCross-modal retrieval on {av['retrieval']['queries']} test frames of {av['test_clips']} held-out clips "
                 "(a hit: any audio, or frame, of the query's clip):\n\n| direction | " + " | ".join(av["retrieval"]["chance"])
                 + " |\n|---|" + "---|" * len(av["retrieval"]["chance"]) + "\n")
        for direction in ("image_to_audio", "audio_to_image", "chance"):
            text += f"| {direction.replace('_', ' ')} | " + " | ".join(f"{100 * v:.1f}" for v in av["retrieval"][direction].values()) + " |\n"
        if "correspondence_accuracy" in av:
            text += f"\nAudio-visual correspondence accuracy on held-out clips: {100 * av['correspondence_accuracy']:.2f}%\n"
    md_path.write_text(text)
    plot_results(results, out_dir / "results.png")
    return json_path, md_path


def plot_results(results: dict, path: Path) -> Path:
    rows = results["rows"]
    columns = [f"kNN k={k}" for k in results["knn_k"]] + ["linear"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(rows)
    for i, (name, row) in enumerate(rows.items()):
        values = [100 * row["knn"][str(k)] for k in results["knn_k"]] + [100 * row["linear"]]
        bars = ax.bar([c + i * width for c in range(len(columns))], values, width, label=ROW_NAMES.get(name, name))
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([c + width * (len(rows) - 1) / 2 for c in range(len(columns))], columns)
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{results['task']} / {results['backbone']} on {results['dataset']}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
