"""epnalert end to end: the console script against the simulated facility, the message read back and parsed.

A few fast tests of the pure logic (unknown EPNs, what is new, when to send, text from HTML) come first.
"""

import json
import re
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from bs4 import BeautifulSoup

from epnalert.alert import Alert, UnknownEpn, decide, find_unknown, mark_new
from epnalert.render import format_time, html_to_text, legacy_unknown_epns
from mxsync.portal import Person, Visit

EPNALERT = Path(sys.executable).with_name("epnalert")
SUBJECT = "Unknown ownership of EPNs"
UTC = timezone.utc
NOW = datetime(2024, 5, 1, 1, 0, tzinfo=UTC)


# ---------------------------------------------------------------- pure logic


def visit(epn, beamline="mx", start=NOW - timedelta(days=2)):
    return Visit(epn, start, start + timedelta(days=1), 23, beamline, Person("Ada", "Lovelace", "ada@x.org"), ())


def test_unknown_is_every_unmapped_epn_from_either_source():
    sftp = {"12282a": ["/data/mx"], "20002b": ["/data/mx"], "20001a": ["/data/mx"]}
    visits = [visit("20001a"), visit("12282b"), visit("30003c", beamline="mx2")]
    unknown = find_unknown(sftp, visits, {"12282": "ny79"}, {"/data/mx": "mx"})
    assert [(item.epn, item.seen_on, item.beamlines) for item in unknown] == [
        ("20001a", "SFTP and portal", ("mx",)),
        ("20002b", "SFTP", ("mx",)),
        ("30003c", "portal", ("mx2",)),
    ]
    assert unknown[0].visits == (visits[0],) and unknown[1].visits == ()


def test_unknown_epns_sort_by_number_not_text():
    unknown = find_unknown({"999a": ["/d"], "1000a": ["/d"], "999b": ["/d"]}, [], {})
    assert [item.epn for item in unknown] == ["999a", "999b", "1000a"]


def test_mark_new_puts_new_epns_first_and_keeps_first_alerted():
    first = NOW - timedelta(days=3)
    unknown = find_unknown({"100a": ["/d"], "200a": ["/d"], "300a": ["/d"]}, [], {})
    marked = mark_new(unknown, {"100a": first, "300a": first, "999z": first})
    assert [(item.epn, item.new, item.first_alerted) for item in marked] == [
        ("200a", True, None),
        ("100a", False, first),
        ("300a", False, first),
    ]


def _alert(*new_flags):
    return Alert(unknown=[UnknownEpn(f"{index}a", ("/d",), new=new) for index, new in enumerate(new_flags, 1)])


@pytest.mark.parametrize(
    "alert, last_sent, only_new, repeat_days, expected",
    [
        (_alert(), None, False, 0, False),  # nothing unknown: never an email
        (_alert(True), None, True, 30, True),  # something new: always
        (_alert(False), NOW - timedelta(hours=1), False, 0, True),  # defaults: every run
        (_alert(False), NOW - timedelta(days=100), True, 0, False),  # only-new never repeats
        (_alert(False), NOW - timedelta(days=100), True, 7, False),  # ... whatever repeat-days says
        (_alert(False), NOW - timedelta(days=6), False, 7, False),
        (_alert(False), NOW - timedelta(days=7), False, 7, True),
        (_alert(False), NOW - timedelta(days=7) + timedelta(seconds=30), False, 7, True),  # cron jitter
        (_alert(False), NOW - timedelta(days=7) + timedelta(hours=2), False, 7, False),
        (_alert(False), None, True, 0, True),  # no state (first run or moved aside): send
    ],
)
def test_decide_when_to_send(alert, last_sent, only_new, repeat_days, expected):
    send, reason = decide(alert, last_sent, NOW, only_new=only_new, repeat_days=repeat_days)
    assert send is expected, reason


