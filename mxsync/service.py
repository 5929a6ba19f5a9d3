"""The mxsync service loop: a cycle now, then one every sync-frequency-hours, until stopped.

SIGTERM and SIGINT stop it: nothing new starts, running rsyncs are stopped and nothing is
recorded for them. SIGHUP re-reads config.yml (logging and masking included); it is also
re-read before each cycle, so staff can map a new EPN without restarting the service. On
every exit path, expected or not, the processes mxsync started are stopped with it.
"""

import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

from mxsync.catalogue import VisitCatalogue
from mxsync.cli_support import apply_logging, load_and_log
from mxsync.config import load_config
from mxsync.errors import ConfigError
from mxsync.followups import FollowUps, follow_up_actions
from mxsync.history import LOCK_FILE_NAME, History
from mxsync.logsetup import setup_logging
from mxsync.notify import SystemdNotifier
from mxsync.portal import PortalClient
from mxsync.processes import supervisor
from mxsync.rsync import RsyncRunner
from mxsync.state import IgnoreFile, InstanceLock, atomic_write
from mxsync.sync import Activity, SyncCycle

logger = logging.getLogger("mxsync.service")

PROGRESS_INTERVAL = 1.0
ACTIVITY_FILE_NAME = "mxsync-activity.json"
# While ignore.yml is unreadable, look again this often, so that a fixed file resumes transfers soon.
RECORD_RETRY_SECONDS = 60.0
RECORD_POLL_SECONDS = 1.0
# However soon a pass is due, cycles are at least this far apart (a pass due now that could not start, e.g.
# while the destination is unmounted, waits this long rather than spinning).
SHORTEST_PAUSE_SECONDS = 30.0
# Keys a running service cannot change: the instance lock and every state file live in state-dir.
RESTART_KEYS = {"state_dir": "state-dir"}


class Signals:
    """Turns SIGTERM/SIGINT into a stop (stopping every child at once) and SIGHUP into a reload request.

    Python runs signal handlers in the main thread only, and only once it wakes: a signal the kernel hands to
    another thread would wait while the main thread sleeps. So the interpreter writes each signal's number to
    a pipe itself (set_wakeup_fd, from whichever thread received it), and a thread of its own reads the pipe
    and acts; the Python-level handlers do nothing, and nothing that takes a lock runs inside one.
    """

    def __init__(self):
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.reload_requested = False
        self.stop_reason = None
        self._read_end, self._write_end = os.pipe()
        os.set_blocking(self._write_end, False)

    def install(self):
        threading.Thread(target=self._act, name="signals", daemon=True).start()
        signal.set_wakeup_fd(self._write_end, warn_on_full_buffer=False)
        for signal_number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signal_number, _ignore)

    def _act(self):
        while True:
            for signal_number in os.read(self._read_end, 64):
                if signal_number not in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    continue
                if signal_number == signal.SIGHUP:
                    logger.info("Received SIGHUP: reloading the configuration")
                    self.reload_requested = True
                elif self.stop.is_set():
                    logger.warning(
                        "Received %s again: killing the running transfers", signal.Signals(signal_number).name
                    )
                    supervisor.kill_all()
                else:
                    name = signal.Signals(signal_number).name
                    logger.warning("Received %s: starting nothing new, stopping running transfers", name)
                    self.stop_reason = f"{name} received"
                    self.stop.set()
                    supervisor.terminate_all()
                self.wake.set()

    def wait(self, seconds):
        """Sleep until `seconds` pass, a stop, or a reload request; return True if stopping."""
        deadline = time.monotonic() + seconds
        while not self.stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.reload_requested:
                break
            self.wake.wait(remaining)
            self.wake.clear()
        return self.stop.is_set()


def _ignore(_signal_number, _frame):
    """The Python-level handler: the wakeup pipe already carries the signal to Signals._act."""


