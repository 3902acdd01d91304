"""Run directories on object storage: `run_dir: s3://bucket/runs/x` (or any fsspec URL).

Ray Train's usual multi-node set-up: no file system every node mounts, checkpoints written to a
bucket from whichever node holds rank 0. Ray Train uploads the checkpoints itself
(`RunConfig(storage_path=..., storage_filesystem=...)`, the same fsspec filesystem and credentials
as remote shards: pipeline/data/storage.py). Everything else a run writes (config.yaml, examples.png,
metrics.jsonl/csv, workers/, samples/, training_curves.png, eval/) goes first to a local mirror of
the run, `$SSLPIPE_CACHE/runs/<hash>-<name>/` on each machine, and is uploaded from there: by rank
0 at every checkpoint and at the end, by the driver after it draws, by eval after it scores.

Readers (`--resume`, `sslpipe eval/export/report`) get checkpoints through `checkpoint_files`,
which downloads a URL run's checkpoints into the mirror, and the rest through `fetch_run`.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from pipeline.data.storage import display_url, is_url, join_url, storage_options

log = logging.getLogger("sslpipe.run_storage")

CHECKPOINT_CACHE = "downloaded_checkpoints"  # in the mirror: checkpoints fetched for reading
_SOURCES: dict[Path, str] = {}  # downloaded checkpoint directory -> its URL


def cache_root() -> Path:
    return Path(os.environ.get("SSLPIPE_CACHE") or Path.home() / ".cache" / "sslpipe")


def mirror_dir(url: str) -> Path:
    """This machine's local copy of the run at `url` (the same path on every machine)."""
    name = url.rstrip("/").rsplit("/", 1)[-1] or "run"
    path = cache_root() / "runs" / f"{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:12]}-{name}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for `url`. Listings are not cached: another process
    (rank 0 on another node, Ray's uploader) writes the run while this one reads it."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
    fs.invalidate_cache()
    return fs, path


def ray_storage(url: str) -> tuple[str, object]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: a pyarrow view of the same
    fsspec filesystem, so Ray's checkpoint uploads use the shards' endpoint and credentials."""
    import pyarrow.fs

    fs, path = filesystem(url)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def local_run_dir(run_dir: str | Path) -> Path:
    """Where this process writes the run's files: the folder itself, or a URL run's mirror."""
    return mirror_dir(str(run_dir)) if is_url(run_dir) else Path(run_dir)


def push(run_dir: str | Path, names: list[str]) -> None:
    """Uploads the mirror's files or folders `names` (relative to the run) to a URL run; nothing for a
    local run. A name that does not exist locally is skipped."""
    if not is_url(run_dir):
        return
    url, local = str(run_dir), mirror_dir(str(run_dir))
    fs, root = filesystem(url)
    for name in names:
        path = local / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
        for file in files:
            rel = file.relative_to(local).as_posix()
            try:
                fs.put_file(str(file), f"{root.rstrip('/')}/{rel}")
            except OSError as err:
                raise OSError(f"cannot upload {rel} to {display_url(join_url(url, rel))}: {err}") from err


def pull(run_dir: str | Path, names: list[str]) -> Path:
    """Downloads the files or folders `names` of a URL run into its mirror (those that exist);
    returns the local run directory either way."""
    local = local_run_dir(run_dir)
    if not is_url(run_dir):
        return local
    fs, root = filesystem(str(run_dir))
    root = root.rstrip("/")
    for name in names:
        remote = f"{root}/{name}"
        if fs.isdir(remote):
            for file in fs.find(remote):
                target = local / file[len(root) + 1:]
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(file, str(target))
        elif fs.isfile(remote):
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(local / name))
    return local


RUN_FILES = ["config.yaml", "examples.png", "metrics.jsonl", "metrics.csv", "training_curves.png", "mlflow_run.json",
             "workers", "samples", "eval"]


def fetch_run(run_dir: str | Path) -> Path:
    """A URL run's files other than checkpoints, in its mirror (a local run: itself)."""
    return pull(run_dir, RUN_FILES)


def checkpoint_dirs(url: str) -> list[tuple[int, str, str]]:
    """(step, URL, path in the filesystem) of every checkpoint under `url` (a run: Ray Train's
    ray-*/checkpoint_* folders and --local's checkpoints/step_*; or one checkpoint folder), newest first."""
    import json

    fs, root = filesystem(url)
    root = root.rstrip("/")
    metas = [f"{root}/meta.json"] if fs.isfile(f"{root}/meta.json") else fs.glob(f"{root}/*/*/meta.json")
    found = []
    for meta in metas:
        try:
            with fs.open(meta, "rb") as f:
                step = int(json.loads(f.read())["step"])
        except (OSError, ValueError, KeyError):
            step = -1  # unreadable metadata: tried last
        folder = meta.rsplit("/", 1)[0]
        found.append((step, url.rstrip("/") + folder[len(root):], folder))
    return sorted(found, key=lambda item: (item[0], item[1]), reverse=True)


def download_checkpoints(url: str) -> list[Path]:
    """The checkpoint folders under `url`, downloaded into the mirror of the run they belong to,
    newest first (their files are `checkpoint_files`' answer for a URL)."""
    from pipeline.train.checkpoint import CHECKPOINT_FILE, CheckpointError

    found = checkpoint_dirs(url)
    if not found:
        raise CheckpointError(f"no checkpoint under {display_url(url)}: did pretraining reach its first checkpoint?")
    cache = mirror_dir(url) / CHECKPOINT_CACHE
    fs, _ = filesystem(url)
    folders = []
    for step, folder_url, folder in found:
        target = cache / hashlib.sha256(folder_url.encode()).hexdigest()[:12]
        if not (target / CHECKPOINT_FILE).is_file():
            target.mkdir(parents=True, exist_ok=True)
            for name in ("meta.json", CHECKPOINT_FILE):
                try:
                    fs.get_file(f"{folder}/{name}", str(target / (name + ".partial")))
                    os.replace(target / (name + ".partial"), target / name)
                except OSError as err:
                    log.warning("cannot download %s: %s", display_url(join_url(folder_url, name)), err)
        _SOURCES[target.resolve()] = folder_url
        folders.append(target)
    return folders


def source_url(checkpoint_dir: Path) -> str | None:
    """The URL a downloaded checkpoint folder came from (None for a local one)."""
    return _SOURCES.get(Path(checkpoint_dir).resolve())
