"""Elastic training and preemption notices (pipeline/train/preemption.py, scaling.num_workers=[min, max]):
bad ranges refused before Ray, SIGTERM turned into a checkpoint at the step reached (one process and
under Ray Train), and a run on a `ray.cluster_utils.Cluster` that shrinks when a node is removed
and grows back when one joins, with the same global batch throughout."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from core.errors import ConfigError
from pipeline.config import Config
from pipeline.train.checkpoint import load_checkpoint
from pipeline.train.metrics import plot_metrics, read_metrics, resizes
from pipeline.train.preemption import Preempted
from tests.conftest import TINY_BACKBONE, write_synthetic_shards
from tests.test_faults import logged_steps, pretrain_in_thread, train_worker_pids
from tests.test_train import tiny_config


@pytest.mark.parametrize("workers, batch, message", [
    ([3, 2], 32, r"\[3, 2\]: elastic training needs 1 <= min <= max"),
    ([0, 2], 32, r"\[0, 2\]: elastic training needs 1 <= min <= max"),
    ([1, 2, 3], 32, r"give one number, or \[min, max\]"),
    # 32 splits over 2 and 4 workers, not 3: the nearest global batches that split over 2, 3 and 4 are named.
    ([2, 4], 32, r"32 does not split evenly over 3 worker\(s\).*multiple of 12, e.g. 24 or 36, or narrow the range"),
    ([2, 16], 16, r"does not split evenly over 3, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15"),
    ([2, 8], 8, r"multiple of 840"),
    ([1, 16], 16, r"does not split evenly"),
])
def test_bad_worker_ranges_are_refused_naming_the_sizes(workers, batch, message):
    with pytest.raises(ConfigError, match=message):
        Config.load(None, [f"scaling.num_workers={json.dumps(workers)}", f"train.global_batch_size={batch}"])


def test_an_elastic_range_that_divides_the_batch_loads():
    cfg = Config.load(None, ["scaling.num_workers=[2, 3]", "train.global_batch_size=36"])
    assert cfg.scaling.elastic and (cfg.scaling.min_workers, cfg.scaling.max_workers) == (2, 3)
    assert cfg.scaling.describe() == "2-3 Ray workers (elastic)"
    fixed = Config.load(None, ["scaling.num_workers=4"])
    assert not fixed.scaling.elastic and fixed.scaling.min_workers == fixed.scaling.max_workers == 4
    assert fixed.scaling.describe() == "4 Ray workers"
    # A batch of 2 per worker at the largest size is the least batch norm accepts.
    with pytest.raises(ConfigError, match=r"1 sample\(s\) per worker with 2 workers"):
        Config.load(None, ["scaling.num_workers=[1, 2]", "train.global_batch_size=2"])
    with pytest.raises(ConfigError, match=r"scaling.max_failures must be >= 0, or -1"):
        Config.load(None, ["scaling.max_failures=-2"])


def test_cli_takes_min_colon_max():
    from pipeline.cli import build_parser, load_config

    args, rest = build_parser().parse_known_args(["pretrain", "--config", "configs/rotation_fmnist.yaml", "--num-workers", "2:4"])
    assert load_config(args, ["--train.global_batch_size=240"]).scaling.num_workers == [2, 4]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain", "--num-workers", "2-4"])


def test_embedded_ray_must_hold_the_maximum_and_a_cluster_the_minimum(monkeypatch):
    import ray

    from pipeline.train import launch
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh `sslpipe pretrain` (the suite's Ray may run)
    cpus = os.cpu_count()
    too_many = Config.load(None, [f"scaling.num_workers=[1, {cpus + 1}]", f"train.global_batch_size={2 * 27720}"])
    with pytest.raises(ConfigError, match=rf"= {cpus + 1} CPUs, but this machine has {cpus}"):
        launch.check_local_resources(too_many)  # an embedded Ray never gains a node
    too_many.scaling.address = "auto"
    launch.check_local_resources(too_many)  # a cluster may grow: refused only by what it holds
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 3.0})
    launch.check_cluster_resources(Config.load(None, ["scaling.num_workers=[2, 8]", "train.global_batch_size=840"]))  # room for 3: starts, grows later
    with pytest.raises(ConfigError, match=r"has 3 CPUs, but scaling asks for 4 \(4 workers at least\)"):
        launch.check_cluster_resources(Config.load(None, ["scaling.num_workers=[4, 8]", "train.global_batch_size=840"]))
    with pytest.raises(ConfigError, match=r"asks for 4 \(4 workers\)"):
        launch.check_cluster_resources(Config.load(None, ["scaling.num_workers=4"]))


def test_resizes_are_found_and_marked_on_the_curves(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s, "world_size": w} for s, w in [(10, 3), (20, 3), (30, 2), (40, 2), (50, 3)]]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert resizes(rows) == [(30, 3, 2), (50, 2, 3)]
    assert resizes([{"step": 1}, {"step": 2, "world_size": 2}]) == []  # rows from before world_size was logged
    assert plot_metrics(tmp_path).is_file()


def test_sigterm_in_one_process_checkpoints_the_step_reached_and_resume_finishes(shards, tmp_path, monkeypatch):
    """`--local` runs: SIGTERM (a spot reclaim, `kill`, SLURM's preemption) arrives during step 13 of
    60; the loop finishes that step, writes its checkpoint (the interval is 30) and stops with
    Preempted; a resume continues from step 13 with nothing redone."""
    import pipeline.train.preemption as preemption
    from pipeline.train.launch import pretrain_local
    from pretext.base import PretextTask

    real_set_progress = PretextTask.set_progress

    def set_progress(self, step, total):  # the loop calls it once per step, before the step runs
        if step == 13 and not preemption._stop.is_set():
            os.kill(os.getpid(), signal.SIGTERM)  # during step 13
        return real_set_progress(self, step, total)

    monkeypatch.setattr(PretextTask, "set_progress", set_progress)
    previous = signal.getsignal(signal.SIGTERM)
    cfg = tiny_config(shards, tmp_path / "run", train__steps=60, train__checkpoint_every=30, train__log_every=10)
    try:
        with pytest.raises(Preempted, match=r"SIGTERM: stopped at step 13 of 60 after writing its checkpoint"):
            pretrain_local(cfg)
        run_dir = Path(cfg.run_dir)
        assert load_checkpoint(run_dir)["step"] == 13
        assert logged_steps(run_dir) == [10, 13]
        monkeypatch.setattr(PretextTask, "set_progress", real_set_progress)
        pretrain_local(tiny_config(shards, run_dir, train__steps=60, train__checkpoint_every=30, train__log_every=10), resume=run_dir)
        assert logged_steps(run_dir) == [10, 13, 20, 30, 40, 50, 60] and load_checkpoint(run_dir)["step"] == 60
        # Not training any more: SIGTERM is the process's previous handler's again (here a no-op).
        seen = []
        signal.signal(signal.SIGTERM, lambda *a: seen.append("previous"))
        from pipeline.train.preemption import install_sigterm_handler

        assert install_sigterm_handler()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert seen == ["previous"]
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.ray
def test_sigterm_to_a_ray_worker_checkpoints_the_step_reached_and_the_run_resumes_from_it(shards, tmp_path, ray_local):
    """SIGTERM to one of two Ray Train workers: both stop at the next step boundary, rank 0 writes
    that step's checkpoint, Ray Train restarts the group (scaling.max_failures=1) and it resumes
    from that step: no step is run twice."""
    total = 150
    cfg = tiny_config(shards, tmp_path / "run", scaling__num_workers=2, scaling__max_failures=1,
                      train__steps=total, train__checkpoint_every=100, train__log_every=10)
    run_dir = Path(cfg.run_dir)
    thread, outcome = pretrain_in_thread(cfg, until_step=30)
    victims = train_worker_pids()
    assert len(victims) == 2, f"expected 2 Ray Train workers, found {victims}"
    os.kill(victims[-1], signal.SIGTERM)
    signalled_after = max(logged_steps(run_dir))
    thread.join(timeout=300)

    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    steps = logged_steps(run_dir)
    stopped_at = next(r["step"] for r in read_metrics(run_dir) if r.get("notice") == "sigterm")
    assert signalled_after <= stopped_at < signalled_after + 10 and stopped_at < 100  # before any interval checkpoint
    assert steps == sorted(set(steps)) and steps[-1] == total  # resumed from it: nothing run twice
    assert load_checkpoint(run_dir)["step"] == total
    print(f"SIGTERM after step {signalled_after}: checkpoint of step {stopped_at}, resumed from it")


# What both cluster jobs start with: a 0-CPU head (like cluster.yaml's), worker nodes of 1 CPU (their
# count in argv[2]), training in a thread (Cluster.add_node needs the main thread), and a reader of
# the run's metrics. Right after a node is lost, Ray Train may try the old size once more and wait
# RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S for it (60 s by default) before starting smaller; the
# raylets and the controller inherit it. Each job runs in its own process: a process joins one Ray
# cluster at a time.
CLUSTER_PRELUDE = """
import json, os, sys, threading, time
os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "15"
os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"
import ray
from ray.cluster_utils import Cluster
from pipeline.config import Config
from pipeline.train.launch import pretrain
from pipeline.train.metrics import read_metrics

cfg = Config.from_dict(json.loads(sys.argv[1]))
cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 0})
nodes = [cluster.add_node(num_cpus=1) for _ in range(int(sys.argv[2]))]
cluster.wait_for_nodes()
outcome, events = {}, []

