"""What a new user broke in one afternoon (issue 10), end to end: real sshd, rsync, signals, SMTP."""

import contextlib
import os
import signal
import stat
import subprocess
import time

from tests.test_mxsync import (
    ENDED,
    MXSYNC,
    _rsync_processes_for,
    _wait_for,
    ignore_path,
    mxsync,
    recorded,
    source_manifest,
    sync_log,
    synced_manifest,
)

LONG_TMPDIR_NAME = "some/quite/long/path/like/a/slurm/job/scratch/dir/that/goes/on/and/on/xyz"


def _long_tmpdir(tmp_path):
    directory = tmp_path / LONG_TMPDIR_NAME
    directory.mkdir(parents=True)
    assert len(str(directory)) >= 80
    return directory


def _logins(facility):
    return facility.sshd.log_file.read_text(errors="replace").count("Accepted publickey")


def _slow_experiment(facility, epn="12282a"):
    facility.add_experiment("mx", epn, equipment_id=23, frames=4, frame_size=1024 * 1024, **ENDED)


def _start(config, *extra, env=None, new_session=False):
    return subprocess.Popen(
        MXSYNC + ["--config", str(config), "--execute", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=new_session,
        text=True,
    )


def _children_gone(facility, timeout=10):
    deadline = time.monotonic() + timeout
    while _rsync_processes_for(facility) or _ssh_masters():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _ssh_masters():
    found = subprocess.run(["pgrep", "-f", "ssh .*ControlMaster=yes"], capture_output=True, text=True)
    return found.stdout.split()


# ---------------------------------------------------------------- shared connection (items 2, 16)


def test_long_tmpdir_still_shares_one_connection_and_syncs(facility, tmp_path):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    facility.add_experiment("mx", "12282b", equipment_id=23, **ENDED)
    config = facility.write_config()
    env = dict(os.environ, TMPDIR=str(_long_tmpdir(tmp_path)))

    check = mxsync("check", "--connect", "--config", config, env=env, check=0)
    assert "ok      shared ssh connection" in check.stdout, check.stdout
    logins_before = _logins(facility)
    mxsync("--config", config, "--execute", "--once", env=env, check=0)

    assert recorded(config) == {"12282a", "12282b"}
    log = sync_log(facility)
    assert "too long for Unix domain socket" not in log and "could not start" not in log
    assert _logins(facility) - logins_before == 1  # one master for both EPNs


def test_shared_connection_dying_mid_cycle_never_stops_data(facility):
    _slow_experiment(facility)
    facility.add_experiment("mx", "12282b", equipment_id=23, **ENDED)
    config = facility.write_config(rsync_bwlimit="1024", max_tasks=1)
    log_file = facility.workdir / "log" / "sync.log"
    process = _start(config, "--once")
    _wait_for(lambda: log_file.exists() and "12282a: started" in log_file.read_text(), process)
    time.sleep(0.5)
    subprocess.run(["pkill", "-f", "ssh .*ControlMaster=yes"], check=True)

    _out, err = process.communicate(timeout=120)

    assert process.returncode == 0, err
    assert recorded(config) == {"12282a", "12282b"}
    log = log_file.read_text()
    warnings = [line for line in log.splitlines() if "WARNING" in line and "shared ssh connection" in line]
    assert len(warnings) == 1, warnings  # one warning, not one per EPN
    assert "FAILED" not in log


def test_socket_folder_is_short_whatever_tmpdir(tmp_path, monkeypatch):
    from mxsync.connection import SOCKET_PATH_LIMIT, short_directory

    monkeypatch.setenv("TMPDIR", str(_long_tmpdir(tmp_path)))
    monkeypatch.setattr("tempfile.tempdir", None)
    directory = short_directory()
    try:
        assert len(directory) + len("/99") <= SOCKET_PATH_LIMIT
    finally:
        os.rmdir(directory)


def test_more_tasks_than_the_server_allows_sessions(facility):
    assert facility.sshd.max_sessions == 10  # sshd's default, as in production
    epns = [f"12282{letter}" for letter in "abcdefghijklmnop"]
    for epn in epns:
        facility.add_experiment("mx", epn, equipment_id=23, frames=1, frame_size=1024, small_files=1, **ENDED)
    config = facility.write_config(max_tasks=16)
    logins_before = _logins(facility)

    mxsync("--config", config, "--execute", "--once", check=0)

    assert recorded(config) == set(epns)
    assert "Session open refused" not in sync_log(facility)
    assert _logins(facility) - logins_before == 2  # two masters of 8 sessions each


# ---------------------------------------------------------------- signals (items 3, 4)


def test_ctrl_c_to_the_process_group_is_a_stop_not_a_failure(facility):
    _slow_experiment(facility)
    config = facility.write_config(rsync_bwlimit="256", failure_alert_cycles=1)
    log_file = facility.workdir / "log" / "sync.log"

    for attempt in range(2):  # twice: an alert after one "failure" would show
        process = _start(config, "--once", new_session=True)
        _wait_for(
            lambda attempt=attempt: log_file.exists() and log_file.read_text().count("12282a: started") > attempt,
            process,
        )
        time.sleep(1.0)
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _out, err = process.communicate(timeout=30)
        assert "Traceback" not in err

    log = log_file.read_text()
    assert "12282a: stopped before it finished; nothing recorded" in log
    assert "FAILED" not in log and "rsync exit" not in log
    assert recorded(config) == set()
    assert facility.smtp.messages == []
    assert _children_gone(facility)
    status = mxsync("status", "--config", config, check=0).stdout
    assert "failure" not in status


def test_timeout_command_stops_cleanly(facility):
    _slow_experiment(facility)
    config = facility.write_config(rsync_bwlimit="256")
    result = subprocess.run(
        ["timeout", "-s", "INT", "4", *MXSYNC, "--config", str(config), "--execute", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 124  # timeout's own code for "I stopped it"
    log = sync_log(facility)
    assert "stopped before it finished" in log and "FAILED" not in log
    assert _children_gone(facility)


def test_sighup_reloads_the_config_and_keeps_running(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config(log_level="INFO", sync_frequency_hours=24)
    log_file = facility.workdir / "log" / "sync.log"
    process = _start(config)
    try:
        _wait_for(lambda: log_file.exists() and "Cycle finished" in log_file.read_text(), process)
        assert "DEBUG:" not in log_file.read_text()
        facility.write_config(log_level="DEBUG", sync_frequency_hours=24)
        process.send_signal(signal.SIGHUP)
        _wait_for(lambda: "Configuration reloaded" in log_file.read_text(), process)
        assert process.poll() is None

        # A key that needs a restart is refused, naming it; the service goes on with the old settings.
        facility.write_config(state_dir=str(facility.workdir / "elsewhere"), sync_frequency_hours=24)
        process.send_signal(signal.SIGHUP)
        _wait_for(lambda: "state-dir changed; restart mxsync" in log_file.read_text(), process)
        assert process.poll() is None

        # A log file that cannot be opened is refused at reload; the service goes on logging where it did.
        blocker = facility.workdir / "a-file"
        blocker.write_text("")
        facility.write_config(
            log_level="DEBUG",
            sync_frequency_hours=24,
            log_files={"sync": str(blocker / "sync.log"), "epnalert": None, "email": None},
        )
        process.send_signal(signal.SIGHUP)
        _wait_for(lambda: "cannot open" in log_file.read_text(), process)
        assert process.poll() is None

        # A shorter sync-frequency-hours moves the next cycle, which is otherwise 24 h away.
        facility.write_config(log_level="DEBUG", sync_frequency_hours=0.001)
        process.send_signal(signal.SIGHUP)
        _wait_for(lambda: log_file.read_text().count("Cycle finished") >= 2, process)
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert process.returncode == 0
    assert "Received SIGHUP: reloading the configuration" in log_file.read_text()
    assert "mxsync stopped: SIGTERM received" in log_file.read_text()


def test_a_burst_of_signals_never_hangs_the_service(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config(sync_frequency_hours=24)
    log_file = facility.workdir / "log" / "sync.log"
    process = _start(config)
    try:
        _wait_for(lambda: log_file.exists() and "Cycle finished" in log_file.read_text(), process)
        for _ in range(200):
            process.send_signal(signal.SIGHUP)
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0 and "Traceback" not in err
    assert "mxsync stopped: SIGTERM received" in log_file.read_text()


def test_stop_signals_during_shutdown_never_kill_mxsync(facility):
    """systemd's second SIGTERM, a second Ctrl-C: however late in the shutdown they come, the exit stays 0."""
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config(sync_frequency_hours=24)
    log_file = facility.workdir / "log" / "sync.log"
    process = _start(config)
    try:
        _wait_for(lambda: log_file.exists() and "Cycle finished" in log_file.read_text(), process)
        while process.poll() is None:  # until it has exited, through the interpreter's own shutdown
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            time.sleep(0.0005)
        _out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "mxsync stopped: SIGTERM received" in log_file.read_text()


def test_kill_9_takes_rsync_and_ssh_with_it(facility):
    _slow_experiment(facility)
    config = facility.write_config(rsync_bwlimit="256")
    log_file = facility.workdir / "log" / "sync.log"
    process = _start(config, "--once")
    _wait_for(lambda: log_file.exists() and "12282a: started" in log_file.read_text(), process)
    time.sleep(1.0)
    assert _rsync_processes_for(facility)

    process.kill()
    process.communicate(timeout=30)

    assert _children_gone(facility), "rsync or the ssh master outlived mxsync"
    # The next run does not race a leftover rsync: it completes the EPN.
    mxsync("--config", facility.write_config(), "--execute", "--once", check=0)
    assert synced_manifest(facility, "ny79", "12282a") == source_manifest(facility, "12282a")


# ---------------------------------------------------------------- ignore.yml hand edits (item 7)


def test_typo_in_ignore_yml_keeps_the_service_up_alerts_once_and_resumes(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    facility.add_experiment("mx", "12282b", equipment_id=23, **ENDED)
    config = facility.write_config(sync_frequency_hours=24)
    ignore = ignore_path(config)
    ignore.write_text("previouslySynched: [12282a, 12282b\n")  # the typo from the issue
    typo = ignore.read_bytes()
    process = _start(config)
    try:
        (alert,) = facility.smtp.wait_for(1, timeout=60)
        assert "record" in alert.message["Subject"]
        time.sleep(1.5)
        assert process.poll() is None and ignore.read_bytes() == typo  # still up, file untouched
        assert not (facility.destination / "ny79").exists()  # nothing moved while the record was unreadable
        ignore.write_text("previouslySynched: [12282a]\n")  # staff fix it
        _wait_for(lambda: recorded(config) == {"12282a", "12282b"}, process)
        assert len(facility.smtp.messages) == 1  # told once
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert process.returncode == 0
    assert "not valid YAML" in sync_log(facility)


# ---------------------------------------------------------------- status, pipes, messages (items 10, 11, 13)


def test_status_when_the_portal_is_down_shows_what_is_known(facility):
    _slow_experiment(facility)
    config = facility.write_config(rsync_bwlimit="256")
    log_file = facility.workdir / "log" / "sync.log"
    process = _start(config, "--once")
    try:
        _wait_for(lambda: log_file.exists() and "12282a: started" in log_file.read_text(), process)
        time.sleep(2.5)  # the activity file is written every second
        facility.portal.add_fault("http500", count=100)
        result = mxsync("status", "--config", config, check=1)
    finally:
        process.terminate()
        process.communicate(timeout=30)
    lines = result.stdout.splitlines()
    assert any(line.startswith("12282a") and "running" in line and "files" in line for line in lines), result.stdout
    (error,) = result.stderr.splitlines()
    assert error.startswith("mxsync: error: ") and "the portal could not be asked" in error
    assert any("holds the lock: pid" in line for line in lines)


def test_output_into_head_exits_quietly(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config()
    for arguments in (["status"], ["check", "--connect"]):
        pipeline = subprocess.run(
            f"{MXSYNC[0]} {arguments[0]} --config {config} {' '.join(arguments[1:])} | head -1",
            shell=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "Traceback" not in pipeline.stderr and "BrokenPipe" not in pipeline.stderr, pipeline.stderr


def test_version_and_ssh_messages_name_the_right_cause(facility):
    assert mxsync("--version", check=0).stdout.startswith("mxsync ")
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config()
    facility.sshd.stop()
    mxsync("--config", config, "--execute", "--once")
    log = sync_log(facility)
    assert "ssh exit 255" in log and "rsync exit 255" not in log
    assert "12282a: FAILED: 12282a" not in log


def test_a_missing_source_path_is_the_facilitys_problem_not_waiting_for_data(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config(source_path=f"{facility.root}/data/unmounted/{{beamline}}")
    result = mxsync("--config", config, "--execute", "--once")
    assert result.returncode == 1
    log = sync_log(facility)
    assert "12282a: FAILED" in log and "which should hold the EPN folders" in log and "waiting for data" not in log


def test_an_empty_destination_folder_left_by_an_older_version_still_waits_for_data(facility):
    recently = dict(start=ENDED["start"] + (ENDED["end"] - ENDED["start"]) * 0, end=ENDED["end"])
    facility.portal.add_visit(23, "12282z", **recently)
    (facility.destination / "ny79" / "12282z" / "data").mkdir(parents=True)
    config = facility.write_config(waiting_for_data_alert_hours=24 * 7)
    mxsync("--config", config, "--execute", "--once", check=0)
    assert "12282z: waiting for data: no folder at the facility yet" in sync_log(facility)


# ---------------------------------------------------------------- folders and symlinks (items 18, 20)


def test_folders_mxsync_creates_follow_rsyncs_rules_whatever_the_umask(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config()
    old = os.umask(0o027)
    try:
        subprocess.run(MXSYNC + ["--config", str(config), "--execute", "--once"], check=True, capture_output=True)
    finally:
        os.umask(old)
    epn_folder = facility.destination / "ny79" / "12282a"
    data_mode = stat.S_IMODE((epn_folder / "data" / "frames").stat().st_mode)  # made by rsync's --chmod
    for folder in (facility.destination / "ny79", epn_folder):
        assert stat.S_IMODE(folder.stat().st_mode) == data_mode, oct(folder.stat().st_mode)
    assert data_mode & stat.S_IWGRP and data_mode & stat.S_ISGID


def test_symlinks_are_copied_and_those_leaving_the_epn_refused(facility):
    experiment = facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    frames = experiment / "frames"
    (frames / "latest.cbf").symlink_to("12282a_0001.cbf")
    (frames / "escape").symlink_to("../../../../etc")
    (frames / "absolute").symlink_to("/etc/passwd")
    config = facility.write_config()

    mxsync("--config", config, "--execute", "--once", check=0)

    data = facility.destination / "ny79" / "12282a" / "data" / "frames"
    assert os.readlink(data / "latest.cbf") == "12282a_0001.cbf"
    assert not os.path.lexists(data / "escape") and not os.path.lexists(data / "absolute")
    log = sync_log(facility)
    assert "symlink frames/escape -> ../../../../etc points outside the EPN; not copied" in log
    assert "symlink frames/absolute -> /etc/passwd points outside the EPN" in log
    assert "1 symlinks" in log
    assert recorded(config) == {"12282a"}


# ---------------------------------------------------------------- check --connect (item 6)


def test_check_connect_fails_on_what_a_cycle_or_an_alert_would_trip_over(facility, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "broken.j2").write_text("{% for epn in unknown_epns %}{{ epn }\n")
    (facility.destination / "ab12").write_text("a file where the project folder should be\n")
    config = facility.write_config(
        state_dir=str(blocker / "state"),
        ignore=str(blocker / "state" / "ignore.yml"),
        log_files={"sync": str(blocker / "sync.log"), "epnalert": None, "email": None},
        epn_cap_map={"12282": "ny79", "12283": "ab12"},
        epnalert_template_folder=str(templates),
        epnalert_template_text="broken.j2",
    )
    result = mxsync("check", "--connect", "--config", config)
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert result.returncode == 1, result.stdout + result.stderr
    assert any(line.startswith("FAILED  state directory") for line in failed), failed
    assert any(line.startswith("FAILED  log file sync") for line in failed), failed
    assert any(line.startswith("FAILED  epnalert templates") and "broken.j2" in line for line in failed), failed
    assert any(line.startswith("FAILED  project folder ab12") for line in failed), failed
    assert any(line.startswith("ok      project folder ny79") for line in result.stdout.splitlines())
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- local problems are not the facility's


def test_rsync_missing_here_is_a_local_problem_alerted_at_once(facility, tmp_path):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    config = facility.write_config()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").symlink_to(subprocess.run(["which", "ssh"], capture_output=True, text=True).stdout.strip())
    env = dict(os.environ, PATH=str(bin_dir))

    result = mxsync("--config", config, "--execute", "--once", env=env)

    assert result.returncode == 1
    assert "cannot run rsync: not found in PATH" in sync_log(facility)
    (alert,) = facility.smtp.wait_for(1, timeout=30)
    assert "local" in alert.message["Subject"] and "ssh" not in alert.message["Subject"]


def test_symlinked_project_folder_inside_the_root_is_used_but_a_symlinked_epn_folder_refused(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    facility.add_experiment("mx", "12283a", equipment_id=23, **ENDED)
    (facility.destination / "real-ny79").mkdir()
    (facility.destination / "ny79").symlink_to(facility.destination / "real-ny79")  # as an admin would
    (facility.destination / "ab12").mkdir()
    elsewhere = facility.destination / "other-project"
    elsewhere.mkdir()
    (facility.destination / "ab12" / "12283a").symlink_to(elsewhere)  # as a project member could
    config = facility.write_config(epn_cap_map={"12282": "ny79", "12283": "ab12"}, failure_alert_cycles=1)

    dry = mxsync("--config", config, "--once", "-v")
    assert "12282a: would sync" in dry.stderr and "12283a: would sync" not in dry.stderr
    mxsync("--config", config, "--execute", "--once")

    assert recorded(config) == {"12282a"}
    assert (facility.destination / "real-ny79" / "12282a" / "data" / ".info").is_file()
    assert list(elsewhere.iterdir()) == []
    assert "12283a: FAILED: refused:" in sync_log(facility) and "is a symlink" in sync_log(facility)
    (alert,) = facility.smtp.wait_for(1, timeout=30)  # a refused EPN is a failure staff hear about
    assert "12283a" in alert.message["Subject"]
