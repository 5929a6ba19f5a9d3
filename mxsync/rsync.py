"""Running rsync over ssh: the only module that starts processes.

Commands are argument lists built from validated config, logged at DEBUG, and their exit
codes are interpreted here alone. rsync itemises every file of the source (`-ii`), which
gives both the progress and the list that verification checks against the destination.
"""

import logging
import os
import re
import shlex
import subprocess
import tempfile
import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from mxsync.errors import RsyncError
from mxsync.logsetup import masker

logger = logging.getLogger("mxsync.rsync")

# The old tool's transfer semantics, plus --partial so an interrupted frame resumes.
BASE_OPTIONS = (
    "--recursive",
    "--times",
    "--size-only",
    "--perms",
    "--chmod=Dg+s,ug+w,o-wx,ug+X",
    "--partial",
    "--include=.info",
    "--exclude=.*",
    "--8-bit-output",
    "--itemize-changes",
    "--itemize-changes",
    "--out-format=%i %l %n",
)

# rsync exit codes: meaning, and whether retrying soon is likely to help.
EXIT_CODES = {
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
STDERR_TAIL_LINES = 15
ESCAPED_BYTE = re.compile(rb"\\#([0-7]{3})")


class FileList:
    """The (relative path, size) of every regular file rsync reported, stored compactly.

    A list of tuples costs about 170 bytes per file, which for an EPN of 20,000 files grew
    mxsync's peak RSS by 15%; packed names and an array of sizes cost the name's length plus 9.
    """

    def __init__(self, items=()):
        self._names = bytearray()  # each path's bytes followed by NUL, which no path can hold
        self._sizes = array("q")
        for name, size in items:
            self.append((name, size))

    def append(self, item):
        name, size = item
        self.add_raw(os.fsencode(name), size)

    def add_raw(self, relative, size):
        """Add a path given as the bytes rsync printed (already unescaped)."""
        self._names += relative
        self._names.append(0)
        self._sizes.append(size)

    def __len__(self):
        return len(self._sizes)

    def __iter__(self):
        names, start = self._names, 0
        for size in self._sizes:
            end = names.index(0, start)
            yield os.fsdecode(bytes(names[start:end])), size
            start = end + 1

    def __eq__(self, other):
        try:
            return list(self) == list(other)
        except TypeError:
            return NotImplemented

    def __repr__(self):
        return f"FileList({list(self)!r})"


@dataclass
class TransferResult:
    """What one rsync run reported: every regular file of the source with its size, and what moved."""

    epn: str
    files: FileList = field(default_factory=FileList)
    files_transferred: int = 0
    bytes_transferred: int = 0
    seconds: float = 0.0


class RsyncRunner:
    """Builds and runs rsync and ssh commands for one config; safe to use from several threads."""

    def __init__(self, config, dry_run=False):
        self.config = config
        self.dry_run = dry_run
        self._running = set()
        self._lock = threading.Lock()
        self._stopping = False
        self._control_dir = None

    # ------------------------------------------------------------ commands

    def ssh_arguments(self):
        """Return the ssh argument list rsync runs as its remote shell."""
        config = self.config
        arguments = ["ssh", "-p", str(config.port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]
        if config.known_hosts is not None:
            arguments += ["-o", f"UserKnownHostsFile={config.known_hosts}"]
        if config.key_file is not None:
            arguments += ["-i", str(config.key_file), "-o", "IdentitiesOnly=yes"]
        arguments += ["-o", f"ConnectTimeout={int(config.ssh_connect_timeout)}"]
        if config.ssh_keepalive_interval:
            arguments += ["-o", f"ServerAliveInterval={config.ssh_keepalive_interval}", "-o", "ServerAliveCountMax=3"]
        if config.ssh_cipher:
            arguments += ["-c", config.ssh_cipher]
        if self._control_dir is not None:
            # Reuse the shared connection when it is up; ssh falls back to its own connection if it is not.
            arguments += ["-o", "ControlMaster=no", "-o", f"ControlPath={self._control_dir}/%C"]
        return arguments

    def rsync_arguments(self, source, destination, dry_run=None):
        """Given a remote source directory and a local destination, return the rsync argument list."""
        dry_run = self.dry_run if dry_run is None else dry_run
        arguments = ["rsync", *BASE_OPTIONS]
        if self.config.rsync_io_timeout:
            arguments.append(f"--timeout={self.config.rsync_io_timeout}")
        if self.config.rsync_bwlimit:
            arguments.append(f"--bwlimit={self.config.rsync_bwlimit}")
        if dry_run:
            arguments.append("--dry-run")
        arguments += list(self.config.rsync_options)
        arguments += ["--rsh", rsh_string(self.ssh_arguments())]
        arguments += [f"{self.config.ssh_target}:{source.rstrip('/')}/", f"{str(destination).rstrip('/')}/"]
        return arguments

    # ------------------------------------------------------------ connection

    def connect(self):
        """Check that the facility host takes our ssh login; with sharing on, leave a master connection up.

        Raises RsyncError when the host is unreachable, refuses the login or shows an unknown host key,
        so that a cycle can stop before trying every EPN against a host that is down.
        """
        probe = self.ssh_arguments() + [self.config.ssh_target, "true"]
        control_dir = None
        if self.config.ssh_connection_sharing and self._control_dir is None:
            control_dir = tempfile.mkdtemp(prefix="mxsync-ssh-")
            probe = self.ssh_arguments() + [
                "-o", "ControlMaster=yes", "-o", f"ControlPath={control_dir}/%C", "-o", "ControlPersist=yes",
                "-N", "-f", self.config.ssh_target,
            ]
        returncode, stderr = self._run_quick(probe, "ssh login")
        if returncode != 0:
            if control_dir is not None:
                os.rmdir(control_dir)
            raise _failure(f"ssh to {self.config.ssh_target}:{self.config.port}", returncode, stderr.splitlines())
        if control_dir is not None:
            self._control_dir = control_dir

    def close_shared_connection(self):
        if self._control_dir is None:
            return
        control_dir, self._control_dir = self._control_dir, None
        arguments = self.ssh_arguments() + ["-o", f"ControlPath={control_dir}/%C", "-O", "exit", self.config.ssh_target]
        self._run_quick(arguments, "closing the shared ssh connection")
        for leftover in Path(control_dir).iterdir():
            leftover.unlink()
        os.rmdir(control_dir)

    def _run_quick(self, arguments, what):
        """Run a short ssh command; return (exit code, stderr text)."""
        logger.debug("Running (%s): %s", what, masker.mask(shlex.join(arguments)))
        # A master ssh forks into the background and would hold a stderr pipe open: use a file.
        with tempfile.TemporaryFile() as stderr_file:
            try:
                returncode = subprocess.run(
                    arguments, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr_file,
                    timeout=self.config.ssh_connect_timeout + 30,
                ).returncode
            except subprocess.TimeoutExpired:
                returncode = 255
            stderr_file.seek(0)
            return returncode, masker.mask(stderr_file.read().decode("utf-8", "replace"))

    # ------------------------------------------------------------ runs

    def check_listing(self, source):
        """List the top of a remote directory with rsync over ssh (for `mxsync check`); return a summary."""
        arguments = ["rsync", "--list-only", "--rsh", rsh_string(self.ssh_arguments()), f"{self.config.ssh_target}:{source}/"]
        try:
            result = subprocess.run(arguments, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                                    timeout=self.config.ssh_connect_timeout + 60)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise RsyncError(f"rsync over ssh to {self.config.ssh_target}: {error}") from None
        if result.returncode != 0:
            raise _failure(f"listing {source}", result.returncode, result.stderr.splitlines())
        return f"{len(result.stdout.splitlines())} entries"

    def transfer(self, epn, source, destination, progress=None, dry_run=None):
        """Run one rsync of source/ into destination/; return a TransferResult or raise RsyncError.

        `progress(result)` is called as files are reported; the process is stopped by stop_all().
        `dry_run` overrides the runner's own setting for this run (a check that nothing is left to send).
        """
        arguments = self.rsync_arguments(source, destination, dry_run=dry_run)
        logger.debug("%s: running %s", epn, masker.mask(shlex.join(arguments)))
        result = TransferResult(epn)
        started = time.monotonic()
        stderr_tail = deque(maxlen=STDERR_TAIL_LINES)
        with self._lock:
            if self._stopping:
                raise RsyncError(f"{epn}: not started, mxsync is stopping", returncode=20)
            try:
                process = subprocess.Popen(arguments, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            except OSError as error:
                raise RsyncError(f"{epn}: cannot run rsync: {error}") from None
            self._running.add(process)
        # Both pipes are drained at once so that a chatty stderr can never block rsync.
        stderr_reader = threading.Thread(target=_drain_stderr, args=(process.stderr, epn, stderr_tail), daemon=True)
        stderr_reader.start()
        try:
            for raw_line in process.stdout:
                _record_item(result, raw_line, epn)
                if progress is not None:
                    progress(result)
            returncode = process.wait()
        finally:
            stderr_reader.join()
            process.stdout.close()
            process.stderr.close()
            with self._lock:
                self._running.discard(process)
        result.seconds = time.monotonic() - started
        if returncode != 0:
            raise _failure(epn, returncode, stderr_tail)
        return result

    def stop_all(self):
        """Start no new rsync and ask the running ones to stop (they exit with code 20)."""
        with self._lock:
            self._stopping = True
            running = list(self._running)
        for process in running:
            try:
                process.terminate()
            except ProcessLookupError:
                pass


def verify_destination(result, destination):
    """Given what rsync reported for the source, return a list of problems at the destination (empty if complete)."""
    problems = []
    for relative, size in result.files:
        try:
            found = (Path(destination) / relative).stat().st_size
        except OSError:
            problems.append(f"{relative}: missing")
            continue
        if found != size:
            problems.append(f"{relative}: {found} bytes, source has {size}")
    return problems


def rsh_string(arguments):
    """Join ssh arguments for rsync's --rsh, which splits on spaces and honours quotes (it is not a shell)."""
    quoted = []
    for argument in arguments:
        if "'" in argument or "\n" in argument:
            raise RsyncError(f"cannot pass {argument!r} to rsync's remote shell: quotes and newlines are not allowed in paths")
        quoted.append(f"'{argument}'" if (" " in argument or '"' in argument) else argument)
    return " ".join(quoted)


def _record_item(result, raw_line, epn):
    """Parse one '%i %l %n' line: count transfers, remember every regular file and its size."""
    line = raw_line.rstrip(b"\n")
    # %i is a fixed 11-character field that itself holds spaces for unchanged attributes.
    item, size, name = line[:11], *line[12:].partition(b" ")[::2]
    if len(item) != 11 or line[11:12] != b" " or not size.isdigit() or not name:
        logger.debug("%s: rsync: %s", epn, line.decode("utf-8", "replace"))
        return
    if item[1:2] != b"f":
        return
    relative = ESCAPED_BYTE.sub(lambda match: bytes([int(match.group(1), 8)]), name)
    size = int(size)
    result.files.add_raw(relative, size)
    if item[:1] in (b">", b"c"):
        result.files_transferred += 1
        result.bytes_transferred += size


def _drain_stderr(stream, epn, tail):
    for raw_line in stream:
        line = masker.mask(raw_line.decode("utf-8", "replace").rstrip())
        if line:
            tail.append(line)
            logger.debug("%s: rsync: %s", epn, line)


def _failure(what, returncode, stderr_lines):
    meaning, transient = EXIT_CODES.get(returncode, ("unknown failure", False))
    if returncode < 0:
        meaning, transient = f"killed by signal {-returncode}", False
    return RsyncError(
        f"{what}: rsync exit {returncode} ({meaning}): {_tail(stderr_lines)}", returncode=returncode, transient=transient
    )


def _tail(lines):
    lines = lines.splitlines() if isinstance(lines, str) else list(lines)
    text = " | ".join(line.strip() for line in lines[-4:] if line.strip())
    return text or "no message"
