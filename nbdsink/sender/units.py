"""Rates and durations for the sender's command line and logs (sizes: :mod:`nbdsink.units`)."""

from __future__ import annotations

from nbdsink.units import format_size, parse_duration, parse_size

__all__ = ["format_duration", "format_size", "parse_duration", "parse_rate", "parse_size"]


def parse_rate(text: str) -> int:
    """A bandwidth in bytes per second: ``50M`` or ``50M/s``; ``0`` means unlimited."""
    return parse_size(text.removesuffix("/s"))


def format_duration(seconds: float) -> str:
    """A short human duration: ``850ms``, ``12.3s``, ``4m05s``, ``2h03m``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
