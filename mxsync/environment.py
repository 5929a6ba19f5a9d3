"""Checks of the environment mxsync was installed into, for `mxsync check` to report."""

import sys
from pathlib import PurePosixPath

# What mx_sync.service hides with ProtectHome=yes (systemd.exec(5)).
PROTECTED_HOME_DIRS = (
    PurePosixPath("/root"),
    PurePosixPath("/home"),
    PurePosixPath("/run/user"),
)


def protected_home_problem(executable=sys.executable, prefix=sys.prefix, base_prefix=sys.base_prefix):
    """Return a one-line message if this Python or its venv lies where ProtectHome=yes hides it, else None.

    base_prefix is where the interpreter really lives (a venv's pyvenv.cfg names it), so a pyenv
    Python behind a venv in /opt is caught too; nothing is read from the file system."""
    for what, path in (
        ("the venv", prefix),
        ("the Python this venv was made from", base_prefix),
        ("the Python interpreter", executable),
    ):
        hidden = _protected_dir(path)
        if hidden is not None:
            return (
                f"{what} ({path}) lies under {hidden}, which mx_sync.service hides (ProtectHome=yes), so the "
                f"service cannot start (status 203/EXEC); recreate the venv outside /root, /home and /run/user "
                f"from a system Python, e.g. /usr/bin/python3 -m venv /opt/mx_sync"
            )
    return None


def _protected_dir(path):
    """Given a path, return the protected directory it lies in (or is), else None."""
    if not path:
        return None
    path = PurePosixPath(path)
    for directory in PROTECTED_HOME_DIRS:
        if path == directory or directory in path.parents:
            return directory
    return None
