"""Configs HPC ASSyncy accepted keep working: its SFTP login with an '@', email addresses as it took them, and more.

Unit tests of the parsing come first, then the real tools: ssh -G, rsync, the role's assert in
ansible-playbook, and epnalert, mxsync check and the failure alert against the simulated facility.
"""

import json
import os
import shutil
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mxsync.alerts import send_failure_alert
from mxsync.config import USERNAME_PATTERN, load_config
from mxsync.errors import ConfigError
from mxsync.rsync import RsyncRunner
from tests.test_epnalert import ok, populate, run_epnalert

ROOT = Path(__file__).resolve().parent.parent
LEGACY = ROOT / "tests" / "data" / "legacy-config.yml"
ASSERT_TASKS = ROOT / "ansible" / "roles" / "mxsync" / "tasks" / "assert.yml"
MXSYNC = Path(sys.executable).with_name("mxsync")
OLD_LOGIN = "help@massive.org.au"  # hard-coded in HPC ASSyncy's rsynctransfer.py


@pytest.fixture
def legacy(tmp_path):
    """Return a function that writes the old sample config with some keys changed and returns its path."""
    key = tmp_path / "your_path" / "etc" / "mx_key"
    key.parent.mkdir(parents=True)
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    key.chmod(0o600)

    def write(**changes):
        data = {**yaml.safe_load(LEGACY.read_text()), **changes}
        path = tmp_path / "config.yml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
        path.chmod(0o600)
        return path

    return write


def problems(write, **changes):
    with pytest.raises(ConfigError) as raised:
        load_config(write(**changes))
    return raised.value.problems


# ---------------------------------------------------------------- the SFTP login


def test_old_login_with_an_at_sign_loads(legacy):
    config = load_config(legacy(username=OLD_LOGIN))
    assert config.username == OLD_LOGIN
    assert config.ssh_target == "help@massive.org.au@sftp.synchrotron.org.au"


@pytest.mark.parametrize(
    "username",
    [
        "-oProxyCommand=touch /tmp/x",
        "help user",
        "help\tuser",
        "help:x",
        "help/x",
        "help@",
        "@massive.org.au",
        ".help",
        "help\x07",
        "help\nuser",
        "hélp",
    ],
)
def test_login_that_could_be_an_option_or_split_the_target_is_refused(legacy, username):
    (problem,) = problems(legacy, username=username)
    assert problem.startswith("username: expected a login name such as help@massive.org.au")


def test_check_accepts_the_old_login(legacy):
    result = subprocess.run(
        [str(MXSYNC), "check", "--config", str(legacy(username=OLD_LOGIN))],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "username" not in result.stderr


def _ssh_config_dump(arguments):
    """Run `ssh -G` (prints the settings ssh would use, connects nowhere) with `arguments`; return {key: value}."""
    dump = subprocess.run(
        ["ssh", "-G", *arguments],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=True,
    )
    return dict(line.split(" ", 1) for line in dump.stdout.splitlines() if " " in line)


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")
def test_ssh_reads_the_target_mxsync_builds_as_the_old_login_on_the_host(legacy):
    config = load_config(legacy(username=OLD_LOGIN, port=2222))
    arguments = RsyncRunner(config).ssh_arguments()[1:] + [config.ssh_target]
    settings = _ssh_config_dump(arguments)
    assert (settings["user"], settings["hostname"], settings["port"]) == (
        OLD_LOGIN,
        "sftp.synchrotron.org.au",
        "2222",
    )


@pytest.mark.skipif(
    shutil.which("ssh") is None or shutil.which("rsync") is None,
    reason="needs ssh and rsync",
)
def test_rsync_hands_ssh_the_old_login_and_the_host_apart(legacy, tmp_path):
    """Real rsync runs mxsync's command with a recording `ssh` first on PATH; ssh -G then reads what rsync passed."""
    config = load_config(legacy(username=OLD_LOGIN))
    bin_dir, record = tmp_path / "bin", tmp_path / "ssh-arguments.json"
    bin_dir.mkdir()
    recorder = bin_dir / "ssh"
    recorder.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\nsys.exit(255)\n"
    )
    recorder.chmod(0o755)
    command = RsyncRunner(config, dry_run=True).rsync_arguments("/data/mx/12282a", tmp_path / "destination")
    environment = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(
        command,
        env=environment,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )

    passed = json.loads(record.read_text())
    host_at = passed.index("sftp.synchrotron.org.au")
    assert passed[host_at - 2 : host_at] == ["-l", OLD_LOGIN] and passed[host_at + 1] == "rsync"
    settings = _ssh_config_dump(passed[: host_at + 1])
    assert (settings["user"], settings["hostname"]) == (
        OLD_LOGIN,
        "sftp.synchrotron.org.au",
    )


