"""epnalert end to end: the console script against the simulated facility, the message read back and parsed.

A few fast tests of the pure logic (unknown EPNs, what is new, when to send, text from HTML) come first.
"""

import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from bs4 import BeautifulSoup

from epnalert.alert import Alert, UnknownEpn, decide, find_unknown, mark_new
from epnalert.render import (
    check_templates,
    format_time,
    html_to_text,
    legacy_unknown_epns,
    printable,
)
from mxsync.errors import MailError
from mxsync.portal import Person, Visit
from mxsync.store import EPNALERT_NOTE

EPNALERT = Path(sys.executable).with_name("epnalert")
LEGACY_TEMPLATES = Path(__file__).parent / "data" / "legacy-templates"
SUBJECT = "Unknown ownership of EPNs"
UTC = timezone.utc  # noqa: UP017 - datetime.UTC is Python 3.11+; mxsync supports 3.9
NOW = datetime(2024, 5, 1, 1, 0, tzinfo=UTC)


# ---------------------------------------------------------------- pure logic


def visit(epn, beamline="mx", start=NOW - timedelta(days=2)):
    return Visit(
        epn,
        start,
        start + timedelta(days=1),
        23,
        beamline,
        Person("Ada", "Lovelace", "ada@x.org"),
        (),
    )


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
        (
            _alert(False),
            NOW - timedelta(hours=1),
            False,
            0,
            True,
        ),  # defaults: every run
        (
            _alert(False),
            NOW - timedelta(days=100),
            True,
            0,
            False,
        ),  # only-new never repeats
        (
            _alert(False),
            NOW - timedelta(days=100),
            True,
            7,
            False,
        ),  # ... whatever repeat-days says
        (_alert(False), NOW - timedelta(days=6), False, 7, False),
        (_alert(False), NOW - timedelta(days=7), False, 7, True),
        (
            _alert(False),
            NOW - timedelta(days=7) + timedelta(seconds=30),
            False,
            7,
            True,
        ),  # cron jitter
        (_alert(False), NOW - timedelta(days=7) + timedelta(hours=2), False, 7, False),
        (
            _alert(False),
            None,
            True,
            0,
            True,
        ),  # no state (first run or moved aside): send
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


@pytest.mark.parametrize(
    "name, shown",
    [
        ("Zoë Ångström", "Zoë Ångström"),  # letters of any script stay
        ("Nguyễn Thị Minh Khai 李小龙", "Nguyễn Thị Minh Khai 李小龙"),
        ("Eve\r\n\r\nepn_cap_map:", "Eve\\r\\n\\r\\nepn_cap_map:"),
        (
            "a\u2028b\u2029c\x85d\x0be\x0cf",
            "a\\u2028b\\u2029c\\x85d\\x0be\\x0cf",
        ),  # every line break Python knows
        ("\x1b[31mred\x00", "\\x1b[31mred\\x00"),
        (
            "abc\u202eevil",
            "abc\\u202eevil",
        ),  # a bidi override would show the text reversed
    ],
)
def test_printable_escapes_controls_and_line_separators(name, shown):
    assert printable(name) == shown
    assert len(printable(name).splitlines()) == 1


def template_config(tmp_path, text=None, html=None, folder=None, map_file=None):
    """Return a stand-in for Config with just what rendering reads."""
    from types import SimpleNamespace

    return SimpleNamespace(
        path=tmp_path / "config.yml",
        epn_cap_map_file=map_file,
        template_folder=folder,
        template_text=text,
        template_html=html,
        email_from="mxsync@hpc.example.org",
        email_to=("staff@hpc.example.org",),
    )


def test_check_templates_renders_built_in_and_old_templates(tmp_path):
    assert check_templates(template_config(tmp_path)) == "built-in templates render on sample data"
    detail = check_templates(template_config(tmp_path, "epnalert-text.j2", "epnalert-html.j2", LEGACY_TEMPLATES))
    assert detail.startswith(f"epnalert-text.j2 and epnalert-html.j2 in {LEGACY_TEMPLATES} render on sample data")
    assert "epnalert adds its notice" in detail


