"""Which EPNs a cycle should sync: the old tool's rule, as pure functions over the portal's visits.

Visits in progress (overlapping now to now + 1 h on any equipment) set `current_start`, their
earliest start. Only visits that ended before `current_start`, within `visit-day-range` days of
it, are candidates; an EPN with any visit not yet ended waits, so a later beamtime of the same
EPN is never cut off by an earlier sync.
"""

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import List

from mxsync.destination import epn_destination
from mxsync.errors import PortalError, UnsafeNameError
from mxsync.names import epn_number

logger = logging.getLogger("mxsync.plan")

CURRENT_WINDOW = timedelta(hours=1)


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
    transfers: List[PlannedTransfer] = field(default_factory=list)
    synced: List[str] = field(default_factory=list)
    unmapped: List[str] = field(default_factory=list)
    not_ended: List[str] = field(default_factory=list)
    refused: List[str] = field(default_factory=list)
    suspicious: list = field(default_factory=list)


def fetch_visits(config, portal, now):
    """Ask every equipment for its visits; return (current, previous, suspicious, errors, current_start)."""
    current, suspicious, errors, answered = [], [], [], []
    for equipment in config.equipment:
        try:
            visits, odd = portal.visits(equipment, now, now + CURRENT_WINDOW)
        except PortalError as error:
            errors.append(str(error))
            continue
        current += visits
        suspicious += odd
        answered.append(equipment)
    current_start = min([now] + [visit.start for visit in current if visit.start is not None])
    previous = []
    window_start = current_start - timedelta(days=config.visit_day_range)
    for equipment in answered:
        try:
            visits, odd = portal.visits(equipment, window_start, current_start)
        except PortalError as error:
            errors.append(str(error))
            continue
        previous += visits
        suspicious += odd
    return current, previous, suspicious, errors, current_start


def make_plan(config, current, previous, synced, current_start, suspicious=()):
    """Given visits and the set of synced EPNs, return the Plan; pure apart from path resolution."""
    plan = Plan(current_start, suspicious=list(suspicious))
    not_ended = {visit.epn for visit in current + previous if visit.end is None or visit.end >= current_start}
    finished = {}
    for visit in previous:
        if visit.epn not in not_ended and visit.start is not None:
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
                logger.error("%s", error)
                plan.refused.append(epn)
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

