"""The old tool's rule for which visits are finished, and the checks every planned path passes."""

from datetime import datetime, timedelta, timezone

import pytest
import yaml

from mxsync.config import load_config
from mxsync.plan import make_plan
from mxsync.portal import Visit
from mxsync.rsync import TransferResult, _record_item, rsh_string, verify_destination

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def config(tmp_path):
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
    }
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "dest").mkdir()
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
        _record_item(result, line, "12282a")
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
