"""Shards in and out: round trip, manifest, exactly-once extraction, training streams, bad input."""
from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.data.bad_samples import BadSamples, ShardError
from pipeline.data.decode import decoder_for
from pipeline.data.ingest import write_fashion_mnist, write_image_folder
from pipeline.data.shards import read_manifest, sha256, split_urls
from pipeline.data.sources import DatasetNotFoundError, find_fashion_mnist
from pipeline.data.storage import check_urls
from pipeline.data.streaming import eval_loader, train_loader
from tests.conftest import synthetic_images


def identity_transform(sample):
    return sample["image"], torch.tensor(sample["label"])


def test_manifest_counts_checksums_and_stats(shards):
    manifest = read_manifest(shards)
    train = manifest["splits"]["train"]
    assert train["count"] == 96 and [s["count"] for s in train["shards"]] == [16] * 6
    assert manifest["splits"]["test"]["count"] == 48
    for shard in train["shards"]:
        assert sha256(shards / shard["file"]) == shard["sha256"]
    images, _ = synthetic_images(96, 16, 0)
    assert train["mean"][0] == pytest.approx(images.mean() / 255, abs=1e-5)
    assert train["std"][0] == pytest.approx(images.std() / 255, abs=1e-5)
    assert train["image_size"] == [16, 16] and manifest["channels"] == 1


def test_round_trip_returns_the_written_pixels_and_labels(shards):
    manifest = read_manifest(shards)
    decoder = decoder_for(manifest, "train", 0, require_label=True)
    images, labels = synthetic_images(96, 16, 0)
    seen = 0
    for batch_images, batch_labels, keys in eval_loader(split_urls(shards, manifest, "train"), 0, 1, decoder, 10, 0):
        for image, label, key in zip(batch_images, batch_labels, keys):
            index = int(key.split("_")[1])
            pixels = image * decoder.std + decoder.mean  # undo normalization
            assert torch.allclose(pixels[0] * 255, torch.from_numpy(images[index]).float(), atol=1e-3)
            assert int(label) == labels[index]
            seen += 1
    assert seen == 96


def test_extraction_sees_every_sample_exactly_once_over_2_ranks_x_2_loader_workers(shards):
    manifest = read_manifest(shards)
    decoder = decoder_for(manifest, "train", 0)
    urls = split_urls(shards, manifest, "train")
    keys = []
    for rank in range(2):
        for _, _, batch_keys in eval_loader(urls, rank, 2, decoder, 7, loader_workers=2):
            keys.extend(batch_keys)
    assert len(keys) == 96
    assert sorted(keys) == [f"train_{i:05d}" for i in range(96)]


def test_training_stream_splits_shards_by_rank_and_repeats(shards):
    manifest = read_manifest(shards)
    decoder = decoder_for(manifest, "train", 0)
    urls = split_urls(shards, manifest, "train")

    def keys_of_rank(rank):
        loader = train_loader(urls, rank, 2, decoder, KeyTransform(), 8, shuffle_buffer=20, loader_workers=2, seed=0)
        return [k for batch in itertools.islice(loader, 20) for k in batch[1]]

    rank0, rank1 = keys_of_rank(0), keys_of_rank(1)
    assert len(rank0) == 160  # 20 full batches of 8 from 48 samples: the stream repeats
    shard_of = lambda key: int(key.split("_")[1]) // 16  # noqa: E731
    assert {shard_of(k) for k in rank0} == {0, 2, 4}
    assert {shard_of(k) for k in rank1} == {1, 3, 5}


class KeyTransform:
    def __call__(self, sample):
        return sample["image"], sample["key"]


def test_training_batches_have_the_task_shapes(shards):
    manifest = read_manifest(shards)
    decoder = decoder_for(manifest, "train", 24)
    loader = train_loader(split_urls(shards, manifest, "train"), 0, 1, decoder, identity_transform, 8, 10, 0, seed=0)
    images, labels = next(iter(loader))
    assert images.shape == (8, 1, 24, 24) and images.dtype == torch.float32
    assert labels.shape == (8,) and labels.dtype == torch.int64


