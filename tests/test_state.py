"""ignore.yml and the state stores: old formats load, corrupt files are refused and left byte for byte."""

import difflib
import errno
import logging
import multiprocessing
import os
import re
import stat
from contextlib import contextmanager

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mxsync.errors import LockHeldError, StateFileError
from mxsync.history import STATE_FILE_NAME, History
from mxsync.state import (
    _COMMENTED_LIST,
    _LINES,
    IGNORE_HEADER,
    IGNORE_KEY,
    IgnoreFile,
    InstanceLock,
    JsonStore,
    _insert_lines,
)
from mxsync.store import DB_NAME


@pytest.mark.parametrize(
    "text, expected",
    [
        ("previouslySynched: [12282a, 12283b]\n", {"12282a", "12283b"}),
        ("previouslySynched:\n- 12282a\n- 12283\n", {"12282a", "12283"}),
        ("", set()),
        ("previouslySynched: null\n", set()),
        ("previouslySynched: []\n", set()),
    ],
)
def test_old_formats_load(tmp_path, text, expected):
    path = tmp_path / "ignore.yml"
    path.write_text(text)
    assert IgnoreFile(path).load() == expected


def test_missing_file_is_empty(tmp_path):
    assert IgnoreFile(tmp_path / "ignore.yml").load() == set()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("previouslySynched: [12282a\n", "not valid YAML"),
        ("synched: [12282a]\n", "expected only the key 'previouslySynched'"),
        ("previouslySynched: 12282a\n", "must be a list"),
        ("previouslySynched: [{a: 1}]\n", "not an EPN"),
        ("- 12282a\n", "expected only the key"),
    ],
)
def test_corrupt_file_is_refused_and_never_overwritten(tmp_path, text, expected):
    path = tmp_path / "ignore.yml"
    path.write_text(text)
    record = IgnoreFile(path)
    with pytest.raises(StateFileError, match=expected) as raised:
        record.add(["99999a"])
    assert str(path) in str(raised.value)
    assert path.read_text() == text


def test_add_rereads_and_keeps_hand_edits(tmp_path):
    path = tmp_path / "ignore.yml"
    record = IgnoreFile(path)
    record.add(["12282a"])
    # A member of staff edits the file by hand meanwhile: adds one EPN and removes another to force a re-sync.
    path.write_text("previouslySynched: [12282a, 55555a]\n")
    record.add(["12283a"])
    assert record.load() == {"12282a", "55555a", "12283a"}
    path.write_text("previouslySynched: [55555a, 12283a]\n")
    record.add(["77777a"])
    assert record.load() == {"55555a", "12283a", "77777a"}