@pytest.mark.parametrize(
    "source, line, problem",
    [
        ("line one\n{% for x in %}\n", 2, "Expected an expression"),  # syntax
        (
            "line one\n\n{{ alert.unknown|length // 0 }}\n",
            3,
            "cannot render it: integer division or modulo by zero",
        ),
        (
            "{% for item in alert.unknown %}\n{{ item.epn }}\n{{ item.nothing.at_all }}\n{% endfor %}",
            3,
            "cannot render it",
        ),
        (
            "{{ alert.unknown[0].visit.start.strftime(7) }}",
            1,
            "cannot render it: strftime() argument 1 must be str",
        ),
    ],
)
def test_check_templates_names_file_and_line_of_a_broken_template(tmp_path, source, line, problem):
    (tmp_path / "bad.j2").write_text(source)
    for config in (
        template_config(tmp_path, text="bad.j2", folder=tmp_path),
        template_config(tmp_path, html="bad.j2", folder=tmp_path),
    ):
        with pytest.raises(MailError) as error:
            check_templates(config)
        message = str(error.value)
        assert message.startswith(f"template {tmp_path / 'bad.j2'}, line {line}: ") and problem in message
        assert "\n" not in message


def claim_instruction(text, html):
    """Return the 'To claim one' sentence of each default part, as one line of text."""
    html_text = BeautifulSoup(html, "html.parser").get_text(" ")
    return tuple(
        " ".join(re.search(r"To claim one,.*?ab12", part, re.DOTALL).group(0).split()) for part in (text, html_text)
    )


def test_the_claim_instruction_names_config_yml_or_the_map_file(tmp_path):
    from epnalert.render import render_email, sample_alert

    config = template_config(tmp_path)
    text, html = render_email(config, sample_alert(config), SUBJECT)
    assert claim_instruction(text, html) == (
        f'To claim one, add its number and project folder to epn_cap_map in {tmp_path}/config.yml, e.g. "20001": ab12',
        f'To claim one, add its number and project folder to epn_cap_map in {tmp_path}/config.yml , e.g. "20001": ab12',
    )

    map_file = tmp_path / 'maps <&> "x"' / "epn_cap_map.yml"  # a folder name that is markup in HTML
    config = template_config(tmp_path, map_file=map_file)
    text, html = render_email(config, sample_alert(config), SUBJECT)
    assert claim_instruction(text, html) == (
        f'To claim one, add its number and project folder to {map_file}, e.g. "20001": ab12',
        f'To claim one, add its number and project folder to {map_file} , e.g. "20001": ab12',
    )
    assert "config.yml" not in text and "config.yml" not in html
    assert "maps &lt;&amp;&gt; &#34;x&#34;" in html and "<&>" not in html


def test_check_templates_names_a_missing_template(tmp_path):
    with pytest.raises(MailError, match=r"template nope\.j2: not found in "):
        check_templates(template_config(tmp_path, text="nope.j2", folder=tmp_path))


# ---------------------------------------------------------------- end to end: helpers