def test_shell_urls_need_explicit_permission():
    with pytest.raises(ShardError, match="allow-shell-urls"):
        check_urls(["pipe:cat /etc/passwd"])
    with pytest.raises(ShardError, match="allow-shell-urls"):
        check_urls(["PIPE:cat /etc/passwd"])
    assert check_urls(["pipe:cat x.tar"], allow_shell_urls=True)


def test_missing_shard_and_empty_list_are_named():
    with pytest.raises(ShardError, match="nowhere-000.tar"):
        check_urls(["/tmp/nowhere-000.tar"])
    with pytest.raises(ShardError, match="empty"):
        check_urls([])


def write_raw_shard(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def png_bytes(mode="L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (8, 8), 128 if mode == "L" else (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def raw_decoder(shards):
    return decoder_for(read_manifest(shards), "train", 8, require_label=True)


def test_pickled_entries_are_refused_not_unpickled(tmp_path, raw_decoder):
    marker = tmp_path / "pwned"
    # Unpickling this payload would run `touch <marker>`.
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    url = write_raw_shard(tmp_path / "evil.tar", [{"__key__": "s0", "png": png_bytes(), "cls": b"1", "pyd": payload}])
    with pytest.raises(ShardError, match=r"evil.tar.*s0.*pyd"):
        list(eval_loader([url], 0, 1, raw_decoder, 4, 0, bad_samples=BadSamples(strict=True)))
    # The default policy skips it too (counted), still without unpickling.
    loader = eval_loader([url], 0, 1, raw_decoder, 4, 0)
    assert list(loader) == [] and loader.bad_samples.counts()["bad_samples"] == 1
    assert not marker.exists()


def test_missing_label_and_bad_image_name_shard_and_key(tmp_path, raw_decoder):
    url = write_raw_shard(tmp_path / "nolabel.tar", [{"__key__": "s1", "png": png_bytes()}])
    with pytest.raises(ShardError, match=r"nolabel.tar.*s1.*no label"):
        list(eval_loader([url], 0, 1, raw_decoder, 4, 0, bad_samples=BadSamples(strict=True)))
    url = write_raw_shard(tmp_path / "broken.tar", [{"__key__": "s2", "png": b"not a png", "cls": b"0"}])
    with pytest.raises(ShardError, match=r"broken.tar.*s2.*does not decode"):
        list(eval_loader([url], 0, 1, raw_decoder, 4, 0, bad_samples=BadSamples(strict=True)))


def test_colour_images_are_converted_to_the_dataset_mode(tmp_path, raw_decoder):
    url = write_raw_shard(tmp_path / "rgb.tar", [{"__key__": "s3", "png": png_bytes("RGB"), "cls": b"2"}])
    images, labels, _ = next(iter(eval_loader([url], 0, 1, raw_decoder, 4, 0)))
    assert images.shape == (1, 1, 8, 8) and labels.tolist() == [2]


def test_truncated_shard_names_the_shard(tmp_path, shards, raw_decoder):
    data = (shards / "train-000000.tar").read_bytes()
    # Cut inside the 6th member's bytes. (A cut exactly within a header block is not detectable from
    # the tar stream: Python's tarfile then ends the archive without an error.)
    with tarfile.open(shards / "train-000000.tar") as tar:
        member = tar.getmembers()[5]
    (tmp_path / "cut.tar").write_bytes(data[: member.offset_data + member.size // 2])
    with pytest.raises(ShardError, match="cut.tar"):
        list(eval_loader([str(tmp_path / "cut.tar")], 0, 1, raw_decoder, 4, 0, bad_samples=BadSamples(strict=True)))


def test_fashion_mnist_ingest_writes_train_and_test(tmp_path, fake_fashion_mnist):
    manifest_path = write_fashion_mnist(tmp_path / "out", src=str(fake_fashion_mnist), samples_per_shard=8)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["splits"]["train"]["count"] == 30 and len(manifest["splits"]["train"]["shards"]) == 4
    assert manifest["splits"]["test"]["count"] == 10
    assert manifest["num_classes"] == 10 and manifest["splits"]["train"]["image_size"] == [28, 28]
    assert not list((tmp_path / "out").glob("*.partial"))


def test_missing_fashion_mnist_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "env-dir"))
    if Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is installed: the search would succeed")
    with pytest.raises(DatasetNotFoundError) as err:
        find_fashion_mnist(str(tmp_path / "cli-dir"))
    message = str(err.value)
    for place in ("cli-dir", "env-dir", "shared/data/fashion-mnist", "/usr/share/datasets/fashion-mnist", "apt-get install dataset-fashion-mnist"):
        assert place in message


def test_image_folder_with_and_without_labels(tmp_path):
    images, labels = synthetic_images(12, 16, 3)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = tmp_path / "tree" / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert("RGB").save(folder / f"img{i}.jpg" if i % 2 else folder / f"img{i}.png")
        (tmp_path / "flat").mkdir(exist_ok=True)
        Image.fromarray(image).save(tmp_path / "flat" / f"img{i}.png")
    manifest = json.loads(write_image_folder(tmp_path / "tree", tmp_path / "out").read_text())
    assert manifest["splits"]["train"]["count"] == 12 and manifest["splits"]["train"]["labelled"] == 12
    assert manifest["classes"] == sorted({f"class_{l}" for l in labels}) and manifest["channels"] == 3
    flat = json.loads(write_image_folder(tmp_path / "flat", tmp_path / "out-flat", mode="L").read_text())
    assert flat["splits"]["train"]["labelled"] == 0 and flat["classes"] == []
    decoder = decoder_for(flat, "train", 0)
    _, batch_labels, _ = next(iter(eval_loader(split_urls(tmp_path / "out-flat", flat, "train"), 0, 1, decoder, 12, 0)))
    assert (batch_labels == -1).all()


def test_shards_are_reproducible_and_carry_no_per_member_pax_headers(tmp_path):
    """WebDataset's float mtime made tarfile write a PAX header per member: twice the bytes and half
    the read speed. Two writes of the same samples are now byte-identical."""
    for name in ("a", "b"):
        write_fashion_mnist_like(tmp_path / name)
    first, second = (tmp_path / "a" / "train-000000.tar"), (tmp_path / "b" / "train-000000.tar")
    assert sha256(first) == sha256(second)
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    assert members and all(not m.pax_headers for m in members)
    assert first.stat().st_size <= 1024 * len(members) + 10240  # one header + one data block each here


def write_fashion_mnist_like(root: Path) -> None:
    from pipeline.data.shards import Sample, encode_png, write_split

    images, labels = synthetic_images(20, 16, seed=3)
    write_split((Sample(f"k{i}", encode_png(im), "png", int(lab)) for i, (im, lab) in enumerate(zip(images, labels))),
                root, "train", 20, "L", 50)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_libpng_fast_path_matches_the_pil_path(mode):
    """8-bit PNGs already in the dataset's mode skip PIL; the tensor must be the one PIL gives."""
    from pipeline.data.decode import ImageDecoder

    rng = np.random.default_rng(0)
    shape = (12, 12) if mode == "L" else (12, 12, 3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buffer, format="PNG")
    png = buffer.getvalue()
    channels = 1 if mode == "L" else 3
    decoder = ImageDecoder(mode, 12, [0.3] * channels, [0.2] * channels)
    fast = decoder.decode_plain_png(png)
    assert fast is not None and fast.dtype == torch.uint8
    assert torch.equal(fast, decoder.decode_pil(png))
    image = decoder({"__key__": "k", "png": png})["image"]
    expected = (torch.from_numpy(np.array(Image.open(io.BytesIO(png)).convert(mode), dtype=np.float32)).reshape(12, 12, channels)
                .permute(2, 0, 1) / 255 - 0.3) / 0.2
    torch.testing.assert_close(image, expected)
    # Another size, another mode or a 16-bit PNG take the general path (resize, convert, scale).
    assert ImageDecoder(mode, 16, [0.3] * channels, [0.2] * channels).decode_plain_png(png) is None
    assert ImageDecoder("RGB" if mode == "L" else "L", 12, [0.3], [0.2]).decode_plain_png(png) is None
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 65535, (12, 12), dtype=np.uint16)).save(buffer, format="PNG")
    assert ImageDecoder("L", 12, [0.3], [0.2]).decode_plain_png(buffer.getvalue()) is None


