"""The role on an upgraded host: earlier epnalert cron entries retired, errors sent to syslog, host checks.

Pure tests of the role's filters first; then the role applied for real on localhost (root, as in
tests/test_deploy.py): a legacy account's crontab and a cron.d folder holding HPC ASSyncy's entries, and
`mxsync check --connect` run by the role as the service account against the simulated facility.
"""

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.facility import Facility
from tests.facility.net import free_port
from tests.test_deploy import (
    ETC,
    ROLE,
    Deployment,
    _changed_tasks,
    _recap,
    _remove_account,
    _require_programs,
    _require_root,
    _tool,
)

SERVICE_USER = f"mxsync-ci-cron-{os.getpid()}"
LEGACY_USER = f"mxsync-ci-old-{os.getpid()}"
CONNECT_USER = f"mxsync-ci-conn-{os.getpid()}"
MARKER = "#Ansible: mxsync crontab"
RETIRED = "# retired by the mxsync role on "


def _filters():
    """The role's filter plugin, imported from its file as Ansible loads it."""
    path = ROLE / "filter_plugins" / "mxsync_checks.py"
    spec = importlib.util.spec_from_file_location("mxsync_role_filters", path)
    module = importlib.util.module_from_spec(spec)
    # No __pycache__ in the role: test_deploy.py reads every file there as text.
    write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = write_bytecode
    return module


def _public_key(tmp_path, key_type="ed25519"):
    """A real public key made by ssh-keygen: (type, base64)."""
    path = Path(tempfile.mkdtemp(dir=tmp_path, prefix="key-")) / key_type
    subprocess.run(
        ["ssh-keygen", "-q", "-t", key_type, "-N", "", "-f", str(path)], check=True, stdin=subprocess.DEVNULL
    )
    return tuple(Path(f"{path}.pub").read_text().split()[:2])


# ---------------------------------------------------------------- the filters, pure


def test_host_key_lines_holding_real_keys_pass(tmp_path):
    filters = _filters()
    lines = [
        "host.example.org {} {}".format(*_public_key(tmp_path, "ed25519")),
        "[host.example.org]:2222,10.0.0.1 {} {} comment".format(*_public_key(tmp_path, "ecdsa")),
        "@cert-authority *.example.org {} {}".format(*_public_key(tmp_path, "ed25519")),
    ]
    assert filters.host_key_problems(lines) == []


def test_host_key_lines_of_the_right_shape_without_a_real_key_are_named(tmp_path):
    filters = _filters()
    key_type, blob = _public_key(tmp_path)
    lines = [
        "host ssh-ed25519 not-a-key",
        f"host ssh-rsa {blob}",
        "host ssh-ed25519 AAAA",
        f"host {key_type} {blob}",
        "host ssh-ed25519",
    ]
    assert filters.host_key_problems(lines) == [
        "line 1: the ssh-ed25519 key 'not-a-key' is not base64",
        "line 2: the line says ssh-rsa but the key is ssh-ed25519",
        "line 3: the ssh-ed25519 key 'AAAA' is too short to be a key",
        "line 5: expected 'HOST KEYTYPE BASE64-KEY'",
    ]


OLD_ROOT_CRONTAB = f"""SHELL=/bin/sh
MAILTO=root
# epnalert: the old deployment
{MARKER}
0 1 * * * /opt/mx_sync/bin/epnalert --config /opt/mx_sync/etc/config.yml
30 2 * * * cd /opt/mx_sync && ./bin/epnalert --config etc/config.yml >/dev/null 2>&1
15 3 * * * /usr/local/bin/epnalert-report-not-ours
#0 4 * * * /opt/mx_sync/bin/epnalert --config /opt/mx_sync/etc/config.yml
0 5 * * * /usr/local/bin/backup
"""


def test_every_line_that_runs_epnalert_is_commented_out_and_nothing_else():
    filters = _filters()
    result = filters.retire_epnalert_lines(OLD_ROOT_CRONTAB, "# retired: ")
    assert result["retired"] == [
        MARKER,
        "0 1 * * * /opt/mx_sync/bin/epnalert --config /opt/mx_sync/etc/config.yml",
        "30 2 * * * cd /opt/mx_sync && ./bin/epnalert --config etc/config.yml >/dev/null 2>&1",
    ]
    old, new = OLD_ROOT_CRONTAB.split("\n"), result["content"].split("\n")
    assert len(new) == len(old)
    assert [line for line in new if line not in old] == [f"# retired: {line}" for line in result["retired"]]
    # A second pass finds nothing more.
    assert filters.retire_epnalert_lines(result["content"], "# retired: ")["retired"] == []


