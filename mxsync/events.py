"""Who hears about outcomes: the cycle and the per-EPN pipeline announce events; listeners act on them.

The cycle's own tally (CycleOutcome), the failure history and the failure alerts are listeners, in that order;
hooks and metrics join the same way. A dry run simply has no listener that writes.
"""

import logging
from dataclasses import dataclass
from typing import Optional

from mxsync import alerts

logger = logging.getLogger("mxsync.events")

# Sources whose failure staff hear about at once: nothing can move until they are fixed.
IMMEDIATE_ALERTS = ("destination", "record", "config", "local")


@dataclass(frozen=True)
class PassStarted:
    epn: str
    kind: str  # "live" or "final"


@dataclass(frozen=True)
class PassEnded:
    """A pass's end: outcome "ok" (live: copied; final: verified), "no-data", "failed" or "stopped"."""

    epn: str
    kind: str
    outcome: str
    message: Optional[str] = None  # why it failed, or why there is no data
    figures: Optional[str] = None  # files, bytes, seconds, rate of an "ok" pass
    alert: bool = True  # False: a live pass's failure, retried later and never alerted
    files: Optional[int] = None  # of an "ok" pass: the EPN's files and their bytes, as the source listed them
    bytes: Optional[int] = None


@dataclass(frozen=True)
class Recording:
    """A verified EPN is about to be added to ignore.yml (the store hears it first)."""

    epn: str


@dataclass(frozen=True)
class Recorded:
    epn: str
    how: str
    figures: Optional[str] = None


@dataclass(frozen=True)
class EpnFailed:
    """An EPN failed outside a pass (refused at planning, or verified but its record could not be written)."""

    epn: str
    message: str


@dataclass(frozen=True)
class SourceChecked:
    """A source every EPN needs (portal, ssh, destination, local, record, config): its error, or None if usable."""

    source: str
    error: Optional[str] = None
    summary: Optional[str] = None  # what the cycle's own summary says, if not the whole error


@dataclass(frozen=True)
class VisitsSeen:
    """The portal answered: its visits, and each EPN's project (None: unmapped)."""

    visits: tuple
    projects: dict


@dataclass(frozen=True)
class CycleFinished:
    outcome: object  # mxsync.sync.CycleOutcome


class Events:
    """Hands each event to every listener in order; a listener that fails is logged and the others still hear."""

    def __init__(self, *listeners):
        self.listeners = list(listeners)

    def emit(self, event):
        for listener in self.listeners:
            try:
                listener.hear(event)
            except Exception:  # a listener's bug must not stop a transfer or hide the event from the others
                logger.exception("%s failed on %s", type(listener).__name__, type(event).__name__)


class HistoryListener:
    """Keeps the failure history (mxsync.history) and each EPN's pass history for its lifecycle."""

    def __init__(self, history):
        self.history = history
        self._passes = {}  # EPN -> the history's token of its running pass

    def hear(self, event):
        history = self.history
        if isinstance(event, PassStarted):
            self._passes[event.epn] = history.pass_started(event.epn, event.kind)
        elif isinstance(event, PassEnded):
            # A final pass's end also counts for the EPN's failures (or clears them); a live pass's never does.
            token = self._passes.pop(event.epn, None)
            if token is not None:
                history.pass_finished(
                    token, event.outcome, event.message, files=event.files, bytes_transferred=event.bytes
                )
            elif event.outcome == "failed" and event.alert:
                history.epn_finished(event.epn, error=event.message)
        elif isinstance(event, Recording):
            history.recorded(event.epn)
        elif isinstance(event, EpnFailed):
            history.epn_finished(event.epn, error=event.message)
        elif isinstance(event, SourceChecked):
            history.source_result(event.source, event.error)
        elif isinstance(event, VisitsSeen):
            history.seen("portal", event.projects, event.visits)


class FailureAlerts:
    """Once a cycle ends: email staff about EPNs and sources failing for failure-alert-cycles (some at once)."""

    def __init__(self, config, history):
        self.config = config
        self.history = history

    def hear(self, event):
        if not isinstance(event, CycleFinished):
            return
        epns, sources = self.history.due_alerts(self.config.failure_alert_cycles, immediate=IMMEDIATE_ALERTS)
        if (epns or sources) and alerts.send_failure_alert(self.config, epns, sources):
            self.history.mark_alerted(epns, sources)
        self.history.cycle_finished(event.outcome.summary())