def test_shard_size_gives_small_splits_sixteen_shards_and_caps_large_ones():
    from pipeline.data.shards import auto_samples_per_shard

    assert [auto_samples_per_shard(n) for n in (1, 10, 300, 1797, 60000, 10_000_000, 0)] == [1, 1, 19, 113, 3750, 5000, 5000]


def test_a_300_image_folder_trains_on_two_ray_workers_with_default_shards(tmp_path, ray_local):
    """The issue's case: a small folder written with the default shard size used to give one train
    shard, and `sslpipe pretrain` with the default 2 workers stopped."""
    from pipeline.train.launch import pretrain
    from pipeline.train.metrics import read_metrics
    from tests.test_train import tiny_config

    images, labels = synthetic_images(300, 16, 5)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = tmp_path / "tree" / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"img{i}.png")
    manifest = json.loads(write_image_folder(tmp_path / "tree", tmp_path / "out", mode="L").read_text())
    assert len(manifest["splits"]["train"]["shards"]) == 16 and manifest["splits"]["train"]["count"] == 300
    cfg = tiny_config(tmp_path / "out", tmp_path / "run", scaling__num_workers=2, train__steps=6, train__log_every=3,
                      train__checkpoint_every=6)
    run_dir = pretrain(cfg)
    assert [r["step"] for r in read_metrics(run_dir)] == [3, 6]


