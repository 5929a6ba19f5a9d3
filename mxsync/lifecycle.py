"""An EPN's lifecycle as a pure function: its visits, record and last pass -> its state and the next pass due.

booked -> collecting -> settling -> final -> verified -> recorded, with waiting (no data at the facility),
failed, unmapped and refused beside them. Times are aware datetimes passed in; nothing here reads a clock,
a file or the network, so the scheduler, the service and a dry run all see the same answer.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Optional

from mxsync.plan import visit_end

# A failed pass has already been retried within itself (rsync-retries); wait this long before the next one,
# doubling with each failure in a row up to RETRY_LONGEST, so a facility outage is not hammered.
RETRY_FIRST = timedelta(minutes=15)
RETRY_LONGEST = timedelta(hours=4)
# After the final pass found no data, look again this often: a stat is cheap, and data can come late.
WAITING_RECHECK = timedelta(hours=1)


class State(Enum):
    BOOKED = "booked"  # the visit is in the future
    COLLECTING = "collecting"  # the visit is running
    SETTLING = "settling"  # the visit ended less than settle-minutes ago
    FINAL = "final"  # settled: the final pass is due
    VERIFIED = "verified"  # the final pass was verified; the record in ignore.yml is still to be written
    RECORDED = "recorded"  # in ignore.yml
    WAITING = "waiting"  # no data folder at the facility yet (or an empty one)
    FAILED = "failed"  # the last pass failed
    UNMAPPED = "unmapped"  # its EPN number is not in epn_cap_map
    REFUSED = "refused"  # its destination path is refused


class PassKind(Enum):
    LIVE = "live"  # growth allowed, nothing recorded
    FINAL = "final"  # strict verification, then the record
    NONE = "none"


class Outcome(Enum):
    OK = "ok"  # a live pass copied what was there; a final pass was verified
    FAILED = "failed"
    NO_DATA = "no-data"  # no folder at the facility, or an empty one
    STOPPED = "stopped"  # interrupted (shutdown): neither success nor failure, so due again at once


TERMINAL = frozenset({State.VERIFIED, State.RECORDED, State.UNMAPPED, State.REFUSED})


@dataclass(frozen=True)
class VisitTimes:
    """A visit's times, for callers without a portal Visit (which has the same two attributes)."""

    start: Optional[datetime]
    end: Optional[datetime]


@dataclass(frozen=True)
class LastPass:
    """The EPN's most recent pass, as the state store holds it."""

    kind: PassKind
    started: datetime
    finished: datetime
    outcome: Outcome
    error: Optional[str] = None


@dataclass(frozen=True)
class Timing:
    """The two keys of config.yml as durations, and the retry delays."""

    live_interval: timedelta  # zero: live mode off
    settle: timedelta  # zero: the final pass as soon as the visit ends
    retry_first: timedelta = RETRY_FIRST
    retry_longest: timedelta = RETRY_LONGEST
    waiting_recheck: timedelta = WAITING_RECHECK

    @classmethod
    def from_config(cls, config):
        return cls(timedelta(minutes=config.live_interval_minutes), timedelta(minutes=config.settle_minutes))


@dataclass(frozen=True)
class EpnFacts:
    """What is known of one EPN: its visits (anything with .start and .end, such as mxsync.portal.Visit) and its past.

    An EPN taken out of ignore.yml by hand must come with last_pass=None, so that it is synced again.
    """

    epn: str
    visits: tuple = ()
    recorded: bool = False
    mapped: bool = True
    refusal: Optional[str] = None  # why its destination is refused
    folder_exists: Optional[bool] = None  # None: not looked at yet
    last_pass: Optional[LastPass] = None
    failures: int = 0  # failed passes in a row


@dataclass(frozen=True)
class Entry:
    """One EPN's lifecycle: its state, the next pass due and when, and the times the scheduler wakes for."""

    epn: str
    state: State
    next_pass: PassKind
    due: Optional[datetime]
    next_start: Optional[datetime] = None  # the earliest start of its visits still in the future
    deadline: Optional[datetime] = None  # the latest end of its visits + settle-minutes
    failures: int = 0
    error: Optional[str] = None


