"""Run directories on object storage (pipeline/train/run_storage.py) against a real S3-compatible server
(moto) on loopback: checkpoints, metrics and eval results go to s3://, and every reader (resume,
eval, report, the newest-readable fallback) works from the URL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.train.checkpoint import (
    CHECKPOINT_FILE,
    load_valid_checkpoint,
    write_local_checkpoint,
)
from tests.test_remote_shards import start_moto_server

BUCKET = "ssl-runs"


@pytest.fixture(scope="module")
def s3_server():
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    server, endpoint = start_moto_server()
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "sslpipe", "AWS_SECRET_ACCESS_KEY": "sslpipe-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x").create_bucket(Bucket=BUCKET)
    yield env
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """The store's endpoint and credentials in the environment, a fresh local cache; yields a boto3 client."""
    import boto3
    import s3fs

    for name in ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("SSLPIPE_CACHE", str(tmp_path / "cache"))
    s3fs.S3FileSystem.clear_instance_cache()
    yield boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name="us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()


def keys(client, prefix: str) -> list[str]:
    found = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"][len(prefix):] for o in found)


def fake_state(step: int) -> dict:
    import torch

    return {"task": {"encoder.w": torch.full((2,), float(step))}, "step": step, "config": {"task": {"name": "rotation"}, "model": {"backbone": "x"}},
            "manifest": {}}


def test_push_pull_and_the_newest_readable_checkpoint_from_a_url(s3, tmp_path):
    from pipeline.train.run_storage import (
        fetch_run,
        local_run_dir,
        mirror_dir,
        push,
        source_url,
    )

    url = f"s3://{BUCKET}/unit/run1"
    local = local_run_dir(url)
    assert local == mirror_dir(url) and str(local).startswith(str(tmp_path / "cache" / "runs"))
    (local / "metrics.jsonl").write_text('{"step": 10}\n')
    (local / "eval").mkdir()
    (local / "eval" / "results.json").write_text("{}")
    for step in (10, 20):
        write_local_checkpoint(fake_state(step), local / "checkpoints", keep=2)
    push(url, ["metrics.jsonl", "eval", "checkpoints", "not-there.png"])
    assert keys(s3, "unit/run1/") == ["checkpoints/step_00000010/checkpoint.pt", "checkpoints/step_00000010/meta.json",
                                      "checkpoints/step_00000020/checkpoint.pt", "checkpoints/step_00000020/meta.json",
                                      "eval/results.json", "metrics.jsonl"]
    # A newer checkpoint that is cut short (an upload interrupted): named, and the previous one used.
    s3.put_object(Bucket=BUCKET, Key="unit/run1/checkpoints/step_00000030/checkpoint.pt", Body=b"PK\x03\x04 truncated")
    s3.put_object(Bucket=BUCKET, Key="unit/run1/checkpoints/step_00000030/meta.json", Body=b'{"step": 30}')
    import shutil

    shutil.rmtree(tmp_path / "cache")  # another machine: nothing local
    file, state = load_valid_checkpoint(url)
    assert state["step"] == 20 and float(state["task"]["encoder.w"][0]) == 20.0
    assert source_url(file.parent) == f"{url}/checkpoints/step_00000020"
    assert load_valid_checkpoint(f"{url}/checkpoints/step_00000010")[1]["step"] == 10  # one checkpoint by its URL
    fetched = fetch_run(url)
    assert (fetched / "metrics.jsonl").read_text() == '{"step": 10}\n' and (fetched / "eval" / "results.json").is_file()
    from pipeline.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"no checkpoint under s3://ssl-runs/unit/nothing-here"):
        load_valid_checkpoint(f"s3://{BUCKET}/unit/nothing-here")


def test_local_runs_refuse_a_url_run_dir(shards, s3):
    from core.errors import ConfigError
    from pipeline.train.launch import pretrain_local
    from tests.test_train import tiny_config

    with pytest.raises(ConfigError, match=r"`--local` runs write checkpoints to a local folder"):
        pretrain_local(tiny_config(shards, f"s3://{BUCKET}/local-run"))


@pytest.mark.ray
@pytest.mark.slow
def test_a_ray_run_on_s3_is_killed_resumed_and_evaluated_from_the_bucket(shards, s3, tmp_path):
    """`sslpipe pretrain --run_dir=s3://...` with 2 Ray workers, the driver and its Ray killed with
    SIGKILL mid-run, `--resume s3://...` on a clean cache (as on another machine), then `sslpipe
    eval` and `sslpipe report` straight from the bucket. Nothing is written to a local run folder."""
    url = f"s3://{BUCKET}/runs/rot1"
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    args = [sys.executable, "-m", "pipeline.cli", "pretrain", f"--run_dir={url}", f"--data.root={shards}",
            "--model.backbone_kwargs={channels: [8, 16, 32, 64]}", "--data.shuffle_buffer=64", "--optim.name=adamw",
            "--optim.lr=0.01", "--optim.weight_decay=0.0", "--train.global_batch_size=32", "--train.log_every=5",
            "--train.checkpoint_every=10", "--num-workers=2", "--train.steps=100000"]
    log_path = tmp_path.with_name(tmp_path.name + "-pretrain.log")  # beside the run's cwd, which must stay empty
    log = open(log_path, "w")  # shown when the bucket stays empty
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=tmp_path)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # rank 0 uploads metrics.jsonl at every checkpoint
            rows = keys(s3, "runs/rot1/")
            if "metrics.jsonl" in rows:
                steps = [json.loads(line)["step"] for line in s3.get_object(Bucket=BUCKET, Key="runs/rot1/metrics.jsonl")["Body"].read().splitlines()]
                if max(steps) >= 30:
                    break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    time.sleep(5)
    log.close()
    listed = keys(s3, "runs/rot1/")
    assert {"config.yaml", "examples.png", "metrics.jsonl", "workers/rank_0.json", "workers/rank_1.json"} <= set(listed), \
        log_path.read_text()[-3000:]
    checkpoints = sorted({k.split("/")[1] for k in listed if k.startswith("ray-") and k.endswith(CHECKPOINT_FILE)})
    assert checkpoints, listed  # Ray Train uploaded them: ray-<launch>/checkpoint_<time>/checkpoint.pt

    import shutil

    shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # resume as from another machine
    newest = load_valid_checkpoint(url)[1]["step"]
    assert newest >= 20
    target = newest + 10
    resumed = subprocess.run([sys.executable, "-m", "pipeline.cli", "pretrain", "--resume", url, f"--train.steps={target}"],
                             capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    final = load_valid_checkpoint(url)[1]
    assert final["step"] == target and final["optimizers"]["main"]["state"][0]["step"] == target
    rows = [json.loads(line) for line in s3.get_object(Bucket=BUCKET, Key="runs/rot1/metrics.jsonl")["Body"].read().splitlines()]
    assert rows[-1]["step"] == target and any(r.get("resumed_from") == newest for r in rows)
    assert "training_curves.png" in keys(s3, "runs/rot1/")

    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", url, "--protocols"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(s3.get_object(Bucket=BUCKET, Key="runs/rot1/eval/results.json")["Body"].read())
    assert results["step"] == target and 0 <= results["rows"]["pretrained"]["linear"] <= 1
    report = subprocess.run([sys.executable, "-m", "pipeline.cli", "report", url, "--out", str(tmp_path / "report.html")],
                            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-2000:]
    assert "rot1" in (tmp_path / "report.html").read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("cache", "report.html")) == []  # no local run folder
