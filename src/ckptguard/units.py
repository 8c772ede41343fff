"""Byte counts as people read them, one wording everywhere (CLI tables, error messages, doctor)."""

from __future__ import annotations

import math


def format_bytes(n: float) -> str:
    """``512 B``, ``1.5 KiB``, ``3.2 MiB``, ``1.25 GiB``, ``2.00 TiB``, up to EiB (a size estimate can be absurd)."""
    if not math.isfinite(n) or n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    for unit in ("GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.2f} {unit}"
    return f"{n / 1024:.2f} EiB"
