"""The sync cycle's handling of outcomes, with a fake portal and a fake runner (the real ones are in test_mxsync)."""

import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from mxsync.config import load_config
from mxsync.errors import TransferStopped
from mxsync.history import History
from mxsync.itemize import FileList, TransferResult
from mxsync.logsetup import MASK, masker
from mxsync.portal import Visit
from mxsync.service import Settings
from mxsync.state import IgnoreFile
from mxsync.sync import SyncCycle

NOW = datetime.now(timezone.utc)


def write_config(tmp_path, **extra):
    data = {
        "epn_cap_map": {"12282": "ny79"},
        "ignore": "state/ignore.yml",
        "state-dir": "state",
        "equipment": [
            {
                "id": 23,
                "username": "u",
                "password": "portal-secret-1",
                "client_name": "c",
                "client_password": "cp-secret",
            }
        ],
        "base-url": "https://portal.example.org",
        "beamline": "mx",
        "host": "sftp.example.org",
        "epnalert-email-to": "to@example.org",
        "epnalert-email-from": "from@example.org",
        "epnalert-email-smtp": "localhost",
        "destination-root-path": str(tmp_path / "dest"),
        "log-level": "INFO",
        **extra,
    }
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "dest").mkdir(exist_ok=True)
    return path


class FakePortal:
    def __init__(self, epns):
        self.visits_ = [
            Visit(epn, NOW - timedelta(days=3), NOW - timedelta(days=2), 23, "mx", None, ()) for epn in epns
        ]

    def visits(self, equipment, start, end):
        return [v for v in self.visits_ if v.start < end and v.end > start], []


class FakeRunner:
    """Copies nothing; makes each EPN's transfer do what `behaviour[epn]` says."""

    def __init__(self, behaviour):
        self.behaviour = behaviour

    def connect(self):
        return None

    def close(self):
        pass

    def probe_source(self, epn, source):
        return "present"

    def transfer(self, epn, source, destination, progress=None, dry_run=None):
        action = self.behaviour.get(epn)
        if isinstance(action, BaseException):
            raise action
        if isinstance(destination, int):  # the open data folder (mxsync.destination.writable_destination)
            destination = Path(f"/proc/self/fd/{destination}")
        (destination / "frame.cbf").write_bytes(b"x")
        return TransferResult(epn, files=FileList([("frame.cbf", 1)]), files_transferred=0)


def run_cycle(tmp_path, behaviour, epns=("12282a", "12282b", "12282c")):
    config = load_config(write_config(tmp_path), check_files=False)
    history = History(config.state_dir)
    cycle = SyncCycle(
        config,
        FakePortal(epns),
        FakeRunner(behaviour),
        IgnoreFile(config.ignore_file),
        history,
        execute=True,
        stop=threading.Event(),
    )
    return cycle.run(), history


def test_an_unexpected_exception_fails_that_epn_only(tmp_path, caplog):
    outcome, history = run_cycle(tmp_path, {"12282b": ZeroDivisionError("bug")})
    assert sorted(outcome.synced) == ["12282a", "12282c"]
    assert list(outcome.failed) == ["12282b"] and "unexpected error" in outcome.failed["12282b"]
    assert "Traceback" in caplog.text and "ZeroDivisionError" in caplog.text
    assert history.failing_epns()["12282b"]["failures"] == 1


def test_a_stopped_transfer_is_not_a_failure(tmp_path):
    outcome, history = run_cycle(tmp_path, {"12282a": TransferStopped("stopped")}, epns=("12282a",))
    assert outcome.stopped == ["12282a"] and not outcome.failed
    assert "12282a" not in history.failing_epns()
    outcome = history.last_pass("12282a").outcome  # a string, or mxsync.lifecycle.Outcome
    assert getattr(outcome, "value", outcome) == "stopped" and history.failures("12282a") == 0


def test_reload_registers_the_new_secrets_and_refuses_a_new_state_dir(tmp_path):
    path = write_config(tmp_path)
    settings = Settings(load_config(path, check_files=False), execute=True, verbose=False)
    text = path.read_text().replace("portal-secret-1", "portal-secret-2")
    path.write_text(text)
    settings.reload()
    assert masker.mask("token portal-secret-2") == f"token {MASK}"

    path.write_text(text.replace("state-dir: state", "state-dir: elsewhere"))
    settings.reload()
    assert settings.config.state_dir.name == "state"
    assert "state-dir changed; restart mxsync" in settings.pop_problem()


@pytest.fixture(autouse=True)
def _no_file_logging():
    yield
    import logging

    for handler in list(logging.getLogger().handlers):
        logging.getLogger().removeHandler(handler)
