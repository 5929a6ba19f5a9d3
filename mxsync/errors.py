"""Exceptions whose messages are written for the operator; the CLIs print them as one line."""


class MxsyncError(Exception):
    """Base of every error the tools expect and report without a traceback."""

    exit_code = 1


class ConfigError(MxsyncError):
    """The configuration (or the command line) is unusable: exit 2."""

    exit_code = 2

    def __init__(self, path, problems):
        self.path = str(path)
        self.problems = list(problems)
        super().__init__("\n".join(f"{self.path}: {problem}" for problem in self.problems))


class StateFileError(MxsyncError):
    """A state file (ignore.yml or a state store) is unreadable or corrupt; it is left untouched."""

    exit_code = 2


class LockHeldError(MxsyncError):
    """Another mxsync process holds the instance lock."""


class PortalError(MxsyncError):
    """The facility portal could not be reached or answered with something unusable."""


class SftpError(MxsyncError):
    """The SFTP host could not be reached, refused us, or could not be listed."""


class MailError(MxsyncError):
    """An email could not be rendered or sent."""


class RsyncError(MxsyncError):
    """An rsync run failed; carries the exit code, its meaning and the tail of its output."""

    def __init__(self, message, returncode=None, transient=False, partial=False):
        super().__init__(message)
        self.returncode = returncode
        self.transient = transient
        # Some files were not sent (vanished, or unreadable while being written): expected while a visit runs.
        self.partial = partial
        self.result = None  # the TransferResult of what rsync reported before it failed, when there is one


class ProcessStartError(RsyncError):
    """rsync or ssh could not be started here (missing binary, no memory): a local problem."""


class TransferStopped(MxsyncError):
    """A transfer ended because mxsync was asked to stop: neither a failure nor a success."""


class DestinationError(MxsyncError):
    """The destination root is missing, not writable, or not the configured mount point."""


class UnsafeNameError(MxsyncError):
    """A name from the portal, SFTP or config would not be a safe path component."""


class StoreError(MxsyncError):
    """The state store (<state-dir>/mxsync.db) cannot be opened or written; the caller decides whether to go on."""


class FollowUpError(MxsyncError):
    """A follow-up of a record (an on-synced hook, an email) failed; it is retried in later cycles."""


class BagError(MxsyncError):
    """A BagIt bag (bagit.txt, bag-info.txt, the manifests) could not be read or written; names the file."""
