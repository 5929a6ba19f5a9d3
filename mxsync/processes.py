"""The one place that starts and supervises processes (rsync, ssh) and interprets their exit codes.

Every child runs in its own session, so a Ctrl-C or a signal to mxsync's process group reaches
mxsync alone, which then stops its children and calls the outcome "stopped". Each child also
gets SIGTERM if mxsync dies (parent-death signal), and `stop_all` ends every registered one on
every exit path, so no rsync is left writing into the destination after mxsync is gone.
"""

import ctypes
import logging
import os
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass

from mxsync.errors import ProcessStartError, RsyncError, TransferStopped
from mxsync.logsetup import masker

logger = logging.getLogger("mxsync.processes")

TAIL_BYTES = 64 * 1024  # of a short command's output, read when it ends
STDERR_TAIL_LINES = 15
STOP_GRACE_SECONDS = 5.0
_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (AttributeError, OSError):  # not Linux: rely on stop_all alone
    _prctl = None

# rsync exit codes: meaning, and whether retrying soon is likely to help.
RSYNC_EXIT_CODES = {
    1: ("syntax or usage error", False),
    2: ("protocol incompatibility", False),
    3: ("errors selecting input/output files or directories", False),
    5: ("error starting client-server protocol", True),
    10: ("error in socket I/O", True),
    11: ("error in file I/O (is the destination full or read-only?)", False),
    12: ("error in rsync protocol data stream (connection lost?)", True),
    20: ("stopped by a signal", False),
    23: ("partial transfer due to error (unreadable or missing source files?)", False),
    24: ("partial transfer: source files vanished during the transfer", True),
    30: ("timeout in data send/receive", True),
    35: ("timeout waiting for daemon connection", True),
    255: ("ssh failed (connection refused, host key, or login)", True),
}
SSH_EXIT_CODES = {255: ("connection refused, host key, or login", True)}


@dataclass
class Finished:
    """How a supervised process ended: its exit code, the tail of its stderr, and whether we stopped it."""

    returncode: int
    stderr_tail: list
    stopped: bool
    cut_short: bool = False  # the caller had what it wanted and ended it early