def test_html_to_text_keeps_table_rows_pre_and_links():
    html = (
        "<html><head><title>T</title><style>p{}</style></head><body>\n  <p>Hello\n   there</p>"
        "<table><tr><th>EPN</th><th>Who</th></tr><tr><td>1a</td><td>Zoë<br>z@x.org</td></tr></table>"
        "<pre>a    b\n  c</pre><a href='https://wiki.example/mx'>instructions</a></body></html>"
    )
    assert html_to_text(html) == (
        "Hello there\n\nEPN | Who\n1a | Zoë; z@x.org\n\na    b\n  c\n\ninstructions (https://wiki.example/mx)\n"
    )


def test_legacy_unknown_epns_is_a_ruled_table_eight_to_a_row():
    alert = Alert(unknown=[UnknownEpn(f"{number}a", ("/d",)) for number in range(101, 111)])
    lines = legacy_unknown_epns(alert).splitlines()
    assert lines[0] == lines[-1] == "  ".join(["----"] * 8)
    assert lines[1].split() == [f"{number}a" for number in range(101, 109)]
    assert lines[2].split() == ["109a", "110a"]


def test_format_time_keeps_the_portal_offset():
    melbourne = timezone(timedelta(hours=10))
    assert format_time(datetime(2024, 4, 28, 9, 5, tzinfo=melbourne)) == "2024-04-28 09:05 +10:00"
    assert format_time(None) == "unknown"


# ---------------------------------------------------------------- end to end: helpers


def run_epnalert(config, *arguments):
    return subprocess.run(
        [str(EPNALERT), "--config", str(config), *arguments], capture_output=True, text=True, timeout=120
    )


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def error_line(result, returncode=1):
    """Assert the run failed with exactly one line on stderr and return it."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == returncode, result.stderr
    assert len(lines) == 1 and lines[0].startswith("epnalert: error: "), result.stderr
    return lines[0]


def bodies(received):
    message = received.message
    return message.get_body(("plain",)).get_content(), message.get_body(("html",)).get_content()


def table_rows(html):
    """Return {EPN: {column: cell text}} of the main table of the HTML part."""
    page = BeautifulSoup(html, "html.parser")
    table = next(table for table in page.find_all("table") if table.find("th", string="EPN"))
    header = [cell.get_text(strip=True) for cell in table.find("tr").find_all("th")]
    rows = {}
    for row in table.find_all("tr")[1:]:
        cells = []
        for cell in row.find_all("td"):
            cells += [cell.get_text(" ", strip=True)] * int(cell.get("colspan", 1))
        rows[cells[header.index("EPN")]] = dict(zip(header, cells))
    return rows


def text_entries(text):
    """Return {EPN: its block of lines} of the default text part; the first line starts 'NEW ' if new."""
    entries, current = {}, None
    for line in text.splitlines():
        match = re.match(r"(NEW |    )(\d+[a-z]+)   seen on", line)
        if match:
            current = entries.setdefault(match.group(2), [])
        elif not line.strip() or not line.startswith("    "):
            current = None
        if current is not None:
            current.append(line)
    return {epn: "\n".join(lines) for epn, lines in entries.items()}


def state_file(facility):
    return facility.workdir / "state" / "epnalert-state.json"


def log_text(facility):
    return "\n".join(path.read_text(encoding="utf-8") for path in sorted((facility.workdir / "log").glob("*.log*")))


def when(moment):
    return f"{moment:%Y-%m-%d %H:%M} +00:00"


ZOE = ("Zoë", "Ångström", "zoe.angstrom@uni.example.edu")
BOB = ("<b>Bob</b>", "Builder", "bob@uni.example.edu")


def populate(facility):
    """Known, unknown (both sources), SFTP-only, portal-only and suspicious EPNs; return the visit times used."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    times = {
        "20001a": (now - timedelta(days=3), now - timedelta(days=2)),
        "30003c": (now + timedelta(days=2), now + timedelta(days=3)),  # booked, no data yet
        "30004a": (now - timedelta(days=10), now - timedelta(days=9)),  # data not (yet) visible on SFTP
    }
    small = {"frames": 1, "small_files": 0}
    facility.add_experiment("mx", "12282a", equipment_id=23, **small)  # known: in epn_cap_map
    facility.add_experiment(
        "mx", "20001a", equipment_id=23, start=times["20001a"][0], end=times["20001a"][1],
        principal=ZOE, data_scientists=[BOB, ("Ngaio", "Marsh", "ngaio@uni.example.edu")], **small,
    )
    facility.add_experiment("mx", "20002b", **small)  # SFTP only
    for epn in ("30003c", "30004a"):
        facility.portal.add_visit(23, epn, *times[epn])
    facility.portal.add_visit(23, "12282b", now + timedelta(days=1), now + timedelta(days=2))  # known, booked
    facility.portal.add_visit(23, "30005a", now + timedelta(days=20), now + timedelta(days=21))  # beyond the window
    (facility.root / "data" / "mx" / "lost+found").mkdir()
    facility.portal.add_raw_visit(23, {"id": 99, "epn": "EPN-99", "start_time": None, "end_time": None})
    return times


