"""Shards over the network: a real HTTP server and a real S3-compatible server (moto) on loopback.

Each test compares what the remote reader yields with what the same shards give from local files.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import itertools
import json
import logging
import socket
import threading
import traceback
import urllib.request
from pathlib import Path

import pytest
import torch

from pipeline.data.bad_samples import BadSamples, ShardError
from pipeline.data.decode import decoder_for
from pipeline.data.shards import read_manifest, split_urls
from pipeline.data.storage import check_urls
from pipeline.data.streaming import eval_loader, train_loader

BUCKET, PREFIX = "ssl-shards", "glyphs/v1"


def read_all(urls: list[str], decoder, loader_workers: int = 0, bad_samples: BadSamples | None = None) -> dict:
    """key -> (label, image) for every sample an eval loader yields; a key seen twice fails."""
    out = {}
    for images, labels, keys in eval_loader(urls, 0, 1, decoder, 10, loader_workers, bad_samples=bad_samples):
        for image, label, key in zip(images, labels, keys):
            assert key not in out, f"{key} read twice"
            out[key] = (int(label), image)
    return out


def assert_same_samples(remote: dict, local: dict) -> None:
    assert sorted(remote) == sorted(local)
    for key, (label, image) in local.items():
        assert remote[key][0] == label, key
        assert torch.equal(remote[key][1], image), key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ShardServer(http.server.SimpleHTTPRequestHandler):
    """Serves the folder. Under /broken/ it answers 503, as an overloaded server would; under
    /cut/ it promises a file's full length, sends the first half and drops the connection."""

    def send_head(self):
        if self.path.startswith("/broken/"):
            self.send_error(503, "try again later")
            return None
        if self.path.startswith("/cut/"):
            data = Path(self.translate_path(self.path[len("/cut"):])).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.close_connection = True
            return io.BytesIO(data[: len(data) // 2])
        return super().send_head()

    def log_message(self, format, *args):  # one line per request would bury pytest's output
        pass


@pytest.fixture(scope="module")
def http_root(shards):
    """The shard folder served by Python's own HTTP server on loopback, as http://127.0.0.1:PORT/<folder>."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(ShardServer, directory=str(shards.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{shards.name}"
    server.shutdown()
    server.server_close()


def test_http_root_gives_the_manifest_and_exactly_the_local_samples(shards, http_root):
    manifest = read_manifest(http_root)
    assert manifest == read_manifest(shards)
    urls = split_urls(http_root, manifest, "test")
    assert urls == [f"{http_root}/test-{i:06d}.tar" for i in range(3)]
    assert check_urls(urls) == urls  # not looked for on the local disk
    decoder = decoder_for(manifest, "train", 0, require_label=True)
    local = read_all(split_urls(shards, manifest, "test"), decoder)
    assert len(local) == 48
    assert_same_samples(read_all(urls, decoder), local)
    # Two forked loader workers, after this process has opened http URLs itself.
    assert_same_samples(read_all(urls, decoder, loader_workers=2), local)


def test_http_training_stream_yields_batches_of_the_shards_samples(shards, http_root):
    manifest = read_manifest(http_root)
    decoder = decoder_for(manifest, "train", 0, require_label=True)
    local = read_all(split_urls(shards, manifest, "train"), decoder)
    known = {hashlib.sha1(image.numpy().tobytes()).hexdigest(): label for label, image in local.values()}
    loader = train_loader(split_urls(http_root, manifest, "train"), 0, 1, decoder, LabelledImage(), 8, 20, 0, seed=0)
    seen = set()
    for images, labels in itertools.islice(loader, 15):  # 120 samples: more than one pass over the 96
        assert images.shape == (8, 1, 16, 16)
        for image, label in zip(images, labels):
            digest = hashlib.sha1(image.numpy().tobytes()).hexdigest()
            assert known.get(digest) == int(label)
            seen.add(digest)
    assert len(seen) > 48 and loader.bad_samples.counts()["bad_shards"] == 0


class LabelledImage:
    def __call__(self, sample):
        return sample["image"], torch.tensor(sample["label"])


def test_missing_http_shard_is_skipped_naming_its_url_or_raises_under_strict(shards, http_root, caplog):
    manifest = read_manifest(http_root)
    decoder = decoder_for(manifest, "train", 0, require_label=True)
    missing = f"{http_root}/test-000099.tar"
    urls = split_urls(http_root, manifest, "test")
    policy = BadSamples()
    with caplog.at_level(logging.WARNING, logger="sslpipe.data"):
        remote = read_all(urls[:1] + [missing] + urls[1:], decoder, bad_samples=policy)
    assert_same_samples(remote, read_all(split_urls(shards, manifest, "test"), decoder))
    assert missing in caplog.text and "not found" in caplog.text
    assert policy.counts()["bad_shards"] == 1
    with pytest.raises(ShardError, match=f"shard {missing}: cannot open: not found"):
        read_all([missing] + urls, decoder, bad_samples=BadSamples(strict=True))


def test_connection_lost_mid_shard_skips_that_shard_naming_it(shards, http_root, caplog):
    manifest = read_manifest(http_root)
    decoder = decoder_for(manifest, "train", 0, require_label=True)
    urls = split_urls(http_root, manifest, "test")
    server, folder = http_root.rsplit("/", 1)
    cut = f"{server}/cut/{folder}/test-000001.tar"
    policy = BadSamples()
    with caplog.at_level(logging.WARNING, logger="sslpipe.data"):
        remote = read_all([urls[0], cut, urls[2]], decoder, bad_samples=policy)
    local = read_all([str(shards / "test-000000.tar"), str(shards / "test-000002.tar")], decoder)
    assert_same_samples(remote, local)
    assert f"shard {cut}: read failed" in caplog.text and policy.counts()["bad_shards"] == 1
    with pytest.raises(ShardError, match=f"shard {cut}: read failed"):
        read_all([cut], decoder, bad_samples=BadSamples(strict=True))


def test_missing_or_unreachable_http_manifest_names_the_url(http_root):
    with pytest.raises(FileNotFoundError, match=f"no manifest.json at '{http_root}/nowhere/manifest.json'"):
        read_manifest(f"{http_root}/nowhere")
    closed = f"http://127.0.0.1:{free_port()}/data"  # nothing listens there
    with pytest.raises(OSError, match=f"cannot read '{closed}/manifest.json': .*[Cc]onnect"):
        read_manifest(closed)


def test_unknown_protocol_is_refused_before_reading():
    with pytest.raises(ShardError, match=r"nosuchproto://b/x-000000.tar.*nosuchproto://"):
        check_urls(["nosuchproto://b/x-000000.tar"])


def test_passwords_and_signatures_in_urls_stay_out_of_errors(http_root):
    decoder = decoder_for(read_manifest(http_root), "train", 0)
    server = http_root.rsplit("/", 1)[0].replace("http://", "http://reader:hunter2pass@")
    url = f"{server}/broken/test-000000.tar?X-Amz-Signature=abcdef123456"
    with pytest.raises(ShardError) as info:
        read_all([url], decoder, bad_samples=BadSamples(strict=True))
    text = "".join(traceback.format_exception(info.value))
    assert "503" in str(info.value) and "http://reader:***@127.0.0.1" in text and "X-Amz-Signature=***" in text
    assert "hunter2pass" not in text and "abcdef123456" not in text


# S3: moto's server, with request signatures checked against an IAM user's key.

def start_moto_server():
    """moto's S3-compatible server on a free loopback port: (server, endpoint). Stop it with server.stop()."""
    moto_server = pytest.importorskip("moto.server")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def s3_store(shards):
    """An S3-compatible server on a free loopback port holding the shard folder under s3://BUCKET/PREFIX,
    with authentication on; yields (endpoint, access key id, secret access key)."""
    boto3 = pytest.importorskip("boto3")
    server, endpoint = start_moto_server()
    admin = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
    try:
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="reader")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="reader", PolicyName="read-shards", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        s3 = boto3.client("s3", **admin)
        s3.create_bucket(Bucket=BUCKET)
        for path in sorted(shards.iterdir()):
            s3.upload_file(str(path), BUCKET, f"{PREFIX}/{path.name}")
        set_moto_auth(endpoint, "0")  # from now on every request must be signed by a known key
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        set_moto_auth(endpoint, "inf")
        server.stop()


def set_moto_auth(endpoint: str, unauthenticated_requests: str) -> None:
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=unauthenticated_requests.encode(),
                                     method="POST", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request, timeout=10).close()