def _die_with_parent(parent_pid):
    """In the child before exec: get SIGTERM when mxsync dies, even by kill -9."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # mxsync died before the signal was armed
        os._exit(1)


class ProcessSupervisor:
    """Starts children in their own sessions, keeps a registry of them, and stops them all on request."""

    def __init__(self):
        # Reentrant: the stop signal's handler runs in the main thread, which may be inside start() already.
        self._lock = threading.RLock()
        self._running = {}
        self.stopping = False

    def start(self, arguments, what, **popen_options):
        """Start and register a child; raise ProcessStartError if mxsync is stopping or it cannot start."""
        logger.debug("Running (%s): %s", what, masker.mask(shlex.join(arguments)))
        parent_pid = os.getpid()
        with self._lock:
            if self.stopping:
                raise TransferStopped(f"{what}: not started, mxsync is stopping")
            try:
                popen_options.setdefault("stdin", subprocess.DEVNULL)
                process = subprocess.Popen(
                    arguments,
                    start_new_session=True,
                    preexec_fn=lambda: _die_with_parent(parent_pid),
                    **popen_options,
                )
            except OSError as error:
                raise ProcessStartError(f"{what}: cannot run {arguments[0]}: {error.strerror or error}") from None
            self._running[process] = what
        return process

    def finish(self, process, stderr_tail):
        """Wait for a registered child, unregister it, and return how it ended."""
        returncode = process.wait()
        with self._lock:
            self._running.pop(process, None)
            stopped = self.stopping
        return Finished(returncode, list(stderr_tail), stopped)

    def run(self, arguments, what, timeout, stdin=None, env=None, output=False):
        """Run a short command; return Finished (exit 255 if it timed out) with the tail of its stderr.

        `stdin` is an open file it reads, `env` its whole environment; `output` keeps its stdout in the tail too."""
        # A command that forks into the background would hold a stderr pipe open: use a file.
        with tempfile.TemporaryFile() as stderr_file:
            options = {"stdin": stdin} if stdin is not None else {}
            if env is not None:
                options["env"] = env
            stdout = stderr_file if output else subprocess.DEVNULL
            process = self.start(arguments, what, stdout=stdout, stderr=stderr_file, **options)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
                stderr_file.write(f"no answer within {timeout:.0f} s".encode())
                process.returncode = 255
            # Only the tail is wanted: a chatty command's megabytes are never read into memory.
            stderr_file.seek(max(0, stderr_file.seek(0, os.SEEK_END) - TAIL_BYTES))
            lines = masker.mask(stderr_file.read().decode("utf-8", "replace")).splitlines()
            return self.finish(process, lines[-STDERR_TAIL_LINES:])

    def stream(self, arguments, what, on_line, log_prefix, pass_fds=()):
        """Run a command, calling on_line(raw bytes) for each stdout line (a True return stops it); return Finished.

        `pass_fds` are descriptors the child inherits (an open destination folder rsync writes into)."""
        process = self.start(arguments, what, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds)
        tail = deque(maxlen=STDERR_TAIL_LINES)
        cut_short = False
        # Both pipes are drained at once so that a chatty stderr can never block the child.
        reader = threading.Thread(target=_drain_stderr, args=(process.stderr, log_prefix, tail), daemon=True)
        reader.start()
        try:
            for raw_line in process.stdout:
                if on_line(raw_line):
                    _signal_group(process, signal.SIGTERM)
                    cut_short = True
                    break
        finally:
            process.stdout.close()
            finished = self.finish(process, ())
            reader.join()
            process.stderr.close()
        finished.stderr_tail = list(tail)
        finished.cut_short = cut_short
        return finished

    def terminate_all(self):
        """Start nothing new and SIGTERM every running child, without waiting (safe in a signal handler)."""
        with self._lock:
            self.stopping = True
            running = list(self._running)
        for process in running:
            _signal_group(process, signal.SIGTERM)

    def kill_all(self):
        """SIGKILL every running child's process group (a second stop request: no more waiting)."""
        with self._lock:
            self.stopping = True
            running = list(self._running)
        for process in running:
            _signal_group(process, signal.SIGKILL)

    def stop_all(self, grace=STOP_GRACE_SECONDS):
        """Start nothing new; SIGTERM every running child's process group, then SIGKILL what is left after `grace`."""
        with self._lock:
            self.stopping = True
            running = list(self._running)
        for process in running:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)

    def reset(self):
        """Allow new children again (a new cycle after a stopped one, in tests)."""
        with self._lock:
            self.stopping = False


def _signal_group(process, signal_number):
    # Each child leads its own session: its process group holds it and what it started (rsync's ssh).
    if process.returncode is not None:  # already reaped: its id may belong to someone else by now
        return
    try:
        os.killpg(process.pid, signal_number)
    except (ProcessLookupError, PermissionError):
        pass


def _drain_stderr(stream, log_prefix, tail):
    for raw_line in stream:
        line = masker.mask(raw_line.decode("utf-8", "replace").rstrip())
        if line:
            tail.append(line)
            logger.debug("%s: %s", log_prefix, line)


# rsync's exit codes when some files could not be sent (23) or vanished (24) while it ran: what a facility still
# writing (temporary files renamed, files unreadable until closed) gives during a visit.
PARTIAL_TRANSFER = (23, 24)


def rsync_failure(what, finished):
    """Given how an rsync ended, return the RsyncError describing it."""
    return _failure(what, "rsync", RSYNC_EXIT_CODES, finished)


def ssh_failure(what, finished):
    """Given how an ssh command ended, return the RsyncError describing it."""
    return _failure(what, "ssh", SSH_EXIT_CODES, finished)


def _failure(what, program, meanings, finished):
    returncode = finished.returncode
    meaning, transient = meanings.get(returncode, ("unknown failure", False))
    if returncode < 0:
        meaning, transient = f"killed by signal {-returncode}", False
    prefix = f"{what}: " if what else ""
    return RsyncError(
        f"{prefix}{program} exit {returncode} ({meaning}): {tail_text(finished.stderr_tail)}",
        returncode=returncode,
        transient=transient,
        partial=program == "rsync" and returncode in PARTIAL_TRANSFER,
    )


def tail_text(lines):
    """Join the last few non-empty lines of a stderr tail into one line."""
    text = " | ".join(line.strip() for line in list(lines)[-4:] if line.strip())
    return text or "no message"


# One supervisor for the process: the service's signal handlers and exit paths stop everything it started.
supervisor = ProcessSupervisor()