def test_the_role_entry_in_the_service_account_crontab_is_kept_and_a_line_beside_it_retired():
    filters = _filters()
    job = "0 1 * * * /opt/mx_sync/bin/epnalert --config /opt/mx_sync/etc/config.yml"
    crontab = f'PATH="/usr/bin:/bin"\n{MARKER}\n{job}\n0 6 * * * epnalert --config /tmp/old.yml'
    result = filters.retire_epnalert_lines(crontab, "# retired: ", True)
    assert result["retired"] == ["0 6 * * * epnalert --config /tmp/old.yml"]
    assert result["content"].split("\n")[1:3] == [MARKER, job]


def test_the_project_cron_d_file_is_retired_line_by_line():
    filters = _filters()
    text = (ETC / "crontab").read_text()
    result = filters.retire_epnalert_lines(text, "# retired: ")
    assert result["retired"] == ["0 1 * * * mxsync /opt/mx_sync/bin/epnalert --config /opt/mx_sync/etc/config.yml"]
    assert result["content"] == text.replace("0 1 * * * mxsync", "# retired: 0 1 * * * mxsync")


# ---------------------------------------------------------------- helpers for the role applied for real


def _crontab(user):
    result = subprocess.run(["crontab", "-l", "-u", user], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _set_crontab(user, text):
    subprocess.run(["crontab", "-u", user, "-"], input=text, text=True, check=True)


def _add_account(name):
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )


def _write_vars(path, variables):
    path.write_text(yaml.safe_dump(variables, sort_keys=False))
    return path


def _private_base():
    """A scratch folder the service account can pass through (pytest's own is root's alone); the caller removes it."""
    base = Path(tempfile.mkdtemp(prefix="mxsync-deploy-"))
    base.chmod(0o711)
    return base


def _local_dead_ends(tmp_path):
    """Variables that send every connection of the tools to a closed port on 127.0.0.1: they fail at once."""
    port = free_port()
    key_type, blob = _public_key(tmp_path)
    return {
        "mxsync_host": "127.0.0.1",
        "mxsync_port": port,
        "mxsync_ssh_known_hosts": [f"[127.0.0.1]:{port} {key_type} {blob}"],
        "mxsync_base_url": f"http://127.0.0.1:{port}",
        "mxsync_smtp": f"127.0.0.1:{port}",
        "mxsync_smtp_security": "none",
        "mxsync_smtp_username": "",
        "mxsync_smtp_password": "",
    }


# ---------------------------------------------------------------- an upgrade: earlier epnalert entries


