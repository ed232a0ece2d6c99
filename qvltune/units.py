"""Sizes, counts and durations as a user reads them (``12.3 GiB``, ``7.62 B``, ``41 min``), as the
estimate, the plan and the doctor write them, so that they agree.
"""

from __future__ import annotations

GiB = 1024**3


def format_count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.0f} k" if n >= 1e3 else f"{n:.0f}"


def format_bytes(n: float) -> str:
    return f"{n / GiB:,.1f} GiB"


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
