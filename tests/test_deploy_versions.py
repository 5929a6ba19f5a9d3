"""The Ansible role on the oldest ansible-core it supports and on the newest (this venv's).

Booleans given with `-e name=value` reach the role as strings ("false", "true"); each must mean what it says
on both versions. The oldest ansible-core is installed from PyPI once into a cached venv (this venv's
cache/ folder, else one per user under the temporary directory), as tests/facility/oldrsync.py caches its
rsync. Needs root and network access the first time; without them the tests skip, under CI=true they fail.
"""

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.test_deploy import Deployment, _missing, _recap, _remove_account, _require_programs, _require_root, _tool

# The oldest ansible-core the README promises, at its last release. It runs on Python 3.9 to 3.11.
OLDEST = "2.14.18"
OLDEST_PYTHONS = ((3, 9), (3, 11))

PACKAGES_TASK = "mxsync : Install rsync, the OpenSSH client, Python venv support and cron"
CRON_TASK = "mxsync : Run epnalert every day"
# Every task and handler of the role that talks to systemd.
SYSTEMD_TASKS = ("mxsync : Enable and start mx_sync.service", "mxsync : Reload systemd", "mxsync : Restart mx_sync")
ALL_FALSE = ("mxsync_manage_service=false", "mxsync_manage_cron=false", "mxsync_install_os_packages=false")
# The tasks those booleans govern, and the account the crontab belongs to. The newest ansible-core runs
# only these (tests/test_deploy.py runs all of the role with it); the oldest runs all of the role.
GOVERNED_TAGS = ("--tags", "mxsync_packages,mxsync_account,mxsync_cron,mxsync_service")


def _oldest_ansible_bin():
    """Return the bin/ folder of a venv holding ansible-core OLDEST, installing it once per cache."""
    low, high = OLDEST_PYTHONS
    if not low <= sys.version_info[:2] <= high:
        _missing(f"ansible-core {OLDEST} runs on Python {low[0]}.{low[1]} to {high[0]}.{high[1]}, not {sys.version}")
    for cache in (Path(sys.prefix) / "cache", Path(tempfile.gettempdir()) / f"mxsync-test-cache-{os.getuid()}"):
        venv = cache / f"ansible-core-{OLDEST}"
        try:
            cache.mkdir(parents=True, exist_ok=True)
            lock = open(cache / f"ansible-core-{OLDEST}.lock", "w")
        except OSError:
            continue  # this cache is not writable for us: try the next one
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be installing the same venv just now
            if not (venv / "installed").exists():
                _install_oldest(venv)
        return venv / "bin"
    _missing(f"no writable cache folder for ansible-core {OLDEST}")


def _install_oldest(venv):
    """Create `venv` with ansible-core OLDEST from PyPI; mark it complete only when it runs."""
    shutil.rmtree(venv, ignore_errors=True)  # a half-made venv of an interrupted run
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    steps = (
        [sys.executable, "-m", "venv", str(venv)],
        [*pip, f"ansible-core=={OLDEST}"],
        [str(venv / "bin" / "ansible-playbook"), "--version"],
    )
    for command in steps:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            _missing(f"installing ansible-core {OLDEST} failed ({' '.join(command[:4])}): {result.stderr[-300:]}")
    (venv / "installed").write_text(f"ansible-core=={OLDEST}\n")


def _task_states(output):
    """Given ansible-playbook output, return {task or handler name: set of result words (ok, skipping, ...)}."""
    states, task = {}, None
    for line in output.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            task = line[line.index("[") + 1 : line.rindex("]")]
            states.setdefault(task, set())
        elif task and line.split(":", 1)[0] in ("ok", "changed", "skipping", "fatal", "failed"):
            states[task].add(line.split(":", 1)[0])
    return states


def _crontab(user):
    result = subprocess.run(["crontab", "-l", "-u", user], capture_output=True, text=True, check=False)
    return result.stdout


@pytest.fixture(scope="module", params=["oldest", "newest"])
def played(request, tmp_path_factory):
    """Per ansible-core: a full run with every boolean "false", then the cron and packages tasks with "true"."""
    _tool("ansible-playbook")
    _require_root()
    _require_programs()
    ansible_bin = _oldest_ansible_bin() if request.param == "oldest" else Path(_tool("ansible-playbook")).parent
    user = f"mxsync-ci-core-{request.param}-{os.getpid()}"  # unique to this file and this process
    _remove_account(user)
    deployment = Deployment(tmp_path_factory.mktemp(f"versions-{request.param}"), user, ansible_bin)
    deployment.write_variables()
    try:
        version = subprocess.run(
            [str(ansible_bin / "ansible-playbook"), "--version"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0]
        arguments = [argument for pair in ALL_FALSE for argument in ("-e", pair)]
        if request.param == "newest":
            arguments += GOVERNED_TAGS
        false_rc, false_output = deployment.play(*arguments)
        assert false_rc == 0, f"{version}: run with false failed:\n{false_output[-6000:]}"
        crontab_after_false = _crontab(user)
        true_rc, true_output = deployment.play(
            "--tags",
            "mxsync_packages,mxsync_cron",
            "-e",
            "mxsync_manage_cron=true",
            "-e",
            "mxsync_install_os_packages=true",
            "-e",
            "mxsync_manage_service=false",
        )
        assert true_rc == 0, f"{version}: run with true failed:\n{true_output[-6000:]}"
        yield request.param, version, deployment, false_output, crontab_after_false, true_output
    finally:
        _remove_account(user)
        shutil.rmtree(deployment.prefix, ignore_errors=True)


def test_the_intended_ansible_core_ran(played):
    which, version, _, _, _, _ = played
    if which == "oldest":
        assert version.startswith(f"ansible-playbook [core {OLDEST}]"), version
    else:
        assert version.startswith("ansible-playbook [core 2.") and OLDEST not in version, version


def test_false_as_a_string_skips_packages_cron_and_systemd(played):
    which, version, deployment, output, crontab, _ = played
    states = _task_states(output)
    assert states[PACKAGES_TASK] == {"skipping"}, version
    assert states[CRON_TASK] == {"skipping"}, version
    assert "epnalert" not in crontab, crontab
    # The unit file changed, so the handlers were notified too: each of them was skipped as well.
    assert all(name in states for name in SYSTEMD_TASKS), sorted(states)
    assert {name: states[name] for name in SYSTEMD_TASKS} == {name: {"skipping"} for name in SYSTEMD_TASKS}
    # The rest of the role did its work (all of it on the oldest ansible-core).
    assert (deployment.unit_dir / "mx_sync.service").exists()
    assert deployment.config_file.exists() == (which == "oldest")
    assert _recap(output)["failed"] == 0


def test_true_as_a_string_installs_packages_and_the_crontab_entry(played):
    _, version, deployment, _, _, output = played
    states = _task_states(output)
    assert states[PACKAGES_TASK] <= {"ok", "changed"} and states[PACKAGES_TASK], (version, states[PACKAGES_TASK])
    assert states[CRON_TASK] == {"changed"}, (version, states[CRON_TASK])
    prefix = deployment.prefix
    assert f"{prefix}/bin/epnalert --config {prefix}/etc/config.yml" in _crontab(deployment.user)
