"""An EPN's lifecycle end to end on the simulated facility: live copies during the visit, files written while it
settles, the final pass and the record; each step a separate run of mxsync, as after a restart."""

import json
import time
from datetime import datetime, timedelta, timezone

from tests.facility.portal import _iso
from tests.test_mxsync import mxsync, recorded, source_manifest, sync_log, synced_manifest


def _status(config):
    rows = json.loads(mxsync("status", "--config", config, "--json", check=0).stdout)["epns"]
    return {row["epn"]: row["state"] for row in rows}


def _move(visit, start, end):
    visit["start_time"], visit["end_time"] = _iso(start), _iso(end)


def test_files_written_while_the_visit_settles_arrive_before_the_record(facility):
    """Issue 11 (a): the facility's processing writes after collection; the EPN is recorded with all of it."""
    ended = datetime.now(timezone.utc) - timedelta(seconds=20)
    experiment = facility.add_experiment("mx", "12282a", equipment_id=23, start=ended - timedelta(hours=3), end=ended)
    config = facility.write_config(settle_minutes=1)

    mxsync("--config", config, "--execute", "--once")
    assert "12282a" not in recorded(config)
    assert synced_manifest(facility, "ny79", "12282a") == source_manifest(facility, "12282a")
    assert _status(config)["12282a"] == "settling"

    processing = experiment / "processing"  # auto-processing, after the visit ended
    processing.mkdir()
    for number in range(10):
        (processing / f"result_{number}.mtz").write_bytes(b"processed " * (number + 1))
    time.sleep(max(0.0, (ended + timedelta(minutes=1) - datetime.now(timezone.utc)).total_seconds()) + 1)

    mxsync("--config", config, "--execute", "--once")
    assert recorded(config) == {"12282a"}
    assert synced_manifest(facility, "ny79", "12282a") == source_manifest(facility, "12282a")
    assert "processing/result_9.mtz" in synced_manifest(facility, "ny79", "12282a")
    assert _status(config)["12282a"] == "synced"


def test_each_lifecycle_state_survives_a_restart_and_nothing_verified_is_repeated(facility):
    """Issue 11 (c): one run of mxsync per state (booked, collecting, settling, final, recorded)."""
    now = datetime.now(timezone.utc)
    experiment = facility.add_experiment("mx", "12282a", frames=2)
    visit = facility.portal.add_visit(23, "12282a", now + timedelta(hours=2), now + timedelta(hours=8))
    config = facility.write_config(settle_minutes=1)
    data = facility.destination / "ny79" / "12282a"

    mxsync("--config", config, "--execute", "--once")
    assert _status(config)["12282a"] == "booked" and not data.exists()

    _move(visit, now - timedelta(hours=1), now + timedelta(hours=5))
    mxsync("--config", config, "--execute", "--once")
    assert _status(config)["12282a"] == "collecting" and "12282a" not in recorded(config)
    assert synced_manifest(facility, "ny79", "12282a") == source_manifest(facility, "12282a")

    (experiment / "frames" / "12282a_0003.cbf").write_bytes(b"frame three " * 100)
    _move(visit, now - timedelta(hours=1), datetime.now(timezone.utc) - timedelta(seconds=5))
    mxsync("--config", config, "--execute", "--once")  # settling, its live pass not due yet: nothing moves
    assert _status(config)["12282a"] == "settling" and "12282a" not in recorded(config)
    assert "12282a_0003.cbf" not in str(synced_manifest(facility, "ny79", "12282a"))

    _move(visit, now - timedelta(hours=1), datetime.now(timezone.utc) - timedelta(minutes=2))
    mxsync("--config", config, "--execute", "--once")
    assert recorded(config) == {"12282a"}
    assert synced_manifest(facility, "ny79", "12282a") == source_manifest(facility, "12282a")

    mxsync("--config", config, "--execute", "--once")
    log = sync_log(facility)
    assert log.count("12282a: live pass started") == 1 and log.count("12282a: started,") == 1
    assert log.count("12282a: synced and verified") == 1


def test_a_file_copied_live_at_its_final_size_is_fetched_again_once_complete(facility):
    """A detector that gives a file its full length when it creates it: the live copy is of a half-written file."""
    now = datetime.now(timezone.utc)
    experiment = facility.add_experiment("mx", "12282a", frames=1)
    visit = facility.portal.add_visit(23, "12282a", now - timedelta(hours=1), now + timedelta(hours=5))
    config = facility.write_config(settle_minutes=1)
    master = experiment / "frames" / "12282a_master.h5"
    master.write_bytes(bytes(64 * 1024))  # allocated, not yet written
    mxsync("--config", config, "--execute", "--once")
    home = facility.destination / "ny79" / "12282a" / "data" / "frames" / "12282a_master.h5"
    assert home.read_bytes() == bytes(64 * 1024)

    master.write_bytes(b"written by the detector " * (64 * 1024 // 24) + bytes(64 * 1024 % 24))  # same size
    _move(visit, now - timedelta(hours=1), datetime.now(timezone.utc) - timedelta(minutes=2))
    mxsync("--config", config, "--execute", "--once")
    assert recorded(config) == {"12282a"}
    assert home.read_bytes() == master.read_bytes()
