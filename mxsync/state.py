"""The files that remember things between runs: ignore.yml, small JSON state stores, the instance lock.

Every write is atomic (temp file, fsync, rename, fsync of the directory), so a crash at any
instant leaves either the old or the new file. A file that cannot be parsed is never overwritten:
ignore.yml is reported, a history file may be moved aside. New files are not world-readable.
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
from datetime import datetime
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

# Hand comments are kept by adding new EPNs to the text, never re-rendering it. That format commented by hand
# (`- EPN` lines under the key, comments on their own lines or after an entry, LF or CRLF) is read by this
# grammar without YAML, so recording stays as fast; tests check it reads exactly what YAML reads. Comment text
# is YAML's printable characters less its line breaks (YAML 1.1 also breaks lines at U+0085, U+2028, U+2029).
_COMMENT = r"#[\t\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]*"
_END = r"(?:\r?\n|\Z)"
_OWN_LINE = rf"[ ]*(?:{_COMMENT})?{_END}"  # a blank line or a comment on its own
_LINE_REST = rf"(?:[ ]+{_COMMENT})?[ ]*{_END}"  # what may follow the key or an entry on its line
_COMMENTED_LIST = re.compile(
    rf"(?:{_OWN_LINE})*{IGNORE_KEY}:{_LINE_REST}(?:-[ ]+{_PLAIN_EPN_SHAPE}{_LINE_REST}|{_OWN_LINE})*"
)
_COMMENTED_ENTRY = re.compile(rf"^-[ ]+({_PLAIN_EPN_SHAPE})", re.MULTILINE)
_KEY_LINE = re.compile(rf"^{IGNORE_KEY}:", re.MULTILINE)
_YAML_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")
_LINES = "one entry per line"  # _parse's layout for the text it read without a YAML parser
NEW_FILE_MODE = 0o640  # owner read/write, group (staff) read, whatever the umask


def atomic_write(path, text, new_mode=NEW_FILE_MODE):
    """Given a path and its new text, replace the file so that readers see the old or the new text, never a mix.

    An existing file keeps its mode; a new one gets new_mode whatever the umask (cron's 022 made state world-readable).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = new_mode
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


def _open_lock_file(path):
    """Open a lock file for reading and appending, creating it with NEW_FILE_MODE (group-readable, so staff can flock it)."""
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
    except FileExistsError:
        return os.fdopen(os.open(path, os.O_RDWR | os.O_APPEND), "a+")
    lock_file = os.fdopen(descriptor, "a+")
    try:
        os.fchmod(descriptor, NEW_FILE_MODE)  # the umask may have taken the group's read bit
    except OSError:
        lock_file.close()
        raise
    return lock_file


@contextmanager
def file_lock(lock_path):
    """Hold an exclusive flock on lock_path for the duration of the block (waiting for it)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with _open_lock_file(lock_path) as lock_file:
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
        return self._parse(self._read() or "")[0]

    def _read(self):
        """Return the file's text, or None if it does not exist yet."""
        try:
            with open(self.path, encoding="utf-8", newline="") as file:  # CRLF line ends are kept as they are
                return file.read()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as error:
            raise StateFileError(f"{self.path}: cannot read the record of synced EPNs: {error}") from None

    def _parse(self, text):
        """Return (the EPNs in text, its layout: _LINES, or the YAML document's node tree, None if empty)."""
        if text.startswith(_WRITTEN_PREFIX) and _WRITTEN_ENTRIES.fullmatch(text, len(_WRITTEN_PREFIX)):
            return {line[2:] for line in text[len(_WRITTEN_PREFIX) :].splitlines()}, _LINES
        if _COMMENTED_LIST.fullmatch(text):
            return set(_COMMENTED_ENTRY.findall(text)), _LINES
        fix = "fix it by hand (format: 'previouslySynched: [12282a, 12283b]'); mxsync will not overwrite it"
        try:
            node, data = _yaml_document(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise StateFileError(f"{self.path}: not valid YAML{where}; {fix}") from None
        if data is None:
            return set(), node
        if not isinstance(data, dict) or set(data) != {IGNORE_KEY}:
            raise StateFileError(f"{self.path}: expected only the key '{IGNORE_KEY}', got {describe(data)}; {fix}")
        entries = data[IGNORE_KEY]
        if entries is None:
            return set(), node
        if not isinstance(entries, list):
            raise StateFileError(f"{self.path}: '{IGNORE_KEY}' must be a list, got {describe(entries)}; {fix}")
        bad = [entry for entry in entries if isinstance(entry, bool) or not isinstance(entry, (str, int))]
        if bad:
            raise StateFileError(f"{self.path}: '{IGNORE_KEY}' holds {describe(bad[0])}, not an EPN; {fix}")
        # A hand-written 12282 (no letter) is read by YAML as a number; keep it as the name it is.
        return {str(entry) for entry in entries}, node

    def add(self, epns):
        """Record EPNs as synced: re-read the file under a lock, add, replace atomically; return the new set."""
        epns = set(epns)
        try:
            with self._thread_lock, file_lock(self._lock_path):
                # Re-reading here keeps any hand edit made since the last read (added or removed EPNs).
                text = self._read()
                current, layout = self._parse(text or "")
                if epns <= current:
                    return current
                updated = current | epns
                if text is None or not _has_hand_comments(text):
                    new_text = self.render(updated)
                else:
                    new_text = self._add_to_text(text, layout, sorted(epns - current), updated)
                atomic_write(self.path, new_text)
                return updated
        except OSError as error:  # a full or read-only file system: the old file is still there, intact
            raise StateFileError(
                f"{self.path}: cannot record {', '.join(sorted(epns))}: {error.strerror or error}; the file is unchanged"
            ) from None

    def _add_to_text(self, text, layout, new, updated):
        """Return text with the EPNs `new` added and every other character kept, checked to read as `updated`."""
        try:
            new_text = _insert_lines(text, new) if layout is _LINES else _insert_in_document(text, layout, new)
            kept = self._parse(new_text)[0] == updated
        except (StateFileError, ValueError):
            kept = False
        if not kept:  # e.g. a key given twice, or an ended document: refuse rather than lose a word of it
            raise StateFileError(
                f"{self.path}: cannot add {', '.join(new)} while keeping its hand-written comments in this layout; "
                "add them by hand, or write the list as one '- EPN' line per entry; the file is unchanged"
            )
        return new_text

    @staticmethod
    def render(epns):
        """Given a set of EPNs, return the file text, sorted as the old tool wrote it."""
        ordered = sorted(epns)
        if ordered and all(map(_PLAIN_EPN.fullmatch, ordered)):  # the text yaml.safe_dump gives, 50 times faster
            return _WRITTEN_PREFIX + "".join(f"- {epn}\n" for epn in ordered)
        return IGNORE_HEADER + yaml.dump({IGNORE_KEY: ordered}, Dumper=_YAML_DUMPER, default_flow_style=False)


def _yaml_document(text):
    """Return (the document's node tree, its value) from one parse; the nodes carry positions for editing."""
    loader = _YAML_LOADER(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


def _has_hand_comments(text):
    """True if text holds a '#' other than in mxsync's own header (a '#' inside quotes counts too: it is kept)."""
    return "#" in text.removeprefix(IGNORE_HEADER)


def _newline(text):
    return "\r\n" if "\r\n" in text else "\n"


def _after_line(text, offset):
    """Return the offset just past the line break ending the line that holds offset (or the end of text)."""
    match = _YAML_LINE_BREAK.search(text, offset)
    return match.end() if match else len(text)


def _insert_at(text, offset, lines):
    """Insert whole lines at offset, which is the start of a line or the end of text."""
    newline = _newline(text)
    before = newline if offset == len(text) and text and not _YAML_LINE_BREAK.match(text, len(text) - 1) else ""
    return text[:offset] + before + "".join(line + newline for line in lines) + text[offset:]


def _scalar(epn):
    """Given an EPN, return it as a YAML scalar that reads back as that string in block and flow context."""
    return epn if _PLAIN_EPN.fullmatch(epn) else "'" + epn.replace("'", "''") + "'"


def _insert_lines(text, new):
    """Add `- EPN` lines after the last entry of a file that _COMMENTED_LIST matches (after the key if none)."""
    last_entry = text.rfind("\n-") + 1  # in such a file only entries start a line with "-"
    offset = last_entry if last_entry else _KEY_LINE.search(text).start()
    return _insert_at(text, _after_line(text, offset), [f"- {_scalar(epn)}" for epn in new])


def _insert_in_document(text, document, new):
    """Add EPNs to any other YAML layout by editing the text at the list's positions in the node tree."""
    starts = [1 if text.startswith("\ufeff") else 0]  # YAML's columns do not count a byte-order mark
    starts += [match.end() for match in _YAML_LINE_BREAK.finditer(text)]

    def offset(mark):
        return starts[mark.line] + mark.column

    entries = [_scalar(epn) for epn in new]
    if document is None or isinstance(document, yaml.ScalarNode):  # only comments (the caller checks the rest)
        return _insert_at(text, len(text), [f"{IGNORE_KEY}:"] + [f"- {entry}" for entry in entries])
    if not isinstance(document, yaml.MappingNode) or len(document.value) != 1:
        raise ValueError(f"not one '{IGNORE_KEY}' key")
    key, value = document.value[0]
    if isinstance(value, yaml.SequenceNode) and value.flow_style:
        if value.value:  # right after the last item, before any trailing comma or comment
            at = offset(value.value[-1].end_mark)
            return text[:at] + "".join(f", {entry}" for entry in entries) + text[at:]
        at = offset(value.start_mark) + 1  # just inside the "["
        return text[:at] + ", ".join(entries) + text[at:]
    if isinstance(value, yaml.SequenceNode):  # block style: new lines after the last item's, at its dash's column
        indent = " " * value.start_mark.column
        return _insert_at(
            text, _after_line(text, offset(value.value[-1].end_mark)), [f"{indent}- {entry}" for entry in entries]
        )
    start, end = offset(value.start_mark), offset(value.end_mark)
    if start < end:  # an explicit null, e.g. "previouslySynched: ~": becomes a flow list in its place
        return text[:start] + "[" + ", ".join(entries) + "]" + text[end:]
    indent = " " * key.start_mark.column  # nothing after the key: block entries on the lines below it
    return _insert_at(text, _after_line(text, offset(key.end_mark)), [f"{indent}- {entry}" for entry in entries])


class JsonStore:
    """A small JSON state file (failure history, alert history) read whole and replaced atomically."""

    def __init__(self, path, what):
        self.path = Path(path)
        self.what = what

    def load(self, check=None, recover=False):
        """Return the stored mapping ({} if there is none yet); check(data) may name what makes it unusable.

        An unusable file raises StateFileError, or with recover is moved aside (one warning) and {} returned.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as error:  # a local problem (permissions, I/O), not a damaged file: never moved aside
            raise StateFileError(f"{self.path}: cannot read the {self.what}: {error.strerror or error}") from None
        try:
            data = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        except ValueError as error:  # UnicodeDecodeError included
            data, problem = None, f"is corrupt ({error})"
        else:
            problem = f"should hold a JSON object, not {describe(data)}" if not isinstance(data, dict) else None
        if problem is None and check is not None:
            problem = check(data)
        if problem is None:
            return data
        if not recover:
            raise StateFileError(f"{self.path}: the {self.what} {problem}; move it aside to start a fresh history")
        try:
            self.move_aside(problem)
        except OSError as error:
            raise StateFileError(
                f"{self.path}: the {self.what} {problem}, and it cannot be moved aside: {error.strerror or error}"
            ) from None
        return {}

    def move_aside(self, problem):
        """Rename the file to <name>.corrupt-<local time> and log one warning naming both; OSError leaves it as it was."""
        stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        number = 1
        while aside.exists():  # never replace an earlier copy moved aside in the same second
            number += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{number}")
        os.rename(self.path, aside)
        logger.warning("%s: the %s %s; moved it to %s and started a fresh one", self.path, self.what, problem, aside)
        return aside

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
            lock_file = _open_lock_file(self.path)
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
        """Return True if another process holds the lock now (for status views; only reads, creates nothing)."""
        try:
            with open(self.path, "rb") as probe:  # read-only: a member of staff's group may probe it too
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    return True
                fcntl.flock(probe, fcntl.LOCK_UN)
                return False
        except FileNotFoundError:
            return False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()
