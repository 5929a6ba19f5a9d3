"""The simulated facility is real: ssh, rsync, SFTP, HTTP and SMTP clients all work against it."""

import os
import shlex
import smtplib
import socket
import stat
import subprocess
import time
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from pathlib import Path

import paramiko
import pytest
import requests
import yaml

from mxsync.config import load_config
from tests.facility import Credentials, Facility, SmtpSink, make_experiment, tree_manifest, wanted

SSH_TIMEOUT = 20
HOST_KEY_CHANGED = "REMOTE HOST IDENTIFICATION HAS CHANGED"


def run(command, **options):
    return subprocess.run(command, capture_output=True, text=True, timeout=SSH_TIMEOUT, **options)


def sftp_client(server):
    """Return a paramiko SSHClient logged in to `server` with strict host key checking."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(server.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        server.host,
        port=server.port,
        username=server.username,
        key_filename=str(server.client_key),
        allow_agent=False,
        look_for_keys=False,
        timeout=SSH_TIMEOUT,
    )
    return client


def processes_mentioning(text):
    """Return the pids whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


# ---------------------------------------------------------------- ssh, rsync and SFTP


def test_ssh_logs_in_as_the_current_user(ssh_server):
    result = run(ssh_server.ssh_command("id", "-un"))

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ssh_server.username


def test_ssh_refuses_a_key_it_does_not_know(ssh_server, tmp_path):
    stranger = tmp_path / "stranger"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    command = ssh_server.ssh_command("true")
    command[command.index(str(ssh_server.client_key))] = str(stranger)

    result = run(command)

    assert result.returncode == 255
    assert "Permission denied" in result.stderr


def test_rsync_over_ssh_copies_an_experiment_exactly(facility, tmp_path):
    experiment = facility.add_experiment("mx", "12282a")
    shell = shlex.join(facility.sshd.ssh_base_command())

    everything = run(["rsync", "-a", "-e", shell, f"{facility.sshd.target}:{experiment}/", str(tmp_path / "all")])
    filtered = run(
        [
            "rsync",
            "-a",
            "--include",
            ".info",
            "--exclude",
            ".*",
            "-e",
            shell,
            f"{facility.sshd.target}:{experiment}/",
            str(tmp_path / "filtered"),
        ]
    )

    assert everything.returncode == 0, everything.stderr
    assert filtered.returncode == 0, filtered.stderr
    assert tree_manifest(tmp_path / "all") == tree_manifest(experiment)
    # The rsync filter of the old tool and wanted() agree.
    assert tree_manifest(tmp_path / "filtered") == tree_manifest(experiment, include=wanted)


def test_sftp_lists_the_epn_directories(facility):
    for epn in ("12282a", "12282b", "99999z"):
        facility.add_experiment("mx", epn, frames=1)
    client = sftp_client(facility.sshd)
    try:
        sftp = client.open_sftp()
        names = sftp.listdir(str(facility.root / "data" / "mx"))
        info = sftp.open(str(facility.root / "data" / "mx" / "12282a" / ".info")).read()
    finally:
        client.close()

    assert sorted(names) == ["12282a", "12282b", "99999z"]
    assert b"epn: 12282a" in info


def test_a_changed_host_key_is_refused_until_known_hosts_is_updated(ssh_server):
    port = ssh_server.port
    ssh_server.regenerate_host_key()

    with pytest.raises(paramiko.BadHostKeyException):
        sftp_client(ssh_server)
    refused = run(ssh_server.ssh_command("true"))
    ssh_server.regenerate_host_key(update_known_hosts=True)
    accepted = run(ssh_server.ssh_command("true"))

    assert ssh_server.port == port
    assert refused.returncode == 255
    assert HOST_KEY_CHANGED in refused.stderr
    assert accepted.returncode == 0, accepted.stderr


