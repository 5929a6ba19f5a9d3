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
    """Given a project folder and an EPN, return root/project/epn/data, refusing anything that would leave the root.

    The project folder may be a symlink that resolves inside the root (only whoever manages the root can make
    one); the EPN folder and data/, which project members can write to, must never be symlinks.
    """
    check_epn(epn, "the plan")
    if not is_project(project):
        raise UnsafeNameError(f"project folder {describe(project)} for {epn} is not a safe folder name")
    root = Path(os.path.realpath(config.destination_root))
    _project_folder(root, project)
    for component in (root / project / epn, root / project / epn / "data"):
        if os.path.islink(component):
            raise UnsafeNameError(f"{component} is a symlink; refusing to write through it (make it a real folder)")
    return root / project / epn / "data"


def _project_folder(root, project):
    """Return the project folder's real path, refusing a symlink that leads outside the root."""
    target = root / project
    resolved = Path(os.path.realpath(target))
    if resolved != target and root not in resolved.parents:
        raise UnsafeNameError(
            f"{target} resolves to {resolved}, outside destination-root-path {root}; refusing to write there"
        )
    return resolved


def make_epn_folders(config, destination):
    """Create root/project/epn/data as needed: the project folder by its real path, the EPN folder and data/
    one at a time without following a symlink. New folders get FOLDER_MODE whatever the umask."""
    root = Path(os.path.realpath(config.destination_root))
    project, epn, data = Path(destination).relative_to(root).parts
    project_folder = _project_folder(root, project)
    root_directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if os.path.islink(root / project):  # made by whoever manages the root, and resolving inside it
            directory = os.open(project_folder, os.O_RDONLY | os.O_DIRECTORY)
        else:
            directory = _open_or_make(root_directory, project, root / project)
    finally:
        os.close(root_directory)
    try:
        for part, path in ((epn, root / project / epn), (data, root / project / epn / data)):
            child = _open_or_make(directory, part, path)
            os.close(directory)
            directory = child
    finally:
        os.close(directory)


def _open_or_make(directory, name, path):
    """Open folder `name` in `directory` (an fd) without following a symlink, creating it first if missing."""
    try:
        os.mkdir(name, FOLDER_MODE, dir_fd=directory)
        created = True
    except FileExistsError:
        created = False
    try:
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeNameError(f"{path} is a symlink or not a folder; refusing to write through it") from None
        raise
    if created:
        os.fchmod(child, FOLDER_MODE)  # mkdir's mode is cut by the umask
    return child
