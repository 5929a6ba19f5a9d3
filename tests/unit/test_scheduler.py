"""The scheduler as a pure function: which passes start now, in what order, within max-tasks; when to wake."""

from datetime import datetime, timedelta, timezone

import pytest

from mxsync.lifecycle import Entry, EpnFacts, LastPass, Outcome, PassKind, State, Timing, VisitTimes, assess
from mxsync.scheduler import DuePass, Wake, WakeReason, schedule

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)


def entry(epn, state, kind=PassKind.NONE, due=None, next_start=None, deadline=None):
    return Entry(epn, state, kind, due, next_start, deadline)


def live(epn, due):
    return entry(epn, State.COLLECTING, PassKind.LIVE, due, deadline=NOW + 10 * HOUR)


def final(epn, due, state=State.FINAL, deadline=None):
    return entry(epn, state, PassKind.FINAL, due, deadline=deadline or due)


MIXED = [
    live("live-5-late", NOW - 5 * MINUTE),
    final("final-1-late", NOW - MINUTE),
    live("live-30-late", NOW - 30 * MINUTE),
    live("live-not-yet", NOW + 3 * MINUTE),
    final("final-retry-2-h-late", NOW - 2 * HOUR, state=State.FAILED, deadline=NOW - 3 * HOUR),
    live("live-due-now", NOW),
    entry("recorded", State.RECORDED),
    entry("verified", State.VERIFIED),
]


@pytest.mark.parametrize(
    "max_tasks, running, started, deferred",
    [
        (
            64,
            (),
            ["final-retry-2-h-late", "final-1-late", "live-30-late", "live-5-late", "live-due-now"],
            [],
        ),
        (1, (), ["final-retry-2-h-late"], ["final-1-late", "live-30-late", "live-5-late", "live-due-now"]),
        (3, (), ["final-retry-2-h-late", "final-1-late", "live-30-late"], ["live-5-late", "live-due-now"]),
        # A running pass holds its slot, and its EPN is not started twice.
        (3, ("final-1-late", "other"), ["final-retry-2-h-late"], ["live-30-late", "live-5-late", "live-due-now"]),
        (
            2,
            ("a", "b", "c"),
            [],
            ["final-retry-2-h-late", "final-1-late", "live-30-late", "live-5-late", "live-due-now"],
        ),
    ],
    ids=["all fit", "one slot", "three slots", "two slots taken", "more running than slots"],
)
def test_final_passes_first_then_live_passes_most_overdue_first_within_max_tasks(max_tasks, running, started, deferred):
    plan = schedule(MIXED, NOW, 1, max_tasks, last_poll=NOW, running=running)
    assert [item.epn for item in plan.passes] == started
    assert [item.epn for item in plan.deferred] == deferred


def test_due_passes_carry_their_kind_and_due_time():
    plan = schedule(MIXED, NOW, 1, 2, last_poll=NOW)
    assert plan.passes == (
        DuePass("final-retry-2-h-late", PassKind.FINAL, NOW - 2 * HOUR),
        DuePass("final-1-late", PassKind.FINAL, NOW - MINUTE),
    )


def test_equal_due_times_are_taken_in_epn_order():
    entries = [live("b", NOW - MINUTE), live("a", NOW - MINUTE), final("d", NOW), final("c", NOW)]
    assert [item.epn for item in schedule(entries, NOW, 1, 4, last_poll=NOW).passes] == ["c", "d", "a", "b"]


def test_verified_epns_are_listed_to_be_recorded_and_nothing_else_is_scheduled_for_them():
    plan = schedule(MIXED, NOW, 1, 64, last_poll=NOW)
    assert plan.to_record == ("verified",)
    assert "verified" not in [item.epn for item in plan.passes + plan.deferred]


