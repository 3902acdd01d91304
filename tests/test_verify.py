"""`sslpipe data verify`: every shard against its manifest (sha256, sample count, decoding)."""
from __future__ import annotations

import shutil

from pipeline.cli import main
from pipeline.data.verify import verify_dataset
from tests.test_bad_input import cut_at_member


def copy(shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    return data


def test_good_dataset_verifies(shards, tmp_path, capsys):
    reports = verify_dataset(shards, show_progress=False)
    assert len(reports) == 9 and all(r.ok for r in reports) and sum(r.read for r in reports) == 144
    assert main(["data", "verify", str(shards)]) == 0
    assert "9 of 9 shard(s) good, 144 samples read" in capsys.readouterr().out


def test_truncated_corrupted_and_missing_shards_are_each_named_with_the_reason(shards, tmp_path, capsys):
    data = copy(shards, tmp_path)
    cut_at_member(data / "train-000002.tar", 10)  # ends cleanly after 10 of 16 samples
    raw = bytearray((data / "test-000000.tar").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside an image: the count is right, the hash is not
    (data / "test-000000.tar").write_bytes(bytes(raw))
    (data / "train-000004.tar").unlink()
    reports = {r.url.rsplit("/", 1)[-1]: r for r in verify_dataset(data, show_progress=False)}
    assert {name for name, r in reports.items() if not r.ok} == {"train-000002.tar", "test-000000.tar", "train-000004.tar"}
    assert "read 10 of 16 samples the manifest lists" in reports["train-000002.tar"].problems[0]
    assert any("sha256" in p and "differs" in p for p in reports["test-000000.tar"].problems)
    assert reports["train-000004.tar"].problems[0].startswith("cannot open")
    assert main(["data", "verify", str(data), "--splits", "train"]) == 1
    out = capsys.readouterr().out
    assert "4 of 6 shard(s) good" in out and "BAD train" in out and "train-000002.tar" in out and "test-000000" not in out


def test_undecodable_sample_is_named_by_key(shards, tmp_path):
    import hashlib
    import json

    from tests.test_bad_input import GOOD
    from tests.test_data import write_raw_shard

    data = copy(shards, tmp_path)
    shard = data / "test-000002.tar"
    write_raw_shard(shard, GOOD[:3] + [{"__key__": "broken", "png": b"\x89PNG no", "cls": b"1"}])
    manifest = json.loads((data / "manifest.json").read_text())
    entry = manifest["splits"]["test"]["shards"][2]
    entry.update(count=4, sha256=hashlib.sha256(shard.read_bytes()).hexdigest())  # a consistent manifest, a bad sample
    (data / "manifest.json").write_text(json.dumps(manifest))
    report = next(r for r in verify_dataset(data, ["test"], show_progress=False) if r.url.endswith("test-000002.tar"))
    assert report.read == 4 and len(report.problems) == 1 and "key broken" in report.problems[0]