# ---------------------------------------------------------------- end to end: the alert


def test_alert_lists_each_unknown_epn_with_its_visit(facility):
    times = populate(facility)
    result = ok(run_epnalert(facility.write_config()))

    [received] = facility.smtp.wait_for(1)
    message = received.message
    assert message["Subject"] == SUBJECT
    assert message["From"] == "mxsync@hpc.example.org" and message["To"] == "staff@hpc.example.org"
    assert received.rcpt_tos == ["staff@hpc.example.org"]
    assert message.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in message.iter_parts()] == ["text/plain", "text/html"]
    assert message["Date"] and message["Message-ID"]
    text, html = bodies(received)

    rows = table_rows(html)
    assert set(rows) == {"20001a", "20002b", "30003c", "30004a"}  # not 12282a/b (known), not 30005a (too far ahead)
    both, sftp_only, booked = rows["20001a"], rows["20002b"], rows["30003c"]
    assert both["Seen on"] == "SFTP and portal" and both["Beamline"] == "mx"
    assert (both["Visit start"], both["Visit end"]) == tuple(map(when, times["20001a"]))
    assert both["Principal scientist"] == f"Zoë Ångström {ZOE[2]}"
    assert both["Data scientists"] == f"<b>Bob</b> Builder <{BOB[2]}> Ngaio Marsh <ngaio@uni.example.edu>"
    assert sftp_only["Seen on"] == "SFTP" and sftp_only["Visit start"] == "no visit on the portal"
    assert booked["Seen on"] == "portal" and booked["Visit start"] == when(times["30003c"][0])
    assert rows["30004a"]["Principal scientist"].startswith("Rosalind Franklin")
    assert all(row["New"] == "NEW" for row in rows.values())
    # Escaped, not markup: the name shows as typed.
    assert "&lt;b&gt;Bob&lt;/b&gt;" in html and "<b>Bob</b>" not in html
    assert BeautifulSoup(html, "html.parser").find("b", string="Bob") is None

    entries = text_entries(text)
    assert set(entries) == set(rows)
    assert "principal        Zoë Ångström <zoe.angstrom@uni.example.edu>" in entries["20001a"]
    assert "data scientists  <b>Bob</b> Builder <bob@uni.example.edu>" in entries["20001a"]
    assert "no visit on the portal" in entries["20002b"]
    assert entries["30003c"].startswith("NEW 30003c   seen on portal")
    for part in (text, html):
        assert "lost+found" in part and "EPN-99" in part  # suspicious names are reported
        assert "incomplete" not in part.lower()
    # Non-ASCII travelled as UTF-8, not mangled or dropped.
    assert message.get_body(("plain",)).get_content_charset() == "utf-8"

    email_log = (facility.workdir / "log" / "email.log").read_text(encoding="utf-8")
    [line] = email_log.splitlines()
    assert "staff@hpc.example.org" in line and SUBJECT in line and "250" in line
    assert all(epn in line for epn in rows)
    assert "lost+found" in log_text(facility)
    assert set(json.loads(state_file(facility).read_text())["epns"]) == set(rows)
    assert "WARNING" not in result.stderr  # suspicious names went out in the email, not as cron mail


