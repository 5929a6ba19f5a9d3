"""Where an EPN lands, and whether the destination root is usable at all.

A project's members can write in its folder, so they can put a symlink where an EPN's folders are, before a
cycle or while a transfer runs. So the EPN's folders are opened one at a time without following links and must
belong to mxsync's account (or root); rsync gets the open `data` folder itself (/proc/self/fd/N), so a component
renamed or replaced afterwards cannot send the data elsewhere; and while rsync runs, no folder from `data` down
is writable by the group, so nobody can swap a folder rsync is writing into for a link (rsync 3.4 and later
refuse such links themselves; older ones, as RHEL and Debian 12's main archive ship, follow them).
"""

import contextlib
import errno
import logging
import os
import pwd
import stat
from pathlib import Path

from mxsync.errors import DestinationError, UnsafeNameError
from mxsync.names import check_epn, describe, is_project

logger = logging.getLogger("mxsync.destination")

# What rsync's --chmod=Dg+s,ug+w,o-wx,ug+X makes of a 0755 folder: the folders mxsync creates look like
# the ones rsync creates, whatever the service's umask (the unit's 0027 would give drwxr-s---).
FOLDER_MODE = 0o2774
# Taken from every folder from `data` down while rsync writes, and given back to the group afterwards.
WRITE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
OPEN_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
# The root and the project folder are only passed through: search (x) permission is all they need to give us.
PASS_THROUGH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW


def check_destination_root(config):
    """Raise DestinationError if the root is missing, not a folder, read-only, or not the required mount point.

    Nothing is written into the root itself: transfers write only in the project folders (and create one there
    only if it is missing), so the service account needs write access to those, not to the root.
    """
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
        read_only = os.statvfs(root).f_flag & os.ST_RDONLY
    except OSError as error:
        raise DestinationError(f"destination-root-path {root}: {error.strerror}; no transfer was started") from None
    if read_only:
        raise DestinationError(
            f"destination-root-path {root} is not writable (Read-only file system); remount it read-write; "
            "no transfer was started"
        )
    if not os.access(root, os.X_OK):
        raise DestinationError(
            f"destination-root-path {root} cannot be entered by {_user_name(os.geteuid())}; "
            "give the service account search (x) permission on it; no transfer was started"
        )


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


@contextlib.contextmanager
def writable_destination(config, destination):
    """Create and open root/project/epn/data without following links; yield the open folder for rsync to write into.

    While the block runs no folder from `data` down is writable by the group; afterwards the group may write again
    (g+w, as rsync's --chmod leaves folders). Raises UnsafeNameError naming the folder for a symlink, an EPN folder
    that is not mxsync's (or root's), or a path swapped while the block ran.
    """
    root = Path(os.path.realpath(config.destination_root))
    folder = _open_epn_folders(root, Path(destination), create=True)
    try:
        try:
            _walk(folder, Path(destination), _close_to_others)
            yield folder
            _check_still_there(root, Path(destination), folder)
        finally:
            _reopen_to_group(folder, Path(destination))
    finally:
        os.close(folder)


def _open_epn_folders(root, destination, create, refusal="refusing to write through it (make it a real folder)"):
    """Open root/project/epn/data, creating what is missing if `create`; return the data folder's descriptor.

    The project folder is opened by its real path (a symlink to it can only be made by whoever manages the root);
    the EPN folder and data/ one at a time, never through a symlink, and they must be this account's or root's.
    """
    project, epn, data = destination.relative_to(root).parts
    if os.path.islink(root / project):
        directory = os.open(_project_folder(root, project), os.O_PATH | os.O_DIRECTORY)
    else:
        parent = os.open(root, PASS_THROUGH)
        try:
            directory = _open_child(parent, project, root / project, create, FOLDER_MODE, refusal, PASS_THROUGH)
        finally:
            os.close(parent)
    try:
        # data/ is born closed to the group: rsync is about to write into it.
        for name, path, mode in (
            (epn, root / project / epn, FOLDER_MODE),
            (data, destination, FOLDER_MODE & ~WRITE_BY_OTHERS),
        ):
            child = _open_child(directory, name, path, create, mode, refusal)
            os.close(directory)
            directory = child
            _check_owner(os.fstat(directory), path)
        return directory
    except BaseException:
        os.close(directory)
        raise


