"""The lifecycle inside a cycle: live passes, settling, the final pass and its record, with fakes for the
portal and the runner (the real facility is in tests/test_lifecycle_e2e.py)."""

import logging
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mxsync.catalogue import VisitCatalogue
from mxsync.config import load_config
from mxsync.errors import PortalError, StateFileError
from mxsync.history import History
from mxsync.itemize import FileList, TransferResult
from mxsync.portal import Visit
from mxsync.service import SHORTEST_PAUSE_SECONDS, next_pause
from mxsync.state import IgnoreFile
from mxsync.sync import CycleOutcome, SyncCycle
from tests.unit.test_cycle import write_config

NOW = datetime.now(timezone.utc)


def hours(offset):
    return NOW + timedelta(hours=offset)


class Portal:
    def __init__(self, *visits):
        self.visits_ = [Visit(epn, start, end, 23, "mx", None, ()) for epn, start, end in visits]

    def visits(self, equipment, start, end):
        return [v for v in self.visits_ if v.start < end and v.end > start], []


class Runner:
    """Copies one frame into the open data folder; counts the transfers per EPN and kind."""

    def __init__(self, dry_run=False):
        self.calls = []
        self.dry_run = dry_run

    def connect(self):
        return None

    def close(self):
        pass

    def probe_source(self, epn, source):
        return "present"

    def transfer(self, epn, source, destination, progress=None, dry_run=None):
        dry_run = self.dry_run if dry_run is None else dry_run
        self.calls.append((epn, "dry" if dry_run else "real"))
        if isinstance(destination, int):
            destination = Path(f"/proc/self/fd/{destination}")
        if not dry_run:
            (destination / "frame.cbf").write_bytes(b"x")
        return TransferResult(epn, files=FileList([("frame.cbf", 1)]), files_transferred=0)


class BrokenRecord(IgnoreFile):
    def add(self, epns):
        raise StateFileError(f"{self.path}: No space left on device")


def cycle(tmp_path, portal, runner, execute=True, ignore_class=IgnoreFile, catalogue=None, **config_keys):
    config = load_config(write_config(tmp_path, **config_keys), check_files=False)
    history = History(config.state_dir, read_only=not execute)
    return SyncCycle(
        config,
        portal,
        runner,
        ignore_class(config.ignore_file),
        history,
        execute=execute,
        stop=threading.Event(),
        catalogue=catalogue,
    ), config


def recorded(config):
    return IgnoreFile(config.ignore_file).load()


def test_a_running_visit_gets_a_live_pass_and_is_not_recorded(tmp_path):
    runner = Runner()
    running, config = cycle(tmp_path, Portal(("12282a", hours(-2), hours(6))), runner)
    outcome = running.run()
    assert outcome.live == ["12282a"] and outcome.synced == [] and not outcome.failed
    assert runner.calls == [("12282a", "real")]
    assert "12282a" not in recorded(config)
    assert running.history.last_pass("12282a").kind.value == "live"
    # The next wake is its next live pass, live-interval-minutes (10) after this one.
    assert timedelta(minutes=9) < outcome.next_wake - datetime.now(timezone.utc) <= timedelta(minutes=10)


def test_a_settling_visit_gets_live_passes_then_a_final_pass_records_it(tmp_path):
    runner = Runner()
    portal = Portal(("12282a", hours(-3), hours(-0.5)))
    settling, config = cycle(tmp_path, portal, runner, **{"settle-minutes": 60})
    assert settling.run().live == ["12282a"] and "12282a" not in recorded(config)

    settled, config = cycle(tmp_path, portal, runner, **{"settle-minutes": 20})  # the deadline has passed now
    outcome = settled.run()
    assert outcome.synced == ["12282a"] and recorded(config) == {"12282a"}
    assert [kind for _, kind in runner.calls] == ["real", "real"]


