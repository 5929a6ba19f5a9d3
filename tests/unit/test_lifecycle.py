"""The lifecycle as a pure function: every state, every transition, both zero settings, the boundaries."""

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from mxsync.lifecycle import (
    RETRY_LONGEST,
    EpnFacts,
    LastPass,
    Outcome,
    PassKind,
    State,
    Timing,
    VisitTimes,
    assess,
    describe,
    retry_delay,
)
from mxsync.portal import Visit

UTC = timezone.utc
START = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
END = START + timedelta(hours=8)
SETTLE = timedelta(minutes=240)
DEADLINE = END + SETTLE
VISIT = VisitTimes(START, END)
LIVE = Timing(timedelta(minutes=10), SETTLE)
NO_LIVE = Timing(timedelta(0), SETTLE)
NO_SETTLE = Timing(timedelta(minutes=10), timedelta(0))
OLD = Timing(timedelta(0), timedelta(0))  # HPC ASSyncy: nothing while the visit runs, the final pass when it ends
SECOND = timedelta(seconds=1)
MINUTE = timedelta(minutes=1)


def pass_(kind, started, outcome=Outcome.OK, took=2 * MINUTE, error=None):
    return LastPass(kind, started, started + took, outcome, error)


def live(started, outcome=Outcome.OK, **kwargs):
    return pass_(PassKind.LIVE, started, outcome, **kwargs)


def final(started, outcome=Outcome.OK, **kwargs):
    return pass_(PassKind.FINAL, started, outcome, **kwargs)


def facts(**kwargs):
    return EpnFacts("12282a", **{"visits": (VISIT,), **kwargs})