def run_epnalert(config, *arguments):
    return subprocess.run(
        [str(EPNALERT), "--config", str(config), *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
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


def store_file(facility):
    return facility.workdir / "state" / "mxsync.db"


def store_rows(facility, sql, parameters=()):
    """Rows of a query on the state store, with plain sqlite3 ([] if there is no store)."""
    if not store_file(facility).exists():
        return []
    connection = sqlite3.connect(str(store_file(facility)), isolation_level=None)
    try:
        return connection.execute(sql, parameters).fetchall()
    finally:
        connection.close()


def alert_note(facility):
    """What epnalert remembers of the last alert sent ({last_sent, last_recipients, epns}), or None if nothing."""
    rows = store_rows(facility, "SELECT value FROM notes WHERE name = ?", (EPNALERT_NOTE,))
    return json.loads(rows[0][0]) if rows else None


def alerts_sent(facility):
    return store_rows(facility, "SELECT key, sent_at, recipients, subject FROM alerts WHERE kind = 'unknown-epn'")


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
        "30003c": (
            now + timedelta(days=2),
            now + timedelta(days=3),
        ),  # booked, no data yet
        "30004a": (
            now - timedelta(days=10),
            now - timedelta(days=9),
        ),  # data not (yet) visible on SFTP
    }
    small = {"frames": 1, "small_files": 0}
    facility.add_experiment("mx", "12282a", equipment_id=23, **small)  # known: in epn_cap_map
    facility.add_experiment(
        "mx",
        "20001a",
        equipment_id=23,
        start=times["20001a"][0],
        end=times["20001a"][1],
        principal=ZOE,
        data_scientists=[BOB, ("Ngaio", "Marsh", "ngaio@uni.example.edu")],
        **small,
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
    assert [part.get_content_type() for part in message.iter_parts()] == [
        "text/plain",
        "text/html",
    ]
    assert message["Date"] and message["Message-ID"]
    text, html = bodies(received)

    rows = table_rows(html)
    assert set(rows) == {
        "20001a",
        "20002b",
        "30003c",
        "30004a",
    }  # not 12282a/b (known), not 30005a (too far ahead)
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
    note = alert_note(facility)
    assert set(note["epns"]) == set(rows) and note["last_recipients"] == ["staff@hpc.example.org"]
    assert {(key, sent_at, recipients, subject) for key, sent_at, recipients, subject in alerts_sent(facility)} == {
        (epn, datetime.fromisoformat(note["last_sent"]).astimezone(UTC).isoformat(timespec="microseconds"), 1, SUBJECT)
        for epn in rows
    }
    assert "WARNING" not in result.stderr  # suspicious names went out in the email, not as cron mail


def test_second_run_marks_nothing_new_and_a_later_epn_is_new(facility):
    populate(facility)
    config = facility.write_config()
    ok(run_epnalert(config))
    first_state = alert_note(facility)
    ok(run_epnalert(config))
    facility.add_experiment("mx", "20009a", frames=1, small_files=0)
    ok(run_epnalert(config))

    _, second, third = (bodies(received) for received in facility.smtp.wait_for(3))
    assert {epn: row["New"] for epn, row in table_rows(second[1]).items()} == {
        epn: f"since {datetime.fromisoformat(first).astimezone().date()}" for epn, first in first_state["epns"].items()
    }
    assert not any(block.startswith("NEW") for block in text_entries(second[0]).values())
    third_rows = table_rows(third[1])
    assert [epn for epn, row in third_rows.items() if row["New"] == "NEW"] == ["20009a"]
    assert [epn for epn, block in text_entries(third[0]).items() if block.startswith("NEW")] == ["20009a"]
    assert "1 is new since the previous alert" in third[0]
    assert alert_note(facility)["epns"]["20001a"] == first_state["epns"]["20001a"]
    assert len(alerts_sent(facility)) == 3 * 4 + 1  # a row per EPN per alert


def test_no_unknown_epns_no_email(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, frames=1, small_files=0)
    result = ok(run_epnalert(facility.write_config()))
    assert facility.smtp.messages == [] and alert_note(facility) is None and alerts_sent(facility) == []
    assert re.search(
        r" - epnalert - INFO:\d+: 0 unknown EPNs .*no email \(no unknown EPNs\)",
        log_text(facility),
    )
    assert result.stderr == ""


def test_dry_run_prints_the_email_sends_nothing_and_keeps_state(facility):
    populate(facility)
    config = facility.write_config()
    dry = ok(run_epnalert(config, "--dry-run"))
    assert facility.smtp.messages == [] and not store_file(facility).exists()
    assert f"Subject: {SUBJECT}" in dry.stdout and "To: staff@hpc.example.org" in dry.stdout
    assert "----- text/plain -----" in dry.stdout and "----- text/html -----" in dry.stdout
    assert "NEW 20001a" in dry.stdout and "&lt;b&gt;Bob&lt;/b&gt;" in dry.stdout and "Zoë Ångström" in dry.stdout

    ok(run_epnalert(config))
    before = alert_note(facility), alerts_sent(facility)
    facility.add_experiment("mx", "20009a", frames=1, small_files=0)
    dry = ok(run_epnalert(config, "--dry-run"))
    assert "NEW 20009a" in dry.stdout and "NEW 20001a" not in dry.stdout
    assert len(facility.smtp.messages) == 1 and (alert_note(facility), alerts_sent(facility)) == before
    assert len((facility.workdir / "log" / "email.log").read_text().splitlines()) == 1


def test_with_a_map_file_the_alert_says_to_add_there_and_the_next_run_reads_it_again(facility):
    populate(facility)
    map_file = facility.workdir / "epn_cap_map.yml"
    map_file.write_text('"12282": ny79\n')  # seeded with config.yml's own entry, as the Ansible role may do
    config = facility.write_config(epn_cap_map_file=str(map_file))
    ok(run_epnalert(config))
    [received] = facility.smtp.wait_for(1)
    text, html = bodies(received)
    assert f"To claim one, add its number and project folder to\n{map_file}, e.g." in text
    assert f"<code>{map_file}</code>" in html
    assert "20001a" in table_rows(html)

    with open(map_file, "a", encoding="utf-8") as stream:  # what staff do the morning after
        stream.write('"20001": ab12\n')
    ok(run_epnalert(config))
    [_, received] = facility.smtp.wait_for(2)
    assert set(table_rows(bodies(received)[1])) == {"20002b", "30003c", "30004a"}

    map_file.unlink()
    line = error_line(run_epnalert(config), returncode=2)
    assert f"epn-cap-map-file: {map_file} does not exist; create it" in line


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
    state = alert_note(facility)
    state["last_sent"] = (datetime.fromisoformat(state["last_sent"]) - timedelta(days=8)).isoformat()
    store_rows(facility, "UPDATE notes SET value = ? WHERE name = ?", (json.dumps(state), EPNALERT_NOTE))
    ok(run_epnalert(config))
    _, repeated = facility.smtp.wait_for(2)
    assert set(table_rows(bodies(repeated)[1])) == {
        "20001a",
        "20002b",
        "30003c",
        "30004a",
    }
    assert not any(block.startswith("NEW") for block in text_entries(bodies(repeated)[0]).values())
    assert "None is new since the previous alert" in bodies(repeated)[0]
    assert alert_note(facility)["last_sent"] > state["last_sent"]


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
    assert {epn: row["Seen on"] for epn, row in rows.items()} == {
        "20001a": "SFTP and portal",
        "40001a": "SFTP and portal",
    }
    assert rows["40001a"]["Beamline"] == "mx2"
    requests = [(method, path) for method, path, _ in facility.portal.requests_log]
    assert requests == [
        ("POST", "/api/v1/oauth/token"),
        ("GET", "/api/v1/equipment/23/visits"),  # refused: the token expired meanwhile
        ("POST", "/api/v1/oauth/token"),
        ("GET", "/api/v1/equipment/23/visits"),
        (
            "GET",
            "/api/v1/equipment/24/visits",
        ),  # the renewed token serves the next equipment too
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
    assert set(table_rows(html)) == {
        "20001a",
        "20002b",
    }  # what SFTP showed; the portal-only ones are unknowable
    assert text.startswith("*****") and "THIS LIST MAY BE INCOMPLETE" in text.split("\n\n")[0]
    banner = text.split("\n\n")[0]
    assert "portal equipment 23 (mx)" in banner and reason in banner
    box = BeautifulSoup(html, "html.parser").find("div")
    assert "may be incomplete" in box.get_text() and reason in box.get_text()
    # The built-in templates show it all themselves: no second notice on top.
    assert text.count("INCOMPLETE") == 1 and html.count("may be incomplete") == 1
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
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return str(key)


@pytest.mark.parametrize("refusal", ["wrong key", "changed host key"])
def test_sftp_refusal_still_alerts_from_the_portal(facility, tmp_path, refusal):
    populate(facility)
    if refusal == "wrong key":
        config, reason = (
            facility.write_config(key_file=_other_key(tmp_path)),
            "login refused",
        )
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
    assert facility.smtp.messages == [] and alert_note(facility) is None
    assert "retrying" in log_text(facility)  # the details are in the log file, not in cron's mail


def test_portal_unreachable_and_sftp_down(facility):
    populate(facility)
    config = facility.write_config(portal_retries=0)
    facility.portal.stop()
    facility.sshd.stop()
    line = error_line(run_epnalert(config))
    assert "cannot connect" in line and "SFTP" in line and "portal" in line
    assert not re.search(r"SFTP (\S+): SFTP \1", line), line  # the host is named once


def test_smtp_refusal_exits_1_and_keeps_state(facility):
    populate(facility)
    config = facility.write_config()
    facility.smtp.fail_with = "554 Transaction failed: mailbox unavailable"
    line = error_line(run_epnalert(config))
    assert "refused the email: 554" in line
    assert alert_note(facility) is None and alerts_sent(facility) == []
    assert "not sent" in log_text(facility)

    facility.smtp.fail_with = None
    ok(run_epnalert(config))
    rows = table_rows(bodies(facility.smtp.wait_for(1)[0])[1])
    assert all(row["New"] == "NEW" for row in rows.values())  # the failed alert did not count as sent


def test_a_damaged_old_state_file_is_left_in_place_with_a_warning_and_the_alert_recorded(facility):
    populate(facility)
    config = facility.write_config()
    old = facility.workdir / "state" / "epnalert-state.json"
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_text("{not json")
    result = ok(run_epnalert(config))
    (warning,) = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert str(old) in warning and "cannot be imported" in warning and "left in place" in warning
    rows = table_rows(bodies(facility.smtp.wait_for(1)[0])[1])
    assert all(row["New"] == "NEW" for row in rows.values())
    assert old.read_text() == "{not json" and set(alert_note(facility)["epns"]) == set(rows)


def test_a_corrupt_store_is_moved_aside_and_the_alert_still_sent_and_recorded(facility):
    populate(facility)
    config = facility.write_config()
    store_file(facility).parent.mkdir(parents=True, exist_ok=True)
    store_file(facility).write_bytes(b"{not a database" * 1000)
    result = ok(run_epnalert(config))
    (aside,) = store_file(facility).parent.glob("mxsync.db.corrupt-*")
    assert aside.read_bytes() == b"{not a database" * 1000
    assert "moved it to" in result.stderr and str(aside) in result.stderr and "Traceback" not in result.stderr
    rows = table_rows(bodies(facility.smtp.wait_for(1)[0])[1])
    assert all(row["New"] == "NEW" for row in rows.values()) and set(alert_note(facility)["epns"]) == set(rows)


def test_a_store_from_a_newer_mxsync_still_alerts_and_is_left_alone(facility):
    populate(facility)
    config = facility.write_config()
    ok(run_epnalert(config))
    store_rows(facility, "PRAGMA user_version = 99")
    before = store_file(facility).read_bytes()
    line = error_line(run_epnalert(config))
    assert str(store_file(facility)) in line and "newer mxsync" in line
    _, second = facility.smtp.wait_for(2)
    assert all(row["New"] == "NEW" for row in table_rows(bodies(second)[1]).values())
    assert store_file(facility).read_bytes() == before


# ---------------------------------------------------------------- templates

STARS = "*" * 78


def legacy_config(facility, **overrides):
    """Write a config with HPC ASSyncy's templates (tests/data/legacy-templates), as an upgraded site has it."""
    return facility.write_config(
        epnalert_template_folder=str(LEGACY_TEMPLATES),
        epnalert_template_text="epnalert-text.j2",
        epnalert_template_html="epnalert-html.j2",
        **overrides,
    )


def notice_of(text):
    """Split a text part into (the starred notice on top, or None; the rest)."""
    match = re.match(rf"{re.escape(STARS)}\n(.*?)\n{re.escape(STARS)}\n\n", text, re.DOTALL)
    return (match.group(1), text[match.end() :]) if match else (None, text)


def first_in_body(html):
    """Return the first element inside the HTML part's <body>."""
    return BeautifulSoup(html, "html.parser").body.find(True)


def test_old_style_templates_render(facility):
    times = populate(facility)
    ok(run_epnalert(legacy_config(facility)))

    text, html = bodies(facility.smtp.wait_for(1)[0])
    # The old templates show no suspicious names: our notice lists them on top, the old email follows as it was.
    notice, old = notice_of(text)
    assert "'lost+found'" in notice and "'EPN-99'" in notice and "INCOMPLETE" not in notice
    assert old.startswith("Work instructions: href=https://wiki.example.edu/hpc/mx-integration\n\n")
    assert f"Epn 20001a on {times['20001a'][0].isoformat()} is not known.\n" in old
    assert f"Principal scientist: Zoë Ångström {ZOE[2]}\nIt includes scientists: \nFirst name" in old
    assert re.search(r"^<b>Bob</b>\s+Builder\s+bob@uni\.example\.edu$", old, re.MULTILINE)
    assert "** Please add it the config. **" in old
    assert "Epn 30003c on" in old and "Epn 20002b" not in old  # with a visit / without one
    unknown_table = old.split("The following epns are not known:\n")[1]
    assert unknown_table.split() == ["------", "20002b", "------"]
    box = first_in_body(html)
    assert box.name == "div" and "lost+found" in box.get_text() and "EPN-99" in box.get_text()
    assert "may be incomplete" not in box.get_text()
    pre = BeautifulSoup(html, "html.parser").find("pre")
    assert "&lt;b&gt;Bob&lt;/b&gt;" in html and pre.find("b") is None
    assert "Epn 20001a on" in pre.get_text() and "Zoë Ångström" in pre.get_text()


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("http500", "HTTP 500"),
        ("html", "'Down for maintenance'"),
        ("host key", "host key does not match"),
    ],
)
def test_old_style_templates_still_say_a_source_failed(facility, fault, reason):
    populate(facility)
    if fault == "host key":
        facility.sshd.regenerate_host_key()
        failed, suspicious = "SFTP", "'EPN-99'"
    else:
        facility.portal.add_fault(fault, "/api/v1/equipment", count=100)
        failed, suspicious = "portal equipment 23 (mx)", "'lost+found'"
    ok(run_epnalert(legacy_config(facility, portal_retries=1)))

    text, html = bodies(facility.smtp.wait_for(1)[0])
    notice, old = notice_of(text)
    assert notice.startswith("  THIS LIST MAY BE INCOMPLETE: a source could not be used.\n  - ")
    assert failed in notice and reason in notice and suspicious in notice
    assert text.count("INCOMPLETE") == 1 and old.startswith("Work instructions:")
    box = first_in_body(html)
    assert box.name == "div" and box.find_next_sibling("pre") is not None
    shown = box.get_text()
    assert "may be incomplete" in shown and failed in shown and reason in shown and suspicious.strip("'") in shown
    assert html.count("may be incomplete") == 1


def test_a_template_that_shows_failures_and_suspicious_names_gets_no_notice(facility, tmp_path):
    populate(facility)
    facility.portal.add_fault("http500", "/api/v1/equipment", count=100)
    (tmp_path / "own.j2").write_text(
        "{% for f in alert.failed_sources %}{{ f.part }} failed: {{ f.reason }}\n{% endfor %}"
        "{% for r in alert.suspicious %}odd: {{ r.name }} ({{ r.reason }})\n{% endfor %}"
        "{% for item in alert.unknown %}{{ item.epn }}\n{% endfor %}"
    )
    config = facility.write_config(
        epnalert_template_folder=str(tmp_path),
        epnalert_template_text="own.j2",
        portal_retries=1,
    )
    ok(run_epnalert(config))
    text = facility.smtp.wait_for(1)[0].message.get_content()
    assert notice_of(text)[0] is None and STARS not in text
    assert text.startswith("equipment 23 (mx) failed: portal ") and "HTTP 500" in text and "odd: 'lost+found'" in text


def test_text_only_template_sends_text_only(facility, tmp_path):
    populate(facility)
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "plain.j2").write_text("{% for item in alert.unknown %}{{ item.epn }} {{ item.seen_on }}\n{% endfor %}")
    ok(run_epnalert(facility.write_config(epnalert_template_folder=str(folder), epnalert_template_text="plain.j2")))
    message = facility.smtp.wait_for(1)[0].message
    assert message.get_content_type() == "text/plain"
    notice, rest = notice_of(message.get_content())
    assert "'lost+found'" in notice and "'EPN-99'" in notice
    assert rest.splitlines() == [
        "20001a SFTP and portal",
        "20002b SFTP",
        "30003c portal",
        "30004a portal",
    ]


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
    assert "<td>20001a</td>" in html and first_in_body(html).name == "div"
    lines = text.splitlines()
    # The HTML part's notice comes first in the derived text too, once.
    assert lines[0].startswith("Names or records that are not valid EPNs") and text.count("'lost+found'") == 1
    assert lines[lines.index(SUBJECT) :][:3] == [SUBJECT, "", "4 new."]
    assert "EPN | Seen on | Principal" in lines
    assert "20001a | SFTP and portal | Zoë Ångström" in lines and "20002b | SFTP | -" in lines
    assert "<" not in text.replace("<b>Bob</b>", "")


