"""The scientists' email (issue 14): one message per recorded EPN, to a real SMTP sink, names from outside harmless."""

import logging

import pytest
import yaml

from mxsync.config import load_config
from mxsync.errors import ConfigError, FollowUpError, MailError
from mxsync.scientists import NotifyScientists, check_templates
from tests.facility import SmtpSink
from tests.test_config import LEGACY, legacy_key_file  # noqa: F401 - the key the sample names, as a fixture

HOSTILE = "<b>Eve</b>\r\nBcc: x@evil"


def config_for(tmp_path, sink=None, **keys):
    data = yaml.safe_load(LEGACY.read_text())
    data["epn_cap_map"] = {"12282": "ny79", "30001": "ab12"}
    data["mxsync-email-to"] = "MX staff <mx-staff@facility.edu>"
    if sink is not None:
        data["epnalert-email-smtp"] = f"{sink.host}:{sink.port}"
    data.update({key.replace("_", "-"): value for key, value in keys.items()})
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    path.chmod(0o600)
    return load_config(path)


def record(epn="12282a", project="ny79", **changes):
    value = {
        "epn": epn,
        "project": project,
        "destination": f"/hpc/mx/{project}/{epn}",
        "beamline": "MX2",
        "visit_start": "2024-04-28T09:00:00+10:00",
        "visit_end": "2024-04-29T09:00:00+10:00",
        "principal": {"name": "Zoë Ångström", "email": "zoe@uni.edu"},
        "scientists": [
            {"name": HOSTILE, "email": "eve@uni.edu"},
            {"name": "Zoë again", "email": "ZOE@uni.edu"},  # the principal, listed twice: one email
            {"name": "Staff Member", "email": "Beamline.Staff@facility.edu"},
            {"name": "No Address", "email": ""},
        ],
        "files": 1234,
        "bytes": 5_368_709_120,
        "bagged": False,
    }
    value.update(changes)
    return value


@pytest.fixture
def sink():
    with SmtpSink() as running:
        yield running


def test_one_email_to_the_scientists_with_where_how_much_and_whom_to_ask(tmp_path, sink):
    config = config_for(
        tmp_path, sink, notify_scientists=True, notify_scientists_exclude=["beamline.staff@FACILITY.edu"]
    )
    NotifyScientists(config, hostname="m3.hpc.edu").run(record(), dry_run=False)
    (received,) = sink.wait_for(1)
    assert sorted(received.rcpt_tos) == ["eve@uni.edu", "zoe@uni.edu"]  # excluded case-insensitively, merged
    message = received.message
    assert message["Subject"] == "Your data from EPN 12282a is at m3.hpc.edu"
    assert message["From"] == "from@domain.edu"
    assert message["Reply-To"] == "MX staff <mx-staff@facility.edu>"
    # Non-ASCII names intact once decoded; the hostile name is quoted, its CR LF escaped: no header of its own.
    to = [(address.display_name, address.addr_spec) for address in message["To"].addresses]
    assert to == [("Zoë Ångström", "zoe@uni.edu"), ("<b>Eve</b>\\r\\nBcc: x@evil", "eve@uni.edu")]
    headers = received.raw.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert message["Bcc"] is None and not any(line.lower().startswith(b"bcc") for line in headers)
    text = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    for part in (text, html):
        assert "/hpc/mx/ny79/12282a" in part
        assert "1,234" in part and "5.0 GiB" in part and "5,368,709,120 bytes" in part
        assert "every file the synchrotron listed is here" in part
        assert "mx-staff@facility.edu" in part
        assert "Zoë Ångström" in part
    assert "Bagged" not in text
    assert text.startswith("Dear Zoë Ångström, <b>Eve</b>\\r\\nBcc: x@evil,\n")  # the recipients only, once each
    assert "2024-04-28 09:00 +10:00 to 2024-04-29 09:00 +10:00" in text
    assert "<b>Eve</b>" not in html and "&lt;b&gt;Eve&lt;/b&gt;" in html
    assert "<b>Eve</b>\\r\\nBcc: x@evil" in text and "\r\nBcc" not in text


def test_only_the_listed_projects(tmp_path, sink):
    action = NotifyScientists(config_for(tmp_path, sink, notify_scientists=["ny79"]))
    assert action.applies("ny79") and not action.applies("ab12")
    action.run(record(epn="30001a", project="ab12"), dry_run=False)
    action.run(record(), dry_run=False)
    (received,) = sink.wait_for(1)
    assert "12282a" in received.message["Subject"]
    assert len(sink.messages) == 1


def test_off_by_default(tmp_path, sink):
    action = NotifyScientists(config_for(tmp_path, sink))
    assert not action.applies("ny79")
    action.run(record(), dry_run=False)
    assert sink.messages == []


def test_nobody_with_an_address_is_no_email_and_no_error(tmp_path, sink, caplog):
    config = config_for(tmp_path, sink, notify_scientists=True, notify_scientists_exclude="zoe@uni.edu")
    people = {"principal": {"name": "Zoë", "email": "ZOE@uni.edu"}, "scientists": [{"name": "Bob", "email": ""}]}
    with caplog.at_level(logging.INFO, logger="mxsync.scientists"):
        NotifyScientists(config).run(record(**people), dry_run=False)
        NotifyScientists(config).run(record(principal=None, scientists=[]), dry_run=False)
    assert sink.messages == []
    assert "12282a: no scientist with an email address" in caplog.text


