"""Upgrading a host that runs HPC ASSyncy with the Ansible role: nothing of the old install is lost without a word.

The host is laid out as HPC ASSyncy's deployment left it under a throwaway prefix: its config.yml (custom epnalert
templates, visit-day-range 200, log-level logging.DEBUG, an epn_cap_map), etc/ignore.yml, and root-owned log files.
The role is applied for real (tests/test_deploy.py explains how), first with --check --diff, as the README says.
"""

import grp
import logging
import os
import pwd
import re
import shutil
import stat
import subprocess

import pytest
import yaml

from mxsync.config import load_config
from tests.test_deploy import (
    ROOT,
    Deployment,
    _changed_tasks,
    _recap,
    _remove_account,
    _require_programs,
    _require_root,
    _tool,
    _user_exists,
)

USER = f"mxsync-up-{os.getpid()}"
SECRET = "s3cret: 'with #quotes\""  # the vaulted password of tests/test_deploy.py's variables
OLD_IGNORE = "previouslySynched:\n- 12282a\n- 23456b\n"
OLD_LOG = "2026-01-01 00:00:00 INFO an HPC ASSyncy line\n"
# What the site set before, and the variables that keep it.
KEEP = ("-e", "mxsync_visit_day_range=200", "-e", "mxsync_log_level=DEBUG")


def _old_config(deployment):
    """Return the config.yml of the HPC ASSyncy install: the role's values but for two settings and the templates."""
    prefix, key = deployment.prefix, deployment.base / "facility_key"
    return f"""comment: "This is our config file"
epn_cap_map:
    "12282": ny79
    "23456": zz99            # mapped by hand last year
ignore: {prefix}/etc/ignore.yml
equipment:
    - {{ username: 'api', password: {_quoted(SECRET)}, client_name: 'cl', client_password: 'cp', id: 23}}
    - {{ username: 'api', password: 'pw', client_name: 'cl', client_password: 'cp', id: 24, beamline: mx2}}
base-url: https://portal.synchrotron.org.au:443
beamline: mx
epnalert-email-to: [staff@example.org, other@example.org]
epnalert-email-from: mxsync@example.org
epnalert-email-smtp: smtp.example.org:2525
epnalert-email-smtp-security: starttls
epnalert-email-smtp-username: mailer
epnalert-email-smtp-password: {_quoted(SECRET)}
epnalert-template-folder: {prefix}/etc
epnalert-template-text: epnalert-text.j2
epnalert-template-html: epnalert-html.j2
visit-day-range: 200
key-file: {key}
host: sftp.example.org
port: 2222
username: mx_user
destination-root-path: {deployment.destination}
sync-frequency-hours: 1
max-tasks: 1
log-level: logging.DEBUG
log-files:
    sync: {prefix}/var/log/sync.log
    epnalert: {prefix}/var/log/epnalert.log
    email: {prefix}/var/log/email.log
"""


def _quoted(text):
    return "'" + text.replace("'", "''") + "'"


def _lay_out_hpc_assyncy(deployment):
    """Write the files HPC ASSyncy's deployment leaves under the prefix, all root's, as it ran as root."""
    etc, log = deployment.prefix / "etc", deployment.prefix / "var" / "log"
    etc.mkdir(parents=True)
    log.mkdir(parents=True)
    (etc / "config.yml").write_text(_old_config(deployment))
    (etc / "config.yml").chmod(0o600)
    (etc / "ignore.yml").write_text(OLD_IGNORE)
    for name in ("epnalert-text.j2", "epnalert-html.j2"):
        shutil.copy(ROOT / "tests" / "data" / "legacy-templates" / name, etc / name)
    for name in ("sync.log", "sync.log.1", "epnalert.log", "email.log"):
        (log / name).write_text(OLD_LOG)
        (log / name).chmod(0o644)


def _snapshot(folder):
    """Given a folder, return {relative path: (bytes or None, uid, mode)} of everything below it."""
    found = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        content = path.read_bytes() if path.is_file() else None
        found[str(path.relative_to(folder))] = (content, info.st_uid, stat.S_IMODE(info.st_mode))
    return found