@pytest.fixture(scope="module")
def upgraded():
    """An HPC ASSyncy host upgraded: a legacy crontab and a cron.d file, then the role, again, check mode."""
    _tool("ansible-playbook")
    _require_root()
    _require_programs()
    for name in (SERVICE_USER, LEGACY_USER):
        _remove_account(name)
    base = _private_base()
    deployment = Deployment(base / "deploy", SERVICE_USER)
    deployment.write_variables()
    cron_d = base / "cron.d"
    cron_d.mkdir()
    (cron_d / "mx_sync").write_text((ETC / "crontab").read_text())
    (cron_d / "mx_sync").chmod(0o644)
    (cron_d / "other").write_text("0 2 * * * root /usr/local/bin/backup\n")
    extra = _write_vars(
        base / "upgrade.yml",
        {
            **_local_dead_ends(base),
            "mxsync_cron_legacy_users": [LEGACY_USER],
            "mxsync_cron_d_dir": str(cron_d),
            "mxsync_cron_mailto": "",
        },
    )
    try:
        _add_account(LEGACY_USER)
        _set_crontab(LEGACY_USER, OLD_ROOT_CRONTAB)
        outputs = {}
        for name, arguments in (("first", ()), ("second", ())):
            returncode, outputs[name] = deployment.play("-e", f"@{extra}", *arguments)
            assert returncode == 0, f"{name} run failed:\n{outputs[name][-6000:]}"
        after = {"legacy": _crontab(LEGACY_USER), "mx_sync": (cron_d / "mx_sync").read_text()}
        # Entries that turn up later: check mode names them and changes nothing; a run retires them.
        _set_crontab(LEGACY_USER, after["legacy"] + "45 4 * * * epnalert --config /opt/mx_sync/etc/config.yml\n")
        (cron_d / "late").write_text("0 5 * * * root /opt/mx_sync/bin/epnalert --config /x.yml\n")
        _set_crontab(SERVICE_USER, _crontab(SERVICE_USER) + "0 6 * * * /opt/mx_sync/bin/epnalert --config /x.yml\n")
        before_check = (_crontab(LEGACY_USER), _crontab(SERVICE_USER), (cron_d / "late").read_text())
        returncode, outputs["check"] = deployment.play("-e", f"@{extra}", "--check", "--diff", "--tags", "mxsync_cron")
        assert returncode == 0, f"check mode failed:\n{outputs['check'][-6000:]}"
        after_check = (_crontab(LEGACY_USER), _crontab(SERVICE_USER), (cron_d / "late").read_text())
        returncode, outputs["late"] = deployment.play("-e", f"@{extra}", "--tags", "mxsync_cron")
        assert returncode == 0, f"the run after check mode failed:\n{outputs['late'][-6000:]}"
        yield {
            "deployment": deployment,
            "base": base,
            "cron_d": cron_d,
            "outputs": outputs,
            "after": after,
            "check": (before_check, after_check),
        }
    finally:
        for name in (SERVICE_USER, LEGACY_USER):
            _remove_account(name)
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_upgrade_retires_the_legacy_crontab_lines_and_keeps_the_others(upgraded):
    retired = {
        MARKER,
        "0 1 * * * /opt/mx_sync/bin/epnalert --config /opt/mx_sync/etc/config.yml",
        "30 2 * * * cd /opt/mx_sync && ./bin/epnalert --config etc/config.yml >/dev/null 2>&1",
    }
    prefix = f"the crontab of {SERVICE_USER} runs epnalert now: "
    lines = upgraded["after"]["legacy"].splitlines()
    # Line by line: the retired ones commented out in place, every other one as it was.
    assert len(lines) == len(OLD_ROOT_CRONTAB.splitlines())
    for line, old in zip(lines, OLD_ROOT_CRONTAB.splitlines()):
        if old in retired:
            assert line.startswith(RETIRED) and line.endswith(prefix + old), line
        else:
            assert line == old
    first = upgraded["outputs"]["first"]
    assert f"Retiring in the crontab of {LEGACY_USER}: {MARKER} | 0 1 * * *" in first


def test_upgrade_retires_the_cron_d_file_made_from_etc_crontab(upgraded):
    text = upgraded["after"]["mx_sync"]
    job = "0 1 * * * mxsync /opt/mx_sync/bin/epnalert --config /opt/mx_sync/etc/config.yml"
    assert [line for line in text.splitlines() if "epnalert --config" in line and not line.startswith("#")] == []
    assert [line for line in text.splitlines() if line.endswith(job)][0].startswith(RETIRED)
    assert "PATH=/usr/local/bin:/usr/bin:/bin" in text.splitlines()
    cron_d = upgraded["cron_d"]
    assert (cron_d / "other").read_text() == "0 2 * * * root /usr/local/bin/backup\n"
    assert oct((cron_d / "mx_sync").stat().st_mode & 0o777) == "0o644"
    assert f"Retiring in {cron_d}/mx_sync: {job}" in upgraded["outputs"]["first"]


def test_second_run_changes_nothing(upgraded):
    second = upgraded["outputs"]["second"]
    recap = _recap(second)
    assert (recap["changed"], recap["failed"]) == (0, 0), f"changed on the second run: {_changed_tasks(second)}"
    assert "Retiring" not in second


def test_check_mode_names_what_it_would_retire_and_changes_nothing(upgraded):
    before, after = upgraded["check"]
    assert after == before
    output = upgraded["outputs"]["check"]
    assert f"Would retire in the crontab of {LEGACY_USER}: 45 4 * * * epnalert" in output
    assert (
        f"Would retire in the crontab of {SERVICE_USER}: 0 6 * * * /opt/mx_sync/bin/epnalert --config /x.yml" in output
    )
    assert f"Would retire in {upgraded['cron_d']}/late: 0 5 * * * root" in output


