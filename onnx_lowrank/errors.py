"""The one exception type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations

__all__ = ["LowRankError"]


class LowRankError(ValueError):
    """A problem with the user's input (file, flag or model), stated in one line."""