def _open_child(directory, name, path, create, mode, refusal, flags=OPEN_FOLDER):
    """Open folder `name` in `directory` (a descriptor) without following a symlink, creating it first if asked."""
    created = False
    if create:
        try:
            os.mkdir(name, mode, dir_fd=directory)
            created = True
        except FileExistsError:
            pass
    try:
        child = os.open(name, flags, dir_fd=directory)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeNameError(f"{_not_a_folder(path, name, directory)}; {refusal}") from None
        if error.errno == errno.ENOENT and not create:
            raise UnsafeNameError(f"{path} was moved away while rsync wrote into it") from None
        raise
    if created:  # mkdir's mode is cut by the umask; a descriptor opened for passing through cannot change it
        adjust = child if flags == OPEN_FOLDER else os.open(name, OPEN_FOLDER, dir_fd=directory)
        try:
            os.fchmod(adjust, mode)
        finally:
            if adjust != child:
                os.close(adjust)
    return child


def _not_a_folder(path, name, parent):
    try:
        return f"{path} is a symlink to {os.readlink(name, dir_fd=parent)}"
    except OSError:
        return f"{path} is not a folder"


def _check_owner(info, path):
    """Raise UnsafeNameError unless the folder is this account's or root's: its owner could open it to anyone."""
    if info.st_uid not in (os.geteuid(), 0):
        raise UnsafeNameError(
            f"{path} belongs to {_user_name(info.st_uid)}, not to {_user_name(os.geteuid())} or root; mxsync writes "
            "only into folders that nobody else can open to others meanwhile (move it aside, or chown it)"
        )


def _user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _walk(directory, path, visit):
    """Call visit(fd, path) for `directory` and every folder below it, never following a symlink.

    A visit returning False skips what is below that folder. One descriptor is open per level.
    """
    if visit(directory, path) is False:
        return
    with os.scandir(directory) as entries:
        names = [entry.name for entry in entries if entry.is_dir(follow_symlinks=False)]
    for name in names:
        try:
            child = os.open(name, OPEN_FOLDER, dir_fd=directory)
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                continue  # gone or no longer a folder since it was listed: rsync replaces a link itself
            raise
        try:
            _walk(child, path / name, visit)
        finally:
            os.close(child)


def _close_to_others(directory, path):
    info = os.fstat(directory)
    _check_owner(info, path)
    if info.st_mode & WRITE_BY_OTHERS:
        if info.st_uid != os.geteuid():
            account = _user_name(os.geteuid())
            raise UnsafeNameError(
                f"{path} belongs to root and its group may write in it, which mxsync (running as {account}) cannot "
                f"stop while rsync writes there; chown it to {account}"
            )
        os.fchmod(directory, stat.S_IMODE(info.st_mode) & ~WRITE_BY_OTHERS)


def _reopen_to_group(folder, path):
    """Give the group write access back to every folder of ours from `folder` down (the transfer's outcome stands)."""
    try:
        _walk(folder, path, _open_to_group)
    except OSError as error:  # the data is there; only the group's write access is missing somewhere
        logger.warning("%s: cannot give the group write access back: %s", path, error.strerror or error)


def _open_to_group(directory, path):
    info = os.fstat(directory)
    if info.st_uid not in (os.geteuid(), 0):
        return False  # someone else's: refused before anything was written, and never changed
    if info.st_uid == os.geteuid() and not info.st_mode & stat.S_IWGRP:
        os.fchmod(directory, stat.S_IMODE(info.st_mode) | stat.S_IWGRP)
    return True


def _check_still_there(root, destination, folder):
    """Raise UnsafeNameError, naming the link, if the path no longer leads to `folder` (swapped while rsync ran)."""
    current = _open_epn_folders(
        root,
        destination,
        create=False,
        refusal="it replaced the folder while rsync wrote into that, so nothing went through it",
    )
    try:
        found, expected = os.fstat(current), os.fstat(folder)
    finally:
        os.close(current)
    if (found.st_dev, found.st_ino) != (expected.st_dev, expected.st_ino):
        raise UnsafeNameError(
            f"{destination} was replaced by another folder while rsync wrote into the one it replaced"
        )
