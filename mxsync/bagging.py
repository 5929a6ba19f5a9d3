"""The bag step: keep rsync's checksums as files arrive, and make a verified EPN's folder a BagIt bag before its record.

rsync prints the whole-file checksum of every file it transfers (mxsync.itemize, %C); those are kept in the store
with each file's stamp, so the final pass hashes here only the files rsync did not send or that changed since.
The files themselves are written and checked by mxsync.bag.
"""

import collections
import logging
import os
import stat
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from mxsync import __version__
from mxsync.bag import LOCAL_ALGORITHM, bagit_cannot_read, file_stamp, payload_entries, verify_bag, write_bag
from mxsync.destination import writable_destination
from mxsync.errors import BagError
from mxsync.pipeline import human_bytes

logger = logging.getLogger("mxsync.bagging")

# As rsync's --chmod leaves the data files: the project's group reads them as it reads its data.
TAG_FILE_MODE = 0o664
# The digest lengths of the algorithms rsync may print (config BAG_ALGORITHMS): a field of another length is not one.
DIGEST_LENGTHS = {"md5": 32, "sha1": 40}


@dataclass(frozen=True)
class BagFigures:
    """What making one bag took."""

    files: int
    bytes: int
    algorithm: str
    from_rsync: int
    hashed: int
    hashed_bytes: int
    seconds: float

    def __str__(self):
        return (
            f"bagged {self.files} files in {self.seconds:.1f} s, {self.algorithm} ({self.from_rsync} checksums "
            f"from rsync, {self.hashed} files hashed here, {human_bytes(self.hashed_bytes)})"
        )


def make_bag(bag_dir, info, known=None, stop=None, progress=None, name=None, preferred=None):
    """Make `bag_dir` a bag around its data/ and check it; return BagFigures or raise BagError.

    `name` is how messages call the folder (bag_dir may be an open folder's /proc/self/fd/N).
    `known` maps a path under data/ (bytes) to (size, stamp, algorithm, digest), as the store keeps them. The bag
    takes the algorithm most of them have (rsync's), so that only the other files are hashed here; with none known,
    `preferred` (bag-algorithm), else LOCAL_ALGORITHM.
    """
    started = time.monotonic()
    name = name or bag_dir
    known = known or {}
    counts = collections.Counter(algorithm for _size, _stamp, algorithm, _digest in known.values())
    algorithm = counts.most_common(1)[0][0] if counts else preferred or LOCAL_ALGORITHM
    usable = {
        path: (size, stamp, digest)
        for path, (size, stamp, known_algorithm, digest) in known.items()
        if known_algorithm == algorithm
    }
    skipped = []
    entries, hashed, hashed_bytes = payload_entries(
        bag_dir, algorithm, usable, stop=stop, progress=progress, skipped=skipped
    )
    try:
        write_bag(bag_dir, entries, info, algorithm, mode=TAG_FILE_MODE)
    except BagError as error:
        raise BagError(str(error).replace(str(bag_dir), str(name))) from None
    problems = verify_bag(bag_dir, fast=True)
    if problems:
        raise BagError(f"{name}: the bag just written does not check out: {'; '.join(problems[:3])}")
    if skipped:
        # RFC 8493 payload is files; the bagit package counts a link to a file as one (and fails on it).
        logger.warning(
            "%s: %d symlink(s) or special file(s) in data/ are not in the manifest (first: %r)",
            name,
            len(skipped),
            os.fsdecode(skipped[0]),
        )
    unreadable = [path for path, _size, _digest in entries if bagit_cannot_read(path)]
    if unreadable:
        logger.warning(
            "%s: %d file name(s) that the bagit package cannot read back (first: %r); mxsync verify checks them",
            name,
            len(unreadable),
            os.fsdecode(unreadable[0]),
        )
    return BagFigures(
        files=len(entries),
        bytes=sum(size for _path, size, _digest in entries),
        algorithm=algorithm,
        from_rsync=len(entries) - hashed,
        hashed=hashed,
        hashed_bytes=hashed_bytes,
        seconds=time.monotonic() - started,
    )


