"""What mxsync remembers between cycles besides ignore.yml: failures, outages, transfer passes, the last cycle.

Kept in the state store (`<state-dir>/mxsync.db`, mxsync.store), which epnalert shares. Losing it costs
only history, never a sync record: a store that cannot be opened or written is logged in one line and
mxsync goes on without it. Status and dry runs read a copy in memory, so they never write.
"""

import functools
import logging
import os
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple, Optional

from mxsync.errors import StoreError
from mxsync.store import HISTORY_FILE, Store

logger = logging.getLogger("mxsync.history")

STATE_FILE_NAME = HISTORY_FILE  # the retired JSON history, imported into the store once
LOCK_FILE_NAME = "mxsync.lock"
PASS_KINDS = ("live", "final")
PASS_OUTCOMES = ("ok", "failed", "no-data", "stopped")
# The alert kinds of the store's alerts table this module writes (the import of the JSON history writes them too).
EPN_ALERT, SOURCE_ALERT = "epn-failure", "source-failure"
FOLLOWUP_ALERT = "followup"
# A pass still open in the store that started before this process could not be finished by it: a crash cut it off.
_PROCESS_STARTED = datetime.now(timezone.utc)


class PassToken(NamedTuple):
    """What pass_started returns and pass_finished takes (id is None when the store is unavailable)."""

    id: Optional[int]
    epn: str
    kind: str
    started: Optional[datetime] = None


# The passes this process made, per state directory, for when the store cannot answer (a full or read-only disk):
# the lifecycle still knows them, so a broken store never makes live passes run at every wake or failed final
# passes come back at once. A verified final pass is never taken from here: only the store may lead to a record.
_RECENT_PASSES = {}
_NO_ANSWER = object()


@dataclass(frozen=True)
class LastPass:
    """The EPN's most recent pass, used when mxsync.lifecycle (whose LastPass has enums) is not there."""

    kind: str
    started: datetime
    finished: datetime
    outcome: str
    error: Optional[str] = None


def utc_now_text():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _text(moment):
    """A stored time as the alert email and status show it (UTC, to the second, as the JSON history did)."""
    return None if moment is None else moment.astimezone(timezone.utc).isoformat(timespec="seconds")


