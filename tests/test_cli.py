"""The `sslpipe` command line as a user meets it."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [[], ["data"], ["data", "fashion-mnist"], ["data", "folder"], ["pretrain"], ["eval"], ["export"], ["demo"]])
def test_help_describes_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: sslpipe" in out
    if not command:
        for name in ("data", "pretrain", "eval", "export", "tasks", "demo"):
            assert name in out


def test_unknown_task_is_an_error_listing_the_tasks(capsys):
    assert main(["pretrain", "--task.name=spin"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'spin'" in err and "rotation" in err


def test_unknown_flag_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "runs/x", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_missing_dataset_message(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    import pipeline.data.sources as sources

    monkeypatch.setattr(sources, "fashion_mnist_candidates", lambda src: [tmp_path / "a", tmp_path / "b"])
    assert main(["data", "fashion-mnist", "--out", str(tmp_path / "out"), "--src", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "Fashion-MNIST not found" in err and str(tmp_path / "a") in err and "apt-get install dataset-fashion-mnist" in err
    assert not (tmp_path / "out").exists()


def test_tasks_lists_rotation_and_its_options(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "rotation" in out and "task.options.all_rotations" in out


def test_console_script_runs():
    result = run_cli("--help")
    assert result.returncode == 0 and "pretrain" in result.stdout


def test_eval_of_a_missing_run_names_it(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "no-run")]) == 2
    assert "no-run" in capsys.readouterr().err


def test_pretrain_local_then_eval_from_the_command_line(shards, tmp_path, capsys):
    run_dir = tmp_path / "cli-run"
    code = main([
        "pretrain", "--local", f"--data.root={shards}", f"--run_dir={run_dir}", "--model.backbone_kwargs={channels: [8, 16, 32, 64]}",
        "--train.steps=20", "--train.global_batch_size=16", "--train.checkpoint_every=10", "--train.log_every=10",
        "--optim.warmup_steps=2", "--eval.linear_C=[1.0]", "--eval.knn_k=[5]",
    ])
    assert code == 0
    assert (run_dir / "config.yaml").is_file() and (run_dir / "training_curves.png").is_file()
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "| pretrained backbone | 64 |" in out and "| raw pixels | 256 |" in out


def test_strict_eval_of_a_bad_sample_in_a_loader_worker_prints_one_line_and_debug_the_traceback(shards, tmp_path):
    """The error travels from a DataLoader worker process, wrapped with its traceback in the message;
    the user sees one line naming shard and key, and the traceback only with --debug."""
    import shutil

    from pipeline.train.loop import train_worker
    from pipeline.train.session import LocalSession
    from tests.test_bad_input import GOOD
    from tests.test_data import write_raw_shard
    from tests.test_train import tiny_config

    data = tmp_path / "data"
    shutil.copytree(shards, data)
    cfg = tiny_config(data, tmp_path / "run", train__steps=2, train__checkpoint_every=2)
    train_worker(cfg, LocalSession(cfg.run_dir, device="cpu"))
    write_raw_shard(data / "test-000000.tar", [{"__key__": "test_00000", "png": b"\x89PNG broken", "cls": b"0"}] + GOOD[:3])
    result = run_cli("eval", str(cfg.run_dir), "--out", str(tmp_path / "eval"), "--strict")
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and errors[0].startswith(f"sslpipe eval: error: shard {data / 'test-000000.tar'}, key test_00000: "
                                                     "png image does not decode (")
    debug = run_cli("--debug", "eval", str(cfg.run_dir), "--out", str(tmp_path / "eval"), "--strict")
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr and "ShardError" in debug.stderr


def test_errors_from_ray_workers_are_unwrapped_to_the_sslpipe_error():
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from pipeline.cli import one_line, root_cause, user_errors
    from pipeline.data.bad_samples import ShardError

    original = ShardError("shard s3://bucket/train-000003.tar, key k7: image does not decode")
    task_error = RayTaskError("train_fn", "Traceback (most recent call last):\n  File ...\nShardError: ...", original)
    failed = WorkerGroupError("Training failed due to worker errors", {0: task_error, 1: RuntimeError("peer gone")})
    assert root_cause(failed, user_errors()) is original
    assert one_line(original) == "shard s3://bucket/train-000003.tar, key k7: image does not decode"
    assert root_cause(RuntimeError("a bug"), user_errors()) is None  # bugs keep their traceback
    # How a DataLoader worker's error arrives (torch re-raises the class with the trace as message).
    wrapped = ShardError("Caught ShardError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                         '  File "x.py", line 1, in f\npipeline.data.bad_samples.ShardError: shard a.tar, key b: bad\n')
    assert one_line(wrapped) == "shard a.tar, key b: bad"


def test_eval_refuses_an_unknown_protocol_by_name(shards, tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--protocols", "per_layer", "linear_svm"]) == 2
    assert "linear_svm" in capsys.readouterr().err


def test_eval_refuses_a_negative_precise_bn_count(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--precise-bn", "-1"]) == 2
    assert "--precise-bn=-1" in capsys.readouterr().err
