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
    import pipeline.sources as sources

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