def test_add_preserves_mode_and_writes_sorted_old_format(tmp_path):
    path = tmp_path / "ignore.yml"
    path.write_text("previouslySynched: [b2a]\n")
    path.chmod(0o640)
    IgnoreFile(path).add(["12283a", "12282a"])
    assert oct(path.stat().st_mode & 0o777) == oct(0o640)
    text = path.read_text()
    assert text.index("12282a") < text.index("12283a") < text.index("b2a")
    assert "previouslySynched:" in text
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def _add_many(path, prefix, count):
    record = IgnoreFile(path)
    for number in range(count):
        record.add([f"{prefix}{number}a"])


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "ignore.yml"
    workers = [multiprocessing.Process(target=_add_many, args=(path, prefix, 40)) for prefix in ("1", "2", "3")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(IgnoreFile(path).load()) == 120


def test_json_store_round_trip_and_corruption(tmp_path):
    store = JsonStore(tmp_path / "state.json", "test history")
    assert store.load() == {}
    store.save({"a": 1})
    assert store.load() == {"a": 1}
    (tmp_path / "state.json").write_text("{trunc")
    with pytest.raises(StateFileError, match="test history is corrupt"):
        store.load()


def _hold_lock(path, ready, release):
    with InstanceLock(path):
        ready.set()
        release.wait(10)


def test_instance_lock_names_its_holder(tmp_path):
    path = tmp_path / "mxsync.lock"
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_lock, args=(path, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        assert InstanceLock(path).is_held_elsewhere()
        with pytest.raises(LockHeldError, match=f"pid {holder.pid} on"):
            InstanceLock(path).acquire()
    finally:
        release.set()
        holder.join()
    with InstanceLock(path):
        pass


@pytest.mark.parametrize(
    "epns",
    [
        {"12282a", "9a", "123456789012abcd"},
        {"12282a", "0123a"},  # a leading zero takes the YAML path
        {"12282"},  # a bare number (hand-written) must stay quoted
    ],
)
def test_fast_rendering_matches_yaml_and_round_trips(tmp_path, epns):
    import yaml

    from mxsync.state import IGNORE_HEADER, IGNORE_KEY

    text = IgnoreFile.render(epns)
    assert text == IGNORE_HEADER + yaml.safe_dump({IGNORE_KEY: sorted(epns)}, default_flow_style=False)
    path = tmp_path / "ignore.yml"
    path.write_text(text)
    assert IgnoreFile(path).load() == epns == {str(entry) for entry in yaml.safe_load(text)[IGNORE_KEY]}


# ---------------------------------------------------------------- hand comments in ignore.yml (issue 10, item 8)

NEW = ["99999a", "12284c"]

# name, hand-written text, whether it is read without a YAML parser (so a record stays as fast as mxsync's own format)
HAND_WRITTEN = [
    ("comments at top", "# kept by the MX team\n# ask before removing\npreviouslySynched:\n- 12282a\n- 12283b\n", True),
    ("between entries", "previouslySynched:\n- 12282a\n# re-synced on request, 2024\n- 12283b\n", True),
    ("trailing comments", "previouslySynched:  # synced EPNs\n- 12283b   # bad disk, redone\n- 12282a # first\n", True),
    ("comment after the list", "previouslySynched:\n- 12282a\n- 12283b\n\n# end of list\n", True),
    ("mxsync header plus a note", IGNORE_HEADER + "previouslySynched:\n- 12282a\n- 12283b  # redone 2024-05\n", True),
    ("CRLF line endings", "# from a Windows editor\r\npreviouslySynched:\r\n- 12282a  # t\r\n- 12283b\r\n", True),
    ("no trailing newline", "previouslySynched:\n- 12282a\n- 12283b  # last", True),
    ("empty list, comment", "previouslySynched:\n# nothing synced yet\n", True),
    ("only a comment", "# nothing synced yet", False),
    ("document marker, comment", "---\n# nothing synced yet\n", False),
    (
        "flow style with a comment",
        "# HPC ASSyncy's list\npreviouslySynched: [12283b, 12282a]  # as the old tool wrote it\n",
        False,
    ),
    ("multi-line flow with comments", "previouslySynched: [\n  12282a,  # first\n  12283b,\n]\n", False),
    ("empty flow list, comment", "previouslySynched: []  # none yet\n", False),
    ("flow style, CRLF", "# c\r\npreviouslySynched: [12282a,\r\n  12283b]  # t\r\n", False),
    ("indented block, quoted entry", "# c\npreviouslySynched:\n  - 12282a\n  - '0123a'   # leading zero\n", False),
    ("explicit null", "previouslySynched: ~  # none yet\n", False),
    ("byte-order mark", "\ufeff# c\npreviouslySynched: [12282a]\n", False),
]


def _hpc_assyncy_load(text):
    """What the old tool's loader does: yaml.safe_load, then the list under the key."""
    data = yaml.safe_load(text)
    assert isinstance(data, dict) and set(data) == {IGNORE_KEY}
    return [str(entry) for entry in data[IGNORE_KEY] or []]


def _only_insertions(old, new):
    """True if new is old with text inserted and nothing removed or changed."""
    operations = difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes()
    return all(tag in ("equal", "insert") for tag, *_ in operations)


@pytest.mark.parametrize("name, text, line_based", HAND_WRITTEN, ids=[shape[0] for shape in HAND_WRITTEN])
def test_hand_comments_and_order_are_kept_when_recording(tmp_path, name, text, line_based):
    path = tmp_path / "ignore.yml"
    path.write_bytes(text.encode("utf-8"))
    record = IgnoreFile(path)
    old_entries = _hpc_assyncy_load(text) if yaml.safe_load(text) is not None else []
    assert record.load() == set(old_entries)
    assert (record._parse(text)[1] is _LINES) == line_based

    assert record.add(NEW) == set(old_entries) | set(NEW)

    new_text = path.read_bytes().decode("utf-8")
    entries = _hpc_assyncy_load(new_text)
    assert set(entries) == set(old_entries) | set(NEW) and entries[: len(old_entries)] == old_entries
    if name == "explicit null":
        assert new_text == "previouslySynched: [12284c, 99999a]  # none yet\n"
    else:
        assert _only_insertions(text, new_text), new_text
    assert ("\r\n" in text) == ("\r\n" in new_text) and new_text.count("\r") == new_text.count("\r\n")
    assert record._parse(new_text)[1] is _LINES or not line_based  # the next record is as fast as this one
    # Recording again keeps working and keeps everything before.
    record.add(["77777a"])
    assert _only_insertions(new_text, path.read_bytes().decode("utf-8"))
    assert record.load() == set(old_entries) | set(NEW) | {"77777a"}


def test_files_without_hand_comments_are_still_rendered_in_the_fast_format(tmp_path):
    path = tmp_path / "ignore.yml"
    path.write_text("previouslySynched: [12283b, 12282a]\n")
    IgnoreFile(path).add(["99999a"])
    assert path.read_text() == IgnoreFile.render({"12282a", "12283b", "99999a"})


@pytest.mark.parametrize(
    "text",
    [
        "# c\npreviouslySynched: [12282a]\npreviouslySynched: [12283b]\n",  # a key given twice
        "~  # nothing\n",  # a document that is only null
        "# c\n--- \n...\n",  # an ended document: anything added would be a second one
    ],
)
def test_hand_layout_that_cannot_be_kept_is_refused_and_left_unchanged(tmp_path, text):
    path = tmp_path / "ignore.yml"
    path.write_bytes(text.encode("utf-8"))
    with pytest.raises(StateFileError, match="cannot add 99999a while keeping its hand-written comments in") as raised:
        IgnoreFile(path).add(["99999a"])
    assert str(path) in str(raised.value) and "the file is unchanged" in str(raised.value)
    assert path.read_bytes() == text.encode("utf-8")


# Lines a hand-written list is made of, and lines of which the line grammar must take none YAML reads otherwise.
_GOOD_LINES = [
    "- 12282a",
    "-   13a",
    "- 12282a # note",
    "- 123456789012abcd",
    "- 12282a  ",
    "- 14a #",
    "# comment",
    "   # indented",
    "#",
    "",
    "   ",
    "# caf\u00e9 \U0001f600",
    "# \ufeff",
    "# a\tb",
]
_TRICKY_LINES = [
    "- 12282a#not-a-comment",
    "- 12282a\t# tab",
    "- 0123a",
    "  - 14a",
    "-14a",
    "- 1234567890123a",
    "- 12282abcde",
    "- 17a: x",
    "---",
    "...",
    "key: 1",
    "- 12282a # c\u2028- 18a",
    "- 12282a\t",
    "\t# tab-indented",
    "# \x85- 16a",
    "# \x07 bell",
    "- [19a]",
    "- 12282a # \r- 20a",
    "-\t21a",
    "- 0xfa",
    "  previouslySynched:",
    "- 12282a !x",
]
_KEY_LINES = [
    "previouslySynched:",
    "previouslySynched:  # the list",
    "previouslySynched: # a\u2029- 19a",
    "previouslySynched:#x",
    "previouslySynched: []",
    "previouslySynched:\t# tab",
    "previouslysynched:",
]


@st.composite
def _hand_written_lists(draw):
    """A hand-written list: comments, the key, entries and comments, with at most one tricky line anywhere."""
    key = draw(st.sampled_from(_KEY_LINES[:2]) if draw(st.integers(0, 3)) else st.sampled_from(_KEY_LINES))
    lines = draw(st.lists(st.sampled_from(_GOOD_LINES[6:]), max_size=3)) + [key]
    lines += draw(st.lists(st.sampled_from(_GOOD_LINES), max_size=6))
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(_TRICKY_LINES)))
    newline = draw(st.sampled_from(["\n", "\n", "\r\n", "\r"]))
    return newline.join(lines) + draw(st.sampled_from([newline, ""]))


