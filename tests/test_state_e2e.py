"""State files through the real console script on the simulated facility: the state store (imports, a corrupt one,
epnalert beside mxsync), hand comments, modes."""

import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import legacy_state
from tests.faults import finish, log_has, start_tool, wait_for
from tests.test_mxsync import ENDED, MXSYNC, ignore_path, mxsync, recorded, sync_log

STATE_FILES = ("ignore.yml", "ignore.yml.lock", "mxsync.db", "mxsync.db.lock", "mxsync.lock")
EPNALERT = Path(sys.executable).with_name("epnalert")


def _state_dir(config):
    return ignore_path(config).parent


def _snapshot(directory):
    """{name: bytes} of the files in a state directory, less what SQLite may leave beside a database it only read:
    its -shm (shared memory) and an empty -wal."""
    files = {path.name: path.read_bytes() for path in directory.iterdir() if path.is_file()}
    return {name: data for name, data in files.items() if not name.endswith("-shm") and (data or name[-4:] != "-wal")}


def _rows(config, sql):
    """Rows of a query on the state store, read-only with plain sqlite3."""
    connection = sqlite3.connect(f"{(_state_dir(config) / 'mxsync.db').as_uri()}?mode=ro", uri=True)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


def _epnalert(config):
    return subprocess.run(
        [str(EPNALERT), "--config", str(config)], capture_output=True, text=True, timeout=120, check=False
    )


def test_first_start_imports_the_json_state_of_an_existing_install_and_retires_it(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)  # failing three times under the old mxsync
    facility.add_experiment("mx", "300a", equipment_id=23, frames=1, small_files=0)  # alerted as unknown before
    config = facility.write_config()
    state = _state_dir(config)
    history = legacy_state.install(state, legacy_state.HISTORY_FILE)
    alerted = legacy_state.install(state, legacy_state.ALERT_STATE_FILE)

    before = json.loads(mxsync("status", "--config", config, "--json", check=0).stdout)  # a view: imports in memory
    assert {row["epn"]: row["failures"] for row in before["epns"] if row["state"] == "failed"} == {
        "12282a": 3,
        "12283b": 2,
    }
    assert (state / "mxsync-state.json").exists() and not (state / "mxsync.db").exists()

    result = mxsync("--config", config, "--execute", "--once", check=0)

    assert recorded(config) == {"12282a"}
    for name, data in (("mxsync-state.json", history), ("epnalert-state.json", alerted)):
        assert not (state / name).exists(), name
        assert json.loads((state / f"{name}.imported").read_text()) == data  # kept for staff, as it was
    log = sync_log(facility)
    assert (
        "Imported " + str(state / "mxsync-state.json") in log
        and "Imported " + str(state / "epnalert-state.json") in log
    )
    assert "Traceback" not in result.stderr and "WARNING" not in result.stderr
    # The synced EPN's failures are over; the others carry on from the old file; the interrupted run is on record.
    assert _rows(config, "SELECT epn, failures, last_error FROM epns WHERE failures > 0") == [
        ("12283b", 2, "rsync exit 23")
    ]
    assert _rows(config, "SELECT kind, outcome FROM transfers WHERE epn = '12285d'") == [("final", "interrupted")]
    assert _rows(config, "SELECT name FROM sources") == []  # the portal and destination answered this time
    status = json.loads(mxsync("status", "--config", config, "--json", check=0).stdout)
    states = {row["epn"]: (row["state"], row["failures"]) for row in status["epns"]}
    assert states["12282a"] == ("synced", 0) and states["12283b"] == ("failed", 2)

    # epnalert reads what the old one remembered: 300a was first alerted on 2024-04-28, so it is not new.
    assert _epnalert(config).returncode == 0
    (received,) = facility.smtp.wait_for(1)
    text = received.message.get_body(("plain",)).get_content()
    assert re.search(r"^    300a   seen on", text, re.MULTILINE) and "NEW 300a" not in text
    assert not (state / "epnalert-state.json").exists()