def test_settle_zero_records_at_once_as_before(tmp_path):
    runner = Runner()
    ended, config = cycle(tmp_path, Portal(("12282a", hours(-3), hours(-0.5))), runner, **{"settle-minutes": 0})
    assert ended.run().synced == ["12282a"] and recorded(config) == {"12282a"}


def test_a_verified_epn_whose_record_failed_is_recorded_later_without_another_transfer(tmp_path):
    runner = Runner()
    portal = Portal(("12282a", hours(-72), hours(-48)))
    broken, config = cycle(tmp_path, portal, runner, ignore_class=BrokenRecord)
    outcome = broken.run()
    assert "verified but not recorded" in outcome.failed["12282a"] and runner.calls == [("12282a", "real")]

    fixed, config = cycle(tmp_path, portal, runner)
    assert fixed.run().synced == ["12282a"]
    assert recorded(config) == {"12282a"} and runner.calls == [("12282a", "real")]  # no second transfer


def test_a_record_the_store_heard_of_but_ignore_yml_lacks_is_synced_again(tmp_path):
    """mxsync died between telling the store and writing ignore.yml (or staff removed the EPN meanwhile)."""
    runner = Runner()
    portal = Portal(("12282a", hours(-72), hours(-48)))
    first, config = cycle(tmp_path, portal, runner)
    assert first.run().synced == ["12282a"]
    config.ignore_file.write_text("previouslySynched: []\n")  # as if the record never reached the file

    again, config = cycle(tmp_path, portal, runner)
    assert again.run().synced == ["12282a"]
    assert runner.calls == [("12282a", "real"), ("12282a", "real")]


def test_passes_due_that_could_not_start_are_tried_again_soon(tmp_path):
    runner = Runner()
    running, config = cycle(tmp_path, Portal(("12282a", hours(-72), hours(-48))), runner)
    (tmp_path / "dest").rmdir()  # the destination file system is not mounted
    outcome = running.run()
    assert outcome.problems and runner.calls == []
    assert outcome.next_wake - datetime.now(timezone.utc) <= timedelta(minutes=15)  # not the next poll, a day away


def test_an_epn_removed_from_ignore_yml_by_hand_is_synced_again(tmp_path):
    runner = Runner()
    portal = Portal(("12282a", hours(-72), hours(-48)))
    first, config = cycle(tmp_path, portal, runner)
    assert first.run().synced == ["12282a"]
    config.ignore_file.write_text("previouslySynched: []\n")

    again, config = cycle(tmp_path, portal, runner)
    assert again.run().synced == ["12282a"]
    assert runner.calls == [("12282a", "real"), ("12282a", "real")]


def test_a_dry_run_shows_each_lifecycle_and_changes_nothing(tmp_path, caplog):
    runner = Runner(dry_run=True)
    portal = Portal(
        ("12282a", hours(-2), hours(6)), ("12282b", hours(-72), hours(-48)), ("12282c", hours(20), hours(30))
    )
    dry, config = cycle(tmp_path, portal, runner, execute=False)
    with caplog.at_level(logging.INFO, logger="mxsync"):
        outcome = dry.run()
    assert "12282a: collecting" in caplog.text and "next: live pass at" in caplog.text
    assert "12282c: booked (visit starts" in caplog.text
    assert outcome.synced == ["12282b"] and not config.ignore_file.exists()
    assert not list((tmp_path / "dest").iterdir()) and not (config.state_dir / "mxsync-state.json").exists()


@pytest.mark.parametrize(
    ("wake_in", "expected"),
    [
        (None, 24 * 3600),  # nothing due: the next poll
        (timedelta(minutes=10), 600),
        (timedelta(seconds=-5), SHORTEST_PAUSE_SECONDS),  # due already, yet not started: no spinning
        (timedelta(days=3), 24 * 3600),  # a booking far ahead: the poll comes first
    ],
)
def test_the_service_sleeps_until_the_next_event(tmp_path, wake_in, expected):
    config = load_config(write_config(tmp_path), check_files=False)
    outcome = CycleOutcome(next_wake=None if wake_in is None else NOW + wake_in)
    assert next_pause(config, outcome, NOW) == pytest.approx(expected)


