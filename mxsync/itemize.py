"""Reading rsync's itemised output (`-ii --out-format='%i %l %n%L'`) and checking the destination against it.

rsync itemises every file and symlink of the source, changed or not, which gives both the
progress and the list that verification checks at the destination. With OUT_FORMAT_WITH_CHECKSUM it also
prints the whole-file checksum of each file it transferred (`%C`), which the BagIt manifest reuses.
"""

import logging
import os
import re
import stat
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

logger = logging.getLogger("mxsync.itemize")

OUT_FORMAT = "%i %l %n%L"
# %C is the whole-file checksum (--checksum-choice) of a transferred file, blanks of the same width otherwise;
# the "/" ends it (hex holds none), and names still begin after it.
OUT_FORMAT_WITH_CHECKSUM = "%i %l %C/%n%L"
ESCAPED_BYTE = re.compile(rb"\\#([0-7]{3})")
UNSAFE_LINK = re.compile(rb'^ignoring unsafe symlink "(.*)" -> "(.*)"$')
LINK_ARROW = b" -> "
HEX_DIGEST = re.compile(rb"[0-9a-f]{32,128}")


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

    def total_size(self):
        """The bytes of all the files."""
        return sum(self._sizes)

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
    """What one rsync run reported: every regular file and symlink of the source, and what moved."""

    epn: str
    files: FileList = field(default_factory=FileList)
    links: list = field(default_factory=list)  # (relative path, target) of every symlink copied
    unsafe_links: list = field(default_factory=list)  # "path -> target" of symlinks leaving the EPN, not copied
    files_transferred: int = 0
    bytes_transferred: int = 0
    seconds: float = 0.0
    # {relative path bytes: (size, hex digest)} of the files rsync transferred, when it was asked to print them.
    checksums: Optional[dict] = None

    @property
    def empty(self):
        return not self.files and not self.links


def record_item(result, raw_line, epn):
    """Parse one output line into `result`: count transfers, remember every file, symlink and refused link."""
    line = raw_line.rstrip(b"\n")
    unsafe = UNSAFE_LINK.match(line)
    if unsafe:
        result.unsafe_links.append(" -> ".join(_unescape(part).decode("utf-8", "replace") for part in unsafe.groups()))
        return
    # %i is a fixed 11-character field that itself holds spaces for unchanged attributes.
    item, size, name = line[:11], *line[12:].partition(b" ")[::2]
    if len(item) != 11 or line[11:12] != b" " or not size.isdigit() or not name:
        logger.debug("%s: rsync: %s", epn, line.decode("utf-8", "replace"))
        return
    kind, size = item[1:2], int(size)
    digest = b""
    if result.checksums is not None:
        digest, slash, name = name.partition(b"/")
        if not slash:
            logger.debug("%s: rsync: %s", epn, line.decode("utf-8", "replace"))
            return
        digest = digest.strip()
    if kind == b"L":
        link = _split_link(name, size)
        if link is not None:
            result.links.append(link)
        return
    if kind != b"f":
        return
    relative = _unescape(name)
    result.files.add_raw(relative, size)
    if item[:1] in (b">", b"c"):
        result.files_transferred += 1
        result.bytes_transferred += size
        if HEX_DIGEST.fullmatch(digest):
            result.checksums[relative] = (size, digest.decode("ascii"))


def _unescape(name):
    return ESCAPED_BYTE.sub(lambda match: bytes([int(match.group(1), 8)]), name)


def _split_link(text, target_length):
    """Split 'name -> target' at the arrow whose target has the length rsync reported (names may hold ' -> ')."""
    position = text.rfind(LINK_ARROW)
    while position > 0:
        target = _unescape(text[position + len(LINK_ARROW) :])
        if len(target) == target_length:
            return os.fsdecode(_unescape(text[:position])), os.fsdecode(target)
        position = text.rfind(LINK_ARROW, 0, position)
    return None


def verify_destination(result, destination):
    """Given what rsync reported for the source, return a list of problems at the destination (empty if complete).

    No symlink is followed, on the way to `destination` or below it: one planted where a file or folder should be
    makes what is behind it count as missing, so a link can never make an incomplete EPN look complete.
    """
    destination = Path(destination)
    link = _symlink_on_the_way(destination)
    if link is not None:
        return [f"{link} is a symlink, so nothing behind it is counted"]
    problems = []
    folders = {Path("."): True}

    def in_real_folder(relative):
        parent = relative.parent
        if parent not in folders:
            folders[parent] = in_real_folder(parent) and _is_real_folder(destination / parent)
        return folders[parent]

    for relative, size in result.files:
        relative = Path(relative)
        try:
            found = os.lstat(destination / relative) if in_real_folder(relative) else None
        except OSError:
            found = None
        if found is None or not stat.S_ISREG(found.st_mode):
            problems.append(f"{relative}: missing")
        elif found.st_size != size:
            problems.append(f"{relative}: {found.st_size} bytes, source has {size}")
    for relative, target in result.links:
        try:
            found = os.readlink(destination / relative) if in_real_folder(Path(relative)) else None
        except OSError:
            found = None
        if found is None:
            problems.append(f"{relative}: symlink missing")
        elif found != target:
            problems.append(f"{relative}: symlink to {found}, source links to {target}")
    return problems


def _symlink_on_the_way(destination):
    """Return the EPN folder or data/ if one is a symlink, else None.

    Above them, the project folder may be a symlink that resolves inside the root (mxsync.destination checked it
    when the EPN was planned); below them, every folder is checked file by file.
    """
    for path in (destination.parent, destination):
        if os.path.islink(path):
            return path
    return None


def _is_real_folder(path):
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False