def bag_info(record, source_host=None, source_path=None, when=None):
    """Given an EPN's record (mxsync.followups.build_record), return bag-info.txt's (label, value) pairs."""
    pairs = [("External-Identifier", record["epn"]), ("EPN", record["epn"])]
    if record.get("project"):
        pairs.append(("Project", record["project"]))
    for label, key in (("Beamline", "beamline"), ("Visit-Start", "visit_start"), ("Visit-End", "visit_end")):
        if record.get(key):
            pairs.append((label, record[key]))
    if record.get("principal"):
        pairs.append(("Principal-Scientist", _person(record["principal"])))
    pairs += [("Data-Scientist", _person(person)) for person in record.get("scientists") or ()]
    if source_host:
        pairs.append(("Source-Host", source_host))
    if source_path:
        pairs.append(("Source-Path", source_path))
    pairs.append(("Bagging-Date", (when or datetime.now(timezone.utc)).strftime("%Y-%m-%d")))
    pairs.append(("Bag-Software-Agent", f"mxsync {__version__}"))
    return pairs


def _person(person):
    name, email = person.get("name"), person.get("email")
    return f"{name} <{email}>" if name and email else name or email or "unknown"


class Bagger:
    """The pipeline's bag step for one config: remembers rsync's checksums and bags a verified EPN."""

    def __init__(self, settings, algorithm, rsync_algorithm, history, record_for, source_host, stop):
        self.settings = settings  # what writable_destination needs (destination_root)
        self.algorithm = algorithm  # the bag's (config.bag_algorithm), for files hashed here
        self.rsync_algorithm = rsync_algorithm  # what rsync prints (config.rsync_checksum), or None
        self.history = history
        self.record_for = record_for  # EPN -> its record (mxsync.followups.build_record)
        self.source_host = source_host
        self.stop = stop

    def remember(self, epn, data_folder, result):
        """Keep the checksums rsync printed for the files of `result`, with each file's stamp as it is now.

        `data_folder` is the open data/ folder rsync wrote into (or its path). A file whose size is not the one rsync
        reported has changed since (or is not ours): it is left out and hashed when the EPN is bagged.
        """
        if not result.checksums or self.rsync_algorithm is None:
            return
        length = DIGEST_LENGTHS.get(self.rsync_algorithm)
        entries = {}
        for path, (size, digest) in result.checksums.items():
            try:
                if isinstance(data_folder, int):
                    found = os.stat(path, dir_fd=data_folder, follow_symlinks=False)
                else:
                    found = os.lstat(os.path.join(os.fsencode(data_folder), path))
            except OSError:
                continue
            if stat.S_ISREG(found.st_mode) and found.st_size == size and len(digest) == length:
                entries[path] = (size, file_stamp(found), digest.lower())
        if entries:
            self.history.save_checksums(epn, self.rsync_algorithm, entries)
            logger.debug("%s: kept %d checksums from rsync", epn, len(entries))

    def bag(self, transfer):
        """Make the verified EPN's folder a bag; return BagFigures or raise BagError (or TransferStopped)."""
        with writable_destination(self.settings, transfer.destination) as data_folder:
            return self.bag_open_folder(transfer.epn, data_folder, transfer.destination.parent, transfer.source)

    def bag_open_folder(self, epn, data_folder, name, source_path=None, progress=None):
        """Bag the EPN folder holding the open data/ folder `data_folder`, called `name` in messages.

        Through the open folder, not its path: a project member who swaps a folder on the path meanwhile redirects
        nothing (mxsync.destination).
        """
        epn_folder = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=data_folder)
        try:
            bag_dir = f"/proc/self/fd/{epn_folder}"
            info = bag_info(self.record_for(epn), self.source_host, source_path)
            known = self.history.checksums(epn)
            figures = make_bag(
                bag_dir, info, known, stop=self.stop, progress=progress, name=name, preferred=self.algorithm
            )
        finally:
            os.close(epn_folder)
        logger.info("%s: %s", epn, figures)
        return figures
