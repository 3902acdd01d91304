"""Clip ids as integers."""
from __future__ import annotations

import hashlib


def clip_code(video: str) -> int:
    """A stable 63-bit integer id of a clip name: the same in every process and run (Python's
    hash() of a str is salted per process, so loader workers would disagree)."""
    return int.from_bytes(hashlib.blake2b(video.encode(), digest_size=8).digest(), "little") >> 1
