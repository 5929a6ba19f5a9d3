"""The state store shared by real processes: concurrent writers, a writer killed with SIGKILL, a full or read-only file system."""

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mxsync.errors import StoreError
from mxsync.store import DB_NAME, Store
from tests import legacy_state
from tests.faults import IS_ROOT, ROOT_REASON, fill, remount, tmpfs

REPO = Path(__file__).resolve().parent.parent

# argv: state dir, name (a letter: the EPNs it writes are <n><name>), go file, seconds (0: until killed), pause.
# Each line on stdout is the id of a transfer whose start and end are both committed.
WRITER = """
import os, sys, time
from pathlib import Path
from mxsync.store import Store

state_dir, name, go, seconds, pause = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), *map(float, sys.argv[4:])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
store = Store.open(state_dir)
end = time.monotonic() + seconds
number = 0
while not seconds or time.monotonic() < end:
    epn = f"{number}{name}"
    transfer = store.transfer_started(epn, "live")
    store.set_state(epn, "collecting")
    store.transfer_finished(transfer, "ok", files=number, bytes_transferred=number * 1000, exit_code=0, error=f"{name}-{number}")
    print(transfer, flush=True)
    number += 1
    time.sleep(pause)  # a busy writer, yet with gaps: SQLite's locks are polled, so a writer that never pauses starves others
store.close()
"""

# The same arguments; opens the store afresh for every read, as a cycle would, and counts its reads.
READER = """
import sys, time
from pathlib import Path
from mxsync.store import Store

state_dir, go, seconds = Path(sys.argv[1]), Path(sys.argv[3]), float(sys.argv[4])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
end = time.monotonic() + seconds
while time.monotonic() < end:
    with Store.open(state_dir) as store:
        store.states()
        store.running_transfers()
    print("read", flush=True)
"""


def start(script, state_dir, name, go, seconds, pause=0.001):
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(state_dir), name, str(go), str(seconds), str(pause)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert process.stdout.readline() == "ready\n"
    return process


def rows(state_dir):
    """{id: row} of every transfer, read with plain sqlite3."""
    connection = sqlite3.connect(str(state_dir / DB_NAME))
    try:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        found = connection.execute(
            "SELECT id, epn, started, ended, files, bytes, outcome, exit_code, error FROM transfers"
        )
        return {row[0]: row[1:] for row in found}
    finally:
        connection.close()


def is_whole(row):
    """True if a writer's transfer row is either only started or finished with every field of its own number."""
    epn, started, ended, files, size, outcome, exit_code, error = row
    number, name = epn[:-1], epn[-1]
    if outcome is None:
        return started is not None and (ended, files, size, exit_code, error) == (None, None, None, None, None)
    expected = (int(number), int(number) * 1000, "ok", 0, f"{name}-{number}")
    return ended is not None and ended >= started and (files, size, outcome, exit_code, error) == expected


