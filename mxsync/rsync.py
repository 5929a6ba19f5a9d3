"""rsync over ssh: running transfers, listings and the login probe, over the shared connection when there is one.

Command lines come from mxsync.commands; processes are started, logged and stopped by mxsync.processes (which
alone reads exit codes); connections are shared by mxsync.connection; output is read by mxsync.itemize.
"""

import logging
import os
import shutil
import time

from mxsync.commands import PROBE_FILTERS, Commands, CommandSettings, local
from mxsync.connection import SharedConnection
from mxsync.errors import ProcessStartError, TransferStopped
from mxsync.itemize import TransferResult, record_item
from mxsync.processes import rsync_failure, ssh_failure, supervisor, tail_text

logger = logging.getLogger("mxsync.rsync")

MISSING_SOURCE = "No such file or directory"


class RsyncRunner:
    """Builds and runs rsync and ssh commands for one config; safe to use from several threads."""

    def __init__(self, config, dry_run=False):
        self.config = config
        self.commands = Commands(CommandSettings.from_config(config))
        self.dry_run = dry_run
        self.connection = None
        # Why rsync (here or at the facility) refused the bag's checksum options, once it has: then none are asked.
        self.checksum_refusal = None

    # ------------------------------------------------------------ commands (tests and tools use these)

    def ssh_arguments(self, session_options=None):
        return self.commands.ssh(session_options)

    def rsync_arguments(self, source, destination, dry_run=None, session_options=None):
        return self.commands.transfer(
            source,
            destination,
            self.dry_run if dry_run is None else dry_run,
            session_options,
            checksums=self.checksum_refusal is None,
        )

    # ------------------------------------------------------------ connection

    def connect(self):
        """Check that the facility host takes our ssh login and, with sharing on, open the shared connection.

        Raises RsyncError when the host is unreachable, refuses the login or shows an unknown host key.
        Returns None, or why sharing could not start (transfers then use their own connections).
        """
        for program in ("rsync", "ssh"):
            if shutil.which(program) is None:
                raise ProcessStartError(f"cannot run {program}: not found in PATH ({os.environ.get('PATH', '')})")
        if self.config.ssh_connection_sharing and self.connection is None:
            connection = SharedConnection(
                self.ssh_arguments(session_options=()),
                self.config.ssh_target,
                self.config.max_tasks,
                self.config.ssh_connect_timeout,
            )
            reason = connection.open()
            if reason is None:
                self.connection = connection
                return None
            self._probe_login()  # the host itself may be the reason: then that is the error to report
            logger.warning("ssh connection sharing could not start (%s); each transfer uses its own connection", reason)
            return reason
        self._probe_login()
        return None

    def _probe_login(self):
        finished = supervisor.run(
            self.ssh_arguments() + [self.config.ssh_target, "true"],
            "ssh login",
            timeout=self.config.ssh_connect_timeout + 30,
        )
        if finished.returncode != 0:
            if finished.stopped:
                raise TransferStopped("ssh login: stopped")
            raise ssh_failure(f"ssh to {self.config.ssh_target}:{self.config.port}", finished)

    def close(self):
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    # ------------------------------------------------------------ runs

    def check_listing(self, source):
        """List the top of a remote directory with rsync over ssh (for `mxsync check`); return a summary."""
        entries = []
        finished = self._run_rsync(
            lambda options: self.commands.listing(source, session_options=options),
            f"listing {source}",
            entries.append,
        )
        if finished.returncode != 0:
            raise rsync_failure(f"listing {source}", finished)
        return f"{len(entries)} entries"

    def probe_source(self, epn, source):
        """Return 'missing', 'empty' or 'present': does the EPN's source folder hold anything to transfer yet?"""
        found = []

        def first_entry(raw_line):
            if raw_line[:1] in (b"-", b"l"):  # a regular file or a symlink: there is data
                found.append(True)
                return True
            return False

        finished = self._run_rsync(
            lambda options: self.commands.listing(source, True, PROBE_FILTERS, options),
            f"{epn}: looking for data",
            first_entry,
        )
        if found:
            return "present"
        if finished.returncode == 23 and any(MISSING_SOURCE in line for line in finished.stderr_tail):
            self._check_source_root(source)
            return "missing"
        if finished.returncode != 0:
            raise rsync_failure(f"looking for {source}", finished)
        return "empty"

    def _check_source_root(self, source):
        """Raise RsyncError if the folder holding the EPN folders is itself missing: the facility's problem."""
        parent = source.rstrip("/").rpartition("/")[0] or "/"
        finished = self._run_rsync(
            lambda options: self.commands.listing(parent, session_options=options),
            f"listing {parent}",
            lambda _line: True,  # one entry is proof enough
        )
        if finished.returncode != 0 and not finished.cut_short:
            raise rsync_failure(f"the facility's folder {parent}, which should hold the EPN folders", finished)

    def transfer(self, epn, source, destination, progress=None, dry_run=None):
        """Run one rsync of source/ into destination/; return a TransferResult or raise RsyncError/TransferStopped.

        `progress(result)` is called as files are reported. `dry_run` overrides the runner's own setting
        for this run (a check that nothing is left to send).
        """
        started = time.monotonic()
        holder = {}
        dry_run = self.dry_run if dry_run is None else dry_run
        with_checksums = bool(self.commands.settings.checksum) and not dry_run and self.checksum_refusal is None

        def build(options):
            # A retry over a connection of its own starts afresh.
            holder["result"] = TransferResult(epn, checksums={} if with_checksums else None)
            return self.rsync_arguments(source, destination, dry_run=dry_run, session_options=options)

        def on_line(raw_line):
            record_item(holder["result"], raw_line, epn)
            if progress is not None:
                progress(holder["result"])

        pass_fds = (destination,) if isinstance(destination, int) else ()
        finished = self._run_rsync(build, f"{epn}: rsync", on_line, pass_fds)
        result = holder["result"]
        result.seconds = time.monotonic() - started
        if finished.returncode != 0 and with_checksums and _refuses_checksums(finished):
            # An optimisation for the bag must never stop data from moving: go on without it.
            self.checksum_refusal = tail_text(finished.stderr_tail)
            logger.warning(
                "%s: rsync cannot print %s checksums (here or at the facility: %s); transfers go on without them "
                "and bags hash their files here",
                epn,
                self.commands.settings.checksum,
                self.checksum_refusal,
            )
            return self.transfer(epn, source, destination, progress, dry_run)
        if finished.returncode != 0:
            error = rsync_failure("", _name_open_folder(finished, destination))
            error.result = result  # what did arrive (a partial run's checksums are still worth keeping)
            raise error
        return result

    def _run_rsync(self, build, what, on_line, pass_fds=()):
        """Run the command build(session options) gives; over the shared connection first, then alone if it failed."""
        if self.connection is not None:
            with self.connection.session() as options:
                options = options or None  # no free master: a connection of its own
                finished = supervisor.stream(build(options), what, on_line, what, pass_fds)
            if finished.stopped and finished.returncode != 0:
                raise TransferStopped(f"{what}: stopped")
            if finished.returncode != 255 or finished.cut_short or not options:
                return finished
            self.connection.failed_session(what, finished)
        finished = supervisor.stream(build(None), what, on_line, what, pass_fds)
        if finished.stopped and finished.returncode != 0:
            raise TransferStopped(f"{what}: stopped")
        return finished


def _refuses_checksums(finished):
    """True if rsync ended because it (or the facility's) does not know --checksum-choice or the algorithm."""
    said = " ".join(finished.stderr_tail).lower()
    return finished.returncode in (1, 2, 4, 12) and (
        "checksum" in said or "unknown option" in said or "unrecognized option" in said
    )


def _name_open_folder(finished, destination):
    """rsync's messages name an open folder /proc/self/fd/N/...: put the folder's path there, for the operator."""
    if isinstance(destination, int):
        try:
            path = os.readlink(f"/proc/self/fd/{destination}")
        except OSError:
            return finished
        descriptor = local(destination)
        finished.stderr_tail = [line.replace(descriptor, f"{path}/") for line in finished.stderr_tail]
    return finished