# (id, facts, now, timing, expected state, next pass, due)
CASES = [
    # booked
    ("booked, live", facts(), START - timedelta(hours=1), LIVE, State.BOOKED, PassKind.LIVE, START),
    ("booked, live off", facts(), START - timedelta(hours=1), NO_LIVE, State.BOOKED, PassKind.FINAL, DEADLINE),
    (
        "booked, no folder yet is not waiting",
        facts(folder_exists=False),
        START - SECOND,
        LIVE,
        State.BOOKED,
        PassKind.LIVE,
        START,
    ),
    # collecting
    ("exactly at the visit start", facts(), START, LIVE, State.COLLECTING, PassKind.LIVE, START),
    (
        "collecting, after a live pass",
        facts(last_pass=live(START + timedelta(hours=1))),
        START + timedelta(hours=2),
        LIVE,
        State.COLLECTING,
        PassKind.LIVE,
        START + timedelta(hours=1) + 12 * MINUTE,
    ),
    ("collecting, live off", facts(), START + timedelta(hours=1), NO_LIVE, State.COLLECTING, PassKind.FINAL, DEADLINE),
    ("collecting, old behaviour", facts(), START + timedelta(hours=1), OLD, State.COLLECTING, PassKind.FINAL, END),
    (
        "one second before the visit ends",
        facts(last_pass=live(END - 5 * MINUTE)),
        END - SECOND,
        LIVE,
        State.COLLECTING,
        PassKind.LIVE,
        END + 7 * MINUTE,
    ),
    (
        "collecting, a stopped live pass is due again at once",
        facts(last_pass=live(START + MINUTE, Outcome.STOPPED)),
        START + 5 * MINUTE,
        LIVE,
        State.COLLECTING,
        PassKind.LIVE,
        START + MINUTE,
    ),
    (
        "collecting, no folder yet",
        facts(folder_exists=False),
        START + MINUTE,
        LIVE,
        State.WAITING,
        PassKind.LIVE,
        START,
    ),
    (
        "collecting, the live pass found no data",
        facts(last_pass=live(START, Outcome.NO_DATA)),
        START + 5 * MINUTE,
        LIVE,
        State.WAITING,
        PassKind.LIVE,
        START + 12 * MINUTE,
    ),
    (
        "collecting, a failed live pass is tried again at the live interval, not backed off",
        facts(last_pass=live(START, Outcome.FAILED), failures=2),
        START + 5 * MINUTE,
        LIVE,
        State.COLLECTING,
        PassKind.LIVE,
        START + 2 * MINUTE + LIVE.live_interval,
    ),
    # settling
    (
        "exactly at the visit end",
        facts(last_pass=live(END - 5 * MINUTE)),
        END,
        LIVE,
        State.SETTLING,
        PassKind.LIVE,
        END + 7 * MINUTE,
    ),
    ("exactly at the visit end, live off", facts(), END, NO_LIVE, State.SETTLING, PassKind.FINAL, DEADLINE),
    (
        "settling, nothing copied yet: a live pass at once",
        facts(),
        END + timedelta(hours=1),
        LIVE,
        State.SETTLING,
        PassKind.LIVE,
        START,
    ),
    (
        "one second before the deadline",
        facts(last_pass=live(DEADLINE - 5 * MINUTE)),
        DEADLINE - SECOND,
        LIVE,
        State.SETTLING,
        PassKind.FINAL,
        DEADLINE,
    ),
    (
        "settling, the next live pass would fall after the deadline",
        facts(last_pass=live(DEADLINE - 11 * MINUTE)),
        DEADLINE - 8 * MINUTE,
        LIVE,
        State.SETTLING,
        PassKind.FINAL,
        DEADLINE,
    ),
    (
        "settling, a live pass failed just before the deadline: the final pass at the deadline",
        facts(last_pass=live(DEADLINE - 5 * MINUTE, Outcome.FAILED), failures=1),
        DEADLINE - 2 * MINUTE,
        LIVE,
        State.SETTLING,
        PassKind.FINAL,
        DEADLINE,
    ),
    (
        "settling, the next live pass would fall exactly on the deadline",
        facts(last_pass=live(DEADLINE - 12 * MINUTE)),
        DEADLINE - 5 * MINUTE,
        LIVE,
        State.SETTLING,
        PassKind.FINAL,
        DEADLINE,
    ),
    # final
    (
        "exactly at the settle deadline",
        facts(last_pass=live(DEADLINE - 5 * MINUTE)),
        DEADLINE,
        LIVE,
        State.FINAL,
        PassKind.FINAL,
        DEADLINE,
    ),
    (
        "exactly at the visit end, settle 0",
        facts(last_pass=live(END - 5 * MINUTE)),
        END,
        NO_SETTLE,
        State.FINAL,
        PassKind.FINAL,
        END,
    ),
    ("exactly at the visit end, old behaviour", facts(), END, OLD, State.FINAL, PassKind.FINAL, END),
    (
        "final, a final pass started a second early does not count",
        facts(last_pass=final(DEADLINE - SECOND)),
        DEADLINE + timedelta(hours=1),
        LIVE,
        State.FINAL,
        PassKind.FINAL,
        DEADLINE,
    ),
    (
        "final, a stopped final pass is due again at once",
        facts(last_pass=final(DEADLINE, Outcome.STOPPED)),
        DEADLINE + 10 * MINUTE,
        LIVE,
        State.FINAL,
        PassKind.FINAL,
        DEADLINE,
    ),
    (
        "final, no folder at the facility",
        facts(folder_exists=False),
        DEADLINE,
        LIVE,
        State.WAITING,
        PassKind.FINAL,
        DEADLINE,
    ),
    (
        "final, the final pass found no data: looked at again in an hour",
        facts(last_pass=final(DEADLINE, Outcome.NO_DATA)),
        DEADLINE + 10 * MINUTE,
        LIVE,
        State.WAITING,
        PassKind.FINAL,
        DEADLINE + 2 * MINUTE + timedelta(hours=1),
    ),
    (
        "final, a live pass found no data before the deadline: the final pass is not delayed",
        facts(last_pass=live(DEADLINE - 5 * MINUTE, Outcome.NO_DATA)),
        DEADLINE,
        LIVE,
        State.WAITING,
        PassKind.FINAL,
        DEADLINE,
    ),
    (
        "final, failed once",
        facts(last_pass=final(DEADLINE, Outcome.FAILED, error="rsync exit 12"), failures=1),
        DEADLINE + 5 * MINUTE,
        LIVE,
        State.FAILED,
        PassKind.FINAL,
        DEADLINE + 2 * MINUTE + 15 * MINUTE,
    ),
    (
        "final, failed three times",
        facts(last_pass=final(DEADLINE, Outcome.FAILED), failures=3),
        DEADLINE,
        LIVE,
        State.FAILED,
        PassKind.FINAL,
        DEADLINE + 2 * MINUTE + 60 * MINUTE,
    ),
    (
        "final, failed ten times: the delay is capped",
        facts(last_pass=final(DEADLINE, Outcome.FAILED), failures=10),
        DEADLINE,
        LIVE,
        State.FAILED,
        PassKind.FINAL,
        DEADLINE + 2 * MINUTE + RETRY_LONGEST,
    ),
    # verified, recorded and the states beside the lifecycle
    (
        "verified at the deadline exactly",
        facts(last_pass=final(DEADLINE)),
        DEADLINE + 5 * MINUTE,
        LIVE,
        State.VERIFIED,
        PassKind.NONE,
        None,
    ),
    (
        "verified, old behaviour",
        facts(last_pass=final(END)),
        END + 5 * MINUTE,
        OLD,
        State.VERIFIED,
        PassKind.NONE,
        None,
    ),
    (
        "recorded, even while a visit runs",
        facts(recorded=True),
        START + MINUTE,
        LIVE,
        State.RECORDED,
        PassKind.NONE,
        None,
    ),
    ("recorded wins over unmapped", facts(recorded=True, mapped=False), END, LIVE, State.RECORDED, PassKind.NONE, None),
    ("unmapped", facts(mapped=False), START + MINUTE, LIVE, State.UNMAPPED, PassKind.NONE, None),
    ("refused", facts(refusal="project 'ny79' is a symlink"), DEADLINE, LIVE, State.REFUSED, PassKind.NONE, None),
]


