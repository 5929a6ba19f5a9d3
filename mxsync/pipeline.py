"""One pass of one EPN: look for its data, transfer (with retries), verify if it is the final pass, record.

What a pass may do is its PassPolicy: a live pass lets the source grow and records nothing; the final pass is
verified strictly and then recorded in ignore.yml; a dry run writes nothing at all. What happened is told to
the events (mxsync.events), never written here.
"""

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from mxsync.destination import writable_destination
from mxsync.errors import BagError, RsyncError, StateFileError, TransferStopped, UnsafeNameError
from mxsync.events import EpnFailed, PassEnded, PassStarted, Recorded, Recording
from mxsync.itemize import verify_destination
from mxsync.lifecycle import PassKind

logger = logging.getLogger("mxsync.pipeline")


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


@dataclass(frozen=True)
class PipelineSettings:
    """The slice of the config a pass needs."""

    destination_root: object
    rsync_retries: int
    rsync_retry_delay: float
    waiting_for_data_alert_hours: float

    @classmethod
    def from_config(cls, config):
        return cls(
            config.destination_root,
            config.rsync_retries,
            config.rsync_retry_delay,
            config.waiting_for_data_alert_hours,
        )


class EpnPipeline:
    """Runs passes: transfer -> verify -> bag -> record -> events. One pipeline serves every pass of a cycle."""

    def __init__(self, settings, runner, ignore, events, activity, stop, bagger=None):
        self.settings = settings
        self.bagger = bagger  # mxsync.bagging.Bagger, or None when bag: false
        self.runner = runner
        self.ignore = ignore
        self.events = events
        self.activity = activity
        self.stop = stop

    def run(self, item):
        """Run one pass; every outcome goes to the events, nothing is raised."""
        transfer, policy = item.transfer, item.policy
        kind = policy.kind.value
        if self.stop.is_set():
            self.events.emit(PassEnded(transfer.epn, kind, "stopped"))
            return
        self.events.emit(PassStarted(transfer.epn, kind))
        ended = self._transfer_and_check(transfer, policy)
        self.events.emit(ended)
        if ended.outcome == "ok" and policy.records:  # remembered as verified before the record is written
            self.record(transfer.epn, "synced and verified", ended.figures)

    def record(self, epn, how, figures=None):
        """Add a verified EPN to ignore.yml.

        The store hears of the record first: if ignore.yml then cannot be written (or mxsync dies in between),
        the two disagree, ignore.yml wins, and the next cycle syncs the EPN again; never the other way round.
        """
        self.events.emit(Recording(epn))
        try:
            self.ignore.add([epn])
        except StateFileError as error:
            message = f"verified but not recorded: {error}; the next cycle syncs it again"
            logger.error("%s: FAILED: %s", epn, message)
            self.events.emit(EpnFailed(epn, message))
            return
        logger.info("%s: %s, recorded in %s%s", epn, how, self.ignore.path.name, f": {figures}" if figures else "")
        self.events.emit(Recorded(epn, how, figures))

    def _transfer_and_check(self, transfer, policy):
        """Return the PassEnded event of one pass (without emitting it)."""
        epn, kind = transfer.epn, policy.kind.value
        try:
            waiting = self._waiting_for_data(transfer, policy)
            if waiting is not None:
                return waiting
            if policy.final:
                logger.info("%s: started, %s -> %s", epn, transfer.source, transfer.destination)
            else:
                logger.info("%s: live pass started (its visit is not over), %s", epn, transfer.source)
            self.activity.start(epn)
            result = self._transfer_with_retries(transfer, policy)
            figures = _figures(result)
            if not policy.final:
                logger.info("%s: live pass done, nothing recorded (its visit is not over): %s", epn, figures)
                return PassEnded(epn, kind, "ok", figures=figures)
            self._verify(transfer, result, policy)
            if policy.records and self.bagger is not None:
                self._bag(transfer, result)
            return PassEnded(epn, kind, "ok", figures=figures, files=len(result.files), bytes=result.files.total_size())
        except TransferStopped:
            logger.warning("%s: stopped before it finished; nothing recorded", epn)
            return PassEnded(epn, kind, "stopped")
        except UnsafeNameError as error:
            return self._failed(epn, policy, f"refused: {error}")
        except BagError as error:
            return self._failed(epn, policy, f"verified, but its bag could not be made: {error}; not recorded")
        except OSError as error:
            return self._failed(epn, policy, f"cannot prepare {transfer.destination}: {error.strerror or error}")
        except RsyncError as error:
            if not policy.final and error.partial:
                logger.info(
                    "%s: live pass done; some files were still being written at the facility (expected): %s", epn, error
                )
                return PassEnded(epn, kind, "ok")
            return self._failed(epn, policy, str(error))
        except Exception as error:  # a bug of ours: this EPN fails, the others and the service go on
            logger.exception("%s: unexpected error", epn)
            return self._failed(epn, policy, f"unexpected error (a bug; the traceback is in the log): {error!r}")
        finally:
            self.activity.finish(epn)

    def _failed(self, epn, policy, message):
        """Log a failed pass; a live pass's failure is retried later but never alerted."""
        live = not policy.final
        level = logging.WARNING if live else logging.ERROR
        logger.log(level, "%s: %sFAILED: %s", epn, "live pass " if live else "", message)
        return PassEnded(epn, policy.kind.value, "failed", message, alert=not live)

    def _waiting_for_data(self, transfer, policy):
        """Return None if the facility has data for the EPN; else the pass's end: "no-data", or "failed" for a final
        pass once its visit ended more than waiting-for-data-alert-hours ago (the data may be somewhere else)."""
        if _has_entries(transfer.destination):
            return None  # a transfer began before, so the source had data
        state = self.runner.probe_source(transfer.epn, transfer.source)
        if state == "present":
            return None
        epn, kind = transfer.epn, policy.kind.value
        reason = "no folder at the facility yet" if state == "missing" else "its folder at the facility is empty"
        ended = transfer.visit.end
        alert_after = timedelta(hours=self.settings.waiting_for_data_alert_hours)
        if policy.final and ended is not None and datetime.now(timezone.utc) - ended > alert_after:
            message = f"waiting for data: {reason}, although its visit ended at {ended:%Y-%m-%d %H:%M %Z}"
            logger.warning("%s: %s", epn, message)
            return PassEnded(epn, kind, "failed", message)
        logger.info("%s: waiting for data: %s", epn, reason)
        return PassEnded(epn, kind, "no-data", reason)

    def _transfer_with_retries(self, transfer, policy):
        attempts = self.settings.rsync_retries + 1
        for attempt in range(1, attempts + 1):
            # rsync writes into the open data folder, closed to the project's group meanwhile; a dry run, nowhere.
            folders = writable_destination(self.settings, transfer.destination) if policy.writes else None
            try:
                with folders or nullcontext(transfer.destination) as destination:
                    try:
                        result = self.runner.transfer(
                            transfer.epn,
                            transfer.source,
                            destination,
                            progress=lambda result: self.activity.update(
                                transfer.epn, len(result.files), result.bytes_transferred
                            ),
                        )
                    except RsyncError as error:
                        self._remember_checksums(transfer.epn, destination, error.result, policy)
                        raise
                    self._remember_checksums(transfer.epn, destination, result, policy)
                    return result
            except RsyncError as error:
                if not error.transient or attempt == attempts or self.stop.is_set():
                    raise
                delay = self.settings.rsync_retry_delay * 2 ** (attempt - 1)
                logger.warning("%s: %s; retrying in %.0f s (%d/%d)", transfer.epn, error, delay, attempt, attempts - 1)
                if self.stop.wait(delay):
                    raise TransferStopped(f"{transfer.epn}: stopped while waiting to retry") from None
        raise AssertionError("unreachable")

    def _remember_checksums(self, epn, destination, result, policy):
        """Keep what rsync computed for the bag while the folders are still closed to the group (also after a
        partial run: what did arrive need not be hashed again)."""
        if self.bagger is not None and policy.writes and result is not None:
            self.bagger.remember(epn, destination, result)

    def _bag(self, transfer, result):
        """Make the verified EPN's folder a BagIt bag (raise BagError); files the facility does not list stay in it."""
        figures = self.bagger.bag(transfer)
        extra = figures.files - len(result.files)
        if extra > 0:
            logger.warning(
                "%s: data/ holds %d file(s) the facility does not list (kept, and in the bag)", transfer.epn, extra
            )

    def _verify(self, transfer, result, policy):
        """Raise RsyncError unless every file the source holds is at the destination at its size."""
        epn = transfer.epn
        for link in result.unsafe_links:
            logger.warning("%s: symlink %s points outside the EPN; not copied", epn, link)
        if not policy.writes:
            logger.info("%s: would sync: %s", epn, _figures(result))
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


def _figures(result):
    rate = result.bytes_transferred / result.seconds if result.seconds else 0
    return (
        f"{len(result.files)} files, {len(result.links)} symlinks, {result.files_transferred} transferred, "
        f"{human_bytes(result.bytes_transferred)} in {result.seconds:.1f} s ({human_bytes(rate)}/s)"
    )


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