def test_entries_that_turn_up_later_are_retired_by_the_next_run(upgraded):
    late = upgraded["outputs"]["late"]
    assert "Retiring in the crontab of" in late
    for user in (LEGACY_USER, SERVICE_USER):
        running = [line for line in _crontab(user).splitlines() if "epnalert --" in line and not line.startswith("#")]
        assert running == ([] if user == LEGACY_USER else [_job_line(upgraded["deployment"])])
    assert (upgraded["cron_d"] / "late").read_text().startswith(RETIRED)


def _job_line(deployment):
    prefix = deployment.prefix
    return f"0 1 * * * {prefix}/bin/epnalert --config {prefix}/etc/config.yml 2>&1 | logger -t epnalert -p user.warning"


def test_without_mailto_the_job_sends_its_output_to_syslog(upgraded):
    lines = _crontab(SERVICE_USER).splitlines()
    assert not any(line.startswith("MAILTO") for line in lines)
    assert lines[lines.index(MARKER) + 1] == _job_line(upgraded["deployment"])
    # Run the job as cron would (sh -c, as the account without PAM, the crontab's PATH) with /dev/log, in a mount
    # namespace of its own, being a socket this test reads: epnalert's error must arrive there.
    socket_path = upgraded["base"] / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(socket_path))
        socket_path.chmod(0o666)
        job = _job_line(upgraded["deployment"]).split(" * * * ", 1)[1]
        home = upgraded["deployment"].prefix / "var" / "lib"
        script = f"""set -e
mkdir -p "$OLD_DEV"
mount --bind /dev "$OLD_DEV"
mount -t tmpfs -o mode=0755 tmpfs /dev
for node in null zero random urandom; do touch /dev/$node; mount --bind "$OLD_DEV/$node" /dev/$node; done
touch /dev/log
mount --bind "$LOG_SOCKET" /dev/log
exec setpriv --reuid={SERVICE_USER} --regid={SERVICE_USER} --init-groups -- env -i PATH=/usr/local/bin:/usr/bin:/bin HOME={home} sh -c "$JOB"
"""
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            env={
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "OLD_DEV": str(upgraded["base"] / "old-dev"),
                "LOG_SOCKET": str(socket_path),
                "JOB": job,
            },
            capture_output=True,
            text=True,
            check=False,
        )
        # The job's own output went to logger, not to cron (which would mail it to nobody).
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
        receiver.setblocking(False)
        messages = []
        while True:
            try:
                messages.append(receiver.recv(65536).decode())
            except BlockingIOError:
                break
    assert messages, "nothing reached /dev/log"
    # user.warning is <12>; the tag and epnalert's own one-line error follow.
    assert all(message.startswith("<12>") and " epnalert: " in message for message in messages), messages
    assert any("epnalert: error" in message for message in messages), messages


# ---------------------------------------------------------------- mxsync check --connect, as the service account


@pytest.fixture(scope="module")
def against_the_facility():
    """Deploy pointed at the simulated facility, then again with a wrong host key; yield both outputs."""
    _tool("ansible-playbook")
    _require_root()
    _require_programs()
    _remove_account(CONNECT_USER)
    base = _private_base()
    try:
        with Facility(base / "facility") as facility:
            config = yaml.safe_load(facility.write_config().read_text())
            deployment = Deployment(base / "deploy", CONNECT_USER)
            deployment.write_variables()
            good = _write_vars(
                base / "facility.yml",
                {
                    "mxsync_check_connect": True,
                    "mxsync_host": facility.sshd.host,
                    "mxsync_port": facility.sshd.port,
                    "mxsync_sftp_username": facility.sshd.username,
                    "mxsync_ssh_private_key": facility.sshd.client_key.read_text(),
                    "mxsync_ssh_known_hosts": facility.sshd.known_hosts.read_text().splitlines(),
                    "mxsync_base_url": config["base-url"],
                    "mxsync_equipment": config["equipment"],
                    "mxsync_epn_cap_map": {},
                    "mxsync_destination_root": str(facility.destination),
                    "mxsync_smtp": config["epnalert-email-smtp"],
                    "mxsync_smtp_security": "none",
                    "mxsync_smtp_username": "",
                    "mxsync_smtp_password": "",
                    "mxsync_config_extra": {"source-path": config["source-path"]},
                },
            )
            passed_rc, passed = deployment.play("-e", f"@{good}", "-v")
            accepted = facility.sshd.log_file.read_text()
            # Another host's key (a real one), and a destination root the service account cannot enter.
            key_type, blob = _public_key(base)
            wrong = _write_vars(
                base / "wrong.yml",
                {"mxsync_ssh_known_hosts": [f"[{facility.sshd.host}]:{facility.sshd.port} {key_type} {blob}"]},
            )
            facility.destination.chmod(0o700)
            failed_rc, failed = deployment.play("-e", f"@{good}", "-e", f"@{wrong}")
            yield {
                "deployment": deployment,
                "passed": (passed_rc, passed),
                "failed": (failed_rc, failed),
                "sshd_log": accepted,
                "vars_files": (good, wrong),
            }
    finally:
        _remove_account(CONNECT_USER)
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_check_connect_passes_against_the_facility_as_the_service_account(against_the_facility):
    returncode, output = against_the_facility["passed"]
    assert returncode == 0, output[-6000:]
    assert "TASK [mxsync : Try every connection as the service account (mxsync check --connect)]" in output
    assert "FAILED" not in output
    # -v shows what it tried: every probe ok, the SSH login for real.
    assert "ok      SSH login and SFTP listing on" in output
    assert "ok      portal token for equipment 23" in output
    assert "Accepted publickey for" in against_the_facility["sshd_log"]