@settings(max_examples=500, deadline=None, database=None)
@given(_hand_written_lists())
def test_line_grammar_reads_exactly_what_yaml_reads(text):
    if not _COMMENTED_LIST.fullmatch(text):
        return
    record = IgnoreFile("unused")
    old = record._parse(text)[0]
    with_new = _insert_lines(text, NEW)
    for loader in (yaml.SafeLoader, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        for document, expected in ((text, old), (with_new, old | set(NEW))):
            data = yaml.load(document, Loader=loader)
            assert set(data) == {IGNORE_KEY} and {str(entry) for entry in data[IGNORE_KEY] or []} == expected, document
    assert record._parse(with_new) == (old | set(NEW), _LINES)


# ---------------------------------------------------------------- damaged JSON state (issue 10, item 7)


def test_json_store_recover_moves_a_corrupt_file_aside_with_one_warning(tmp_path, caplog):
    path = tmp_path / "state.json"
    path.write_bytes(b'{"epns": {"12282a": ')
    store = JsonStore(path, "test history")
    with caplog.at_level(logging.WARNING, logger="mxsync"):
        assert store.load(recover=True) == {}
    (aside,) = tmp_path.glob("state.json.corrupt-*")
    assert re.fullmatch(r"state\.json\.corrupt-\d{8}T\d{6}", aside.name)
    assert aside.read_bytes() == b'{"epns": {"12282a": ' and not path.exists()
    (warning,) = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert str(path) in warning.getMessage() and str(aside) in warning.getMessage()
    # A second damaged file in the same second never replaces the first copy.
    path.write_bytes(b"[1, 2]")
    assert store.load(recover=True) == {}
    assert sorted(aside.read_bytes() for aside in tmp_path.glob("state.json.corrupt-*")) == [
        b"[1, 2]",
        b'{"epns": {"12282a": ',
    ]


def test_json_store_check_names_an_unusable_shape(tmp_path):
    path = tmp_path / "state.json"
    path.write_text('{"a": 1}')
    store = JsonStore(path, "test history")
    with pytest.raises(StateFileError, match="test history has no b; move it aside"):
        store.load(check=lambda data: None if "b" in data else "has no b")
    assert path.read_text() == '{"a": 1}'
    assert store.load(check=lambda data: None) == {"a": 1}


@pytest.mark.parametrize(
    "text",
    [
        '{"epns": {"12282a": {"failures": 1}',
        "\xff\xfe",
        "[]",
        '{"epns": []}',
        '{"sources": {"ssh": {"failures": "3"}}}',
        '{"waiting": {"12282a": "no data"}}',
    ],
    ids=["truncated", "not UTF-8", "a list", "unusable epns", "unusable sources", "unusable waiting"],
)
def test_damaged_json_history_is_left_in_place_with_one_warning_and_the_store_used(tmp_path, caplog, text):
    raw = text.encode("latin-1")
    path = tmp_path / STATE_FILE_NAME
    path.write_bytes(raw)
    with caplog.at_level(logging.WARNING, logger="mxsync"):
        history = History(tmp_path)
    assert path.read_bytes() == raw and history.problem is None
    (warning,) = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert warning.startswith(f"{path}: cannot be imported into {tmp_path / DB_NAME}") and "left in place" in warning
    history.epn_finished("12282a", error="rsync exit 23")
    history.close()
    with History(tmp_path, read_only=True) as view:
        assert view.failing_epns()["12282a"]["failures"] == 1


def test_read_only_history_reports_a_corrupt_store_and_changes_nothing(tmp_path, caplog):
    (tmp_path / DB_NAME).write_bytes(b"previouslySynched:\n- 12282a\n" * 200)
    (tmp_path / STATE_FILE_NAME).write_text('{"epns": []}')
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with caplog.at_level(logging.WARNING, logger="mxsync"):
        history = History(tmp_path, read_only=True)
    assert "not a usable database" in history.problem and str(tmp_path / DB_NAME) in history.problem
    assert len([record for record in caplog.records if record.levelno >= logging.WARNING]) == 1
    history.epn_finished("12282a", error="x")
    assert history.failing_epns() == {} and history.last_cycle() is None
    history.close()
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def _files(directory):
    """{name: bytes} of the files in directory, less what SQLite may leave beside a database that is only read: its
    -shm (an index of the log, shared memory) and an empty -wal."""
    files = {path.name: path.read_bytes() for path in directory.iterdir() if not path.name.endswith("-shm")}
    return {name: data for name, data in files.items() if data or not name.endswith("-wal")}


def test_read_only_history_writes_to_a_copy_in_memory_only(tmp_path):
    with History(tmp_path) as history:
        history.epn_finished("12282a", error="rsync exit 12")
    before = _files(tmp_path)
    with History(tmp_path, read_only=True) as view:
        view.epn_finished("12282a", error="rsync exit 12")
        view.cycle_finished({"planned": 1})
        assert view.failing_epns()["12282a"]["failures"] == 2  # as a real run would count it
    assert _files(tmp_path) == before
    with History(tmp_path, read_only=True) as view:
        assert view.failing_epns()["12282a"]["failures"] == 1 and view.last_cycle() is None


def test_corrupt_store_that_cannot_be_moved_aside_is_left_alone_and_history_goes_on_without(
    tmp_path, monkeypatch, caplog
):
    path = tmp_path / DB_NAME
    path.write_bytes(b"garbage" * 1000)

    def read_only_file_system(*_arguments):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "rename", read_only_file_system)  # a fault root cannot get from directory modes
    with caplog.at_level(logging.WARNING, logger="mxsync"):
        history = History(tmp_path)
    history.epn_finished("12282a", error="x")
    history.cycle_finished({"planned": 1})
    assert path.read_bytes() == b"garbage" * 1000
    assert "cannot open the state store: Read-only file system" in history.problem
    assert len([record for record in caplog.records if record.levelno >= logging.WARNING]) == 1


