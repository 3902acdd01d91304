"""Faults a long run must survive: a Ray Train worker killed mid-run (by its PID) is restarted by
Ray (FailureConfig) and training resumes from the latest checkpoint to the configured step."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipeline.train.checkpoint import load_checkpoint
from pipeline.train.metrics import read_metrics
from tests.test_train import tiny_config


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train worker processes (Ray titles them `ray::RayTrainWorker...`)."""
    import psutil

    # Only this test session's Ray (its raylet is a child of this process): another Ray job on the
    # same machine (a benchmark, a second checkout's tests) must not be counted or killed.
    titled = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if " ".join(proc.cmdline() or []).startswith("ray::RayTrainWorker"):
                titled.add(proc.pid)
        except psutil.Error:  # exited meanwhile
            pass
    # Their DataLoader processes are forked from them and inherit the title: keep the parents only.
    return sorted(pid for pid in titled if psutil.Process(pid).ppid() not in titled)


def pretrain_in_thread(cfg, until_step: int, timeout_s: float = 180) -> tuple[threading.Thread, dict]:
    """Starts `pretrain(cfg)` in a thread and returns (thread, outcome) once the run has logged
    `until_step` (or `timeout_s` passed); outcome gets "run_dir" or "error" when it ends."""
    from pipeline.train.launch import pretrain

    outcome: dict = {}

    def run() -> None:
        try:
            outcome["run_dir"] = pretrain(cfg)
        except BaseException as err:  # noqa: BLE001 (reported by the callers' assertions)
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + timeout_s
    while time.time() < deadline and max(logged_steps(Path(cfg.run_dir)), default=0) < until_step:
        time.sleep(0.2)
    return thread, outcome


def logged_steps(run_dir: Path) -> list[int]:
    try:
        return [m["step"] for m in read_metrics(run_dir)]
    except (OSError, ValueError):
        return []


@pytest.mark.ray
def test_killed_worker_is_restarted_and_training_resumes_from_the_last_checkpoint(shards, tmp_path, ray_local):
    checkpoint_every, total = 40, 400
    cfg = tiny_config(shards, tmp_path / "run", scaling__num_workers=2, scaling__max_failures=1,
                      train__steps=total, train__checkpoint_every=checkpoint_every, train__log_every=10)
    run_dir = Path(cfg.run_dir)
    thread, outcome = pretrain_in_thread(cfg, until_step=2 * checkpoint_every + 10)
    victims = train_worker_pids()
    assert len(victims) == 2, f"expected 2 Ray Train workers, found {victims}"
    os.kill(victims[-1], signal.SIGKILL)
    killed_after = max(logged_steps(run_dir))
    thread.join(timeout=300)

    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    assert load_checkpoint(run_dir)["step"] == total  # completed the configured steps; the final checkpoint loads
    steps = logged_steps(run_dir)
    assert steps[-1] == total
    # Exactly one restart: the step counter goes back once, to just after a checkpoint taken
    # before the kill, so at most one checkpoint interval of work was lost.
    restarts = [(before, after) for before, after in zip(steps, steps[1:]) if after <= before]
    assert len(restarts) == 1, steps
    before, after = restarts[0]
    resumed_from = after - cfg.train.log_every
    assert resumed_from % checkpoint_every == 0 and resumed_from >= checkpoint_every
    # The newest checkpoint written before the kill (even one Ray's controller had not registered yet).
    assert killed_after - checkpoint_every < resumed_from <= killed_after
    assert before - resumed_from <= checkpoint_every  # steps redone after the crash
    print(f"killed after step {killed_after}; resumed from step {resumed_from}; {before - resumed_from} logged steps redone")


