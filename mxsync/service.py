"""The mxsync service loop: a cycle now, then one every sync-frequency-hours, until SIGTERM or SIGINT.

On a stop signal nothing new starts, running rsyncs are stopped and nothing is recorded for
them; the process exits within seconds. config.yml is re-read before each cycle, so staff can
map a new EPN without restarting the service.
"""

import logging
import signal
import sys
import threading
from datetime import datetime, timedelta

from mxsync.cli_support import load_and_log
from mxsync.config import load_config
from mxsync.errors import ConfigError
from mxsync.history import LOCK_FILE_NAME, History
from mxsync.notify import SystemdNotifier
from mxsync.portal import PortalClient
from mxsync.rsync import RsyncRunner
from mxsync.state import IgnoreFile, InstanceLock
from mxsync.sync import Activity, SyncCycle

logger = logging.getLogger("mxsync.service")

PROGRESS_INTERVAL = 1.0


class Stopper:
    """Turns SIGTERM/SIGINT into a stop event and stops the running rsyncs of the current cycle."""

    def __init__(self):
        self.event = threading.Event()
        self.runner = None

    def install(self):
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signal_number, self._handle)

    def _handle(self, signal_number, _frame):
        logger.warning("Received %s: starting nothing new, stopping running transfers", signal.Signals(signal_number).name)
        self.event.set()
        if self.runner is not None:
            self.runner.stop_all()


def run_service(config_path, execute, once, verbose=False):
    """Run cycles until stopped (or one with `once`); return the exit code."""
    config = load_and_log(config_path, "sync", dry_run=not execute, verbose=verbose)
    ignore = IgnoreFile(config.ignore_file)
    ignore.load()  # a corrupt record stops us here, before anything runs
    lock = InstanceLock(config.state_dir / LOCK_FILE_NAME)
    if execute:
        lock.acquire()
    stopper, notifier = Stopper(), SystemdNotifier()
    stopper.install()
    notifier.ready("started" if execute else "started (dry run)")
    logger.info("mxsync started (%s), config %s", "executing" if execute else "dry run, nothing is recorded", config.path)
    try:
        while True:
            outcome = run_cycle(config, ignore, execute, stopper, notifier)
            if once or stopper.event.is_set():
                break
            next_cycle = datetime.now() + timedelta(hours=config.sync_frequency_hours)
            notifier.status(f"idle; last cycle synced {len(outcome.synced)}, next cycle at {next_cycle:%Y-%m-%d %H:%M}")
            if stopper.event.wait(config.sync_frequency_hours * 3600):
                break
            config = reload_config(config)
            ignore = IgnoreFile(config.ignore_file)
    finally:
        notifier.stopping()
        lock.release()
    if stopper.event.is_set() and not once:
        logger.info("mxsync stopped")
        return 0
    return 0 if outcome.ok else 1


def run_cycle(config, ignore, execute, stopper, notifier):
    """Run one SyncCycle with fresh clients, reporting progress; return its CycleOutcome."""
    runner = RsyncRunner(config, dry_run=not execute)
    stopper.runner = runner
    activity = Activity()
    cycle = SyncCycle(
        config, PortalClient(config), runner, ignore, History(config.state_dir, read_only=not execute),
        execute, stopper.event, activity,
    )
    reporter = ProgressReporter(activity, notifier)
    reporter.start()
    try:
        outcome = cycle.run()
    finally:
        reporter.stop()
        stopper.runner = None
    level = logging.INFO if outcome.ok else logging.WARNING
    logger.log(
        level, "Cycle finished: %d planned, %d synced, %d failed%s%s", outcome.planned, len(outcome.synced),
        len(outcome.failed), f", {len(outcome.stopped)} stopped" if outcome.stopped else "",
        "; problems: " + "; ".join(outcome.problems) if outcome.problems else "",
    )
    return outcome


def reload_config(config):
    """Re-read config.yml; if it became invalid, keep running with the last good one and say so."""
    try:
        fresh = load_config(config.path)
    except ConfigError as error:
        logger.error("config.yml changed but is invalid; keeping the previous settings until fixed:\n%s", error)
        return config
    for warning in fresh.warnings:
        logger.warning("%s", warning)
    return fresh


class ProgressReporter:
    """Shows a live progress line on a terminal and keeps systemd's STATUS current while a cycle runs."""

    def __init__(self, activity, notifier, stream=None):
        self.activity = activity
        self.notifier = notifier
        self.stream = stream or sys.stderr
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._on_terminal = self.stream.isatty()

    def start(self):
        self._thread.start()

    def stop(self):
        self._done.set()
        self._thread.join()
        if self._on_terminal:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _loop(self):
        while not self._done.wait(PROGRESS_INTERVAL):
            text = self.activity.describe()
            self.notifier.status(text)
            if self._on_terminal:
                self.stream.write("\r\033[K" + text[:200])
                self.stream.flush()
