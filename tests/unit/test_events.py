"""Events reach every listener in order, and one listener's bug never hides an event from the others."""

import logging

from mxsync.events import Events, PassEnded, PassStarted, Recorded, SourceChecked
from mxsync.sync import CycleOutcome


class Broken:
    def hear(self, event):
        raise RuntimeError("a listener's bug")


class Recorder:
    def __init__(self):
        self.heard = []

    def hear(self, event):
        self.heard.append(event)


def test_a_failing_listener_is_logged_and_the_others_still_hear(caplog):
    first, last = Recorder(), Recorder()
    events = Events(first, Broken(), last)
    with caplog.at_level(logging.ERROR, logger="mxsync.events"):
        events.emit(PassStarted("12282a", "live"))
    assert first.heard == last.heard == [PassStarted("12282a", "live")]
    assert "Broken failed on PassStarted" in caplog.text and "a listener's bug" in caplog.text


def test_the_cycle_outcome_tallies_what_it_hears():
    outcome = CycleOutcome()
    for event in (
        PassEnded("12282a", "live", "ok"),
        PassEnded("12282b", "final", "ok"),  # verified: synced only once recorded
        Recorded("12282b", "synced and verified"),
        PassEnded("12282c", "final", "no-data", "no folder at the facility yet"),
        PassEnded("12282d", "live", "failed", "rsync exit 12", alert=False),
        PassEnded("12282e", "final", "stopped"),
        SourceChecked("portal", "portal: 500; 500", "portal: 2 request(s) failed"),
        SourceChecked("ssh"),
    ):
        outcome.hear(event)
    assert outcome.live == ["12282a"] and outcome.synced == ["12282b"]
    assert outcome.waiting == {"12282c": "no folder at the facility yet"}
    assert outcome.failed == {"12282d": "rsync exit 12"} and outcome.stopped == ["12282e"]
    assert outcome.problems == ["portal: 2 request(s) failed"] and not outcome.ok


def test_a_dry_run_counts_a_verified_final_pass_as_synced():
    outcome = CycleOutcome(dry_run=True)
    outcome.hear(PassEnded("12282b", "final", "ok"))
    assert outcome.synced == ["12282b"]