def test_stop_cuts_open_sessions_and_start_serves_the_same_port_again(ssh_server):
    client = sftp_client(ssh_server)
    marker = f"facility-session-{os.getpid()}-{time.monotonic_ns()}"
    session = subprocess.Popen(
        ssh_server.ssh_command(f"sh -c 'sleep 30; : {marker}'"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + SSH_TIMEOUT
    while not processes_mentioning(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    port = ssh_server.port

    ssh_server.stop()

    assert session.wait(SSH_TIMEOUT) == 255
    assert processes_mentioning(marker) == []
    with pytest.raises(paramiko.SSHException):
        client.open_sftp()
    client.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((ssh_server.host, port), timeout=5).close()
    ssh_server.start()
    assert ssh_server.port == port
    assert run(ssh_server.ssh_command("true")).returncode == 0


def test_leaving_the_facility_ends_every_process_it_started(tmp_path):
    with Facility(tmp_path / "facility") as facility:
        config = str(facility.sshd.workdir / "sshd_config")
        session = subprocess.Popen(facility.sshd.ssh_command("sleep 30"), stdout=subprocess.DEVNULL)
        assert processes_mentioning(config)

    assert session.wait(SSH_TIMEOUT) == 255
    assert processes_mentioning(config) == []
    with pytest.raises(requests.ConnectionError):
        requests.get(facility.portal.url, timeout=5)
    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP(facility.smtp.host, facility.smtp.port, timeout=5)


# ---------------------------------------------------------------- portal


def token(portal, credentials=None):
    """Return (response, token or None) for a token request with `credentials` (the defaults if None)."""
    credentials = credentials or portal.credentials[None]
    response = requests.post(
        f"{portal.url}/api/v1/oauth/token",
        auth=(credentials.client_name, credentials.client_password),
        data={"username": credentials.username, "password": credentials.password, "grant_type": "password"},
        timeout=10,
    )
    access_token = response.json()["data"]["access_token"] if response.status_code == 200 else None
    return response, access_token


def visits(portal, access_token, equipment_id=23, start=None, end=None):
    now = datetime.now(timezone.utc)
    params = {
        "access_token": access_token,
        "start_time": (start or now - timedelta(days=30)).isoformat(),
        "end_time": (end or now).isoformat(),
    }
    return requests.get(f"{portal.url}/api/v1/equipment/{equipment_id}/visits", params=params, timeout=10)


def test_token_is_issued_for_the_right_credentials_only(portal):
    good, access_token = token(portal)
    wrong = Credentials("mx-sync", "wrong", "hpc-client", "client-pw-S3CRET-2")
    refused, _ = token(portal, wrong)
    bad_grant = requests.post(
        f"{portal.url}/api/v1/oauth/token",
        auth=("hpc-client", "client-pw-S3CRET-2"),
        data={"username": "mx-sync", "password": "portal-pw-S3CRET-1", "grant_type": "client_credentials"},
        timeout=10,
    )

    assert good.status_code == 200 and access_token
    assert portal.issued_tokens == [access_token]
    assert refused.status_code == 401
    assert refused.json()["meta"]["error_message"]
    assert bad_grant.status_code == 400
    assert portal.requests_log[0] == ("POST", "/api/v1/oauth/token", {})


def test_visits_overlapping_the_window_are_listed(portal):
    window_start = datetime(2024, 3, 1, tzinfo=timezone.utc)
    window_end = datetime(2024, 3, 31, tzinfo=timezone(timedelta(hours=10)))
    portal.add_visit(23, "100a", datetime(2024, 2, 1), datetime(2024, 2, 2))  # before
    portal.add_visit(23, "101a", datetime(2024, 2, 28), datetime(2024, 3, 1, 8))  # across the start
    portal.add_visit(
        23,
        "102a",
        "2024-03-10T09:00:00+10:00",
        "2024-03-11T09:00:00+10:00",
        principal=("Zoë", "Ørsted", "zoe@uni.example.edu"),
        data_scientists=[("Ann", "Lee", "ann@example.edu")],
    )
    portal.add_visit(23, "103a", datetime(2024, 4, 2), datetime(2024, 4, 3))  # after
    portal.add_visit(24, "104a", datetime(2024, 3, 5), datetime(2024, 3, 6))  # other equipment
    _, access_token = token(portal)

    response = visits(portal, access_token, start=window_start, end=window_end)

    listed = response.json()["data"]["visits"]
    assert [visit["epn"] for visit in listed] == ["101a", "102a"]
    assert listed[0]["start_time"] == "2024-02-28T00:00:00+00:00"
    assert listed[1]["principal_scientist"] == {
        "first_names": "Zoë",
        "last_name": "Ørsted",
        "email": "zoe@uni.example.edu",
    }
    assert listed[1]["data_scientists"][0]["last_name"] == "Lee"
    method, path, query = portal.requests_log[-1]
    assert (method, path) == ("GET", "/api/v1/equipment/23/visits")
    assert set(query) == {"start_time", "end_time"}


def test_a_raw_visit_is_served_as_given(portal):
    portal.add_raw_visit(23, {"id": 7, "epn": "../etc", "start_time": "yesterday"})
    _, access_token = token(portal)

    assert visits(portal, access_token).json()["data"]["visits"] == [
        {"id": 7, "epn": "../etc", "start_time": "yesterday"}
    ]


def test_expired_unknown_and_misused_tokens_are_refused(portal):
    portal.add_equipment(23)
    portal.add_equipment(24)
    portal.set_credentials(Credentials("beamline-24", "pw-24", "client-24", "cpw-24"), equipment_id=24)
    _, global_token = token(portal)
    _, scoped_token = token(portal, portal.credentials[24])

    assert visits(portal, global_token, equipment_id=24).status_code == 200
    assert visits(portal, scoped_token, equipment_id=24).status_code == 200
    assert visits(portal, scoped_token, equipment_id=23).status_code == 403
    assert visits(portal, "not-a-token").status_code == 401
    assert visits(portal, global_token, equipment_id=99).status_code == 404
    portal.token_lifetime = 0
    assert visits(portal, global_token).status_code == 401
    portal.token_lifetime = 3600
    assert visits(portal, global_token).status_code == 200
    portal.expire_tokens()
    assert visits(portal, global_token).json() == {"meta": {"error_message": "Invalid or expired access token"}}


def test_times_without_an_offset_are_read_in_the_portal_zone_and_unreadable_ones_rejected(portal):
    portal.add_visit(23, "100a", datetime(2024, 1, 1, 10), datetime(2024, 1, 1, 12))  # UTC
    portal.naive_time_zone = timezone(timedelta(hours=10))
    _, access_token = token(portal)

    def listed(start, end):
        response = visits(portal, access_token, start=start, end=end)
        return response.status_code, [visit["epn"] for visit in response.json()["data"]["visits"]]

    # HPC ASSyncy's form: 20:00-21:00 at UTC+10 is 10:00-11:00 UTC.
    assert listed(datetime(2024, 1, 1, 20), datetime(2024, 1, 1, 21)) == (200, ["100a"])
    assert listed(datetime(2024, 1, 1, 10), datetime(2024, 1, 1, 11)) == (200, [])
    response = requests.get(
        f"{portal.url}/api/v1/equipment/23/visits",
        timeout=10,
        params={"access_token": access_token, "start_time": "yesterday", "end_time": "2024-01-01T00:00:00"},
    )
    assert response.status_code == 400


@pytest.mark.parametrize(
    "kind, status, fragment",
    [
        ("http500", 500, '"error_message"'),
        ("html", 503, "<title>Down for maintenance</title>"),
        ("garbage", 200, "not JSON"),
        ("truncated", 200, '{"data": '),
        ("unauthorized", 401, '"error_message"'),
    ],
)
def test_each_fault_answers_once_then_the_portal_recovers(portal, kind, status, fragment):
    portal.add_equipment(23)
    _, access_token = token(portal)
    portal.add_fault(kind)

    faulty = visits(portal, access_token)
    healthy = visits(portal, access_token)

    assert faulty.status_code == status
    assert fragment in faulty.text
    if status == 200:
        with pytest.raises(ValueError):
            faulty.json()
    assert healthy.json() == {"data": {"visits": []}}


def test_close_fault_drops_the_connection(portal):
    portal.add_fault("close", path_prefix="/api/v1/oauth", count=2)

    for _ in range(2):
        with pytest.raises(requests.ConnectionError):
            token(portal)
    assert token(portal)[0].status_code == 200


def test_slow_fault_delays_the_answer_and_matches_its_path_only(portal):
    portal.add_equipment(23)
    portal.slow_seconds = 0.3
    portal.add_fault("slow", path_prefix="/api/v1/equipment/")
    started = time.monotonic()
    _, access_token = token(portal)
    token_seconds = time.monotonic() - started

    started = time.monotonic()
    response = visits(portal, access_token)

    assert token_seconds < 0.3
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 200


# ---------------------------------------------------------------- SMTP


def test_a_plain_message_is_received(smtp_sink):
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@example.org", "b@example.org", "Hello"
    message.set_content("Plain body\n")

    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=10) as client:
        client.send_message(message)
    received = smtp_sink.wait_for(1)[0]

    assert received.mail_from == "a@example.org"
    assert received.rcpt_tos == ["b@example.org"]
    assert received.message["Subject"] == "Hello"
    assert received.message.get_content() == "Plain body\n"
    assert b"Subject: Hello" in received.raw


def test_a_non_ascii_multipart_message_is_received_intact(smtp_sink):
    message = EmailMessage()
    message["From"] = "MX Sync <mxsync@hpc.example.org>"
    message["To"] = "Zoë Ørsted <zoe@uni.example.edu>"
    message["Subject"] = "Unknown ownership of EPNs – Zoë’s beamtime"
    message.set_content("Grüße from Ørsted’s group\n")
    message.add_alternative("<p>Grüße from <b>Ørsted</b>’s group</p>\n", subtype="html")

    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=10) as client:
        client.send_message(message)
    received = smtp_sink.wait_for(1)[0].message

    assert received["Subject"] == "Unknown ownership of EPNs – Zoë’s beamtime"
    assert received["To"].addresses[0].display_name == "Zoë Ørsted"
    assert received.get_content_type() == "multipart/alternative"
    assert received.get_body(("plain",)).get_content() == "Grüße from Ørsted’s group\n"
    assert "<b>Ørsted</b>" in received.get_body(("html",)).get_content()


def test_fail_with_refuses_the_data(smtp_sink):
    smtp_sink.fail_with = "451 Try again later"

    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("a@example.org", ["b@example.org"], "Subject: x\r\n\r\nbody\r\n")

    assert refused.value.smtp_code == 451
    assert smtp_sink.messages == []
    with pytest.raises(TimeoutError):
        smtp_sink.wait_for(1, timeout=0.1)


# AUTH without TLS is what this test wants; aiosmtpd warns about it on every connection.
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_require_auth_accepts_only_the_right_login():
    with SmtpSink(require_auth=("mailer", "smtp-pw-S3CRET-3")) as sink:
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
            with pytest.raises(smtplib.SMTPSenderRefused):
                client.sendmail("a@example.org", ["b@example.org"], "Subject: x\r\n\r\nbody\r\n")
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("mailer", "wrong")
            client.login("mailer", "smtp-pw-S3CRET-3")
            client.sendmail("a@example.org", ["b@example.org"], "Subject: x\r\n\r\nbody\r\n")

        assert [message.login for message in sink.wait_for(1)] == ["mailer"]


# ---------------------------------------------------------------- data tree and config


def test_make_experiment_lays_out_a_deterministic_tree(tmp_path):
    first = make_experiment(tmp_path / "one", "mx", "12282a", frames=2, frame_size=1000, small_files=2, seed=5)
    second = make_experiment(tmp_path / "two", "mx", "12282a", frames=2, frame_size=1000, small_files=2, seed=5)
    other_seed = make_experiment(tmp_path / "three", "mx", "12282a", frames=2, frame_size=1000, small_files=2)

    manifest = tree_manifest(first)
    assert first == tmp_path / "one" / "data" / "mx" / "12282a"
    assert sorted(manifest) == [
        ".hidden_cache",
        ".info",
        "frames/.lock",
        "frames/12282a_0001.cbf",
        "frames/12282a_0002.cbf",
        "home/mxuser/auto/run_01/summary.txt",
        "home/mxuser/auto/run_02/summary.txt",
    ]
    assert manifest["frames/12282a_0001.cbf"][0] == 1000
    assert tree_manifest(second) == manifest
    assert tree_manifest(other_seed) != manifest
    assert sorted(tree_manifest(first, include=wanted)) == [
        ".info",
        "frames/12282a_0001.cbf",
        "frames/12282a_0002.cbf",
        "home/mxuser/auto/run_01/summary.txt",
        "home/mxuser/auto/run_02/summary.txt",
    ]


@pytest.mark.parametrize(
    "path, expected",
    [
        ("frames/a.cbf", True),
        (".info", True),
        ("home/x/.info", True),
        (".hidden", False),
        ("frames/.lock", False),
        (".git/config", False),
        (".info/x", True),
        ("..info", False),
        ("a.b/c", True),
    ],
)
def test_wanted_follows_the_sync_rule(path, expected):
    assert wanted(path) is expected


def test_write_config_points_at_the_running_services(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23)
    facility.add_experiment("mx2", "555b", equipment_id=24)

    path = facility.write_config(max_tasks=4, epn_cap_map={"12282": "ny79", "555": "ab12"}, log_files=None)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = yaml.safe_load(path.read_text())
    assert raw["max-tasks"] == 4 and "log-files" not in raw
    assert raw["port"] == facility.sshd.port
    config = load_config(path)
    assert config.warnings == ()
    assert [(e.id, e.beamline, e.source_path) for e in config.equipment] == [
        (23, "mx", f"{facility.root}/data/mx"),
        (24, "mx2", f"{facility.root}/data/mx2"),
    ]
    assert (config.smtp.host, config.smtp.port) == (facility.smtp.host, facility.smtp.port)
    assert config.epn_cap_map == {"12282": "ny79", "555": "ab12"}
    assert {e.password for e in config.equipment} <= set(facility.secrets)


def test_config_credentials_fetch_the_added_visit(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, principal=("Ada", "Byron", "ada@example.edu"))
    equipment = yaml.safe_load(facility.write_config().read_text())["equipment"][0]
    credentials = Credentials(
        equipment["username"], equipment["password"], equipment["client_name"], equipment["client_password"]
    )

    _, access_token = token(facility.portal, credentials)
    listed = visits(facility.portal, access_token).json()["data"]["visits"]

    assert [visit["epn"] for visit in listed] == ["12282a"]
    assert listed[0]["principal_scientist"]["last_name"] == "Byron"
    assert access_token in facility.secrets
