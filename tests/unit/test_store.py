"""The state store on its own: schema, migrations, the one-time import, repair, reconcile, modes (see also test_store_processes)."""

import dataclasses
import json
import logging
import os
import re
import sqlite3
import stat
import threading
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import pytest

from epnalert import alert as epnalert
from mxsync import store as store_module
from mxsync.errors import StoreError
from mxsync.portal import Person, Visit
from mxsync.state import IgnoreFile
from mxsync.store import DB_NAME, EPNALERT_NOTE, MIGRATIONS, Store
from tests import legacy_state

T0 = datetime(2024, 4, 28, 9, 0, tzinfo=timezone.utc)


def minutes(count):
    return T0 + timedelta(minutes=count)


@contextmanager
def umask(mask):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def raw(path, sql):
    """Run one statement on the file with plain sqlite3 (no Store), return its rows."""
    connection = sqlite3.connect(str(path), isolation_level=None)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


def warnings_of(caplog):
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


# ---------------------------------------------------------------- schema, modes


def test_a_new_store_has_the_current_schema_in_wal_mode(tmp_path):
    with Store.open(tmp_path) as store:
        assert store.states() == {}
    path = tmp_path / DB_NAME
    assert raw(path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert raw(path, "PRAGMA journal_mode") == [("wal",)]
    tables = {name for (name,) in raw(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"epns", "sightings", "visits", "transfers", "alerts", "sources", "notes", "imports"} <= tables


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o000])
def test_database_and_its_wal_files_are_0640_whatever_the_umask(tmp_path, mask):
    with umask(mask):
        store = Store.open(tmp_path)
        store.set_state("12282a", "booked")  # the -wal and -shm files exist while a connection is open
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
        store.close()
    assert modes == {name: 0o640 for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", "mxsync.db.lock")}


def test_the_retired_file_names_are_those_the_old_code_writes():
    written = sorted(path.name for path in legacy_state.LEGACY_STATE.glob("*.json"))  # by the old code itself
    assert written == sorted([store_module.HISTORY_FILE, store_module.ALERT_STATE_FILE])
    assert store_module.ALERT_STATE_FILE == epnalert.STATE_FILE_NAME


# ---------------------------------------------------------------- migrations


def test_an_older_schema_is_migrated_forward_keeping_its_rows(tmp_path, monkeypatch, caplog):
    with Store.open(tmp_path) as store:
        store.set_state("12282a", "collecting", when=T0)
    step = ["ALTER TABLE epns ADD COLUMN note TEXT", "UPDATE epns SET note = 'from v1'"]
    monkeypatch.setattr(store_module, "MIGRATIONS", [*MIGRATIONS, step])
    caplog.set_level(logging.INFO, logger="mxsync.store")
    with Store.open(tmp_path) as store:
        assert store.state("12282a").state == "collecting"
    path = tmp_path / DB_NAME
    assert raw(path, "PRAGMA user_version") == [(len(MIGRATIONS) + 1,)]
    assert raw(path, "SELECT epn, note FROM epns") == [("12282a", "from v1")]
    assert f"{path}: migrated the state store from schema {len(MIGRATIONS)} to {len(MIGRATIONS) + 1}" in caplog.text


def test_a_failing_migration_leaves_the_old_schema_whole(tmp_path, monkeypatch):
    with Store.open(tmp_path) as store:
        store.set_state("12282a", "collecting", when=T0)
    step = ["ALTER TABLE epns ADD COLUMN note TEXT", "UPDATE no_such_table SET x = 1"]
    monkeypatch.setattr(store_module, "MIGRATIONS", [*MIGRATIONS, step])
    with pytest.raises(StoreError, match="no such table"):
        Store.open(tmp_path)
    path = tmp_path / DB_NAME
    assert raw(path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert "note" not in {row[1] for row in raw(path, "PRAGMA table_info(epns)")}


def test_a_database_from_a_newer_mxsync_is_refused_and_left_byte_for_byte(tmp_path):
    with Store.open(tmp_path) as store:
        store.set_state("12282a", "recorded", when=T0)
    path = tmp_path / DB_NAME
    raw(path, f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    before = path.read_bytes()
    for dry_run in (False, True):
        with pytest.raises(StoreError) as refused:
            Store.open(tmp_path, dry_run=dry_run)
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(f"{path}: ") and "newer mxsync" in message
        assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.corrupt-*"))


# ---------------------------------------------------------------- the state API


def test_set_state_keeps_its_since_while_the_state_is_unchanged_and_counts_failures(tmp_path):
    with Store.open(tmp_path) as store:
        store.set_state("12282a", "collecting", when=minutes(0))
        store.set_state("12282a", "collecting", when=minutes(5))
        assert store.state("12282a").since == minutes(0)
        store.set_state("12282a", "failed", error="rsync exit 23", when=minutes(10))
        store.set_state("12282a", "failed", error="rsync exit 12", when=minutes(20))
        state = store.state("12282a")
        assert (state.state, state.since, state.failures) == ("failed", minutes(10), 2)
        assert (state.failing_since, state.last_error, state.last_failure) == (
            minutes(10),
            "rsync exit 12",
            minutes(20),
        )
        store.set_state("12282a", "waiting", reason="no folder at the facility yet", when=minutes(30))
        assert store.state("12282a")[1:5] == ("waiting", minutes(30), "no folder at the facility yet", 2)
        store.set_state("12282a", "verified", clear_failures=True, when=minutes(40))
        state = store.state("12282a")
        assert (state.failures, state.failing_since, state.last_error, state.reason) == (0, None, None, None)
        with pytest.raises(ValueError, match="unknown state"):
            store.set_state("12282a", "synced")
        assert store.state("99z") is None


def test_visits_and_sightings_are_kept_once_and_updated(tmp_path):
    alice, bob = Person("Alice", "Ng", "alice@example.org"), Person("Bob", "Li", "bob@example.org")
    visit = Visit("12282a", minutes(0), minutes(480), 23, "MX2", alice, (bob,))
    undated = Visit("12282a", None, None, 23, "MX2", None, ())
    with Store.open(tmp_path) as store:
        store.record_seen("sftp", {"12282a": "ny79", "12283b": None}, when=minutes(-60))
        store.record_visits([visit, undated], when=minutes(-30))
        store.record_visits([dataclasses.replace(visit, end=minutes(600)), undated], when=minutes(-10))
        visits = store.visits("12282a")
        assert [(v.start, v.end, v.seen_at) for v in visits] == [
            (minutes(0), minutes(600), minutes(-10)),
            (None, None, minutes(-10)),
        ]
        assert visits[0].principal_scientist == {
            "first_names": "Alice",
            "last_name": "Ng",
            "email": "alice@example.org",
        }
        assert visits[0].other_scientists == [{"first_names": "Bob", "last_name": "Li", "email": "bob@example.org"}]
        assert store.sightings("12282a") == {
            "sftp": (minutes(-60), minutes(-60)),
            "portal": (minutes(-30), minutes(-10)),
        }
        states = store.states()
        assert {epn: (s.project, s.state) for epn, s in states.items()} == {
            "12282a": ("ny79", None),
            "12283b": (None, None),
        }


def test_transfers_are_recorded_from_start_to_end(tmp_path):
    with Store.open(tmp_path) as store:
        live = store.transfer_started("12282a", "live", when=minutes(0))
        store.transfer_finished(live, "ok", files=3, bytes_transferred=4096, exit_code=0, when=minutes(2))
        final = store.transfer_started("12282a", "final", when=minutes(10))
        assert [t.id for t in store.running_transfers()] == [final]
        assert store.last_transfer("12282a").id == final
        store.transfer_finished(final, "failed", exit_code=23, error="rsync: some files vanished", when=minutes(11))
        first = store.last_transfer("12282a", kind="live")
        assert first[2:] == ("live", minutes(0), minutes(2), 3, 4096, 120.0, "ok", 0, None)
        assert store.last_transfer("12282a").outcome == "failed"
        assert [t.kind for t in store.transfers("12282a")] == ["live", "final"]
        assert store.running_transfers() == [] and store.last_transfer("99z") is None
        with pytest.raises(ValueError, match="already finished"):
            store.transfer_finished(final, "ok")
        with pytest.raises(ValueError, match="unknown pass kind"):
            store.transfer_started("12282a", "nightly")


def test_alerts_sources_and_notes(tmp_path):
    with Store.open(tmp_path) as store:
        store.alert_sent("epn-failure", ["12282a", "12283b"], recipients=2, subject="mxsync: failing", when=minutes(0))
        store.alert_sent("unknown-epn", ["12290a"], recipients=1, subject="Unknown ownership of EPNs", when=minutes(5))
        assert [(a.kind, a.key) for a in store.alerts_since(minutes(0))] == [
            ("epn-failure", "12282a"),
            ("epn-failure", "12283b"),
            ("unknown-epn", "12290a"),
        ]
        assert [a.key for a in store.alerts_since(minutes(1))] == ["12290a"]
        assert store.alerts_since(kind="epn-failure", key="12283b")[0][2:] == (minutes(0), 2, "mxsync: failing")
        assert store.source_failed("portal", "HTTP 502", when=minutes(0)) == 1
        assert store.source_failed("portal", "timed out", when=minutes(60)) == 2
        assert store.source_failures()["portal"][1:] == (2, minutes(0), "timed out", minutes(60))
        store.source_ok("portal")
        assert store.source_failures() == {}
        store.set_note("last_cycle", {"planned": 3, "finished": "2024-04-28T09:00:00+00:00"})
        assert store.get_note("last_cycle")["planned"] == 3 and store.get_note("nothing", 0) == 0


def test_one_store_is_shared_by_threads(tmp_path):
    with Store.open(tmp_path) as store:

        def work(letter):
            for number in range(100):
                store.transfer_finished(store.transfer_started(f"{number}{letter}", "final"), "ok", files=number)

        threads = [threading.Thread(target=work, args=(letter,)) for letter in "abcd"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert raw(tmp_path / DB_NAME, "SELECT count(*), count(DISTINCT epn) FROM transfers WHERE outcome = 'ok'") == [
            (400, 400)
        ]


# ---------------------------------------------------------------- reconcile with ignore.yml


def test_ignore_yml_wins_over_the_store(tmp_path):
    ignore = IgnoreFile(tmp_path / "ignore.yml")
    ignore.add(["100a", "101a", "102a"])
    with Store.open(tmp_path) as store:
        store.set_state("100a", "failed", error="verification failed", when=minutes(0))  # recorded since, by hand
        store.set_state("103a", "recorded", when=minutes(0))  # removed from ignore.yml by hand
        store.set_state("104a", "collecting", when=minutes(0))  # not recorded: left alone
        store.set_state("101a", "recorded", when=minutes(0))
        added, reopened = store.reconcile_recorded(ignore.load(), when=minutes(10))
        assert (added, reopened) == ({"100a", "102a"}, {"103a"})
        states = store.states()
        assert {epn: (s.state, s.since) for epn, s in states.items()} == {
            "100a": ("recorded", minutes(10)),
            "101a": ("recorded", minutes(0)),
            "102a": ("recorded", minutes(10)),
            "103a": ("final", minutes(10)),
            "104a": ("collecting", minutes(0)),
        }
        assert states["103a"].reason == "no longer in ignore.yml"
        assert store.reconcile_recorded(ignore.load(), when=minutes(20)) == (set(), set())
        store.set_state("102a", "recorded")
        assert store.reconcile_recorded({"100a"}, unrecorded_state="settling") == (set(), {"101a", "102a"})
        assert store.state("101a").state == "settling"
        with pytest.raises(ValueError):
            store.reconcile_recorded(set(), unrecorded_state="recorded")


# ---------------------------------------------------------------- importing the retired JSON files


def write_history(state_dir):
    """mxsync-state.json as the old mxsync.history wrote it: failures (one alerted), failing sources, waiting, running."""
    return legacy_state.install(state_dir, legacy_state.HISTORY_FILE)


def write_alert_state(state_dir):
    """epnalert-state.json as the old AlertHistory wrote it after two alerts (the second with SFTP down); return
    what the old code read from it."""
    return legacy_state.previous_alert(legacy_state.install(state_dir, legacy_state.ALERT_STATE_FILE))


def test_mxsync_history_is_imported_once_and_retired(tmp_path, caplog):
    data = write_history(tmp_path)
    caplog.set_level(logging.INFO, logger="mxsync.store")
    with Store.open(tmp_path) as store:
        states = store.states()
        failed = states["12282a"]
        assert (failed.state, failed.failures, failed.last_error) == ("failed", 3, "verification failed")
        assert failed.last_failure == datetime.fromisoformat(data["epns"]["12282a"]["last_attempt"])
        assert (states["12283b"].state, states["12283b"].failures) == ("failed", 2)
        waiting = states["12286e"]
        assert (waiting.state, waiting.reason, waiting.failures) == ("waiting", "no folder at the facility yet", 0)
        assert [(t.kind, t.outcome) for t in store.transfers("12285d")] == [("final", "interrupted")]
        assert store.running_transfers() == []
        assert [(a.kind, a.key) for a in store.alerts_since()] == [
            ("epn-failure", "12282a"),
            ("source-failure", "destination"),
        ]
        portal = store.source_failures()["portal"]
        assert (portal.failures, portal.last_error) == (1, "HTTP 502")
        assert store.get_note("last_cycle") == data["last_cycle"]
        assert store.imported == [tmp_path / "mxsync-state.json.imported"]
    assert not (tmp_path / "mxsync-state.json").exists()
    assert json.loads((tmp_path / "mxsync-state.json.imported").read_text()) == data  # kept for staff, as it was
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "Imported" in r.getMessage()]
    assert len(infos) == 1 and "mxsync-state.json" in infos[0]


def test_epnalert_state_is_imported_so_that_first_alerted_and_last_sent_read_back(tmp_path):
    previous = write_alert_state(tmp_path)
    with Store.open(tmp_path) as store:
        alerts = store.alerts_since(kind="unknown-epn")
        assert set(store.states()) == {"300a", "301a", "302a"}
        assert {state.state for state in store.states().values()} == {None}
    first_alerted = {}
    for record in alerts:
        first_alerted.setdefault(record.key, record.sent_at)
    assert first_alerted == previous.epns  # epnalert's own reading of its file
    assert max(record.sent_at for record in alerts) == previous.sent_at
    assert {(r.key, r.sent_at - T0, r.recipients) for r in alerts} == {
        ("300a", timedelta(0), None),
        ("300a", timedelta(days=7), 1),
        ("301a", timedelta(0), None),  # kept from the first alert while SFTP was down
        ("302a", timedelta(days=7), 1),
    }
    assert {r.subject for r in alerts} == {epnalert.SUBJECT}
    assert (tmp_path / "epnalert-state.json.imported").exists()
    with Store.open(tmp_path) as store:  # and what epnalert needs for its next alert, which the rows cannot say
        note = store.get_note(EPNALERT_NOTE)
    assert datetime.fromisoformat(note["last_sent"]) == previous.sent_at
    assert {epn: datetime.fromisoformat(first) for epn, first in note["epns"].items()} == previous.epns
    assert note["last_recipients"] == ["staff@example.org"]


def test_importing_the_same_file_again_never_duplicates(tmp_path, caplog):
    write_history(tmp_path)
    write_alert_state(tmp_path)
    tables = ("epns", "transfers", "alerts", "sources", "notes", "imports")

    def counts():
        return {table: raw(tmp_path / DB_NAME, f"SELECT count(*) FROM {table}")[0][0] for table in tables}

    Store.open(tmp_path).close()
    once = counts()
    # As if the process died between the import's commit and the renames: the files are there again.
    for name in ("mxsync-state.json", "epnalert-state.json"):
        os.link(tmp_path / f"{name}.imported", tmp_path / name)
    caplog.set_level(logging.INFO, logger="mxsync.store")
    with Store.open(tmp_path) as store:
        assert len(store.imported) == 2
    assert counts() == once
    assert caplog.text.count("already imported") == 2
    assert len(list(tmp_path.glob("mxsync-state.json.imported*"))) == 2  # the earlier copy is never replaced


@pytest.mark.parametrize(
    "name, text",
    [
        ("mxsync-state.json", "{not json"),
        ("mxsync-state.json", '{"epns": {"12282a": {"failures": "three"}}}'),
        ("mxsync-state.json", '{"epns": {"12282a": {"failures": 1, "last_attempt": "yesterday"}}}'),
        ("mxsync-state.json", "[1, 2]"),
        ("epnalert-state.json", '{"epns": {"300a": {"last_alerted": "2024-04-28T09:00:00"}}}'),
        ("epnalert-state.json", '{"epns": {"300a": {"first_alerted": "2024-04-28T09:00:00"}}, "last_recipients": 3}'),
        ("epnalert-state.json", b"\xff\xfe"),
    ],
)
def test_a_damaged_json_file_is_left_in_place_and_never_blocks_the_store(tmp_path, caplog, name, text):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = path.read_bytes()
    with Store.open(tmp_path) as store:
        store.set_state("12282a", "booked")
        assert store.alerts_since() == [] and store.imported == []
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.imported*"))
    (warning,) = warnings_of(caplog)
    assert warning.startswith(f"{path}: cannot be imported into {tmp_path / DB_NAME}") and "left in place" in warning


def test_the_store_wins_over_an_imported_file_for_an_epn_it_knows(tmp_path):
    with Store.open(tmp_path) as store:
        store.set_state("12282a", "recorded", when=T0)
    write_history(tmp_path)
    with Store.open(tmp_path) as store:
        assert store.state("12282a")[1:5] == ("recorded", T0, None, 0)
        assert store.state("12283b").state == "failed"


# ---------------------------------------------------------------- corrupt files, unusable directories


def damage_a_page(path):
    """Overwrite the second page (the first table's b-tree) of a sound database with garbage."""
    page_size = raw(path, "PRAGMA page_size")[0][0]
    with open(path, "r+b") as file:
        file.seek(page_size)
        file.write(b"\x0d\xff\xff\xff" * (page_size // 4))


def swap_index_roots(path, first, second):
    """Point two indexes at each other's b-tree, so that neither matches its table."""
    connection = sqlite3.connect(str(path), isolation_level=None)
    try:
        roots = dict(connection.execute("SELECT name, rootpage FROM sqlite_master WHERE type = 'index'").fetchall())
        connection.execute("PRAGMA writable_schema = ON")
        for name, other in ((first, second), (second, first)):
            connection.execute("UPDATE sqlite_master SET rootpage = ? WHERE name = ?", (roots[other], name))
    finally:
        connection.close()


@pytest.mark.parametrize("damage", ["not a database", "damaged page", "truncated", "schema not UTF-8", "index"])
def test_a_corrupt_database_is_moved_aside_and_a_fresh_one_built(tmp_path, caplog, damage):
    path = tmp_path / DB_NAME
    with Store.open(tmp_path) as store:
        for number in range(300):
            store.set_state(f"{number}a", "recorded", reason="x" * 200)
    if damage == "not a database":
        path.write_bytes(b"previouslySynched:\n- 12282a\n" * 100)
    elif damage == "damaged page":
        damage_a_page(path)
    elif damage == "index":  # indexes that do not match their tables: quick_check finds nothing (tests/test_fuzz did)
        swap_index_roots(path, "sqlite_autoindex_epns_1", "transfers_of_epn")
    elif damage == "schema not UTF-8":  # the check then quotes bytes that are not UTF-8 (found by tests/test_fuzz)
        data = path.read_bytes()
        at = data.index(b"sightings")
        path.write_bytes(data[:at] + b"\x80" + data[at + 1 :])
    else:
        os.truncate(path, path.stat().st_size // 2)
    damaged = path.read_bytes()
    with Store.open(tmp_path) as store:
        assert store.states() == {}
        aside = store.moved_aside
        IgnoreFile(tmp_path / "ignore.yml").add(["12282a"])
        store.reconcile_recorded(IgnoreFile(tmp_path / "ignore.yml").load())  # what the caller does next
        assert store.state("12282a").state == "recorded"
    assert re.fullmatch(r"mxsync\.db\.corrupt-\d{8}T\d{6}Z", aside.name)
    assert aside.read_bytes() == damaged
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    (warning,) = warnings_of(caplog)
    assert str(path) in warning and str(aside) in warning and "\n" not in warning


def test_a_second_corrupt_database_in_the_same_second_does_not_replace_the_first(tmp_path):
    path = tmp_path / DB_NAME
    for text in (b"first garbage" * 200, b"second garbage" * 200):
        path.write_bytes(text)
        Store.open(tmp_path).close()
    kept = sorted(aside.read_bytes()[:6] for aside in tmp_path.glob("mxsync.db.corrupt-*") if aside.name[-4:] != "-wal")
    assert kept == [b"first ", b"second"]


def test_a_locked_database_is_an_error_never_corruption(tmp_path):
    Store.open(tmp_path).close()
    holder = sqlite3.connect(str(tmp_path / DB_NAME), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with Store.open(tmp_path, busy_timeout=0.2) as store:
            with pytest.raises(StoreError, match="database is locked .*busy timeout"):
                store.set_state("12282a", "booked")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not list(tmp_path.glob("*.corrupt-*"))


def test_a_database_that_cannot_be_read_is_an_error_never_corruption(tmp_path):
    (tmp_path / DB_NAME).mkdir()  # e.g. a mistaken deployment step
    with pytest.raises(StoreError, match=f"^{tmp_path / DB_NAME}: cannot open the state store: unable to open"):
        Store.open(tmp_path)
    (tmp_path / DB_NAME).rmdir()
    Store.open(tmp_path).close()
    raw(tmp_path / DB_NAME, "PRAGMA journal_mode = DELETE")  # so that a writer's lock keeps readers out too
    holder = sqlite3.connect(str(tmp_path / DB_NAME), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="database is locked"):
            Store.open(tmp_path, busy_timeout=0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert sorted(path.name for path in tmp_path.iterdir()) == [DB_NAME, "mxsync.db.lock"]


def test_an_unusable_state_directory_is_one_line_naming_the_path(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError) as refused:
        Store.open(tmp_path / "file" / "state")
    assert (
        str(refused.value) == f"{tmp_path / 'file' / 'state' / DB_NAME}: cannot open the state store: Not a directory"
    )


def test_a_store_moved_aside_by_another_process_refuses_writes(tmp_path):
    store = Store.open(tmp_path)
    os.rename(tmp_path / DB_NAME, tmp_path / "elsewhere.db")
    Store.open(tmp_path).close()
    with pytest.raises(StoreError, match="replaced since it was opened"):
        store.set_state("12282a", "booked")
    store.close()


# ---------------------------------------------------------------- dry runs


def test_a_dry_run_works_on_a_copy_in_memory_and_changes_nothing_on_disk(tmp_path):
    write_history(tmp_path)
    listing = sorted(os.listdir(tmp_path))
    with Store.open(tmp_path, dry_run=True) as copy:
        assert copy.state("12282a").failures == 3  # imported into the copy, as a real run would
        copy.set_state("12282a", "verified", clear_failures=True)
        copy.transfer_started("12282a", "final")
        assert copy.state("12282a").state == "verified" and copy.imported == []
    assert sorted(os.listdir(tmp_path)) == listing
    with Store.open(tmp_path) as store:
        assert (store.state("12282a").state, store.state("12282a").failures) == ("failed", 3)
        store.set_state("400a", "collecting")
    before = (tmp_path / DB_NAME).read_bytes()
    with Store.open(tmp_path, dry_run=True) as copy:
        assert copy.state("400a").state == "collecting"
        copy.reconcile_recorded({"400a"})
        assert copy.state("400a").state == "recorded"
    assert (tmp_path / DB_NAME).read_bytes() == before
    with Store.open(tmp_path) as store:
        assert store.state("400a").state == "collecting"


def test_a_dry_run_on_a_corrupt_store_is_an_error_and_moves_nothing(tmp_path):
    (tmp_path / DB_NAME).write_bytes(b"garbage" * 1000)
    with pytest.raises(StoreError, match="not a usable database"):
        Store.open(tmp_path, dry_run=True)
    assert sorted(os.listdir(tmp_path)) == [DB_NAME]


def test_checksums_are_kept_per_epn_replaced_and_dropped_once_the_epn_is_recorded(tmp_path):
    with Store.open(tmp_path) as store:
        store.save_checksums("100a", "md5", {b"a": (1, (10, 11, 12), "0" * 32), b"\xff/b": (2, (20, 21, 22), "1" * 32)})
        store.save_checksums("100a", "md5", {b"a": (3, (30, 31, 32), "2" * 32)})
        store.save_checksums("101a", "sha1", {b"a": (4, (40, 41, 42), "3" * 40)})
        assert store.checksums("100a") == {
            b"a": (3, (30, 31, 32), "md5", "2" * 32),
            b"\xff/b": (2, (20, 21, 22), "md5", "1" * 32),
        }
        store.reconcile_recorded({"100a"})
        assert store.checksums("100a") == {} and len(store.checksums("101a")) == 1
        store.save_checksums("101a", "sha1", {b"b": (4, (40, 41, 42), "3" * 40)})
        store.set_state("101a", "recorded", clear_failures=True)  # how mxsync notes its own record
        assert store.checksums("101a") == {}
        store.save_checksums("102a", "sha1", {b"b": (4, (40, 41, 42), "3" * 40)})
        store.forget_checksums("102a")
        assert store.checksums("102a") == {}
