"""The old tool's rule for which visits are finished, and the checks every planned path passes."""

import re
import time
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from mxsync.commands import rsh_string
from mxsync.config import load_config
from mxsync.itemize import TransferResult, record_item, verify_destination
from mxsync.plan import LONGEST_VISIT, fetch_visits, make_plan, visit_end
from mxsync.portal import PortalClient, Visit, format_portal_time
from tests.facility.portal import DEFAULT_CREDENTIALS

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path)


def write_config(tmp_path, **extra):
    data = {
        "epn_cap_map": {"12282": "ny79", "12283": "ab12"},
        "ignore": "ignore.yml",
        "equipment": [{"id": 23, "username": "u", "password": "pw", "client_name": "c", "client_password": "cp"}],
        "base-url": "https://portal.example.org",
        "beamline": "mx",
        "host": "sftp.example.org",
        "epnalert-email-to": "to@example.org",
        "epnalert-email-from": "from@example.org",
        "epnalert-email-smtp": "localhost",
        "destination-root-path": str(tmp_path / "dest"),
        **extra,
    }
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "dest").mkdir(exist_ok=True)
    return load_config(path)


def visit(epn, start_hours, end_hours):
    return Visit(epn, NOW + timedelta(hours=start_hours), NOW + timedelta(hours=end_hours), 23, "mx", None, ())


def test_every_mapped_epn_in_the_window_is_a_candidate_with_all_its_visits(config):
    running = visit("12283b", -5, 3)
    earlier, later = visit("12282a", -48, -40), visit("12282a", -1, 5)
    plan = make_plan(config, [visit("12282b", -4, -2), running, earlier, later, earlier], set(), NOW)
    assert [candidate.epn for candidate in plan.candidates] == ["12282a", "12282b", "12283b"]
    assert plan.candidates[0].visits == (earlier, later) and plan.candidates[0].visit == later  # duplicates once
    assert plan.not_ended == ["12282a", "12283b"]


def test_a_visit_without_an_end_is_taken_to_last_longest_visit():
    recent = Visit("12282d", NOW - timedelta(days=2), None, 23, "mx", None, ())
    assert visit_end(recent) == recent.start + LONGEST_VISIT


def test_only_visits_that_end_within_visit_day_range_of_now_count(config):
    days = config.visit_day_range
    inside, outside = visit("12282a", -24 * days - 5, -24 * days + 1), visit("12283a", -24 * days - 5, -24 * days - 1)
    plan = make_plan(config, [inside, outside], set(), NOW)
    assert [candidate.epn for candidate in plan.candidates] == ["12282a"]


def test_a_booked_visit_makes_its_epn_a_candidate_not_ended(config):
    plan = make_plan(config, [visit("12282a", -30, -20), visit("12282a", 20, 30)], set(), NOW)
    assert [candidate.epn for candidate in plan.candidates] == ["12282a"] and plan.not_ended == ["12282a"]


@pytest.fixture
def local_zone_utc_plus_10(monkeypatch):
    """Make this process's local time UTC+10 (a POSIX TZ string: no zone data needed)."""
    monkeypatch.setenv("TZ", "AEST-10")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_portal_time_formats(local_zone_utc_plus_10):
    moment = datetime(2026, 11, 21, 12, 0, 5, tzinfo=timezone.utc)
    # HPC ASSyncy sent datetime.now().isoformat(): local wall-clock time, microseconds, no offset.
    assert format_portal_time(moment, "local") == "2026-11-21T22:00:05.000000"
    assert format_portal_time(moment, "utc") == "2026-11-21T12:00:05.000000"
    assert format_portal_time(moment, "utc-offset") == "2026-11-21T12:00:05.000000+00:00"
    assert format_portal_time(moment.astimezone(timezone(timedelta(hours=-5))), "utc") == "2026-11-21T12:00:05.000000"


def portal_config(tmp_path, portal, **extra):
    portal.set_credentials(DEFAULT_CREDENTIALS)
    credentials = {
        "username": DEFAULT_CREDENTIALS.username,
        "password": DEFAULT_CREDENTIALS.password,
        "client_name": DEFAULT_CREDENTIALS.client_name,
        "client_password": DEFAULT_CREDENTIALS.client_password,
    }
    return write_config(
        tmp_path, **{"base-url": portal.url, "portal-retries": 0, **extra, "equipment": [{"id": 23, **credentials}]}
    )