def test_second_run_marks_nothing_new_and_a_later_epn_is_new(facility):
    populate(facility)
    config = facility.write_config()
    ok(run_epnalert(config))
    first_state = json.loads(state_file(facility).read_text())
    ok(run_epnalert(config))
    facility.add_experiment("mx", "20009a", frames=1, small_files=0)
    ok(run_epnalert(config))

    first, second, third = (bodies(received) for received in facility.smtp.wait_for(3))
    assert {epn: row["New"] for epn, row in table_rows(second[1]).items()} == {
        epn: f"since {datetime.fromisoformat(entry['first_alerted']).astimezone().date()}"
        for epn, entry in first_state["epns"].items()
    }
    assert not any(block.startswith("NEW") for block in text_entries(second[0]).values())
    third_rows = table_rows(third[1])
    assert [epn for epn, row in third_rows.items() if row["New"] == "NEW"] == ["20009a"]
    assert [epn for epn, block in text_entries(third[0]).items() if block.startswith("NEW")] == ["20009a"]
    assert "1 is new since the previous alert" in third[0]
    state = json.loads(state_file(facility).read_text())
    assert state["epns"]["20001a"]["first_alerted"] == first_state["epns"]["20001a"]["first_alerted"]


def test_no_unknown_epns_no_email(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, frames=1, small_files=0)
    result = ok(run_epnalert(facility.write_config()))
    assert facility.smtp.messages == [] and not state_file(facility).exists()
    assert re.search(r" - epnalert - INFO:\d+: 0 unknown EPNs .*no email \(no unknown EPNs\)", log_text(facility))
    assert result.stderr == ""


def test_dry_run_prints_the_email_sends_nothing_and_keeps_state(facility):
    populate(facility)
    config = facility.write_config()
    dry = ok(run_epnalert(config, "--dry-run"))
    assert facility.smtp.messages == [] and not state_file(facility).exists()
    assert f"Subject: {SUBJECT}" in dry.stdout and "To: staff@hpc.example.org" in dry.stdout
    assert "----- text/plain -----" in dry.stdout and "----- text/html -----" in dry.stdout
    assert "NEW 20001a" in dry.stdout and "&lt;b&gt;Bob&lt;/b&gt;" in dry.stdout and "Zoë Ångström" in dry.stdout

    ok(run_epnalert(config))
    before = state_file(facility).read_bytes()
    facility.add_experiment("mx", "20009a", frames=1, small_files=0)
    dry = ok(run_epnalert(config, "--dry-run"))
    assert "NEW 20009a" in dry.stdout and "NEW 20001a" not in dry.stdout
    assert len(facility.smtp.messages) == 1 and state_file(facility).read_bytes() == before
    assert len((facility.workdir / "log" / "email.log").read_text().splitlines()) == 1


def test_only_new_sends_only_when_something_new_appears(facility):
    populate(facility)
    config = facility.write_config(epnalert_only_new=True)
    ok(run_epnalert(config))
    ok(run_epnalert(config))
    assert len(facility.smtp.messages) == 1
    assert "nothing new since the alert of" in log_text(facility)
    facility.add_experiment("mx", "20009a", frames=1, small_files=0)
    ok(run_epnalert(config))
    _, latest = facility.smtp.wait_for(2)
    assert [epn for epn, row in table_rows(bodies(latest)[1]).items() if row["New"] == "NEW"] == ["20009a"]


def test_repeat_days_repeats_an_unchanged_alert_once_due(facility):
    populate(facility)
    config = facility.write_config(epnalert_repeat_days=7)
    ok(run_epnalert(config))
    ok(run_epnalert(config))
    assert len(facility.smtp.messages) == 1
    # Pretend the alert went out eight days ago rather than waiting for it.
    state = json.loads(state_file(facility).read_text())
    state["last_sent"] = (datetime.fromisoformat(state["last_sent"]) - timedelta(days=8)).isoformat()
    state_file(facility).write_text(json.dumps(state))
    ok(run_epnalert(config))
    _, repeated = facility.smtp.wait_for(2)
    assert set(table_rows(bodies(repeated)[1])) == {"20001a", "20002b", "30003c", "30004a"}
    assert not any(block.startswith("NEW") for block in text_entries(bodies(repeated)[0]).values())
    assert "None is new since the previous alert" in bodies(repeated)[0]
    assert json.loads(state_file(facility).read_text())["last_sent"] > state["last_sent"]


