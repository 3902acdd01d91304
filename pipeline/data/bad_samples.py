"""The bad-input policy: what a bad sample or shard does (skip and count, or stop), with counts
shared by the loader processes of one loader, and `ShardError`, which names the shard and key."""
from __future__ import annotations

import logging
import multiprocessing
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: decode imports this module
    from pipeline.data.decode import ImageDecoder


log = logging.getLogger("sslpipe.data")


class ShardError(RuntimeError):
    """A shard cannot be read or holds a bad sample; the message names shard and key."""


def add(counter, amount: int) -> int:
    """Adds to a shared multiprocessing counter under its lock; returns the new value."""
    with counter.get_lock():
        counter.value += amount
        return counter.value


class BadSamples:
    """The bad-input policy, with counts shared by all loader worker processes of one loader.

    Default: a sample that cannot be used (image that does not decode, zero bytes, no image, no
    or out-of-range label where labels are needed, pickled entries) is skipped with a warning
    naming shard and key, and a truncated or unreadable shard is skipped from the point it
    breaks; the loader aborts with ShardError once more than `max_fraction` of the samples seen
    (after `min_seen`) were bad. `strict` raises on the first bad sample or shard instead.
    """

    def __init__(self, strict: bool = False, max_fraction: float = 0.01, min_seen: int = 100):
        self.strict, self.max_fraction, self.min_seen = strict, max_fraction, min_seen
        self.max_unreadable_shards = 20
        # Shared memory: DataLoader workers inherit these, so the counts cover every worker.
        self.seen = multiprocessing.Value("q", 0)
        self.bad = multiprocessing.Value("q", 0)
        self.bad_shards = multiprocessing.Value("q", 0)
        self.short = multiprocessing.Value("q", 0)  # samples missing from shards read short (also in bad)
        self.failed_in_a_row = multiprocessing.Value("q", 0)  # shard reads failed since the last good sample

    @classmethod
    def for_config(cls, data_cfg) -> "BadSamples":
        """The policy a run's `data` section sets (strict, max_bad_fraction)."""
        return cls(data_cfg.strict, data_cfg.max_bad_fraction)

    def counts(self) -> dict[str, int]:
        return {"seen": self.seen.value, "bad_samples": self.bad.value, "bad_shards": self.bad_shards.value,
                "missing_samples": self.short.value}

    def summary(self) -> str:
        c = self.counts()
        missing = f" ({c['missing_samples']} sample(s) missing from shards shorter than their manifest count)" if c["missing_samples"] else ""
        return f"{c['bad_samples']} bad sample(s) skipped of {c['seen']} read, {c['bad_shards']} shard(s) cut short{missing}"

    def sample_failed(self, err: ShardError) -> None:
        if self.strict:
            raise err
        bad = add(self.bad, 1)
        log.warning("skipping bad sample (%d so far): %s", bad, err)
        self.check_fraction(err)

    def check_fraction(self, last) -> None:
        """Raises once more than max_fraction of the samples seen (after min_seen) were bad or missing."""
        bad, seen = self.bad.value, max(self.seen.value, 1)
        if seen >= self.min_seen and bad / seen > self.max_fraction:
            raise ShardError(f"{bad} of {seen} samples were bad or missing, more than data.max_bad_fraction={self.max_fraction} "
                             f"(last: {last}); fix the shards or raise the fraction")

    def shard_failed(self, exn: Exception) -> bool:
        """WebDataset handler for shard-level errors (truncated tar, unreadable file)."""
        if self.strict:
            raise_with_shard(exn)
        bad_shards, in_a_row = add(self.bad_shards, 1), add(self.failed_in_a_row, 1)
        url = next((a for a in reversed(exn.args[1:]) if isinstance(a, str)), "?")
        message = exn.args[0] if exn.args else repr(exn)
        # The training stream repeats its shards forever: without these it would retry forever when
        # no shard was ever readable, or when every shard stopped being readable mid-run (storage gone).
        if self.seen.value == 0 and bad_shards >= self.max_unreadable_shards:
            raise ShardError(f"{bad_shards} shard reads failed and not one sample was read (last: shard {url}: {message})")
        if in_a_row >= self.max_unreadable_shards:
            raise ShardError(f"{in_a_row} shard reads in a row failed, with no good sample between them (last: shard {url}: "
                             f"{message}); is the storage gone?")
        log.warning("shard %s: %s; skipping the rest of this shard", url, message)
        return True  # go on with the next shard

    def shard_short(self, url: str, read: int, listed: int) -> None:
        """A shard ended cleanly after `read` of the `listed` samples its manifest lists (a truncated
        file): warned and counted (the missing samples count as bad toward max_fraction), or raised when strict."""
        message = f"shard {url}: read {read} of {listed} samples its manifest lists; the file is cut short (truncated download or copy?)"
        if self.strict:
            raise ShardError(message)
        missing = listed - read
        for counter, amount in ((self.bad_shards, 1), (self.short, missing), (self.seen, missing), (self.bad, missing)):
            add(counter, amount)
        log.warning("%s; going on without the missing %d", message, missing)
        self.check_fraction(message)

    def decode(self, decoder: "ImageDecoder") -> "GuardedDecoder":
        return GuardedDecoder(decoder, self)


class GuardedDecoder:
    """Runs the decoder under the policy: a bad sample becomes None (dropped by `is_sample`)."""

    def __init__(self, decoder: "ImageDecoder", policy: BadSamples):
        self.decoder, self.policy = decoder, policy

    def __call__(self, sample: dict) -> dict | None:
        with self.policy.seen.get_lock():
            self.policy.seen.value += 1
        try:
            decoded = self.decoder(sample)
        except ShardError as err:
            self.policy.sample_failed(err)
            return None
        if self.policy.failed_in_a_row.value:
            self.policy.failed_in_a_row.value = 0
        return decoded


def is_sample(sample) -> bool:
    return sample is not None


def raise_with_shard(exn: Exception) -> bool:
    """WebDataset error handler: re-raise naming the shard (WebDataset appends the URL to args)."""
    url = next((a for a in reversed(exn.args[1:]) if isinstance(a, str)), None)
    raise ShardError(f"shard {url or '?'}: {exn.args[0] if exn.args else repr(exn)}") from exn