@pytest.fixture
def s3_env(s3_store, monkeypatch, tmp_path):
    """The store's credentials and endpoint in the environment variables a user would set."""
    s3fs = pytest.importorskip("s3fs")
    endpoint, key_id, secret = s3_store
    for name in ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))  # nothing from this machine's ~/.aws
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    # A process reads its credentials once (fsspec caches the filesystem): each test is a fresh process.
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_store
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_root_gives_the_manifest_and_exactly_the_local_samples(shards, s3_env):
    root = f"s3://{BUCKET}/{PREFIX}"
    manifest = read_manifest(root)
    assert manifest == read_manifest(shards)
    urls = check_urls(split_urls(root, manifest, "test"))
    assert urls == [f"{root}/test-{i:06d}.tar" for i in range(3)] == split_urls(f"{root}/", manifest, "test")
    decoder = decoder_for(manifest, "train", 0, require_label=True)
    local = read_all(split_urls(shards, manifest, "test"), decoder)
    assert_same_samples(read_all(urls, decoder), local)
    assert_same_samples(read_all(urls, decoder, loader_workers=2), local)  # forked after this process used s3
    loader = train_loader(split_urls(root, manifest, "train"), 0, 1, decoder, LabelledImage(), 8, 20, 0, seed=0)
    images, labels = next(iter(loader))
    assert images.shape == (8, 1, 16, 16) and labels.shape == (8,)


def test_s3_wrong_secret_names_the_shard_and_never_shows_the_secret(shards, s3_env, monkeypatch, caplog):
    wrong_secret = "Wr0ngSecretKey/ForThisTest+0123456789abcdefgh"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    root = f"s3://{BUCKET}/{PREFIX}"
    manifest = read_manifest(shards)  # the manifest itself is unreadable with this key, checked below
    decoder = decoder_for(manifest, "train", 0, require_label=True)
    urls = split_urls(root, manifest, "test")

    with pytest.raises(ShardError) as info:
        read_all(urls, decoder, bad_samples=BadSamples(strict=True))
    text = "".join(traceback.format_exception(info.value))
    assert f"shard {urls[0]}: cannot open: access denied" in str(info.value) and "AWS_SECRET_ACCESS_KEY" in str(info.value)
    assert wrong_secret not in text

    with pytest.raises(OSError) as info:
        read_manifest(root)
    text = "".join(traceback.format_exception(info.value))
    assert f"{root}/manifest.json" in text and "access denied" in text and wrong_secret not in text

    with caplog.at_level(logging.WARNING, logger="sslpipe.data"):
        assert read_all(urls, decoder) == {}  # the default policy skips each shard, naming it
    assert all(url in caplog.text for url in urls) and wrong_secret not in caplog.text
