"""Sizes and durations as users type them: 64K, 20G, 1.5T; 10s, 5m, 250ms."""

from __future__ import annotations

import re

from nbdsink.errors import UsageError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(text: str) -> int:
    """Bytes for a size such as ``4096``, ``64K``, ``20G`` or ``1.5TiB`` (powers of 1024)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"not a size: {text!r} (examples: 4096, 64K, 20G)")
    number, unit, _ = m.groups()
    value = float(number) * _SIZE_UNITS[unit.lower()]
    if value != int(value):
        raise UsageError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def parse_duration(text: str) -> float:
    """Seconds for a duration such as ``10s``, ``250ms``, ``5m`` (a bare number is seconds)."""
    m = _DURATION_RE.match(text)
    if not m:
        raise UsageError(f"not a duration: {text!r} (examples: 10s, 250ms, 5m)")
    number, unit = m.groups()
    return float(number) * _DURATION_UNITS[(unit or "s").lower()]


def format_size(n: float) -> str:
    """Human-readable binary size: 0 B, 512 B, 64.0 KiB, 20.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"
