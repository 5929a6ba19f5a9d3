"""The command lines mxsync runs: ssh, rsync transfers and rsync listings, as argument lists.

Built from validated config only (the slice in CommandSettings), never through a shell; rsync's --rsh string is
the one place arguments are joined, and it refuses what rsync's own splitting could misread.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mxsync.errors import RsyncError
from mxsync.itemize import OUT_FORMAT, OUT_FORMAT_WITH_CHECKSUM

# The old tool ran `-stats`, which rsync reads as -s -t -a: archive mode, so symlinks were copied as
# symlinks. We copy them too, but refuse (and report) those that point outside the EPN. Its --size-only is
# dropped: a live pass may copy a file still being written at its final size, which only its time tells apart.
BASE_OPTIONS = (
    "--recursive",
    "--times",
    "--perms",
    "--links",
    "--safe-links",
    # HPC ASSyncy's Dg+s,ug+w,o-wx,ug+X, except that folders stay closed to the group while rsync writes into
    # them (mxsync.destination gives the group write access back afterwards): see writable_destination.
    "--chmod=Dg+s,Du+w,Dg-w,Fug+w,o-wx,ug+X",
    "--partial",
    "--include=.info",
    "--exclude=.*",
    "--8-bit-output",
    "--itemize-changes",
    "--itemize-changes",
    "--info=name1",  # with --safe-links: "ignoring unsafe symlink ...", which verification reports
    f"--out-format={OUT_FORMAT}",
)
# What the source probe lists: the same files a transfer would consider.
PROBE_FILTERS = ("--include=.info", "--exclude=.*")


@dataclass(frozen=True)
class CommandSettings:
    """The slice of the config the command lines are built from."""

    ssh_target: str
    port: int
    known_hosts: Optional[Path]
    key_file: Optional[Path]
    ssh_connect_timeout: float
    ssh_keepalive_interval: int
    ssh_cipher: Optional[str]
    rsync_io_timeout: int
    rsync_bwlimit: Optional[str]
    rsync_options: tuple
    checksum: Optional[str] = None  # the whole-file checksum rsync prints for the bag (md5, sha1), or None

    @classmethod
    def from_config(cls, config):
        return cls(
            config.ssh_target,
            config.port,
            config.known_hosts,
            config.key_file,
            config.ssh_connect_timeout,
            config.ssh_keepalive_interval,
            config.ssh_cipher,
            config.rsync_io_timeout,
            config.rsync_bwlimit,
            tuple(config.rsync_options),
            config.rsync_checksum,
        )


class Commands:
    """Builds the ssh and rsync argument lists for one facility host."""

    def __init__(self, settings):
        self.settings = settings

    def ssh(self, session_options=None):
        """Return the ssh argument list (rsync's remote shell, the login probe, the shared connection's masters).

        `session_options` reuse a shared connection; None means a connection of its own, which a user's
        ssh_config must not turn into a background master that mxsync does not know about.
        """
        settings = self.settings
        arguments = ["ssh", "-p", str(settings.port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]
        if settings.known_hosts is not None:
            arguments += ["-o", f"UserKnownHostsFile={settings.known_hosts}"]
        if settings.key_file is not None:
            arguments += ["-i", str(settings.key_file), "-o", "IdentitiesOnly=yes"]
        arguments += ["-o", f"ConnectTimeout={int(settings.ssh_connect_timeout)}"]
        if settings.ssh_keepalive_interval:
            arguments += [
                "-o",
                f"ServerAliveInterval={settings.ssh_keepalive_interval}",
                "-o",
                "ServerAliveCountMax=3",
            ]
        if settings.ssh_cipher:
            arguments += ["-c", settings.ssh_cipher]
        if session_options is None:
            return arguments + ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
        return arguments + list(session_options)

    def transfer(self, source, destination, dry_run, session_options=None, checksums=True):
        """Return the rsync of a remote source folder into a local destination (a path, or an open folder's
        descriptor: see local()); `checksums=False` leaves out the bag's checksum options."""
        settings = self.settings
        arguments = ["rsync", *BASE_OPTIONS]
        if settings.rsync_io_timeout:
            arguments.append(f"--timeout={settings.rsync_io_timeout}")
        if settings.rsync_bwlimit:
            arguments.append(f"--bwlimit={settings.rsync_bwlimit}")
        if dry_run:
            arguments.append("--dry-run")
        arguments += list(settings.rsync_options)
        if settings.checksum and checksums and not dry_run:
            arguments += checksum_options(settings.checksum)
        arguments += ["--rsh", rsh_string(self.ssh(session_options))]
        return arguments + [self.remote(source), local(destination)]

    def listing(self, folder, recursive=False, filters=(), session_options=None):
        """Return the rsync --list-only of a remote folder (its contents: `folder/`)."""
        arguments = ["rsync", "--list-only", *(["--recursive"] if recursive else []), *filters]
        return arguments + ["--rsh", rsh_string(self.ssh(session_options)), self.remote(folder)]

    def remote(self, folder):
        return f"{self.settings.ssh_target}:{folder.rstrip('/')}/"


def checksum_options(algorithm):
    """Return the options that make rsync print each transferred file's whole-file checksum, in `algorithm`.

    rsync computes it anyway to check the file it received; the BagIt manifest reuses it (mxsync.bagging).
    """
    return (f"--checksum-choice={algorithm}", f"--out-format={OUT_FORMAT_WITH_CHECKSUM}")


def local(destination):
    """Name a local destination for rsync: a path, or an open folder (mxsync.destination.writable_destination)
    through the descriptor rsync inherits, so rsync writes into that folder whatever its path leads to since."""
    if isinstance(destination, int):
        return f"/proc/self/fd/{destination}/"
    return f"{str(destination).rstrip('/')}/"


def rsh_string(arguments):
    """Join ssh arguments for rsync's --rsh, which splits on spaces and honours quotes (it is not a shell)."""
    quoted = []
    for argument in arguments:
        if "'" in argument or "\n" in argument:
            raise RsyncError(
                f"cannot pass {argument!r} to rsync's remote shell: quotes and newlines are not allowed in paths"
            )
        quoted.append(f"'{argument}'" if (" " in argument or '"' in argument) else argument)
    return " ".join(quoted)
