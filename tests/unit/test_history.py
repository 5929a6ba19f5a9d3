"""mxsync.history on the state store: failure counts and alerts as before, the pass API, ignore.yml winning."""

import logging
import os
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from mxsync import history as history_module
from mxsync.history import History
from mxsync.store import DB_NAME, Store
from tests import legacy_state


def raw(state_dir, sql):
    connection = sqlite3.connect(str(state_dir / DB_NAME))
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


def text(value):
    """A pass kind or outcome as text, whether LastPass holds strings or mxsync.lifecycle's enums."""
    return getattr(value, "value", value)


def summary(last):
    return text(last.kind), text(last.outcome), last.error


def errors_of(caplog):
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


# ---------------------------------------------------------------- failures and alerts, as the JSON history kept them


def test_failures_count_until_a_success_and_alert_once_per_run_of_failures(tmp_path):
    with History(tmp_path) as history:
        for error in ("rsync exit 12", "rsync exit 23"):
            history.epn_started("12282a")
            history.epn_finished("12282a", error=error)
        history.epn_finished("12283b", error="refused: unsafe destination")  # a failure before any transfer
        assert history.due_alerts(3) == ({}, {})
        history.epn_started("12282a")
        history.epn_finished("12282a", error="verification failed")
        epns, sources = history.due_alerts(3)
        assert sources == {} and list(epns) == ["12282a"]
        entry = epns["12282a"]
        assert (entry["failures"], entry["last_error"], entry["alerted"]) == (3, "verification failed", False)
        assert datetime.fromisoformat(entry["last_attempt"]) >= datetime.fromisoformat(entry["since"])
        history.mark_alerted(epns, sources)
        history.epn_finished("12282a", error="rsync exit 12")
        assert history.due_alerts(3) == ({}, {})  # alerted once for this run of failures
        assert history.failing_epns()["12282a"]["failures"] == 4
        history.epn_started("12282a")
        history.epn_finished("12282a")  # a success ends the run
        assert "12282a" not in history.failing_epns()
        for _ in range(3):
            history.epn_finished("12282a", error="rsync exit 12")
        assert list(history.due_alerts(3)[0]) == ["12282a"]  # a new run alerts again
        assert history.failing_epns()["12283b"]["failures"] == 1


def test_a_stopped_transfer_is_neither_a_failure_nor_a_success(tmp_path):
    with History(tmp_path) as history:
        history.epn_finished("12282a", error="rsync exit 12")
        history.epn_started("12282a")
        history.epn_finished("12282a", stopped=True)
        assert history.failing_epns()["12282a"]["failures"] == 1
        assert summary(history.last_pass("12282a")) == ("final", "stopped", None)


def test_sources_count_cycles_and_the_destination_alerts_at_once(tmp_path):
    with History(tmp_path) as history:
        history.source_result("portal", "HTTP 502")
        history.source_result("destination", "not mounted")
        epns, sources = history.due_alerts(2, immediate=("destination",))
        assert epns == {} and list(sources) == ["destination"]
        assert sources["destination"]["last_error"] == "not mounted" and sources["destination"]["since"]
        history.mark_alerted(epns, sources)
        history.source_result("portal", "timed out")
        assert list(history.due_alerts(2, immediate=("destination",))[1]) == ["portal"]
        history.source_result("portal")
        history.source_result("ssh")  # clearing a source that was not failing writes nothing
        assert list(history.failing_sources()) == ["destination"]


def test_waiting_for_data_is_shown_and_not_a_failure(tmp_path):
    with History(tmp_path) as history:
        history.epn_waiting("12286e", "no folder at the facility yet")
        history.epn_waiting("12286e", "its folder at the facility is empty")
        waiting = history.waiting_epns()["12286e"]
        assert waiting["reason"] == "its folder at the facility is empty" and waiting["since"]
        assert history.failing_epns() == {} and history.due_alerts(1) == ({}, {})
        history.epn_started("12286e")
        history.epn_finished("12286e")
        assert history.waiting_epns() == {}


def test_the_cycle_summary_is_kept_with_when_it_finished(tmp_path):
    with History(tmp_path) as history:
        assert history.last_cycle() is None
        history.epn_started("12282a")  # never finished by the cycle
        history.cycle_finished({"planned": 2, "synced": 1, "failed": [], "stopped": [], "waiting": []})
        assert summary(history.last_pass("12282a")) == ("final", "stopped", "the cycle ended while it ran")
    with History(tmp_path, read_only=True) as view:
        last = view.last_cycle()
    assert last["planned"] == 2 and datetime.fromisoformat(last["finished"]).tzinfo is not None


# ---------------------------------------------------------------- the pass API