def run():
    try:
        pretrain(cfg)
    except BaseException as err:
        outcome["error"] = repr(err)

def rows():
    try:
        return read_metrics(cfg.run_dir)
    except (OSError, ValueError):
        return []

training = threading.Thread(target=run)
training.start()
"""

CLUSTER_END = """
training.join()
print("EVENTS " + json.dumps(events), flush=True)
print("OUTCOME " + json.dumps(outcome), flush=True)
ray.shutdown()
cluster.shutdown()
"""


def run_cluster_job(events_script: str, cfg: Config, nodes: int) -> list[dict]:
    """Runs the prelude, `events_script` and the end in a fresh process; returns the events it
    recorded, after checking that the process and the training in it succeeded."""
    job = CLUSTER_PRELUDE + textwrap.dedent(events_script) + CLUSTER_END
    done = subprocess.run([sys.executable, "-c", job, json.dumps(cfg.to_dict()), str(nodes)], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert json.loads(next(line for line in lines if line.startswith("OUTCOME "))[len("OUTCOME "):]) == {}, done.stderr[-3000:]
    return json.loads(next(line for line in lines if line.startswith("EVENTS "))[len("EVENTS "):])


# The driver removes one of three worker nodes mid-run and adds one back later.
ELASTIC_EVENTS = """
def wait_for(size, after_step):
    while training.is_alive() and not any(r.get("world_size") == size and r["step"] > after_step for r in rows()):
        time.sleep(0.2)
    return rows()[-1]["step"] if rows() else 0

