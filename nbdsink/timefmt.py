"""Times as nbdsink writes them: UTC always, ISO-8601 with a ``Z``, whatever ``TZ`` says."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    """Now, as an aware UTC datetime."""
    return datetime.now(UTC)


def iso(ts: datetime) -> str:
    """ISO-8601 UTC with milliseconds and a ``Z``: ``2026-11-23T10:00:00.123Z``.

    A naive datetime is refused: it would be read as UTC whatever zone it was taken in."""
    if ts.tzinfo is None:
        raise ValueError("iso() needs an aware datetime (use utc_now())")
    ts = ts.astimezone(UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def utc_iso_now() -> str:
    return iso(utc_now())
