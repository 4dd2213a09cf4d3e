"""Retention policies: which versions of a volume a policy keeps.

Pure decision logic, no I/O: the caller lists a volume's versions as :class:`Candidate`
objects, and :func:`select` says, for each one, which rule keeps it (or that it may be pruned).

The rules are borg's ``prune`` rules (also those of Proxmox Backup Server), applied in this
order, each one seeing what the earlier ones kept:

1. protected versions (pinned, clone base, open reader ...);
2. ``keep_within``: every version at most that many seconds older than the newest one;
3. ``keep_last``: the N newest versions not kept yet;
4. ``keep_minutely``, ``keep_hourly``, ``keep_daily``, ``keep_weekly``, ``keep_monthly``,
   ``keep_yearly``: the newest version of each of the N most recent periods (UTC) whose
   newest version was not kept yet. A period whose newest version an earlier rule already
   kept is used up without counting towards N (borg's ``prune_split``);
5. the newest version, if nothing above kept it.

The newest version counts toward the rules like any other: ``keep_last 3`` keeps three
versions, the newest among them; ``keep_daily 7`` keeps the newest version of each of the
seven most recent days, the newest version's own day first. A protected version counts as
kept: its period is used up.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from nbdsink.store.errors import StoreError

# The fields of Policy that count versions, i.e. every rule except keep_within.
_COUNT_FIELDS = (
    "keep_last",
    "keep_minutely",
    "keep_hourly",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "keep_yearly",
)

# The order in which describe() lists the rules (keep_within next to keep_last, since both
# are about the most recent versions).
_DESCRIBE_ORDER = (
    "keep_last",
    "keep_within",
    "keep_minutely",
    "keep_hourly",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "keep_yearly",
)

# Reason given to every version when the policy has no rule at all.
NO_POLICY = "no policy"
# Reason given to the newest version when nothing protects it already.
NEWEST = "newest"


@dataclass(frozen=True)
class Policy:
    """A retention policy. Each field is a rule; ``None`` means the rule is not used.

    The count fields keep that many versions (see the module docstring for how they
    interact); ``keep_within`` is a duration in seconds. A count of 0 is a rule that keeps
    nothing, which is different from ``None``: a policy whose only rule is ``keep_last=0``
    prunes everything except protected versions and the newest one, whereas a policy with no
    rule at all keeps everything.
    """

    keep_last: int | None = None
    keep_minutely: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    keep_within: float | None = None

    def __post_init__(self) -> None:
        # Checked here rather than only in from_json so that a policy built from command-line
        # arguments cannot be negative either: a negative count would silently keep nothing.
        for name in _COUNT_FIELDS:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise StoreError(f"retention rule {name} must not be negative, got {value}")
        if self.keep_within is not None and not (
            math.isfinite(self.keep_within) and self.keep_within >= 0
        ):
            raise StoreError(
                f"retention rule keep_within must be a non-negative number of seconds, "
                f"got {self.keep_within}"
            )

    def is_empty(self) -> bool:
        """True when no rule is set. Such a policy keeps everything ("no policy")."""
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))

    def to_json(self) -> dict[str, int | float]:
        """The rules that are set, keyed by field name (``{"keep_last": 10, ...}``)."""
        out: dict[str, int | float] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Policy:
        """The policy that :meth:`to_json` returned ``data`` for.

        Raises :class:`StoreError` for an unknown key, a count that is not a non-negative
        integer, or a ``keep_within`` that is not a non-negative number. A ``null`` value
        means the rule is not used, as when the key is absent.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise StoreError(
                f"unknown retention rule(s): {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        counts: dict[str, int | None] = {}
        for name in _COUNT_FIELDS:
            value = data.get(name)
            # bool is a subclass of int: reject it explicitly, "keep_last": true is a mistake.
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise StoreError(f"retention rule {name} must be an integer, got {value!r}")
            counts[name] = value
        within = data.get("keep_within")
        if within is not None and (
            isinstance(within, bool) or not isinstance(within, int | float)
        ):
            raise StoreError(
                f"retention rule keep_within must be a number of seconds, got {within!r}"
            )
        return cls(
            keep_last=counts["keep_last"],
            keep_minutely=counts["keep_minutely"],
            keep_hourly=counts["keep_hourly"],
            keep_daily=counts["keep_daily"],
            keep_weekly=counts["keep_weekly"],
            keep_monthly=counts["keep_monthly"],
            keep_yearly=counts["keep_yearly"],
            keep_within=None if within is None else float(within),
        )

    def merged(self, override: Policy) -> Policy:
        """This policy with every rule that ``override`` sets replaced by override's value."""
        changes = {
            f.name: getattr(override, f.name)
            for f in dataclasses.fields(override)
            if getattr(override, f.name) is not None
        }
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """The rules for people: ``"keep-last 10, keep-within 2h, keep-daily 14"``."""
        parts = []
        for name in _DESCRIBE_ORDER:
            value = getattr(self, name)
            if value is None:
                continue
            shown = _format_duration(value) if name == "keep_within" else str(value)
            parts.append(f"{_rule_name(name)} {shown}")
        return ", ".join(parts) if parts else NO_POLICY


@dataclass(frozen=True)
class Candidate:
    """One version of a volume, as :func:`select` sees it.

    ``timestamp`` is in UTC epoch seconds. ``protected`` is the reason the version must be
    kept whatever the policy says ("pinned", "clone base", "open reader" ...), or None.
    """

    version: int
    timestamp: float
    protected: str | None = None

    def __post_init__(self) -> None:
        # select() reports reasons as str | None, and callers may well test them for truth:
        # an empty reason would read as "may be pruned".
        if self.protected == "":
            raise ValueError("a protection reason must not be empty (use None for none)")


def select(candidates: Sequence[Candidate], policy: Policy) -> dict[int, str | None]:
    """For every candidate's version, the rule that keeps it, or None when it may be pruned.

    A rule is reported as ``"keep-last"``, ``"keep-within"``, ``"keep-daily"`` ...; a
    protected version is reported with its protection reason, the newest version (when not
    protected, and when no rule keeps it) with ``"newest"``, and when ``policy`` is empty
    every unprotected version (the newest too) with ``"no policy"``. The result is ordered
    newest version first. The order of ``candidates`` does not matter; versions must be
    unique.
    """
    # Newest first; equal timestamps are broken by version so the result never depends on
    # the input's order.
    ordered = sorted(candidates, key=lambda c: (c.timestamp, c.version), reverse=True)
    if len({c.version for c in ordered}) != len(ordered):
        raise ValueError("select() needs distinct versions")
    if not ordered:
        return {}
    # reasons holds only the versions kept so far: "already kept by an earlier rule" is
    # simply "in reasons".
    reasons: dict[int, str] = {}

    for c in ordered:
        if c.protected is not None:
            reasons[c.version] = c.protected
    newest = ordered[0]

    if policy.is_empty():
        for c in ordered:
            reasons.setdefault(c.version, NO_POLICY)
    else:
        if policy.keep_within is not None:
            # Relative to the newest version, not to the current time: a volume whose sender
            # stopped a month ago must not lose its last days of history to the clock.
            oldest_kept = newest.timestamp - policy.keep_within
            for c in ordered:
                if c.timestamp >= oldest_kept:
                    reasons.setdefault(c.version, "keep-within")
        if policy.keep_last is not None:
            _keep_last(ordered, policy.keep_last, reasons)
        for name, period_of in _PERIOD_RULES:
            count = getattr(policy, name)
            if count is not None:
                _keep_per_period(ordered, count, _rule_name(name), period_of, reasons)
    # The newest version counts toward the rules like any other (keep-last 10 keeps ten
    # versions, the newest among them); it is kept in any case.
    reasons.setdefault(newest.version, NEWEST)

    return {c.version: reasons.get(c.version) for c in ordered}


def _keep_last(ordered: Sequence[Candidate], n: int, reasons: dict[int, str]) -> None:
    """Keep the ``n`` newest versions of ``ordered`` (newest first) not kept yet."""
    kept = 0
    for c in ordered:
        if kept >= n:
            break
        if c.version not in reasons:
            reasons[c.version] = "keep-last"
            kept += 1


def _keep_per_period(
    ordered: Sequence[Candidate],
    n: int,
    rule: str,
    period_of: Callable[[datetime], object],
    reasons: dict[int, str],
) -> None:
    """borg's prune_split: keep the newest version of up to ``n`` periods, newest first.

    Only the newest version of each period is looked at. If an earlier rule kept it, the
    period is used up without counting towards ``n``, so that e.g. ``keep_within 2d`` plus
    ``keep_daily 7`` reaches seven days beyond the two days keep_within covers.
    """
    kept = 0
    previous: object = None
    for c in ordered:
        if kept >= n:
            break
        period = period_of(datetime.fromtimestamp(c.timestamp, tz=UTC))
        if period == previous:
            continue  # not the newest version of its period
        previous = period
        if c.version not in reasons:
            reasons[c.version] = rule
            kept += 1


# The period rules in the order they are applied, each with the function giving a UTC
# time's period. Tuples compare equal exactly when the periods are the same.
_PERIOD_RULES: tuple[tuple[str, Callable[[datetime], object]], ...] = (
    ("keep_minutely", lambda t: (t.year, t.month, t.day, t.hour, t.minute)),
    ("keep_hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("keep_daily", lambda t: (t.year, t.month, t.day)),
    # ISO weeks: Monday to Sunday, and the days around New Year belong to the ISO year of
    # their week (2027-01-01 is in week 53 of 2026).
    ("keep_weekly", lambda t: tuple(t.isocalendar())[:2]),
    ("keep_monthly", lambda t: (t.year, t.month)),
    ("keep_yearly", lambda t: t.year),
)


def _rule_name(field_name: str) -> str:
    """The name users see for a Policy field: keep_daily -> keep-daily."""
    return field_name.replace("_", "-")


def _format_duration(seconds: float) -> str:
    """A duration in the largest unit that divides it exactly: 90s, 15m, 2h, 3d, 0.5s."""
    if seconds == int(seconds):
        whole = int(seconds)
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if whole and whole % size == 0:
                return f"{whole // size}{unit}"
        return f"{whole}s"
    # repr keeps every digit, where :g would round 1234567.5 to 1.23457e+06.
    return f"{seconds!r}s"