def test_passes_give_the_last_pass_and_the_failures_in_a_row(tmp_path):
    with History(tmp_path) as history:
        assert history.last_pass("12282a") is None and history.failures("12282a") == 0
        token = history.pass_started("12282a", "live")
        assert history.last_pass("12282a") is None  # running: not a finished pass yet
        history.pass_finished(token, "ok", files=3, bytes_transferred=4096)
        last = history.last_pass("12282a")
        assert summary(last) == ("live", "ok", None)
        assert last.started <= last.finished and last.finished.tzinfo is not None
        for outcome in ("failed", "stopped", "failed"):
            history.pass_finished(history.pass_started("12282a", "live"), outcome, error="rsync exit 12")
        # Live passes copy growing data: their failures are never the EPN's, nor alerted.
        assert history.failures("12282a") == 0 and history.failing_epns() == {}
        for outcome in ("failed", "stopped", "failed"):
            history.pass_finished(history.pass_started("12282a", "final"), outcome, error="verification failed")
        assert history.failures("12282a") == 2  # a stop says nothing, so the run of failures goes on
        assert history.failing_epns()["12282a"]["failures"] == 2
        history.pass_finished(history.pass_started("12282a", "final"), "no-data")
        assert history.failures("12282a") == 0 and text(history.last_pass("12282a").outcome) == "no-data"
        assert history.waiting_epns()["12282a"]["reason"] == "no data at the facility yet"
        history.pass_finished(history.pass_started("12282a", "final"), "ok", files=5, bytes_transferred=10)
        assert history.failing_epns() == {} and history.waiting_epns() == {}
        assert history.passes() == {"12282a": (history.last_pass("12282a"), 0)}
        with pytest.raises(ValueError, match="unknown pass kind"):
            history.pass_started("12282a", "backfill")
        with pytest.raises(ValueError, match="unknown pass outcome"):
            history.pass_finished(token, "interrupted")
    with Store.open(tmp_path) as store:
        first = store.transfers("12282a")[0]
        assert (first.files, first.bytes, first.outcome) == (3, 4096, "ok")


def test_last_pass_is_the_lifecycles_type_when_there_is_one(tmp_path):
    with History(tmp_path) as history:
        history.pass_finished(history.pass_started("12282a", "final"), "stopped")
        last = history.last_pass("12282a")
    try:
        from mxsync.lifecycle import LastPass, Outcome, PassKind
    except ImportError:
        assert type(last) is history_module.LastPass
        assert (last.kind, last.outcome) == ("final", "stopped")
    else:
        assert type(last) is LastPass
        assert (last.kind, last.outcome) == (PassKind.FINAL, Outcome.STOPPED)


def test_a_pass_a_killed_mxsync_left_open_is_closed_as_interrupted(tmp_path, monkeypatch):
    with Store.open(tmp_path) as store:  # as a mxsync killed mid-transfer leaves it
        store.transfer_started("12282a", "final", when=datetime.now(timezone.utc) - timedelta(hours=1))
    with History(tmp_path, read_only=True) as view:
        assert view.last_pass("12282a") is None  # a view changes nothing
    with History(tmp_path) as history:
        assert summary(history.last_pass("12282a")) == ("final", "stopped", "mxsync stopped while it ran")
        running = history.pass_started("12282b", "live")
    with History(tmp_path) as history:  # a pass this process started is its own, not a crash's
        history.pass_finished(running, "ok")
        assert summary(history.last_pass("12282b")) == ("live", "ok", None)


def test_ignore_yml_wins_a_reopened_epn_loses_its_passes_and_recorded_ones_their_failures(tmp_path):
    with History(tmp_path) as history:
        history.pass_finished(history.pass_started("12282a", "final"), "ok")
        history.recorded("12282a")
        history.epn_finished("12282b", error="rsync exit 12")
        assert history.reconcile({"12282a", "12282b"}) == set()
        assert history.failing_epns() == {}  # 12282b was recorded by hand: its failures are over
        assert history.reconcile({"12282b"}) == {"12282a"}  # taken out of ignore.yml by hand
        assert history.last_pass("12282a") is None and history.failures("12282a") == 0
        assert history.passes() == {}
        history.pass_finished(history.pass_started("12282a", "live"), "failed", error="x")
        assert summary(history.last_pass("12282a")) == ("live", "failed", "x") and history.failures("12282a") == 0
    assert raw(tmp_path, "SELECT count(*) FROM transfers WHERE epn = '12282a'") == [(2,)]  # kept for the record


def test_a_success_of_the_cycle_is_a_record_that_ignore_yml_can_take_back(tmp_path):
    with History(tmp_path) as history:
        history.epn_started("12282a")
        history.epn_finished("12282a")  # the cycle calls it once the EPN is verified and in ignore.yml
        assert history.reconcile({"12282a"}) == set()
        assert history.reconcile(set()) == {"12282a"}  # removed by hand: synced again, from no pass at all
        assert history.last_pass("12282a") is None
    with Store.open(tmp_path) as store:
        assert (store.state("12282a").state, store.state("12282a").reason) == ("final", "no longer in ignore.yml")


