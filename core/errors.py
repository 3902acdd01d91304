"""Errors raised across packages."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key."""