@pytest.mark.parametrize(
    "item, now, timing, state, kind, due", [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_state_and_next_pass(item, now, timing, state, kind, due):
    entry = assess(item, now, timing)
    assert (entry.state, entry.next_pass, entry.due) == (state, kind, due)


def test_a_visit_walks_through_every_state_in_order():
    """The same EPN at successive times, each pass recorded as the service would, with the defaults."""
    history = []
    last = None
    for now in (START - MINUTE, START, START + MINUTE, END, DEADLINE, DEADLINE + 3 * MINUTE):
        entry = assess(facts(last_pass=last), now, LIVE)
        history.append(entry.state)
        if entry.next_pass is not PassKind.NONE and entry.due <= now:
            last = pass_(entry.next_pass, now)
    recorded = assess(facts(last_pass=last, recorded=True), DEADLINE + 5 * MINUTE, LIVE)
    assert history + [recorded.state] == [
        State.BOOKED,
        State.COLLECTING,
        State.COLLECTING,
        State.SETTLING,
        State.FINAL,
        State.VERIFIED,
        State.RECORDED,
    ]


def test_next_start_is_the_booked_start_until_the_visit_starts():
    assert assess(facts(), START - SECOND, LIVE).next_start == START
    assert assess(facts(), START, LIVE).next_start is None
    assert assess(facts(), START, LIVE).deadline == DEADLINE


def test_failure_count_and_error_are_carried_only_while_the_last_pass_failed():
    failed = assess(facts(last_pass=final(DEADLINE, Outcome.FAILED, error="rsync exit 23"), failures=4), DEADLINE, LIVE)
    assert (failed.failures, failed.error) == (4, "rsync exit 23")
    counted = assess(facts(last_pass=final(DEADLINE, Outcome.FAILED), failures=0), DEADLINE, LIVE)
    assert counted.failures == 1 and counted.due == DEADLINE + 2 * MINUTE + 15 * MINUTE
    ok = assess(facts(last_pass=live(START), failures=4), START + 5 * MINUTE, LIVE)
    assert (ok.state, ok.failures, ok.error) == (State.COLLECTING, 0, None)


def test_a_pass_of_an_earlier_visit_says_nothing_about_the_running_one():
    second = VisitTimes(START + timedelta(days=2), END + timedelta(days=2))
    item = facts(visits=(VISIT, second), last_pass=final(DEADLINE, Outcome.FAILED), failures=3)
    entry = assess(item, second.start + MINUTE, LIVE)
    assert (entry.state, entry.next_pass, entry.due, entry.failures) == (
        State.COLLECTING,
        PassKind.LIVE,
        second.start,
        0,
    )
    assert entry.deadline == second.end + SETTLE


def test_a_later_booking_holds_back_the_record_of_an_earlier_visit():
    second = VisitTimes(START + timedelta(days=2), END + timedelta(days=2))
    entry = assess(facts(visits=(VISIT, second)), DEADLINE + timedelta(hours=1), LIVE)
    assert (entry.state, entry.next_pass, entry.due) == (State.BOOKED, PassKind.LIVE, second.start)
    assert (entry.next_start, entry.deadline) == (second.start, second.end + SETTLE)
    entry = assess(facts(visits=(VISIT, second)), DEADLINE + timedelta(hours=1), NO_LIVE)
    assert (entry.next_pass, entry.due) == (PassKind.FINAL, second.end + SETTLE)


def test_a_visit_without_an_end_runs_for_the_longest_visit_then_settles():
    open_ended = VisitTimes(START, None)
    running = assess(facts(visits=(open_ended,)), START + timedelta(days=6), LIVE)
    assert running.state is State.COLLECTING and running.deadline == START + timedelta(days=7) + SETTLE
    over = assess(facts(visits=(open_ended,)), START + timedelta(days=7), LIVE)
    assert over.state is State.SETTLING


def test_portal_visits_are_taken_as_they_are_and_visits_without_a_start_are_skipped():
    visits = (
        Visit("12282a", None, END + timedelta(days=1), 23, "mx", None, ()),
        Visit("12282a", START, END, 23, "mx", None, ()),
    )
    entry = assess(facts(visits=visits), END, OLD)
    assert (entry.state, entry.due, entry.deadline) == (State.FINAL, END, END)
    with pytest.raises(ValueError, match="12282a has no visit with a start time"):
        assess(facts(visits=visits[:1]), END, OLD)


@pytest.mark.parametrize(
    "now, visit",
    [(START.replace(tzinfo=None), VISIT), (START, VisitTimes(START.replace(tzinfo=None), END))],
    ids=["naive now", "naive visit start"],
)
def test_naive_times_are_refused(now, visit):
    with pytest.raises(ValueError, match="expected an aware datetime"):
        assess(facts(visits=(visit,)), now, LIVE)


def test_other_zones_compare_as_the_same_instant():
    sydney = timezone(timedelta(hours=10))
    entry = assess(facts(), END.astimezone(sydney), NO_SETTLE)
    assert (entry.state, entry.due) == (State.FINAL, END)


@pytest.mark.parametrize(
    "failures, delay",
    [(0, 15), (1, 15), (2, 30), (3, 60), (4, 120), (5, 240), (6, 240), (10**6, 240)],
)
def test_retry_delay_doubles_up_to_its_cap(failures, delay):
    assert retry_delay(failures, LIVE) == timedelta(minutes=delay)


def test_timing_from_config_reads_the_two_keys_in_minutes():
    timing = Timing.from_config(SimpleNamespace(live_interval_minutes=10, settle_minutes=240))
    assert (timing.live_interval, timing.settle) == (timedelta(minutes=10), timedelta(hours=4))


DESCRIBE_CASES = [
    (
        facts(),
        START - timedelta(hours=21),
        "12282a: booked (visit starts 2024-05-01 08:00 UTC); next: live pass at 2024-05-01 08:00 UTC (in 21 h)",
    ),
    (
        facts(last_pass=live(START)),
        START + 5 * MINUTE,
        "12282a: collecting (settles at 2024-05-01 20:00 UTC); next: live pass at 2024-05-01 08:12 UTC (in 7 min)",
    ),
    (
        facts(),
        DEADLINE + timedelta(hours=2, minutes=5),
        "12282a: final; next: final pass at 2024-05-01 20:00 UTC (due now, 2 h 5 min overdue)",
    ),
    (
        facts(last_pass=final(DEADLINE, Outcome.FAILED, error="rsync exit 12"), failures=2),
        DEADLINE + 3 * MINUTE,
        "12282a: failed (2 failure(s) in a row: rsync exit 12); next: final pass at 2024-05-01 20:32 UTC (in 29 min)",
    ),
    (
        facts(folder_exists=False),
        DEADLINE,
        "12282a: waiting (no data at the facility yet); next: final pass at 2024-05-01 20:00 UTC (due now)",
    ),
    (facts(last_pass=final(DEADLINE)), DEADLINE, "12282a: verified; next: none; record it in ignore.yml"),
    (facts(recorded=True), DEADLINE, "12282a: recorded; next: none"),
    (facts(mapped=False), DEADLINE, "12282a: unmapped; next: none until its EPN number is mapped in epn_cap_map"),
    (facts(refusal="a symlink"), DEADLINE, "12282a: refused (a symlink); next: none"),
    (
        facts(visits=(VisitTimes(START + timedelta(days=2, hours=3), END + timedelta(days=2)),)),
        START,
        "12282a: booked (visit starts 2024-05-03 11:00 UTC); next: live pass at 2024-05-03 11:00 UTC (in 2 d 3 h)",
    ),
]


@pytest.mark.parametrize("item, now, line", DESCRIBE_CASES)
def test_describe_gives_one_line_with_state_next_pass_and_when(item, now, line):
    assert describe(assess(item, now, LIVE), now) == line


def test_describe_in_another_zone():
    sydney = timezone(timedelta(hours=10), "AEST")
    line = describe(assess(facts(), START - timedelta(hours=1), LIVE), START - timedelta(hours=1), zone=sydney)
    assert (
        line == "12282a: booked (visit starts 2024-05-01 18:00 AEST); next: live pass at 2024-05-01 18:00 AEST (in 1 h)"
    )
