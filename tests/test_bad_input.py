"""Bad input: each bad sample or shard is skipped and counted by default (warning naming shard and
key), raises under --strict, and aborts the loader above data.max_bad_fraction; unusual image
modes are converted, not rejected."""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.bad_samples import BadSamples, ShardError
from pipeline.data.decode import ImageDecoder
from pipeline.data.streaming import eval_loader, train_loader
from tests.test_data import png_bytes, write_raw_shard

GOOD = [{"__key__": f"good{i}", "png": png_bytes(), "cls": b"1"} for i in range(6)]
BAD = {
    "undecodable": ({"__key__": "bad", "png": b"not a png", "cls": b"0"}, "does not decode"),
    "zero_bytes": ({"__key__": "bad", "png": b"", "cls": b"0"}, "zero bytes"),
    "no_image": ({"__key__": "bad", "cls": b"0"}, "no image"),
    "no_label": ({"__key__": "bad", "png": png_bytes()}, "no label"),
    "label_out_of_range": ({"__key__": "bad", "png": png_bytes(), "cls": b"7"}, "outside the 4 classes"),
    "negative_label": ({"__key__": "bad", "png": png_bytes(), "cls": b"-1"}, "outside the 4 classes"),
    "pickled_entry": ({"__key__": "bad", "png": png_bytes(), "cls": b"0", "pyd": b"cos\nsystem\n(S'true'\ntR."}, "pickled"),
}


def decoder(mode: str = "L") -> ImageDecoder:
    channels = 1 if mode == "L" else 3
    return ImageDecoder(mode, 8, [0.0] * channels, [1.0] * channels, require_label=True, num_classes=4)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sample_is_skipped_counted_and_named(tmp_path, caplog, case):
    sample, reason = BAD[case]
    url = write_raw_shard(tmp_path / f"{case}.tar", GOOD[:3] + [sample] + GOOD[3:])
    loader = eval_loader([url], 0, 1, decoder(), 4, 0)
    with caplog.at_level(logging.WARNING, logger="sslpipe.data"):
        keys = [k for _, _, batch in loader for k in batch]
    assert keys == [f"good{i}" for i in range(6)]  # nothing good is lost
    assert loader.bad_samples.counts() == {"seen": 7, "bad_samples": 1, "bad_shards": 0, "missing_samples": 0}
    assert f"{case}.tar" in caplog.text and "key bad" in caplog.text and reason in caplog.text


@pytest.mark.parametrize("case", sorted(BAD))
def test_strict_raises_on_the_first_bad_sample_naming_shard_and_key(tmp_path, case):
    sample, reason = BAD[case]
    url = write_raw_shard(tmp_path / f"{case}.tar", GOOD[:3] + [sample])
    with pytest.raises(ShardError, match=rf"{case}.tar, key bad: .*{reason}"):
        list(eval_loader([url], 0, 1, decoder(), 4, 0, bad_samples=BadSamples(strict=True)))


def test_truncated_and_zero_byte_shards_keep_what_was_read_and_go_on(tmp_path, caplog):
    whole = write_raw_shard(tmp_path / "whole.tar", GOOD)
    data = open(whole, "rb").read()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    (tmp_path / "empty.tar").write_bytes(b"")
    urls = [str(tmp_path / "cut.tar"), str(tmp_path / "empty.tar"), whole]
    loader = eval_loader(urls, 0, 1, decoder(), 4, 0)
    with caplog.at_level(logging.WARNING, logger="sslpipe.data"):
        keys = [k for _, _, batch in loader for k in batch]
    # The cut shard's samples up to the cut (a sample cut in half is a bad sample), then the whole shard.
    from_cut = keys[:-6]
    assert 1 <= len(from_cut) < 6 and from_cut == [f"good{i}" for i in range(len(from_cut))]
    assert keys[-6:] == [f"good{i}" for i in range(6)]
    assert loader.bad_samples.counts()["bad_shards"] == 2
    assert "cut.tar" in caplog.text and "empty.tar" in caplog.text