def assess(facts, now, timing):
    """Given an EPN's facts, the time now and the Timing, return its Entry."""
    require_aware(now)
    if facts.recorded:
        return Entry(facts.epn, State.RECORDED, PassKind.NONE, None)
    if not facts.mapped:
        return Entry(facts.epn, State.UNMAPPED, PassKind.NONE, None)
    if facts.refusal is not None:
        return Entry(facts.epn, State.REFUSED, PassKind.NONE, None, error=facts.refusal)
    spans = [(visit.start, visit_end(visit)) for visit in facts.visits if visit.start is not None]
    if not spans:
        raise ValueError(f"EPN {facts.epn} has no visit with a start time to place it in its lifecycle")
    for start, end in spans:
        require_aware(start)
        require_aware(end)
    # Every visit counts: a later beamtime of the same EPN holds back its record (as in mxsync.plan).
    deadline = max(end for _, end in spans) + timing.settle
    running = [start for start, end in spans if start <= now < end]
    next_start = min((start for start, _ in spans if start > now), default=None)
    if running:
        phase, since = State.COLLECTING, min(running)
    elif next_start is not None:
        phase, since = State.BOOKED, None
    else:
        phase = State.SETTLING if now < deadline else State.FINAL
        since = max(spans, key=lambda span: (span[1], span[0]))[0]  # the start of the visit that ended last
    # Passes before the current visit started belong to an earlier visit and say nothing about this one.
    last = facts.last_pass if since is not None and facts.last_pass and facts.last_pass.started >= since else None
    # A live pass that failed is simply tried again at the live interval: the visit's data are still being written.
    failed = last is not None and last.outcome is Outcome.FAILED and last.kind is PassKind.FINAL
    failures = max(facts.failures, 1) if failed else 0
    # After a failed final pass nothing is due before the retry delay.
    not_before = last.finished + retry_delay(failures, timing) if failed else None

    def entry(state, kind, due):
        return Entry(facts.epn, state, kind, due, next_start, deadline, failures, last.error if failed else None)

    live = timing.live_interval > timedelta(0)
    if phase is State.BOOKED:
        return entry(State.BOOKED, *((PassKind.LIVE, next_start) if live else (PassKind.FINAL, deadline)))
    if phase is State.FINAL and last and last.kind is PassKind.FINAL and last.started >= deadline:
        if last.outcome is Outcome.OK:
            return entry(State.VERIFIED, PassKind.NONE, None)
        if last.outcome is Outcome.NO_DATA:
            return entry(State.WAITING, PassKind.FINAL, last.finished + timing.waiting_recheck)
    if phase is State.FINAL or not live:
        kind, due = PassKind.FINAL, deadline
    elif last is None:
        kind, due = PassKind.LIVE, since
    elif last.outcome is Outcome.STOPPED:
        kind, due = PassKind.LIVE, last.started
    else:
        kind, due = PassKind.LIVE, last.finished + timing.live_interval
    if not_before is not None:
        due = max(due, not_before)
    if kind is PassKind.LIVE and due >= deadline:
        # No live pass once settled: the next one is the final pass.
        kind, due = PassKind.FINAL, max(deadline, not_before or deadline)
    if failed:
        return entry(State.FAILED, kind, due)
    if (last and last.outcome is Outcome.NO_DATA) or facts.folder_exists is False:
        return entry(State.WAITING, kind, due)
    return entry(phase, kind, due)


def retry_delay(failures, timing):
    """How long after its `failures`-th failure in a row an EPN's next pass waits."""
    delay = timing.retry_first * 2 ** min(max(failures, 1) - 1, 20)
    return min(delay, timing.retry_longest)


def describe(entry, now, zone=timezone.utc):
    """Return one line for a dry run or status: the EPN, its state, and the next pass with when."""
    detail = ""
    if entry.state is State.BOOKED and entry.next_start is not None:
        detail = f" (visit starts {_when(entry.next_start, zone)})"
    elif entry.state in (State.COLLECTING, State.SETTLING):
        detail = f" (settles at {_when(entry.deadline, zone)})"
    elif entry.state is State.WAITING:
        detail = " (no data at the facility yet)"
    elif entry.state is State.FAILED:
        detail = f" ({entry.failures} failure(s) in a row: {entry.error or 'no error recorded'})"
    elif entry.state is State.REFUSED:
        detail = f" ({entry.error})"
    if entry.next_pass is PassKind.NONE:
        then = {
            State.VERIFIED: "none; record it in ignore.yml",
            State.UNMAPPED: "none until its EPN number is mapped in epn_cap_map",
        }.get(entry.state, "none")
    else:
        then = f"{entry.next_pass.value} pass at {_when(entry.due, zone)} ({_relative(entry.due, now)})"
    return f"{entry.epn}: {entry.state.value}{detail}; next: {then}"


def require_aware(moment):
    """Refuse a naive datetime: compared with the portal's aware times it would be read in an unknown zone."""
    if not isinstance(moment, datetime) or moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"expected an aware datetime, got {moment!r}")


def _when(moment, zone):
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z")


def _relative(moment, now):
    if moment <= now:
        late = now - moment
        return "due now" if late < timedelta(minutes=1) else f"due now, {_duration(late)} overdue"
    return f"in {_duration(moment - now)}"


def _duration(delta):
    """'2 d 3 h', '3 h 20 min', '45 min', '0 min': two units at most, rounded down to the minute."""
    minutes = int(delta.total_seconds() // 60)
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{minutes} min"