def run_service(config_path, execute, once, verbose=False):
    """Run cycles until stopped (or one with `once`); return the exit code."""
    config = load_and_log(config_path, "sync", dry_run=not execute, verbose=verbose)
    lock = InstanceLock(config.state_dir / LOCK_FILE_NAME)
    if execute:
        lock.acquire()
    signals, notifier = Signals(), SystemdNotifier()
    supervisor.reset()  # a previous run in this process (tests, bench) stopped it
    signals.install()
    notifier.ready("started" if execute else "started (dry run)")
    logger.info(
        "mxsync started (%s), config %s", "executing" if execute else "dry run, nothing is recorded", config.path
    )
    settings = Settings(config, execute, verbose)
    catalogue = VisitCatalogue()
    outcome, reason = None, "finished"
    try:
        while True:
            outcome = run_cycle(
                settings.config,
                execute,
                signals.stop,
                notifier,
                settings.pop_problem(),
                retry_now=once,
                catalogue=catalogue,
            )
            if once or signals.stop.is_set():
                break
            waited_from = datetime.now(timezone.utc)
            pause = next_pause(settings.config, outcome, waited_from)
            next_cycle = datetime.now() + timedelta(seconds=pause)
            notifier.status(f"idle; last cycle synced {len(outcome.synced)}, next cycle at {next_cycle:%Y-%m-%d %H:%M}")
            if pause < settings.config.sync_frequency_hours * 3600:
                logger.info("Next cycle at %s: %s", f"{next_cycle:%Y-%m-%d %H:%M:%S}", outcome.wake_reason)
            pause_for = functools.partial(next_pause, outcome=outcome, now=waited_from)
            if not wait_for_next_cycle(signals, settings, pause_for, outcome.record_unreadable):
                break
            settings.reload()
        reason = signals.stop_reason or reason
    except BaseException as error:
        reason = f"unexpected {type(error).__name__}"
        if not isinstance(error, (SystemExit, KeyboardInterrupt)):
            logger.critical("mxsync stopped by an unexpected error (a bug): %r", error, exc_info=True)
        raise
    finally:
        supervisor.stop_all()
        notifier.stopping()
        lock.release()
        logger.info("mxsync stopped: %s", reason)
        # Nothing is left to stop. The interpreter's own shutdown puts Python-level handlers back to the default,
        # under which a late stop signal (systemd's second SIGTERM, a second Ctrl-C) would kill mxsync with
        # -SIGTERM; an ignored signal stays ignored through it.
        for signal_number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signal_number, signal.SIG_IGN)
    if signals.stop.is_set():
        return 1 if once else 0  # --once promises 0 only when everything planned was synced
    return 0 if outcome.ok else 1


def next_pause(config, outcome, now):
    """Seconds from `now` to the next cycle: the next pass or visit start the lifecycle knows of, a poll at the latest."""
    pause = config.sync_frequency_hours * 3600
    if outcome is not None and outcome.next_wake is not None:
        until = (outcome.next_wake - now).total_seconds()
        pause = min(pause, max(SHORTEST_PAUSE_SECONDS, until))
    return pause


def wait_for_next_cycle(signals, settings, pause_for, record_unreadable):
    """Wait out pause_for(config) seconds, reloading on SIGHUP; while ignore.yml is unreadable, end as soon as it
    changes.

    Return False if the service is stopping. A reload that changes sync-frequency-hours moves the next cycle.
    """
    pause = pause_for(settings.config)
    started = time.monotonic()
    watched = _file_state(settings.config.ignore_file)
    while True:
        if record_unreadable:
            pause = min(pause, RECORD_RETRY_SECONDS)
        remaining = started + pause - time.monotonic()
        if remaining <= 0:
            return True
        if signals.wait(min(remaining, RECORD_POLL_SECONDS) if record_unreadable else remaining):
            return False
        if signals.reload_requested:
            signals.reload_requested = False
            settings.reload()
            pause = pause_for(settings.config)
        if record_unreadable and _file_state(settings.config.ignore_file) != watched:
            logger.info("%s changed; trying again", settings.config.ignore_file)
            return True


def _file_state(path):
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size, status.st_ino


