"""One sync cycle: ask the portal, place each EPN in its lifecycle, run the passes due, tell the listeners.

A live pass copies what a running (or settling) visit has so far and records nothing; the final pass, once the
visit has settled, is verified strictly, and only then is the EPN recorded in ignore.yml (mxsync.pipeline).
One EPN's failure never stops the others.
"""

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

from mxsync.bagging import Bagger
from mxsync.catalogue import VisitCatalogue
from mxsync.destination import check_destination_root
from mxsync.errors import DestinationError, ProcessStartError, RsyncError, StateFileError, TransferStopped
from mxsync.events import (
    CycleFinished,
    EpnFailed,
    Events,
    FailureAlerts,
    HistoryListener,
    PassEnded,
    Recorded,
    SourceChecked,
    VisitsSeen,
)
from mxsync.executor import LocalExecutor
from mxsync.followups import build_record
from mxsync.lifecycle import RETRY_FIRST, EpnFacts, PassKind, Timing, assess, describe
from mxsync.names import epn_number
from mxsync.pipeline import EpnPipeline, Pass, PassPolicy, PipelineSettings, human_bytes
from mxsync.plan import make_plan, summarise
from mxsync.scheduler import schedule

logger = logging.getLogger("mxsync.sync")

# When passes were due but the destination, the ssh host or the portal could not be used, look again this soon.
PROBLEM_RETRY = RETRY_FIRST


