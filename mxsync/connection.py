"""Shared ssh connections: a few master connections that every rsync of a cycle reuses.

Sharing is an optimisation and never stops data from moving: if a master cannot start (a
socket path too long, a broken ControlPath directory, a server refusing sessions) or dies
mid-cycle, transfers use one connection each and the log says so once.
"""

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager

from mxsync.errors import MxsyncError
from mxsync.processes import ssh_failure, supervisor

logger = logging.getLogger("mxsync.connection")

# sshd refuses sessions beyond MaxSessions (default 10) on one connection; stay below it.
SESSIONS_PER_CONNECTION = 8
# A Unix socket path holds at most 107 bytes, and ssh binds "<ControlPath>.<16 random chars>" first.
SOCKET_PATH_LIMIT = 107 - 17
READY_POLL_SECONDS = 0.05


def masters_needed(max_tasks):
    """How many master connections `max_tasks` concurrent sessions need."""
    return max(1, -(-max_tasks // SESSIONS_PER_CONNECTION))


def short_directory():
    """Make a private directory whose socket paths fit, trying TMPDIR, /tmp and /dev/shm; return it or None."""
    candidates = [tempfile.gettempdir(), "/tmp", "/dev/shm", os.environ.get("XDG_RUNTIME_DIR")]
    for base in dict.fromkeys(candidate for candidate in candidates if candidate):
        # mkdtemp adds "mxsync-" and 8 characters; each socket is named by one or two digits.
        if len(base) + len("/mxsync-12345678/99") > SOCKET_PATH_LIMIT:
            continue
        try:
            return tempfile.mkdtemp(prefix="mxsync-", dir=base)
        except OSError:
            continue
    return None


class Master:
    """One master ssh connection, run in the foreground as a supervised child."""

    def __init__(self, ssh_arguments, target, control_path):
        self.target = target
        self.control_path = control_path
        self._ssh_arguments = ssh_arguments
        self._stderr = tempfile.TemporaryFile()
        try:
            self.process = supervisor.start(
                [
                    *ssh_arguments,
                    "-o",
                    "ControlMaster=yes",
                    "-o",
                    f"ControlPath={control_path}",
                    "-o",
                    "ControlPersist=no",
                    "-N",
                    target,
                ],
                "shared ssh connection",
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
            )
        except BaseException:
            self._stderr.close()
            raise
        self.sessions = 0

    def wait_ready(self, timeout):
        """Wait until the master accepts sessions; return None, or the reason it did not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return self.stderr_text() or f"ssh exited with status {self.process.returncode}"
            if os.path.exists(self.control_path):
                check = supervisor.run(self._control("check"), "checking the shared ssh connection", timeout=10)
                if check.returncode == 0:
                    return None
            time.sleep(READY_POLL_SECONDS)
        return f"not ready within {timeout:.0f} s"

    @property
    def alive(self):
        return self.process.poll() is None

    def stderr_text(self):
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace").strip().replace("\n", " | ")

    def close(self):
        if self.alive and not supervisor.stopping:
            try:
                supervisor.run(self._control("exit"), "closing the shared ssh connection", timeout=10)
            except MxsyncError:  # a stop began meanwhile: the master is ended below anyway
                pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.terminate()
        supervisor.finish(self.process, ())
        self._stderr.close()

    def _control(self, command):
        return [*self._ssh_arguments, "-o", f"ControlPath={self.control_path}", "-O", command, self.target]


class SharedConnection:
    """Masters for up to `max_tasks` concurrent sessions; `session()` hands out the options to reuse one."""

    def __init__(self, ssh_arguments, target, max_tasks, connect_timeout):
        self.ssh_arguments = list(ssh_arguments)
        self.target = target
        self.max_tasks = max_tasks
        self.connect_timeout = connect_timeout
        self.masters = []
        self._directory = None
        self._lock = threading.Lock()
        self._warned = False

    def open(self):
        """Start the masters; return None if at least one is up, else the reason sharing is unavailable."""
        self._directory = short_directory()
        if self._directory is None:
            return "no temporary directory gives a short enough socket path (TMPDIR, /tmp, /dev/shm)"
        reason = None
        try:
            for index in range(masters_needed(self.max_tasks)):
                master = Master(self.ssh_arguments, self.target, os.path.join(self._directory, str(index)))
                self.masters.append(master)
                reason = master.wait_ready(self.connect_timeout + 5)
                if reason is not None:
                    self.masters.pop().close()
                    break
        except BaseException:  # stopping, or no process could be started: leave nothing behind
            self.close()
            raise
        if not self.masters:
            self.close()
            return reason
        if reason is not None:
            logger.warning(
                "Only %d of %d shared ssh connections started (%s); the other transfers use their own connections",
                len(self.masters),
                masters_needed(self.max_tasks),
                reason,
            )
        return None

    @contextmanager
    def session(self):
        """Yield the ssh options that reuse a master with a free session, or [] for a connection of its own."""
        master = None
        with self._lock:
            usable = [m for m in self.masters if m.alive and m.sessions < SESSIONS_PER_CONNECTION]
            if usable:
                master = min(usable, key=lambda m: m.sessions)
                master.sessions += 1
            elif self.masters and not any(m.alive for m in self.masters):
                self._warn_once("the shared ssh connection ended; transfers now use their own connections")
        try:
            yield ["-o", "ControlMaster=no", "-o", f"ControlPath={master.control_path}"] if master else []
        finally:
            if master is not None:
                with self._lock:
                    master.sessions -= 1

    def failed_session(self, what, finished):
        """Log that a session over a master failed at the ssh level; the caller retries over its own connection."""
        self._warn_once(
            f"{what}: the shared ssh connection failed ({ssh_failure('ssh', finished)}); "
            "retrying over a connection of its own"
        )

    def close(self):
        for master in self.masters:
            master.close()
        self.masters = []
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)  # only stale sockets can be left in it
            self._directory = None

    def _warn_once(self, message):
        if not self._warned:
            self._warned = True
            logger.warning("%s", message)