# ---------------------------------------------------------------- modes of new state files (issue 19, item 3)


@contextmanager
def _umask(mask):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o000, 0o077])
def test_new_state_files_are_owner_and_group_only_whatever_the_umask(tmp_path, mask):
    with _umask(mask):
        IgnoreFile(tmp_path / "ignore.yml").add(["12282a"])
        JsonStore(tmp_path / "state.json", "test").save({"a": 1})
        with InstanceLock(tmp_path / "mxsync.lock"):
            pass
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    assert modes == {name: 0o640 for name in ("ignore.yml", "ignore.yml.lock", "state.json", "mxsync.lock")}


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o660])
def test_existing_state_files_keep_their_mode(tmp_path, mode):
    path = tmp_path / "ignore.yml"
    path.write_text("previouslySynched: []\n")
    path.chmod(mode)
    lock = tmp_path / "mxsync.lock"
    lock.write_text("")
    lock.chmod(mode)
    with _umask(0o000):
        IgnoreFile(path).add(["12282a"])
        with InstanceLock(lock):
            pass
    assert stat.S_IMODE(path.stat().st_mode) == mode == stat.S_IMODE(lock.stat().st_mode)


def test_status_probe_of_the_instance_lock_creates_nothing(tmp_path):
    assert not InstanceLock(tmp_path / "mxsync.lock").is_held_elsewhere()
    assert list(tmp_path.iterdir()) == []