def cut_at_member(path, keep: int) -> None:
    """Cuts a tar in place just before the header of sample number `keep`: what a truncated
    download looks like when the cut falls on a block boundary. Stream-mode tarfile ends there cleanly."""
    import tarfile

    with tarfile.open(path) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    files_per_sample = 2  # png + cls
    data = open(path, "rb").read()
    open(path, "wb").write(data[: offsets[keep * files_per_sample]])


def test_shard_ending_cleanly_short_of_its_manifest_count_is_warned_counted_and_kept(tmp_path, caplog):
    from pipeline.data.storage import ShardUrl

    whole = write_raw_shard(tmp_path / "whole.tar", GOOD)
    cut = write_raw_shard(tmp_path / "cut.tar", GOOD)
    cut_at_member(cut, 3)
    assert [k for _, _, batch in eval_loader([cut], 0, 1, decoder(), 4, 0) for k in batch] == ["good0", "good1", "good2"]
    loader = eval_loader([ShardUrl(cut, 6), ShardUrl(whole, 6)], 0, 1, decoder(), 4, 0)
    with caplog.at_level(logging.WARNING, logger="sslpipe.data"):
        keys = [k for _, _, batch in loader for k in batch]
    assert keys == ["good0", "good1", "good2"] + [f"good{i}" for i in range(6)]  # what was there is kept
    assert loader.bad_samples.counts() == {"seen": 12, "bad_samples": 3, "bad_shards": 1, "missing_samples": 3}
    assert "cut.tar: read 3 of 6 samples its manifest lists" in caplog.text and "whole.tar" not in caplog.text
    assert "3 sample(s) missing" in loader.bad_samples.summary()
    with pytest.raises(ShardError, match=r"cut.tar: read 3 of 6 samples"):
        list(eval_loader([ShardUrl(cut, 6)], 0, 1, decoder(), 4, 0, bad_samples=BadSamples(strict=True)))
    # The missing samples count toward data.max_bad_fraction.
    with pytest.raises(ShardError, match=r"3 of 12 samples were bad or missing, more than data.max_bad_fraction=0.2"):
        list(eval_loader([ShardUrl(whole, 6), ShardUrl(cut, 6)], 0, 1, decoder(), 4, 0, bad_samples=BadSamples(max_fraction=0.2, min_seen=5)))


def test_training_stream_warns_of_a_short_shard_on_every_pass(tmp_path, caplog):
    from pipeline.data.storage import ShardUrl

    cut = write_raw_shard(tmp_path / "cut.tar", GOOD)
    cut_at_member(cut, 4)
    policy = BadSamples(max_fraction=0.5)
    loader = train_loader([ShardUrl(cut, 6)], 0, 1, decoder(), lambda s: (s["image"], s["label"]), 4, 4, loader_workers=0,
                          seed=0, bad_samples=policy)
    batches = iter(loader)
    with caplog.at_level(logging.WARNING, logger="sslpipe.data"):
        for _ in range(3):  # 12 samples: three passes over the 4 left
            next(batches)
    assert caplog.text.count("cut.tar: read 4 of 6 samples") >= 2 and policy.counts()["missing_samples"] >= 4


def test_too_many_bad_samples_abort_with_the_fraction(tmp_path):
    samples = [dict(GOOD[i % 6], __key__=f"g{i}") for i in range(20)] + [dict(BAD["undecodable"][0], __key__=f"b{i}") for i in range(5)]
    url = write_raw_shard(tmp_path / "mostly.tar", samples)
    with pytest.raises(ShardError, match=r"3 of 23 samples were bad or missing, more than data.max_bad_fraction=0.1 \(last: .*mostly.tar, key b2"):
        list(eval_loader([url], 0, 1, decoder(), 4, 0, bad_samples=BadSamples(max_fraction=0.1, min_seen=10)))
    # Under the fraction: all good samples come through.
    loader = eval_loader([url], 0, 1, decoder(), 4, 0, bad_samples=BadSamples(max_fraction=0.25, min_seen=10))
    assert sum(len(batch) for _, _, batch in loader) == 20


