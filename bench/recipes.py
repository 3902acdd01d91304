"""Recipe search: pretraining variants side by side, scored by online kNN, in one process each.

    python -m bench.recipes --variants configs/recipes/fmnist.yaml [--only a,b] [--out runs/recipes]

A variants file lists `name: {config: PATH, overrides: [--key=value, ...]}`. Every variant pretrains
in this one process without Ray (`pretrain_local`, all of the machine's threads) for its own
`train.steps`, with online kNN on (eval.online_every defaults to the last step only), and records
the last online kNN top-1 (bank: the first eval.online_bank train samples, queries: the first
eval.online_queries test samples), raw pixels' kNN on the same subset, the pretraining wall time and
the host's steal and idle over it. Results accumulate in OUT/recipes.json (an interrupted search
continues where it stopped, a variant whose entry exists is skipped) and OUT/recipes.md.
This ranks recipes cheaply; the numbers to report come from `sslpipe eval` and bench/quality.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import yaml

from bench.host import HostWindow
from pipeline.config import Config

log = logging.getLogger("sslpipe.bench")


def pixel_knn(cfg: Config) -> float:
    """kNN top-1 of raw pixels on the online subset, the line every variant must beat."""
    from core.knn import knn_accuracy
    from pipeline.data.dataset import Dataset
    from pipeline.train.online_eval import OnlineKNN

    dataset = Dataset.for_data(cfg.data)
    manifest = dataset.manifest
    decoder = dataset.decoder(cfg.data.train_split, 0)
    online = OnlineKNN(cfg, dataset, {"mode": manifest["mode"], "image_size": decoder.image_size,
                                       "mean": decoder.mean.flatten().tolist(), "std": decoder.std.flatten().tolist()})
    return knn_accuracy(online.bank_images.flatten(1), online.bank_labels, online.query_images.flatten(1), online.query_labels,
                        online.k, online.temperature)


def run_variant(name: str, spec: dict, data_root: str, out: Path) -> dict:
    from pipeline.train.launch import pretrain_local
    from pipeline.train.metrics import read_metrics

    run_dir = out / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    overrides = [f"--data.root={data_root}", f"--run_dir={run_dir}", "--scaling.num_workers=1", *spec.get("overrides", [])]
    cfg = Config.load(spec["config"], overrides)
    if not cfg.eval.online_every:
        cfg.eval.online_every = cfg.train.steps  # the last step only
    cfg.train.checkpoint_every = cfg.train.steps
    host, start = HostWindow.start(), time.perf_counter()
    pretrain_local(cfg)
    wall = time.perf_counter() - start
    rows = read_metrics(run_dir)
    scored = [r for r in rows if "online_knn" in r]
    return {"name": name, "config": spec["config"], "overrides": spec.get("overrides", []), "steps": cfg.train.steps,
            "epochs": rows[-1]["epoch"], "wall_s": round(wall, 1), "online_eval_s": sum(r["online_eval_s"] for r in scored),
            "final_loss": rows[-1]["loss"], "online_knn": scored[-1]["online_knn"],
            "curve": [[r["step"], round(r["time"] - rows[0]["time"], 1), r["online_knn"]] for r in scored], **host.stop()}


def table(report: dict) -> str:
    lines = [f"raw pixels on the same subset: kNN {100 * report['pixel_knn']:.2f}", "",
             "| variant | steps (epochs) | wall s | steal % | idle % | final loss | online kNN |", "|---|---|---|---|---|---|---|"]
    for entry in sorted(report["variants"].values(), key=lambda e: -e["online_knn"]):
        lines.append(f"| {entry['name']} | {entry['steps']} ({entry['epochs']:.1f}) | {entry['wall_s']:.0f} | {entry.get('steal_pct', '-')} | "
                     f"{entry.get('idle_pct', '-')} | {entry['final_loss']:.4f} | {100 * entry['online_knn']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", required=True, help="YAML file: name -> {config, overrides}")
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    parser.add_argument("--data", default="data/fashion-mnist", help="shards of Fashion-MNIST (written if missing)")
    parser.add_argument("--out", default="runs/recipes")
    parser.add_argument("--rerun", action="store_true", help="run variants again even when OUT/recipes.json has them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    variants = yaml.safe_load(Path(args.variants).read_text())
    wanted = [n for n in args.only.split(",") if n] or list(variants)
    unknown = sorted(set(wanted) - set(variants))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; the file has {list(variants)}")

    from pipeline.data.ingest import write_fashion_mnist
    from pipeline.data.shards import MANIFEST

    if not (Path(args.data) / MANIFEST).is_file():
        write_fashion_mnist(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "recipes.json"
    report = json.loads(path.read_text()) if path.exists() else {"variants": {}}
    for name in wanted:
        if name in report["variants"] and not args.rerun:
            continue
        entry = run_variant(name, variants[name], args.data, out)
        if "pixel_knn" not in report:
            # On the same subset as the variants' (their overrides may resize it).
            report["pixel_knn"] = pixel_knn(Config.load(variants[name]["config"], [f"--data.root={args.data}", *variants[name].get("overrides", [])]))
        report["variants"][name] = entry
        path.write_text(json.dumps(report, indent=2))
        (out / "recipes.md").write_text(table(report) + "\n")
        print(table(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