step = wait_for(3, 20)
cluster.remove_node(nodes.pop())  # a spot node reclaimed without notice
events.append({"event": "removed a node", "after_step": step, "time": time.time()})
step = wait_for(2, step + 20)
nodes.append(cluster.add_node(num_cpus=1))  # it comes back
events.append({"event": "added a node", "after_step": step, "time": time.time()})
"""


@pytest.mark.ray
@pytest.mark.slow
def test_elastic_run_shrinks_when_a_node_goes_and_grows_when_it_returns(tmp_path):
    shards = write_synthetic_shards(tmp_path / "data", train=192, test=48, per_shard=16, size=16)  # 12 train shards
    run_dir = tmp_path / "run"
    checkpoint_every = 10
    cfg = Config.from_dict({
        "run_dir": str(run_dir),
        "data": {"root": str(shards), "loader_workers": 0, "shuffle_buffer": 32},
        "model": TINY_BACKBONE,
        "task": {"name": "rotation"},
        "optim": {"name": "adamw", "lr": 0.05, "warmup_steps": 5, "weight_decay": 0.0},
        "train": {"steps": 500, "global_batch_size": 24, "log_every": 5, "checkpoint_every": checkpoint_every},
        "scaling": {"num_workers": [2, 3], "cpus_per_worker": 1, "max_failures": -1, "resize_interval_s": 2.0},
    })
    start = time.time()
    events = run_cluster_job(ELASTIC_EVENTS, cfg, nodes=3)
    rows = read_metrics(run_dir)
    sizes = [r["world_size"] for r in rows]
    seen = [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]]
    assert seen == [3, 2, 3], [(r["step"], r["world_size"]) for r in rows]
    assert rows[-1]["step"] == 500 and load_checkpoint(run_dir)["step"] == 500
    # The global batch is fixed: 8 per worker with 3 workers, 12 with 2.
    assert {(r["world_size"], r["worker_batch"]) for r in rows} == {(3, 8), (2, 12)}
    # Each restart resumes from the newest checkpoint, at most one interval behind the last row
    # logged before it. (Checkpoints fall on the logging grid: the first row after resuming from
    # step c is c + log_every.)
    lost = []
    for before, after in zip(rows, rows[1:]):
        if after["step"] <= before["step"] or after["world_size"] != before["world_size"]:
            lost.append(before["step"] - (after["step"] - cfg.train.log_every))
    assert len(lost) == 2 and all(0 <= n <= checkpoint_every for n in lost), lost
    from eval.evaluate import evaluate

    results = evaluate(run_dir, device="cpu")
    assert results["step"] == 500
    trace = [(r["step"], r["world_size"], round(r["time"] - start, 1)) for r in rows]
    print(f"events {events}\nsteps lost at each restart {lost}\ntrace (step, world size, s) {trace}\nwall {time.time() - start:.0f} s")


# Two worker nodes; once training passes step 20 the driver drains the node of rank 1 as a cloud
# integration does for a spot reclaim (reason PREEMPTION, a deadline), removes it when the deadline
# has passed, and adds a replacement.
DRAIN_EVENTS = """
from ray.core.generated import autoscaler_pb2

