"""Progress bars for long loops (generation, updates, evaluation).

Bars go to stderr and vanish when done (`leave=False`), so the one-line-per-step console
summary printed by `MetricsLogger` stays readable.
"""

from __future__ import annotations

import sys
from typing import Any


class NullProgress:
    """Stands in for a tqdm bar when progress display is turned off."""

    n = 0

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NullProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: int | None, desc: str, enabled: bool = True, unit: str = "seq"):
    """A tqdm bar on stderr, or a `NullProgress` with the same methods when `enabled` is False."""
    if not enabled:
        return NullProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)