class Settings:
    """The config the service runs with, replaced by a valid re-read of config.yml; remembers why one was refused."""

    def __init__(self, config, execute, verbose):
        self.config = config
        self.execute = execute
        self.verbose = verbose
        self._problem = None

    def reload(self):
        try:
            fresh = load_config(self.config.path)
        except ConfigError as error:
            self._refuse(
                f"config.yml changed but is invalid; keeping the previous settings until it is fixed:\n{error}"
            )
            return
        changed = [
            key
            for attribute, key in RESTART_KEYS.items()
            if getattr(fresh, attribute) != getattr(self.config, attribute)
        ]
        if changed:
            self._refuse(
                f"{self.config.path}: {', '.join(changed)} changed; restart mxsync to use it. Keeping the previous settings"
            )
            return
        if _logging_settings(fresh) != _logging_settings(self.config):
            try:
                apply_logging(fresh, "sync", dry_run=not self.execute, verbose=self.verbose)
            except ConfigError as error:
                self._restore_logging()
                self._refuse(f"{error}; keeping the previous settings")
                return
        if fresh != self.config:
            logger.info("Configuration reloaded from %s", fresh.path)
            for warning in fresh.warnings:
                logger.warning("%s", warning)
        self.config, self._problem = fresh, None

    def _restore_logging(self):
        try:
            apply_logging(self.config, "sync", dry_run=not self.execute, verbose=self.verbose)
        except ConfigError as error:  # the old log file is unusable now too: the journal still gets the lines
            setup_logging(self.config.log_level, secrets=self.config.secrets(), dry_run=not self.execute, verbose=True)
            logger.error("%s; logging to stderr only until it is fixed", error)

    def _refuse(self, message):
        logger.error("%s", message)
        self._problem = message

    def pop_problem(self):
        """Return the last refused reload's message (for the cycle to count and alert), once."""
        problem, self._problem = self._problem, None
        return problem


def _logging_settings(config):
    return (config.log_level, config.log_files, config.log_max_bytes, config.log_backup_count, config.secrets())


def run_cycle(config, execute, stop, notifier, config_problem=None, retry_now=False, catalogue=None):
    """Run one SyncCycle with fresh clients, reporting progress; return its CycleOutcome.

    `retry_now` (a run by hand, --once) tries failed and waiting EPNs now rather than after their retry delay."""
    activity = Activity()
    with History(config.state_dir, read_only=not execute) as history:
        if execute:
            history.source_result("config", config_problem)
        cycle = SyncCycle(
            config,
            PortalClient(config),
            RsyncRunner(config, dry_run=not execute),
            IgnoreFile(config.ignore_file),
            history,
            execute,
            stop,
            activity,
            retry_now=retry_now,
            catalogue=catalogue,
            followups=FollowUps(config, follow_up_actions(config), history, dry_run=not execute, stop=stop),
        )
        reporter = ProgressReporter(activity, notifier, config.state_dir / ACTIVITY_FILE_NAME if execute else None)
        reporter.start()
        try:
            outcome = cycle.run()
        finally:
            reporter.stop()
    level = logging.INFO if outcome.ok else logging.WARNING
    logger.log(
        level,
        "Cycle finished: %d planned, %d synced, %s%d failed%s%s%s",
        outcome.planned,
        len(outcome.synced),
        f"{len(outcome.live)} copied live, " if outcome.live else "",
        len(outcome.failed),
        f", {len(outcome.waiting)} waiting for data" if outcome.waiting else "",
        f", {len(outcome.stopped)} stopped" if outcome.stopped else "",
        "; problems: " + "; ".join(outcome.problems) if outcome.problems else "",
    )
    return outcome


class ProgressReporter:
    """Keeps a terminal progress line, systemd's STATUS and the activity file for `mxsync status` current."""

    def __init__(self, activity, notifier, activity_file=None, stream=None):
        self.activity = activity
        self.notifier = notifier
        self.activity_file = activity_file
        self.stream = stream or sys.stderr
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._on_terminal = self.stream.isatty()
        self._written = None

    def start(self):
        self._thread.start()

    def stop(self):
        self._done.set()
        self._thread.join()
        if self._on_terminal:
            self.stream.write("\r\033[K")
            self.stream.flush()
        if self.activity_file is not None:
            try:
                self.activity_file.unlink(missing_ok=True)
            except OSError as error:  # status may show a finished transfer as running; nothing else suffers
                logger.debug("Cannot remove %s: %s", self.activity_file, error)

    def _loop(self):
        while not self._done.wait(PROGRESS_INTERVAL):
            text = self.activity.describe()
            self.notifier.status(text)
            self._write_activity()
            if self._on_terminal:
                self.stream.write("\r\033[K" + text[:200])
                self.stream.flush()

    def _write_activity(self):
        if self.activity_file is None:
            return
        snapshot = self.activity.snapshot()
        if snapshot == self._written:
            return
        try:
            atomic_write(self.activity_file, json.dumps(snapshot) + "\n")
        except OSError as error:  # status loses its live figures; transfers go on
            logger.debug("Cannot write %s: %s", self.activity_file, error)
        self._written = snapshot
