"""One sync cycle: ask the portal, place each EPN in its lifecycle, run the passes due, verify, record, alert.

A live pass copies what a running (or settling) visit has so far and records nothing; the final pass, once the
visit has settled, is verified strictly, and only then is the EPN recorded in ignore.yml: rsync exited 0 and
every file rsync listed for the source is at the destination at its size. One EPN's failure never stops the others.
"""

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

from mxsync import alerts
from mxsync.catalogue import VisitCatalogue
from mxsync.destination import check_destination_root, writable_destination
from mxsync.errors import (
    DestinationError,
    ProcessStartError,
    RsyncError,
    StateFileError,
    TransferStopped,
    UnsafeNameError,
)
from mxsync.itemize import verify_destination
from mxsync.lifecycle import EpnFacts, PassKind, Timing, assess, describe
from mxsync.plan import make_plan, summarise
from mxsync.scheduler import schedule

logger = logging.getLogger("mxsync.sync")

# Sources whose failure staff hear about at once: nothing can move until they are fixed.
IMMEDIATE_ALERTS = ("destination", "record", "config", "local")


@dataclass(frozen=True)
class PassPolicy:
    """What one pass may do: a live pass records nothing and lets the source grow; a dry run writes nothing."""

    kind: PassKind
    writes: bool

    @property
    def final(self):
        return self.kind is PassKind.FINAL

    @property
    def records(self):
        return self.final and self.writes


@dataclass(frozen=True)
class Pass:
    transfer: object  # mxsync.plan.PlannedTransfer
    policy: PassPolicy


@dataclass
class CycleOutcome:
    synced: list[str] = field(default_factory=list)
    live: list[str] = field(default_factory=list)  # EPNs copied by a live pass: data home, nothing recorded
    failed: dict[str, str] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    planned: int = 0
    record_unreadable: bool = False
    next_wake: object = None  # when a pass comes due next (a datetime), or None: the next poll
    wake_reason: str = ""

    @property
    def ok(self):
        """True when everything planned was synced or is waiting for its data, and no source failed."""
        return not (self.failed or self.stopped or self.problems)

    def summary(self):
        return {
            "planned": self.planned,
            "synced": len(self.synced),
            "live": len(self.live),
            "failed": sorted(self.failed),
            "stopped": sorted(self.stopped),
            "waiting": sorted(self.waiting),
            "problems": self.problems,
        }


class Activity:
    """What the cycle is doing right now, for the terminal progress line, systemd's STATUS and `mxsync status`."""

    def __init__(self):
        self._lock = threading.Lock()
        self.phase = "starting"
        self.transfers = {}
        self.done = 0
        self.total = 0

    def start(self, epn):
        with self._lock:
            self.transfers[epn] = {"started": time.time(), "files": 0, "bytes": 0}

    def update(self, epn, files, transferred_bytes):
        with self._lock:
            self.transfers.setdefault(epn, {"started": time.time()}).update(files=files, bytes=transferred_bytes)

    def finish(self, epn):
        with self._lock:
            self.transfers.pop(epn, None)
            self.done += 1

    def snapshot(self):
        """Return the phase and a copy of every running transfer's figures."""
        with self._lock:
            return {
                "phase": self.phase,
                "done": self.done,
                "total": self.total,
                "transfers": {epn: dict(figures) for epn, figures in self.transfers.items()},
            }

    def describe(self):
        with self._lock:
            if not self.total:
                return self.phase
            running = ", ".join(
                f"{epn} {figures.get('files', 0)} files {human_bytes(figures.get('bytes', 0))}"
                for epn, figures in sorted(self.transfers.items())
            )
            return f"{self.phase}: {self.done}/{self.total} done" + (f"; {running}" if running else "")


