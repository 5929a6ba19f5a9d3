"""mx_sync.service under a real systemd, booted as PID 1 in a container with systemd-nspawn.

The unit is the role's template rendered as Ansible renders it, with the paths of this test; it
runs this checkout's .venv against the simulated facility (sshd, portal and SMTP on 127.0.0.1 of
the host, which the container shares). One boot runs a driver script that starts, reloads and
stops the service, then starts it with a config typo, then a copy whose venv lies under /root,
and writes what systemd reports into files the tests below read.

What of the sandbox applies inside the container (measured on systemd 252; nspawn without a
user namespace leaves systemd CAP_SYS_ADMIN, so it builds the service's namespaces as on a
host): all of it that can be seen from outside the process, and test_the_whole_sandbox_applies
asserts each from the service's /proc/PID/status and mountinfo, next to the driver's:
ProtectSystem=strict (/, /usr and config read-only, only ReadWritePaths= writable),
ProtectHome=yes (/root, /home, /run/user replaced by an inaccessible node), PrivateTmp=yes,
PrivateDevices=yes (a private read-only /dev), ProtectKernelTunables= and ProtectControlGroups=
(/proc/sys, /sys/fs/cgroup read-only), ProtectKernelLogs= (/proc/kmsg hidden),
ProtectProc=invisible, NoNewPrivileges=yes and CapabilityBoundingSet= (the driver has neither),
and the seccomp filters (33 against nspawn's own 5). RestrictAddressFamilies=,
RestrictNamespaces=, ProtectClock= and ProtectHostname= are among those filters but are not
probed one by one. nspawn's own limits come on top, so the service is more confined here than
on a host, never less.

Needs root and systemd-nspawn (Debian package systemd-container; scripts/bootstrap installs
it); skips, saying why, only when the container cannot boot (e.g. inside an unprivileged
container). Under CI=true a missing prerequisite fails instead.
"""

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import jinja2
import pytest
import yaml

from tests.facility import Facility

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "ansible" / "roles" / "mxsync" / "templates" / "mx_sync.service.j2"
VENV = ROOT / ".venv"
IN_CI = os.environ.get("CI") == "true"

# The service account, created inside the container only; files it owns are chowned by number.
SERVICE_USER = "mxsync"
SERVICE_UID = 61090
# The install's layout inside the container, each directory bind-mounted from the test's own.
ETC_DIR = "/srv/mx_sync/etc"
STATE_DIR = "/srv/mx_sync/var/lib"
LOG_DIR = "/srv/mx_sync/var/log"
DESTINATION = "/srv/scratch"
TEST_DIR = "/srv/test"
# This venv mounted a second time, where ProtectHome=yes hides it.
HOME_VENV = "/root/mx_sync"
# RestartSec= of the drop-in, instead of the unit's 60 s; the driver waits several times as long.
RESTART_SEC = 1
BOOT_TIMEOUT = 240

DRIVER = textwrap.dedent(
    f"""\
    #!/bin/sh
    # Runs as a oneshot unit in the container; every result goes to {TEST_DIR}/results.
    set -u
    out={TEST_DIR}/results
    mkdir -p $out
    echo booted > $out/booted
    systemd-sysusers {TEST_DIR}/sysusers.conf
    install -m 0644 {TEST_DIR}/mx_sync.service {TEST_DIR}/mx_sync_home.service /run/systemd/system/
    mkdir -p /run/systemd/system/mx_sync.service.d
    install -m 0644 {TEST_DIR}/restart.conf /run/systemd/system/mx_sync.service.d/
    systemctl daemon-reload
    show() {{
        systemctl show "${{2:-mx_sync.service}}" -p ActiveState,SubState,Result,MainPID,NRestarts \\
            -p ExecMainStatus,StatusText,RestartUSec > $out/$1.show
    }}
    service_processes() {{ ps -u {SERVICE_USER} -o pid=,comm= > $out/$1.ps; }}
    journal() {{
        journalctl -b --no-pager -o short-monotonic -u mx_sync.service -u mx_sync_home.service
    }}
    wait_for_rsync() {{
        for i in $(seq 1 300); do pgrep -u {SERVICE_USER} -x rsync > /dev/null && return; sleep 0.1; done
    }}

    # 1. Start: 'systemctl start' of a Type=notify unit returns once READY=1 arrived.
    systemctl start mx_sync.service; echo $? > $out/start.rc
    show started
    pid=$(systemctl show -p MainPID --value mx_sync.service)
    # The service's process next to the driver's (unsandboxed, but under nspawn's own limits).
    grep -E '^(NoNewPrivs|Seccomp|Seccomp_filters|CapBnd|CapEff):' /proc/$pid/status > $out/sandbox.status
    grep -E '^(NoNewPrivs|Seccomp|Seccomp_filters|CapBnd|CapEff):' /proc/$$/status > $out/driver.status
    cat /proc/$pid/mountinfo > $out/sandbox.mountinfo
    wait_for_rsync
    service_processes transferring

    # 2. Reload while the transfer runs.
    systemctl reload mx_sync.service; echo $? > $out/reload.rc
    sleep 2
    show reloaded
    service_processes reloaded

    # 3. Stop mid-transfer (after a fresh start if the reload ended the service, so that this
    # step stands on its own).
    if ! systemctl is-active -q mx_sync.service; then
        systemctl reset-failed mx_sync.service 2> /dev/null
        systemctl start mx_sync.service
        wait_for_rsync
    fi
    service_processes before-stop
    journal > $out/journal-before-stop
    systemctl stop mx_sync.service; echo $? > $out/stop.rc
    show stopped
    service_processes stopped

    # 4. A config typo: the start fails and no restart follows, however long one waits.
    systemctl reset-failed mx_sync.service
    install -m 0600 -o {SERVICE_USER} {TEST_DIR}/config-typo.yml {ETC_DIR}/config.yml
    systemctl start mx_sync.service; echo $? > $out/typo.rc
    sleep {4 * RESTART_SEC + 1}
    show typo

    # 5. The venv under /root: what mxsync's own check says, and what systemd does with it.
    {HOME_VENV}/bin/python -c 'from mxsync.environment import protected_home_problem as p; print(p())' \\
        > $out/home.check 2>&1
    systemctl start mx_sync_home.service; echo $? > $out/home.rc
    show home mx_sync_home.service

    journal > $out/journal
    echo done > $out/done
    """
)

