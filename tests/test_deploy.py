"""Deployment: the files in etc/ for installs by hand, and the Ansible role applied for real.

The role runs with `ansible-playbook -i localhost, -c local` into a throwaway prefix (venv,
config, state, logs and the unit file all under a temporary directory; systemd is not touched),
with a test-only service account. That part needs root and ansible-playbook: without them the
tests skip and say why, except under CI=true, where they fail instead.
"""

import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import yaml

from mxsync.config import EQUIPMENT_KEYS, LOG_FILE_KEYS, TOP_LEVEL, load_config

ROOT = Path(__file__).resolve().parents[1]
ETC = ROOT / "etc"
ANSIBLE_DIR = ROOT / "ansible"
ROLE = ANSIBLE_DIR / "roles" / "mxsync"
IN_CI = os.environ.get("CI") == "true"

# Test-only accounts, so that the machine keeps no trace of a real "mxsync"; unique per test run,
# so that two runs on one machine (a developer's and CI) do not share an account and its crontab.
TEST_USER = f"mxsync-ci-{os.getpid()}"
BAD_USER = f"mxsync-ci-bad-{os.getpid()}"

# The order of the keys in HPC ASSyncy's sample config.yml, which etc/config.yml keeps.
OLD_KEYS = (
    "comment",
    "epn_cap_map",
    "ignore",
    "equipment",
    "base-url",
    "beamline",
    "epnalert-email-to",
    "epnalert-email-from",
    "epnalert-email-smtp",
    "epnalert-template-folder",
    "epnalert-template-text",
    "epnalert-template-html",
    "visit-day-range",
    "key-file",
    "host",
    "destination-root-path",
    "sync-frequency-hours",
    "max-tasks",
    "log-level",
    "log-files",
)

# The defaults of the role's layout variables, to render the unit as etc/ ships it.
DEFAULT_UNIT_VARIABLES = {
    "mxsync_user": "mxsync",
    "mxsync_group": "mxsync",
    "mxsync_venv_dir": "/opt/mx_sync",
    "mxsync_config_dir": "/opt/mx_sync/etc",
    "mxsync_state_dir": "/opt/mx_sync/var/lib",
    "mxsync_log_dir": "/opt/mx_sync/var/log",
    "mxsync_destination_root": "/scratch",
    "mxsync_systemd_protect_home": "yes",
}


# ---------------------------------------------------------------- helpers


def _missing(reason):
    """Skip with `reason`, or fail under CI=true, where every deployment test must run."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: deployment tests must run; install with pip install '.[deploy-test]')")
    pytest.skip(reason)


def _tool(name):
    """Given an Ansible/lint tool name, return its path (beside this Python first) or skip/fail."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.exists() else shutil.which(name)
    if path is None:
        _missing(f"{name} is not installed (it comes with the setup.cfg extra deploy-test)")
    return path


# The programs the role's tests run themselves, and the Debian package of each.
PROGRAMS = {
    "crontab": "cron",
    "userdel": "passwd",
    "groupdel": "passwd",
    "ssh-keygen": "openssh-client",
}


def _require_programs():
    """Skip (fail under CI=true) naming each missing program and its package, instead of FileNotFoundError."""
    missing = [f"{name} (Debian package {package})" for name, package in PROGRAMS.items() if not shutil.which(name)]
    if missing:
        _missing(f"missing {', '.join(missing)}; scripts/bootstrap installs them when run as root")


def _require_root():
    if os.geteuid() != 0:
        _missing("applying the role needs root: it creates a service account, installs packages, writes a crontab")


