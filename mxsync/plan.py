"""Which EPNs a cycle should sync: the old tool's rule, as pure functions over the portal's visits.

Visits in progress (overlapping now to now + 1 h on any equipment) set `current_start`, their
earliest start. Only visits that ended before `current_start`, within `visit-day-range` days of
it, are candidates; an EPN with any visit not yet ended waits, so a later beamtime of the same
EPN is never cut off by an earlier sync.

Nobody here can ask the production portal how it reads the times of a query (an offset may be
ignored), so each query reaches QUERY_MARGIN beyond the window the rule needs, and the rule is
decided here on each visit's own start and end, never on which query returned it.
"""

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from mxsync.destination import epn_destination
from mxsync.errors import PortalError, UnsafeNameError
from mxsync.names import epn_number

logger = logging.getLogger("mxsync.plan")

CURRENT_WINDOW = timedelta(hours=1)
# Beamtimes last hours to a few days; a visit without a usable end that started longer ago than this is
# taken to be over rather than holding back every sync.
LONGEST_VISIT = timedelta(days=7)
# More than any UTC offset (-12 h to +14 h), so a portal that misreads our times by a zone still answers.
QUERY_MARGIN = timedelta(days=1)


@dataclass(frozen=True)
class PlannedTransfer:
    epn: str
    project: str
    source: str
    destination: object
    visit: object


@dataclass
class Plan:
    """The outcome of planning one cycle; every EPN seen lands in exactly one list."""

    current_start: object
    transfers: list[PlannedTransfer] = field(default_factory=list)
    synced: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    not_ended: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    refusals: dict = field(default_factory=dict)  # EPN -> why its destination is refused
    suspicious: list = field(default_factory=list)


def fetch_visits(config, portal, now):
    """Ask every equipment for its visits; return (current, previous, suspicious, errors, current_start).

    `current` and `previous` are the answers to the two queries, which overlap; make_plan reads them as one pool.
    """
    current, suspicious, errors, answered = [], [], [], []
    for equipment in config.equipment:
        try:
            visits, odd = portal.visits(equipment, now - QUERY_MARGIN, now + CURRENT_WINDOW + QUERY_MARGIN)
        except PortalError as error:
            errors.append(str(error))
            continue
        current += visits
        suspicious += odd
        answered.append(equipment)
    start = find_current_start(current, now)
    previous = []
    window_start = start - timedelta(days=config.visit_day_range) - QUERY_MARGIN
    for equipment in answered:
        try:
            visits, odd = portal.visits(equipment, window_start, start + QUERY_MARGIN)
        except PortalError as error:
            errors.append(str(error))
            continue
        previous += visits
        suspicious += odd
    return current, previous, suspicious, errors, find_current_start(current + previous, now)


def find_current_start(visits, now):
    """Return the earliest start of the visits in progress (overlapping now to now + 1 h by their own times), or now.

    A visit with a usable start but no usable end (reported as suspicious) counts as running if it started
    within LONGEST_VISIT: nothing that ended after its start is synced until the portal says when it ended.
    """
    running = [
        visit.start
        for visit in visits
        if visit.start is not None
        and visit.start <= now + CURRENT_WINDOW
        and (visit.end >= now if visit.end is not None else visit.start >= now - LONGEST_VISIT)
    ]
    return min([now] + running)


def make_plan(config, current, previous, synced, current_start, suspicious=()):
    """Given visits, the set of synced EPNs and find_current_start's cut-off, return the Plan.

    Pure apart from path resolution; `current` and `previous` are one pool, judged by each visit's own times.
    """
    plan = Plan(current_start, suspicious=list(suspicious))
    visits = list(current) + list(previous)
    not_ended = {visit.epn for visit in visits if visit.end is None or visit.end >= current_start}
    oldest_end = current_start - timedelta(days=config.visit_day_range)
    finished = {}
    for visit in visits:
        if visit.epn in not_ended or visit.start is None or visit.end < oldest_end:
            continue
        # The latest visit of an EPN describes it best (its beamline and source).
        if visit.epn not in finished or visit.end > finished[visit.epn].end:
            finished[visit.epn] = visit
    plan.not_ended = sorted(not_ended)
    for epn in sorted(finished):
        visit = finished[epn]
        project = config.project_for(epn_number(epn))
        if epn in synced:
            plan.synced.append(epn)
        elif project is None:
            plan.unmapped.append(epn)
        else:
            try:
                destination = epn_destination(config, project, epn)
            except UnsafeNameError as error:
                plan.refused.append(epn)
                plan.refusals[epn] = str(error)
                continue
            source = _source_path(config, visit) + "/" + epn
            plan.transfers.append(PlannedTransfer(epn, project, source, destination, visit))
    return plan


def _source_path(config, visit):
    for equipment in config.equipment:
        if equipment.id == visit.equipment_id:
            return equipment.source_path
    raise AssertionError(f"visit of {visit.epn} from unknown equipment {visit.equipment_id}")


def summarise(plan):
    """Return a one-line summary of a plan for the log."""
    return (
        f"{len(plan.transfers)} to sync, {len(plan.synced)} already synced, {len(plan.unmapped)} unmapped, "
        f"{len(plan.not_ended)} not ended, {len(plan.refused)} refused, {len(plan.suspicious)} suspicious"
    )
