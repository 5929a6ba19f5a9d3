"""The log files keep HPC ASSyncy's line format (time, logger, level, PID), so sites' greps still work."""

import logging
import os
import re
import stat
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mxsync.logsetup import LOG_FORMAT

MXSYNC = [str(Path(os.environ.get("VIRTUAL_ENV", ".venv")) / "bin" / "mxsync")]
NOW = datetime.now(timezone.utc)  # noqa: UP017 (Python 3.9 has no datetime.UTC)
ENDED = {"start": NOW - timedelta(days=3), "end": NOW - timedelta(days=2)}

# HPC ASSyncy's formatter, as its __main__.py and epngroupmap.py set it up.
OLD_TOOL_FORMAT = "%(asctime)s - %(name)s - %(levelname)s:%(process)s: %(message)s"


def old_format_line(pid, label=""):
    """A regex for one line as HPC ASSyncy wrote it, e.g. '2024-04-28 09:00:00,123 - mx_sync.ASSync - INFO:4242: ...'."""
    return re.compile(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
        r" - (?P<logger>[A-Za-z_][\w.]*)"
        r" - (?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL)"
        rf":{pid}: {re.escape(label)}(?P<message>\S.*)"
    )


def test_a_record_is_formatted_exactly_as_the_old_tool_did():
    record = logging.LogRecord("mxsync.sync", logging.WARNING, __file__, 1, "%s: FAILED", ("12282a",), None)
    record.process = 4242

    line = logging.Formatter(LOG_FORMAT).format(record)

    assert line == logging.Formatter(OLD_TOOL_FORMAT).format(record)
    match = old_format_line(4242).fullmatch(line)
    assert match and match["logger"] == "mxsync.sync" and match["level"] == "WARNING"
    assert match["message"] == "12282a: FAILED"


@pytest.mark.parametrize("execute", [False, True], ids=["dry-run", "execute"])
def test_every_line_of_sync_log_has_the_old_format_and_the_real_pid(facility, execute):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    facility.add_experiment("mx", "13000a", equipment_id=23, **ENDED)  # number not mapped: an INFO line
    hostile = {
        "id": 9,
        "epn": "../12282a",
        "principal_scientist": None,
        "data_scientists": [],
    }
    hostile.update(start_time=ENDED["start"].isoformat(), end_time=ENDED["end"].isoformat())
    facility.portal.add_raw_visit(23, hostile)  # a WARNING line
    config = facility.write_config(log_level="DEBUG")
    arguments = ["--config", str(config), "--once"] + (["--execute"] if execute else [])

    process = subprocess.Popen(
        MXSYNC + arguments,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = process.communicate(timeout=180)

    assert process.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    lines = (facility.workdir / "log" / "sync.log").read_text().splitlines()
    pattern = old_format_line(process.pid, label="" if execute else "[dry run] ")
    wrong = [line for line in lines if not pattern.fullmatch(line)]
    assert not wrong, f"{len(wrong)} of {len(lines)} lines not in the old format, e.g.:\n" + "\n".join(wrong[:5])
    matches = [pattern.fullmatch(line) for line in lines]
    assert {match["level"] for match in matches} >= {"DEBUG", "INFO", "WARNING"}
    outcome = "12282a: synced and verified" if execute else "12282a: would sync"
    assert any(match["message"].startswith(outcome) for match in matches)
    if execute:
        assert not any("[dry run]" in line for line in lines)


def test_log_files_are_not_world_readable_and_names_cannot_forge_lines(facility):
    """Issue 19 items 2 and 3: control characters from the portal are escaped; log files are 0640 whatever the umask."""
    forged = "12282a\n2026-01-01 00:00:00,000 - mxsync.sync - INFO:1: 99999z: synced and verified\x1b[2J"
    facility.portal.add_raw_visit(
        23, {"epn": forged, "start_time": ENDED["start"].isoformat(), "end_time": ENDED["end"].isoformat()}
    )
    config = facility.write_config()
    old = os.umask(0o022)
    try:
        subprocess.run([*MXSYNC, "--config", str(config), "--once"], capture_output=True, timeout=120, check=False)
    finally:
        os.umask(old)
    log_file = facility.workdir / "log" / "sync.log"
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o640
    lines = log_file.read_text().splitlines()
    assert not any(line.startswith("2026-01-01") for line in lines)
    assert "\x1b" not in log_file.read_text()


def test_printable_escapes_control_characters_and_indents_continuation_lines():
    from mxsync.logsetup import printable

    text = printable("Eve\r\n2026-01-01 - x - INFO:1: fake\x1b[2J \u2028 Zoë")
    assert text == "Eve\\x0d\n    2026-01-01 - x - INFO:1: fake\\x1b[2J \\u2028 Zoë"
