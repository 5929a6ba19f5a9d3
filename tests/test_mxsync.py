"""mxsync end to end: the console script against the simulated facility (real sshd, rsync, portal, SMTP)."""

import json
import os
import signal
import socket
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from tests.facility.tree import tree_manifest, wanted
from tests.faults import failure_entries

MXSYNC = [str(Path(os.environ.get("VIRTUAL_ENV", ".venv")) / "bin" / "mxsync")]
NOW = datetime.now(timezone.utc)
ENDED = dict(start=NOW - timedelta(days=3), end=NOW - timedelta(days=2))


def mxsync(*arguments, check=None, timeout=120, env=None):
    """Run the mxsync console script; return the CompletedProcess."""
    result = subprocess.run(
        MXSYNC + [str(argument) for argument in arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    if check is not None:
        assert result.returncode == check, (
            f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def recorded(config_path):
    ignore = Path(yaml.safe_load(Path(config_path).read_text())["ignore"])
    if not ignore.exists():
        return set()
    return set((yaml.safe_load(ignore.read_text()) or {}).get("previouslySynched") or [])


def ignore_path(config_path):
    return Path(yaml.safe_load(Path(config_path).read_text())["ignore"])


def synced_manifest(facility, project, epn):
    return tree_manifest(facility.destination / project / epn / "data")


def source_manifest(facility, epn, beamline="mx"):
    return tree_manifest(facility.root / "data" / beamline / epn, include=wanted)


def sync_log(facility):
    return (facility.workdir / "log" / "sync.log").read_text()


def test_full_pass_transfers_verifies_and_records(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    facility.add_experiment("mx", "12282b", equipment_id=23, **ENDED)
    facility.add_experiment("mx", "13000a", equipment_id=23, **ENDED)  # number not mapped
    config = facility.write_config(epn_cap_map={"12282": "ny79"})

    mxsync("--config", config, "--execute", "--once", check=0)

    for epn in ("12282a", "12282b"):
        assert synced_manifest(facility, "ny79", epn) == source_manifest(facility, epn)
        data = facility.destination / "ny79" / epn / "data"
        assert (data / ".info").is_file()
        assert not list(data.rglob(".hidden*")) and not list(data.rglob(".lock"))
    assert recorded(config) == {"12282a", "12282b"}
    assert not (facility.destination / "13000a").exists() and not list(facility.destination.glob("*/13000a"))
    log = sync_log(facility)
    assert "13000a: its number is not in epn_cap_map" in log
    assert "12282a: synced and verified" in log


def test_dry_run_records_nothing_and_says_so(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config()

    result = mxsync("--config", config, "--once", "-v", check=0)

    assert recorded(config) == set()
    assert not ignore_path(config).exists()
    assert list(facility.destination.iterdir()) == []
    assert "12282a: would sync" in result.stderr
    lines = [line for line in sync_log(facility).splitlines() if line.strip()]
    assert lines and all("[dry run]" in line for line in lines)
    assert not (ignore_path(config).parent / "mxsync.db").exists()  # the state store is read into memory only


def test_rerun_transfers_nothing(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config()
    mxsync("--config", config, "--execute", "--once", check=0)
    before = synced_manifest(facility, "ny79", "12282a")

    mxsync("--config", config, "--execute", "--once", check=0)
    assert "0 to follow (0 with a visit not ended), 1 already synced" in sync_log(facility)

    # Forced re-sync by hand (EPN removed from ignore.yml): rsync finds nothing left to send.
    ignore_path(config).write_text("previouslySynched: []\n")
    mxsync("--config", config, "--execute", "--once", check=0)
    assert "12282a: synced and verified, recorded in ignore.yml:" in sync_log(facility)
    assert ", 0 transferred, 0 B in" in sync_log(facility).splitlines()[-3] + sync_log(facility)
    assert synced_manifest(facility, "ny79", "12282a") == before
    assert recorded(config) == {"12282a"}


def test_visit_in_progress_is_copied_live_and_not_recorded(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    facility.add_experiment(
        "mx", "12282b", equipment_id=23, start=NOW - timedelta(hours=2), end=NOW + timedelta(hours=6)
    )
    config = facility.write_config()

    mxsync("--config", config, "--execute", "--once", check=0)

    # Issue 11 (b): a running visit's data is home before the visit ends, and its EPN is not recorded.
    assert recorded(config) == {"12282a"}
    assert synced_manifest(facility, "ny79", "12282b") == source_manifest(facility, "12282b")
    assert "12282b: live pass done, nothing recorded" in sync_log(facility)


def test_without_live_mode_a_visit_in_progress_is_not_touched(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    facility.add_experiment(
        "mx", "12282b", equipment_id=23, start=NOW - timedelta(hours=2), end=NOW + timedelta(hours=6)
    )
    config = facility.write_config(live_interval_minutes=0)

    mxsync("--config", config, "--execute", "--once", check=0)

    assert recorded(config) == {"12282a"}
    assert not (facility.destination / "ny79" / "12282b").exists()


def test_failing_epn_is_not_recorded_while_others_are(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    broken = facility.add_experiment("mx", "12282b", equipment_id=23, **ENDED)
    # A directory at the destination where the source has a file: rsync cannot place it (exit 23), even as root.
    frame = next(
        path for path in sorted((broken / "frames").iterdir()) if path.is_file() and not path.name.startswith(".")
    )
    blocker = facility.destination / "ny79" / "12282b" / "data" / "frames" / frame.name
    (blocker / "keep").mkdir(parents=True)
    facility.add_experiment("mx", "12282c", equipment_id=23, **ENDED)
    config = facility.write_config(max_tasks=2)

    result = mxsync("--config", config, "--execute", "--once")

    assert result.returncode == 1
    assert recorded(config) == {"12282a", "12282c"}
    assert "12282b: FAILED: rsync exit 23" in sync_log(facility)
    assert failure_entries(config)["epns 12282b"]["failures"] == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file; the destination-conflict test covers root")
def test_unreadable_source_file_is_not_recorded(facility):
    broken = facility.add_experiment("mx", "12282b", equipment_id=23, **ENDED)
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    unreadable = next((broken / "frames").glob("*.cbf"))
    unreadable.chmod(0)
    config = facility.write_config()
    try:
        assert mxsync("--config", config, "--execute", "--once").returncode == 1
    finally:
        unreadable.chmod(0o644)
    assert recorded(config) == {"12282a"}


def test_missing_or_empty_source_folder_is_waiting_for_data_not_a_failure(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    recently = dict(start=NOW - timedelta(hours=8), end=NOW - timedelta(hours=2))
    facility.portal.add_visit(23, "12282z", **recently)  # booked, but no data on the facility
    facility.portal.add_visit(23, "12282y", **recently)
    (facility.root / "data" / "mx" / "12282y" / "frames").mkdir(parents=True)  # a folder, but nothing in it yet
    config = facility.write_config()

    dry = mxsync("--config", config, "--once", "-v", check=0)
    assert "12282z: waiting for data: no folder at the facility yet" in dry.stderr
    assert "12282y: waiting for data: its folder at the facility is empty" in dry.stderr
    assert "12282y: would sync" not in dry.stderr and "12282z: would sync" not in dry.stderr

    result = mxsync("--config", config, "--execute", "--once", check=0)  # waiting is not a failure
    assert recorded(config) == {"12282a"}
    log = sync_log(facility)
    assert "FAILED" not in log and "ERROR" not in log
    assert "12282z: waiting for data: no folder at the facility yet" in log
    # No empty folders at the destination for EPNs without data.
    assert not (facility.destination / "ny79" / "12282z").exists()
    assert not (facility.destination / "ny79" / "12282y").exists()
    status = mxsync("status", "--config", config, check=0).stdout
    assert any(line.startswith("12282z") and "waiting" in line for line in status.splitlines()), status
    assert "12282z" not in result.stderr  # nothing for cron to mail


def test_data_that_never_appeared_long_after_the_visit_alerts_staff(facility):
    long_ago = dict(start=NOW - timedelta(days=9), end=NOW - timedelta(days=8))
    facility.portal.add_visit(23, "12282z", **long_ago)
    config = facility.write_config(failure_alert_cycles=1, waiting_for_data_alert_hours=48)

    mxsync("--config", config, "--execute", "--once")

    assert "12282z: waiting for data: no folder at the facility yet, although its visit ended" in sync_log(facility)
    (received,) = facility.smtp.messages
    assert "12282z" in received.message["Subject"]


def test_sigterm_mid_transfer_records_nothing_and_next_pass_completes(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, frames=4, frame_size=1024 * 1024, **ENDED)
    config = facility.write_config(rsync_bwlimit="256")  # about 16 s for the frames
    log_file = facility.workdir / "log" / "sync.log"

    process = subprocess.Popen(
        MXSYNC + ["--config", str(config), "--execute", "--once"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _wait_for(lambda: log_file.exists() and "12282a: started" in log_file.read_text(), process)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=30)

    assert process.returncode == 1
    assert recorded(config) == set()
    assert "12282a: stopped before it finished; nothing recorded" in log_file.read_text()
    assert not _rsync_processes_for(facility)

    config = facility.write_config()
    mxsync("--config", config, "--execute", "--once", check=0)
    assert recorded(config) == {"12282a"}
    assert synced_manifest(facility, "ny79", "12282a") == source_manifest(facility, "12282a")


def test_hand_edit_during_a_pass_survives(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    facility.add_experiment("mx", "12282b", equipment_id=23, frames=2, frame_size=1024 * 1024, **ENDED)
    config = facility.write_config(rsync_bwlimit="512", max_tasks=1)
    log_file = facility.workdir / "log" / "sync.log"

    process = subprocess.Popen(
        MXSYNC + ["--config", str(config), "--execute", "--once"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _wait_for(lambda: log_file.exists() and "12282b: started" in log_file.read_text(), process)
    # Staff add an EPN by hand (and drop none) while mxsync is in the middle of a pass.
    current = recorded(config)
    ignore_path(config).write_text(yaml.safe_dump({"previouslySynched": sorted(current | {"55555a"})}))
    process.communicate(timeout=120)

    assert process.returncode == 0
    assert recorded(config) == {"12282a", "12282b", "55555a"}


def test_corrupt_ignore_file_is_left_as_it_was(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config()
    ignore = ignore_path(config)
    ignore.parent.mkdir(parents=True, exist_ok=True)
    ignore.write_bytes(b"previouslySynched: [12282a\n  oops: {\n")
    before = ignore.read_bytes()

    result = mxsync("--config", config, "--execute", "--once")

    assert result.returncode == 1
    assert f"{ignore}: not valid YAML at line 2" in result.stderr and "Traceback" not in result.stderr
    assert ignore.read_bytes() == before
    assert list(facility.destination.iterdir()) == []


def test_missing_destination_root_starts_no_rsync_and_alerts(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config(destination_root_path=str(facility.workdir / "not-mounted"))

    result = mxsync("--config", config, "--execute", "--once")

    assert result.returncode == 1
    assert not (facility.workdir / "not-mounted").exists()
    log = sync_log(facility)
    assert "does not exist or is not a directory" in log and "running rsync" not in log.lower()
    assert "12282a: started" not in log
    facility.smtp.wait_for(1)
    (message,) = facility.smtp.messages
    assert "destination" in message.message["Subject"]


def test_hostile_names_from_the_portal_write_nothing_outside_the_root(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    for hostile in [
        "../../12282a",
        "12282a/../../x",
        "-e touch pwned",
        "12282a; touch pwned",
        "１２２８２a",
        "12282a\n",
        "1" * 300 + "a",
    ]:
        facility.portal.add_raw_visit(
            23,
            {
                "id": 9,
                "epn": hostile,
                "start_time": ENDED["start"].isoformat(),
                "end_time": ENDED["end"].isoformat(),
                "principal_scientist": None,
                "data_scientists": [],
            },
        )
    config = facility.write_config()
    outside_before = _snapshot_outside(facility)

    mxsync("--config", config, "--execute", "--once", check=0)

    assert recorded(config) == {"12282a"}
    assert _snapshot_outside(facility) == outside_before
    assert sorted(path.name for path in facility.destination.iterdir()) == ["ny79"]
    assert sync_log(facility).count("Suspicious record from portal equipment 23") == 7
    assert not list(Path.cwd().glob("pwned")) and not list(facility.workdir.rglob("pwned"))


def test_unknown_host_key_is_refused(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    facility.sshd.regenerate_host_key()  # known_hosts still holds the old key
    config = facility.write_config()

    result = mxsync("--config", config, "--execute", "--once")

    assert result.returncode == 1
    assert recorded(config) == set()
    assert "Host key verification failed" in sync_log(facility) or "REMOTE HOST IDENTIFICATION HAS CHANGED" in sync_log(
        facility
    )
    assert list(facility.destination.iterdir()) == []


def test_second_instance_refuses_while_the_first_holds_the_lock(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, frames=2, frame_size=1024 * 1024, **ENDED)
    config = facility.write_config(rsync_bwlimit="256")
    log_file = facility.workdir / "log" / "sync.log"
    first = subprocess.Popen(
        MXSYNC + ["--config", str(config), "--execute", "--once"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _wait_for(lambda: log_file.exists() and "12282a: started" in log_file.read_text(), first)
        second = mxsync("--config", config, "--execute", "--once")
        assert second.returncode == 1
        assert f"another mxsync is already running (pid {first.pid} on" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)


def test_failure_alert_after_n_cycles_and_status(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    facility.portal.add_visit(23, "12282z", **ENDED)  # never has data
    config = facility.write_config(failure_alert_cycles=2)

    mxsync("--config", config, "--execute", "--once")
    assert facility.smtp.messages == []
    mxsync("--config", config, "--execute", "--once")
    facility.smtp.wait_for(1)
    mxsync("--config", config, "--execute", "--once")  # alerted once, not every cycle
    time.sleep(0.5)
    (message,) = facility.smtp.messages
    assert "12282z" in message.message["Subject"]
    assert "failed in 2 consecutive cycle(s)" in message.message.get_content()

    status = json.loads(mxsync("status", "--config", config, "--json", check=0).stdout)
    states = {row["epn"]: row for row in status["epns"]}
    assert states["12282a"]["state"] == "synced"
    assert states["12282z"]["state"] == "failed" and states["12282z"]["failures"] == 3
    table = mxsync("status", "--config", config, check=0).stdout
    assert "12282z" in table and "failed" in table


def test_unreachable_host_counts_against_the_host_not_the_epns(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config(failure_alert_cycles=1, ssh_connect_timeout=3)
    facility.sshd.stop()

    assert mxsync("--config", config, "--execute", "--once").returncode == 1

    assert list(failure_entries(config)) == ["sources ssh"] and failure_entries(config)["sources ssh"]["failures"] == 1
    facility.smtp.wait_for(1)
    assert "ssh" in facility.smtp.messages[0].message["Subject"]


def test_systemd_notify_ready_and_status(facility, tmp_path):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config()
    # An abstract socket, as systemd may give: no path, so a long TMPDIR cannot make it too long.
    address = f"@mxsync-test-notify-{os.getpid()}-{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + address[1:])
        listener.settimeout(30)
        mxsync("--config", config, "--execute", "--once", env={**os.environ, "NOTIFY_SOCKET": address}, check=0)
        messages = []
        listener.settimeout(0.5)
        try:
            while True:
                messages.append(listener.recv(4096).decode())
        except socket.timeout:
            pass
    assert messages[0].startswith("READY=1")
    assert messages[-1].startswith("STOPPING=1")


def test_check_connect_reports_each_item(facility):
    config = facility.write_config()
    result = mxsync("check", "--config", config, "--connect", check=0)
    lines = result.stdout.splitlines()
    assert all(line.startswith("ok ") for line in lines), result.stdout
    assert any("SSH login and SFTP listing" in line for line in lines)
    assert any("portal token for equipment 23" in line for line in lines)
    assert any(line.startswith("ok      SMTP") for line in lines)

    facility.sshd.stop()
    broken = mxsync("check", "--config", config, "--connect")
    assert broken.returncode == 1
    assert any(line.startswith("FAILED  SSH login") for line in broken.stdout.splitlines())


def test_no_secret_in_any_output(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config()
    outputs = [
        mxsync("--config", config, "--execute", "--once", "-v"),
        mxsync("--config", config, "--once", "-v"),
        mxsync("check", "--config", config, "--connect"),
    ]
    texts = [result.stdout + result.stderr for result in outputs] + [sync_log(facility)]
    tokens = facility.portal.issued_tokens if hasattr(facility.portal, "issued_tokens") else []
    for secret in list(facility.secrets) + list(tokens):
        assert not any(secret in text for text in texts), f"secret {secret[:4]}... leaked"


def _wait_for(condition, process, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def _rsync_processes_for(facility):
    from tests.faults import rsync_processes  # rsync is given the open data folder, not its path: see there

    return rsync_processes(facility.destination)


def _snapshot_outside(facility):
    """Every path under the facility's work dir except the destination and the tool's own state and logs."""
    skip = (facility.destination, facility.workdir / "log", facility.workdir / "state")
    return sorted(
        str(path)
        for path in facility.workdir.rglob("*")
        if not any(path == root or root in path.parents for root in skip) and "sshd" not in path.name
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root can create folders anywhere")
def test_project_folder_that_cannot_be_created_fails_only_that_epn(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    facility.add_experiment("mx", "12283a", equipment_id=23, **ENDED)
    locked = facility.destination / "ab12"
    locked.mkdir()
    locked.chmod(0o500)
    config = facility.write_config(epn_cap_map={"12282": "ny79", "12283": "ab12"})
    try:
        result = mxsync("--config", config, "--execute", "--once")
    finally:
        locked.chmod(0o700)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert recorded(config) == {"12282a"}
    assert "12283a: FAILED: cannot prepare" in sync_log(facility)