DRIVER_UNIT = textwrap.dedent(
    f"""\
    [Unit]
    Description=mxsync test driver

    [Service]
    Type=oneshot
    ExecStart=/bin/sh {TEST_DIR}/driver.sh
    ExecStopPost=/bin/systemctl poweroff --no-block
    TimeoutStartSec={BOOT_TIMEOUT // 2}
    StandardOutput=journal+console
    StandardError=journal+console
    """
)


def _missing(reason):
    """Skip with `reason`, or fail under CI=true, where scripts/bootstrap provides everything."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: this test must run)")
    pytest.skip(reason)


def _render_unit(venv_dir):
    """Render the role's unit template as Ansible would, for this test's layout."""
    template = jinja2.Template(
        TEMPLATE.read_text(),
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    return template.render(
        ansible_managed="Ansible managed",
        mxsync_user=SERVICE_USER,
        mxsync_group=SERVICE_USER,
        mxsync_venv_dir=venv_dir,
        mxsync_config_dir=ETC_DIR,
        mxsync_state_dir=STATE_DIR,
        mxsync_log_dir=LOG_DIR,
        mxsync_destination_root=DESTINATION,
        mxsync_systemd_protect_home="yes",
    )


def _venv_problem():
    """Return why this checkout's .venv cannot run in the container, or None."""
    if not (VENV / "bin" / "mxsync").exists():
        return f"{VENV} has no mxsync; run scripts/bootstrap"
    probe = "import sys; from mxsync.environment import protected_home_problem as p; print(p() or sys.base_prefix)"
    result = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", probe],
        capture_output=True,
        text=True,
        check=False,
    )
    answer = result.stdout.strip()
    if result.returncode != 0 or not answer.startswith("/usr"):
        # The container holds only the host's /usr, and the unit hides /root and /home.
        return f"{VENV}: {answer or result.stderr.strip()}; recreate it: rm -rf .venv && scripts/bootstrap"
    return None


def _show(path):
    """Given a file of `systemctl show` output, return its properties as a dict."""
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _processes(path):
    """Given `ps -o pid=,comm=` output, return the command names."""
    return [line.split(None, 1)[1] for line in path.read_text().splitlines() if line.strip()]


def _mounts(mountinfo):
    """Given /proc/PID/mountinfo text, return {mount point: (source root, file system, options)}, topmost mounts."""
    mounts = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        separator = fields.index("-")
        options = set(fields[5].split(",")) | set(fields[separator + 3].split(","))
        mounts[fields[4]] = (fields[3], fields[separator + 1], options)
    return mounts


def _status(text):
    """Given lines of /proc/PID/status, return {field: value}."""
    return {name: value.strip() for name, value in (line.split(":", 1) for line in text.splitlines())}