@pytest.mark.parametrize(
    "source, where",
    [
        ("line one\n{% for x in %}\n", "bad.j2, line 2: "),
        (
            "line one\n{{ alert.unknown|length // 0 }}\n",
            "bad.j2, line 2: cannot render it: integer division",
        ),
    ],
)
def test_broken_template_exits_1_with_one_line(facility, tmp_path, source, where):
    populate(facility)
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "bad.j2").write_text(source)
    config = facility.write_config(epnalert_template_folder=str(folder), epnalert_template_text="bad.j2")
    line = error_line(run_epnalert(config))
    assert where in line and facility.smtp.messages == []


# ---------------------------------------------------------------- hostile names

EVE = (
    'Eve\r\n\r\nepn_cap_map:\r\n    "20001": ev01\r\n',
    "Mallory",
    "eve@uni.example.edu",
)
MAL = ("Mal\u2028lory\x1b[2J", "\u202eO'Neil", "mal@uni.example.edu")


@pytest.mark.parametrize("templates", ["built-in", "HPC ASSyncy's"])
def test_control_characters_in_portal_names_stay_on_their_line(facility, templates):
    now = datetime.now(UTC)
    facility.add_experiment(
        "mx",
        "20001a",
        equipment_id=23,
        start=now - timedelta(days=3),
        end=now - timedelta(days=2),
        principal=EVE,
        data_scientists=[ZOE, MAL],
        frames=1,
        small_files=0,
    )
    ok(run_epnalert(facility.write_config() if templates == "built-in" else legacy_config(facility)))

    received = facility.smtp.wait_for(1)[0]
    assert received.message["Subject"] == SUBJECT
    text, html = bodies(received)
    shown_html = BeautifulSoup(html, "html.parser").get_text()
    for part in (text, html, shown_html):
        # No line break but the template's own LF (str.splitlines() knows all these), no terminal escape, no bidi override.
        assert not any(character in part for character in "\r\v\f\x1c\x1d\x1e\x85\u2028\u2029\x1b\u202e")
        assert "Zoë" in part and "Ångström" in part  # letters kept (the old table puts them in columns)
        # The crafted lines are still there to see, escaped, on the line of the name they came with.
        assert 'Eve\\r\\n\\r\\nepn_cap_map:\\r\\n    "20001": ev01' in part.replace("&#34;", '"')
        assert "Mal\\u2028lory\\x1b[2J" in part and "\\u202eO" in part
    assert not [line for line in text.splitlines() if line.lstrip().startswith(("epn_cap_map", '"20001"'))]


