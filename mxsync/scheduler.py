"""Which passes start now, and when the service next wakes: a pure function over the EPNs' lifecycle entries.

Final passes go first (they finish EPNs), then live passes, the most overdue first, within the free max-tasks
slots. The service sleeps until the earliest of a booked visit's start, a pass coming due (a live pass, a
settle deadline, a retry) and the next portal poll, or until a running pass ends.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Optional

from mxsync.lifecycle import TERMINAL, PassKind, State, require_aware


class WakeReason(Enum):
    # In this order when two come at the same time, so the log names the event that made the pass due.
    VISIT_START = "a booked visit starts"
    SETTLE_DEADLINE = "a visit has settled"
    FINAL_PASS = "a final pass is due"
    LIVE_PASS = "a live pass is due"
    PORTAL_POLL = "the portal is polled"


@dataclass(frozen=True)
class DuePass:
    epn: str
    kind: PassKind
    due: datetime


@dataclass(frozen=True)
class Wake:
    at: datetime  # after now
    reason: WakeReason
    epn: Optional[str] = None


@dataclass(frozen=True)
class Schedule:
    """What to do now and when to look again."""

    passes: tuple  # DuePass to start now, in this order
    deferred: tuple  # DuePass due but without a free slot; they go first as running passes end
    to_record: tuple  # EPNs verified but not yet in ignore.yml
    poll_due: bool  # the portal is to be asked now
    wake: Wake


def schedule(entries, now, sync_frequency_hours, max_tasks, last_poll=None, running=()):
    """Given lifecycle entries, return the Schedule; `running` names EPNs whose pass is running and holds a slot.

    `last_poll` is when the portal was last asked (None: never); it is asked at least every sync-frequency-hours.
    """
    require_aware(now)
    if max_tasks < 1 or sync_frequency_hours <= 0:
        raise ValueError(
            f"expected max_tasks >= 1 and sync_frequency_hours > 0, got {max_tasks}, {sync_frequency_hours}"
        )
    busy = frozenset(running)
    waiting = [entry for entry in entries if entry.epn not in busy]
    due = sorted(
        (
            DuePass(entry.epn, entry.next_pass, entry.due)
            for entry in waiting
            if entry.next_pass is not PassKind.NONE and entry.due <= now
        ),
        key=lambda item: (item.kind is not PassKind.FINAL, item.due, item.epn),
    )
    free = max(0, max_tasks - len(busy))
    poll_every = timedelta(hours=sync_frequency_hours)
    poll_due = last_poll is None or last_poll + poll_every <= now
    # A due poll is made now, so the one after it is a full period away.
    events = [Wake(now + poll_every if poll_due else last_poll + poll_every, WakeReason.PORTAL_POLL)]
    for entry in waiting:
        if entry.state in TERMINAL:
            continue
        if entry.next_start is not None and entry.next_start > now:
            events.append(Wake(entry.next_start, WakeReason.VISIT_START, entry.epn))
        if entry.next_pass is not PassKind.NONE and entry.due > now:
            events.append(Wake(entry.due, _reason(entry), entry.epn))
    order = list(WakeReason)
    wake = min(events, key=lambda event: (event.at, order.index(event.reason), event.epn or ""))
    to_record = tuple(sorted(entry.epn for entry in waiting if entry.state is State.VERIFIED))
    return Schedule(tuple(due[:free]), tuple(due[free:]), to_record, poll_due, wake)


def _reason(entry):
    if entry.next_pass is PassKind.LIVE:
        return WakeReason.LIVE_PASS
    return WakeReason.SETTLE_DEADLINE if entry.due == entry.deadline else WakeReason.FINAL_PASS
