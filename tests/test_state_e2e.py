"""State files through the real console script on the simulated facility: damaged history, hand comments, modes."""

import json
import os
import stat
import subprocess

import pytest
import yaml

from tests.test_mxsync import ENDED, MXSYNC, ignore_path, mxsync, recorded, sync_log

STATE_FILES = ("ignore.yml", "ignore.yml.lock", "mxsync-state.json", "mxsync.lock")


def _state_dir(config):
    return ignore_path(config).parent


def _snapshot(directory):
    return {path.name: path.read_bytes() for path in directory.iterdir() if path.is_file()}


def test_damaged_history_is_moved_aside_and_the_run_goes_on(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config()
    state = _state_dir(config)
    state.mkdir(parents=True, exist_ok=True)
    history = state / "mxsync-state.json"
    damaged = b'{"epns": {"12282a": {"failures": 2, "alerted"'  # cut off by a full disk
    history.write_bytes(damaged)

    result = mxsync("--config", config, "--execute", "--once", check=0)

    assert recorded(config) == {"12282a"}
    (aside,) = state.glob("mxsync-state.json.corrupt-*")
    assert aside.read_bytes() == damaged
    # The fresh history is in use.
    assert isinstance(json.loads(history.read_text())["last_cycle"], dict)
    warnings = [line for line in sync_log(facility).splitlines() if "moved it to" in line]
    assert len(warnings) == 1 and str(history) in warnings[0] and str(aside) in warnings[0] and "WARNING" in warnings[0]
    assert result.stderr.count("moved it to") == 1 and "Traceback" not in result.stderr


def test_history_with_an_unusable_section_is_moved_aside(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config()
    state = _state_dir(config)
    state.mkdir(parents=True, exist_ok=True)
    (state / "mxsync-state.json").write_text('{"epns": {"12282a": {"failures": "many"}}}')

    mxsync("--config", config, "--execute", "--once", check=0)

    assert recorded(config) == {"12282a"}
    (aside,) = state.glob("mxsync-state.json.corrupt-*")
    assert aside.read_text() == '{"epns": {"12282a": {"failures": "many"}}}'


@pytest.mark.parametrize("command", [["status"], ["--once"]], ids=["status", "dry run"])
def test_read_only_views_report_a_damaged_history_and_move_nothing(facility, command):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config()
    state = _state_dir(config)
    state.mkdir(parents=True, exist_ok=True)
    (state / "mxsync-state.json").write_text("{trunc")
    before = _snapshot(state)

    result = mxsync(*command, "--config", config, check=0)

    assert _snapshot(state) == before and "Traceback" not in result.stderr
    # status prints it among its notes; a dry run logs it.
    said = result.stdout if command == ["status"] else result.stderr
    problem = f"{state / 'mxsync-state.json'}: the mxsync failure history is corrupt"
    assert said.count(problem) == 1


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
