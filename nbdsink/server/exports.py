"""Export names, as a user types them after ``nbd-client -N`` or in an ``nbd://host/NAME`` URI.

- ``vol``                        the writable head of volume ``vol``
- ``vol;key=value;...``          the head, with attributes for the versions its FLUSHes commit
                                 (``consistency=frozen|crash|none``; other keys become labels)
- ``vol@12``                     version 12, read-only
- ``vol@latest``                 the newest committed version, read-only
- ``vol@2026-11-21T10:00:00Z``   the newest version committed at or before that instant
- ``vol@12;scratch``             version 12, writable, its writes kept only for the connection
- ``vol@12;digests``             the blake3 of each block of version 12 (nbdsink.contract)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from nbdsink.contract import DIGESTS_VIEW
from nbdsink.errors import NbdsinkError

CONSISTENCY_LEVELS = ("frozen", "crash", "none")
SCRATCH_VIEW = "scratch"
"""``VOL@N;scratch``: a writable view of version N whose writes live only for the connection."""
_ISO_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?"
    r"(Z|[+-]\d{2}:?\d{2})$"
)


class ExportNameError(NbdsinkError):
    """An export name that cannot be parsed."""


@dataclass(frozen=True)
class ExportName:
    """A parsed export name. ``kind`` is head, version, latest or time."""

    volume: str
    kind: str
    version: int = 0
    timestamp: float = 0.0
    attributes: dict[str, str] = field(default_factory=dict)
    view: str = "data"
    """``data``, or ``digests`` (see :mod:`nbdsink.contract`)."""

    @property
    def writable(self) -> bool:
        return self.kind == "head"


def parse_export_name(name: str) -> ExportName:
    """Parse an export name; raise ExportNameError with a message a user can act on."""
    if not name:
        raise ExportNameError(
            "no export name given: use VOLUME (writable head), VOLUME@N, VOLUME@latest "
            "or VOLUME@<ISO-8601 UTC time>"
        )
    view = "data"
    for flag in (DIGESTS_VIEW, SCRATCH_VIEW):
        if name.endswith(";" + flag):
            name, view = name[: -len(flag) - 1], flag
            break
    if "@" in name:
        volume, _, selector = name.partition("@")
        _check_volume(volume, name)
        if selector == "latest":
            return ExportName(volume, "latest", view=view)
        if selector.isascii() and selector.isdigit():
            # One spelling per version: no leading zeros (vol@01 is not vol@1).
            if selector.startswith("0"):
                raise ExportNameError(
                    f"export {name!r}: versions are numbered from 1, without leading zeros")
            return ExportName(volume, "version", version=int(selector), view=view)
        timestamp = parse_utc_time(selector)
        if timestamp is None:
            raise ExportNameError(
                f"export {name!r}: after '@' expected a version number, 'latest' or an "
                "ISO-8601 UTC time such as 2026-11-21T10:00:00Z"
            )
        return ExportName(volume, "time", timestamp=timestamp, view=view)
    if view == SCRATCH_VIEW:
        raise ExportNameError(f"export {name!r}: ;scratch goes after a version (VOL@N;scratch)")
    if view == DIGESTS_VIEW:
        volume = name
        _check_volume(volume, name)
        return ExportName(volume, "head", view=view)
    volume, *pairs = name.split(";")
    _check_volume(volume, name)
    attributes: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ExportNameError(f"export {name!r}: attribute {pair!r} is not key=value")
        if not (key + value).isprintable():
            raise ExportNameError(f"export {name!r}: attribute {key!r} holds control characters")
        if key in attributes:
            raise ExportNameError(f"export {name!r}: attribute {key!r} is given twice")
        attributes[key] = value
    consistency = attributes.get("consistency", "none")
    if consistency not in CONSISTENCY_LEVELS:
        raise ExportNameError(
            f"export {name!r}: consistency must be one of {', '.join(CONSISTENCY_LEVELS)}"
        )
    return ExportName(volume, "head", attributes=attributes)


def parse_utc_time(text: str) -> float | None:
    """Seconds since the epoch for an ISO-8601 time with a zone, or None if it is not one."""
    m = _ISO_RE.match(text)
    if not m:
        return None
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    try:
        dt = datetime(int(year), int(month), int(day), int(hour), int(minute),
                      int(second or 0), tzinfo=UTC)
    except ValueError:
        return None
    offset = 0
    if zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:])
        if hours > 14 or minutes > 59:
            return None  # no such zone
        offset = sign * (hours * 3600 + minutes * 60)
    frac = float("0." + fraction) if fraction else 0.0
    return dt.timestamp() + frac - offset


def _check_volume(volume: str, name: str) -> None:
    if not volume:
        raise ExportNameError(f"export {name!r}: no volume name before '@' or ';'")