@pytest.mark.parametrize(
    "damaged",
    [b'{"epns": {"12282a": {"failures": 2, "alerted"', b'{"epns": {"12282a": {"failures": "many"}}}'],
    ids=["cut off by a full disk", "an unusable section"],
)
def test_a_damaged_json_history_is_left_in_place_with_a_warning_and_the_run_goes_on(facility, damaged):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config()
    state = _state_dir(config)
    state.mkdir(parents=True, exist_ok=True)
    history = state / "mxsync-state.json"
    history.write_bytes(damaged)

    result = mxsync("--config", config, "--execute", "--once", check=0)

    assert recorded(config) == {"12282a"}
    assert history.read_bytes() == damaged and not list(state.glob("mxsync-state.json.*"))
    assert isinstance(json.loads(_rows(config, "SELECT value FROM notes WHERE name = 'last_cycle'")[0][0]), dict)
    warnings = [line for line in sync_log(facility).splitlines() if "cannot be imported" in line]
    assert len(warnings) == 1 and str(history) in warnings[0] and "left in place" in warnings[0]
    assert "WARNING" in warnings[0] and result.stderr.count("cannot be imported") == 1
    assert "Traceback" not in result.stderr


def test_a_corrupt_store_is_moved_aside_and_the_next_run_still_transfers_and_records(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    facility.add_experiment("mx", "12282b", equipment_id=23, **ENDED)
    config = facility.write_config()
    mxsync("--config", config, "--execute", "--once", check=0)
    state = _state_dir(config)
    # Half of the first run's store, as a crash of the disk may leave it; 12282b is taken out of ignore.yml to sync.
    store = state / "mxsync.db"
    for leftover in state.glob("mxsync.db-*"):
        leftover.unlink()
    os.truncate(store, store.stat().st_size // 2)
    damaged = store.read_bytes()
    ignore_path(config).write_text("previouslySynched:\n- 12282a\n")
    first_run = len(sync_log(facility))

    result = mxsync("--config", config, "--execute", "--once", check=0)

    assert recorded(config) == {"12282a", "12282b"}
    log = sync_log(facility)[first_run:]
    assert "12282b: synced and verified" in log and "12282a: started" not in log
    (aside,) = state.glob("mxsync.db.corrupt-*")
    assert aside.read_bytes() == damaged
    warnings = [line for line in sync_log(facility).splitlines() if "moved it to" in line]
    assert len(warnings) == 1 and str(store) in warnings[0] and str(aside) in warnings[0] and "WARNING" in warnings[0]
    assert result.stderr.count("moved it to") == 1 and "Traceback" not in result.stderr
    assert _rows(config, "PRAGMA integrity_check") == [("ok",)]
    assert _rows(config, "SELECT epn, kind, outcome FROM transfers") == [("12282b", "final", "ok")]


@pytest.mark.parametrize("command", [["status"], ["--once"]], ids=["status", "dry run"])
def test_read_only_views_report_a_corrupt_store_and_move_nothing(facility, command):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config()
    state = _state_dir(config)
    state.mkdir(parents=True, exist_ok=True)
    (state / "mxsync.db").write_bytes(b"{trunc" * 1000)
    before = _snapshot(state)

    result = mxsync(*command, "--config", config, check=0)

    assert _snapshot(state) == before and "Traceback" not in result.stderr
    # status prints it among its notes; a dry run logs it.
    said = result.stdout if command == ["status"] else result.stderr
    problem = f"{state / 'mxsync.db'}: the state store is not a usable database"
    assert said.count(problem) == 1


def test_epnalert_and_mxsync_share_the_store_at_the_same_time(facility):
    epns = [f"12282{letter}" for letter in "abcdef"]
    for epn in epns:
        facility.add_experiment("mx", epn, equipment_id=23, **ENDED)
    facility.add_experiment("mx", "20001a", equipment_id=23, frames=1, small_files=0)  # unknown: epnalert alerts
    config = facility.write_config(max_tasks=2, epnalert_repeat_days=0)  # every epnalert run sends and records
    sync = start_tool(MXSYNC[0], "--config", config, "--execute", "--once")
    assert wait_for(log_has(facility, ": started,"), sync), "mxsync started no transfer"
    runs = []  # (whether mxsync was still running when it started, the epnalert run)
    while sync.poll() is None or not runs:
        during = sync.poll() is None
        runs.append((during, _epnalert(config)))
    result = finish(sync)

    assert result.returncode == 0, result.stderr
    assert recorded(config) == set(epns)
    assert runs[0][0], "mxsync ended before epnalert ran"
    for _, alert in runs:
        assert (alert.returncode, alert.stderr) == (0, ""), alert.stderr
    assert "locked" not in result.stderr and "Traceback" not in result.stderr
    assert _rows(config, "PRAGMA integrity_check") == [("ok",)]
    assert sorted(_rows(config, "SELECT epn, outcome FROM transfers")) == [(epn, "ok") for epn in epns]
    sent = _rows(config, "SELECT key, count(*) FROM alerts WHERE kind = 'unknown-epn' GROUP BY key")
    assert sent == [("20001a", len(runs))] and len(facility.smtp.wait_for(len(runs))) == len(runs)


def test_hand_comments_in_ignore_file_survive_real_records(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    facility.add_experiment("mx", "12282b", equipment_id=23, **ENDED)
    config = facility.write_config()
    ignore = ignore_path(config)
    ignore.parent.mkdir(parents=True, exist_ok=True)
    hand_written = (
        "# Synced EPNs. Ask the MX team before removing one.\n"
        "previouslySynched:\n"
        "- 55555a   # moved from the old server\n"
        "# 2023 visits\n"
        "- 44444b\n"
    )
    ignore.write_text(hand_written)

    mxsync("--config", config, "--execute", "--once", check=0)

    text = ignore.read_text()
    assert text.startswith(hand_written)
    assert sorted(text[len(hand_written) :].splitlines()) == ["- 12282a", "- 12282b"]
    # What HPC ASSyncy's loader reads: the one key, the hand-written order first.
    (entries,) = yaml.safe_load(text).values()
    assert entries[:2] == ["55555a", "44444b"]
    assert set(entries) == {"55555a", "44444b", "12282a", "12282b"} == recorded(config)


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_state_files_of_a_manual_or_cron_run_are_not_world_readable(facility, umask):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config()
    state = _state_dir(config)

    result = subprocess.run(
        MXSYNC + ["--config", str(config), "--execute", "--once"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        umask=umask,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert recorded(config) == {"12282a"}
    modes = {name: oct(stat.S_IMODE((state / name).stat().st_mode)) for name in STATE_FILES}
    assert modes == {name: oct(0o640) for name in STATE_FILES}
    assert not [path for path in state.iterdir() if path.stat().st_mode & 0o007 and path.is_file()]
    # An existing file keeps the mode staff gave it.
    os.chmod(state / "ignore.yml", 0o664)
    (state / "ignore.yml").write_text("previouslySynched: []\n")
    subprocess.run(
        MXSYNC + ["--config", str(config), "--execute", "--once"],
        capture_output=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        umask=umask,
        check=True,
    )
    assert recorded(config) == {"12282a"} and stat.S_IMODE((state / "ignore.yml").stat().st_mode) == 0o664


def test_every_epn_seen_by_either_program_is_in_the_store_with_its_visits(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)  # mapped, on the portal and on SFTP
    facility.add_experiment("mx", "30001a", equipment_id=23, **ENDED)  # unknown: epnalert's business
    facility.add_experiment("mx", "40001a")  # on SFTP only, no visit
    config = facility.write_config()

    mxsync("--config", config, "--execute", "--once", check=0)
    assert _epnalert(config).returncode == 0

    seen = _rows(config, "SELECT epn, source FROM sightings ORDER BY epn, source")
    assert seen == [
        ("12282a", "portal"),
        ("12282a", "sftp"),
        ("30001a", "portal"),
        ("30001a", "sftp"),
        ("40001a", "sftp"),
    ]
    assert dict(_rows(config, "SELECT epn, project FROM epns WHERE epn IN ('12282a', '30001a')")) == {
        "12282a": "ny79",
        "30001a": None,
    }
    assert sorted(epn for (epn,) in _rows(config, "SELECT DISTINCT epn FROM visits")) == ["12282a", "30001a"]