# ---------------------------------------------------------------- end to end: failures


def expire_tokens_during_first_visits_request(portal, deadline_seconds=60):
    """Start a thread that expires every token while the first visits request is being answered."""

    def watch():
        deadline = time.monotonic() + deadline_seconds
        while time.monotonic() < deadline:
            if any(path.endswith("/visits") for _, path, _ in list(portal.requests_log)):
                portal.expire_tokens()
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_token_expiring_mid_run_is_renewed(facility):
    facility.add_experiment("mx", "20001a", equipment_id=23, frames=1, small_files=0)
    facility.add_experiment("mx2", "40001a", equipment_id=24, frames=1, small_files=0)
    config = facility.write_config()
    # The first visits request is held while its token expires, so the portal answers it with HTTP 401.
    facility.portal.slow_seconds = 1.5
    facility.portal.add_fault("slow", "/api/v1/equipment/23/visits")
    watcher = expire_tokens_during_first_visits_request(facility.portal)
    result = ok(run_epnalert(config))
    watcher.join()

    rows = table_rows(bodies(facility.smtp.wait_for(1)[0])[1])
    assert {epn: row["Seen on"] for epn, row in rows.items()} == {"20001a": "SFTP and portal", "40001a": "SFTP and portal"}
    assert rows["40001a"]["Beamline"] == "mx2"
    requests = [(method, path) for method, path, _ in facility.portal.requests_log]
    assert requests == [
        ("POST", "/api/v1/oauth/token"),
        ("GET", "/api/v1/equipment/23/visits"),  # refused: the token expired meanwhile
        ("POST", "/api/v1/oauth/token"),
        ("GET", "/api/v1/equipment/23/visits"),
        ("GET", "/api/v1/equipment/24/visits"),  # the renewed token serves the next equipment too
    ]
    assert "authenticating again" in log_text(facility)
    assert result.stderr == ""


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("http500", "HTTP 500"),
        ("html", "'Down for maintenance'"),
        ("garbage", "not valid JSON"),
    ],
)
def test_portal_failure_still_alerts_and_says_so(facility, fault, reason):
    populate(facility)
    facility.portal.add_fault(fault, "/api/v1/equipment", count=100)
    result = ok(run_epnalert(facility.write_config(portal_retries=1)))

    text, html = bodies(facility.smtp.wait_for(1)[0])
    assert set(table_rows(html)) == {"20001a", "20002b"}  # what SFTP showed; the portal-only ones are unknowable
    assert text.startswith("*****") and "THIS LIST MAY BE INCOMPLETE" in text.split("\n\n")[0]
    banner = text.split("\n\n")[0]
    assert "portal equipment 23 (mx)" in banner and reason in banner
    box = BeautifulSoup(html, "html.parser").find("div")
    assert "may be incomplete" in box.get_text() and reason in box.get_text()
    assert "Source failed" in result.stderr and reason in result.stderr  # cron mails the warning too


def test_epns_of_a_failed_source_do_not_come_back_as_new(facility):
    populate(facility)
    config = facility.write_config(portal_retries=0)
    ok(run_epnalert(config))
    facility.portal.add_fault("http500", "/api/v1/equipment", count=1)
    ok(run_epnalert(config))  # the portal-only EPNs are missing from this alert
    ok(run_epnalert(config))
    _, partial, recovered = (table_rows(bodies(received)[1]) for received in facility.smtp.wait_for(3))
    assert set(partial) == {"20001a", "20002b"}
    assert set(recovered) == {"20001a", "20002b", "30003c", "30004a"}
    assert [epn for epn, row in recovered.items() if row["New"] == "NEW"] == []


def _other_key(tmp_path):
    key = tmp_path / "stranger_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, stdin=subprocess.DEVNULL)
    return str(key)