@dataclass
class CycleOutcome:
    """The cycle's tally, kept as a listener of its events."""

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
    dry_run: bool = False  # a dry run's verified final pass counts as synced: it would be

    @property
    def ok(self):
        """True when everything planned was synced or is waiting for its data, and no source failed."""
        return not (self.failed or self.stopped or self.problems)

    def hear(self, event):
        if isinstance(event, PassEnded):
            if event.outcome == "ok":
                if event.kind == "live":
                    self.live.append(event.epn)
                elif self.dry_run:
                    self.synced.append(event.epn)
            elif event.outcome == "no-data":
                self.waiting[event.epn] = event.message
            elif event.outcome == "failed":
                self.failed[event.epn] = event.message
            elif event.outcome == "stopped":
                self.stopped.append(event.epn)
        elif isinstance(event, Recorded):
            self.synced.append(event.epn)
        elif isinstance(event, EpnFailed):
            self.failed[event.epn] = event.message
        elif isinstance(event, SourceChecked) and event.error is not None:
            self.problems.append(event.summary or event.error)

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
    """Runs one cycle: record, plan, schedule, the passes due, and the events; `stop` ends it early."""

    def __init__(
        self,
        config,
        portal,
        runner,
        ignore,
        history,
        execute,
        stop,
        activity=None,
        retry_now=False,
        catalogue=None,
        followups=None,
    ):
        self.config = config
        self.portal = portal
        self.runner = runner
        self.ignore = ignore
        self.history = history
        self.execute = execute
        self.stop = stop
        self.activity = activity or Activity()
        self.outcome = CycleOutcome(dry_run=not execute)
        # Dry run is a policy: nothing that writes listens to it.
        self.followups = followups  # mxsync.followups.FollowUps: queues at Recording, runs after the passes
        listeners = [self.outcome, HistoryListener(history), FailureAlerts(config, history)] if execute else []
        if execute and followups is not None:
            listeners.insert(2, followups)  # after the history has the record, before the cycle's alerts
        self.events = Events(*(listeners or [self.outcome]))
        settings = PipelineSettings.from_config(config)
        bagger = None
        if config.bag:
            bagger = Bagger(
                settings,
                config.bag_algorithm,
                config.rsync_checksum,
                history,
                lambda epn: build_record(config, history, epn),
                config.ssh_target,
                stop,
            )
        self.pipeline = EpnPipeline(settings, runner, ignore, self.events, self.activity, stop, bagger)
        self.catalogue = catalogue or VisitCatalogue()  # a service keeps one, so visits outlive a cycle
        self.retry_now = retry_now  # a run by hand: failed and waiting EPNs are tried now, not after a delay
        self._poll = None  # when the portal's answer this cycle works from was given
        self._live_only = False  # the portal did not answer: this cycle works from an older answer, live passes only

    def run(self):
        """Plan, run the passes due, record; return the CycleOutcome."""
        now = datetime.now(timezone.utc)  # one moment for the whole plan: what is due is decided once
        synced = self._read_record()
        plan = self._plan(synced, now) if synced is not None else None
        passes = self._schedule(plan, synced, now) if plan is not None else []
        if passes and self._destination_ready() and self._host_reachable():
            try:
                self._run_all(passes)
            finally:
                self.runner.close()
            self._next_wake(plan)  # the passes just made moved their EPNs' next ones
        elif passes and self.stop.is_set():  # stopped before any began (e.g. while the connection started)
            for item in passes:
                self.events.emit(PassEnded(item.transfer.epn, item.policy.kind.value, "stopped"))
        elif passes or (synced is not None and plan is None):
            # Passes were due but the destination, the host or the portal was not usable: look again soon, not at
            # the next poll, which may be a day away.
            self.outcome.next_wake = now + PROBLEM_RETRY
            self.outcome.wake_reason = "a source every pass needs was not usable"
        if self._live_only and (self.outcome.next_wake is None or self.outcome.next_wake > now + PROBLEM_RETRY):
            self.outcome.next_wake = now + PROBLEM_RETRY  # final passes wait for the portal: ask it again soon
            self.outcome.wake_reason = "the portal is asked again"
        if synced is not None:
            self._follow_up()
        self.events.emit(CycleFinished(self.outcome))
        return self.outcome

    def _follow_up(self):
        """After the passes: run the follow-ups due (hooks, emails) of EPNs ignore.yml lists now."""
        if self.followups is None or self.stop.is_set():
            return
        try:
            recorded = self.ignore.load()
        except StateFileError as error:  # counted as the record's problem at the next cycle's start
            logger.error("Follow-ups wait: %s", error)
            return
        self.activity.phase = "running follow-ups"
        self.followups.run_due(recorded.__contains__, would_record=() if self.execute else self.outcome.synced)

    def _read_record(self):
        """Return the recorded EPNs, or None if ignore.yml is unreadable (nothing is transferred until it is fixed)."""
        try:
            synced = self.ignore.load()
        except StateFileError as error:
            message = f"{error}; no transfer starts until it is fixed, and mxsync retries by itself"
            logger.error("%s", message)
            self.events.emit(SourceChecked("record", message))
            self.outcome.record_unreadable = True
            return None
        self.events.emit(SourceChecked("record"))
        return synced

    def _plan(self, synced, now):
        """Return the Plan from the remembered visits if they suffice (no final pass due), else from a fresh poll."""
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
        for error in answer.errors:
            logger.error("%s", error)
        if answer.errors and len(answer.errors) >= len(self.config.equipment):
            self.events.emit(SourceChecked("portal", "portal: " + answer.errors[0]))
            return self._live_only_plan(synced, now)
        if answer.errors:  # the cycle goes on with the visits it has
            summary = f"portal: {len(answer.errors)} request(s) failed; those visits were skipped"
            self.events.emit(SourceChecked("portal", "; ".join(answer.errors), summary))
        else:
            self.events.emit(SourceChecked("portal"))
        plan = make_plan(self.config, answer.visits, synced, now, answer.suspicious)
        projects = {visit.epn: self.config.project_for(epn_number(visit.epn)) for visit in answer.visits}
        self.events.emit(VisitsSeen(answer.visits, projects))
        logger.info("Plan: %s", summarise(plan))
        for epn in plan.unmapped:
            logger.info("%s: its number is not in epn_cap_map; not synced (epnalert reports it)", epn)
        for record in plan.suspicious:
            logger.warning("Suspicious record from %s: %s (%s)", record.source, record.name, record.reason)
        for epn in plan.refused:
            message = f"refused: {plan.refusals.get(epn, 'unsafe destination')}"
            logger.error("%s: FAILED: %s", epn, message)
            self.events.emit(EpnFailed(epn, message))
        return plan

    def _live_only_plan(self, synced, now):
        """While the portal cannot answer, live passes go on from its last answer; final passes wait for it."""
        known = self.catalogue.last_known(self.config)
        if known is None:
            return None
        logger.warning(
            "Live passes go on from the portal's answer of %s; no final pass until the portal answers again",
            known.at.isoformat(timespec="minutes"),
        )
        self._live_only = True
        return make_plan(self.config, known.visits, synced, now, known.suspicious)

    def _schedule(self, plan, synced, now):
        """Place each candidate in its lifecycle; record what was verified before; return the passes due now."""
        # ignore.yml wins: an EPN removed by hand is synced again (logged there); a dry run's store is a copy.
        self.history.reconcile(synced)
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
        if self.execute:
            for epn in due.to_record:  # verified by an earlier final pass whose record could not be written
                self.pipeline.record(epn, "verified by an earlier pass")
        due_now = [item for item in due.passes if not (self._live_only and item.kind is PassKind.FINAL)]
        self.outcome.planned = len(due_now)
        return [Pass(candidates[item.epn], PassPolicy(item.kind, self.execute)) for item in due_now]

    def _assess(self, plan, now):
        """Return each candidate's lifecycle Entry, from its visits and the history of its passes."""
        timing = Timing.from_config(self.config)
        if self.retry_now:
            timing = replace(timing, retry_first=timedelta(0), retry_longest=timedelta(0), waiting_recheck=timedelta(0))
        passes = self.history.passes()  # one read for the whole plan, not two per EPN
        entries = []
        for candidate in plan.candidates:
            last, failures = passes.get(candidate.epn, (None, 0))
            entries.append(
                assess(EpnFacts(candidate.epn, candidate.visits, last_pass=last, failures=failures), now, timing)
            )
        return entries

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
            self.events.emit(SourceChecked("local", str(error)))
            return False
        except (DestinationError, RsyncError) as error:
            logger.error("%s%s", error, consequence)
            self.events.emit(SourceChecked(source, str(error)))
            return False
        self.events.emit(SourceChecked(source))
        if source == "ssh":
            self.events.emit(SourceChecked("local"))
        return True

    def _run_all(self, passes):
        self.activity.phase = "transferring"
        self.activity.total = len(passes)
        with LocalExecutor(self.config.max_tasks) as executor:
            # A stop reaches the passes themselves: each not yet started ends as stopped, and says so.
            executor.wait([executor.start(self.pipeline.run, item) for item in passes])
