"""The quality benchmark end to end on tiny synthetic shards (slow: several Ray Train runs)."""
from __future__ import annotations

import json

import pytest

from tests.conftest import write_synthetic_shards

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_quality_benchmark_trains_evaluates_and_records_refusals(tmp_path, ray_local):
    from bench.quality import main

    data = write_synthetic_shards(tmp_path / "data", train=128, test=64, per_shard=32, size=28)
    out = tmp_path / "bench"
    assert main(["--budget-s", "1", "--tasks", "rotation,colorization", "--data", str(data), "--out", str(out)]) == 0
    report = json.loads((out / "quality.json").read_text())
    assert set(report["baselines"]) == {"raw_pixels", "random_init"}
    rotation = report["tasks"]["rotation"]
    assert rotation["steps"] >= 50 and 0 <= rotation["rows"]["pretrained"]["linear"] <= 1
    assert "needs RGB data" in report["tasks"]["colorization"]["refused"]
    assert (out / "quality.png").stat().st_size > 0 and "| rotation |" in (out / "quality.md").read_text()
    # A second invocation skips what is already recorded instead of training again.
    assert main(["--budget-s", "1", "--tasks", "rotation", "--data", str(data), "--out", str(out)]) == 0
    assert json.loads((out / "quality.json").read_text())["tasks"]["rotation"]["run_dir"] == rotation["run_dir"]