@pytest.mark.parametrize("refusal", ["wrong key", "changed host key"])
def test_sftp_refusal_still_alerts_from_the_portal(facility, tmp_path, refusal):
    populate(facility)
    if refusal == "wrong key":
        config, reason = facility.write_config(key_file=_other_key(tmp_path)), "login refused"
    else:
        config, reason = facility.write_config(), "host key does not match"
        facility.sshd.regenerate_host_key()
    ok(run_epnalert(config))

    text, html = bodies(facility.smtp.wait_for(1)[0])
    rows = table_rows(html)
    assert set(rows) == {"20001a", "30003c", "30004a"} and rows["20001a"]["Seen on"] == "portal"
    banner = text.split("\n\n")[0]
    assert "THIS LIST MAY BE INCOMPLETE" in banner and "SFTP" in banner and reason in banner
    assert "lost+found" not in text and "EPN-99" in text


def test_both_sources_failing_exits_1_with_one_line(facility):
    populate(facility)
    config = facility.write_config(portal_retries=1)
    facility.portal.add_fault("http500", "/api/v1/equipment", count=100)
    facility.sshd.regenerate_host_key()
    result = run_epnalert(config)
    line = error_line(result)
    assert "both SFTP and the portal failed" in line and "host key" in line and "HTTP 500" in line
    assert facility.smtp.messages == [] and not state_file(facility).exists()
    assert "retrying" in log_text(facility)  # the details are in the log file, not in cron's mail


def test_portal_unreachable_and_sftp_down(facility):
    populate(facility)
    config = facility.write_config(portal_retries=0)
    facility.portal.stop()
    facility.sshd.stop()
    line = error_line(run_epnalert(config))
    assert "cannot connect" in line and "SFTP" in line and "portal" in line


def test_smtp_refusal_exits_1_and_keeps_state(facility):
    populate(facility)
    config = facility.write_config()
    facility.smtp.fail_with = "554 Transaction failed: mailbox unavailable"
    line = error_line(run_epnalert(config))
    assert "refused the email: 554" in line
    assert not state_file(facility).exists()
    assert "not sent" in log_text(facility)

    facility.smtp.fail_with = None
    ok(run_epnalert(config))
    rows = table_rows(bodies(facility.smtp.wait_for(1)[0])[1])
    assert all(row["New"] == "NEW" for row in rows.values())  # the failed alert did not count as sent


def test_corrupt_state_file_still_alerts_and_is_left_alone(facility):
    populate(facility)
    config = facility.write_config()
    state_file(facility).write_text("{not json")
    line = error_line(run_epnalert(config), returncode=2)
    assert str(state_file(facility)) in line and "corrupt" in line
    rows = table_rows(bodies(facility.smtp.wait_for(1)[0])[1])
    assert all(row["New"] == "NEW" for row in rows.values())
    assert state_file(facility).read_text() == "{not json"


# ---------------------------------------------------------------- templates

OLD_TEXT_TEMPLATE = """Please see the MX integration work instructions.

{{ epn_details }}

These EPNs are unknown:
{{ unknown_epns }}"""

OLD_HTML_TEMPLATE = """<html><body><pre>
Please see the MX integration work instructions.

{{ epn_details }}

These EPNs are unknown:
{{ unknown_epns }}
</pre></body></html>
"""


def test_old_style_templates_render(facility, tmp_path):
    times = populate(facility)
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "epnalert-text.j2").write_text(OLD_TEXT_TEMPLATE)
    (folder / "epnalert-html.j2").write_text(OLD_HTML_TEMPLATE)
    config = facility.write_config(
        epnalert_template_folder=str(folder), epnalert_template_text="epnalert-text.j2", epnalert_template_html="epnalert-html.j2"
    )
    ok(run_epnalert(config))

    text, html = bodies(facility.smtp.wait_for(1)[0])
    assert text.startswith("Please see the MX integration work instructions.")
    assert f"Epn 20001a on {times['20001a'][0].isoformat()} is not known.\n" in text
    assert f"Principal scientist: Zoë Ångström {ZOE[2]}\nIt includes scientists: \nFirst name" in text
    assert re.search(r"^<b>Bob</b>\s+Builder\s+bob@uni\.example\.edu$", text, re.MULTILINE)
    assert "** Please add it the config. **" in text
    assert "Epn 30003c on" in text and "Epn 20002b" not in text  # with a visit / without one
    unknown_table = text.split("These EPNs are unknown:\n")[1]
    assert unknown_table.split() == ["------", "20002b", "------"]
    pre = BeautifulSoup(html, "html.parser").find("pre")
    assert "&lt;b&gt;Bob&lt;/b&gt;" in html and pre.find("b") is None
    assert "Epn 20001a on" in pre.get_text() and "Zoë Ångström" in pre.get_text()


