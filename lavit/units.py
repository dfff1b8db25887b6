"""Numbers for people: durations and SI prefixes, as status lines and progress bars show them."""

from __future__ import annotations

import math

__all__ = ["format_duration", "format_si"]


def format_duration(seconds: float | None) -> str:
    """``1:02:03`` (or ``2:03``); ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_si(value: float | None, unit: str = "") -> str:
    """``1.23T`` style: three significant digits and an SI prefix; ``?`` when unknown."""
    if value is None or not math.isfinite(value):
        return "?"
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{prefix}{unit}"
    return f"{value:.3g}{unit}"
