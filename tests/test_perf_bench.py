"""The performance benchmarks run end to end on tiny inputs (the GPU one on the CPU)."""
from __future__ import annotations

import json

import torch


def test_gpu_bench_runs_on_cpu_and_counts_backward_flops(tmp_path):
    from bench.gpu_speed import main

    out = tmp_path / "gpu"
    assert main(["--models", "resnet18@32", "--batch-size", "8", "--steps", "6", "--repeats", "1", "--loader-workers", "1",
                 "--images", "64", "--device", "cpu", "--out", str(out)]) == 0
    row = json.loads((out / "gpu_speed.json").read_text())["models"]["resnet18@32"]
    assert set(row["bare"]) == {"fp32", "bf16", "bf16 + channels_last"}
    assert row["loader"] > 0 and row["pipeline"] > 0 and all(v > 0 for v in row["bare"].values())
    # Forward + backward of a conv net costs about 3x its forward (input gradients skipped at the stem).
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        timm.create_model("resnet18", num_classes=0)(torch.randn(2, 3, 32, 32))
    forward = counter.get_total_flops() / 2
    assert 2.5 * forward < row["flops_per_image"] < 3.1 * forward


def test_loader_bench_measures_every_worker_count_against_memory(shards, capsys):
    from bench.loader_speed import main

    assert main(["--data", str(shards), "--tasks", "rotation", "--workers", "0,1", "--batch-size", "8", "--batches", "2",
                 "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("| rotation |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 6 and all(float(c) > 0 for c in cells[1:])