def test_check_connect_failing_fails_the_play_naming_each_problem(against_the_facility):
    returncode, output = against_the_facility["failed"]
    assert returncode != 0
    message = next(line for line in output.splitlines() if "mxsync check --connect failed as" in line)
    assert f"mxsync check --connect failed as {CONNECT_USER} on localhost" in message
    assert "SSH login and SFTP listing on" in message and "host key" in message.lower(), message
    # Root could enter the destination root; the account cannot: the check ran as the account.
    assert f"cannot be entered by {CONNECT_USER}" in message, message
    assert "mxsync_check_connect=false" in message
    assert _recap(output)["failed"] == 1


def test_check_mode_skips_check_connect(against_the_facility):
    # The host now holds a wrong host key and a destination the account cannot enter: the check would fail.
    deployment, good, wrong = against_the_facility["deployment"], *against_the_facility["vars_files"]
    returncode, output = deployment.play("-e", f"@{good}", "-e", f"@{wrong}", "--check")
    assert returncode == 0, output[-4000:]
    after_task = output.split("TASK [mxsync : Try every connection as the service account (mxsync check --connect)]")[1]
    assert after_task.lstrip("* \n").startswith("skipping: [localhost]"), after_task[:300]


# ---------------------------------------------------------------- checks on the host, before any change


@pytest.mark.parametrize(
    "override, message",
    [
        (
            '{"mxsync_ssh_known_hosts": ["[sftp.example.org]:2222 ssh-ed25519 not-a-key"]}',
            "mxsync_ssh_known_hosts: line 1: the ssh-ed25519 key 'not-a-key' is not base64; copy the lines",
        ),
        (
            '{"mxsync_user_groups": ["root", "mxsync-ci-no-such-group", "mxsync-ci-nor-this"]}',
            "mxsync_user_groups: no group mxsync-ci-no-such-group, mxsync-ci-nor-this on localhost; "
            "create them first, or fix mxsync_user_groups",
        ),
        (
            '{"mxsync_destination_root": "/nonexistent-mxsync-destination"}',
            "mxsync_destination_root: /nonexistent-mxsync-destination does not exist on localhost; "
            "create it, or fix mxsync_destination_root",
        ),
    ],
    ids=["host-key-not-a-key", "missing-groups", "missing-destination"],
)
def test_host_problem_fails_the_play_before_anything_changes(tmp_path, override, message):
    _tool("ansible-playbook")
    _require_root()
    _require_programs()
    _remove_account(SERVICE_USER)
    deployment = Deployment(tmp_path / "bad", SERVICE_USER)
    deployment.write_variables()
    try:
        returncode, output = deployment.play("-e", override)
        assert returncode != 0, output[-4000:]
        assert message in output, output[-4000:]
        assert _recap(output)["changed"] == 0
        assert not deployment.prefix.exists()
        result = subprocess.run(["getent", "passwd", SERVICE_USER], capture_output=True, check=False)
        assert result.returncode == 2
    finally:
        _remove_account(SERVICE_USER)
