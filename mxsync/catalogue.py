"""Where EPNs come from: the portal's visits, remembered between a service's cycles.

A live pass needs to know only which visits run; the portal is asked again every sync-frequency-hours, and
before any final pass, whose record must rest on the visit's latest times (a visit may be extended).
"""

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from mxsync.plan import fetch_visits

logger = logging.getLogger("mxsync.catalogue")


@dataclass(frozen=True)
class Answer:
    """The portal's visits at one moment, and the equipment whose query failed."""

    visits: tuple
    suspicious: tuple
    errors: tuple
    at: datetime
    fresh: bool  # asked during this cycle


class VisitCatalogue:
    """Asks the portal for visits, and keeps its last complete answer for the cycles that follow."""

    def __init__(self):
        self._last = None
        self._asked_with = None

    def poll(self, config, portal, now):
        """Ask the portal now; return the Answer (remembered if every equipment answered)."""
        visits, suspicious, errors = fetch_visits(config, portal, now)
        answer = Answer(tuple(visits), tuple(suspicious), tuple(errors), now, fresh=True)
        if not errors:
            self._last, self._asked_with = answer, _query(config)
        return answer

    def remembered(self, config, now):
        """Return the last complete Answer if it is younger than sync-frequency-hours and still answers this
        config's question (same portal, equipment and window), else None."""
        if self._last is None or self._asked_with != _query(config):
            return None
        if now - self._last.at >= timedelta(hours=config.sync_frequency_hours) or now < self._last.at:
            return None
        return Answer(self._last.visits, self._last.suspicious, (), self._last.at, fresh=False)

    def last_known(self, config):
        """Return the last complete Answer for this config's question however old (None if there is none)."""
        if self._last is None or self._asked_with != _query(config):
            return None
        return Answer(self._last.visits, self._last.suspicious, (), self._last.at, fresh=False)


def _query(config):
    return (config.base_url, config.equipment, config.visit_day_range, config.portal_time_format)
