"""What mxsync remembers between cycles besides ignore.yml: failures, outages, running EPNs, the last cycle.

Kept in `mxsync-state.json` beside ignore.yml; losing it costs only history, never a sync record,
so a damaged file is moved aside and a fresh history started.
"""

import logging
import threading
from datetime import datetime, timezone

from mxsync.errors import StateFileError
from mxsync.lifecycle import LastPass, Outcome, PassKind
from mxsync.names import describe
from mxsync.state import JsonStore

logger = logging.getLogger("mxsync.history")

STATE_FILE_NAME = "mxsync-state.json"
LOCK_FILE_NAME = "mxsync.lock"


def _usable_entry(entry):
    """True if an EPN or source entry has the shape this module writes (a mapping with a failure count)."""
    failures = entry.get("failures") if isinstance(entry, dict) else None
    return isinstance(failures, int) and not isinstance(failures, bool)


def _shape_problem(data):
    """Return what makes a loaded history unusable, or None (a damaged file is set aside, never "repaired" in place)."""
    for key, usable in (("epns", _usable_entry), ("sources", _usable_entry), ("running", None), ("waiting", _is_dict)):
        entries = data.get(key, {})
        if not isinstance(entries, dict) or usable and not all(map(usable, entries.values())):
            return f"has an unusable '{key}' section ({describe(entries)})"
    return None


def _is_dict(entry):
    return isinstance(entry, dict)


def utc_now_text():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class History:
    """Failure counts per EPN and per source (portal, ssh, destination), plus the EPNs running now."""

    def __init__(self, state_dir, read_only=False):
        self.store = JsonStore(state_dir / STATE_FILE_NAME, "mxsync failure history")
        self.read_only = read_only
        self.problem = None  # why the file's history was not used, for status views
        try:
            # A damaged file is moved aside with one warning; a read-only view (status, dry run) moves nothing.
            self.data = self.store.load(check=_shape_problem, recover=not read_only)
        except StateFileError as error:
            # Only history is lost: go on without it, never overwriting the file (an executing run retries next cycle).
            self.problem, self.read_only, self.data = str(error), True, {}
            logger.warning("%s; going on without the failure history%s", error, "" if read_only else " this cycle")
        for key in ("epns", "sources", "running"):
            self.data.setdefault(key, {})
        self._lock = threading.Lock()

    def save(self):
        if self.read_only:
            return
        try:
            self.store.save(self.data)
        except OSError as error:
            # Losing the history costs only alerts and status details: never stop a transfer for it.
            logger.error("%s: cannot save the failure history: %s", self.store.path, error.strerror or error)

    def epn_started(self, epn):
        with self._lock:
            self.data["running"][epn] = utc_now_text()
            self.save()

    def epn_finished(self, epn, error=None, stopped=False):
        """Record the end of an EPN's attempt: a success clears its history, a failure counts one more."""
        with self._lock:
            self.data["running"].pop(epn, None)
            self.data.get("waiting", {}).pop(epn, None)
            if stopped:
                pass  # an interrupted transfer says nothing about the EPN
            elif error is None:
                self.data["epns"].pop(epn, None)
            else:
                entry = self.data["epns"].setdefault(epn, {"failures": 0, "alerted": False})
                entry.update(failures=entry["failures"] + 1, last_error=error, last_attempt=utc_now_text())
            self.save()

    def epn_waiting(self, epn, reason):
        """Note that the facility has no data for an EPN yet: not a failure, shown by `mxsync status`."""
        with self._lock:
            entry = self.data.setdefault("waiting", {}).setdefault(epn, {"since": utc_now_text()})
            entry.update(reason=reason, last_attempt=utc_now_text())
            self.save()

    def source_result(self, source, error=None):
        """Count a cycle in which `source` (portal, ssh, destination) failed, or clear it."""
        with self._lock:
            if error is None:
                self.data["sources"].pop(source, None)
            else:
                entry = self.data["sources"].setdefault(
                    source, {"failures": 0, "alerted": False, "since": utc_now_text()}
                )
                entry.update(failures=entry["failures"] + 1, last_error=error, last_attempt=utc_now_text())

    def due_alerts(self, threshold, immediate=("destination",)):
        """Return (EPN entries, source entries) that reached their threshold and were not alerted yet."""
        epns = {
            epn: entry
            for epn, entry in self.data["epns"].items()
            if entry["failures"] >= threshold and not entry.get("alerted")
        }
        sources = {
            name: entry
            for name, entry in self.data["sources"].items()
            if entry["failures"] >= (1 if name in immediate else threshold) and not entry.get("alerted")
        }
        return epns, sources

    def mark_alerted(self, epns, sources):
        with self._lock:
            for epn in epns:
                self.data["epns"][epn]["alerted"] = True
            for name in sources:
                self.data["sources"][name]["alerted"] = True

    def pass_started(self, epn, kind):
        """Note that a pass of `kind` ("live", "final") began; return the token pass_finished takes."""
        return (epn, kind, utc_now_text())

    def pass_finished(self, token, outcome, error=None, files=None, bytes_transferred=None):
        """Note how a pass ended ("ok", "failed", "no-data", "stopped"): its EPN's lifecycle goes on from it."""
        epn, kind, started = token
        with self._lock:
            self.data.setdefault("passes", {})[epn] = {
                "kind": kind,
                "started": started,
                "finished": utc_now_text(),
                "outcome": outcome,
                "error": error,
            }
            self.save()

    def last_pass(self, epn):
        """Return the EPN's last pass as a lifecycle.LastPass, or None."""
        entry = self.data.get("passes", {}).get(epn)
        if not isinstance(entry, dict):
            return None
        try:
            return LastPass(
                PassKind(entry["kind"]),
                datetime.fromisoformat(entry["started"]),
                datetime.fromisoformat(entry["finished"]),
                Outcome(entry["outcome"]),
                entry.get("error"),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def failures(self, epn):
        entry = self.data["epns"].get(epn)
        return entry["failures"] if entry else 0

    def recorded(self, epn):
        """Note that mxsync recorded the EPN in ignore.yml (so a later removal by hand is noticed)."""
        with self._lock:
            entry = self.data.setdefault("passes", {}).get(epn)
            if isinstance(entry, dict):
                entry["recorded"] = True
            self.save()

    def reconcile(self, recorded_epns):
        """ignore.yml wins: forget the passes of EPNs recorded by mxsync and since removed by hand; return them."""
        passes = self.data.get("passes", {})
        removed = sorted(
            epn
            for epn, entry in passes.items()
            if isinstance(entry, dict) and entry.get("recorded") and epn not in recorded_epns
        )
        if removed:
            with self._lock:
                for epn in removed:
                    passes.pop(epn, None)
                self.save()
        return removed

    def cycle_finished(self, summary):
        with self._lock:
            self.data["running"] = {}
            self.data["last_cycle"] = dict(summary, finished=utc_now_text())
            self.save()