@pytest.mark.parametrize("time_format", ["local", "utc", "utc-offset"])
@pytest.mark.parametrize("portal_zone_hours", [11, 14, -12])
def test_a_portal_that_misreads_query_times_by_a_zone_still_gives_the_right_plan(
    tmp_path, portal, time_format, portal_zone_hours
):
    """The portal reads every query time as wall-clock time in its own zone, ignoring any offset."""
    portal.naive_time_zone, portal.offsets_ignored = timezone(timedelta(hours=portal_zone_hours)), True
    now = datetime.now(timezone.utc)

    def hours(offset):
        return now + timedelta(hours=offset)

    portal.add_visit(23, "12282a", hours(-40), hours(-30))  # an earlier beamtime of an EPN ...
    portal.add_visit(23, "12282a", hours(-5), hours(3))  # ... whose second one is being collected now
    portal.add_visit(23, "12283a", hours(-50), hours(-40))  # done
    portal.add_visit(23, "12283b", hours(-4), hours(-2))  # ended after the running visit started: its own life
    config = portal_config(tmp_path, portal, **{"portal-time-format": time_format})

    visits, suspicious, errors = fetch_visits(config, PortalClient(config), now)
    plan = make_plan(config, visits, set(), now, suspicious)

    assert errors == []
    assert {candidate.epn: len(candidate.visits) for candidate in plan.candidates} == {
        "12282a": 2,
        "12283a": 1,
        "12283b": 1,
    }
    assert plan.not_ended == ["12282a"]


def test_queries_send_local_time_without_offset_by_default(tmp_path, portal):
    portal.add_equipment(23)
    config = portal_config(tmp_path, portal)
    now = datetime.now(timezone.utc)
    assert fetch_visits(config, PortalClient(config), now)[2] == []
    sent = [query for method, path, query in portal.requests_log if path.endswith("/visits")]
    assert len(sent) == 1
    for query in sent:
        for name in ("start_time", "end_time"):
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}", query[name]), query
    first = {name: datetime.fromisoformat(sent[0][name]).astimezone() for name in ("start_time", "end_time")}
    # visit-day-range back and a week of bookings ahead, a day of margin each way
    assert first == {
        "start_time": now - timedelta(days=config.visit_day_range + 1),
        "end_time": now + timedelta(days=8),
    }


def test_synced_unmapped_and_destination(config, tmp_path):
    previous = [visit("12282a", -30, -20), visit("12283a", -30, -20), visit("99999a", -30, -20)]
    plan = make_plan(config, previous, {"12283a"}, NOW)
    assert plan.synced == ["12283a"] and plan.unmapped == ["99999a"]
    (transfer,) = plan.candidates
    assert transfer.source == "/data/mx/12282a"
    assert str(transfer.destination) == str((tmp_path / "dest").resolve() / "ny79" / "12282a" / "data")


def test_symlinked_project_leading_outside_root_is_refused(config, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "dest" / "ny79").symlink_to(outside)
    plan = make_plan(config, [visit("12282a", -30, -20)], set(), NOW)
    assert plan.candidates == [] and plan.refused == ["12282a"]


def test_itemised_lines_are_parsed_with_escapes():
    result = TransferResult("12282a")
    for line in [
        b".d..t...... 4096 ./\n",
        b">f+++++++++ 6291456 frames/img_0001.cbf\n",
        b".f          12 .info\n",
        b">f+++++++++ 3 home/odd\\#012name\n",
        b"cL+++++++++ 5 link\n",
        b"some other message\n",
    ]:
        record_item(result, line, "12282a")
    assert result.files == [("frames/img_0001.cbf", 6291456), (".info", 12), ("home/odd\nname", 3)]
    assert result.files_transferred == 2 and result.bytes_transferred == 6291459


def test_verification_finds_missing_and_short_files(tmp_path):
    (tmp_path / "a").write_bytes(b"12345")
    (tmp_path / "b").write_bytes(b"12")
    result = TransferResult("12282a", files=[("a", 5), ("b", 3), ("c", 1)])
    assert verify_destination(result, tmp_path) == ["b: 2 bytes, source has 3", "c: missing"]
    assert verify_destination(TransferResult("x", files=[("a", 5)]), tmp_path) == []


def test_rsh_string_quotes_spaces_and_refuses_quotes():
    assert rsh_string(["ssh", "-i", "/etc/my key"]) == "ssh -i '/etc/my key'"
    with pytest.raises(Exception, match="quotes and newlines"):
        rsh_string(["ssh", "-i", "/etc/it's"])