def _prepare(base, facility):
    """Write the install (config, key, unit files) and the driver under `base`; return the nspawn command."""
    etc, state, log, scratch, test = (base / name for name in ("etc", "state", "log", "scratch", "test"))
    for directory in (etc, state, log, scratch, test):
        directory.mkdir(parents=True)
    for directory in (state, log, scratch):
        os.chown(directory, SERVICE_UID, SERVICE_UID)
    shutil.copy(facility.sshd.client_key, etc / "mx_key")
    shutil.copy(facility.sshd.known_hosts, etc / "known_hosts")
    (etc / "known_hosts").chmod(0o644)
    paths = {
        "ignore": f"{STATE_DIR}/ignore.yml",
        "key_file": f"{ETC_DIR}/mx_key",
        "known_hosts": f"{ETC_DIR}/known_hosts",
        "destination_root_path": DESTINATION,
        "log_files": {name: f"{LOG_DIR}/{name}.log" for name in ("sync", "epnalert", "email")},
        # Slow enough that stop and reload happen while rsync runs.
        "rsync_bwlimit": "64K",
    }
    facility.write_config(etc / "config.yml", **paths)
    facility.write_config(test / "config-typo.yml", max_tasks="two", **paths)
    for name in ("mx_key", "config.yml"):
        os.chown(etc / name, SERVICE_UID, SERVICE_UID)
    (test / "mx_sync.service").write_text(_render_unit(str(VENV)))
    (test / "mx_sync_home.service").write_text(_render_unit(HOME_VENV))
    drop_in = f"[Service]\nRestartSec={RESTART_SEC}s\n"
    if any(ROOT.is_relative_to(hidden) for hidden in ("/tmp", "/var/tmp")):
        # A checkout under /tmp (CI clones there) is hidden by the unit's PrivateTmp=yes; make it visible again.
        drop_in += f"BindReadOnlyPaths={ROOT}\n"
    (test / "restart.conf").write_text(drop_in)
    (test / "sysusers.conf").write_text(f'u {SERVICE_USER} {SERVICE_UID} "mxsync test" {STATE_DIR} /usr/sbin/nologin\n')
    (test / "driver.sh").write_text(DRIVER)
    (test / "driver.service").write_text(DRIVER_UNIT)
    binds = [
        f"--bind-ro={ROOT}",
        f"--bind-ro={VENV}:{HOME_VENV}",
        f"--bind={etc}:{ETC_DIR}",
        f"--bind={state}:{STATE_DIR}",
        f"--bind={log}:{LOG_DIR}",
        f"--bind={scratch}:{DESTINATION}",
        f"--bind={test}:{TEST_DIR}",
        f"--bind-ro={test / 'driver.service'}:/run/systemd/system/mxsync-test-driver.service",
    ]
    return [
        "systemd-nspawn",
        "-D",
        "/",
        "--volatile=yes",
        "--register=no",
        "--keep-unit",
        "-q",
        *binds,
        "-b",
        "systemd.firstboot=off",
        "systemd.unit=mxsync-test-driver.service",
    ]


def _boot(command):
    """Run the container to its end; return its console output."""
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=BOOT_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.terminate()  # nspawn powers the container off on SIGTERM
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        pytest.fail(f"the container did not power off within {BOOT_TIMEOUT} s:\n{output[-4000:]}")
    return output


class Boot:
    """What the driver recorded in one boot."""

    def __init__(self, results, console, sync_log, ignore_file):
        self.results = results
        self.console = console
        self.sync_log = sync_log
        self.ignore_file = ignore_file

    def text(self, name):
        return (self.results / name).read_text()

    def show(self, name):
        return _show(self.results / f"{name}.show")

    def rc(self, name):
        return int(self.text(f"{name}.rc"))

    def processes(self, name):
        return _processes(self.results / f"{name}.ps")

    def journal(self, name="journal"):
        return self.text(name).splitlines()


@pytest.fixture(scope="module")
def boot(tmp_path_factory):
    if os.geteuid() != 0:
        _missing("booting a container with systemd-nspawn needs root")
    if shutil.which("systemd-nspawn") is None:
        _missing("systemd-nspawn is not installed (Debian package systemd-container; scripts/bootstrap installs it)")
    problem = _venv_problem()
    if problem:
        _missing(problem)
    base = tmp_path_factory.mktemp("systemd")
    with Facility(base / "facility") as facility:
        # A visit that ended yesterday, with 2 MiB of frames.
        facility.add_experiment("mx", "12282a", equipment_id=23, frames=8, frame_size=256 * 1024)
        command = _prepare(base, facility)
        console = _boot(command)
    results = base / "test" / "results"
    if not (results / "booted").exists():
        pytest.skip(f"systemd-nspawn could not boot a container here:\n{console[-3000:]}")
    assert (results / "done").exists(), f"the driver did not finish:\n{console[-6000:]}"
    sync_log = base / "log" / "sync.log"
    return Boot(
        results,
        console,
        sync_log.read_text() if sync_log.exists() else "",
        base / "state" / "ignore.yml",
    )