def _tar_bytes(members: list[tuple[str, bytes]], fmt: int) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        directory = tarfile.TarInfo("a-directory")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["GNU_FORMAT", "PAX_FORMAT", "USTAR_FORMAT"])
def test_the_fast_tar_reader_yields_what_webdataset_and_tarfile_yield(fmt):
    import gzip
    import io
    import tarfile

    from webdataset.tariterators import tar_file_iterator

    from pipeline.data.storage import tar_members

    long_dir = "d" * 120 + "/"  # past the 100-byte name field: a GNU long name, a pax path or a ustar prefix
    members = [("s0.png", b"\x89PNG" * 200), ("s0.cls", b"3"), (long_dir + "s1.png", bytes(range(256)) * 3),
               ("__meta__", b"{}"), ("s2.txt", b""), ("s3.cls", b"7")]  # "__meta__": WebDataset skips such names
    data = _tar_bytes(members, getattr(tarfile, fmt))
    theirs = [(m["fname"], m["data"]) for m in tar_file_iterator(io.BytesIO(data))]
    assert [(m["fname"], m["data"]) for m in tar_members(io.BytesIO(data))] == theirs
    assert [name for name, _ in theirs] == ["s0.png", "s0.cls", long_dir + "s1.png", "s2.txt", "s3.cls"]
    # Compressed shards go to tarfile's reader, with the same result.
    assert [(m["fname"], m["data"]) for m in tar_members(io.BytesIO(gzip.compress(data)))] == theirs


def test_the_fast_tar_reader_fails_and_ends_where_tarfile_does():
    import io
    import tarfile

    from pipeline.data.storage import tar_members

    data = _tar_bytes([("a.bin", b"x" * 1000), ("b.bin", b"y" * 10)], tarfile.GNU_FORMAT)
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        list(tar_members(io.BytesIO(data[:512 + 500])))  # cut inside a's data
    # Cut on the block boundary after a's data, or at b's header made invalid: the archive ends after a.
    assert [m["fname"] for m in tar_members(io.BytesIO(data[:512 + 1024]))] == ["a.bin"]
    broken = bytearray(data)
    broken[512 + 1024 + 148] ^= 1  # b's header checksum
    assert [m["fname"] for m in tar_members(io.BytesIO(bytes(broken)))] == ["a.bin"]
    with pytest.raises(tarfile.ReadError, match="truncated header"):
        list(tar_members(io.BytesIO(data[:512 + 1024 + 100])))  # cut inside b's header
    with pytest.raises(tarfile.ReadError, match="empty file"):
        list(tar_members(io.BytesIO(b"")))
    with pytest.raises(tarfile.ReadError):
        list(tar_members(io.BytesIO(b"not a tar at all" * 64)))


def test_an_unknown_split_of_a_local_dataset_is_named_with_its_manifest(shards):
    """split_urls on a local folder used to raise NameError (Path was not imported in storage.py)."""
    manifest = read_manifest(shards)
    with pytest.raises(KeyError, match=r"split 'val' is not in .*manifest.json; available: \['test', 'train'\]"):
        split_urls(shards, manifest, "val")