def test_an_address_that_is_not_one_is_skipped_with_a_warning(tmp_path, sink, caplog):
    config = config_for(tmp_path, sink, notify_scientists=True)
    people = {"scientists": [{"name": "Mallory", "email": "m@x.edu\r\nBcc: x@evil"}]}
    with caplog.at_level(logging.WARNING, logger="mxsync.scientists"):
        NotifyScientists(config).run(record(**people), dry_run=False)
    (received,) = sink.wait_for(1)
    assert received.rcpt_tos == ["zoe@uni.edu"]
    assert "Mallory has the email address" in caplog.text and "not emailed" in caplog.text


def test_dry_run_sends_nothing_and_says_who_would_be_emailed(tmp_path, sink, caplog):
    config = config_for(tmp_path, sink, notify_scientists=True)
    with caplog.at_level(logging.INFO, logger="mxsync.scientists"):
        NotifyScientists(config).run(record(), dry_run=True)
    assert sink.messages == []
    assert "12282a: would email Zoë Ångström <zoe@uni.edu>" in caplog.text
    assert "eve@uni.edu" in caplog.text


def test_smtp_refusal_is_a_followup_error_for_the_operator(tmp_path):
    with SmtpSink(fail_with="451 Try again later") as sink:
        config = config_for(tmp_path, sink, notify_scientists=True)
        with pytest.raises(FollowUpError) as raised:
            NotifyScientists(config).run(record(), dry_run=False)
    message = str(raised.value)
    assert message.startswith("12282a: cannot email its scientists (zoe@uni.edu, eve@uni.edu, ")
    assert "451 Try again later" in message and "next cycle" in message and "\n" not in message


def test_bagged_is_said_when_the_record_says_so(tmp_path, sink):
    NotifyScientists(config_for(tmp_path, sink, notify_scientists=True)).run(record(bagged=True), dry_run=False)
    (received,) = sink.wait_for(1)
    assert "BagIt" in received.message.get_body(("plain",)).get_content()


def test_unknown_counts_are_said_to_be_unknown(tmp_path, sink):
    config = config_for(tmp_path, sink, notify_scientists=True)
    NotifyScientists(config).run(record(files=None, bytes=None), dry_run=False)
    (received,) = sink.wait_for(1)
    assert "Files         unknown" in received.message.get_body(("plain",)).get_content()


def test_a_site_template_overrides_the_built_in_one(tmp_path, sink):
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "synced-text.j2").write_text("Site text: {{ epn }} at {{ destination }}\n", encoding="utf-8")
    config = config_for(tmp_path, sink, notify_scientists=True, notify_scientists_template_folder=str(folder))
    NotifyScientists(config).run(record(), dry_run=False)
    (received,) = sink.wait_for(1)
    assert received.message.get_body(("plain",)).get_content() == "Site text: 12282a at /hpc/mx/ny79/12282a\n"
    assert "<table" in received.message.get_body(("html",)).get_content()  # the built-in HTML part
    assert "render on sample data" in check_templates(config)


def test_a_broken_site_template_is_named_with_its_line(tmp_path, sink):
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "synced-html.j2").write_text("<p>\n{{ nosuchname }}</p>\n", encoding="utf-8")
    config = config_for(tmp_path, sink, notify_scientists=True, notify_scientists_template_folder=str(folder))
    with pytest.raises(FollowUpError, match=r"synced-html.j2, line 2: cannot render it: 'nosuchname' is undefined"):
        NotifyScientists(config).run(record(), dry_run=False)
    assert sink.messages == []


def test_built_in_templates_check(tmp_path):
    assert check_templates(config_for(tmp_path)) == "built-in templates render"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("yes", "notify-scientists: expected true, false or a list of project names (e.g. [ny79]), got 'yes'"),
        ([], "notify-scientists: an empty list emails nobody"),
        (["ny79", "../etc"], "notify-scientists[1]: expected a project name, got '../etc'"),
        (["ny79", 7], "notify-scientists[1]: expected a project name, got 7"),
    ],
)
def test_notify_scientists_problems_at_their_key_path(tmp_path, value, problem):
    with pytest.raises(ConfigError) as raised:
        config_for(tmp_path, notify_scientists=value)
    assert any(line.startswith(problem) for line in raised.value.problems), raised.value.problems


def test_exclude_is_validated_like_the_other_address_keys(tmp_path):
    with pytest.raises(ConfigError) as raised:
        config_for(tmp_path, notify_scientists=True, notify_scientists_exclude=["staff@x.edu", "not an address"])
    assert any(line.startswith("notify-scientists-exclude: expected email addresses") for line in raised.value.problems)


def test_config_values(tmp_path):
    config = config_for(
        tmp_path, notify_scientists=["ny79", "zz99"], notify_scientists_exclude="Staff <Staff@X.edu>, b@y.edu"
    )
    assert config.notify_scientists == ("ny79", "zz99")
    assert config.notify_scientists_exclude == ("staff@x.edu", "b@y.edu")
    assert any("notify-scientists[1]: project zz99 is not in epn_cap_map" in warning for warning in config.warnings)
    assert config_for(tmp_path).notify_scientists is False
    assert config_for(tmp_path).notify_scientists_template_folder is None


def test_mxsync_check_renders_the_scientists_templates_only_when_the_email_is_on(tmp_path):
    from mxsync.check import _probes

    def probe_names(config):
        return [name for name, _ in _probes(config)]

    assert "scientists' email templates" not in probe_names(config_for(tmp_path))
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "synced-text.j2").write_text("{% if %}\n", encoding="utf-8")
    config = config_for(tmp_path, notify_scientists=["ny79"], notify_scientists_template_folder=str(folder))
    probe = dict(_probes(config))["scientists' email templates"]
    with pytest.raises(MailError, match=r"synced-text.j2, line 1: "):
        probe()
