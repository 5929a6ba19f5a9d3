"""The files that remember things between runs: ignore.yml, small JSON state stores, the instance lock.

Every write is atomic (temp file, fsync, rename, fsync of the directory), so a crash at any
instant leaves either the old or the new file. A file that cannot be parsed is reported and
never overwritten.
"""

import errno
import fcntl
import json
import logging
import os
import re
import socket
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import yaml

from mxsync.errors import LockHeldError, StateFileError
from mxsync.names import describe

logger = logging.getLogger("mxsync.state")

IGNORE_KEY = "previouslySynched"
IGNORE_HEADER = (
    "# EPNs that mxsync has repatriated and verified; it skips them from now on.\n"
    "# Remove an EPN from this list to have it synced again. Keep the list format.\n"
)
# ignore.yml is re-read and rewritten for every EPN synced, so with years of history its YAML cost
# dominated a pass (pure-Python PyYAML: 135 ms per EPN at 5,000 entries). The file exactly as
# render() writes it, with EPN-shaped entries only, is read and written directly; anything else (hand
# edits, the old tool's flow style) goes through YAML, via libyaml if present. The EPN shape here leaves
# out a leading 0, so that every entry is a plain YAML string (YAML 1.1 reads 0xf as the number 15).
_PLAIN_EPN_SHAPE = r"[1-9][0-9]{0,11}[a-z]{1,4}"
_PLAIN_EPN = re.compile(_PLAIN_EPN_SHAPE)
_WRITTEN_PREFIX = IGNORE_HEADER + IGNORE_KEY + ":\n"
_WRITTEN_ENTRIES = re.compile(f"(?:- {_PLAIN_EPN_SHAPE}\n)*")
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def atomic_write(path, text):
    """Given a path and its new text, replace the file so that readers see the old or the new text, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as temp_file:
            temp_file.write(text)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.chmod(temp_name, mode)
        os.replace(temp_name, path)
    except BaseException:
        with _ignoring(FileNotFoundError):
            os.unlink(temp_name)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@contextmanager
def _ignoring(*exceptions):
    try:
        yield
    except exceptions:
        pass


@contextmanager
def file_lock(lock_path):
    """Hold an exclusive flock on lock_path for the duration of the block (waiting for it)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


class IgnoreFile:
    """The record of synced EPNs, in the old format `previouslySynched: [12282a, ...]`."""

    def __init__(self, path):
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._thread_lock = threading.Lock()

    def load(self):
        """Return the set of EPNs recorded in the file (empty if the file does not exist yet)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return set()
        except (OSError, UnicodeDecodeError) as error:
            raise StateFileError(f"{self.path}: cannot read the record of synced EPNs: {error}") from None
        return self._parse(text)

    def _parse(self, text):
        if text.startswith(_WRITTEN_PREFIX) and _WRITTEN_ENTRIES.fullmatch(text, len(_WRITTEN_PREFIX)):
            return {line[2:] for line in text[len(_WRITTEN_PREFIX):].splitlines()}
        fix = "fix it by hand (format: 'previouslySynched: [12282a, 12283b]'); mxsync will not overwrite it"
        try:
            data = yaml.load(text, Loader=_YAML_LOADER)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise StateFileError(f"{self.path}: not valid YAML{where}; {fix}") from None
        if data is None:
            return set()
        if not isinstance(data, dict) or set(data) != {IGNORE_KEY}:
            raise StateFileError(f"{self.path}: expected only the key '{IGNORE_KEY}', got {describe(data)}; {fix}")
        entries = data[IGNORE_KEY]
        if entries is None:
            return set()
        if not isinstance(entries, list):
            raise StateFileError(f"{self.path}: '{IGNORE_KEY}' must be a list, got {describe(entries)}; {fix}")
        bad = [entry for entry in entries if isinstance(entry, bool) or not isinstance(entry, (str, int))]
        if bad:
            raise StateFileError(f"{self.path}: '{IGNORE_KEY}' holds {describe(bad[0])}, not an EPN; {fix}")
        # A hand-written 12282 (no letter) is read by YAML as a number; keep it as the name it is.
        return {str(entry) for entry in entries}

    def add(self, epns):
        """Record EPNs as synced: re-read the file under a lock, add, replace atomically; return the new set."""
        epns = set(epns)
        try:
            with self._thread_lock, file_lock(self._lock_path):
                # Re-reading here keeps any hand edit made since the last read (added or removed EPNs).
                current = self.load()
                if epns <= current:
                    return current
                updated = current | epns
                atomic_write(self.path, self.render(updated))
                return updated
        except OSError as error:  # a full or read-only file system: the old file is still there, intact
            raise StateFileError(
                f"{self.path}: cannot record {', '.join(sorted(epns))}: {error.strerror or error}; the file is unchanged"
            ) from None

    @staticmethod
    def render(epns):
        """Given a set of EPNs, return the file text, sorted as the old tool wrote it."""
        ordered = sorted(epns)
        if ordered and all(map(_PLAIN_EPN.fullmatch, ordered)):  # the text yaml.safe_dump gives, 50 times faster
            return _WRITTEN_PREFIX + "".join(f"- {epn}\n" for epn in ordered)
        return IGNORE_HEADER + yaml.dump({IGNORE_KEY: ordered}, Dumper=_YAML_DUMPER, default_flow_style=False)


class JsonStore:
    """A small JSON state file (failure history, alert history) read whole and replaced atomically."""

    def __init__(self, path, what):
        self.path = Path(path)
        self.what = what

    def load(self):
        """Return the stored mapping, or an empty one if the file does not exist yet."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as error:
            raise StateFileError(f"{self.path}: cannot read the {self.what}: {error}") from None
        try:
            data = json.loads(text) if text.strip() else {}
        except ValueError as error:
            raise StateFileError(
                f"{self.path}: the {self.what} is corrupt ({error}); move it aside to start a fresh history"
            ) from None
        if not isinstance(data, dict):
            raise StateFileError(f"{self.path}: the {self.what} should hold a JSON object; move it aside to start afresh")
        return data

    def save(self, data):
        """Replace the stored mapping with data, atomically."""
        atomic_write(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class InstanceLock:
    """An exclusive, non-blocking lock so that only one mxsync --execute runs against a state directory."""

    def __init__(self, path):
        self.path = Path(path)
        self._file = None

    def acquire(self):
        """Take the lock or raise LockHeldError naming the process that holds it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock_file = open(self.path, "a+")
        except OSError as error:
            raise StateFileError(f"{self.path}: cannot open the instance lock: {error.strerror or error}") from None
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            lock_file.seek(0)
            holder = lock_file.read().strip() or "an unknown process"
            lock_file.close()
            raise LockHeldError(
                f"another mxsync is already running ({holder}, lock {self.path}); stop it first"
            ) from None
        try:
            lock_file.seek(0)
            lock_file.truncate()
            lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            lock_file.flush()
        except OSError as error:  # e.g. the state file system is full: nothing could be recorded anyway
            with _ignoring(OSError):  # closing flushes the same unwritable text again; the lock goes either way
                lock_file.close()
            raise StateFileError(f"{self.path}: cannot write the instance lock: {error.strerror or error}") from None
        self._file = lock_file
        return self

    def release(self):
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def is_held_elsewhere(self):
        """Return True if another process holds the lock now (for status views)."""
        if not self.path.exists():
            return False
        with open(self.path, "a+") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(probe, fcntl.LOCK_UN)
            return False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()