class History:
    """Failure counts per EPN and per source (portal, ssh, destination, ...), transfer passes, the last cycle."""

    def __init__(self, state_dir, read_only=False):
        self.read_only = read_only
        self.problem = None  # why there is no history, for status views
        self.rebuilt = None  # where a corrupt store was moved: the caller must reconcile() with ignore.yml
        self._store = None
        self._running = {}  # EPN -> PassToken of epn_started
        self._lock = threading.Lock()
        self._reported = set()  # causes of store errors logged at ERROR already: a full disk is one line
        self._recent = {} if read_only else _RECENT_PASSES.setdefault(os.path.realpath(state_dir), {})
        try:
            # A dry run or status view works on a copy in memory: it may "write", and nothing reaches the disk.
            self._store = Store.open(state_dir, dry_run=read_only)
        except StoreError as error:
            # Only history is lost: go on without it (an executing run tries again next cycle).
            self.problem = str(error)
            logger.log(
                logging.WARNING if read_only else logging.ERROR,
                "%s; going on without the failure history%s",
                error,
                "" if read_only else " this cycle",
            )
            return
        self.rebuilt = self._store.moved_aside
        if not read_only:
            self._close_interrupted()

    def close(self):
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def save(self):
        """Nothing to do: every change is in the store as soon as it is made (kept for old callers)."""

    # ------------------------------------------------------------ the store, never stopping a transfer

    def _call(self, doing, method, *arguments, default=None, **keywords):
        """Call a store method; a StoreError is logged (once at ERROR) and `default` returned: history never stops a run.

        A ValueError is a damaged value in the store (a time that is not one) or a pass finished twice (a bug of ours).
        """
        if self._store is None:
            return default
        try:
            return getattr(self._store, method)(*arguments, **keywords)
        except (StoreError, ValueError) as error:
            cause = str(error).rsplit(": ", 1)[-1]  # "database is locked ...", "database or disk is full", ...
            level = logging.DEBUG if cause in self._reported else logging.ERROR
            self._reported.add(cause)
            logger.log(level, "%s; cannot %s, the transfers go on", error, doing)
            return default

    def _close_interrupted(self):
        """Mark as interrupted the passes a previous mxsync left open (killed mid-transfer); the instance lock is ours."""
        for transfer in self._call("read the passes left open", "running_transfers", default=[]):
            if transfer.started < _PROCESS_STARTED:
                self._call(
                    f"close the interrupted pass of {transfer.epn}",
                    "transfer_finished",
                    transfer.id,
                    "interrupted",
                    error="mxsync stopped while it ran",
                )

    # ------------------------------------------------------------ EPNs (the cycle's calls)

    def epn_started(self, epn):
        """Note that a transfer of the EPN starts (a final pass: the cycle records what it verifies)."""
        token = self.pass_started(epn, "final")
        with self._lock:
            self._running[epn] = token

    def epn_finished(self, epn, error=None, stopped=False):
        """Record the end of an EPN's attempt: a success (verified and recorded in ignore.yml: the cycle calls this
        after the record) clears its failures, a failure counts one more, a stop says nothing."""
        with self._lock:
            token = self._running.pop(epn, None)
        outcome = "stopped" if stopped else "ok" if error is None else "failed"
        if token is not None:
            self._end_pass(token, outcome, error)
        if outcome == "ok":
            self.recorded(epn)
        else:  # a failure (before any transfer too: refused, waiting too long) counts; a stop says nothing
            self._epn_result(epn, outcome, error)

    def epn_waiting(self, epn, reason):
        """Note that the facility has no data for an EPN yet: not a failure, shown by `mxsync status`."""
        self._call(f"note that {epn} waits for data", "set_state", epn, "waiting", reason=reason)

    def recorded(self, epn):
        """Note that mxsync itself recorded the EPN in ignore.yml."""
        self._call(f"note that {epn} is recorded", "set_state", epn, "recorded", clear_failures=True)

    def reconcile(self, recorded_epns):
        """Make the store agree with ignore.yml, which wins; return the EPNs no longer recorded (their passes reset).

        Call it with what ignore.yml lists whenever `rebuilt` is set, and best every cycle (a hand edit re-syncs).
        """
        found = self._call("reconcile the history with ignore.yml", "reconcile_recorded", recorded_epns)
        reopened = found[1] if found else set()
        if reopened:
            logger.info("No longer in ignore.yml, so synced again: %s", ", ".join(sorted(reopened)))
        return reopened

    def _epn_result(self, epn, outcome, error):
        """What a final pass (or a failure before one) says about the EPN, for its failure count and status."""
        if outcome == "failed":
            self._call(f"count the failure of {epn}", "set_state", epn, "failed", error=error)
        elif outcome == "ok":
            self._call(f"clear the failures of {epn}", "set_state", epn, "verified", clear_failures=True)
        elif outcome == "no-data":
            reason = error or "no data at the facility yet"
            self._call(f"note that {epn} waits for data", "set_state", epn, "waiting", reason=reason)
        # stopped: an interrupted transfer says nothing about the EPN

    def seen(self, source, projects, visits=()):
        """Note the EPNs `source` ("portal", "sftp") lists now ({EPN: project or None}) and the visits it gave."""
        self._call(f"note the EPNs the {source} lists", "record_seen", source, projects)
        if visits:
            self._call("note the portal's visits", "record_visits", visits)

    # ------------------------------------------------------------ passes (the lifecycle's calls)

    def pass_started(self, epn, kind):
        """Record the start of a live or final pass of the EPN; return the token for pass_finished."""
        if kind not in PASS_KINDS:
            raise ValueError(f"unknown pass kind {kind!r}; expected one of {', '.join(PASS_KINDS)}")
        started = datetime.now(timezone.utc)
        return PassToken(
            self._call(f"record the start of a pass of {epn}", "transfer_started", epn, kind), epn, kind, started
        )

    def pass_finished(self, token, outcome, error=None, files=None, bytes_transferred=None):
        """Record how a pass ended (ok, failed, no-data, stopped); a final pass also counts for failure alerts."""
        if outcome not in PASS_OUTCOMES:
            raise ValueError(f"unknown pass outcome {outcome!r}; expected one of {', '.join(PASS_OUTCOMES)}")
        with self._lock:
            if self._running.get(token.epn) == token:
                del self._running[token.epn]
        self._end_pass(token, outcome, error, files=files, bytes_transferred=bytes_transferred)
        if token.kind == "live" or outcome != "ok":
            finished = datetime.now(timezone.utc)
            self._recent[token.epn] = (token.kind, token.started or finished, finished, outcome, error)
        else:
            self._recent.pop(token.epn, None)
        if token.kind == "final":  # live passes copy growing data: their troubles are not the EPN's failures
            self._epn_result(token.epn, outcome, error)

    def _end_pass(self, token, outcome, error, **figures):
        if token.id is not None:
            self._call(
                f"record the end of a pass of {token.epn}",
                "transfer_finished",
                token.id,
                outcome,
                error=error,
                **figures,
            )

    def last_pass(self, epn):
        """Return the EPN's most recent finished pass (mxsync.lifecycle.LastPass if that module exists), or None."""
        transfer = self._call(f"read the last pass of {epn}", "last_pass", epn, default=_NO_ANSWER)
        if transfer is _NO_ANSWER:  # the store cannot answer: what this process did, if anything
            recent = self._recent.get(epn)
            return None if recent is None else _last_pass_maker()(*recent)
        return None if transfer is None else _last_pass(transfer)

    def failures(self, epn):
        """Return how many passes of the EPN failed in a row."""
        return self._call(f"read the failures of {epn}", "failed_passes", epn, default=0)

    def passes(self):
        """Return {EPN: (last_pass, failures)} for every EPN with a pass, in two queries (for a whole plan)."""
        found = self._call("read the passes", "passes", default=_NO_ANSWER)
        if found is _NO_ANSWER:  # the store cannot answer: what this process did, as last_pass gives it
            return {epn: (_last_pass_maker()(*recent), 0) for epn, recent in self._recent.items()}
        return {epn: (_last_pass(transfer), failures) for epn, (transfer, failures) in found.items()}

    # ------------------------------------------------------------ checksums for the bag (mxsync.bagging)

    def save_checksums(self, epn, algorithm, entries):
        self._call(f"keep the checksums of {epn}", "save_checksums", epn, algorithm, entries)

    def checksums(self, epn):
        """Return the checksums kept for the EPN (mxsync.store.Store.checksums); {} if the store cannot answer."""
        return self._call(f"read the checksums of {epn}", "checksums", epn, default={})

    # ------------------------------------------------------------ follow-ups of a record (mxsync.followups)

    def followup_queue(self, epn, actions):
        self._call(f"queue the follow-ups of {epn}", "followup_queue", epn, actions)

    def followups_due(self):
        return self._call("read the follow-ups due", "followups_due", default=[])

    def followup_started(self, epn, action):
        self._call(f"note the start of {action} for {epn}", "followup_started", epn, action)

    def followup_finished(self, epn, action, error=None, give_up=False):
        self._call(f"record the outcome of {action} for {epn}", "followup_finished", epn, action, error, give_up)

    def followup_alerted(self, epn, action):
        self._call("record the follow-up alert", "alert_sent", FOLLOWUP_ALERT, [f"{epn} {action}"])

    def visits(self, epn):
        """Return the EPN's stored visits (mxsync.store.VisitRecord), earliest first; [] if the store cannot answer."""
        return self._call(f"read the visits of {epn}", "visits", epn, default=[])

    def last_verified_pass(self, epn):
        """Return the EPN's last final pass that succeeded (mxsync.store.Transfer), or None."""
        transfers = self._call(f"read the passes of {epn}", "transfers", epn, default=[])
        verified = [transfer for transfer in transfers if transfer.kind == "final" and transfer.outcome == "ok"]
        return verified[-1] if verified else None

    # ------------------------------------------------------------ sources, alerts, the cycle

    def source_result(self, source, error=None):
        """Count a cycle in which `source` (portal, ssh, destination, ...) failed, or clear it."""
        if error is not None:
            self._call(f"count the failure of {source}", "source_failed", source, error)
        elif source in self._call("read the failing sources", "source_failures", default={}):
            self._call(f"clear the failures of {source}", "source_ok", source)

    def due_alerts(self, threshold, immediate=("destination",)):
        """Return (EPN entries, source entries) that reached their threshold and were not alerted yet."""
        epns = {
            epn: _entry(state.failures, state.failing_since, state.last_error, state.last_failure)
            for epn, state in self._call("read the failing EPNs", "failing", threshold, default={}).items()
            if not self._alerted(EPN_ALERT, epn, state.failing_since)
        }
        sources = {
            name: _entry(*source[1:])
            for name, source in self._call("read the failing sources", "source_failures", default={}).items()
            if source.failures >= (1 if name in immediate else threshold)
            and not self._alerted(SOURCE_ALERT, name, source.since)
        }
        return epns, sources

    def _alerted(self, kind, key, since):
        """True if an alert of `kind` about `key` went out during its current run of failures (since `since`)."""
        return bool(self._call("read the alerts sent", "alerts_since", since, kind, key, default=[True]))

    def mark_alerted(self, epns, sources):
        now = datetime.now(timezone.utc)
        for kind, keys in ((EPN_ALERT, sorted(epns)), (SOURCE_ALERT, sorted(sources))):
            if keys:
                self._call("record the failure alert", "alert_sent", kind, keys, when=now)

    def cycle_finished(self, summary):
        with self._lock:
            left, self._running = list(self._running.values()), {}
        for token in left:  # a pass the cycle never finished (the JSON history forgot them here too)
            self.pass_finished(token, "stopped", error="the cycle ended while it ran")
        self._call("save the cycle summary", "set_note", "last_cycle", dict(summary, finished=utc_now_text()))

    # ------------------------------------------------------------ what status shows

    def failing_epns(self):
        """Return {EPN: {failures, since, last_error, last_attempt, alerted}} of the EPNs failing now."""
        found = self._call("read the failing EPNs", "failing", default={})
        return {
            epn: _entry(state.failures, state.failing_since, state.last_error, state.last_failure)
            for epn, state in found.items()
        }

    def failing_sources(self):
        """Return {source: {failures, since, last_error, last_attempt, alerted}} of the sources failing now."""
        found = self._call("read the failing sources", "source_failures", default={})
        return {name: _entry(*source[1:]) for name, source in found.items()}

    def waiting_epns(self):
        """Return {EPN: {since, reason}} of the EPNs waiting for data at the facility."""
        found = self._call("read the EPNs waiting for data", "states", "waiting", default={})
        return {epn: {"since": _text(state.since), "reason": state.reason} for epn, state in found.items()}

    def last_cycle(self):
        """Return the summary of the last cycle that finished (with `finished`), or None."""
        found = self._call("read the last cycle", "get_note", "last_cycle")
        return found if isinstance(found, dict) else None


