"""The old tool's rule for which visits are finished, and the checks every planned path passes."""

import re
import time
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from mxsync.config import load_config
from mxsync.itemize import TransferResult, record_item, verify_destination
from mxsync.plan import fetch_visits, find_current_start, make_plan
from mxsync.portal import PortalClient, Visit, format_portal_time
from mxsync.rsync import rsh_string
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


def test_only_visits_ended_before_the_earliest_running_visit(config):
    running = visit("12283b", -5, 3)
    previous = [visit("12282a", -30, -20), visit("12282b", -4, -2), running]
    plan = make_plan(config, [running], previous, set(), current_start=running.start)
    assert [transfer.epn for transfer in plan.transfers] == ["12282a"]
    assert plan.not_ended == ["12282b", "12283b"]


def test_epn_with_a_later_visit_still_running_waits(config):
    later = visit("12282a", -1, 5)
    plan = make_plan(config, [later], [visit("12282a", -48, -40), later], set(), current_start=later.start)
    assert plan.transfers == [] and "12282a" in plan.not_ended


def test_current_start_is_decided_on_each_visits_own_times():
    running, later_today = visit("12283b", -5, 3), visit("12283c", 0.5, 8)
    ended, far_ahead = visit("12282a", -30, -20), visit("12282b", 30, 40)
    no_end = Visit("12282c", NOW - timedelta(days=90), None, 23, "mx", None, ())
    assert find_current_start([ended, far_ahead, no_end], NOW) == NOW
    assert find_current_start([ended, later_today, running, far_ahead], NOW) == running.start
    assert find_current_start([visit("12283d", -2, 0)], NOW) == NOW - timedelta(hours=2)  # ends now: still on
    recent_no_end = Visit("12282d", NOW - timedelta(days=2), None, 23, "mx", None, ())
    assert find_current_start([ended, recent_no_end], NOW) == recent_no_end.start  # may still run: holds back


def test_a_finished_visit_counts_whichever_query_returned_it(config):
    # Widened queries return an ended visit in the "current" answer too; it is judged by its times.
    plan = make_plan(config, [visit("12282a", -26, -2)], [], set(), current_start=NOW)
    assert [transfer.epn for transfer in plan.transfers] == ["12282a"] and plan.not_ended == []


def test_only_visits_that_ended_within_visit_day_range_of_the_cut_off_are_candidates(config):
    days = config.visit_day_range
    inside, outside = visit("12282a", -24 * days - 5, -24 * days + 1), visit("12283a", -24 * days - 5, -24 * days - 1)
    plan = make_plan(config, [], [inside, outside], set(), current_start=NOW)
    assert [transfer.epn for transfer in plan.transfers] == ["12282a"]


def test_a_visit_that_starts_later_makes_its_epn_wait(config):
    plan = make_plan(config, [], [visit("12282a", -30, -20), visit("12282a", 20, 30)], set(), current_start=NOW)
    assert plan.transfers == [] and plan.not_ended == ["12282a"]


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
    portal.add_visit(23, "12283b", hours(-4), hours(-2))  # ended after the running visit started: waits
    config = portal_config(tmp_path, portal, **{"portal-time-format": time_format})

    current, previous, suspicious, errors, current_start = fetch_visits(config, PortalClient(config), now)
    plan = make_plan(config, current, previous, set(), current_start, suspicious)

    assert errors == [] and current_start == hours(-5)
    assert [transfer.epn for transfer in plan.transfers] == ["12283a"]
    assert plan.not_ended == ["12282a", "12283b"]


def test_queries_send_local_time_without_offset_by_default(tmp_path, portal):
    portal.add_equipment(23)
    config = portal_config(tmp_path, portal)
    now = datetime.now(timezone.utc)
    assert fetch_visits(config, PortalClient(config), now)[3] == []
    sent = [query for method, path, query in portal.requests_log if path.endswith("/visits")]
    assert len(sent) == 2
    for query in sent:
        for name in ("start_time", "end_time"):
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}", query[name]), query
    first = {name: datetime.fromisoformat(sent[0][name]).astimezone() for name in ("start_time", "end_time")}
    assert first == {"start_time": now - timedelta(days=1), "end_time": now + timedelta(hours=25)}


def test_synced_unmapped_and_destination(config, tmp_path):
    previous = [visit("12282a", -30, -20), visit("12283a", -30, -20), visit("99999a", -30, -20)]
    plan = make_plan(config, [], previous, {"12283a"}, current_start=NOW)
    assert plan.synced == ["12283a"] and plan.unmapped == ["99999a"]
    (transfer,) = plan.transfers
    assert transfer.source == "/data/mx/12282a"
    assert str(transfer.destination) == str((tmp_path / "dest").resolve() / "ny79" / "12282a" / "data")


def test_symlinked_project_leading_outside_root_is_refused(config, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "dest" / "ny79").symlink_to(outside)
    plan = make_plan(config, [], [visit("12282a", -30, -20)], set(), current_start=NOW)
    assert plan.transfers == [] and plan.refused == ["12282a"]


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