class SyncCycle:
    """Runs one cycle against the given runner, record and history; `stop` ends it early."""

    def __init__(
        self, config, portal, runner, ignore, history, execute, stop, activity=None, retry_now=False, catalogue=None
    ):
        self.config = config
        self.portal = portal
        self.runner = runner
        self.ignore = ignore
        self.history = history
        self.execute = execute
        self.stop = stop
        self.activity = activity or Activity()
        self.outcome = CycleOutcome()
        self.catalogue = catalogue or VisitCatalogue()  # a service keeps one, so visits outlive a cycle
        self.retry_now = retry_now  # a run by hand: failed and waiting EPNs are tried now, not after a delay
        self.figures = {}  # EPN -> its verified transfer's figures, for the record's log line
        self._poll = None  # when the portal was asked this cycle

    def run(self):
        """Plan, transfer and record; return the CycleOutcome."""
        synced = self._read_record()
        plan = self._plan(synced) if synced is not None else None
        passes = self._schedule(plan, synced) if plan is not None else []
        if passes and self._destination_ready() and self._host_reachable():
            try:
                self._transfer_all(passes)
            finally:
                self.runner.close()
            self._next_wake(plan)  # the passes just made moved their EPNs' next ones
        if self.execute:
            self._alert_and_save()
        return self.outcome

    def _read_record(self):
        """Return the recorded EPNs, or None if ignore.yml is unreadable (nothing is transferred until it is fixed)."""
        try:
            synced = self.ignore.load()
        except StateFileError as error:
            message = f"{error}; no transfer starts until it is fixed, and mxsync retries by itself"
            logger.error("%s", message)
            self.history.source_result("record", message)
            self.outcome.problems.append(str(error))
            self.outcome.record_unreadable = True
            return None
        self.history.source_result("record")
        return synced

    def _plan(self, synced):
        """Return the Plan from the remembered visits if they suffice (no final pass due), else from a fresh poll."""
        now = datetime.now(timezone.utc)
        answer = self.catalogue.remembered(self.config, now)
        if answer is not None:
            plan = make_plan(self.config, answer.visits, synced, now, answer.suspicious)
            if not self._final_pass_due(plan, now):
                logger.info(
                    "Plan from the portal's answer of %s (asked again by %s or before a final pass): %s",
                    answer.at.isoformat(timespec="minutes"),
                    (answer.at + timedelta(hours=self.config.sync_frequency_hours)).isoformat(timespec="minutes"),
                    summarise(plan),
                )
                self._poll = answer.at
                return plan
        return self._poll_portal(synced, now)

    def _final_pass_due(self, plan, now):
        return any(entry.next_pass is PassKind.FINAL and entry.due <= now for entry in self._assess(plan, now))

    def _poll_portal(self, synced, now):
        self.activity.phase = "asking the portal for visits"
        answer = self.catalogue.poll(self.config, self.portal, now)
        self._poll = now
        visits, suspicious, errors = answer.visits, answer.suspicious, answer.errors
        for error in errors:
            logger.error("%s", error)
        self.history.source_result("portal", "; ".join(errors) if errors else None)
        if errors and len(errors) >= len(self.config.equipment):
            self.outcome.problems.append("portal: " + errors[0])
            return None
        if errors:
            self.outcome.problems.append(f"portal: {len(errors)} request(s) failed; those visits were skipped")
        plan = make_plan(self.config, visits, synced, now, suspicious)
        logger.info("Plan: %s", summarise(plan))
        for epn in plan.unmapped:
            logger.info("%s: its number is not in epn_cap_map; not synced (epnalert reports it)", epn)
        for record in plan.suspicious:
            logger.warning("Suspicious record from %s: %s (%s)", record.source, record.name, record.reason)
        for epn in plan.refused:
            self._failed(epn, f"refused: {plan.refusals.get(epn, 'unsafe destination')}")
        return plan

    def _schedule(self, plan, synced):
        """Place each candidate in its lifecycle; record what was verified before; return the passes due now."""
        now = datetime.now(timezone.utc)
        if self.execute:
            for epn in self.history.reconcile(synced):
                logger.info("%s: no longer in %s (removed by hand): it is synced again", epn, self.ignore.path.name)
        candidates = {candidate.epn: candidate for candidate in plan.candidates}
        entries = self._assess(plan, now)
        for entry in entries:
            # A dry run is for looking: every EPN's place in its lifecycle; a service logs it at DEBUG.
            logger.log(logging.DEBUG if self.execute else logging.INFO, "%s", describe(entry, now))
        due = schedule(entries, now, self.config.sync_frequency_hours, max(1, len(entries)), last_poll=self._poll)
        counts = {}
        for entry in entries:
            counts[entry.state.value] = counts.get(entry.state.value, 0) + 1
        logger.info(
            "Lifecycle: %s; due now: %d final, %d live pass(es); next: %s at %s",
            ", ".join(f"{count} {state}" for state, count in sorted(counts.items())) or "no EPN to follow",
            sum(item.kind is PassKind.FINAL for item in due.passes),
            sum(item.kind is PassKind.LIVE for item in due.passes),
            due.wake.reason.value,
            due.wake.at.isoformat(timespec="minutes"),
        )
        self.outcome.next_wake, self.outcome.wake_reason = due.wake.at, due.wake.reason.value
        for epn in due.to_record:  # verified by an earlier final pass whose record could not be written
            if self.execute:
                self._record(epn, "verified by an earlier pass")
        self.outcome.planned = len(due.passes)
        return [Pass(candidates[item.epn], PassPolicy(item.kind, self.execute)) for item in due.passes]

    def _assess(self, plan, now):
        """Return each candidate's lifecycle Entry, from its visits and the history of its passes."""
        timing = Timing.from_config(self.config)
        if self.retry_now:
            timing = replace(timing, retry_first=timedelta(0), retry_longest=timedelta(0), waiting_recheck=timedelta(0))
        return [
            assess(
                EpnFacts(
                    candidate.epn,
                    candidate.visits,
                    last_pass=self.history.last_pass(candidate.epn),
                    failures=self.history.failures(candidate.epn),
                ),
                now,
                timing,
            )
            for candidate in plan.candidates
        ]

    def _next_wake(self, plan):
        now = datetime.now(timezone.utc)
        due = schedule(self._assess(plan, now), now, self.config.sync_frequency_hours, 1, last_poll=self._poll)
        # A pass due again at once (stopped, or one that could not start) waits for the service's shortest pause.
        self.outcome.next_wake, self.outcome.wake_reason = due.wake.at, due.wake.reason.value

    def _destination_ready(self):
        def check():
            if self.execute:
                check_destination_root(self.config)
            elif not self.config.destination_root.is_dir():
                raise DestinationError(f"destination-root-path {self.config.destination_root} does not exist")

        return self._source_usable("destination", check)

    def _host_reachable(self):
        self.activity.phase = f"connecting to {self.config.ssh_target}"
        return self._source_usable("ssh", self.runner.connect, consequence="; no transfer started this cycle")

    def _source_usable(self, source, check, consequence=""):
        """Run check(); return True, or log the failure, count it against `source` and return False."""
        try:
            check()
        except TransferStopped:
            return False
        except ProcessStartError as error:  # rsync or ssh cannot run here: ours to fix, not the facility's
            logger.error("%s%s", error, consequence)
            self.history.source_result("local", str(error))
            self.outcome.problems.append(str(error))
            return False
        except (DestinationError, RsyncError) as error:
            logger.error("%s%s", error, consequence)
            self.history.source_result(source, str(error))
            self.outcome.problems.append(str(error))
            return False
        self.history.source_result(source)
        if source == "ssh":
            self.history.source_result("local")
        return True

    def _transfer_all(self, transfers):
        self.activity.phase = "transferring"
        self.activity.total = len(transfers)
        with ThreadPoolExecutor(max_workers=self.config.max_tasks, thread_name_prefix="rsync") as pool:
            for _ in pool.map(self._transfer_one, transfers):
                pass

    def _transfer_one(self, item):
        """Run one pass of one EPN; every outcome lands in self.outcome and the history, nothing is raised."""
        epn = item.transfer.epn
        if self.stop.is_set():
            self.outcome.stopped.append(epn)
            return
        token = self.history.pass_started(epn, item.policy.kind.value) if item.policy.writes else None
        outcome, error = self._run_pass(item.transfer, item.policy)
        if token is not None:
            self.history.pass_finished(token, outcome, error)
        if outcome == "ok" and item.policy.records:  # verified, and remembered as such before the record
            self._record(epn, "synced and verified")

    def _run_pass(self, transfer, policy):
        """Transfer, then verify and record (final pass) or report (live pass); return (outcome, error or None)."""
        epn = transfer.epn
        try:
            waiting = self._waiting_for_data(transfer, policy)
            if waiting is not None:
                return waiting, self.outcome.failed.get(epn)
            if policy.final:
                logger.info("%s: started, %s -> %s", epn, transfer.source, transfer.destination)
            else:
                logger.info("%s: live pass started (its visit is not over), %s", epn, transfer.source)
            if policy.records:
                self.history.epn_started(epn)
            self.activity.start(epn)
            result = self._transfer_with_retries(transfer)
            if not policy.final:
                self._report_live(transfer, result)
                return "ok", None
            self._verify(transfer, result)
        except TransferStopped:
            logger.warning("%s: stopped before it finished; nothing recorded", epn)
            self.outcome.stopped.append(epn)
            if policy.records:
                self.history.epn_finished(epn, stopped=True)
            return "stopped", None
        except UnsafeNameError as error:
            return "failed", self._failed(epn, f"refused: {error}", policy)
        except OSError as error:
            return "failed", self._failed(
                epn, f"cannot prepare {transfer.destination}: {error.strerror or error}", policy
            )
        except RsyncError as error:
            if not policy.final and error.source_changed:
                logger.info("%s: live pass done; files changed at the facility while it ran (expected): %s", epn, error)
                self.outcome.live.append(epn)
                return "ok", None
            return "failed", self._failed(epn, str(error), policy)
        except Exception as error:  # a bug of ours: this EPN fails, the others and the service go on
            logger.exception("%s: unexpected error", epn)
            return "failed", self._failed(
                epn, f"unexpected error (a bug; the traceback is in the log): {error!r}", policy
            )
        finally:
            self.activity.finish(epn)
        return "ok", None

    def _waiting_for_data(self, transfer, policy):
        """Return None if the facility has data for the EPN; else the pass's outcome: "no-data", or "failed" once its
        visit ended more than waiting-for-data-alert-hours ago (staff must look: the data may be elsewhere)."""
        if _has_entries(transfer.destination):
            return None  # a transfer began before, so the source had data
        state = self.runner.probe_source(transfer.epn, transfer.source)
        if state == "present":
            return None
        reason = "no folder at the facility yet" if state == "missing" else "its folder at the facility is empty"
        ended = transfer.visit.end
        overdue = (
            policy.final
            and ended is not None
            and datetime.now(timezone.utc) - ended > timedelta(hours=self.config.waiting_for_data_alert_hours)
        )
        if overdue:
            message = f"waiting for data: {reason}, although its visit ended at {ended:%Y-%m-%d %H:%M %Z}"
            logger.warning("%s: %s", transfer.epn, message)
            self.outcome.failed[transfer.epn] = message  # staff must look: the data may be somewhere else
            if self.execute:
                self.history.epn_finished(transfer.epn, error=message)
            return "failed"
        logger.info("%s: waiting for data: %s", transfer.epn, reason)
        self.outcome.waiting[transfer.epn] = reason
        if self.execute:
            self.history.epn_waiting(transfer.epn, reason)
        return "no-data"

    def _failed(self, epn, message, policy=None):
        """Log and count a failure; a live pass's failure is retried later but never alerted. Return the message."""
        live = policy is not None and not policy.final
        logger.log(
            logging.WARNING if live else logging.ERROR, "%s: %sFAILED: %s", epn, "live pass " if live else "", message
        )
        self.outcome.failed[epn] = message
        if self.execute and not live:
            self.history.epn_finished(epn, error=message)
        return message

    def _transfer_with_retries(self, transfer):
        attempts = self.config.rsync_retries + 1
        for attempt in range(1, attempts + 1):
            if self.execute:  # rsync writes into the open data folder, closed to the project's group meanwhile
                folders = writable_destination(self.config, transfer.destination)
            else:
                folders = nullcontext(transfer.destination)
            try:
                with folders as destination:
                    return self.runner.transfer(
                        transfer.epn,
                        transfer.source,
                        destination,
                        progress=lambda result: self.activity.update(
                            transfer.epn, len(result.files), result.bytes_transferred
                        ),
                    )
            except RsyncError as error:
                if not error.transient or attempt == attempts or self.stop.is_set():
                    raise
                delay = self.config.rsync_retry_delay * 2 ** (attempt - 1)
                logger.warning("%s: %s; retrying in %.0f s (%d/%d)", transfer.epn, error, delay, attempt, attempts - 1)
                if self.stop.wait(delay):
                    raise TransferStopped(f"{transfer.epn}: stopped while waiting to retry") from None
        raise AssertionError("unreachable")

    def _report_live(self, transfer, result):
        logger.info("%s: live pass done, nothing recorded (its visit is not over): %s", transfer.epn, _figures(result))
        self.outcome.live.append(transfer.epn)

    def _verify(self, transfer, result):
        """Raise RsyncError unless every file the source holds is at the destination at its size (a final pass)."""
        epn = transfer.epn
        figures = _figures(result)
        for link in result.unsafe_links:
            logger.warning("%s: symlink %s points outside the EPN; not copied", epn, link)
        if not self.execute:
            logger.info("%s: would sync: %s", epn, figures)
            self.outcome.synced.append(epn)
            return
        if result.empty:
            raise RsyncError("the source holds no files yet; not recorded, will try again next cycle")
        problems = verify_destination(result, transfer.destination)
        if problems:
            raise RsyncError(
                f"verification failed, {len(problems)} file(s) incomplete at the destination "
                f"(first: {problems[0]}); not recorded"
            )
        # rsync's own list is from before the transfer: a file that grew while it was sent (processing still
        # writing after the visit ended) arrives short yet matches it. So after a transfer that moved anything, a
        # dry run against a fresh listing of the source must find nothing left to send. (A run that moved nothing
        # was itself such a comparison.)
        if result.files_transferred:
            recheck = self.runner.transfer(epn, transfer.source, transfer.destination, dry_run=True)
            problems = verify_destination(recheck, transfer.destination)
            if problems or recheck.files_transferred:
                raise RsyncError(
                    "verification failed, the source changed during the transfer "
                    f"({problems[0] if problems else f'{recheck.files_transferred} file(s) left to send'}); "
                    "not recorded, the next cycle sends the rest"
                )
        self.figures[epn] = figures

    def _record(self, epn, how):
        """Add a verified EPN to ignore.yml; if that fails it stays verified, and the next cycle records it."""
        try:
            self.ignore.add([epn])
        except StateFileError as error:
            self._failed(epn, f"verified but not recorded: {error}")
            return
        self.history.recorded(epn)
        self.history.epn_finished(epn)
        self.outcome.synced.append(epn)
        figures = self.figures.pop(epn, None)
        logger.info("%s: %s, recorded in %s%s", epn, how, self.ignore.path.name, f": {figures}" if figures else "")

    def _alert_and_save(self):
        epns, sources = self.history.due_alerts(self.config.failure_alert_cycles, immediate=IMMEDIATE_ALERTS)
        if (epns or sources) and alerts.send_failure_alert(self.config, epns, sources):
            self.history.mark_alerted(epns, sources)
        self.history.cycle_finished(self.outcome.summary())


def _has_entries(folder):
    """True if `folder` exists and holds anything (an empty one may be left by an older version)."""
    try:
        with os.scandir(folder) as entries:
            return any(True for _ in entries)
    except OSError:
        return False


def _figures(result):
    rate = result.bytes_transferred / result.seconds if result.seconds else 0
    return (
        f"{len(result.files)} files, {len(result.links)} symlinks, {result.files_transferred} transferred, "
        f"{human_bytes(result.bytes_transferred)} in {result.seconds:.1f} s ({human_bytes(rate)}/s)"
    )


def human_bytes(count):
    """Given a byte count, return it with a binary unit, e.g. '1.5 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