def _entry(failures, since, last_error, last_attempt):
    """A failing EPN or source as the alert email (mxsync.alerts) and status read it."""
    return {
        "failures": failures,
        "since": _text(since),
        "last_error": last_error,
        "last_attempt": _text(last_attempt),
        "alerted": False,
    }


def _last_pass(transfer):
    """A store Transfer as the lifecycle's LastPass."""
    # Interrupted (or, in a damaged store, unknown): neither success nor failure, so due again at once.
    outcome = transfer.outcome if transfer.outcome in PASS_OUTCOMES else "stopped"
    finished = transfer.ended or transfer.started  # an imported interrupted pass has no end
    return _last_pass_maker()(transfer.kind, transfer.started, finished, outcome, transfer.error)


@functools.cache
def _last_pass_maker():
    """Return make(kind, started, finished, outcome, error): mxsync.lifecycle's LastPass if it exists, else ours.

    Looked up once: a failed import searches sys.path, which for 10,000 EPNs took over a second.
    """
    try:
        from mxsync.lifecycle import LastPass as LifecycleLastPass
        from mxsync.lifecycle import Outcome, PassKind
    except ImportError:
        return LastPass
    return lambda kind, started, finished, outcome, error: LifecycleLastPass(
        PassKind(kind), started, finished, Outcome(outcome), error
    )
