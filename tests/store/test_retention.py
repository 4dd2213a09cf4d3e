"""Retention policy selection: borg's prune rules, with protections and the newest version."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdsink.store.errors import StoreError
from nbdsink.store.retention import Candidate, Policy, select

HOUR = 3600.0
DAY = 86400.0


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    """UTC epoch seconds for that UTC date and time."""
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


def versions(*stamps: float) -> list[Candidate]:
    """Candidates numbered 1, 2, ... in the order given (callers give oldest first)."""
    return [Candidate(i, t) for i, t in enumerate(stamps, start=1)]


def kept(result: dict[int, str | None]) -> dict[int, str]:
    """Only the kept versions and their reasons."""
    return {v: r for v, r in result.items() if r is not None}


# --- keep_last, keep_within ------------------------------------------------------------


def test_keep_last_keeps_n_versions_the_newest_among_them() -> None:
    cands = versions(*(ts(2026, 3, 1, h) for h in range(6)))
    # The newest version counts towards keep-last: two versions in all, not the newest + two.
    assert select(cands, Policy(keep_last=2)) == {
        6: "keep-last", 5: "keep-last", 4: None, 3: None, 2: None, 1: None
    }
    assert select(cands, Policy(keep_last=1)) == {
        6: "keep-last", 5: None, 4: None, 3: None, 2: None, 1: None
    }


def test_keep_last_ten_keeps_exactly_ten() -> None:
    cands = versions(*(ts(2026, 3, 1, h) for h in range(15)))
    assert kept(select(cands, Policy(keep_last=10))) == {v: "keep-last" for v in range(6, 16)}


def test_keep_last_zero_keeps_only_the_newest() -> None:
    cands = versions(*(ts(2026, 3, 1, h) for h in range(4)))
    # No rule keeps anything, so the newest version is kept afterwards, as "newest".
    assert select(cands, Policy(keep_last=0)) == {4: "newest", 3: None, 2: None, 1: None}


def test_keep_last_larger_than_history_keeps_everything() -> None:
    cands = versions(ts(2026, 3, 1), ts(2026, 3, 2))
    assert select(cands, Policy(keep_last=10)) == {2: "keep-last", 1: "keep-last"}


def test_keep_within_is_relative_to_the_newest_version_not_now() -> None:
    # Years in the past: measured against the clock, keep_within would keep nothing.
    cands = versions(*(ts(2020, 5, d, 12) for d in range(1, 11)))
    result = select(cands, Policy(keep_within=3 * DAY))
    # 2020-05-07 12:00 is exactly three days before the newest: the bound is inclusive. The
    # newest version itself is within the window, so keep-within keeps it too.
    assert kept(result) == {
        10: "keep-within", 9: "keep-within", 8: "keep-within", 7: "keep-within"
    }


def test_keep_within_zero_keeps_versions_sharing_the_newest_timestamp() -> None:
    t = ts(2026, 3, 1)
    cands = [Candidate(1, t - 1), Candidate(2, t), Candidate(3, t)]
    assert select(cands, Policy(keep_within=0)) == {3: "keep-within", 2: "keep-within", 1: None}


# --- period rules ----------------------------------------------------------------------


def test_hourly_keeps_the_newest_version_of_each_hour_up_to_n() -> None:
    times = [(10, 5), (10, 20), (10, 50), (11, 10), (11, 40), (12, 30), (13, 0), (13, 15), (13, 59)]
    cands = versions(*(ts(2026, 3, 1, h, m) for h, m in times))
    # v9 (13:59) is the newest: hour 13 is the first of the N hours.
    assert kept(select(cands, Policy(keep_hourly=3))) == {
        9: "keep-hourly",  # 13:59
        6: "keep-hourly",  # 12:30
        5: "keep-hourly",  # 11:40
    }
    assert kept(select(cands, Policy(keep_hourly=4))) == {
        9: "keep-hourly", 6: "keep-hourly", 5: "keep-hourly", 3: "keep-hourly"
    }
    assert kept(select(cands, Policy(keep_hourly=1))) == {9: "keep-hourly"}


def test_minutely() -> None:
    cands = versions(ts(2026, 3, 1, 0, 0, 10), ts(2026, 3, 1, 0, 0, 50), ts(2026, 3, 1, 0, 1, 5),
                     ts(2026, 3, 1, 0, 2, 0), ts(2026, 3, 1, 0, 2, 30))
    assert kept(select(cands, Policy(keep_minutely=5))) == {
        5: "keep-minutely", 3: "keep-minutely", 2: "keep-minutely"
    }
    assert kept(select(cands, Policy(keep_minutely=2))) == {
        5: "keep-minutely", 3: "keep-minutely"
    }


def test_daily_keeps_the_newest_version_of_each_utc_day() -> None:
    cands = versions(
        ts(2026, 3, 1, 8), ts(2026, 3, 1, 23, 59, 59),  # 1, 2
        ts(2026, 3, 2, 0), ts(2026, 3, 2, 12),           # 3, 4
        ts(2026, 3, 4, 6),                               # 5 (no version on the 3rd)
        ts(2026, 3, 5, 1), ts(2026, 3, 5, 2),            # 6, 7
    )
    # The newest version's day (the 5th) is the first of the N days.
    assert kept(select(cands, Policy(keep_daily=2))) == {7: "keep-daily", 5: "keep-daily"}
    assert kept(select(cands, Policy(keep_daily=30))) == {
        7: "keep-daily", 5: "keep-daily", 4: "keep-daily", 2: "keep-daily"
    }


def test_keep_daily_seven_keeps_seven_days_the_newest_ones_among_them() -> None:
    # Three versions a day (04:00, 12:00, 20:00) for ten days; v30 (day 10, 20:00) is newest.
    cands = versions(*(ts(2026, 3, d, h) for d in range(1, 11) for h in (4, 12, 20)))
    # The newest version of each of days 10 down to 4: v30, v27, ..., v12.
    assert kept(select(cands, Policy(keep_daily=7))) == {
        3 * d: "keep-daily" for d in range(4, 11)
    }


def test_periods_are_utc() -> None:
    plus2 = timezone(timedelta(hours=2))
    # 01:00 on the 1st of March at UTC+2 is 23:00 on the 28th of February in UTC.
    late_feb = datetime(2026, 3, 1, 1, tzinfo=plus2).timestamp()
    cands = versions(ts(2026, 2, 28, 22), late_feb, ts(2026, 3, 1, 0, 30), ts(2026, 3, 1, 5))
    assert kept(select(cands, Policy(keep_daily=5))) == {4: "keep-daily", 2: "keep-daily"}
    assert kept(select(cands, Policy(keep_monthly=5))) == {4: "keep-monthly", 2: "keep-monthly"}


def test_weekly_uses_iso_weeks_across_new_year() -> None:
    cands = versions(
        ts(2026, 12, 27, 12),  # 1: Sunday, ISO 2026-W52
        ts(2026, 12, 28, 12),  # 2: Monday, ISO 2026-W53
        ts(2026, 12, 31, 12),  # 3: Thursday, 2026-W53
        ts(2027, 1, 1, 12),    # 4: Friday, still 2026-W53
        ts(2027, 1, 3, 12),    # 5: Sunday, 2026-W53 (newest of that week)
        ts(2027, 1, 4, 12),    # 6: Monday, ISO 2027-W01
        ts(2027, 1, 5, 12),    # 7: newest, 2027-W01
    )
    # A week by calendar year would split 2026-12-31 from 2027-01-01 and keep v3.
    assert kept(select(cands, Policy(keep_weekly=5))) == {
        7: "keep-weekly", 5: "keep-weekly", 1: "keep-weekly"
    }
    assert kept(select(cands, Policy(keep_weekly=2))) == {7: "keep-weekly", 5: "keep-weekly"}
    assert kept(select(cands, Policy(keep_weekly=1))) == {7: "keep-weekly"}


def test_monthly_and_yearly() -> None:
    cands = versions(
        ts(2024, 6, 1),                 # 1
        ts(2024, 12, 31, 23, 59, 59),   # 2
        ts(2025, 1, 1),                 # 3
        ts(2025, 1, 31, 23, 59, 59),    # 4
        ts(2025, 2, 1),                 # 5
        ts(2025, 2, 15),                # 6
        ts(2026, 3, 1),                 # 7: newest
    )
    assert kept(select(cands, Policy(keep_monthly=3))) == {
        7: "keep-monthly", 6: "keep-monthly", 4: "keep-monthly"
    }
    assert kept(select(cands, Policy(keep_monthly=4))) == {
        7: "keep-monthly", 6: "keep-monthly", 4: "keep-monthly", 2: "keep-monthly"
    }
    assert kept(select(cands, Policy(keep_yearly=10))) == {
        7: "keep-yearly", 6: "keep-yearly", 2: "keep-yearly"
    }
    assert kept(select(cands, Policy(keep_yearly=2))) == {7: "keep-yearly", 6: "keep-yearly"}


@pytest.mark.parametrize(
    "policy",
    [
        Policy(keep_daily=0),
        Policy(keep_last=0, keep_hourly=0),
        Policy(keep_minutely=0, keep_hourly=0, keep_daily=0, keep_weekly=0, keep_monthly=0,
               keep_yearly=0),
    ],
)
def test_rules_that_keep_nothing_still_keep_the_newest(policy: Policy) -> None:
    cands = versions(ts(2026, 1, 1), ts(2026, 2, 1), ts(2026, 3, 1))
    assert select(cands, policy) == {3: "newest", 2: None, 1: None}


# --- combining rules -------------------------------------------------------------------


def test_period_already_kept_by_keep_within_does_not_count() -> None:
    # Two versions a day (06:00, 18:00) for six days; v12 (day 6, 18:00) is the newest.
    cands = versions(*(ts(2026, 3, d, h) for d in range(1, 7) for h in (6, 18)))
    result = select(cands, Policy(keep_within=DAY, keep_daily=3))
    assert kept(result) == {
        12: "keep-within",  # day 6, 18:00: the newest; day 6 is used up
        11: "keep-within",  # day 6, 06:00
        10: "keep-within",  # day 5, 18:00: exactly one day older; day 5 is used up
        8: "keep-daily",    # day 4
        6: "keep-daily",    # day 3
        4: "keep-daily",    # day 2
    }


def test_keep_last_then_hourly() -> None:
    cands = versions(*(ts(2026, 3, 1, h, m) for h in range(8, 12) for m in (0, 30)))
    # v8 = 11:30 is the newest; keep-last takes 11:30, 11:00 and 10:30, which uses up hours
    # 11 and 10: keep-hourly keeps the newest versions of hours 9 and 8.
    assert kept(select(cands, Policy(keep_last=3, keep_hourly=2))) == {
        8: "keep-last", 7: "keep-last", 6: "keep-last", 4: "keep-hourly", 2: "keep-hourly"
    }
    # keep-last 2 takes 11:30 and 11:00 only: hour 10's newest version (10:30) is not kept.
    assert kept(select(cands, Policy(keep_last=2, keep_hourly=2))) == {
        8: "keep-last", 7: "keep-last", 6: "keep-hourly", 4: "keep-hourly"
    }


def test_earlier_period_rule_uses_up_later_ones() -> None:
    cands = versions(ts(2026, 1, 10), ts(2026, 2, 10), ts(2026, 3, 9), ts(2026, 3, 10))
    # keep-daily keeps v4 (the newest of March 10, and so of March): keep-monthly skips March
    # and keeps February's v2.
    assert kept(select(cands, Policy(keep_daily=1, keep_monthly=1))) == {
        4: "keep-daily", 2: "keep-monthly"
    }
    assert kept(select(cands, Policy(keep_daily=2, keep_monthly=2))) == {
        4: "keep-daily", 3: "keep-daily", 2: "keep-monthly", 1: "keep-monthly"
    }


# --- protections -----------------------------------------------------------------------


def test_protected_versions_are_kept_and_count_as_kept() -> None:
    cands = [
        Candidate(1, ts(2026, 3, 1, 12), protected="clone base"),
        Candidate(2, ts(2026, 3, 2, 12)),
        Candidate(3, ts(2026, 3, 3, 12), protected="pinned"),
        Candidate(4, ts(2026, 3, 4, 12)),
        Candidate(5, ts(2026, 3, 5, 12)),
        Candidate(6, ts(2026, 3, 6, 12)),
    ]
    assert kept(select(cands, Policy(keep_daily=3))) == {
        6: "keep-daily", 5: "keep-daily", 4: "keep-daily", 3: "pinned", 1: "clone base",
    }
    # Day 3 (pinned) is used up without counting, so the fourth day kept is day 2.
    assert kept(select(cands, Policy(keep_daily=4))) == {
        6: "keep-daily", 5: "keep-daily", 4: "keep-daily", 3: "pinned", 2: "keep-daily",
        1: "clone base",
    }
    # keep_last skips protected versions: its four are v6, v5, v4 and v2.
    assert kept(select(cands, Policy(keep_last=4))) == {
        6: "keep-last", 5: "keep-last", 4: "keep-last", 3: "pinned", 2: "keep-last",
        1: "clone base",
    }
    assert kept(select(cands, Policy(keep_last=2))) == {
        6: "keep-last", 5: "keep-last", 3: "pinned", 1: "clone base"
    }


def test_protected_version_that_is_not_its_periods_newest_does_not_use_it_up() -> None:
    cands = [
        Candidate(1, ts(2026, 3, 1, 12)),
        Candidate(2, ts(2026, 3, 2, 6), protected="pinned"),
        Candidate(3, ts(2026, 3, 2, 18)),
        Candidate(4, ts(2026, 3, 3, 12)),
    ]
    # Day 2's newest version is v3, which is not kept yet: day 2 counts, and day 1 is not
    # reached.
    assert kept(select(cands, Policy(keep_daily=2))) == {
        4: "keep-daily", 3: "keep-daily", 2: "pinned"
    }


def test_protected_newest_keeps_its_own_reason() -> None:
    cands = [Candidate(1, ts(2026, 3, 1)), Candidate(2, ts(2026, 3, 2), protected="open reader")]
    assert select(cands, Policy(keep_last=0)) == {2: "open reader", 1: None}


def test_protected_newest_counts_as_kept_for_the_rules() -> None:
    cands = versions(ts(2026, 3, 1), ts(2026, 3, 2), ts(2026, 3, 3), ts(2026, 3, 4))
    cands[3] = Candidate(4, cands[3].timestamp, protected="open reader")
    # Protected first, so keep-last 2 keeps the two newest of the others.
    assert select(cands, Policy(keep_last=2)) == {
        4: "open reader", 3: "keep-last", 2: "keep-last", 1: None
    }
    # Day 4 is used up by the protection: keep-daily 2 keeps days 3 and 2.
    assert select(cands, Policy(keep_daily=2)) == {
        4: "open reader", 3: "keep-daily", 2: "keep-daily", 1: None
    }
    assert select(cands, Policy(keep_within=DAY)) == {
        4: "open reader", 3: "keep-within", 2: None, 1: None
    }


# --- empty policy, input order, edge cases ---------------------------------------------


def test_empty_policy_keeps_everything() -> None:
    cands = versions(ts(2026, 1, 1), ts(2026, 1, 2), ts(2026, 1, 3))
    cands[0] = Candidate(1, cands[0].timestamp, protected="pinned")
    # The newest version is kept for "no policy" like the others, not as "newest".
    assert select(cands, Policy()) == {3: "no policy", 2: "no policy", 1: "pinned"}
    cands[2] = Candidate(3, cands[2].timestamp, protected="clone base")
    assert select(cands, Policy()) == {3: "clone base", 2: "no policy", 1: "pinned"}


def test_no_candidates() -> None:
    assert select([], Policy(keep_last=3)) == {}
    assert select([], Policy()) == {}


def test_single_version() -> None:
    only = [Candidate(7, ts(2026, 3, 1))]
    assert select(only, Policy(keep_last=1)) == {7: "keep-last"}
    assert select(only, Policy(keep_daily=3)) == {7: "keep-daily"}
    assert select(only, Policy(keep_last=0)) == {7: "newest"}
    assert select(only, Policy()) == {7: "no policy"}


def test_unsorted_input_gives_the_same_result() -> None:
    cands = versions(*(ts(2026, 3, 1 + i // 5, 3 * (i % 5)) for i in range(25)))
    policy = Policy(keep_last=3, keep_hourly=4, keep_daily=2)
    expected = select(cands, policy)
    # v25..v23 by keep-last (which uses up their hours and day 5), then the four hours
    # before them (v22 and v21 on day 5, v20 and v19 on day 4, which uses day 4 up), then
    # days 3 and 2.
    assert kept(expected) == {
        25: "keep-last", 24: "keep-last", 23: "keep-last",
        22: "keep-hourly", 21: "keep-hourly", 20: "keep-hourly", 19: "keep-hourly",
        15: "keep-daily", 10: "keep-daily",
    }
    shuffled = list(cands)
    random.Random(7).shuffle(shuffled)
    assert select(shuffled, policy) == expected
    assert list(expected) == sorted(expected, reverse=True)  # newest first


def test_equal_timestamps_are_ordered_by_version() -> None:
    t = ts(2026, 3, 1)
    cands = [Candidate(9, t), Candidate(3, t), Candidate(5, t)]
    assert select(cands, Policy(keep_last=1)) == {9: "keep-last", 5: None, 3: None}
    assert select(cands, Policy(keep_last=2)) == {9: "keep-last", 5: "keep-last", 3: None}
    assert select(cands, Policy(keep_last=0)) == {9: "newest", 5: None, 3: None}


def test_duplicate_versions_are_refused() -> None:
    with pytest.raises(ValueError):
        select([Candidate(1, 0.0), Candidate(1, 1.0)], Policy())


def test_empty_protection_reason_is_refused() -> None:
    with pytest.raises(ValueError):
        Candidate(1, 0.0, protected="")


# --- Policy ----------------------------------------------------------------------------


def test_policy_json_round_trip() -> None:
    policy = Policy(keep_last=10, keep_daily=14, keep_within=7200.0)
    data = policy.to_json()
    assert data == {"keep_last": 10, "keep_daily": 14, "keep_within": 7200.0}
    assert Policy.from_json(dict(data)) == policy
    assert Policy().to_json() == {}
    assert Policy.from_json({}) == Policy()
    full = Policy(1, 2, 3, 4, 5, 6, 7, 8.5)
    assert Policy.from_json(dict(full.to_json())) == full


def test_policy_from_json_accepts_null_and_integer_durations() -> None:
    policy = Policy.from_json({"keep_last": None, "keep_within": 60})
    assert policy == Policy(keep_within=60.0)
    assert isinstance(policy.keep_within, float)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"keep_forever": 1}, "unknown"),
        ({"keep-last": 1}, "unknown"),
        ({"keep_last": -1}, "negative"),
        ({"keep_daily": 1.5}, "integer"),
        ({"keep_daily": 2.0}, "integer"),
        ({"keep_hourly": "3"}, "integer"),
        ({"keep_last": True}, "integer"),
        ({"keep_within": -5}, "non-negative"),
        ({"keep_within": "2h"}, "seconds"),
        ({"keep_within": False}, "seconds"),
        ({"keep_within": float("inf")}, "non-negative"),
        ({"keep_within": float("nan")}, "non-negative"),
    ],
)
def test_policy_from_json_rejects_bad_input(data: dict[str, object], message: str) -> None:
    with pytest.raises(StoreError, match=message):
        Policy.from_json(data)


def test_policy_constructor_rejects_negative_counts() -> None:
    with pytest.raises(StoreError):
        Policy(keep_weekly=-2)


def test_policy_is_empty() -> None:
    assert Policy().is_empty()
    assert not Policy(keep_last=0).is_empty()
    assert not Policy(keep_within=0.0).is_empty()


def test_policy_merged() -> None:
    base = Policy(keep_last=10, keep_daily=7, keep_within=3600.0)
    override = Policy(keep_daily=30, keep_monthly=12)
    assert base.merged(override) == Policy(
        keep_last=10, keep_daily=30, keep_monthly=12, keep_within=3600.0
    )
    assert base.merged(Policy()) == base
    assert Policy().merged(base) == base
    assert base.merged(Policy(keep_last=0)).keep_last == 0  # 0 is a value, not "unset"


def test_policy_describe() -> None:
    assert Policy(keep_last=10, keep_within=7200, keep_daily=14).describe() == (
        "keep-last 10, keep-within 2h, keep-daily 14"
    )
    assert Policy(keep_within=90).describe() == "keep-within 90s"
    assert Policy(keep_within=900).describe() == "keep-within 15m"
    assert Policy(keep_within=3 * DAY).describe() == "keep-within 3d"
    assert Policy(keep_within=36 * HOUR).describe() == "keep-within 36h"
    assert Policy(keep_within=0).describe() == "keep-within 0s"
    assert Policy(keep_within=0.5).describe() == "keep-within 0.5s"
    assert Policy(keep_hourly=24, keep_yearly=5, keep_weekly=4).describe() == (
        "keep-hourly 24, keep-weekly 4, keep-yearly 5"
    )
    assert Policy().describe() == "no policy"


# --- properties ------------------------------------------------------------------------

T0 = int(ts(2024, 1, 1))
PERIOD_RULES = ("minutely", "hourly", "daily", "weekly", "monthly", "yearly")


@st.composite
def candidate_lists(draw: st.DrawFn) -> list[Candidate]:
    numbers = draw(st.lists(st.integers(0, 10_000), unique=True, max_size=40))
    # Mostly close together (many shared minutes, hours, days), sometimes years apart.
    span = draw(st.sampled_from([120, 3 * 3600, 10 * 86400, 3 * 366 * 86400]))
    return [
        Candidate(
            n,
            float(T0 + draw(st.integers(0, span))),
            draw(st.sampled_from([None, None, None, None, "pinned", "clone base"])),
        )
        for n in numbers
    ]


counts = st.none() | st.integers(0, 12)
policies = st.builds(
    Policy,
    keep_last=counts,
    keep_minutely=counts,
    keep_hourly=counts,
    keep_daily=counts,
    keep_weekly=counts,
    keep_monthly=counts,
    keep_yearly=counts,
    keep_within=st.none() | st.floats(0, 400 * 86400),
)


def newest_first(cands: list[Candidate]) -> list[Candidate]:
    return sorted(cands, key=lambda c: (c.timestamp, c.version), reverse=True)


def protections(cands: list[Candidate]) -> dict[int, str]:
    """The protected versions, with their protection reasons."""
    return {c.version: c.protected for c in cands if c.protected is not None}


def with_newest(expected: dict[int, str], cands: list[Candidate]) -> dict[int, str]:
    """``expected`` plus the newest version as "newest" when nothing else keeps it."""
    if cands:
        expected.setdefault(newest_first(cands)[0].version, "newest")
    return expected


def unprotected_newest_reason(policy: Policy) -> str:
    """The reason an unprotected newest version gets: the first rule that runs with N >= 1
    (keep-within always keeps it), "newest" when none does, "no policy" without rules."""
    if policy.is_empty():
        return "no policy"
    if policy.keep_within is not None:
        return "keep-within"
    for name in ("last", *PERIOD_RULES):
        if getattr(policy, f"keep_{name}"):
            return f"keep-{name}"
    return "newest"


PERIOD_OF: dict[str, Callable[[datetime], object]] = {
    "minutely": lambda t: (t.year, t.month, t.day, t.hour, t.minute),
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: t.date(),
    "weekly": lambda t: t.isocalendar()[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: t.year,
}


@given(candidate_lists(), policies)
def test_property_protected_and_newest_kept_and_only_candidates(
    cands: list[Candidate], policy: Policy
) -> None:
    result = select(cands, policy)
    # (c) exactly the candidates' versions, nothing else.
    assert set(result) == {c.version for c in cands}
    # (a) every protected version is kept, with its own reason.
    for c in cands:
        if c.protected is not None:
            assert result[c.version] == c.protected
    # (b) the newest version is always kept: by its protection, else by the first rule that
    # keeps anything (it counts towards that rule), else as "newest" after all rules ran.
    # "newest" is never any other version's reason.
    if cands:
        newest = newest_first(cands)[0]
        assert result[newest.version] == (newest.protected or unprotected_newest_reason(policy))
        assert all(r != "newest" for v, r in result.items() if v != newest.version)
    # (d) no counting rule keeps more than its N versions.
    for name in ("last", *PERIOD_RULES):
        count = getattr(policy, f"keep_{name}")
        if count is not None:
            assert sum(r == f"keep-{name}" for r in result.values()) <= count
    # (e) an empty policy keeps everything, each unprotected version for "no policy".
    if policy.is_empty():
        assert result == {c.version: c.protected or "no policy" for c in cands}
    else:
        assert "no policy" not in result.values()


@given(candidate_lists(), st.integers(0, 50))
def test_property_keep_last_alone(cands: list[Candidate], n: int) -> None:
    result = select(cands, Policy(keep_last=n))
    # The protected versions are kept first; keep-last keeps the n newest of the others
    # (the newest version among them when it is not protected); the newest version is kept
    # as "newest" only when neither keeps it (n == 0).
    others = [c.version for c in newest_first(cands) if c.protected is None]
    expected = protections(cands) | {v: "keep-last" for v in others[:n]}
    assert kept(result) == with_newest(expected, cands)
    assert sum(r == "keep-last" for r in result.values()) == min(n, len(others))
    if cands and n == 0 and newest_first(cands)[0].protected is None:
        assert "newest" in result.values()
    else:
        assert "newest" not in result.values()


@given(candidate_lists(), st.floats(0, 400 * 86400))
def test_property_keep_within_alone(cands: list[Candidate], within: float) -> None:
    result = select(cands, Policy(keep_within=within))
    # Every unprotected version at most `within` older than the newest one, the newest
    # version included (so it never needs "newest"), besides the protected ones.
    expected = protections(cands)
    if cands:
        oldest = newest_first(cands)[0].timestamp - within
        for c in cands:
            if c.protected is None and c.timestamp >= oldest:
                expected[c.version] = "keep-within"
    assert kept(result) == expected


@given(candidate_lists(), st.sampled_from(PERIOD_RULES), st.integers(0, 12))
def test_property_period_rule_keeps_newest_of_period_up_to_n(
    cands: list[Candidate], rule: str, n: int
) -> None:
    result = select(cands, Policy(**{f"keep_{rule}": n}))

    def period(c: Candidate) -> object:
        return PERIOD_OF[rule](datetime.fromtimestamp(c.timestamp, tz=UTC))

    # The newest version of each period, newest period first; the newest version's period
    # is the first one.
    heads: list[Candidate] = []
    for c in newest_first(cands):
        if not heads or period(heads[-1]) != period(c):
            heads.append(c)
    # A period whose newest version is protected is used up without counting; the rule
    # keeps the newest versions of the n newest other periods.
    unprotected_heads = [c.version for c in heads if c.protected is None]
    expected = protections(cands) | {v: f"keep-{rule}" for v in unprotected_heads[:n]}
    assert kept(result) == with_newest(expected, cands)
    # Each version the rule keeps is the newest of its period, and there are at most n.
    by_rule = [c for c in newest_first(cands) if result[c.version] == f"keep-{rule}"]
    assert len(by_rule) == min(n, len(unprotected_heads))
    for c in by_rule:
        assert newest_first([d for d in cands if period(d) == period(c)])[0] == c
    # With n at least the number of periods, every period's newest version is kept.
    if n >= len(heads):
        for c in heads:
            assert result[c.version]


@given(candidate_lists(), policies, st.randoms(use_true_random=False))
def test_property_input_order_does_not_matter(
    cands: list[Candidate], policy: Policy, rnd: random.Random
) -> None:
    shuffled = list(cands)
    rnd.shuffle(shuffled)
    assert select(shuffled, policy) == select(cands, policy)