def test_text_only_template_sends_text_only(facility, tmp_path):
    populate(facility)
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "plain.j2").write_text("{% for item in alert.unknown %}{{ item.epn }} {{ item.seen_on }}\n{% endfor %}")
    ok(run_epnalert(facility.write_config(epnalert_template_folder=str(folder), epnalert_template_text="plain.j2")))
    message = facility.smtp.wait_for(1)[0].message
    assert message.get_content_type() == "text/plain"
    assert message.get_content().splitlines() == ["20001a SFTP and portal", "20002b SFTP", "30003c portal", "30004a portal"]


def test_html_only_template_gets_a_derived_text_part(facility, tmp_path):
    populate(facility)
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "alert.html.j2").write_text(
        "<html><body><h1>{{ subject }}</h1><p>{{ alert.new|length }} new.</p>\n<table>\n"
        "<tr><th>EPN</th><th>Seen on</th><th>Principal</th></tr>\n"
        "{% for item in alert.unknown %}<tr><td>{{ item.epn }}</td><td>{{ item.seen_on }}</td>"
        "<td>{{ item.visit.principal_scientist.name if item.visit else '-' }}</td></tr>\n{% endfor %}"
        "</table></body></html>\n"
    )
    config = facility.write_config(epnalert_template_folder=str(folder), epnalert_template_html="alert.html.j2")
    ok(run_epnalert(config))

    text, html = bodies(facility.smtp.wait_for(1)[0])
    assert "<td>20001a</td>" in html
    lines = text.splitlines()
    assert lines[:3] == [SUBJECT, "", "4 new."]
    assert "EPN | Seen on | Principal" in lines
    assert "20001a | SFTP and portal | Zoë Ångström" in lines and "20002b | SFTP | -" in lines
    assert "<" not in text.replace("<b>Bob</b>", "")


def test_broken_template_exits_1_with_one_line(facility, tmp_path):
    populate(facility)
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "bad.j2").write_text("line one\n{% for x in %}\n")
    config = facility.write_config(epnalert_template_folder=str(folder), epnalert_template_text="bad.j2")
    line = error_line(run_epnalert(config))
    assert "bad.j2, line 2" in line and facility.smtp.messages == []


# ---------------------------------------------------------------- secrets and the command line


def test_no_password_or_token_in_logs_or_stderr(facility):
    populate(facility)
    facility.add_experiment("mx2", "40001a", equipment_id=24, frames=1, small_files=0)
    config = facility.write_config()
    facility.portal.add_fault("unauthorized", "/api/v1/equipment/24/visits")  # forces a second token
    verbose = ok(run_epnalert(config, "-v"))
    assert "DEBUG" in verbose.stderr
    dry = ok(run_epnalert(config, "--dry-run", "-v"))
    secrets = facility.secrets
    assert len(facility.portal.issued_tokens) >= 3 and len(secrets) >= 5
    exposed = log_text(facility) + verbose.stderr + verbose.stdout + dry.stderr + dry.stdout
    exposed += facility.smtp.messages[0].raw.decode("utf-8", "replace")
    assert "access token" in exposed  # the token lines are there, masked or never carrying the value
    assert [secret for secret in secrets if secret in exposed] == []


def test_help_is_fast_to_import():
    probe = (
        "import sys, epnalert.cli\n"
        "try:\n    epnalert.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('paramiko', 'requests', 'jinja2', 'bs4', 'yaml', 'mxsync.config') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "--dry-run" in result.stdout and result.stdout.strip().endswith("[]"), result.stdout + result.stderr


def test_missing_config_is_one_line_and_exit_2(tmp_path):
    result = run_epnalert(tmp_path / "nope.yml")
    assert error_line(result, returncode=2).endswith("file not found; pass --config with the path of your config.yml")
