"""One sync cycle: plan from the portal, transfer each EPN in threads, verify, record, alert.

An EPN is recorded in ignore.yml only when rsync exited 0 and every file rsync listed for the
source is at the destination at its size. One EPN's failure never stops the others.
"""

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from mxsync import alerts
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
from mxsync.plan import fetch_visits, make_plan, summarise

logger = logging.getLogger("mxsync.sync")

# Sources whose failure staff hear about at once: nothing can move until they are fixed.
IMMEDIATE_ALERTS = ("destination", "record", "config", "local")


@dataclass
class CycleOutcome:
    synced: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    planned: int = 0
    record_unreadable: bool = False

    @property
    def ok(self):
        """True when everything planned was synced or is waiting for its data, and no source failed."""
        return not (self.failed or self.stopped or self.problems)

    def summary(self):
        return {
            "planned": self.planned,
            "synced": len(self.synced),
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

    def __init__(self, config, portal, runner, ignore, history, execute, stop, activity=None):
        self.config = config
        self.portal = portal
        self.runner = runner
        self.ignore = ignore
        self.history = history
        self.execute = execute
        self.stop = stop
        self.activity = activity or Activity()
        self.outcome = CycleOutcome()

    def run(self):
        """Plan, transfer and record; return the CycleOutcome."""
        synced = self._read_record()
        plan = self._plan(synced) if synced is not None else None
        if plan is not None and plan.transfers and self._destination_ready() and self._host_reachable():
            try:
                self._transfer_all(plan.transfers)
            finally:
                self.runner.close()
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
        self.activity.phase = "asking the portal for visits"
        now = datetime.now(timezone.utc)
        current, previous, suspicious, errors, current_start = fetch_visits(self.config, self.portal, now)
        for error in errors:
            logger.error("%s", error)
        self.history.source_result("portal", "; ".join(errors) if errors else None)
        if errors and len(errors) >= len(self.config.equipment):
            self.outcome.problems.append("portal: " + errors[0])
            return None
        if errors:
            self.outcome.problems.append(f"portal: {len(errors)} request(s) failed; those visits were skipped")
        plan = make_plan(self.config, current, previous, synced, current_start, suspicious)
        logger.info("Plan (visits ended before %s): %s", current_start.isoformat(timespec="minutes"), summarise(plan))
        for epn in plan.unmapped:
            logger.info("%s: its number is not in epn_cap_map; not synced (epnalert reports it)", epn)
        for record in plan.suspicious:
            logger.warning("Suspicious record from %s: %s (%s)", record.source, record.name, record.reason)
        for epn in plan.refused:
            self._failed(epn, f"refused: {plan.refusals.get(epn, 'unsafe destination')}")
        self.outcome.planned = len(plan.transfers)
        return plan

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

    def _transfer_one(self, transfer):
        """Transfer, verify and record one EPN; every outcome lands in self.outcome, nothing is raised."""
        epn = transfer.epn
        if self.stop.is_set():
            self.outcome.stopped.append(epn)
            return
        try:
            if self._waiting_for_data(transfer):
                return
            logger.info("%s: started, %s -> %s", epn, transfer.source, transfer.destination)
            if self.execute:
                self.history.epn_started(epn)
            self.activity.start(epn)
            result = self._transfer_with_retries(transfer)
            self._verify_and_record(transfer, result)
        except TransferStopped:
            logger.warning("%s: stopped before it finished; nothing recorded", epn)
            self.outcome.stopped.append(epn)
            if self.execute:
                self.history.epn_finished(epn, stopped=True)
        except UnsafeNameError as error:
            self._failed(epn, f"refused: {error}")
        except OSError as error:
            self._failed(epn, f"cannot prepare {transfer.destination}: {error.strerror or error}")
        except (StateFileError, RsyncError) as error:  # ignore.yml could not be written, or rsync failed
            self._failed(epn, str(error))
        except Exception as error:  # a bug of ours: this EPN fails, the others and the service go on
            logger.exception("%s: unexpected error", epn)
            self._failed(epn, f"unexpected error (a bug; the traceback is in the log): {error!r}")
        else:
            if self.execute and epn in self.outcome.synced:
                self.history.epn_finished(epn)
        finally:
            self.activity.finish(epn)

    def _waiting_for_data(self, transfer):
        """Return True if the facility has no data for the EPN yet (no folder, or nothing in it): nothing to do."""
        if _has_entries(transfer.destination):
            return False  # a transfer began before, so the source had data
        state = self.runner.probe_source(transfer.epn, transfer.source)
        if state == "present":
            return False
        reason = "no folder at the facility yet" if state == "missing" else "its folder at the facility is empty"
        ended = transfer.visit.end
        overdue = ended is not None and datetime.now(timezone.utc) - ended > timedelta(
            hours=self.config.waiting_for_data_alert_hours
        )
        if overdue:
            message = f"waiting for data: {reason}, although its visit ended at {ended:%Y-%m-%d %H:%M %Z}"
            logger.warning("%s: %s", transfer.epn, message)
            self.outcome.failed[transfer.epn] = message  # staff must look: the data may be somewhere else
            if self.execute:
                self.history.epn_finished(transfer.epn, error=message)
        else:
            logger.info("%s: waiting for data: %s", transfer.epn, reason)
            self.outcome.waiting[transfer.epn] = reason
            if self.execute:
                self.history.epn_waiting(transfer.epn, reason)
        return True

    def _failed(self, epn, message):
        logger.error("%s: FAILED: %s", epn, message)
        self.outcome.failed[epn] = message
        if self.execute:
            self.history.epn_finished(epn, error=message)

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

    def _verify_and_record(self, transfer, result):
        epn = transfer.epn
        rate = result.bytes_transferred / result.seconds if result.seconds else 0
        figures = (
            f"{len(result.files)} files, {len(result.links)} symlinks, {result.files_transferred} transferred, "
            f"{human_bytes(result.bytes_transferred)} in {result.seconds:.1f} s ({human_bytes(rate)}/s)"
        )
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
        self.ignore.add([epn])
        self.outcome.synced.append(epn)
        logger.info("%s: synced and verified, recorded in %s: %s", epn, self.ignore.path.name, figures)

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


def human_bytes(count):
    """Given a byte count, return it with a binary unit, e.g. '1.5 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