def test_ctrl_c_leaves_a_valid_checkpoint_and_resume_continues_with_optimizer_state(shards, tmp_path):
    """SIGINT to `sslpipe pretrain --local` mid-run (a user's Ctrl-C, a preemption notice): the
    newest checkpoint loads, and `--resume RUN_DIR` continues from it to the configured step."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "pipeline.cli", "pretrain", "--local", f"--run_dir={run_dir}", f"--data.root={shards}",
            "--model.backbone_kwargs={channels: [8, 16, 32, 64]}", "--data.shuffle_buffer=64", "--optim.name=adamw",
            "--optim.lr=0.01", "--optim.weight_decay=0.0", "--train.global_batch_size=32", "--train.log_every=5",
            "--train.checkpoint_every=10", "--scaling.num_workers=1"]
    # SIGINT's default action for the child even when this test runs in a background job, where the
    # shell sets SIGINT to "ignore" and children inherit that (the interrupt would then never arrive).
    proc = subprocess.Popen([*args, "--train.steps=100000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    # Any checkpoint at or past step 20 (only the newest two are kept, so step 20 itself may be gone).
    while time.time() < deadline and not any(int(p.name.split("_")[1]) >= 20 for p in (run_dir / "checkpoints").glob("step_*")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=180)  # generous: a loaded CI machine is slow to tear down loader workers
    assert proc.returncode != 0
    interrupted = load_checkpoint(run_dir)  # the newest complete checkpoint (never a half-written one)
    assert interrupted["step"] >= 20 and not list((run_dir / "checkpoints").glob(".tmp_*/checkpoint.pt.partial"))

    target = interrupted["step"] + 10
    resumed = subprocess.run([sys.executable, "-m", "pipeline.cli", "pretrain", "--local", "--resume", str(run_dir), f"--train.steps={target}"],
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    final = load_checkpoint(run_dir)
    assert final["step"] == target
    adam_steps = final["optimizers"]["main"]["state"][0]["step"]
    assert adam_steps == target  # the optimizer went on from the checkpoint's state, not from zero
    assert final["schedulers"]["main"]["last_epoch"] == target


def test_pretrain_eval_and_export_write_only_under_their_output_folders(shards, tmp_path, monkeypatch):
    """Nothing lands in the working directory, the home folder or beside the data: only in the run
    directory and the folders named on the command line."""
    from pipeline.cli import main

    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir(), home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    data_before = sorted(p.name for p in shards.rglob("*"))
    run_dir, export_dir = tmp_path / "run", tmp_path / "export"
    assert main(["pretrain", "--local", f"--run_dir={run_dir}", f"--data.root={shards}", "--model.backbone_kwargs={channels: [8, 16, 32, 64]}",
                 "--train.steps=4", "--train.checkpoint_every=4", "--train.global_batch_size=16", "--scaling.num_workers=1"]) == 0
    assert main(["eval", str(run_dir)]) == 0
    assert main(["export", str(run_dir), "--out", str(export_dir)]) == 0
    assert sorted(p.name for p in shards.rglob("*")) == data_before
    assert list(work.rglob("*")) == []
    # Only matplotlib's per-user font cache (built once, not an output of ours) may appear in HOME.
    assert [p for p in home.rglob("*") if p.is_file() and ".cache/matplotlib" not in str(p)] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "home", "run", "work"]
    assert (run_dir / "eval" / "results.json").is_file() and (export_dir / "backbone.safetensors").is_file()


@pytest.mark.ray
def test_driver_killed_with_sigkill_resumes_losing_at_most_one_checkpoint_interval(shards, tmp_path):
    """`sslpipe pretrain` (the Ray driver, with its embedded Ray) killed with SIGKILL mid-run:
    `sslpipe pretrain --resume RUN_DIR` continues from the newest checkpoint on disk."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "pipeline.cli", "pretrain", f"--run_dir={run_dir}", f"--data.root={shards}",
            "--model.backbone_kwargs={channels: [8, 16, 32, 64]}", "--data.shuffle_buffer=64", "--optim.name=adamw",
            "--optim.lr=0.01", "--optim.weight_decay=0.0", "--train.global_batch_size=32", "--train.log_every=5",
            "--train.checkpoint_every=10", "--num-workers=1", "--train.steps=100000"]
    # Its own session: the kill takes the driver and the Ray processes it started, as an OOM killer or
    # a lost node would, with no chance to clean up.
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and max(logged_steps(run_dir), default=0) < 35:
            time.sleep(0.2)
        killed_after = max(logged_steps(run_dir), default=0)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    # Ray's worker processes run in the raylet's process group: one may finish a checkpoint in the
    # moment before it notices its raylet is gone. Read the run once they are.
    time.sleep(5)
    killed_at = max(logged_steps(run_dir))  # the last step logged before the kill landed
    assert killed_after >= 35
    newest = load_checkpoint(run_dir)
    assert newest["step"] >= 30 and killed_at - newest["step"] <= 10  # at most one checkpoint interval lost

    target = newest["step"] + 10
    resumed = subprocess.run([sys.executable, "-m", "pipeline.cli", "pretrain", "--resume", str(run_dir), f"--train.steps={target}"],
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    final = load_checkpoint(run_dir)
    assert final["step"] == target and final["optimizers"]["main"]["state"][0]["step"] == target
    assert logged_steps(run_dir)[-1] == target


def test_a_failed_checkpoint_write_stops_the_run_naming_path_and_cause_and_keeps_the_previous(shards, tmp_path, monkeypatch):
    import errno

    import torch

    from pipeline.train import checkpoint as checkpoint_module
    from pipeline.train.checkpoint import CheckpointError
    from pipeline.train.loop import train_worker
    from pipeline.train.session import LocalSession

    real_save, calls = torch.save, []

    def full_disk(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: the disk is full half-way through the file
            Path(path).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    cfg = tiny_config(shards, tmp_path / "run", train__steps=30, train__checkpoint_every=10, train__log_every=10)
    with pytest.raises(CheckpointError, match=r"cannot write the checkpoint of step 20 to .*tmp_step_00000020: No space left on device"):
        train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    assert load_checkpoint(cfg.run_dir)["step"] == 10  # the previous one loads
    assert not list((Path(cfg.run_dir) / "checkpoints").glob(".tmp_*"))  # nothing half-written left


def test_a_manifest_listing_a_missing_shard_fails_before_ray_starts(shards, tmp_path, monkeypatch):
    import shutil

    from pipeline.data.bad_samples import ShardError
    from pipeline.train import launch

    data = tmp_path / "data"
    shutil.copytree(shards, data)
    (data / "train-000003.tar").unlink()
    monkeypatch.setattr(launch, "init_ray", lambda cfg: pytest.fail("Ray was started"))
    cfg = tiny_config(data, tmp_path / "run", scaling__num_workers=2)
    with pytest.raises(ShardError, match=r"train-000003.tar' does not exist"):
        launch.pretrain(cfg)
