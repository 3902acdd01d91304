"""embedding.png (t-SNE) and `sslpipe report`: a self-contained HTML page that renders in headless Chromium."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from core.grids import save_grid
from eval.embedding import plot_embedding, stratified_subsample, tsne_2d
from eval.html_report import build_report
from eval.report import write_results
from pipeline.cli import main
from pipeline.config import Config
from pipeline.train.metrics import MetricsLog, plot_metrics

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
TAB10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]  # matplotlib's first three class colours
DATA_URI = re.compile(r'<img src="data:image/png;base64,([^"]+)"')


def clusters(n: int, classes: int, dim: int, seed: int = 0, spread: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Isotropic unit Gaussians around class centres `spread` apart on average: well separated."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(scale=spread / np.sqrt(2 * dim), size=(classes, dim))  # E|c_i - c_j|^2 = spread^2
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def test_stratified_subsample_keeps_rare_classes_and_is_seeded():
    labels = np.array([0] * 9000 + [1] * 990 + [2] * 10)
    index = stratified_subsample(labels, 2000, seed=3)
    counts = np.bincount(labels[index], minlength=3)
    assert abs(len(index) - 2000) <= 3 and counts[2] == 2 and abs(counts[1] - 198) <= 1 and abs(counts[0] - 1800) <= 1
    assert len(set(index.tolist())) == len(index)
    assert np.array_equal(index, stratified_subsample(labels, 2000, seed=3))
    assert not np.array_equal(index, stratified_subsample(labels, 2000, seed=4))
    assert np.array_equal(stratified_subsample(labels[:50], 2000), np.arange(50))


def test_tsne_keeps_well_separated_clusters_apart():
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    features, labels = clusters(200, 5, 64)  # 64 > 50 dims: the PCA step runs too
    xy = tsne_2d(features, seed=0)
    assert xy.shape == (200, 2) and np.isfinite(xy).all()
    knn_2d = cross_val_score(KNeighborsClassifier(5), xy, labels, cv=5).mean()
    assert knn_2d > 0.95
    # the same 2-D kNN on a map of shuffled points is at chance: the high score comes from the map
    shuffled = cross_val_score(KNeighborsClassifier(5), xy[np.random.default_rng(1).permutation(200)], labels, cv=5).mean()
    assert shuffled < 0.5


def test_plot_embedding_writes_a_png_coloured_by_class(tmp_path):
    features, labels = clusters(120, 3, 16)
    labels[:5] = -1  # unlabelled samples are drawn grey
    path = plot_embedding(features, labels, tmp_path / "sub" / "embedding.png", ["shirt", "bag", "boot"], seed=0)
    image = Image.open(path).convert("RGB")
    assert path == tmp_path / "sub" / "embedding.png" and image.size == (770, 660)  # 7 x 6 inches at 110 dpi
    colours = {c for _, c in image.getcolors(maxcolors=1 << 20)}
    assert all(colour in colours for colour in TAB10)
    assert plot_embedding(features[:3], labels[:3], tmp_path / "tiny.png") is None and not (tmp_path / "tiny.png").exists()
    with pytest.raises(ValueError, match="120 feature rows but 3 labels"):
        plot_embedding(features, labels[:3], tmp_path / "bad.png")


def make_run(root, name: str, knn20: float, evaluated: bool = True, options: dict | None = None):
    """A run directory as pretrain and eval leave it, written with the project's own writers."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    cfg = Config.from_dict({"task": {"name": "rotation"}, "train": {"steps": 40, "global_batch_size": 64}, "run_dir": str(run_dir)})
    cfg.save(run_dir / "config.yaml")
    if options:  # a hand-edited config: the report reads YAML, it does not validate
        values = yaml.safe_load((run_dir / "config.yaml").read_text())
        values["task"]["options"] = options
        (run_dir / "config.yaml").write_text(yaml.safe_dump(values))
    log = MetricsLog(run_dir)
    for step in (20, 40):
        log.write({"loss": 2.0 / step, "accuracy": step / 50, "step": step, "time": 1000.0 + 3 * step})
    plot_metrics(run_dir)
    grid = torch.from_numpy(np.random.default_rng(0).random((4, 1, 8, 8)).astype(np.float32))
    for step in (20, 40):
        save_grid(grid, run_dir / "samples" / f"step_{step:08d}_prior_samples.png", nrow=2)
    if evaluated:
        rows = {"raw_pixels": {"dim": 256, "knn": {"20": 0.8569, "200": 0.8212}, "linear": 0.8405},
                "pretrained": {"dim": 64, "knn": {"20": knn20, "200": knn20 - 0.02}, "linear": knn20 + 0.01,
                               "low_shot": {"1%": {"mean": 0.7777, "std": 0.01, "runs": [0.7677, 0.7877]}, "100-shot": {"skipped": "too few"}},
                               "clustering": {"nmi": 0.5432, "ari": 0.4, "accuracy": 0.6543}}}
        results = {"task": "rotation", "backbone": "resnet18", "dataset": "glyphs <i>&</i>", "step": 40, "image_size": 16,
                   "knn_k": [20, 200], "rows": rows, "seconds": 1.5,
                   "generative": {"kind": "elbo", "nats_per_image": -2359.78, "bits_per_dim": 4.3424, "images": 48}}
        write_results(results, run_dir / "eval")
        features, labels = clusters(40, 3, 8)
        plot_embedding(features, labels, run_dir / "eval" / "embedding.png", ["a", "b", "c"])
    return run_dir


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return make_run(root, 'rot-<b>&"a"', 0.8123), make_run(root, "rot-b", 0.7001, evaluated=False, options={"note": "<script>x</script>"})