def test_dry_run_into_head_exits_quietly(facility):
    populate(facility)
    now = datetime.now(UTC)
    for number in range(50000, 50600):  # an email far bigger than a pipe's buffer
        facility.portal.add_visit(23, f"{number}a", now - timedelta(days=2), now - timedelta(days=1))
    config = facility.write_config()
    # Buffered output, as from cron or a shell (with PYTHONUNBUFFERED a cut-off write just ends the process quietly).
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    epnalert = subprocess.Popen(
        [str(EPNALERT), "--config", str(config), "--dry-run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment,
    )
    head = subprocess.Popen(["head", "-3"], stdin=epnalert.stdout, stdout=subprocess.PIPE)
    epnalert.stdout.close()  # as in a shell pipeline, head alone now reads the pipe
    shown = head.communicate(timeout=120)[0].decode()
    stderr = epnalert.stderr.read().decode()
    epnalert.wait(timeout=120)
    assert shown.startswith("# epnalert --dry-run: this email would be sent") and len(shown.splitlines()) == 3
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr, stderr
    assert facility.smtp.messages == [] and not store_file(facility).exists()


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
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "--dry-run" in result.stdout and result.stdout.strip().endswith("[]"), result.stdout + result.stderr


def test_missing_config_is_one_line_and_exit_2(tmp_path):
    result = run_epnalert(tmp_path / "nope.yml")
    assert error_line(result, returncode=2).endswith("file not found; pass --config with the path of your config.yml")