def test_two_writers_and_a_reader_share_the_store_without_lock_errors(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    legacy_state.install(state_dir, legacy_state.HISTORY_FILE)  # the first opens race to create, migrate and import
    imported = {"12282a", "12283b", "12285d", "12286e"}  # its EPNs (12285d has an interrupted transfer)
    go = tmp_path / "go"
    processes = {name: start(WRITER, state_dir, name, go, 2) for name in "ab"}
    reader = start(READER, state_dir, "r", go, 2)
    go.touch()
    outputs = {name: process.communicate(timeout=120) for name, process in {**processes, "r": reader}.items()}
    for name, process in {**processes, "r": reader}.items():
        assert (process.returncode, outputs[name][1]) == (0, ""), name  # stderr: no "database is locked", nothing
    assert outputs["r"][0].count("read\n") > 0

    stored = rows(state_dir)
    written = {name: [int(line) for line in outputs[name][0].split()] for name in "ab"}
    for name, ids in written.items():
        assert ids, f"writer {name} wrote nothing"
        assert {i for i, row in stored.items() if row[0].endswith(name) and row[0] not in imported} == set(ids)
        assert all(is_whole(stored[i]) and stored[i][5] == "ok" for i in ids)
    assert max(min(ids) for ids in written.values()) < min(max(ids) for ids in written.values())  # they overlapped
    with Store.open(state_dir) as store:
        assert store.state("12282a").failures == 3
        assert len(store.alerts_since(kind="epn-failure")) == 1
        assert {epn: state.state for epn, state in store.states().items() if epn not in imported} == {
            f"{number}{name}": "collecting" for name, ids in written.items() for number in range(len(ids))
        }
    connection = sqlite3.connect(str(state_dir / DB_NAME))
    assert connection.execute("SELECT file FROM imports").fetchall() == [("mxsync-state.json",)]
    connection.close()


@pytest.mark.parametrize("after", [1, 25, 150])
def test_a_writer_killed_mid_loop_leaves_every_committed_row_and_no_partial_one(tmp_path, after):
    go = tmp_path / "go"
    go.touch()
    writer = start(WRITER, tmp_path, "k", go, 0)
    reported = [int(writer.stdout.readline()) for _ in range(after)]
    os.kill(writer.pid, signal.SIGKILL)
    rest, _ = writer.communicate(timeout=60)
    assert writer.returncode == -signal.SIGKILL
    reported += [int(line) for line in rest.split()]

    stored = rows(tmp_path)
    assert set(reported) <= set(stored)
    assert len(set(stored) - set(reported)) <= 1  # at most the one it was writing
    assert all(is_whole(row) for row in stored.values())
    with Store.open(tmp_path) as store:  # the store opens and carries on
        assert len(store.running_transfers()) <= 1
        store.transfer_finished(store.transfer_started("1k", "final"), "ok")


needs_root = pytest.mark.skipif(not IS_ROOT, reason=ROOT_REASON)


@needs_root
def test_a_full_state_file_system_is_one_line_and_loses_nothing_committed(tmp_path):
    mount = tmp_path / "mount"
    mount.mkdir()
    with tmpfs(mount, "1m"):
        with Store.open(mount) as store:
            store.set_state("12282a", "recorded")
            fill(mount)
            with pytest.raises(StoreError) as full:
                for number in range(10000):  # the pages a database keeps spare fill up first
                    store.set_state(f"{number}b", "waiting", reason="x" * 2000)
            assert str(full.value).startswith(f"{mount / DB_NAME}: cannot set the state of ")
            assert "full" in str(full.value) and "\n" not in str(full.value)
        (mount / "filler").unlink()
        with Store.open(mount) as store:
            assert store.state("12282a").state == "recorded"
            store.set_state("12282a", "recorded")

        fresh = mount / "fresh"
        fresh.mkdir()
        fill(mount)
        with pytest.raises(StoreError, match=f"^{fresh / DB_NAME}: cannot open the state store: .*full"):
            Store.open(fresh)
        (mount / "filler").unlink()
        with Store.open(fresh) as store:  # what the full disk left behind opens as a good store
            assert store.states() == {}


@needs_root
def test_a_read_only_state_file_system_is_one_line(tmp_path):
    mount = tmp_path / "mount"
    mount.mkdir()
    with tmpfs(mount, "4m"):
        (mount / "empty").mkdir()
        with Store.open(mount) as store:
            store.set_state("12282a", "recorded")
        before = (mount / DB_NAME).read_bytes()
        assert remount(mount, "ro")
        for state_dir in (mount, mount / "empty"):
            with pytest.raises(StoreError) as refused:
                Store.open(state_dir)
            message = str(refused.value)
            assert message.startswith(f"{state_dir / DB_NAME}: cannot open the state store: ")
            assert "Read-only file system" in message and "\n" not in message
        assert (mount / DB_NAME).read_bytes() == before
        assert remount(mount, "rw")
