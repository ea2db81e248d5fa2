"""Errors raised while loading task data."""

from __future__ import annotations


class TaskDataError(ValueError):
    """Task data that cannot be used: a missing file or a malformed record.

    The message names the file and, where it applies, the 1-based line (jsonl) or row (parquet)
    together with what is wrong, so that the CLI can print it as is.
    """
