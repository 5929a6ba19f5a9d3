"""One sync cycle: plan from the portal, transfer each EPN in threads, verify, record, alert.

An EPN is recorded in ignore.yml only when rsync exited 0 and every file rsync listed for the
source is at the destination at its size. One EPN's failure never stops the others.
"""

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Dict, List

from mxsync import alerts
from mxsync.destination import check_destination_root
from mxsync.errors import DestinationError, RsyncError, StateFileError
from mxsync.plan import fetch_visits, make_plan, summarise
from mxsync.rsync import verify_destination

logger = logging.getLogger("mxsync.sync")


@dataclass
class CycleOutcome:
    synced: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)
    stopped: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    planned: int = 0

    @property
    def ok(self):
        """True when everything planned was synced and no source failed."""
        return not (self.failed or self.stopped or self.problems)

    def summary(self):
        return {
            "planned": self.planned,
            "synced": len(self.synced),
            "failed": sorted(self.failed),
            "stopped": sorted(self.stopped),
            "problems": self.problems,
        }


class Activity:
    """What the cycle is doing right now, for the terminal progress line and systemd's STATUS."""

    def __init__(self):
        self._lock = threading.Lock()
        self.phase = "starting"
        self.transfers = {}
        self.done = 0
        self.total = 0

    def update(self, epn, files, transferred_bytes):
        with self._lock:
            self.transfers[epn] = (files, transferred_bytes)

    def finish(self, epn):
        with self._lock:
            self.transfers.pop(epn, None)
            self.done += 1

    def describe(self):
        with self._lock:
            if not self.total:
                return self.phase
            running = ", ".join(
                f"{epn} {files} files {human_bytes(size)}" for epn, (files, size) in sorted(self.transfers.items())
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
        """Plan, transfer and record; return the CycleOutcome. Corrupt state files raise StateFileError."""
        synced = self.ignore.load()
        plan = self._plan(synced)
        if plan is not None and plan.transfers and self._destination_ready() and self._host_reachable():
            try:
                self._transfer_all(plan.transfers)
            finally:
                self.runner.close_shared_connection()
        if self.execute:
            self._alert_and_save()
        return self.outcome

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
            self.outcome.failed[epn] = "refused: unsafe destination"
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
        except (DestinationError, RsyncError) as error:
            logger.error("%s%s", error, consequence)
            self.history.source_result(source, str(error))
            self.outcome.problems.append(str(error))
            return False
        self.history.source_result(source)
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
        logger.info("%s: started, %s -> %s", epn, transfer.source, transfer.destination)
        if self.execute:
            self.history.epn_started(epn)
        try:
            result = self._transfer_with_retries(transfer)
            self._verify_and_record(transfer, result)
        except OSError as error:
            self._failed(epn, f"{epn}: cannot prepare {transfer.destination}: {error.strerror or error}")
        except StateFileError as error:  # ignore.yml could not be written
            self._failed(epn, str(error))
        except RsyncError as error:
            if self.stop.is_set() and error.returncode == 20:
                logger.warning("%s: stopped before it finished; nothing recorded", epn)
                self.outcome.stopped.append(epn)
                if self.execute:
                    self.history.epn_finished(epn, stopped=True)
            else:
                self._failed(epn, str(error))
        else:
            if self.execute:
                self.history.epn_finished(epn)
        finally:
            self.activity.finish(epn)

    def _failed(self, epn, message):
        logger.error("%s: FAILED: %s", epn, message)
        self.outcome.failed[epn] = message
        if self.execute:
            self.history.epn_finished(epn, error=message)

    def _transfer_with_retries(self, transfer):
        attempts = self.config.rsync_retries + 1
        for attempt in range(1, attempts + 1):
            if self.execute:
                os.makedirs(transfer.destination, exist_ok=True)
            try:
                return self.runner.transfer(
                    transfer.epn,
                    transfer.source,
                    transfer.destination,
                    progress=lambda result: self.activity.update(transfer.epn, len(result.files), result.bytes_transferred),
                )
            except RsyncError as error:
                if not error.transient or attempt == attempts or self.stop.is_set():
                    raise
                delay = self.config.rsync_retry_delay * 2 ** (attempt - 1)
                logger.warning("%s: %s; retrying in %.0f s (%d/%d)", transfer.epn, error, delay, attempt, attempts - 1)
                if self.stop.wait(delay):
                    raise
        raise AssertionError("unreachable")

    def _verify_and_record(self, transfer, result):
        epn = transfer.epn
        rate = result.bytes_transferred / result.seconds if result.seconds else 0
        figures = (
            f"{len(result.files)} files, {result.files_transferred} transferred, "
            f"{human_bytes(result.bytes_transferred)} in {result.seconds:.1f} s ({human_bytes(rate)}/s)"
        )
        if not self.execute:
            logger.info("%s: would sync: %s", epn, figures)
            self.outcome.synced.append(epn)
            return
        if not result.files:
            raise RsyncError(f"{epn}: the source holds no files yet; not recorded, will try again next cycle")
        problems = verify_destination(result, transfer.destination)
        if problems:
            raise RsyncError(
                f"{epn}: verification failed, {len(problems)} file(s) incomplete at the destination "
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
                    f"{epn}: verification failed, the source changed during the transfer "
                    f"({problems[0] if problems else f'{recheck.files_transferred} file(s) left to send'}); "
                    "not recorded, the next cycle sends the rest"
                )
        self.ignore.add([epn])
        self.outcome.synced.append(epn)
        logger.info("%s: synced and verified, recorded in %s: %s", epn, self.ignore.path.name, figures)

    def _alert_and_save(self):
        epns, sources = self.history.due_alerts(self.config.failure_alert_cycles)
        if (epns or sources) and alerts.send_failure_alert(self.config, epns, sources):
            self.history.mark_alerted(epns, sources)
        self.history.cycle_finished(self.outcome.summary())


def human_bytes(count):
    """Given a byte count, return it with a binary unit, e.g. '1.5 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