def _as_account(deployment, *command):
    """Run a command as the service account (it has no login shell: setpriv, not su)."""
    # pytest keeps its temporary folders private to root; the account must reach the prefix, as under /opt.
    for folder in deployment.base.parents:
        folder.chmod(folder.stat().st_mode | 0o001)
    deployment.base.chmod(deployment.base.stat().st_mode | 0o001)
    account = pwd.getpwnam(USER)
    return subprocess.run(
        ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups", *command],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )


@pytest.fixture(scope="module")
def upgrade(tmp_path_factory):
    """An HPC ASSyncy host: yield (deployment, {step: (returncode, output)}, snapshot before) after the README's steps."""
    _tool("ansible-playbook")
    _require_root()
    _require_programs()
    _remove_account(USER)
    deployment = Deployment(tmp_path_factory.mktemp("upgrade"), USER)
    deployment.write_variables()
    _lay_out_hpc_assyncy(deployment)
    before = _snapshot(deployment.prefix)
    runs = {}
    try:
        runs["check"] = deployment.play("--check", "--diff")
        runs["check-keeping"] = deployment.play("--check", "--diff", *KEEP)
        runs["after-checks"] = _snapshot(deployment.prefix)
        runs["account-after-checks"] = _user_exists(USER)
        runs["first"] = deployment.play(*KEEP)
        runs["second"] = deployment.play("--diff", *KEEP)
        yield deployment, runs, before
    finally:
        _remove_account(USER)
        shutil.rmtree(deployment.prefix, ignore_errors=True)


def test_check_mode_lists_each_setting_the_role_would_change_and_stops(upgrade):
    deployment, runs, before = upgrade
    returncode, output = runs["check"]
    assert returncode != 0, output[-3000:]
    assert "visit-day-range: installed 200, role 30 (mxsync_visit_day_range)" in output, output[-3000:]
    assert "log-level: installed logging.DEBUG, role INFO (mxsync_log_level)" in output
    # Only those two: equal settings written differently (a flow mapping, 1 and 1.0) are not differences.
    assert output.count("(mxsync_") == 2, output[-3000:]
    assert _recap(output)["changed"] == 0


def test_check_mode_on_the_old_host_shows_the_config_diff_masked_and_changes_nothing(upgrade):
    deployment, runs, before = upgrade
    returncode, output = runs["check-keeping"]
    assert returncode == 0, output[-4000:]
    assert runs["after-checks"] == before
    assert runs["account-after-checks"] is False
    assert f"+++ after: {deployment.config_file} (from the role, secrets masked)" in output
    assert "\n+visit-day-range: 200\n" in output
    assert "\n-log-level: logging.DEBUG\n" in output and '\n+log-level: "DEBUG"\n' in output
    assert "\n+# --- carried over: keys the role does not set" in output
    assert "\n epnalert-template-text: epnalert-text.j2\n" in output  # the same line, now in the carried section
    assert re.search(r'\n[ +]epnalert-email-smtp-password: "\*{8}"\n', output), output[-4000:]
    assert "password: \"********\", client_name: 'cl'" in output  # the old flow-style equipment, masked
    key = (deployment.base / "facility_key").read_text().splitlines()[1]
    assert "s3cret" not in output and key not in output
    assert "the account " + USER + " does not exist yet" in output


def test_upgrade_keeps_every_old_setting_and_says_what_it_did(upgrade):
    deployment, runs, _ = upgrade
    returncode, output = runs["first"]
    assert returncode == 0, output[-6000:]
    assert "carried over as they are (the role does not set them): epnalert-template-folder, " in output
    assert "epn_cap_map: its 2 entries move to" in output
    config = load_config(deployment.config_file)
    assert config.visit_day_range == 200 and config.log_level == logging.DEBUG
    assert config.template_folder == deployment.prefix / "etc"
    assert (config.template_text, config.template_html) == ("epnalert-text.j2", "epnalert-html.j2")
    map_file = deployment.prefix / "etc" / "epn_cap_map.yml"
    assert yaml.safe_load(map_file.read_text()) == {"12282": "ny79", "23456": "zz99"}
    assert config.epn_cap_map == {"12282": "ny79", "12345": "ab12", "23456": "zz99"}
    backups = sorted((deployment.prefix / "etc").glob("config.yml.*~"))
    assert [backup.read_text() for backup in backups] == [_old_config(deployment)]
    assert stat.S_IMODE(backups[0].stat().st_mode) == 0o600


def test_upgrade_imports_the_old_record_once_and_retires_it(upgrade):
    deployment, _, _ = upgrade
    assert deployment.ignore_file.read_text() == OLD_IGNORE
    etc = deployment.prefix / "etc"
    assert not (etc / "ignore.yml").exists()
    assert (etc / "ignore.yml.imported").read_text() == OLD_IGNORE


def test_after_the_upgrade_the_service_account_owns_the_old_logs_and_runs_the_tools(upgrade):
    deployment, _, _ = upgrade
    log = deployment.prefix / "var" / "log"
    account = pwd.getpwnam(USER)
    for name in ("sync.log", "sync.log.1", "epnalert.log", "email.log"):
        info = (log / name).stat()
        assert (info.st_uid, info.st_gid) == (account.pw_uid, grp.getgrnam(USER).gr_gid), name
        assert (log / name).read_text().startswith(OLD_LOG)
    config = str(deployment.config_file)
    checked = _as_account(deployment, str(deployment.prefix / "bin" / "mxsync"), "check", "--config", config)
    assert checked.returncode == 0, checked.stderr
    # One dry-run cycle: the facility host does not exist, so it fails (1), but not for want of its log (2).
    cycle = _as_account(deployment, str(deployment.prefix / "bin" / "mxsync"), "--config", config, "--once")
    assert cycle.returncode == 1, cycle.stderr
    assert "Permission denied" not in cycle.stderr
    assert (log / "sync.log").read_text().startswith(OLD_LOG) and len((log / "sync.log").read_text()) > len(OLD_LOG)


def test_second_run_after_the_upgrade_changes_nothing_and_keeps_the_carried_keys(upgrade):
    deployment, runs, _ = upgrade
    returncode, output = runs["second"]
    assert returncode == 0, output[-4000:]
    recap = _recap(output)
    assert (recap["changed"], recap["failed"]) == (0, 0), f"changed on the second run: {_changed_tasks(output)}"
    assert "secrets masked)" not in output  # no diff shown: nothing changes
    config = load_config(deployment.config_file)
    assert config.template_text == "epnalert-text.j2"
    assert len(list((deployment.prefix / "etc").glob("config.yml.*~"))) == 1


def test_a_carried_key_set_later_through_mxsync_config_extra_is_not_written_twice(upgrade):
    deployment, _, _ = upgrade
    returncode, output = deployment.play(
        "--tags",
        "mxsync_config",
        *KEEP,
        "-e",
        '{"mxsync_config_extra": {"epnalert-template-text": "epnalert-text.j2"}}',
    )
    assert returncode == 0, output[-4000:]
    text = deployment.config_file.read_text()
    assert text.count("epnalert-template-text:") == 1
    assert load_config(deployment.config_file).template_html == "epnalert-html.j2"