def last_step():
    return max((r["step"] for r in rows()), default=0)

while training.is_alive() and last_step() <= 20:
    time.sleep(0.2)
rank1_node = json.load(open(os.path.join(cfg.run_dir, "workers", "rank_1.json")))["node"]
victim = next(n for n in nodes if n.node_id == rank1_node)
deadline_s = 8
gcs = ray._raylet.GcsClient(address=cluster.address)
accepted, why = gcs.drain_node(rank1_node, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                               "spot reclaim (test)", int(time.time() * 1000) + deadline_s * 1000)
events.append({"event": "drain", "after_step": last_step(), "accepted": accepted, "why": why})
time.sleep(deadline_s)
cluster.remove_node(victim)
events.append({"event": "removed the drained node", "after_step": last_step()})
time.sleep(5)
cluster.add_node(num_cpus=1)  # a replacement node
"""


@pytest.mark.ray
@pytest.mark.slow
def test_a_drained_node_gets_a_checkpoint_before_it_goes(tmp_path):
    """Ray's preemption notice (a drained node with a deadline): a checkpoint before the node goes
    and one at every train.preemption_poll_every steps after it while training goes on; when
    the node is gone the run resumes from the last of them, not from an interval checkpoint."""
    shards = write_synthetic_shards(tmp_path / "data", train=128, test=48, per_shard=16, size=16)
    run_dir = tmp_path / "run"
    cfg = Config.from_dict({
        "run_dir": str(run_dir),
        "data": {"root": str(shards), "loader_workers": 0, "shuffle_buffer": 32},
        "model": TINY_BACKBONE,
        "task": {"name": "rotation"},
        "optim": {"name": "adamw", "lr": 0.05, "warmup_steps": 5, "weight_decay": 0.0},
        "train": {"steps": 300, "global_batch_size": 16, "log_every": 5, "checkpoint_every": 1000, "preemption_poll_every": 5},
        "scaling": {"num_workers": [1, 2], "cpus_per_worker": 1, "max_failures": 0, "resize_interval_s": 2.0},
    })
    events = run_cluster_job(DRAIN_EVENTS, cfg, nodes=2)
    assert events[0]["accepted"], events
    rows = read_metrics(run_dir)
    notices = [r["step"] for r in rows if r.get("notice") == "drain"]
    # How soon a worker sees the drain is Ray's propagation delay (5-15 steps here, on a loaded host
    # more): the promise is a checkpoint before the node goes, then one at every poll until it does.
    removed_after = events[1]["after_step"]
    assert notices and events[0]["after_step"] <= notices[0] <= removed_after, (notices, events)
    assert all(b - a == cfg.train.preemption_poll_every for a, b in zip(notices, notices[1:])), notices
    # The only checkpoints before the end are the notices' (the interval is 1000): the run resumed
    # from the newest, losing at most one poll interval.
    i, restart = next((i, r) for i, r in enumerate(rows) if "resumed_from" in r)
    resumed_from = restart["resumed_from"]
    assert resumed_from in notices and restart["step"] == resumed_from + cfg.train.log_every, (notices, restart)
    lost = rows[i - 1]["step"] - resumed_from
    assert 0 <= lost <= cfg.train.preemption_poll_every, (notices, rows[i - 1], restart)
    assert rows[-1]["step"] == 300 and load_checkpoint(run_dir)["step"] == 300
    print(f"events {events}\ndrain checkpoints at steps {notices}; restarted from step {resumed_from} with {restart['world_size']} "
          f"worker(s); {lost} logged step(s) lost")
