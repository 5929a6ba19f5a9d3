"""What mxsync remembers between cycles besides ignore.yml: failures, outages, running EPNs, the last cycle.

Kept in `mxsync-state.json` beside ignore.yml; losing it costs only history, never a sync record.
"""

import threading
from datetime import datetime, timezone

from mxsync.state import JsonStore

STATE_FILE_NAME = "mxsync-state.json"
LOCK_FILE_NAME = "mxsync.lock"


def utc_now_text():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class History:
    """Failure counts per EPN and per source (portal, ssh, destination), plus the EPNs running now."""

    def __init__(self, state_dir, read_only=False):
        self.store = JsonStore(state_dir / STATE_FILE_NAME, "mxsync failure history")
        self.read_only = read_only
        self.data = self.store.load()
        for key in ("epns", "sources", "running"):
            if not isinstance(self.data.get(key), dict):
                self.data[key] = {}
        self._lock = threading.Lock()

    def save(self):
        if not self.read_only:
            self.store.save(self.data)

    def epn_started(self, epn):
        with self._lock:
            self.data["running"][epn] = utc_now_text()
            self.save()

    def epn_finished(self, epn, error=None, stopped=False):
        """Record the end of an EPN's attempt: a success clears its history, a failure counts one more."""
        with self._lock:
            self.data["running"].pop(epn, None)
            if stopped:
                pass  # an interrupted transfer says nothing about the EPN
            elif error is None:
                self.data["epns"].pop(epn, None)
            else:
                entry = self.data["epns"].setdefault(epn, {"failures": 0, "alerted": False})
                entry.update(failures=entry["failures"] + 1, last_error=error, last_attempt=utc_now_text())
            self.save()

    def source_result(self, source, error=None):
        """Count a cycle in which `source` (portal, ssh, destination) failed, or clear it."""
        with self._lock:
            if error is None:
                self.data["sources"].pop(source, None)
            else:
                entry = self.data["sources"].setdefault(source, {"failures": 0, "alerted": False, "since": utc_now_text()})
                entry.update(failures=entry["failures"] + 1, last_error=error, last_attempt=utc_now_text())

    def due_alerts(self, threshold, immediate=("destination",)):
        """Return (EPN entries, source entries) that reached their threshold and were not alerted yet."""
        epns = {epn: entry for epn, entry in self.data["epns"].items() if entry["failures"] >= threshold and not entry.get("alerted")}
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

    def cycle_finished(self, summary):
        with self._lock:
            self.data["running"] = {}
            self.data["last_cycle"] = dict(summary, finished=utc_now_text())
            self.save()
