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



def test_cpu_meter_counts_exited_children_and_grandchildren():
    import subprocess
    import sys

    from bench.host import CpuMeter

    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
    meter = CpuMeter.start(interval=0.1)
    subprocess.run([sys.executable, "-c", spin], check=True)  # a child: 0.6 CPU-s, reaped before stop
    # A grandchild under a shell that exits before stop: counted from its last sample (within 0.1 s).
    subprocess.run(["bash", "-c", f"{sys.executable} -c '{spin}'; true"], check=True)
    seconds = meter.stop()
    assert 1.1 <= seconds <= 3.0, seconds  # 1.2 s of spinning plus two interpreter start-ups
