"""Where an EPN lands, and whether the destination root is safe to write to at all."""

import errno
import logging
import os
import tempfile
from pathlib import Path

from mxsync.errors import DestinationError, UnsafeNameError
from mxsync.names import check_epn, describe, is_project

logger = logging.getLogger("mxsync.destination")

# What rsync's --chmod=Dg+s,ug+w,o-wx,ug+X makes of a 0755 folder: the folders mxsync creates look like
# the ones rsync creates, whatever the service's umask (the unit's 0027 would give drwxr-s---).
FOLDER_MODE = 0o2774


def check_destination_root(config):
    """Raise DestinationError if the root is missing, not a directory, not writable, or not the required mount point."""
    root = config.destination_root
    if not root.is_dir():
        raise DestinationError(
            f"destination-root-path {root} does not exist or is not a directory; "
            "is the file system mounted? No transfer was started"
        )
    if config.destination_must_be_mount_point and not os.path.ismount(root):
        raise DestinationError(
            f"destination-root-path {root} is not a mount point (destination-must-be-mount-point is set); "
            "mount the file system; no transfer was started so the root file system does not fill up"
        )
    try:
        # os.access ignores read-only mounts and ACL subtleties; creating a file is the real test.
        with tempfile.TemporaryFile(dir=root, prefix=".mxsync-write-test-"):
            pass
    except OSError as error:
        raise DestinationError(
            f"destination-root-path {root} is not writable ({error.strerror}); no transfer was started"
        ) from None


def epn_destination(config, project, epn):
    """Given a project folder and an EPN, return root/project/epn/data, refusing anything that would leave the root."""
    check_epn(epn, "the plan")
    if not is_project(project):
        raise UnsafeNameError(f"project folder {describe(project)} for {epn} is not a safe folder name")
    root = Path(os.path.realpath(config.destination_root))
    target = root / project / epn / "data"
    # Folders are written through one component at a time without following links (make_epn_folders), so a
    # link anywhere below the root, even to another folder inside it, is refused here, before any transfer.
    for depth in (1, 2, 3):
        component = root.joinpath(*target.relative_to(root).parts[:depth])
        if os.path.islink(component):
            raise UnsafeNameError(f"{component} is a symlink; refusing to write through it (make it a real folder)")
    return target


def make_epn_folders(config, destination):
    """Create the folders from the root down to `destination` one at a time, never following a symlink."""
    root = Path(os.path.realpath(config.destination_root))
    parts = Path(destination).relative_to(root).parts
    directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for depth, part in enumerate(parts, 1):
            try:
                os.mkdir(part, FOLDER_MODE, dir_fd=directory)
                created = True
            except FileExistsError:
                created = False
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory)
            except OSError as error:
                if error.errno in (errno.ELOOP, errno.ENOTDIR):
                    path = root.joinpath(*parts[:depth])
                    raise UnsafeNameError(f"{path} is a symlink or not a folder; refusing to write through it") from None
                raise
            if created:
                os.fchmod(child, FOLDER_MODE)  # mkdir's mode is cut by the umask
            os.close(directory)
            directory = child
    finally:
        os.close(directory)