def test_training_stream_skips_bad_samples_across_loader_workers(tmp_path):
    urls = [write_raw_shard(tmp_path / f"s{i}.tar", GOOD[:4] + [dict(BAD["zero_bytes"][0], __key__=f"bad{i}")]) for i in range(2)]
    policy = BadSamples(max_fraction=0.5)
    loader = train_loader(urls, 0, 1, decoder(), lambda s: (s["image"], s["label"]), 4, 8, loader_workers=2, seed=0, bad_samples=policy)
    batches = iter(loader)
    for _ in range(6):
        images, labels = next(batches)
        assert images.shape == (4, 1, 8, 8) and labels.tolist() == [1, 1, 1, 1]
    assert policy.counts()["bad_samples"] >= 2  # counted in the loader worker processes, seen here


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def decode_one(payload: bytes, mode: str, ext: str = "png") -> torch.Tensor:
    return decoder(mode)({"__key__": "k", "__url__": "u", ext: payload, "cls": b"0"})["image"]


def test_rgba_is_composited_over_black():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:4, ..., 3] = 255  # top half opaque, bottom half fully transparent
    rgba[4:, ..., 3] = 0
    image = decode_one(encode(Image.fromarray(rgba, "RGBA")), "RGB")
    assert torch.allclose(image[:, 0, 0], torch.tensor([200, 100, 50]) / 255)
    assert torch.equal(image[:, 7, 7], torch.zeros(3))  # not the hidden (200, 100, 50)


def test_palette_images_use_their_palette_and_transparency():
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert torch.allclose(decode_one(encode(palette), "RGB")[:, 0, 0], torch.tensor([10, 200, 30]) / 255)
    palette.info["transparency"] = 1  # colour 1 transparent: black after compositing
    assert torch.equal(decode_one(encode(palette), "RGB")[:, 0, 0], torch.zeros(3))


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    wide = np.array([[0, 257 * 128, 65535, 1000] * 2] * 8, dtype=np.uint16)
    image = decode_one(encode(Image.fromarray(wide)), "L")  # PIL saves mode I;16 as a 16-bit PNG
    assert image[0, 0, :4].mul(255).round().tolist() == [0, 128, 255, 3]  # PIL's convert("L") would give 255 for 1000


def test_cmyk_jpeg_is_converted_to_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink: white
    image = decode_one(encode(cmyk, "JPEG"), "RGB", ext="jpg")
    assert image.shape == (3, 8, 8) and image.min() > 0.95
    gray = decode_one(encode(Image.new("CMYK", (8, 8), (0, 0, 0, 255)), "JPEG"), "L", ext="jpg")  # full black ink
    assert gray.max() < 0.05


# ---- Checkpoints -----------------------------------------------------------------------------

def test_corrupted_latest_checkpoint_is_named_and_the_previous_one_used(shards, tmp_path, caplog):
    from pipeline.train.checkpoint import (
        CheckpointError,
        load_checkpoint,
        load_valid_checkpoint,
    )
    from pipeline.train.loop import train_worker
    from pipeline.train.metrics import read_metrics
    from pipeline.train.session import LocalSession
    from tests.test_train import tiny_config

    cfg = tiny_config(shards, tmp_path / "run", train__steps=20, train__checkpoint_every=10, train__log_every=10)
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    latest = tmp_path / "run" / "checkpoints" / "step_00000020" / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # a write cut short (a pre-atomic copy, a full disk)

    with caplog.at_level(logging.WARNING, logger="sslpipe.checkpoint"):
        file, state = load_valid_checkpoint(tmp_path / "run")
    assert state["step"] == 10 and file.parent.name == "step_00000010"
    assert str(latest) in caplog.text and "falling back" in caplog.text
    with pytest.raises(CheckpointError, match=str(latest)):
        load_checkpoint(latest)  # named directly: never silently replaced

    # Resuming continues from step 10, and the run completes its 30 steps.
    longer = tiny_config(shards, tmp_path / "run", train__steps=30, train__checkpoint_every=10, train__log_every=10)
    train_worker(longer, LocalSession(longer.run_dir, device="cpu"))
    assert [m["step"] for m in read_metrics(longer.run_dir)] == [10, 20, 20, 30]  # 11..20 redone after the fallback
    assert load_checkpoint(tmp_path / "run")["step"] == 30


