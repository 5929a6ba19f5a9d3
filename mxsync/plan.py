"""Which EPNs a cycle looks at: pure functions over the portal's visits.

Every EPN with a visit in the window (ended within `visit-day-range` days, running now, or booked up to
BOOKING_AHEAD ahead) that is mapped, not yet recorded and has a safe destination is a candidate; its
lifecycle (mxsync.lifecycle) decides what it gets next: a live pass, the final pass, or nothing yet.

Nobody here can ask the production portal how it reads the times of a query (an offset may be
ignored), so each query reaches QUERY_MARGIN beyond the window, and every decision is made on each
visit's own start and end, never on which query returned it.
"""

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from mxsync.destination import epn_destination
from mxsync.errors import PortalError, UnsafeNameError
from mxsync.names import epn_number

logger = logging.getLogger("mxsync.plan")

# Bookings this far ahead are learned at each poll, so a live pass starts when its visit starts.
BOOKING_AHEAD = timedelta(days=7)
# Beamtimes last hours to a few days; a visit without a usable end that started longer ago than this is
# taken to be over rather than holding back its EPN's record.
LONGEST_VISIT = timedelta(days=7)
# More than any UTC offset (-12 h to +14 h), so a portal that misreads our times by a zone still answers.
QUERY_MARGIN = timedelta(days=1)


@dataclass(frozen=True)
class PlannedTransfer:
    epn: str
    project: str
    source: str
    destination: object
    visit: object  # its latest visit, which describes it best (beamline, source path)
    visits: tuple = ()  # all its visits in the window, for its lifecycle


@dataclass
class Plan:
    """The EPNs seen in one poll, each in exactly one list (not_ended overlaps candidates: it is for the log)."""

    candidates: list[PlannedTransfer] = field(default_factory=list)
    synced: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    not_ended: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    refusals: dict = field(default_factory=dict)  # EPN -> why its destination is refused
    suspicious: list = field(default_factory=list)


def fetch_visits(config, portal, now):
    """Ask every equipment for its visits from visit-day-range ago to BOOKING_AHEAD ahead.

    Return (visits, suspicious records, errors): one error per equipment whose query failed.
    """
    visits, suspicious, errors = [], [], []
    start = now - timedelta(days=config.visit_day_range) - QUERY_MARGIN
    for equipment in config.equipment:
        try:
            found, odd = portal.visits(equipment, start, now + BOOKING_AHEAD + QUERY_MARGIN)
        except PortalError as error:
            errors.append(str(error))
            continue
        visits += found
        suspicious += odd
    return visits, suspicious, errors


def visit_end(visit):
    """A visit's end; one without a usable end is taken to be over LONGEST_VISIT after its start."""
    return visit.end if visit.end is not None else visit.start + LONGEST_VISIT


def make_plan(config, visits, synced, now, suspicious=()):
    """Given the portal's visits, the set of recorded EPNs and the time, return the Plan.

    Pure apart from path resolution. A visit is in the window if it ends (visit_end) within visit-day-range of
    `now` or later; an EPN's visits outside the window do not count.
    """
    plan = Plan(suspicious=list(suspicious))
    oldest_end = now - timedelta(days=config.visit_day_range)
    by_epn = {}
    for visit in visits:
        if visit.start is None or visit_end(visit) < oldest_end:
            continue
        by_epn.setdefault(visit.epn, {})[(visit.start, visit.end, visit.equipment_id)] = visit  # queries overlap
    for epn in sorted(by_epn):
        own = sorted(by_epn[epn].values(), key=lambda visit: (visit_end(visit), visit.start))
        latest = own[-1]
        if visit_end(latest) > now:
            plan.not_ended.append(epn)
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
            source = _source_path(config, latest) + "/" + epn
            plan.candidates.append(PlannedTransfer(epn, project, source, destination, latest, tuple(own)))
    return plan


def _source_path(config, visit):
    for equipment in config.equipment:
        if equipment.id == visit.equipment_id:
            return equipment.source_path
    raise AssertionError(f"visit of {visit.epn} from unknown equipment {visit.equipment_id}")


def summarise(plan):
    """Return a one-line summary of a plan for the log."""
    return (
        f"{len(plan.candidates)} to follow ({len(plan.not_ended)} with a visit not ended), "
        f"{len(plan.synced)} already synced, {len(plan.unmapped)} unmapped, {len(plan.refused)} refused, "
        f"{len(plan.suspicious)} suspicious"
    )
