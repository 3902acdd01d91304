"""Where shards and manifests live: local files (or `pipe:` commands, when allowed) go through
WebDataset's gopen; URLs (http(s)://, s3:// and every other protocol fsspec knows) through fsspec,
with S3 credentials and endpoint from the usual environment variables, and every URL shown in logs
and errors with its secrets masked."""
from __future__ import annotations

import os
import re
import tarfile
import urllib.parse
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

import fsspec
import webdataset as wds
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.data.bad_samples import ShardError

MANIFEST = "manifest.json"

# Remote storage. Everything with "scheme://" is a URL (joined with "/", never through Path, which
# would turn "s3://bucket" into "s3:/bucket"); file:// stays a local file for the shard reader.

# Environment variables whose values must never reach a log line or an error message.
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def join_url(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def manifest_location(root: str | Path) -> str:
    return display_url(join_url(str(root), MANIFEST)) if is_url(root) else str(Path(root) / MANIFEST)


def storage_options(url: str) -> dict:
    """fsspec options for `url`. S3: the endpoint of an S3-compatible store (MinIO, Ceph, ...) from
    AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL. botocore 1.43 reads both itself, releases before
    mid-2023 (1.31) ignore them; passing it also gives each endpoint its own cached filesystem.
    Credentials are left to botocore's usual chain (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_SESSION_TOKEN, then profiles and instance roles), read once per process."""
    if url.split("://", 1)[0].lower() in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def open_url(url: str) -> IO[bytes]:
    """A binary read stream for a URL through fsspec (http(s), s3 and every protocol fsspec knows).
    http(s) reads 5 MB blocks with range requests (fsspec's default), S3 50 MB blocks."""
    return fsspec.open(url, "rb", **storage_options(url)).open()


def display_url(url: str) -> str:
    """`url` as logs and errors show it: a password in user:password@ and the query values
    (presigned URLs carry their signature and token there) are masked."""
    parts = urllib.parse.urlsplit(url)
    if not parts.password and not parts.query:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@") if parts.password else parts.netloc
    query = "&".join(f"{name}=***" for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def redact(text: str, url: str) -> str:
    """`text` with `url` shown as `display_url` and the values of SECRET_VARIABLES masked, as well
    as the URL's password and query values wherever else they appear (HTTP clients quote the URL
    in their own forms, without the password, say)."""
    text = text.replace(url, display_url(url))
    parts = urllib.parse.urlsplit(url)
    for secret in filter(None, [os.environ.get(name) for name in SECRET_VARIABLES] + [parts.password]):
        text = text.replace(secret, "***")
    for pair in filter(None, parts.query.split("&")):
        value = pair.partition("=")[2]
        for form in filter(None, {value, urllib.parse.unquote(value)}):
            text = text.replace(f"={form}", "=***")
    return text


def describe_error(err: Exception, url: str) -> str:
    """Why `url` could not be opened, with a hint, free of secrets."""
    # fsspec's http reports every failure (refused connection, HTTP 503) as FileNotFoundError,
    # raised from the real one, and wraps that again for URLs with "?": find the real one.
    while isinstance(err, FileNotFoundError) and err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, FileNotFoundError) or getattr(err, "status", None) == 404:
        return "not found"
    text = redact(f"{type(err).__name__}: {err}", url)
    if isinstance(err, PermissionError) and url.lower().startswith(("s3://", "s3a://")):
        return (f"access denied ({text}); check the credentials in AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and "
                f"AWS_SESSION_TOKEN and the endpoint in AWS_ENDPOINT_URL")
    return text


def opens_with_fsspec(url: str) -> bool:
    """http(s)://, s3:// and every other URL; local paths, file:// and `pipe:` stay with WebDataset's gopen."""
    lowered = url.lower()
    return "://" in url and not lowered.startswith(("pipe:", "file:"))


def open_shards(sources: Iterable[dict], handler: Callable[[Exception], bool] = reraise_exception) -> Iterator[dict]:
    """Opener stage in place of WebDataset's `url_opener`: local files and `pipe:` go through gopen
    as before, every other URL through `fsspec.open` (gopen would shell out to curl for http and
    has no s3). A remote shard is named by `display_url` from here on (samples' `__url__`, errors),
    so a password or signature in its URL reaches no log. Remote streams are closed once the tar
    reader has moved on to the next shard (or the pipeline stops)."""
    for source in sources:
        url = source["url"]
        if not opens_with_fsspec(url):
            try:
                stream = gopen(url, "rb")
            except Exception as exn:
                exn.args = exn.args + (url,)  # the handler names the shard by the last string argument
                if handler(exn):
                    continue
                break
            yield {**source, "stream": stream}
            continue
        name, failure = display_url(url), None
        try:
            stream = open_url(url)
        except Exception as err:
            failure = OSError(f"cannot open: {describe_error(err, url)}", name)  # the handler names the shard by the last argument
        if failure is not None:
            # Handled outside the except block: a strict handler's exception must not chain the
            # original, whose text (an HTTP client's request, say) may quote credentials.
            if handler(failure):
                continue
            break
        with RemoteShardStream(stream, url) as remote:
            yield {**source, "url": name, "stream": remote}


class RemoteShardStream:
    """A remote shard's bytes as the tar reader sees them: a read error is re-raised with its
    reason through `describe_error` (no secrets), and the stream prints as its display URL
    (WebDataset quotes str(stream) in its own error messages)."""

    def __init__(self, stream, url: str):
        self.stream, self.url = stream, url

    def read(self, size: int = -1) -> bytes:
        try:
            return self.stream.read(size)
        except Exception as err:
            failure = OSError(f"read failed: {describe_error(err, self.url)}")
        raise failure  # outside the except block: the original, which may quote credentials, is not chained

    def __enter__(self) -> "RemoteShardStream":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stream.close()
        except Exception:  # a read-only stream that fails to close has lost nothing
            pass

    def __repr__(self) -> str:
        return f"<remote shard {display_url(self.url)}>"


class ShardUrl(str):
    """A shard's URL (or path) that also carries the number of samples its manifest lists
    (`split_urls` makes them), so a reader can tell a shard read short from a whole one: Python's
    tarfile in stream mode, which WebDataset reads with, ends cleanly at a truncated tar."""

    count: int | None

    def __new__(cls, url: str, count: int | None = None) -> "ShardUrl":
        shard = super().__new__(cls, url)
        shard.count = count
        return shard

    def __reduce__(self):  # loader workers and Ray get the count too
        return ShardUrl, (str(self), self.count)


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_SKIPPED = re.compile(r"__[^/]*__($|/)")  # WebDataset's metadata members (skip_meta)


def _tar_number(field: bytes) -> int:
    """A numeric tar header field: octal text, or GNU base-256 when the high bit is set."""
    if field and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _valid_header(block: bytes) -> bool:
    try:
        stored = _tar_number(block[148:156])
    except ValueError:
        return False
    return stored == sum(block[:148]) + 256 + sum(block[156:])  # the checksum field counts as 8 spaces


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    chunks, left = [], size
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class _Prefixed:
    """A stream with bytes already read put back in front (for the fallback to Python's tarfile)."""

    def __init__(self, head: bytes, stream: IO[bytes]):
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size < 0:
            head, self.head = self.head, b""
            return head + self.stream.read()
        head, self.head = self.head[:size], self.head[size:]
        return head + (self.stream.read(size - len(head)) if len(head) < size else b"")


def tar_members(stream: IO[bytes], handler: Callable[[Exception], bool] = reraise_exception) -> Iterator[dict]:
    """{"fname", "data"} of every regular file in an uncompressed tar stream, in order, as
    WebDataset's `tar_file_iterator` yields them, parsed here with a few slices per 512-byte
    header instead of Python's tarfile (which spent 60% of the loader's time on Fashion-MNIST's
    two small members per sample). It reads GNU long names and pax paths, and it ends where
    tarfile in stream mode ends: at the end-of-archive block, at a cut on a block boundary, or at
    an invalid header after the first (the manifest's count tells such a shard was read short). A
    cut inside a header, a member's data or its padding raises tarfile.ReadError, as tarfile does.
    A stream whose first block is not a plain tar header (gzip, bzip2 or xz shards, not a tar at
    all, or shorter than a block) goes to WebDataset's own reader, for its decompression and its
    errors; an empty stream raises tarfile.ReadError("empty file"), as tarfile does."""
    block = _read_exactly(stream, _BLOCK)
    if not block:
        raise tarfile.ReadError("empty file")
    if len(block) < _BLOCK or (block != _ZERO_BLOCK and not _valid_header(block)):
        yield from tar_file_iterator(_Prefixed(block, stream), handler=handler)
        return
    long_name: str | None = None
    while len(block) == _BLOCK and block != _ZERO_BLOCK and _valid_header(block):
        size, kind = _tar_number(block[124:136]), block[156:157]
        data = _read_exactly(stream, size)
        padding = -size % _BLOCK  # to the next block; tarfile fails on a cut there too
        if len(data) < size or len(_read_exactly(stream, padding)) < padding:
            raise tarfile.ReadError("unexpected end of data")
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == b"x":  # pax extended header: "LEN path=NAME\n" records
            for record in data.split(b"\n"):
                _, _, field = record.partition(b" ")
                if field.startswith(b"path="):
                    long_name = field[5:].decode("utf-8", "surrogateescape")
        elif kind != b"g":  # global pax headers say nothing about names here
            name = long_name
            if name is None:
                name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                prefix = block[345:500].split(b"\0", 1)[0] if block[257:262] == b"ustar" else b""
                if prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            long_name = None
            if kind in (b"0", b"\0", b"7") and not _SKIPPED.match(name):
                yield {"fname": name, "data": data}
        block = _read_exactly(stream, _BLOCK)
    if 0 < len(block) < _BLOCK:
        raise tarfile.ReadError("truncated header")


def tar_expander(sources: Iterable[dict], handler: Callable[[Exception], bool] = reraise_exception) -> Iterator[dict]:
    """WebDataset's `tar_file_expander` (opened shards in, members tagged with their URL out, an
    empty dict after each shard) on `tar_members`, with the same error contract: an exception gets
    the stream and URL appended to its args and goes to `handler`."""
    for source in sources:
        try:
            for member in tar_members(source["stream"], handler):
                member["__url__"] = source["url"]
                yield member
            yield {}
        except Exception as exn:
            exn.args = exn.args + (source.get("stream"), source.get("url"))
            if handler(exn):
                continue
            break


def shard_samples(sources: Iterable[dict], handler: Callable[[Exception], bool] = reraise_exception,
                  on_short: Callable[[str, int, int], None] | None = None) -> Iterator[dict]:
    """`wds.tarfile_to_samples` with `open_shards` as its opener: shard URLs in, samples out.

    A shard whose URL is a `ShardUrl` is counted as it is read: when it ends cleanly with fewer
    samples than its manifest lists, `on_short(url, read, listed)` is called (a shard that failed
    with an error has gone to `handler` already). A consumer that stops mid-shard checks nothing."""
    sources = ({**source, "listed": source["url"].count if isinstance(source["url"], ShardUrl) else None} for source in sources)
    for source in open_shards(sources, handler):
        failures: list[bool] = []

        def noting(exn: Exception) -> bool:
            failures.append(handler(exn))
            return failures[-1]

        read = 0
        for sample in group_by_keys(tar_expander([source], handler=noting), handler=noting):
            read += 1
            yield sample
        if failures and not failures[-1]:
            return  # the handler asked to stop
        if on_short is not None and not failures and source["listed"] is not None and read < source["listed"]:
            on_short(source["url"], read, source["listed"])


read_shards = wds.pipelinefilter(shard_samples)


def check_urls(urls: list[str], allow_shell_urls: bool = False) -> list[str]:
    """Checks without touching the network: local shards exist, `pipe:` is allowed, and fsspec
    knows each URL's protocol (its package, e.g. s3fs for s3://, is installed)."""
    if not urls:
        raise ShardError("the shard list is empty")
    protocols = set()
    for url in urls:
        if url.lower().startswith("pipe:") and not allow_shell_urls:
            raise ShardError(f"shard URL {url!r} runs a shell command; pass --allow-shell-urls (data.allow_shell_urls=true) to allow it")
        if opens_with_fsspec(url):
            protocol = url.split("://", 1)[0].lower()
            if protocol not in protocols:
                try:
                    fsspec.get_filesystem_class(protocol)
                except (ValueError, ImportError) as err:
                    raise ShardError(f"shard {display_url(url)!r}: cannot read {protocol}:// URLs ({err})") from None
                protocols.add(protocol)
        elif "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
            raise ShardError(f"shard {url!r} does not exist")
    return urls
