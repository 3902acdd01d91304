"""Representation quality of every pretext task under one compute budget, on Fashion-MNIST.

    python -m bench.quality [--budget-s 120] [--tasks rotation,exemplar,...] [--out runs/bench-quality]
    python -m bench.quality --budget-s 1800 --tasks vicreg,byol,exemplar --out runs/bench-quality-1800

With `--online-points N` (default 10 with budgets of 600 s or more, else 0) each run also logs
online kNN N times over its pretraining (bank: eval.online_bank train images, queries:
eval.online_queries test images), and OUT/quality_curve.png draws online kNN against pretraining
wall time, one line per task, with raw pixels and the random-init backbone on the same subset as
horizontal lines. A long run interrupted mid-task resumes from its last checkpoint.

Each task runs its config (configs/<task>_fmnist.yaml: same backbone, data, workers and batch),
pretrains under Ray Train for as many steps as its measured step time fits into the budget, then the
eval stage scores its frozen backbone (kNN and linear probe on the test split, whole 28 px images).
Raw pixels and the random-init backbone are scored once. Results accumulate in OUT/quality.json,
so an interrupted benchmark continues where it stopped; OUT/quality.md and quality.png hold the table.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import time
from pathlib import Path

import torch

from core.errors import ConfigError
from pipeline.config import Config

log = logging.getLogger("sslpipe.bench")

TASK_CONFIGS = {
    "rotation": "configs/rotation_fmnist.yaml",
    "exemplar": "configs/exemplar_fmnist.yaml",
    # The demo's tuned recipe (DCL + random erasing on resnet10_s2_w32, 1 worker x 2 CPUs, precise BN).
    "exemplar_dcl": "configs/demo_fmnist.yaml",
    "context_prediction": "configs/context_prediction_fmnist.yaml",
    "jigsaw": "configs/jigsaw_fmnist.yaml",
    "cpc": "configs/cpc_fmnist.yaml",
    "denoising_autoencoder": "configs/denoising_autoencoder_fmnist.yaml",
    "context_encoder": "configs/context_encoder_fmnist.yaml",
    "multitask": "configs/multitask_fmnist.yaml",
    # Joint-embedding methods (issue 14).
    "byol": "configs/byol_fmnist.yaml",
    "byol_s2": "configs/byol_s2_fmnist.yaml",
    "simsiam": "configs/simsiam_fmnist.yaml",
    "barlow_twins": "configs/barlow_twins_fmnist.yaml",
    "vicreg": "configs/vicreg_fmnist.yaml",
    "vicreg_s2": "configs/vicreg_s2_fmnist.yaml",  # long-budget rows: the demo's backbone and settings
    "dino": "configs/dino_fmnist.yaml",
    "dino_vit": "configs/dino_vit_fmnist.yaml",
    "swav": "configs/swav_fmnist.yaml",
    "mae": "configs/mae_fmnist.yaml",
    # Refuses grayscale data: the row records the refusal.
    "colorization": "configs/colorization.yaml",
    # Generative objectives (issue 4): their rows add test bits/dim, and a sample-quality figure.
    "vae": "configs/vae_fmnist.yaml",
    "gan": "configs/gan_fmnist.yaml",
    "bigan": "configs/bigan_fmnist.yaml",
    "wgan_gp": "configs/wgan_gp_fmnist.yaml",
    "pixelcnn": "configs/pixelcnn_fmnist.yaml",
}
# Other methods on the demo's backbone and settings, for the long budget's comparison: the 120 s
# table already has each method on the shared backbone.
LONG_BUDGET_ONLY = {"vicreg_s2", "byol_s2"}
BASE_CONFIG = "configs/rotation_fmnist.yaml"  # the backbone the shared baselines are scored with


def step_seconds(cfg: Config, repeats: int = 5) -> float:
    """Median seconds of one training step of one worker (its share of the global batch, its
    threads), on batches made by the task's own transform: what sizes the step budget."""
    from pipeline.data.decode import decoder_for
    from pipeline.data.shards import read_manifest
    from pipeline.data.streaming import collate
    from pipeline.train.loop import autocast_factory
    from pipeline.train.tasks import build_task

    manifest = read_manifest(cfg.data.root)
    decoder = decoder_for(manifest, cfg.data.train_split, cfg.data.image_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    try:
        task = build_task(cfg, manifest, decoder)
        if cfg.train.channels_last:  # as the training loop runs it
            task = task.to(memory_format=torch.channels_last)
        transform = task.sample_transform()
        size = decoder.image_size
        batch = collate([transform({"image": torch.randn(manifest["channels"], size, size), "label": 0, "key": "k"})
                         for _ in range(cfg.train.global_batch_size // cfg.scaling.max_workers)])
        optimizers = task.make_optimizers(cfg.optim, cfg.optim.lr)
        autocast, scaler = autocast_factory(torch.device("cpu"), enabled=False)
        task.train_step(batch, optimizers, scaler, autocast)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            task.train_step(batch, optimizers, scaler, autocast)
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        torch.set_num_threads(threads)


def training_seconds(rows: list[dict]) -> list[float]:
    """Seconds of training up to each metrics row, from the rows' wall clock; a gap far longer
    than the usual interval (a stop and a resume) counts as one usual interval."""
    gaps = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
    usual = statistics.median(gaps) if gaps else 0.0
    elapsed = [usual]
    for gap in gaps:
        elapsed.append(elapsed[-1] + (gap if gap <= 5 * usual else usual))
    return elapsed


def run_task(name: str, data_root: str, budget_s: float, out: Path, baselines: list[str], online_points: int = 0) -> dict:
    from eval.evaluate import evaluate
    from pipeline.train.launch import check_data, pretrain
    from pipeline.train.metrics import read_metrics

    run_dir = out / name
    plan_file = run_dir / "bench_plan.json"
    resume = online_points and plan_file.is_file() and any(run_dir.glob("**/checkpoint.pt"))
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # a rerun starts clean: old metrics and checkpoints would mix in
    cfg = Config.load(TASK_CONFIGS[name], [f"--data.root={data_root}", f"--run_dir={run_dir}"])
    try:
        check_data(cfg)
    except ConfigError as err:
        return {"task": name, "refused": str(err)}
    if resume:  # a long run stopped mid-task: the same plan, from its last checkpoint
        plan = json.loads(plan_file.read_text())
        log.info("%s: resuming the %d-step run in %s", name, plan["steps"], run_dir)
    else:
        seconds = step_seconds(cfg)
        plan = {"steps": max(50, int(budget_s / seconds)), "step_ms": round(1000 * seconds)}
        log.info("%s: %.0f ms per step -> %d steps in %.0f s", name, 1000 * seconds, plan["steps"], budget_s)
    steps = plan["steps"]
    cfg.train.steps = steps
    # Long runs checkpoint as they go (a stop costs at most a tenth); the short table only at the end.
    cfg.train.checkpoint_every = max(1, steps // 10) if online_points else steps
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, steps // 10)
    cfg.eval.online_every = max(1, steps // online_points) if online_points else 0
    start = time.perf_counter()
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        plan_file.write_text(json.dumps(plan))
    run_dir = pretrain(cfg, resume=run_dir if resume else None)
    train_s = time.perf_counter() - start
    rows = read_metrics(run_dir)
    last = rows[-1]
    elapsed = training_seconds(rows)
    curve = [[round(t, 1), r["step"], r["online_knn"]] for t, r in zip(elapsed, rows) if "online_knn" in r]
    # Tasks on another network than the shared baselines' (DCGAN discriminator, PixelCNN) are
    # compared with a random init of their own network too.
    own_backbone = cfg.model.backbone != Config.load(BASE_CONFIG).model.backbone
    results = evaluate(run_dir, baselines=sorted(set(baselines) | ({"random_init"} if own_backbone else set())))
    return {
        "task": name,
        "image_size": cfg.data.image_size or 28,
        "eval_image_size": results["image_size"],
        "steps": steps,
        "epochs": last["epoch"],
        "step_ms": plan["step_ms"],
        "pretrain_s": round(train_s if not resume else elapsed[-1], 1),
        "curve": curve,
        "online_eval_s": round(sum(r.get("online_eval_s", 0) for r in rows), 1),
        "eval_s": results["seconds"],
        "final_loss": last["loss"],
        "final_accuracy": last.get("accuracy"),
        "rows": results["rows"],
        "backbone": cfg.model.backbone,
        "own_random_init": results["rows"]["random_init"] if own_backbone else None,
        "generative": results.get("generative"),
        "samples": results.get("samples"),
        "run_dir": str(run_dir),
    }


def table(report: dict) -> str:
    lines = ["| features | pretrain size | steps (epochs) | pretrain wall s | linear top-1 | kNN top-1 (k=20) | kNN top-1 (k=200) | test bits/dim |",
             "|---|---|---|---|---|---|---|---|"]

    def scores(row: dict) -> str:
        return f"{100 * row['linear']:.2f} | {100 * row['knn']['20']:.2f} | {100 * row['knn']['200']:.2f}"

    baselines = report.get("baselines", {})
    for name, label in (("raw_pixels", "raw pixels"), ("random_init", "random-init backbone")):
        if name in baselines:
            lines.append(f"| {label} | 28 | - | - | {scores(baselines[name])} | |")
    for entry in report["tasks"].values():
        if "refused" in entry:
            reason = entry["refused"].split(";")[0]  # the task's own first clause
            lines.append(f"| {entry['task']} | - | - | - | refused: {reason} | | | |")
            continue
        generative = entry.get("generative")
        bits = f"{generative['bits_per_dim']:.3f}" + {"elbo": " (ELBO)", "exact": "", "elbo_binarized": " (ELBO, binarized)"}[generative["kind"]] if generative else ""
        lines.append(f"| {entry['task']} | {entry['image_size']} | {entry['steps']} ({entry['epochs']:.1f}) | {entry['pretrain_s']:.0f} | "
                     f"{scores(entry['rows']['pretrained'])} | {bits} |")
        if entry.get("own_random_init"):
            lines.append(f"| &nbsp;&nbsp;random-init {entry['backbone']} | 28 | - | - | {scores(entry['own_random_init'])} | |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in report["tasks"].values() if "rows" in e]
    names = [e["task"] for e in entries]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    for offset, (metric, label) in enumerate((("linear", "linear"), ("knn20", "kNN k=20"))):
        values = [100 * (e["rows"]["pretrained"]["linear"] if metric == "linear" else e["rows"]["pretrained"]["knn"]["20"]) for e in entries]
        bars = ax.bar([i + 0.4 * offset for i in range(len(names))], values, 0.4, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    for name, style in (("raw_pixels", "--"), ("random_init", ":")):
        if name in report.get("baselines", {}):
            ax.axhline(100 * report["baselines"][name]["linear"], linestyle=style, color="gray", label=f"{name} (linear)")
    ax.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=20, ha="right")
    ax.set_ylim(50, 95)
    ax.set_ylabel("Fashion-MNIST test top-1 (%)")
    ax.set_title(f"pretext tasks, {report['budget_s']:.0f} s step budget each")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def subset_baselines(data_root: str) -> dict[str, float]:
    """Online kNN's horizontal lines: raw pixels and the shared random-init backbone on the online subset."""
    from core.knn import knn_accuracy
    from models.backbone import create_backbone
    from pipeline.data.dataset import Dataset
    from pipeline.train.online_eval import OnlineKNN

    cfg = Config.load(BASE_CONFIG, [f"--data.root={data_root}"])
    dataset = Dataset.open(data_root, cfg.data.allow_shell_urls)
    manifest = dataset.manifest
    decoder = dataset.decoder(cfg.data.train_split, cfg.data.image_size)
    online = OnlineKNN(cfg, dataset, {"mode": manifest["mode"], "image_size": decoder.image_size,
                                       "mean": decoder.mean.flatten().tolist(), "std": decoder.std.flatten().tolist()})
    pixels = knn_accuracy(online.bank_images.flatten(1), online.bank_labels, online.query_images.flatten(1), online.query_labels,
                          online.k, online.temperature)
    torch.manual_seed(cfg.train.seed)
    random_init = online(create_backbone(cfg.model, manifest["channels"]), torch.device("cpu"))["online_knn"]
    return {"raw_pixels": pixels, "random_init": random_init}


def plot_curves(report: dict, path: Path) -> bool:
    """quality_curve.png: online kNN top-1 against pretraining wall time, one line per task."""
    entries = [e for e in report["tasks"].values() if e.get("curve")]
    if not entries:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for entry in entries:
        ax.plot([p[0] / 60 for p in entry["curve"]], [100 * p[2] for p in entry["curve"]], marker="o", markersize=3, label=entry["task"])
    for name, style in (("raw_pixels", "--"), ("random_init", ":")):
        if name in report.get("subset_baselines", {}):
            ax.axhline(100 * report["subset_baselines"][name], linestyle=style, color="gray", label=name.replace("_", " "))
    ax.set_xlabel("pretraining wall time (min)")
    ax.set_ylabel("online kNN top-1 (%), k=20")
    ax.set_title(f"Fashion-MNIST: online kNN over pretraining ({report['budget_s']:.0f} s budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=120.0, help="seconds of measured step time per task (per worker)")
    parser.add_argument("--tasks", default=",".join(t for t in TASK_CONFIGS if t not in LONG_BUDGET_ONLY),
                        help=f"comma-separated subset of {list(TASK_CONFIGS)} (default: all but {sorted(LONG_BUDGET_ONLY)})")
    parser.add_argument("--data", default="data/fashion-mnist", help="shards of Fashion-MNIST (written if missing)")
    parser.add_argument("--out", default="runs/bench-quality")
    parser.add_argument("--rerun", action="store_true", help="run tasks again even when OUT/quality.json has them")
    parser.add_argument("--samples", type=int, default=2000, help="generated images per model for the sample-quality figure")
    parser.add_argument("--rerun-samples", action="store_true", help="recompute the sample-quality figure from the stored runs")
    parser.add_argument("--online-points", type=int, default=None,
                        help="online kNN evaluations per run, for quality_curve.png (default: 10 for budgets >= 600 s, else 0)")
    args = parser.parse_args(argv)
    online_points = args.online_points if args.online_points is not None else (10 if args.budget_s >= 600 else 0)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASK_CONFIGS))
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {list(TASK_CONFIGS)}")

    from pipeline.data.ingest import write_fashion_mnist
    from pipeline.data.shards import MANIFEST

    if not (Path(args.data) / MANIFEST).is_file():
        write_fashion_mnist(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "quality.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"tasks": {}}
    report["budget_s"] = args.budget_s
    import ray

    owns_ray = not ray.is_initialized()  # pretrain() starts an embedded Ray unless one is running
    for name in tasks:
        if name in report["tasks"] and not args.rerun:
            log.info("%s: already in %s", name, report_path)
            continue
        baselines = [] if "baselines" in report else ["raw_pixels", "random_init"]
        if online_points and "subset_baselines" not in report:
            report["subset_baselines"] = subset_baselines(args.data)
        entry = run_task(name, args.data, args.budget_s, out, baselines, online_points)
        if "rows" in entry and baselines:
            report["baselines"] = {b: entry["rows"][b] for b in baselines}
        report["tasks"][name] = entry
        report_path.write_text(json.dumps(report, indent=2))  # after every task: nothing is lost on a stop
        (out / "quality.md").write_text(table(report) + "\n")
        plot(report, out / "quality.png")
        plot_curves(report, out / "quality_curve.png")
        print(table(report), flush=True)
    if owns_ray:
        ray.shutdown()
    if any(report["tasks"].get(name, {}).get("samples") for name in tasks) or args.rerun_samples:
        from bench.sample_quality import sample_quality

        report["sample_quality"] = sample_quality(report, args.data, out, args.samples)
        report_path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {report_path}, {out / 'quality.md'}, {out / 'quality.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