# ---------------------------------------------------------------- the store unavailable or damaged


def test_a_store_that_cannot_be_opened_is_one_line_and_history_goes_on_without_it(tmp_path, caplog):
    state_dir = tmp_path / "file"
    state_dir.write_text("")
    with History(state_dir) as history:
        token = history.pass_started("12282a", "final")
        history.pass_finished(token, "failed", error="x")
        history.epn_finished("12282a", error="x")
        history.source_result("portal", "HTTP 502")
        history.mark_alerted(["12282a"], ["portal"])
        history.cycle_finished({"planned": 1})
        assert history.due_alerts(1) == ({}, {})
        assert summary(history.last_pass("12282a")) == ("final", "failed", "x")  # what this process did
        assert history.failures("12282a") == 0 and history.reconcile({"12282a"}) == set()
    (line,) = errors_of(caplog)
    assert line.startswith(f"{state_dir / DB_NAME}: cannot open the state store") and "going on without" in line
    assert history.problem in line and token.id is None


def test_a_store_that_fails_mid_run_is_logged_once_and_never_raises(tmp_path, caplog):
    history = History(tmp_path)
    blocker = sqlite3.connect(str(tmp_path / DB_NAME), isolation_level=None, timeout=0)
    blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock beyond the busy timeout
    history._store._db.execute("PRAGMA busy_timeout = 50")
    try:
        for epn in ("12282a", "12282b", "12282c"):
            history.epn_finished(epn, error="rsync exit 12")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    (line,) = [message for message in errors_of(caplog) if "database is locked" in message]
    assert "the transfers go on" in line
    history.epn_finished("12282d", error="rsync exit 12")
    assert list(history.failing_epns()) == ["12282d"]
    history.close()


def test_a_corrupt_store_is_moved_aside_and_says_so_for_the_caller_to_reconcile(tmp_path, caplog):
    (tmp_path / DB_NAME).write_bytes(b"garbage" * 1000)
    with History(tmp_path, read_only=True) as view:  # a view reports it and moves nothing
        assert "not a usable database" in view.problem and view.rebuilt is None
    assert sorted(os.listdir(tmp_path)) == [DB_NAME]
    with History(tmp_path) as history:
        assert history.rebuilt is not None and history.rebuilt.name.startswith(DB_NAME + ".corrupt-")
        assert history.problem is None
        history.reconcile({"12282a"})
    with Store.open(tmp_path) as store:
        assert store.state("12282a").state == "recorded"


def test_the_old_json_history_is_imported_and_reads_back_as_it_did(tmp_path):
    data = legacy_state.install(tmp_path, legacy_state.HISTORY_FILE)
    with History(tmp_path) as history:
        epns, sources = history.due_alerts(2)
        assert list(epns) == ["12283b"]  # 12282a was alerted already
        assert epns["12283b"]["last_attempt"] == data["epns"]["12283b"]["last_attempt"]
        assert sources == {}  # the portal failed once, fewer than 2; the destination was alerted
        assert history.failing_epns()["12282a"]["failures"] == 3
        assert history.waiting_epns()["12286e"]["since"] == data["waiting"]["12286e"]["since"]
        assert history.last_cycle() == data["last_cycle"]
        assert set(history.failing_sources()) == {"portal", "destination"}
        assert text(history.last_pass("12285d").outcome) == "stopped"  # running when the old mxsync was killed
    assert not (tmp_path / legacy_state.HISTORY_FILE).exists()
    assert (tmp_path / (legacy_state.HISTORY_FILE + ".imported")).exists()


def test_without_a_usable_store_the_passes_of_this_process_are_still_known_but_never_a_verified_one(tmp_path):
    """A full or read-only state disk must not make live passes run at every wake, nor lead to a record."""
    unusable = tmp_path / "state"
    unusable.write_text("a file where the state folder should be")
    with History(unusable) as history:
        assert history.problem
        history.pass_finished(history.pass_started("12282a", "live"), "ok")
        history.pass_finished(history.pass_started("12282b", "final"), "failed", error="rsync exit 12")
        history.pass_finished(history.pass_started("12282c", "final"), "ok")
    with History(unusable) as next_cycle:  # the service's next cycle, same process
        assert summary(next_cycle.last_pass("12282a")) == ("live", "ok", None)
        assert summary(next_cycle.last_pass("12282b")) == ("final", "failed", "rsync exit 12")
        assert next_cycle.last_pass("12282c") is None  # only the store may say "verified"
    with History(tmp_path / "elsewhere") as other:
        assert other.last_pass("12282a") is None
