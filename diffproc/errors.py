"""The error a user acts on by changing the configuration (imported by every room that checks options)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration the user must change; the CLI prints its message without a traceback."""
