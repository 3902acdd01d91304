"""A training run spread over several Ray nodes on one machine: `ray.cluster_utils.Cluster` starts a
head and two worker nodes, each its own raylet, so placement, shard splitting, checkpoint storage
and eval go through the same paths as on a real cluster."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.config import Config
from pipeline.train.checkpoint import find_checkpoint, load_checkpoint
from pipeline.train.metrics import read_metrics
from tests.conftest import TINY_BACKBONE, write_synthetic_shards

pytestmark = pytest.mark.ray

# Runs in its own process: the suite's other Ray tests share one local Ray instance in this one,
# and a process connects to one Ray cluster at a time.
CLUSTER_JOB = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from pipeline.config import Config
    from pipeline.train.launch import pretrain

    # The head schedules only (0 CPUs, like cluster.yaml's head); each worker node has 1 CPU, so the
    # two training workers cannot share a node.
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    print(json.dumps({"worker_nodes": [n.node_id for n in nodes]}), flush=True)
    pretrain(Config.from_dict(json.loads(sys.argv[1])))
    ray.shutdown()  # the driver first: the cluster will not remove the node it is connected to
    cluster.shutdown()
""")


def test_training_spreads_over_two_nodes_with_disjoint_shards_and_its_checkpoint_evaluates(tmp_path):
    shards = write_synthetic_shards(tmp_path / "data", train=128, test=48, per_shard=16, size=16)  # 8 train shards
    run_dir = tmp_path / "run"
    cfg = Config.from_dict({
        "run_dir": str(run_dir),
        "data": {"root": str(shards), "loader_workers": 1, "shuffle_buffer": 64},
        "model": TINY_BACKBONE,
        "task": {"name": "rotation"},
        "optim": {"name": "adamw", "lr": 0.05, "warmup_steps": 5, "weight_decay": 0.0},
        "train": {"steps": 30, "global_batch_size": 32, "log_every": 10, "checkpoint_every": 15},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
    })
    done = subprocess.run([sys.executable, "-c", CLUSTER_JOB, json.dumps(cfg.to_dict())], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    worker_nodes = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"worker_nodes"')))["worker_nodes"]

    records = [json.loads((run_dir / "workers" / f"rank_{rank}.json").read_text()) for rank in range(2)]
    # One training worker on each worker node: two raylets, neither of them the head.
    assert sorted(r["node"] for r in records) == sorted(worker_nodes)
    # Each rank streams its own shards: no shard read by both, none left out.
    rank0, rank1 = (set(r["shards"]) for r in records)
    assert rank0 and rank1 and not rank0 & rank1
    assert {Path(u).name for u in rank0 | rank1} == {f"train-{i:06d}.tar" for i in range(8)}

    assert [m["step"] for m in read_metrics(run_dir)] == [10, 15, 20, 30]
    checkpoint = find_checkpoint(run_dir)
    assert load_checkpoint(checkpoint)["step"] == 30

    from eval.evaluate import evaluate

    results = evaluate(run_dir, device="cpu")
    assert results["step"] == 30 and 0.0 <= results["rows"]["pretrained"]["linear"] <= 1.0