# (id, entries, last_poll, expected wake, poll due)
WAKE_CASES = [
    (
        "a booked visit's start is the earliest event",
        [
            entry(
                "booked",
                State.BOOKED,
                PassKind.FINAL,
                NOW + 20 * HOUR,
                next_start=NOW + 5 * MINUTE,
                deadline=NOW + 20 * HOUR,
            ),
            live("live", NOW + 8 * MINUTE),
            final("settling", NOW + 9 * MINUTE, state=State.SETTLING),
        ],
        NOW,
        Wake(NOW + 5 * MINUTE, WakeReason.VISIT_START, "booked"),
        False,
    ),
    (
        "a live pass",
        [live("live", NOW + 8 * MINUTE), final("settling", NOW + 9 * MINUTE, state=State.SETTLING)],
        NOW,
        Wake(NOW + 8 * MINUTE, WakeReason.LIVE_PASS, "live"),
        False,
    ),
    (
        "a settle deadline",
        [live("live", NOW + 10 * MINUTE), final("settling", NOW + 9 * MINUTE, state=State.SETTLING)],
        NOW,
        Wake(NOW + 9 * MINUTE, WakeReason.SETTLE_DEADLINE, "settling"),
        False,
    ),
    (
        "a failed final pass's retry",
        [final("failed", NOW + 15 * MINUTE, state=State.FAILED, deadline=NOW - HOUR)],
        NOW,
        Wake(NOW + 15 * MINUTE, WakeReason.FINAL_PASS, "failed"),
        False,
    ),
    (
        "the portal poll",
        [live("live", NOW + 2 * HOUR)],
        NOW - 30 * MINUTE,
        Wake(NOW + 30 * MINUTE, WakeReason.PORTAL_POLL),
        False,
    ),
    (
        "a due poll is made now: the next is a full period away",
        [live("live", NOW + 2 * HOUR)],
        NOW - HOUR,
        Wake(NOW + HOUR, WakeReason.PORTAL_POLL),
        True,
    ),
    ("never polled", [], None, Wake(NOW + HOUR, WakeReason.PORTAL_POLL), True),
    (
        "passes due now, finished EPNs and running ones are not wake events",
        [
            entry("due-now", State.COLLECTING, PassKind.LIVE, NOW, next_start=NOW, deadline=NOW + HOUR),
            entry("recorded", State.RECORDED, next_start=NOW + MINUTE),
            entry("verified", State.VERIFIED, deadline=NOW + MINUTE),
            live("running", NOW + MINUTE),
        ],
        NOW,
        Wake(NOW + HOUR, WakeReason.PORTAL_POLL),
        False,
    ),
    (
        "at the same time, a visit start is named before a live pass",
        [
            live("a-live", NOW + 5 * MINUTE),
            entry(
                "b-booked",
                State.BOOKED,
                PassKind.LIVE,
                NOW + 5 * MINUTE,
                next_start=NOW + 5 * MINUTE,
                deadline=NOW + 9 * HOUR,
            ),
        ],
        NOW,
        Wake(NOW + 5 * MINUTE, WakeReason.VISIT_START, "b-booked"),
        False,
    ),
]


@pytest.mark.parametrize(
    "entries, last_poll, wake, poll_due", [case[1:] for case in WAKE_CASES], ids=[case[0] for case in WAKE_CASES]
)
def test_next_wake_is_the_earliest_event(entries, last_poll, wake, poll_due):
    plan = schedule(entries, NOW, 1, 4, last_poll=last_poll, running=("running",))
    assert (plan.wake, plan.poll_due) == (wake, poll_due)


def test_sync_frequency_hours_may_be_fractional():
    plan = schedule([], NOW, 0.25, 1, last_poll=NOW - 10 * MINUTE)
    assert (plan.wake.at, plan.poll_due) == (NOW + 5 * MINUTE, False)


def test_from_lifecycle_to_schedule_with_the_defaults():
    """Real entries from assess: a booked visit, a running one, a settled one and a recorded one."""
    timing = Timing(timedelta(minutes=10), timedelta(minutes=240))

    def epn(name, start, end, **kwargs):
        return assess(EpnFacts(name, (VisitTimes(start, end),), **kwargs), NOW, timing)

    copied = LastPass(PassKind.LIVE, NOW - 4 * MINUTE, NOW - 3 * MINUTE, Outcome.OK)
    entries = [
        epn("booked", NOW + 40 * MINUTE, NOW + 8 * HOUR),
        epn("collecting", NOW - HOUR, NOW + 7 * HOUR, last_pass=copied),
        epn("settled", NOW - 6 * HOUR, NOW - 4 * HOUR),
        epn("collecting-new", NOW - 2 * MINUTE, NOW + 7 * HOUR),
        epn("recorded", NOW - 9 * HOUR, NOW - 8 * HOUR, recorded=True),
    ]
    plan = schedule(entries, NOW, 24, 1, last_poll=NOW - HOUR)
    # Ended 4 hours ago with settle-minutes 240: settled exactly now.
    assert plan.passes == (DuePass("settled", PassKind.FINAL, NOW),)
    assert plan.deferred == (DuePass("collecting-new", PassKind.LIVE, NOW - 2 * MINUTE),)
    assert plan.wake == Wake(NOW + 7 * MINUTE, WakeReason.LIVE_PASS, "collecting")
    assert plan.poll_due is False


@pytest.mark.parametrize(
    "now, hours, tasks, problem",
    [
        (NOW.replace(tzinfo=None), 1, 1, "expected an aware datetime"),
        (NOW, 1, 0, "expected max_tasks >= 1"),
        (NOW, 0, 1, "sync_frequency_hours > 0"),
    ],
)
def test_bad_arguments_are_refused(now, hours, tasks, problem):
    with pytest.raises(ValueError, match=problem):
        schedule([], now, hours, tasks)