def test_the_login_reaches_the_facility_sshd_whole(facility):
    """The simulated sshd lets in only its own user, but logs the name each client asked for."""
    config = facility.write_config(username=OLD_LOGIN)
    result = subprocess.run(
        [str(MXSYNC), "check", "--config", str(config), "--connect"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert [line.split(":")[0] for line in failed] == [
        f"FAILED  SSH login and SFTP listing on {OLD_LOGIN}@127.0.0.1",
        f"FAILED  shared ssh connection to {OLD_LOGIN}@127.0.0.1",
        f"FAILED  rsync over ssh {OLD_LOGIN}@127.0.0.1",
    ], result.stdout
    asked_for = [
        line.split("Invalid user ", 1)[1].split(" from ")[0]
        for line in facility.sshd.log_file.read_text().splitlines()
        if "Invalid user " in line
    ]
    # paramiko (SFTP), ssh (the shared connection, then a plain login) and ssh under rsync.
    assert len(asked_for) >= 3 and set(asked_for) == {OLD_LOGIN}


def _assert_expression(variable):
    """Return the `ok` expression of the role's check of `variable`, as assert.yml has it."""
    tasks = yaml.safe_load(ASSERT_TASKS.read_text())
    (check,) = [item for task in tasks for item in task.get("loop") or () if item.get("var") == variable]
    return check["ok"]


def test_role_assert_takes_the_old_login_and_refuses_what_mxsync_refuses(tmp_path):
    playbook_tool = Path(sys.executable).with_name("ansible-playbook")
    if not playbook_tool.exists():
        pytest.skip("needs ansible-playbook (setup.cfg extra deploy-test)")
    names = [
        OLD_LOGIN,
        "mxdata",
        "-oProxyCommand=x",
        "help user",
        "help:x",
        "help/x",
        "help@",
        "@help",
    ]
    playbook, verdicts_file = tmp_path / "play.yml", tmp_path / "verdicts.json"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "hosts": "localhost",
                    "gather_facts": False,
                    "tasks": [
                        {
                            "ansible.builtin.set_fact": {
                                "verdicts": "{{ verdicts | default({}) | combine({item: verdict}) }}"
                            },
                            "loop": names,
                            "vars": {
                                "mxsync_sftp_username": "{{ item }}",
                                "verdict": _assert_expression("mxsync_sftp_username"),
                            },
                        },
                        {
                            "ansible.builtin.copy": {
                                "content": "{{ verdicts | to_json }}",
                                "dest": str(verdicts_file),
                                "mode": "0600",
                            }
                        },
                    ],
                }
            ]
        )
    )
    environment = {
        **os.environ,
        "ANSIBLE_LOCALHOST_WARNING": "0",
        "ANSIBLE_NOCOLOR": "1",
        "PATH": f"{playbook_tool.parent}{os.pathsep}{os.environ['PATH']}",
    }
    environment.pop("ANSIBLE_CONFIG", None)
    run = subprocess.run(
        [
            str(playbook_tool),
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            str(playbook),
        ],
        capture_output=True,
        text=True,
        env=environment,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    verdicts = json.loads(verdicts_file.read_text())
    assert verdicts == {name: name in (OLD_LOGIN, "mxdata") for name in names}
    assert verdicts == {name: USERNAME_PATTERN.fullmatch(name) is not None for name in names}  # as mxsync decides


# ---------------------------------------------------------------- email addresses

ACCEPTED_RECIPIENTS = [
    ("to@domain.edu", ["to@domain.edu"], ["to@domain.edu"]),
    ("a@x.edu, b@y.edu", ["a@x.edu", "b@y.edu"], ["a@x.edu", "b@y.edu"]),
    ("Staff <s@x.edu>", ["Staff <s@x.edu>"], ["s@x.edu"]),
    (
        '"Doe, Jane" <j@x.edu>, k@y.edu',
        ['"Doe, Jane" <j@x.edu>', "k@y.edu"],
        ["j@x.edu", "k@y.edu"],
    ),
    (
        "a@x.edu; b@y.edu",
        ["a@x.edu", "b@y.edu"],
        ["a@x.edu", "b@y.edu"],
    ),  # Outlook's separator
    ("Dr. Who <who@x.edu>", ['"Dr. Who" <who@x.edu>'], ["who@x.edu"]),
    ("Zoë Ångström <zoe@x.edu>", ["Zoë Ångström <zoe@x.edu>"], ["zoe@x.edu"]),
    (
        '"a \\"quoted\\" (name)" <q@x.edu>',
        ['"a \\"quoted\\" (name)" <q@x.edu>'],
        ["q@x.edu"],
    ),
    (
        ["Staff <s@x.edu>", "a@x.edu, b@y.edu"],
        ["Staff <s@x.edu>", "a@x.edu", "b@y.edu"],
        ["s@x.edu", "a@x.edu", "b@y.edu"],
    ),
]


@pytest.mark.parametrize("value, header_forms, bare", ACCEPTED_RECIPIENTS)
def test_recipients_as_the_old_tool_took_them(legacy, value, header_forms, bare):
    config = load_config(legacy(**{"epnalert-email-to": value, "mxsync-email-to": value}))
    assert list(config.email_to) == list(config.mxsync_email_to) == header_forms
    # What smtplib's MAIL FROM and RCPT TO send for each: the bare address.
    assert [smtplib.quoteaddr(address) for address in config.email_to] == [f"<{b}>" for b in bare]


@pytest.mark.parametrize(
    "value, bad",
    [
        ("a@x.edu b@y.edu", "of which a part is not an address"),
        ("a@x.edu junk", "'a@x.edujunk'"),  # the parser glued the words together
        ("not an address", "'not'"),
        ("Staff", "'Staff'"),
        (
            "a@x.edu@]:>b@y.edu",
            "of which a part is not an address",
        ),  # the parser would keep b@y.edu alone
        ("a@x.edu, b@y.edu>)(c@z.edu", "of which a part is not an address"),
        ("zoë@x.edu", "'zoë@x.edu'"),
        ("a@x.edu\nBcc: eve@x.edu", None),
        ("", None),
        (",", None),
        ([], None),
        (["a@x.edu", 7], None),
    ],
)
def test_recipients_that_are_not_addresses_are_refused(legacy, value, bad):
    (problem,) = problems(legacy, **{"epnalert-email-to": value})
    assert problem.startswith(
        "epnalert-email-to: expected email addresses ('a@x.edu', 'Staff <s@x.edu>'), "
        "separated by commas or as a YAML list, got "
    )
    assert bad is None or problem.endswith(
        bad if bad.startswith("of which") else f"in which {bad} is not an email address"
    )


def test_sender_with_a_display_name(legacy):
    config = load_config(legacy(**{"epnalert-email-from": '"MX sync, HPC" <mxsync@domain.edu>'}))
    assert config.email_from == '"MX sync, HPC" <mxsync@domain.edu>'
    assert smtplib.quoteaddr(config.email_from) == "<mxsync@domain.edu>"
    assert (
        load_config(legacy(**{"epnalert-email-from": "MX sync <mxsync@domain.edu>"})).email_from
        == "MX sync <mxsync@domain.edu>"
    )
    assert load_config(legacy()).email_from == "from@domain.edu"


@pytest.mark.parametrize(
    "value",
    ["a@x.edu, b@y.edu", "MX sync, HPC <mxsync@x.edu>", ["a@x.edu"], "MX sync", ""],
)
def test_sender_must_be_one_address(legacy, value):
    (problem,) = problems(legacy, **{"epnalert-email-from": value})
    assert problem.startswith("epnalert-email-from: expected one email address")


def test_epnalert_email_carries_the_names_in_headers_and_bare_addresses_in_the_envelope(
    facility,
):
    populate(facility)
    config = facility.write_config(
        epnalert_email_to="Staff <staff@hpc.example.org>, other@hpc.example.org; Zoë Ångström <zoe@hpc.example.org>",
        epnalert_email_from='"MX sync, HPC" <mxsync@hpc.example.org>',
    )
    ok(run_epnalert(config))

    [received] = facility.smtp.wait_for(1)
    assert received.mail_from == "mxsync@hpc.example.org"
    assert received.rcpt_tos == [
        "staff@hpc.example.org",
        "other@hpc.example.org",
        "zoe@hpc.example.org",
    ]
    message = received.message
    assert [(a.display_name, a.addr_spec) for a in message["From"].addresses] == [
        ("MX sync, HPC", "mxsync@hpc.example.org")
    ]
    assert [(a.display_name, a.addr_spec) for a in message["To"].addresses] == [
        ("Staff", "staff@hpc.example.org"),
        ("", "other@hpc.example.org"),
        ("Zoë Ångström", "zoe@hpc.example.org"),
    ]
    assert message["Message-ID"].endswith("@hpc.example.org>")
    assert received.raw.isascii()  # the non-ASCII name went as an encoded word
    email_log = (facility.workdir / "log" / "email.log").read_text(encoding="utf-8")
    assert (
        "Sent to Staff <staff@hpc.example.org>, other@hpc.example.org, Zoë Ångström <zoe@hpc.example.org>" in email_log
    )


def test_failure_alert_goes_to_mxsync_recipients_with_names(legacy, smtp_sink):
    config = load_config(
        legacy(
            **{
                "epnalert-email-smtp": f"{smtp_sink.host}:{smtp_sink.port}",
                "epnalert-email-from": "MX sync <mxsync@domain.edu>",
                "mxsync-email-to": "HPC ops <ops@domain.edu>, oncall@domain.edu",
            }
        )
    )
    epns = {
        "12282a": {
            "failures": 3,
            "last_attempt": "2024-05-01T01:00:00+00:00",
            "last_error": "rsync exit 23",
        }
    }
    assert send_failure_alert(config, epns, {}) is True

    [received] = smtp_sink.wait_for(1)
    assert (received.mail_from, received.rcpt_tos) == (
        "mxsync@domain.edu",
        ["ops@domain.edu", "oncall@domain.edu"],
    )
    assert str(received.message["To"]) == "HPC ops <ops@domain.edu>, oncall@domain.edu"
    assert str(received.message["From"]) == "MX sync <mxsync@domain.edu>"


# ---------------------------------------------------------------- other keys HPC ASSyncy took


@pytest.mark.parametrize("comment", [["line one", "line two"], {"by": "staff"}, True, 2024, None])
def test_comment_may_hold_anything(legacy, comment):
    assert load_config(legacy(comment=comment)).warnings == ()


def test_cap_map_entry_without_a_folder_is_unmapped_with_a_warning(legacy):
    config = load_config(legacy(epn_cap_map={"12282": "ny79", "12283": None, "12284": 1234}))
    assert config.project_for("12282") == "ny79"
    assert config.project_for("12283") is None
    assert config.project_for("12284") == "1234"  # HPC ASSyncy wrote the number into the path
    (warning,) = config.warnings
    assert warning.endswith(
        "epn_cap_map.12283: no project folder given, so its EPNs are treated as unmapped: "
        "not synced, and listed by epnalert; add the folder name"
    )


def test_cap_map_key_written_without_quotes_matches(legacy):
    """HPC ASSyncy looked the number up as text, so `12282: ny79` never matched there (see the README)."""
    assert load_config(legacy(epn_cap_map={12282: "ny79"})).project_for("12282") == "ny79"


@pytest.mark.parametrize("days, expected", [(200, 200), (7.5, 7.5), (30.0, 30), ("200", 200)])
def test_visit_day_range_takes_what_timedelta_took(legacy, days, expected):
    value = load_config(legacy(**{"visit-day-range": days})).visit_day_range
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("days", [0, -1, True, "7.5x", 1e9])
def test_visit_day_range_still_refuses_nonsense(legacy, days):
    (problem,) = problems(legacy, **{"visit-day-range": days})
    assert problem.startswith("visit-day-range: expected a")