def test_service_starts_and_reports_ready_and_status(boot):
    assert boot.rc("start") == 0, boot.journal()
    started = boot.show("started")
    assert (started["ActiveState"], started["SubState"]) == ("active", "running")
    assert started["StatusText"], started  # mxsync's STATUS= line
    # The sandboxed service really works: it runs rsync over its own ssh connection.
    running = set(boot.processes("transferring"))
    assert {"rsync", "ssh"} <= running, boot.sync_log[-3000:]


def test_the_whole_sandbox_applies(boot):
    service = _status(boot.text("sandbox.status"))
    driver = _status(boot.text("driver.status"))
    # NoNewPrivileges=yes, CapabilityBoundingSet= (empty); the driver has neither.
    assert (service["NoNewPrivs"], driver["NoNewPrivs"]) == ("1", "0")
    assert int(service["CapBnd"], 16) == 0 != int(driver["CapBnd"], 16)
    assert int(service["CapEff"], 16) == 0
    # SystemCallFilter= and friends: the unit's seccomp filters on top of nspawn's.
    assert service["Seccomp"] == "2"
    assert int(service["Seccomp_filters"]) > int(driver["Seccomp_filters"])
    mounts = _mounts(boot.text("sandbox.mountinfo"))
    # ProtectSystem=strict, ProtectKernelTunables=yes, ProtectControlGroups=yes.
    for read_only in ("/", "/usr", ETC_DIR, str(ROOT), "/proc/sys", "/sys/fs/cgroup"):
        assert "ro" in mounts[read_only][2], read_only
    # ReadWritePaths=
    for writable in (STATE_DIR, LOG_DIR, DESTINATION):
        assert "rw" in mounts[writable][2], writable
    # ProtectHome=yes, ProtectKernelLogs=yes: replaced by systemd's inaccessible nodes.
    for hidden in ("/root", "/home", "/run/user", "/proc/kmsg"):
        assert "/inaccessible/" in mounts[hidden][0], mounts[hidden]
    # PrivateTmp=yes
    for private in ("/tmp", "/var/tmp"):
        assert "-mx_sync.service-" in mounts[private][0], mounts[private]
    # PrivateDevices=yes: a read-only tmpfs with the pseudo devices (nspawn's /dev is rw).
    assert mounts["/dev"][1] == "tmpfs" and "ro" in mounts["/dev"][2]
    # ProtectProc=invisible
    assert "hidepid=invisible" in mounts["/proc"][2]


def test_reload_keeps_the_same_process_running(boot):
    assert boot.rc("reload") == 0, boot.journal()
    before, after = boot.show("started"), boot.show("reloaded")
    state = (after["ActiveState"], after["SubState"], after["NRestarts"])
    assert state == ("active", "running", "0"), boot.journal()
    assert after["MainPID"] == before["MainPID"]
    # Logged by mxsync's SIGHUP handler (mxsync/service.py).
    assert "Received SIGHUP: reloading the configuration" in boot.sync_log


def test_stop_mid_transfer_ends_everything_and_records_nothing(boot):
    assert "rsync" in boot.processes("before-stop")
    assert boot.rc("stop") == 0
    stopped = boot.show("stopped")
    state = (stopped["ActiveState"], stopped["Result"], stopped["ExecMainStatus"])
    assert state == ("inactive", "success", "0")
    assert boot.processes("stopped") == []
    # mxsync ended its rsync and ssh itself: systemd found nothing left to kill.
    during_stop = boot.journal()[len(boot.journal("journal-before-stop")) :]
    killed = [line for line in during_stop if "Killing process" in line]
    assert killed == []
    record = boot.ignore_file.read_text() if boot.ignore_file.exists() else ""
    assert "12282a" not in ((yaml.safe_load(record) or {}).get("previouslySynched") or [])


def test_config_typo_fails_the_start_and_is_not_restarted(boot):
    typo = boot.show("typo")
    # The drop-in's RestartSec= applies, and the driver waited 4 times as long.
    assert typo["RestartUSec"] == f"{RESTART_SEC}s"
    assert boot.rc("typo") != 0
    state = (typo["ActiveState"], typo["Result"], typo["ExecMainStatus"])
    assert state == ("failed", "exit-code", "2")
    assert typo["NRestarts"] == "0", boot.journal()
    journal = "\n".join(boot.journal())
    assert "Scheduled restart job" not in journal
    assert "max-tasks: expected an integer, got 'two'" in journal  # mxsync's own line


def test_venv_under_root_fails_with_203_and_mxsync_says_why(boot):
    assert boot.rc("home") != 0
    home = boot.show("home")
    assert (home["Result"], home["ExecMainStatus"]) == ("exit-code", "203")  # 203/EXEC
    failed = "mx_sync_home.service: Failed at step EXEC"
    assert any(failed in line for line in boot.journal())
    expected = f"the venv ({HOME_VENV}) lies under /root"
    assert boot.text("home.check").startswith(expected)
