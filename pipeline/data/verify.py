"""`sslpipe data verify ROOT`: every shard of a dataset (a local folder or a URL) checked against
its manifest: sha256 of the bytes, number of samples, and that every sample decodes as training
and eval would decode it. Reads each shard once (hashing the bytes as the tar reader consumes them)."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys

from pipeline.data.bad_samples import ShardError
from pipeline.data.decode import ImageDecoder, decoder_for
from pipeline.data.shards import read_manifest, split_urls
from pipeline.data.storage import (
    describe_error,
    display_url,
    is_url,
    open_url,
    opens_with_fsspec,
    tar_expander,
)

log = logging.getLogger("sslpipe.data")


class HashingReader:
    """A read stream that hashes every byte read through it."""

    def __init__(self, stream):
        self.stream, self.digest, self.size = stream, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Reads (and hashes) what the tar reader left: the end-of-archive blocks."""
        while self.read(1 << 20):
            pass


@dataclass
class ShardReport:
    split: str
    url: str
    listed: int | None
    read: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def open_shard(url: str):
    """The reader's own choice (storage.open_shards): fsspec for URLs, gopen for paths and file://."""
    return open_url(url) if opens_with_fsspec(url) else gopen(url, "rb")


def verify_shard(split: str, url: str, entry: dict, decoder: ImageDecoder, progress: tqdm | None = None) -> ShardReport:
    report = ShardReport(split, display_url(url), entry.get("count"))
    try:
        stream = open_shard(url)
    except Exception as err:
        report.problems.append(f"cannot open: {describe_error(err, url) if is_url(url) else err}")
        return report
    reader = HashingReader(stream)
    errors: list[str] = []

    def noting(exn: Exception) -> bool:
        errors.append(f"{exn.args[0] if exn.args else type(exn).__name__}")
        return False  # the tar is broken from here: stop reading it

    try:
        samples = group_by_keys(tar_expander([{"url": report.url, "stream": reader}], handler=noting), handler=noting)
        for sample in samples:
            report.read += 1
            if progress is not None:
                progress.update(1)
            try:
                decoder(sample)
            except ShardError as err:
                report.problems.append(str(err))
        reader.drain()
    except Exception as err:  # a read error of the storage
        errors.append(describe_error(err, url) if is_url(url) else str(err))
    finally:
        try:
            stream.close()
        except Exception:
            pass
    report.problems += [f"unreadable after {report.read} samples: {e}" for e in errors]
    if report.listed is not None and report.read != report.listed:
        report.problems.append(f"read {report.read} of {report.listed} samples the manifest lists")
    expected = entry.get("sha256")
    if expected and not errors and reader.digest.hexdigest() != expected:
        report.problems.append(f"sha256 {reader.digest.hexdigest()[:16]}... differs from the manifest's {expected[:16]}... "
                               f"({reader.size} bytes)")
    return report


def verify_dataset(root: str | Path, splits: list[str] | None = None, show_progress: bool = True) -> list[ShardReport]:
    """One report per shard of `splits` (default: all) of the dataset at `root`."""
    manifest = read_manifest(root)
    wanted = splits or sorted(manifest["splits"])
    unknown = sorted(set(wanted) - set(manifest["splits"]))
    if unknown:
        raise KeyError(f"split(s) {unknown} are not in the manifest of {str(root)!r}; available: {sorted(manifest['splits'])}")
    reports = []
    total = sum(manifest["splits"][s]["count"] for s in wanted)
    with tqdm(total=total, desc=f"verify {Path(str(root)).name}", unit="sample", disable=not show_progress, mininterval=1.0) as progress:
        for split in wanted:
            labelled = manifest["splits"][split].get("labelled", 0) == manifest["splits"][split]["count"] > 0
            try:
                decoder = decoder_for(manifest, split, 0, require_label=labelled)
            except ShardError:  # images of several sizes: decode at one size to check they decode
                decoder = decoder_for(manifest, split, 32, require_label=labelled)
            for url, entry in zip(split_urls(root, manifest, split), manifest["splits"][split]["shards"]):
                reports.append(verify_shard(split, url, entry, decoder, progress))
    return reports


def summary(reports: list[ShardReport]) -> str:
    bad = [r for r in reports if not r.ok]
    lines = [f"{len(reports) - len(bad)} of {len(reports)} shard(s) good, {sum(r.read for r in reports)} samples read"]
    for report in bad:
        shown = report.problems[:3] + ([f"... and {len(report.problems) - 3} more"] if len(report.problems) > 3 else [])
        lines.append(f"BAD {report.split} {report.url}: " + "; ".join(shown))
    return "\n".join(lines)