def test_report_holds_both_runs_values_and_embedded_images_only(two_runs):
    a, b = two_runs
    page = build_report([a, b])
    assert "rot-&lt;b&gt;&amp;&quot;a&quot;" in page and 'rot-<b>&"a"' not in page  # names from the file system are escaped
    assert "glyphs &lt;i&gt;&amp;&lt;/i&gt;" in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert "<script" not in page.lower() and "<link" not in page.lower() and "url(" not in page
    for value in ("81.23", "79.23", "82.23", "85.69", "84.05", "4.342 (elbo)", "-2359.8", "60 (steps 20–40)", "40 of 40",
                  "low-shot 1% (mean of seeds)", "77.77", "k-means NMI", "54.32", "65.43"):
        assert value in page, value
    assert "rot-b" in page and "No eval results" in page and "sslpipe eval" in page
    assert not [link for link in re.findall(r'(?:src|href)="([^"]*)"', page) if "http" in link or not link.startswith("data:image/png;base64,")]
    images = DATA_URI.findall(page)
    # comparison chart; run a: curves, results, embedding, newest grid; run b: curves, newest grid
    assert len(images) == len(re.findall(r"<img ", page)) == 7
    assert all(base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n") for data in images)
    assert "samples/step_00000040_prior_samples.png" in page and "step_00000020" not in page and "samples/: 1 older training-time grid(s) left out" in page


def test_cli_report_writes_the_page(two_runs, tmp_path, capsys):
    out = tmp_path / "out" / "report.html"
    assert main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert "81.23" in out.read_text(encoding="utf-8")


def test_bad_run_dirs_are_errors_naming_them(two_runs, tmp_path, capsys):
    assert main(["report", str(two_runs[0]), str(tmp_path / "no-such-run")]) == 2
    assert "no-such-run: no such directory" in capsys.readouterr().err
    (tmp_path / "not-a-run").mkdir()
    assert main(["report", str(tmp_path / "not-a-run")]) == 2
    assert "not-a-run: not a run directory (no config.yaml" in capsys.readouterr().err
    broken = make_run(tmp_path, "broken", 0.5)
    (broken / "eval" / "results.json").write_text("{not json")
    assert main(["report", str(broken), "--out", str(tmp_path / "r.html")]) == 2
    assert str(broken / "eval" / "results.json") in capsys.readouterr().err and not (tmp_path / "r.html").exists()


def chromium(*args: str, cwd) -> subprocess.CompletedProcess:
    # profile, crash-report database and cache all under cwd: nothing is written to the real $HOME
    env = {**os.environ, "HOME": str(cwd), "XDG_CONFIG_HOME": str(cwd / "config"), "XDG_CACHE_HOME": str(cwd / "cache")}
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={cwd / 'profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd, env=env, check=True)


def coloured_pixels(path) -> int:
    """Pixels of a saturated colour: text, tables and broken-image icons are grey, plots are not
    (distinct colours would not tell them apart: anti-aliased text alone has hundreds)."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum())


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium; .ci/run installs it)")
def test_report_renders_in_headless_chromium(two_runs, tmp_path):
    page = build_report(list(two_runs))
    report = tmp_path / "report.html"
    report.write_text(page, encoding="utf-8")
    dom = chromium("--dump-dom", report.as_uri(), cwd=tmp_path).stdout
    for value in ("81.23", "82.23", "85.69", "4.342 (elbo)", "rot-b", "No eval results"):
        assert value in dom, value

    # Whether every <img> decoded needs script (naturalWidth); the report has none, so a copy gets a
    # checker, plus one broken image that must come out as not decoded (the check can fail).
    widths = [struct.unpack(">I", base64.b64decode(data)[16:20])[0] for data in DATA_URI.findall(page)]  # PNG IHDR width
    checker = ('<img src="data:image/png;base64,iVBORw0KGgoAAAAbroken"><script>addEventListener("load", () => {'
               'const out = document.createElement("pre"); out.id = "img-check";'
               'out.textContent = JSON.stringify(Array.from(document.images, i => i.naturalWidth)); document.body.append(out); });</script>')
    (tmp_path / "checked.html").write_text(page.replace("</body>", checker + "</body>"), encoding="utf-8")
    checked = chromium("--dump-dom", (tmp_path / "checked.html").as_uri(), cwd=tmp_path).stdout
    decoded = json.loads(re.search(r'<pre id="img-check">(.*?)</pre>', checked).group(1))
    assert decoded == [*widths, 0] and all(w > 0 for w in widths)  # each decoded to its PNG header's width

    # The screenshot shows the plots: many saturated pixels, against almost none with the images stripped.
    stripped = tmp_path / "stripped.html"
    stripped.write_text(DATA_URI.sub('<img src=""', page), encoding="utf-8")
    for html_file in (report, stripped):
        chromium("--hide-scrollbars", "--window-size=1200,3000", f"--screenshot={tmp_path / (html_file.stem + '.png')}",
                 html_file.as_uri(), cwd=tmp_path)
    shot, blank = coloured_pixels(tmp_path / "report.png"), coloured_pixels(tmp_path / "stripped.png")
    assert shot > 50_000 and blank < shot / 20  # blank: the orange notes' text only