def test_no_readable_checkpoint_lists_every_file(tmp_path):
    from pipeline.train.checkpoint import CheckpointError, load_checkpoint

    for step in (10, 20):
        folder = tmp_path / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint: .*step_00000020.*step_00000010"):
        load_checkpoint(tmp_path)


# ---- Command-line switches of the policy -----------------------------------------------------

def test_strict_and_shell_url_flags_set_the_data_config(tmp_path):
    from pipeline.cli import build_parser, load_config

    args = build_parser().parse_args(["pretrain", "--strict", "--allow-shell-urls"])
    cfg = load_config(args, [])
    assert cfg.data.strict and cfg.data.allow_shell_urls
    plain = load_config(build_parser().parse_args(["pretrain"]), [])
    assert not plain.data.strict and not plain.data.allow_shell_urls


def test_pipe_urls_refused_without_the_flag_and_run_with_it(tmp_path):
    from pipeline.data.storage import check_urls

    whole = write_raw_shard(tmp_path / "s.tar", GOOD)
    url = f"pipe:cat {whole}"
    with pytest.raises(ShardError, match="--allow-shell-urls"):
        check_urls([url])
    loader = eval_loader(check_urls([url], allow_shell_urls=True), 0, 1, decoder(), 4, 0)
    assert sum(len(batch) for _, _, batch in loader) == 6


def test_eval_strict_flag_raises_on_a_bad_sample_the_default_skips(shards, tmp_path, capsys):
    """End to end through `sslpipe eval`: one corrupted test sample is skipped (and reported) by
    default, and stops `sslpipe eval --strict` with a message naming shard and key."""
    import shutil

    from pipeline.cli import main
    from pipeline.train.loop import train_worker
    from pipeline.train.session import LocalSession
    from tests.test_train import tiny_config

    data = tmp_path / "data"
    shutil.copytree(shards, data)
    cfg = tiny_config(data, tmp_path / "run", train__steps=2, train__checkpoint_every=2)
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    shard = data / "test-000000.tar"
    write_raw_shard(shard, [{"__key__": "test_00000", "png": b"\x89PNG broken", "cls": b"0"}] + GOOD[:3])

    assert main(["eval", str(cfg.run_dir), "--out", str(tmp_path / "eval")]) == 0
    assert main(["eval", str(cfg.run_dir), "--out", str(tmp_path / "eval-strict"), "--strict"]) == 2
    assert "test-000000.tar, key test_00000" in capsys.readouterr().err


def test_eval_of_a_dataset_with_a_truncated_test_shard_records_the_shortfall(shards, tmp_path, caplog):
    """The issue's case end to end: a shard cut short on a block boundary in a real dataset's test
    split. Eval scores what is there, warns naming the shard, and results.json says how many of the
    listed samples were scored."""
    import json
    import shutil

    from pipeline.cli import main
    from pipeline.train.loop import train_worker
    from pipeline.train.session import LocalSession
    from tests.test_train import tiny_config

    data = tmp_path / "data"
    shutil.copytree(shards, data)
    cfg = tiny_config(data, tmp_path / "run", train__steps=2, train__checkpoint_every=2)
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    cut_at_member(data / "test-000001.tar", 5)  # 16 samples listed
    with caplog.at_level(logging.WARNING):
        assert main(["eval", str(cfg.run_dir), "--out", str(tmp_path / "eval")]) == 0
    # The loader worker process warns naming the shard (tested in process above); the eval's summary counts.
    assert "pretrained test: 11 bad sample(s) skipped of 48 read, 1 shard(s) cut short (11 sample(s) missing" in caplog.text
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["input"]["test"]["listed"] == 48 and results["input"]["test"]["scored"] == 37
    assert results["input"]["test"]["missing_samples"] == 11 and results["input"]["train"]["missing_samples"] == 0
    assert main(["eval", str(cfg.run_dir), "--out", str(tmp_path / "eval-strict"), "--strict"]) == 2


