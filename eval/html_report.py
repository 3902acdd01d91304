"""`sslpipe report`: one self-contained HTML page comparing run directories.

Everything is inline (CSS, PNGs as base64 data URIs) and there is no script, so the file can be
mailed, attached to a ticket or opened offline, and shows the same everywhere. Every string taken
from a run's files goes through `html.escape`.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from eval.report import ROW_NAMES
from pipeline.train.metrics import read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_IMAGES = ("training_curves.png", "eval/results.png", "eval/embedding.png", "eval/per_layer.png", "eval/samples.png")
ROW_ORDER = ("pretrained", "random_init", "raw_pixels")  # then any other rows results.json holds
STEP_GRID = re.compile(r"step_(\d+)_(.+)\.png")  # training-time grids: <run_dir>/samples/step_00000600_<kind>.png
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f0f0; }
.note { color: #8a5a00; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 12px; color: #555; }
pre { background: #f7f7f7; padding: 0.5em; overflow-x: auto; }
"""


@dataclass
class Run:
    path: Path
    name: str
    config: dict
    metrics: list[dict]
    results: dict | None


def load_run(path: str | Path) -> Run:
    """A run directory's config.yaml, metrics.jsonl and eval/results.json (a URL run's: fetched into
    its local mirror); errors name the file."""
    from pipeline.train.run_storage import fetch_run

    path = fetch_run(path)  # a URL run's files in its local mirror; a local run as it is
    if not path.is_dir():
        raise FileNotFoundError(f"RUN_DIR {path}: no such directory")
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"RUN_DIR {path}: not a run directory (no config.yaml; `sslpipe pretrain` writes one)")
    try:
        config = yaml.safe_load(config_file.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{config_file}: not valid YAML: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a mapping of config sections, got {type(config).__name__}")
    try:
        metrics = read_metrics(path)
    except ValueError as err:  # json.JSONDecodeError
        raise ValueError(f"{path / 'metrics.jsonl'}: {err}") from err
    results_file = path / "eval" / "results.json"
    results = None
    if results_file.is_file():
        try:
            results = json.loads(results_file.read_text())
        except ValueError as err:
            raise ValueError(f"{results_file}: {err}") from err
    return Run(path, path.resolve().name, config, metrics, results)


def setting(config: dict, section: str, key: str):
    value = config.get(section)
    return value.get(key) if isinstance(value, dict) else None


def wall_time(metrics: list[dict]) -> tuple[float, int, int] | None:
    """Seconds between the first and the last metrics row that carry a wall-clock "time", and their steps."""
    timed = [m for m in metrics if isinstance(m.get("time"), (int, float)) and "step" in m]
    if len(timed) < 2:
        return None
    return timed[-1]["time"] - timed[0]["time"], timed[0]["step"], timed[-1]["step"]


def png_data_uri(path: Path) -> str | None:
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def run_images(run: Run) -> tuple[list[Path], int]:
    """The run's PNGs in reading order, and how many older training-time grids were left out
    (a grid per checkpoint and kind would make long runs' reports huge: the newest of each kind stays)."""
    images = [run.path / name for name in RUN_IMAGES if (run.path / name).is_file()]
    images += sorted(run.path.glob("examples*.png"))
    newest: dict[str, tuple[int, Path]] = {}
    others, grids = [], 0
    for file in sorted((run.path / "samples").glob("*.png")):
        match = STEP_GRID.fullmatch(file.name)
        if not match:
            others.append(file)
            continue
        grids += 1
        step, kind = int(match.group(1)), match.group(2)
        if kind not in newest or step > newest[kind][0]:
            newest[kind] = (step, file)
    kept = [file for _, file in sorted(newest.values(), key=lambda item: item[1].name)]
    return images + others + kept, grids - len(kept)


def number(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "–"


def percent(value) -> str:
    return number(100 * value, ".2f") if isinstance(value, (int, float)) else "–"


def result_rows(runs: list[Run]) -> list[tuple[str, list[str], bool]]:
    """(label, one cell per run, bold the best) for the side-by-side eval table."""
    evaluated = [r.results for r in runs if r.results]
    ks = sorted({int(k) for res in evaluated for k in res.get("knn_k", [])})
    names = [n for n in ROW_ORDER if any(n in res.get("rows", {}) for res in evaluated)]
    names += sorted({n for res in evaluated for n in res.get("rows", {})} - set(names))
    lines = [("evaluated at step", [str(r.results.get("step", "–")) if r.results else "–" for r in runs], False),
             ("image size", [str(r.results.get("image_size", "–")) if r.results else "–" for r in runs], False)]
    for name in names:
        rows = [(r.results or {}).get("rows", {}).get(name, {}) for r in runs]
        label = ROW_NAMES.get(name, name)
        lines.append((f"{label}: dim", [str(row.get("dim", "–")) for row in rows], False))
        for k in ks:
            lines.append((f"{label}: kNN top-1 (k={k})", [percent(row.get("knn", {}).get(str(k))) for row in rows], name == "pretrained"))
        lines.append((f"{label}: linear top-1", [percent(row.get("linear")) for row in rows], name == "pretrained"))
        settings = list(dict.fromkeys(s for row in rows for s in row.get("low_shot", {})))  # "1%", ..., "50-shot"
        for setting_name in settings:
            lines.append((f"{label}: low-shot {setting_name} (mean of seeds)",
                          [percent(row.get("low_shot", {}).get(setting_name, {}).get("mean")) for row in rows], name == "pretrained"))
        if any("clustering" in row for row in rows):
            for metric, title in (("nmi", "NMI"), ("accuracy", "matched accuracy")):
                lines.append((f"{label}: k-means {title}", [percent(row.get("clustering", {}).get(metric)) for row in rows], name == "pretrained"))
    generative = [(r.results or {}).get("generative") or {} for r in runs]
    if any(generative):
        lines.append(("test bits/dim", [number(g.get("bits_per_dim"), ".3f") + (f" ({g['kind']})" if "kind" in g else "") for g in generative], False))
        lines.append(("test nats per image", [number(g.get("nats_per_image"), ".1f") for g in generative], False))
    lines.append(("eval wall time (s)", [str(r.results.get("seconds", "–")) if r.results else "–" for r in runs], False))
    return lines


def comparison_chart(runs: list[Run]) -> str | None:
    """Grouped bars: each run's pretrained backbone per column (kNN per k, linear), plus the
    baselines; a baseline that is the same in every run (same data and size) is drawn once."""
    evaluated = [r for r in runs if r.results and "rows" in r.results]
    if not evaluated:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ks = sorted({int(k) for r in evaluated for k in r.results.get("knn_k", [])})
    columns = [f"kNN k={k}" for k in ks] + ["linear"]

    def values(row: dict) -> tuple:  # nan: a value this run did not measure (no bar)
        knn = row.get("knn", {})
        return tuple(100 * knn[str(k)] if str(k) in knn else float("nan") for k in ks) + (100 * row.get("linear", float("nan")),)

    series = [(r.name, values(r.results["rows"]["pretrained"])) for r in evaluated if "pretrained" in r.results["rows"]]
    pretrained = len(series)
    for baseline in ("raw_pixels", "random_init"):
        groups: dict[str, tuple[tuple, list[str]]] = {}  # equal values (same data, size, architecture and seed): one series
        for r in evaluated:
            if baseline in r.results["rows"]:
                vals = values(r.results["rows"][baseline])
                groups.setdefault(repr(vals), (vals, []))[1].append(r.name)  # repr: nan == nan as a key
        for vals, names in groups.values():
            series.append((ROW_NAMES[baseline] + ("" if len(groups) == 1 else f" ({', '.join(names)})"), vals))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(columns) * len(series)) + 3, 4))  # + 3 inches: the legend at the right
    width = 0.8 / len(series)
    for i, (label, vals) in enumerate(series):
        label = label.replace("$", r"\$")  # a run name is not matplotlib mathtext
        bars = ax.bar([c + i * width for c in range(len(columns))], vals, width, label=label, hatch="//" if i >= pretrained else None)
        ax.bar_label(bars, labels=[f"{v:.1f}" if v == v else "" for v in vals], fontsize=6, rotation=90 if len(series) > 4 else 0, padding=2)
    ax.set_xticks([c + width * (len(series) - 1) / 2 for c in range(len(columns))], columns)
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(0, 108)  # room for the labels above 100 % bars
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_title("pretrained backbones across runs (hatched: baselines)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def table(header: list[str], rows: list[list[str]]) -> str:
    """Cells are HTML already (callers escape what comes from files)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def eval_table(runs: list[Run]) -> str:
    rows = []
    for label, cells, compare in result_rows(runs):
        numbers = [float(c) for c in cells if c.replace(".", "", 1).isdigit()]
        best = max(numbers) if compare and len(numbers) > 1 else None
        rows.append([html.escape(label), *(f"<b>{html.escape(c)}</b>" if best is not None and c != "–" and float(c) == best
                                           else html.escape(c) for c in cells)])
    return table(["", *(html.escape(r.name) for r in runs)], rows)


def summary_table(runs: list[Run]) -> str:
    rows = []
    for r in runs:
        steps = setting(r.config, "train", "steps")
        last = r.metrics[-1].get("step") if r.metrics else None
        done = f"{last} of {steps}" if last is not None else f"{steps} (none logged)"
        timing = wall_time(r.metrics)
        wall = f"{timing[0]:.0f} (steps {timing[1]}–{timing[2]})" if timing else "–"
        backbone = setting(r.config, "model", "backbone")
        kwargs = setting(r.config, "model", "backbone_kwargs")
        rows.append([html.escape(str(v)) for v in (
            r.name, setting(r.config, "task", "name"), f"{backbone} {json.dumps(kwargs)}" if kwargs else backbone, done,
            setting(r.config, "train", "global_batch_size"), setting(r.config, "scaling", "num_workers"),
            (r.results or {}).get("dataset") or setting(r.config, "data", "root"), wall)])
    return table(["run", "task", "backbone", "steps logged", "global batch", "workers", "data", "pretraining wall time (s)"], rows)


def run_section(run: Run) -> str:
    parts = [f'<h2 id="{html.escape(run.name)}">{html.escape(run.name)}</h2>', f"<p><code>{html.escape(str(run.path))}</code></p>"]
    if run.results is None:
        parts.append(f'<p class="note">No eval results (no eval/results.json): run <code>sslpipe eval {html.escape(str(run.path))}</code>.</p>')
    if not run.metrics:
        parts.append('<p class="note">No metrics.jsonl rows: the run logged no steps yet.</p>')
    options = setting(run.config, "task", "options")
    if options:
        parts.append(f"<p>task options: <code>{html.escape(json.dumps(options))}</code></p>")
    parts.append(f"<details><summary>config.yaml</summary><pre>{html.escape(yaml.safe_dump(run.config, sort_keys=False))}</pre></details>")
    images, left_out = run_images(run)
    for file in images:
        uri = png_data_uri(file)
        caption = html.escape(str(file.relative_to(run.path)))
        if uri is None:
            parts.append(f'<p class="note">{caption}: not a PNG file, left out.</p>')
            continue
        parts.append(f'<figure><img src="{uri}" alt="{caption}"><figcaption>{caption}</figcaption></figure>')
    if left_out:
        parts.append(f'<p class="note">samples/: {left_out} older training-time grid(s) left out (the newest of each kind is shown).</p>')
    return "<section>" + "\n".join(parts) + "</section>"


def build_report(run_dirs: list[str | Path]) -> str:
    if not run_dirs:
        raise ValueError("sslpipe report needs at least one RUN_DIR")
    runs = [load_run(path) for path in run_dirs]
    seen: dict[str, int] = {}
    for run in runs:  # two runs of the same folder name (runs/a/x, runs/b/x) keep apart by their path
        seen[run.name] = seen.get(run.name, 0) + 1
    for run in runs:
        if seen[run.name] > 1:
            run.name = str(run.path)
    body = [f"<h1>sslpipe report: {len(runs)} run{'s' if len(runs) > 1 else ''}</h1>", "<h2>Runs</h2>", summary_table(runs),
            "<p>Pretraining wall time: between the first and the last metrics row (Ray start-up before the first row is not "
            "included; a resumed run's includes the pause).</p>"]
    if any(r.results for r in runs):
        body += ["<h2>Evaluation (test top-1 %, frozen features; best pretrained run in bold)</h2>", eval_table(runs)]
        chart = comparison_chart(runs)
        if chart:
            body.append(f'<figure><img src="{chart}" alt="comparison across runs"><figcaption>comparison across runs</figcaption></figure>')
    else:
        body.append('<p class="note">None of these runs has eval results yet (sslpipe eval RUN_DIR).</p>')
    body += [run_section(run) for run in runs]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>sslpipe report</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(run_dirs: list[str | Path], out: str | Path = "report.html") -> Path:
    text = build_report(run_dirs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