def _environment():
    """The environment for the Ansible tools: plain output, this venv's tools first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_RETRY_FILES_ENABLED="0",
        ANSIBLE_LOCALHOST_WARNING="0",
        PY_COLORS="0",
        NO_COLOR="1",
    )
    env.pop("ANSIBLE_CONFIG", None)
    return env


def _run(command, **kwargs):
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=_environment(),
        cwd=ROOT,
        check=False,
        **kwargs,
    )


def _recap(output):
    """Given ansible-playbook output, return the PLAY RECAP counters of localhost as a dict."""
    match = re.search(r"^localhost\s*:\s*(.*)$", output, re.MULTILINE)
    assert match, f"no PLAY RECAP line in the output:\n{output[-3000:]}"
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match.group(1))}


def _changed_tasks(output):
    """Given ansible-playbook output, return the names of the tasks that reported a change."""
    names, task = [], None
    for line in output.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            task = line[line.index("[") + 1 : line.rindex("]")]
        elif line.startswith("changed:") and task not in names:
            names.append(task)
    return names


def _user_exists(name):
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _remove_account(name):
    """Remove a test account and its crontab, if there (call _require_programs first)."""
    for command in (
        ["crontab", "-r", "-u", name],
        ["userdel", name],
        ["groupdel", name],
    ):
        subprocess.run(command, capture_output=True, check=False)


class _Vaulted(str):
    """A value written to the vars file as an ansible-vault `!vault |` block."""


class _VarsDumper(yaml.SafeDumper):
    """Writes inventory variables, _Vaulted ones as `!vault |` blocks."""


_VarsDumper.add_representer(_Vaulted, lambda dumper, value: dumper.represent_scalar("!vault", value, style="|"))


def _vault(text, password_file):
    """Given a secret, return it encrypted with ansible-vault (as the HPC team's inventory would hold it)."""
    result = _run(
        [
            _tool("ansible-vault"),
            "encrypt_string",
            "--vault-password-file",
            str(password_file),
            text,
        ]
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = next(index for index, line in enumerate(lines) if line.strip().startswith("$ANSIBLE_VAULT"))
    return _Vaulted("\n".join(line.strip() for line in lines[start:] if line.strip()) + "\n")


def _render_unit_template(**variables):
    """Render the role's unit template with plain Jinja; return the text after its header comment."""
    text = (ROLE / "templates" / "mx_sync.service.j2").read_text()
    template = jinja2.Template(text, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    return _body(template.render(ansible_managed="Ansible managed", **variables))


def _body(unit_text):
    """Given a unit file, return it without its leading comment block (up to the first blank line)."""
    return unit_text.split("\n\n", 1)[1]


def _systemd_verify(unit_path):
    """Run `systemd-analyze verify` on a unit file; return its output (empty when clean) or skip."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run([tool, "verify", str(unit_path)], capture_output=True, text=True, check=False)
    # verify exits 0 even for unknown keys or unparsable values; it only prints them.
    return result.returncode, (result.stdout + result.stderr).strip()


# ---------------------------------------------------------------- etc/ for installs by hand


def test_sample_config_loads_with_the_project_loader(tmp_path):
    config = load_config(ETC / "config.yml", check_files=False)  # it names /opt/mx_sync/etc/mx_key
    assert config.host == "sftp.synchrotron.org.au"
    assert str(config.ignore_file) == "/opt/mx_sync/var/lib/ignore.yml"
    assert str(config.log_files.sync) == "/opt/mx_sync/var/log/sync.log"
    assert [warning for warning in config.warnings if "unknown key" in warning] == []


def test_sample_config_lists_every_key_with_a_comment_old_keys_first_in_the_old_order():
    lines = (ETC / "config.yml").read_text().splitlines()
    positions = {}
    for number, line in enumerate(lines):
        match = re.match(r"^(?:# )?([a-z_-]+):", line)
        if match and match.group(1) in TOP_LEVEL and match.group(1) not in positions:
            positions[match.group(1)] = number
    assert sorted(positions) == sorted(TOP_LEVEL), f"missing: {sorted(set(TOP_LEVEL) - set(positions))}"
    for key, number in positions.items():
        assert lines[number - 1].startswith("#"), f"{key} has no comment above it"
    old_order = sorted(OLD_KEYS, key=positions.get)
    assert old_order == list(OLD_KEYS)
    last_old = max(positions[key] for key in OLD_KEYS)
    assert all(positions[key] > last_old for key in TOP_LEVEL if key not in OLD_KEYS)
    text = "\n".join(lines)
    for key in EQUIPMENT_KEYS:
        assert re.search(rf"^#\s+{key}\s", text, re.MULTILINE), f"equipment key {key} is not described"
    for key in LOG_FILE_KEYS:
        assert re.search(rf"^  {key}: /opt/mx_sync/var/log/{key}\.log$", text, re.MULTILINE)


def test_sample_ignore_is_an_empty_record_and_the_role_ships_the_same_file():
    assert yaml.safe_load((ETC / "ignore.yml").read_text()) == {"previouslySynched": []}
    assert (ROLE / "files" / "ignore.yml").read_bytes() == (ETC / "ignore.yml").read_bytes()


def test_sample_crontab_runs_epnalert_at_one_with_a_path():
    lines = [line for line in (ETC / "crontab").read_text().splitlines() if line and not line.startswith("#")]
    assert "PATH=/usr/local/bin:/usr/bin:/bin" in lines
    assert "0 1 * * * mxsync /opt/mx_sync/bin/epnalert --config /opt/mx_sync/etc/config.yml" in lines


def test_role_unit_template_renders_to_the_etc_unit():
    etc_unit = (ETC / "mx_sync.service").read_text()
    assert _render_unit_template(**DEFAULT_UNIT_VARIABLES) == _body(etc_unit)


def test_etc_unit_has_the_required_settings():
    settings = [line for line in (ETC / "mx_sync.service").read_text().splitlines() if line and line[0] not in "#;"]
    for expected in (
        "Type=notify",
        "NotifyAccess=main",
        "ExecStart=/opt/mx_sync/bin/mxsync --config /opt/mx_sync/etc/config.yml --execute",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "RestartPreventExitStatus=2",
        "User=mxsync",
        "Restart=on-failure",
        "KillMode=mixed",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "Wants=network-online.target",
        "After=network-online.target",
    ):
        assert expected in settings
    # rsync sets the set-group-ID bit on directories (--chmod=Dg+s); RestrictSUIDSGID would refuse it.
    assert not any(line.startswith("RestrictSUIDSGID") for line in settings)
    # RestartPreventExitStatus= covers the main process only: a config check in ExecStartPre= that
    # exits 2 is restarted every RestartSec= (tests/test_systemd.py shows it under a real systemd).
    assert not any(line.startswith("ExecStartPre") for line in settings)


def test_etc_unit_passes_systemd_analyze_verify(tmp_path):
    # verify wants the ExecStart binary to exist: point the unit at a stand-in.
    binary = tmp_path / "bin" / "mxsync"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    unit = tmp_path / "mx_sync.service"
    unit.write_text((ETC / "mx_sync.service").read_text().replace("/opt/mx_sync/bin/mxsync", str(binary)))
    returncode, output = _systemd_verify(unit)
    assert (returncode, output) == (0, "")


# ---------------------------------------------------------------- linters


def test_yamllint_is_clean():
    result = _run(
        [
            _tool("yamllint"),
            "--strict",
            "-c",
            str(ROOT / ".yamllint"),
            "ansible",
            "etc",
            ".yamllint",
            ".ansible-lint",
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ansible_lint_is_clean():
    result = _run([_tool("ansible-lint"), "ansible/"])
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- the role, applied for real


class Deployment:
    """One throwaway install: its paths, and a way to run the playbook against it."""

    def __init__(self, base, user, ansible_bin=None):
        self.base = base
        self.user = user
        # The folder of the ansible-playbook to run (another ansible-core); default, this venv's.
        self.ansible_bin = ansible_bin
        self.prefix = base / "opt" / "mx_sync"
        self.unit_dir = base / "systemd"
        self.destination = base / "scratch"
        self.vars_file = base / "vars.yml"
        self.vault_password_file = base / "vault-password"

    @property
    def config_file(self):
        return self.prefix / "etc" / "config.yml"

    @property
    def ignore_file(self):
        return self.prefix / "var" / "lib" / "ignore.yml"

    def write_variables(self):
        """Write the inventory variables an HPC team would have, one secret from ansible-vault."""
        self.base.mkdir(parents=True, exist_ok=True)
        self.destination.mkdir(exist_ok=True)
        self.vault_password_file.write_text("test vault password\n")
        key = self.base / "facility_key"
        if not key.exists():
            subprocess.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "test",
                    "-f",
                    str(key),
                ],
                check=True,
            )
        host_key = " ".join(Path(f"{key}.pub").read_text().split()[:2])
        secret = _vault("s3cret: 'with #quotes\"", self.vault_password_file)
        variables = {
            "mxsync_prefix": str(self.prefix),
            "mxsync_systemd_unit_dir": str(self.unit_dir),
            "mxsync_manage_service": False,
            # sftp.example.org does not exist: tests/test_deploy_upgrade_cron.py runs the check against the facility.
            "mxsync_check_connect": False,
            "mxsync_user": self.user,
            "mxsync_group": self.user,
            "mxsync_host": "sftp.example.org",
            "mxsync_port": 2222,
            "mxsync_sftp_username": "mx_user",
            "mxsync_ssh_private_key": key.read_text(),
            "mxsync_ssh_known_hosts": [f"[sftp.example.org]:2222 {host_key}"],
            "mxsync_equipment": [
                {
                    "id": 23,
                    "username": "api",
                    "password": secret,
                    "client_name": "cl",
                    "client_password": "cp",
                },
                {
                    "id": 24,
                    "username": "api",
                    "password": "pw",
                    "client_name": "cl",
                    "client_password": "cp",
                    "beamline": "mx2",
                },
            ],
            "mxsync_epn_cap_map": {"12282": "ny79", 12345: "ab12"},
            "mxsync_destination_root": str(self.destination),
            "mxsync_email_to": ["staff@example.org", "other@example.org"],
            "mxsync_email_from": "mxsync@example.org",
            "mxsync_smtp": "smtp.example.org:2525",
            "mxsync_smtp_security": "starttls",
            "mxsync_smtp_username": "mailer",
            "mxsync_smtp_password": secret,
            "mxsync_cron_mailto": "ops@example.org",
            "mxsync_config_extra": {
                "rsync-bwlimit": "50M",
                "destination-must-be-mount-point": False,
            },
        }
        self.vars_file.write_text(yaml.dump(variables, Dumper=_VarsDumper, sort_keys=False))

    def play(self, *extra):
        """Run the playbook on localhost with these variables; return (returncode, output)."""
        interpreter = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        playbook = str(self.ansible_bin / "ansible-playbook") if self.ansible_bin else _tool("ansible-playbook")
        command = [
            playbook,
            "-i",
            "localhost,",
            "-c",
            "local",
            str(ANSIBLE_DIR / "playbook.yml"),
            "--vault-password-file",
            str(self.vault_password_file),
            "-e",
            f"@{self.vars_file}",
            "-e",
            "mxsync_hosts=localhost",
            "-e",
            "ansible_become=false",  # already root
            "-e",
            f"ansible_python_interpreter={interpreter}",
            *extra,
        ]
        result = _run(command)
        return result.returncode, result.stdout + result.stderr


PREVIOUSLY_SYNCHED = b"# kept by hand\npreviouslySynched:\n- 12282a\n- 12283b\n"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """Apply the playbook twice to one throwaway prefix; yield (deployment, first output, second output)."""
    _tool("ansible-playbook")
    _require_root()
    _require_programs()
    _remove_account(TEST_USER)
    deployment = Deployment(tmp_path_factory.mktemp("deploy"), TEST_USER)
    deployment.write_variables()
    # A record of synced EPNs from an earlier install: no deployment may touch it.
    deployment.ignore_file.parent.mkdir(parents=True)
    deployment.ignore_file.write_bytes(PREVIOUSLY_SYNCHED)
    try:
        first_rc, first = deployment.play()
        assert first_rc == 0, f"first run failed:\n{first[-6000:]}"
        second_rc, second = deployment.play()
        assert second_rc == 0, f"second run failed:\n{second[-6000:]}"
        yield deployment, first, second
    finally:
        _remove_account(TEST_USER)
        shutil.rmtree(deployment.prefix, ignore_errors=True)


def test_first_run_changes_and_second_run_changes_nothing(deployed):
    _, first, second = deployed
    assert _recap(first)["changed"] > 0
    recap = _recap(second)
    assert (recap["changed"], recap["failed"]) == (0, 0), f"changed on the second run: {_changed_tasks(second)}"


def test_check_mode_reports_a_config_change_without_showing_secrets(deployed):
    deployment, _, _ = deployed
    before = deployment.config_file.read_bytes()
    returncode, output = deployment.play("--check", "--diff", "-e", "mxsync_max_tasks=2")
    assert returncode == 0, output[-4000:]
    assert _changed_tasks(output) == [
        "mxsync : Show the changes to config.yml, secrets masked",
        "mxsync : Render config.yml",
    ]
    assert "\n-max-tasks: 1\n+max-tasks: 2\n" in output
    assert deployment.config_file.read_bytes() == before
    key = (deployment.base / "facility_key").read_text().splitlines()[1]
    assert "s3cret" not in output and key not in output


def test_config_that_mxsync_check_refuses_fails_the_play_and_keeps_the_installed_one(
    deployed,
):
    deployment, _, _ = deployed
    before = deployment.config_file.read_bytes()
    returncode, output = deployment.play(
        "--tags",
        "mxsync_config",
        "-e",
        '{"mxsync_config_extra": {"rsync-bwlimit": "fast"}}',
    )
    assert returncode != 0
    assert "rsync-bwlimit: expected a bandwidth" in output, output[-4000:]
    assert deployment.config_file.read_bytes() == before


def test_venv_holds_working_commands(deployed):
    deployment, _, _ = deployed
    for command in ("mxsync", "epnalert"):
        result = subprocess.run(
            [str(deployment.prefix / "bin" / command), "--help"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "--config" in result.stdout or "usage" in result.stdout


def test_config_is_rendered_for_the_service_account_only(deployed):
    deployment, _, _ = deployed
    info = deployment.config_file.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == pwd.getpwnam(TEST_USER).pw_uid
    assert "Ansible managed" in deployment.config_file.read_text()
    config = load_config(deployment.config_file)
    assert config.warnings == ()
    assert config.host == "sftp.example.org" and config.port == 2222 and config.username == "mx_user"
    assert config.epn_cap_map == {"12282": "ny79", "12345": "ab12"}
    assert [(e.id, e.beamline, e.password) for e in config.equipment] == [
        (
            23,
            "mx",
            "s3cret: 'with #quotes\"",
        ),  # decrypted from ansible-vault, quoting intact
        (24, "mx2", "pw"),
    ]
    assert config.smtp.password == "s3cret: 'with #quotes\"" and config.smtp.security == "starttls"
    assert config.email_to == ("staff@example.org", "other@example.org")
    assert config.rsync_bwlimit == "50M"
    prefix = deployment.prefix
    assert config.ignore_file == prefix / "var" / "lib" / "ignore.yml"
    assert config.state_dir == prefix / "var" / "lib"
    assert config.key_file == prefix / "etc" / "mx_key"
    assert config.known_hosts == prefix / "etc" / "known_hosts"
    assert config.log_files.sync == prefix / "var" / "log" / "sync.log"
    assert (config.log_max_bytes, config.log_backup_count) == (10485760, 5)
    assert config.destination_root == deployment.destination


def test_account_and_directories(deployed):
    deployment, _, _ = deployed
    account = pwd.getpwnam(TEST_USER)
    assert account.pw_shell in ("/usr/sbin/nologin", "/sbin/nologin")
    assert account.pw_dir == str(deployment.prefix / "var" / "lib")
    assert account.pw_uid < 1000  # a system account
    group = grp.getgrnam(TEST_USER).gr_gid

    def owner_and_mode(path):
        info = path.stat()
        return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)

    prefix = deployment.prefix
    assert owner_and_mode(prefix / "etc") == (0, group, 0o750)
    assert owner_and_mode(prefix / "var" / "lib") == (account.pw_uid, group, 0o750)
    assert owner_and_mode(prefix / "var" / "log") == (account.pw_uid, group, 0o750)
    # Parents are left to root, whatever the directories below them get.
    assert owner_and_mode(prefix)[0] == 0 and owner_and_mode(prefix / "var")[0] == 0
    assert owner_and_mode(prefix / "bin" / "mxsync")[0] == 0  # the service cannot change its own code


def test_ssh_key_and_host_keys(deployed):
    deployment, _, _ = deployed
    key = deployment.prefix / "etc" / "mx_key"
    assert key.read_text() == (deployment.base / "facility_key").read_text()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.stat().st_uid == pwd.getpwnam(TEST_USER).pw_uid
    known_hosts = (deployment.prefix / "etc" / "known_hosts").read_text().splitlines()
    assert [line.split()[:2] for line in known_hosts if not line.startswith("#")] == [
        ["[sftp.example.org]:2222", "ssh-ed25519"]
    ]
    # ssh itself finds the host key under that name.
    found = subprocess.run(
        [
            "ssh-keygen",
            "-F",
            "[sftp.example.org]:2222",
            "-f",
            str(deployment.prefix / "etc" / "known_hosts"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert found.returncode == 0, found.stderr


def test_existing_ignore_file_is_left_byte_for_byte(deployed):
    deployment, _, _ = deployed
    assert deployment.ignore_file.read_bytes() == PREVIOUSLY_SYNCHED


def test_crontab_of_the_service_account_runs_epnalert_at_one(deployed):
    deployment, _, _ = deployed
    result = subprocess.run(["crontab", "-l", "-u", TEST_USER], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert 'PATH="/usr/local/bin:/usr/bin:/bin"' in lines
    assert 'MAILTO="ops@example.org"' in lines
    marker = lines.index("#Ansible: mxsync crontab")
    prefix = deployment.prefix
    assert lines[marker + 1] == f"0 1 * * * {prefix}/bin/epnalert --config {prefix}/etc/config.yml"


def test_unit_file_is_installed_and_passes_systemd_analyze_verify(deployed):
    deployment, _, _ = deployed
    unit = deployment.unit_dir / "mx_sync.service"
    text = unit.read_text()
    prefix = deployment.prefix
    assert f"ExecStart={prefix}/bin/mxsync --config {prefix}/etc/config.yml --execute" in text
    assert f"User={TEST_USER}" in text
    assert f"-{deployment.destination}" in text
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert _systemd_verify(unit) == (0, "")


def test_ignore_file_of_hpc_assyncy_is_taken_over_once(deployed):
    deployment, _, _ = deployed
    legacy = deployment.base / "old-etc" / "ignore.yml"
    legacy.parent.mkdir()
    legacy.write_bytes(PREVIOUSLY_SYNCHED + b"- 99999z\n")
    state_dir = deployment.base / "state2"
    state_dir.mkdir()
    returncode, output = deployment.play(
        "--tags",
        "mxsync_ignore",
        "-e",
        f"mxsync_state_dir={state_dir}",
        "-e",
        f"mxsync_ignore_import_from={legacy}",
    )
    assert returncode == 0, output[-4000:]
    assert (state_dir / "ignore.yml").read_bytes() == PREVIOUSLY_SYNCHED + b"- 99999z\n"
    assert (state_dir / "ignore.yml").stat().st_uid == pwd.getpwnam(TEST_USER).pw_uid
    # Retired once imported: were the new file deleted, the old record would not come back.
    assert not legacy.exists()
    assert legacy.with_name("ignore.yml.imported").read_bytes() == PREVIOUSLY_SYNCHED + b"- 99999z\n"


@pytest.mark.parametrize(
    "override, message",
    [
        ('{"mxsync_host": ""}', "mxsync_host: set it to the facility SFTP host name"),
        (
            # Caught by meta/argument_specs.yml, before the assert task.
            '{"mxsync_equipment": [{"id": "MX1", "username": "u", "password": "p", "client_name": "c", "client_password": "c"}]}',
            "argument 'id' is of type str found in 'mxsync_equipment'",
        ),
        (
            '{"mxsync_ssh_known_hosts": ["other.example.org ssh-ed25519 AAAA"]}',
            "mxsync_ssh_known_hosts: give the host key lines",
        ),
        ('{"mxsync_user": "root"}', "mxsync_user: name a dedicated service account"),
    ],
    ids=[
        "missing-host",
        "equipment-id-not-an-integer",
        "host-key-of-another-host",
        "root-as-service-account",
    ],
)
def test_bad_variable_fails_the_play_before_anything_changes(tmp_path, override, message):
    _tool("ansible-playbook")
    _require_root()
    _require_programs()
    _remove_account(BAD_USER)
    deployment = Deployment(tmp_path / "bad", BAD_USER)
    deployment.write_variables()
    deployment.destination.rmdir()
    try:
        returncode, output = deployment.play("-e", override)
        assert returncode != 0, output[-4000:]
        assert message in output, output[-4000:]
        assert _recap(output)["changed"] == 0
        assert sorted(path.name for path in deployment.base.iterdir()) == [
            "facility_key",
            "facility_key.pub",
            "vars.yml",
            "vault-password",
        ]
        assert not _user_exists(BAD_USER)
    finally:
        _remove_account(BAD_USER)


def test_python_the_service_cannot_run_fails_the_play_before_anything_changes(tmp_path):
    # ProtectHome=yes hides /root and /home from the service (203/EXEC): a Python reached through a
    # symlink into /root (pyenv's, say), and an old venv made from a Python under /home, are refused.
    _tool("ansible-playbook")
    _require_root()
    _require_programs()
    _remove_account(BAD_USER)
    deployment = Deployment(tmp_path / "bad", BAD_USER)
    deployment.write_variables()
    python = tmp_path / "python3"
    python.symlink_to("/root/.pyenv-of-a-test/versions/3.11.7/bin/python3.11")
    old_venv = tmp_path / "old-venv"
    old_venv.mkdir()
    (old_venv / "pyvenv.cfg").write_text("home = /home/alice/.pyenv/versions/3.11.7/bin\nversion = 3.11.7\n")
    try:
        returncode, output = deployment.play("-e", f"mxsync_python={python}", "-e", f"mxsync_venv_dir={old_venv}")
        assert returncode != 0, output[-4000:]
        expected = (
            "mxsync_python, mxsync_venv_dir: /root/.pyenv-of-a-test/versions/3.11.7/bin/python3.11, "
            "/home/alice/.pyenv/versions/3.11.7/bin lies under /root, /home or /run/user, which mx_sync.service "
            "hides (ProtectHome=yes), so the service would fail to start (status 203/EXEC)"
        )
        assert expected in output, output[-4000:]
        assert "after removing the venv made from /home/alice/.pyenv/versions/3.11.7/bin" in output
        assert _recap(output)["changed"] == 0
        assert not _user_exists(BAD_USER)
        assert sorted(path.name for path in old_venv.iterdir()) == ["pyvenv.cfg"]
    finally:
        _remove_account(BAD_USER)


# ---------------------------------------------------------------- the role's documentation


def test_every_role_variable_has_a_commented_default_and_an_argument_spec():
    defaults_text = (ROLE / "defaults" / "main.yml").read_text()
    defaults = yaml.safe_load(defaults_text)
    options = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    assert sorted(defaults) == sorted(options)
    for name, spec in options.items():
        assert spec.get("description") and spec.get("type"), name
        if "default" in spec:
            assert spec["default"] == defaults[name], name
    # Each variable sits in a group of variables right below a comment.
    lines = defaults_text.splitlines()
    for number, line in enumerate(lines):
        if re.match(r"^mxsync_\w+:", line):
            above = number - 1
            while above >= 0 and (re.match(r"^mxsync_\w+:", lines[above]) or lines[above].startswith(" ")):
                above -= 1
            assert lines[above].startswith("#"), f"{line.split(':')[0]} has no comment"
    # Every variable the role uses is one of them.
    used = set()
    for path in ROLE.rglob("*"):
        # Ansible leaves the bytecode of the role's filter plugins in __pycache__ (without PYTHONDONTWRITEBYTECODE).
        if path.is_file() and path.suffix != ".py" and "__pycache__" not in path.parts:
            text = re.sub(r"^\s*tags:.*$", "", path.read_text(), flags=re.MULTILINE)  # tags are not variables
            used |= set(re.findall(r"(?<![\w])mxsync_[a-z_]+", text))
    # The role's own filters and actions are named mxsync_* too, and are not variables.
    plugins = {path.stem for path in (ROLE / "action_plugins").glob("*.py")}
    for path in (ROLE / "filter_plugins").glob("*.py"):
        plugins |= set(re.findall(r'"(mxsync_\w+)": ', path.read_text()))
    used -= plugins
    assert used <= set(defaults), f"used but not documented: {sorted(used - set(defaults))}"