def test_training_stream_with_no_readable_shard_fails_instead_of_waiting_forever(tmp_path):
    urls = []
    for i in range(2):
        (tmp_path / f"empty{i}.tar").write_bytes(b"")
        urls.append(str(tmp_path / f"empty{i}.tar"))
    loader = train_loader(urls, 0, 1, decoder(), lambda s: (s["image"], s["label"]), 4, 8, loader_workers=0, seed=0)
    with pytest.raises(ShardError, match=r"20 shard reads failed and not one sample was read .*empty"):
        next(iter(loader))


def test_training_stream_skips_a_shard_deleted_mid_run_and_stops_when_all_are_gone(tmp_path, caplog):
    urls = [write_raw_shard(tmp_path / f"s{i}.tar", [dict(g, __key__=f"s{i}_{j}") for j, g in enumerate(GOOD)]) for i in range(3)]
    loader = train_loader(urls, 0, 1, decoder(), lambda s: (s["image"], s["label"]), 4, 4, loader_workers=0, seed=0)
    batches = iter(loader)
    next(batches)
    (tmp_path / "s1.tar").unlink()  # one shard deleted while the stream reads: skipped with a warning
    with caplog.at_level(logging.WARNING, logger="sslpipe.data"):
        for _ in range(12):  # 48 samples: passes over the 12 left in two shards
            images, _ = next(batches)
    assert "s1.tar" in caplog.text
    for url in urls:  # storage gone: every read fails from here on
        Path(url).unlink(missing_ok=True)
    with pytest.raises(ShardError, match=r"20 shard reads in a row failed, with no good sample between them .*storage gone"):
        for _ in range(100):
            next(batches)


def test_a_checkpoint_cannot_switch_shell_urls_on(shards, tmp_path, monkeypatch):
    """Someone else's run asks for `pipe:` shard URLs (its data.root runs `cat`, and its config has
    data.allow_shell_urls=true). Evaluating, exporting or resuming it must not run the command
    unless this user passes --allow-shell-urls."""
    import shutil

    from eval.evaluate import evaluate
    from eval.export import export_features
    from pipeline.cli import main
    from pipeline.train.loop import train_worker
    from pipeline.train.session import LocalSession
    from tests.test_train import tiny_config

    monkeypatch.chdir(tmp_path)
    shutil.copytree(shards, tmp_path / "shards")
    shutil.copytree(shards, tmp_path / "pipe:cat shards")  # holds the manifest; the shards stream through `cat`
    cfg = tiny_config("pipe:cat shards", tmp_path / "run", train__steps=2, train__checkpoint_every=2, data__allow_shell_urls=True)
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))  # the other user's run, shell URLs on
    with pytest.raises(ShardError, match="runs a shell command; pass --allow-shell-urls"):
        evaluate(cfg.run_dir, tmp_path / "eval", baselines=[])
    with pytest.raises(ShardError, match="runs a shell command"):
        export_features(cfg.run_dir, tmp_path / "export")
    assert main(["pretrain", "--local", "--resume", str(cfg.run_dir), "--train.steps=3"]) == 2
    # This user's own flag turns them on.
    assert evaluate(cfg.run_dir, tmp_path / "eval", baselines=[], data_options={"allow_shell_urls": True})["rows"]["pretrained"]
