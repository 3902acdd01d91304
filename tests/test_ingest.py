"""`sslpipe data ... --workers N`: shards written by a process pool are the same bytes as one
process's, bad files are still named, and the statistics shortcut for arrays matches decoding."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.data.ingest import write_fashion_mnist, write_image_folder
from pipeline.data.shards import ImageArraySource, Sample, encode_png, write_split
from tests.conftest import synthetic_images


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def test_fashion_mnist_with_two_workers_writes_the_same_bytes(tmp_path, fake_fashion_mnist, monkeypatch):
    import multiprocessing

    import pipeline.data.shards

    pools, real_pool = [], multiprocessing.Pool

    def counting_pool(processes, **kwargs):  # the real pool, counted: the two runs must differ in how they wrote
        pools.append(processes)
        return real_pool(processes, **kwargs)

    monkeypatch.setattr(pipeline.data.shards.multiprocessing, "Pool", counting_pool)
    one = write_fashion_mnist(tmp_path / "one", src=str(fake_fashion_mnist), samples_per_shard=7).parent
    assert pools == []
    two = write_fashion_mnist(tmp_path / "two", src=str(fake_fashion_mnist), samples_per_shard=7, workers=2).parent
    assert pools == [2, 2]  # train and test
    files = folder_bytes(one)
    assert len([f for f in files if f.endswith(".tar")]) == 5 + 2  # 30 train, 10 test at 7 per shard
    assert folder_bytes(two) == files  # every shard and the manifest, byte for byte


def test_array_statistics_match_decoding_the_png(tmp_path):
    """ImageArraySource gives the writer its own pixels, so it skips decoding its PNG again: the
    split's mean/std, sizes and shards must be what decoding every written PNG gives."""
    images, labels = synthetic_images(23, 16, seed=4)
    from_stream = write_split((Sample(f"train_{i:06d}", encode_png(im), "png", int(lab)) for i, (im, lab) in enumerate(zip(images, labels))),
                              tmp_path / "stream", "train", 23, "L", 5, progress=False)
    from_source = write_split(ImageArraySource(images, labels, "train"), tmp_path / "source", "train", 0, "L", 5, progress=False, workers=2)
    assert from_source == from_stream
    pixels = images.astype(np.float64) / 255
    assert from_source["mean"] == [round(pixels.mean(), 6)] and from_source["std"] == [round(pixels.std(), 6)]
    with pytest.raises(ValueError, match="uint8"):
        ImageArraySource(images.astype(np.float32), labels, "train")


def make_tree(root: Path, count: int, bad: int | None = None) -> None:
    images, labels = synthetic_images(count, 16, seed=1)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:03d}.png"
        if i == bad:
            path.write_bytes(b"\x89PNG not really")
        else:
            Image.fromarray(image).convert("RGB").save(path)


def test_image_folder_with_two_workers_writes_the_same_bytes_and_names_a_bad_file(tmp_path):
    make_tree(tmp_path / "tree", 40)
    one = write_image_folder(tmp_path / "tree", tmp_path / "one", samples_per_shard=6).parent
    two = write_image_folder(tmp_path / "tree", tmp_path / "two", samples_per_shard=6, workers=2).parent
    assert folder_bytes(two) == folder_bytes(one) and len(folder_bytes(one)) == 7 + 1

    make_tree(tmp_path / "bad-tree", 40, bad=20)
    with pytest.raises(ValueError, match=r"img020\.png.*does not decode"):
        write_image_folder(tmp_path / "bad-tree", tmp_path / "bad", samples_per_shard=6, workers=2)
    written, good = folder_bytes(tmp_path / "bad"), folder_bytes(one)
    assert "manifest.json" not in written
    # The shard holding the bad file never looks finished; every shard that does is complete (the
    # good tree's images are the same, so its shards are the same bytes).
    complete = [name for name in written if name.endswith(".tar")]
    assert len(complete) < 7 and all(written[name] == good[name] for name in complete), complete


def test_av_synth_with_two_workers_writes_the_same_bytes(tmp_path):
    from pipeline.data.av_synth import write_av_synth

    args = dict(clips=6, classes=2, duration=2.0, image_size=16, test_fraction=0.34, samples_per_shard=3)
    one = write_av_synth(tmp_path / "one", **args).parent
    two = write_av_synth(tmp_path / "two", **args, workers=2).parent
    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 4 * 3 and len(manifest["splits"]["train"]["shards"]) == 4
    assert folder_bytes(two) == folder_bytes(one)


def test_cli_takes_workers_and_refuses_bad_values(tmp_path, capsys):
    assert main(["data", "digits", "--out", str(tmp_path / "one")]) == 0
    assert main(["data", "digits", "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert folder_bytes(tmp_path / "two") == folder_bytes(tmp_path / "one")
    assert main(["data", "digits", "--out", str(tmp_path / "zero"), "--workers", "0"]) == 2
    assert "--workers 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="SampleSource"):
        write_split(iter([]), tmp_path / "s", "train", 0, "L", workers=2)
