"""The audit of what the bpf programs counted against the kernel's accounting (pure)."""

from __future__ import annotations

from nbdsink.tracker.iostat import audit


def test_nothing_missed() -> None:
    a = audit(kernel=100, done=100, issued=100, answered_done=0, answered_issued=0)
    assert a.unseen_done == 0 and not a.unseen_issued


def test_in_flight_makes_the_programs_look_ahead_never_behind() -> None:
    # Counted by the programs, not yet accounted by the kernel: no alarm.
    a = audit(kernel=100, done=116, issued=140, answered_done=0, answered_issued=0)
    assert a.unseen_done == 0
    assert (a.answered_done, a.answered_issued) == (0, 0)


def test_a_missed_completion_is_found_once() -> None:
    a = audit(kernel=132, done=116, issued=132, answered_done=0, answered_issued=0)
    assert a.unseen_done == 16 and not a.unseen_issued
    again = audit(kernel=148, done=132, issued=148, answered_done=a.answered_done,
                  answered_issued=a.answered_issued)
    assert again.unseen_done == 0  # the same shortfall, already answered
    more = audit(kernel=200, done=176, issued=200, answered_done=again.answered_done,
                 answered_issued=again.answered_issued)
    assert more.unseen_done == 8


def test_missed_at_issue_too() -> None:
    a = audit(kernel=132, done=116, issued=116, answered_done=0, answered_issued=0)
    assert a.unseen_done == 16 and a.unseen_issued


def test_a_shortfall_hidden_by_a_request_in_flight_shows_next_time() -> None:
    # 16 sectors missed while another 16 were counted but not yet accounted.
    a = audit(kernel=116, done=116, issued=148, answered_done=0, answered_issued=0)
    assert a.unseen_done == 0
    b = audit(kernel=132, done=116, issued=148, answered_done=a.answered_done,
              answered_issued=a.answered_issued)
    assert b.unseen_done == 16