class CountingPortal(Portal):
    def __init__(self, *visits):
        super().__init__(*visits)
        self.asked = 0

    def visits(self, equipment, start, end):
        self.asked += 1
        return super().visits(equipment, start, end)


def test_live_passes_use_the_remembered_visits_and_a_final_pass_asks_the_portal_again(tmp_path):
    runner, catalogue = Runner(), VisitCatalogue()
    portal = CountingPortal(("12282a", hours(-2), hours(6)))
    running, config = cycle(tmp_path, portal, runner, catalogue=catalogue)
    assert running.run().live == ["12282a"] and portal.asked == 1

    portal.visits_ = [Visit("12282a", hours(-3), hours(-0.5), 23, "mx", None, ())]  # the visit ended meanwhile
    cached = catalogue.remembered(config, datetime.now(timezone.utc))
    assert cached is not None and cached.visits[0].end == hours(6)  # what the service still believes
    believed, config = cycle(tmp_path, portal, runner, catalogue=catalogue, **{"settle-minutes": 0})
    outcome = believed.run()  # believed running: no final pass seems due, so no portal call
    assert portal.asked == 1 and outcome.synced == [] and "12282a" not in recorded(config)

    # A new service (or the next poll, sync-frequency-hours on) asks the portal; the final pass records it.
    fresh, config = cycle(tmp_path, portal, runner, catalogue=VisitCatalogue(), **{"settle-minutes": 0})
    assert fresh.run().synced == ["12282a"] and portal.asked == 2


def test_a_final_pass_due_on_remembered_visits_asks_the_portal_first(tmp_path):
    runner, catalogue = Runner(), VisitCatalogue()
    portal = CountingPortal(("12282a", hours(-3), hours(-0.5)))
    settling, config = cycle(tmp_path, portal, runner, catalogue=catalogue, **{"settle-minutes": 60})
    assert settling.run().live == ["12282a"] and portal.asked == 1
    portal.visits_ = [Visit("12282a", hours(-3), hours(5), 23, "mx", None, ())]  # extended: it runs again
    settled, config = cycle(tmp_path, portal, runner, catalogue=catalogue, **{"settle-minutes": 20})
    outcome = settled.run()  # the remembered end says "final pass due": the portal is asked, and says otherwise
    assert portal.asked == 2 and outcome.synced == [] and "12282a" not in recorded(config)


class FailingPortal(CountingPortal):
    def __init__(self, *visits):
        super().__init__(*visits)
        self.down = False

    def visits(self, equipment, start, end):
        if self.down:
            self.asked += 1
            raise PortalError("portal equipment 23: HTTP 502")
        return super().visits(equipment, start, end)


def test_while_the_portal_is_down_live_passes_go_on_and_final_passes_wait(tmp_path):
    runner, catalogue = Runner(), VisitCatalogue()
    portal = FailingPortal(("12282a", hours(-2), hours(6)), ("12282b", hours(-3), hours(-0.5)))
    first, config = cycle(tmp_path, portal, runner, catalogue=catalogue, **{"settle-minutes": 60})
    assert sorted(first.run().live) == ["12282a", "12282b"]

    portal.down = True  # and 12282b's settle deadline passes: its final pass needs the portal's latest times
    runner.calls.clear()
    down, config = cycle(
        tmp_path, portal, runner, catalogue=catalogue, **{"settle-minutes": 20, "live-interval-minutes": 1}
    )
    down.history.pass_finished(down.history.pass_started("12282a", "live"), "stopped")  # make its live pass due
    outcome = down.run()
    assert runner.calls == [("12282a", "real")] and outcome.live == ["12282a"]
    assert "12282b" not in recorded(config) and outcome.problems  # the portal counts as failing
    assert outcome.next_wake - datetime.now(timezone.utc) <= timedelta(minutes=15)
