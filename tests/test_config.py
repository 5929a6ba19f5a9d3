"""Config loading: the old sample loads unchanged, every problem is reported at its key path."""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mxsync.commands import BASE_OPTIONS
from mxsync.config import LIVE_INTERVAL_MINUTES, SETTLE_MINUTES, load_config
from mxsync.errors import ConfigError
from mxsync.itemize import TransferResult, record_item

LEGACY = Path(__file__).parent / "data" / "legacy-config.yml"
MXSYNC = Path(sys.executable).parent / "mxsync"


@pytest.fixture(autouse=True)
def legacy_key_file(tmp_path):
    """The key the old sample names (your_path/etc/mx_key), as an install would provide it."""
    key = tmp_path / "your_path" / "etc" / "mx_key"
    key.parent.mkdir(parents=True)
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    key.chmod(0o600)
    return key


@pytest.fixture
def legacy_copy(tmp_path):
    path = tmp_path / "config.yml"
    shutil.copy(LEGACY, path)
    path.chmod(0o600)
    return path


def write(tmp_path, data):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(data))
    path.chmod(0o600)
    return path


def legacy_data():
    return yaml.safe_load(LEGACY.read_text())


def test_legacy_sample_loads_with_old_meanings(legacy_copy):
    config = load_config(legacy_copy)
    assert config.epn_cap_map == {"12282": "ny79"}
    assert config.ignore_file == legacy_copy.parent / "your_path" / "etc" / "ignore.yml"
    assert [equipment.id for equipment in config.equipment] == [23, 24]
    assert config.equipment[0].source_path == "/data/mx"
    assert config.log_level == logging.DEBUG
    assert config.max_tasks == 1 and config.visit_day_range == 200 and config.sync_frequency_hours == 1.0
    assert config.smtp.host == "smtp.domain.edu" and config.smtp.port == 25
    assert config.template_folder == legacy_copy.parent / "your_path" / "etc"
    assert config.template_text == "epnalert-text.j2"
    assert config.destination_root == Path("/scratch")
    assert config.username is None and config.port == 22
    assert config.ssh_target == "sftp.synchrotron.org.au"
    assert config.warnings == ()


@pytest.mark.parametrize(
    "level, expected", [("logging.DEBUG", 10), ("DEBUG", 10), ("info", 20), ("WARN", 30), (40, 40)]
)
def test_log_level_spellings(tmp_path, level, expected):
    assert load_config(write(tmp_path, {**legacy_data(), "log-level": level})).log_level == expected


def test_every_problem_reported_with_its_key_path(tmp_path):
    data = legacy_data()
    data["equipment"][1]["id"] = "abc"
    data["max-tasks"] = 0
    data["epn_cap_map"] = {"12282": "../etc", "x1": "ny79"}
    del data["host"]
    data["epnalert-email-smtp"] = "smtp:port"
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, data))
    message = str(raised.value)
    assert "config.yml: equipment[1].id: expected an integer, got 'abc'" in message
    assert "max-tasks: expected an integer of at least 1, got 0" in message
    assert "epn_cap_map.12282: expected a project folder name" in message
    assert "epn_cap_map.x1: expected an EPN number" in message
    assert "host: required key is missing" in message
    assert "epnalert-email-smtp: expected 'host' or 'host:port'" in message
    assert len(raised.value.problems) == 6


def test_unknown_key_warns_with_closest_known_key(tmp_path):
    config = load_config(write(tmp_path, {**legacy_data(), "max-taks": 3, "log-files": {"sinc": "x.log"}}))
    assert any("max-taks: unknown key; did you mean 'max-tasks'?" in warning for warning in config.warnings)
    assert any("log-files.sinc: unknown key; did you mean 'sync'?" in warning for warning in config.warnings)


def test_new_keys_and_smtp_port(tmp_path):
    data = {
        **legacy_data(),
        "username": "mxdata",
        "port": 2222,
        "known-hosts": "etc/known_hosts",
        "source-path": "/archive/{beamline}/",
        "epnalert-email-smtp": "mail.example.org:2525",
        "epnalert-email-to": ["a@example.org", "b@example.org"],
    }
    data["equipment"][1]["beamline"] = "mx3"
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "known_hosts").write_text("[sftp.synchrotron.org.au]:2222 ssh-ed25519 AAAA\n")
    config = load_config(write(tmp_path, data))
    assert config.ssh_target == "mxdata@sftp.synchrotron.org.au" and config.port == 2222
    assert config.known_hosts == tmp_path / "etc" / "known_hosts"
    assert [e.source_path for e in config.equipment] == ["/archive/mx", "/archive/mx3"]
    assert config.source_paths == ("/archive/mx", "/archive/mx3")
    assert (config.smtp.host, config.smtp.port) == ("mail.example.org", 2525)
    assert config.email_to == ("a@example.org", "b@example.org")


def test_bad_source_path_placeholder(tmp_path):
    with pytest.raises(ConfigError, match=r"source-path: only the placeholder \{beamline\}"):
        load_config(write(tmp_path, {**legacy_data(), "source-path": "/data/{facility}"}))


def problems_of(tmp_path, **keys):
    """Load the legacy sample with `keys` changed (dashes spelt as underscores); return its problems."""
    data = {**legacy_data(), **{key.replace("_", "-"): value for key, value in keys.items()}}
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, data))
    return raised.value.problems


# The options that passed the old deny-list (--del deleted a scientist's file; -q and
# --out-format=%n made every EPN look empty), and more of the same kinds.
REFUSED_RSYNC_OPTIONS = [
    ("--del", "--del deletes files"),
    ("--delete-after", "--delete-after deletes files"),
    ("--delete-excluded", "--delete-excluded deletes files"),
    ("--delete", "--delete deletes files"),
    ("-essh", "-e (in -essh) changes how rsync reaches"),
    ("-an", "-a (in -an) copies ownership"),
    ("--rsync-path=sudo rsync", "holds whitespace"),
    ("--rsync-path=/tmp/rsync", "--rsync-path changes how rsync reaches"),
    ("--remote-option=--remove-source-files", "--remote-option changes how rsync reaches"),
    ("--remove-source-files", "--remove-source-files deletes files"),
    ("--only-write-batch=/tmp/batch", "--only-write-batch does not transfer"),
    ("--list-only", "--list-only does not transfer"),
    ("-n", "-n does not transfer"),
    ("-q", "-q changes rsync's output"),
    ("--out-format=%n", "--out-format changes rsync's output"),
    ("-zv", "-v (in -zv) changes rsync's output"),
    ("--info=progress2", "--info changes rsync's output"),
    ("--max-size=1G", "--max-size changes which files are compared or sent"),
    ("--exclude=*.h5", "--exclude changes which files"),
    ("--delay-updates", "--delay-updates changes how or where files are written"),
    ("--iconv=utf8,latin1", "--iconv converts file names"),
    ("--inplace", "--inplace writes into the file under its final name"),
    ("--preallocate", "--preallocate gives an unfinished file its full size"),
    ("--chmod=777", "--chmod copies ownership"),
    ("-L", "-L copies ownership, links"),
    ("--timeout=5", "--timeout is set by mxsync from the key rsync-io-timeout"),
    ("--times", "--times is set by mxsync already"),
    ("--compr", "--compr is not one of the options known to be safe"),
    ("--no-motd", "--no-motd changes how rsync reaches"),
    ("--cc=none", "--cc=none: expected one of auto"),
    ("--compress-level=99", "--compress-level=99: expected an integer from 0 to 22"),
    ("--zc=gzip", "--zc=gzip: expected one of zstd"),
    ("--block-size=1M", "--block-size=1M: expected a size from 1 to 131072 bytes"),
    ("--bwlimit", "--bwlimit needs its value after '='"),
    ("--bwlimit=fast", "--bwlimit=fast: expected a bandwidth"),
    ("--compress=yes", "--compress takes no value"),
    ("-z\n--delete", "holds whitespace or a control character"),
    ("--", "expected an rsync option"),
    ("compress", "expected an rsync option"),
]


@pytest.mark.parametrize("option, reason", REFUSED_RSYNC_OPTIONS)
def test_rsync_option_outside_the_allow_list_is_refused_with_its_reason(tmp_path, option, reason):
    (problem,) = problems_of(tmp_path, rsync_options=["--compress", option])
    assert problem.startswith("rsync-options[1]: ") and reason in problem
    assert "\n" not in problem
    if " is not one of" in reason or "deletes" in reason or "changes" in reason:
        assert "allowed: -z/--compress, " in problem


ALLOWED_RSYNC_OPTIONS = [
    "--compress",
    "-z",
    "-zW",
    "-z4",
    "--zc=zstd",
    "--compress-choice=zlib",
    "--zl=3",
    "--compress-level=9",
    "--skip-compress=gz/bz2/h5",
    "--bwlimit=50M",
    "--cc=xxh128",
    "--checksum-choice=xxh3,md5",
    "--block-size=128K",
    "--block-size=8192",
    "--whole-file",
    "-W",
    "--no-whole-file",
    "--no-W",
    "--sparse",
    "-S",
    "--omit-dir-times",
    "-O",
    "--fsync",
    "--max-alloc=4G",
    "--numeric-ids",
    "--ipv4",
    "-6",
]


def test_allowed_rsync_options_load(tmp_path):
    config = load_config(write(tmp_path, {**legacy_data(), "rsync-options": ALLOWED_RSYNC_OPTIONS}))
    assert config.rsync_options == tuple(ALLOWED_RSYNC_OPTIONS)


def test_bwlimit_in_rsync_options_and_rsync_bwlimit_is_one_too_many(tmp_path):
    (problem,) = problems_of(tmp_path, rsync_bwlimit="10M", rsync_options=["--bwlimit=50M"])
    assert problem == "rsync-options[0]: --bwlimit=50M: rsync-bwlimit is set too; keep one of the two"


def _itemised_copy(tmp_path, option):
    """Copy a small tree with mxsync's rsync options plus `option`; return (exit code, the files rsync listed)."""
    source, destination = tmp_path / "source", tmp_path / "destination"
    for relative in ("frames/img_0001.cbf", "frames/img_0002.cbf", "home/process.log", ".info"):
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_bytes(relative.encode() * 1000)
    shutil.rmtree(destination, ignore_errors=True)
    destination.mkdir()
    process = subprocess.run(
        ["rsync", *BASE_OPTIONS, option, f"{source}/", f"{destination}/"],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    result = TransferResult("12282a")
    for line in process.stdout.splitlines(keepends=True):
        record_item(result, line, "12282a")
    return process.returncode, sorted(name for name, _ in result.files)


@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")
@pytest.mark.parametrize("option", ALLOWED_RSYNC_OPTIONS)
def test_real_rsync_takes_each_allowed_option_and_still_itemises_every_file(tmp_path, option):
    assert _itemised_copy(tmp_path, option) == (
        0,
        [".info", "frames/img_0001.cbf", "frames/img_0002.cbf", "home/process.log"],
    )


@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")
@pytest.mark.parametrize("option", ["-q", "--out-format=%n"])
def test_real_rsync_with_an_output_option_lists_no_file_which_is_why_it_is_refused(tmp_path, option):
    assert _itemised_copy(tmp_path, option) == (0, [])


def test_check_command_exits_2_naming_the_refused_option(legacy_copy):
    data = {**legacy_data(), "rsync-options": ["-z", "--del"]}
    legacy_copy.write_text(yaml.safe_dump(data))
    result = subprocess.run(
        [str(MXSYNC), "check", "--config", str(legacy_copy)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "rsync-options[1]: --del deletes files" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_check_command_names_the_file_as_told_for_a_copy_checked_before_it_is_installed(legacy_copy):
    # The Ansible role checks a temporary copy; its messages must name the config.yml it will replace.
    installed = "/opt/mx_sync/etc/config.yml"
    command = [str(MXSYNC), "check", "--config", str(legacy_copy), "--name", installed]
    good = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith(f"ok      config {installed}: ")
    legacy_copy.write_text(yaml.safe_dump({**legacy_data(), "visit-day-range": "x"}))
    legacy_copy.chmod(0o644)
    bad = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    assert bad.returncode == 2
    assert f"mxsync: error: {installed}: visit-day-range: expected a number, got 'x'" in bad.stderr
    assert f"run: chmod 600 {installed}" in bad.stderr
    assert str(legacy_copy) not in bad.stderr


def test_missing_key_file_is_a_config_problem_at_its_key(tmp_path, legacy_copy, legacy_key_file):
    legacy_key_file.unlink()
    with pytest.raises(ConfigError) as raised:
        load_config(legacy_copy)
    (problem,) = raised.value.problems
    assert problem.startswith(
        f"key-file: {legacy_key_file}: No such file or directory; set key-file to the private SSH key"
    )


def test_check_command_reports_a_missing_key_file_without_connecting(legacy_copy, legacy_key_file):
    legacy_key_file.unlink()
    result = subprocess.run(
        [str(MXSYNC), "check", "--config", str(legacy_copy)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 2 and f"key-file: {legacy_key_file}: No such file or directory" in result.stderr


def test_key_file_that_is_a_directory_or_readable_by_others_is_refused(tmp_path, legacy_copy, legacy_key_file):
    legacy_key_file.chmod(0o644)
    with pytest.raises(
        ConfigError,
        match=r"key-file: .*mx_key: mode 644 lets others read the key, so ssh refuses it; "
        r"run: chmod 600 ",
    ):
        load_config(legacy_copy)
    legacy_key_file.unlink()
    legacy_key_file.mkdir()
    with pytest.raises(ConfigError, match=r"key-file: .*mx_key: not a regular file"):
        load_config(legacy_copy)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_key_file_is_refused(legacy_copy, legacy_key_file):
    legacy_key_file.chmod(0)
    with pytest.raises(ConfigError, match=r"key-file: .*mx_key: Permission denied; "):
        load_config(legacy_copy)


def test_missing_known_hosts_says_how_to_make_one(tmp_path):
    (problem,) = problems_of(tmp_path, known_hosts="etc/known_hosts", port=2222)
    assert problem == (
        f"known-hosts: {tmp_path}/etc/known_hosts: No such file or directory; create it with "
        f"'ssh-keyscan -p 2222 sftp.synchrotron.org.au > {tmp_path}/etc/known_hosts', compare the fingerprints "
        "with the facility's, and make it readable by the account that runs mxsync"
    )


def test_waiting_for_data_alert_hours(tmp_path):
    assert load_config(write(tmp_path, legacy_data())).waiting_for_data_alert_hours == 48.0
    config = load_config(write(tmp_path, {**legacy_data(), "waiting-for-data-alert-hours": 12.5}))
    assert config.waiting_for_data_alert_hours == 12.5
    (problem,) = problems_of(tmp_path, waiting_for_data_alert_hours=0)
    assert problem == "waiting-for-data-alert-hours: expected a number of at least 1, got 0"


def test_portal_time_format(tmp_path):
    assert load_config(write(tmp_path, legacy_data())).portal_time_format == "local"
    assert (
        load_config(write(tmp_path, {**legacy_data(), "portal-time-format": "utc-offset"})).portal_time_format
        == "utc-offset"
    )
    (problem,) = problems_of(tmp_path, portal_time_format="UTC")
    assert problem == "portal-time-format: expected one of local, utc, utc-offset, got 'UTC'"


def test_waiting_for_data_alert_beyond_the_visit_range_warns(tmp_path):
    config = load_config(write(tmp_path, {**legacy_data(), "waiting-for-data-alert-hours": 24 * 201}))
    assert any(
        "waiting-for-data-alert-hours: 4824 hours is beyond visit-day-range (200 days)" in warning
        for warning in config.warnings
    )


def test_readable_config_with_passwords_warns(legacy_copy):
    os.chmod(legacy_copy, 0o644)
    config = load_config(legacy_copy)
    assert any("readable by group or others" in warning and "chmod 600" in warning for warning in config.warnings)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "expected a mapping of settings at the top level"),
        ("key: [unclosed", "line 1"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_unusable_files(tmp_path, text, expected):
    path = tmp_path / "config.yml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yml")


def test_secrets_listed_for_masking(legacy_copy):
    assert set(load_config(legacy_copy).secrets()) == {"password"}


@pytest.mark.parametrize(
    "key, value",
    [
        ("sync-frequency-hours", 1e300),
        ("portal-timeout", 1e9),
        ("epnalert-repeat-days", 4000),
        ("waiting-for-data-alert-hours", 1e6),
    ],
)
def test_absurd_durations_are_refused(tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"{key}: expected a number of at most"):
        load_config(write(tmp_path, {**legacy_data(), key: value}))


@pytest.mark.parametrize("key", ["live-interval-minutes", "settle-minutes"])
@pytest.mark.parametrize("value, expected", [(0, 0), (1, 1), (30, 30), ("45", 45)])
def test_lifecycle_minutes_take_non_negative_integers(tmp_path, key, value, expected):
    config = load_config(write(tmp_path, {**legacy_data(), key: value}))
    assert getattr(config, key.replace("-", "_")) == expected


def test_lifecycle_minutes_default_when_missing(legacy_copy):
    config = load_config(legacy_copy)
    assert (config.live_interval_minutes, config.settle_minutes) == (LIVE_INTERVAL_MINUTES, SETTLE_MINUTES) == (10, 240)


@pytest.mark.parametrize("key", ["live-interval-minutes", "settle-minutes"])
@pytest.mark.parametrize(
    "value, problem",
    [
        (-1, "expected an integer of at least 0, got -1"),
        (1.5, "expected an integer, got 1.5"),
        ("ten", "expected an integer, got 'ten'"),
        (True, "expected an integer, got True"),
        ([10], "expected an integer, got [10]"),
    ],
    ids=["negative", "fraction", "text", "bool", "list"],
)
def test_lifecycle_minutes_refuse_anything_else_at_their_key_path(tmp_path, key, value, problem):
    (reported,) = problems_of(tmp_path, **{key.replace("-", "_"): value})
    assert reported == f"{key}: {problem}"


@pytest.mark.parametrize("key, most", [("live-interval-minutes", 1440), ("settle-minutes", 10080)])
def test_lifecycle_minutes_refuse_typo_sized_values(tmp_path, key, most):
    (reported,) = problems_of(tmp_path, **{key.replace("-", "_"): most + 1})
    assert reported == f"{key}: expected an integer of at most {most}, got {most + 1}"
    assert getattr(load_config(write(tmp_path, {**legacy_data(), key: most})), key.replace("-", "_")) == most


def test_settling_beyond_the_visit_range_warns(tmp_path):
    config = load_config(write(tmp_path, {**legacy_data(), "visit-day-range": 2, "settle-minutes": 2 * 1440 + 1}))
    assert any(
        "settle-minutes: 2881 minutes is beyond visit-day-range (2 days)" in warning for warning in config.warnings
    )
    config = load_config(write(tmp_path, {**legacy_data(), "visit-day-range": 2, "settle-minutes": 2 * 1440}))
    assert not any("settle-minutes" in warning for warning in config.warnings)


def test_equipment_written_with_no_value_is_refused_at_its_key(tmp_path):
    """`equipment:` with nothing under it used to load, and every cycle then planned nothing, silently."""
    data = yaml.safe_load(LEGACY.read_text())
    data["equipment"] = None
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(data))
    path.chmod(0o600)
    with pytest.raises(ConfigError) as raised:
        load_config(path, check_files=False)
    assert "config.yml: equipment: has no value; list the portal's equipment here" in str(raised.value)


# ---------------------------------------------------------------- epn-cap-map-file


def with_map_file(tmp_path, text, name="epn_cap_map.yml", key=None, **keys):
    """Write `text` as the map file (None: no file) and the legacy sample naming it; return the config path."""
    if text is not None:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    return write(tmp_path, {**legacy_data(), "epn-cap-map-file": key or name, **keys})


def map_file_problems(tmp_path, text, **keys):
    with pytest.raises(ConfigError) as raised:
        load_config(with_map_file(tmp_path, text, **keys))
    return raised.value.problems


def test_map_file_entries_join_config_yml_entries(tmp_path):
    text = '# added by staff\n"30001": ab12\n30002: 4567\n"12282": ny79\n'  # 12282: as config.yml has it
    config = load_config(with_map_file(tmp_path, text))
    assert config.epn_cap_map == {"12282": "ny79", "30001": "ab12", "30002": "4567"}
    assert config.epn_cap_map_file == tmp_path / "epn_cap_map.yml"
    assert config.project_for("30001") == "ab12" and config.warnings == ()


@pytest.mark.parametrize("text", ["", "# nothing mapped yet\n", "{}\n"])
def test_an_empty_map_file_maps_nothing_more(tmp_path, text):
    assert load_config(with_map_file(tmp_path, text)).epn_cap_map == {"12282": "ny79"}


def test_without_the_key_only_config_yml_maps(legacy_copy):
    config = load_config(legacy_copy)
    assert config.epn_cap_map == {"12282": "ny79"} and config.epn_cap_map_file is None


def test_map_file_path_resolves_like_ignore(tmp_path, monkeypatch):
    (tmp_path / "maps").mkdir()
    monkeypatch.chdir(tmp_path / "maps")  # not the config's directory: relative means relative to config.yml
    name = "your_path/etc/map.yml"  # beside the sample's ignore: your_path/etc/ignore.yml
    config = load_config(with_map_file(tmp_path, '"30001": ab12\n', name=name, key="your_path/etc/../etc/map.yml"))
    assert config.epn_cap_map_file == tmp_path / name
    assert config.epn_cap_map_file.parent == config.ignore_file.parent
    home = tmp_path / "home"
    (home / "maps").mkdir(parents=True)
    (home / "maps" / "map.yml").write_text('"30002": cd34\n')
    monkeypatch.setenv("HOME", str(home))
    assert load_config(with_map_file(tmp_path, None, key="~/maps/map.yml")).project_for("30002") == "cd34"


def test_a_number_mapped_to_two_folders_names_both_places(tmp_path):
    problems = map_file_problems(tmp_path, '"12282": zz99\n"30001": ab12\n')
    path = tmp_path / "epn_cap_map.yml"
    assert problems == [
        f"epn-cap-map-file: {path}: 12282: maps it to 'zz99', but config.yml epn_cap_map.12282 maps it to 'ny79'; "
        "keep one of the two"
    ]


def test_a_missing_map_file_names_the_file_and_the_key(tmp_path):
    problems = map_file_problems(tmp_path, None, key=str(tmp_path / "x" / "epn_cap_map.yml"))
    assert problems == [
        f"epn-cap-map-file: {tmp_path}/x/epn_cap_map.yml does not exist; "
        "create it (an empty mapping {} is fine) or remove the key"
    ]


def test_map_file_entries_are_checked_like_epn_cap_map_and_reported_with_the_rest(tmp_path):
    text = '"30001": ../etc\nx1: ab12\n"30002":\n"30003": ok1\n'
    with pytest.raises(ConfigError) as raised:
        load_config(with_map_file(tmp_path, text, **{"max-tasks": 0}))
    path = tmp_path / "epn_cap_map.yml"
    message = str(raised.value)
    assert f"config.yml: epn-cap-map-file: {path}: 30001: expected a project folder name" in message
    assert f"config.yml: epn-cap-map-file: {path}: x1: expected an EPN number (digits only" in message
    assert "config.yml: max-tasks: expected an integer of at least 1, got 0" in message
    # The entry without a folder is a warning, as in config.yml, listed after the problems.
    assert len(raised.value.problems) == 4
    assert raised.value.problems[-1].startswith(f"epn-cap-map-file: {path}: 30002: no project folder given")


def test_an_entry_without_a_folder_in_the_map_file_warns_and_stays_unmapped(tmp_path):
    config = load_config(with_map_file(tmp_path, '"30002":\n"30003": ok1\n'))
    assert config.epn_cap_map == {"12282": "ny79", "30003": "ok1"}
    [warning] = config.warnings
    assert f"epn-cap-map-file: {tmp_path / 'epn_cap_map.yml'}: 30002: no project folder given" in warning


@pytest.mark.parametrize(
    "text, expected",
    [
        ('"30001": ab12\n"30002": [cd34\n', "epn_cap_map.yml: line 3, column 1: not valid YAML"),
        ('"30001": ab12\n  "30002": cd34\n', "epn_cap_map.yml: line 2, column 10: not valid YAML"),
        ("- ab12\n", "epn_cap_map.yml: expected a mapping of EPN number to project folder"),
        ("epn_cap_map:\n  '30001': ab12\n", "epn_cap_map.yml: write the entries at the top level"),
        (b"\xff\xfe", "epn_cap_map.yml: not UTF-8 text"),
    ],
)
def test_an_unusable_map_file_is_one_problem_naming_it(tmp_path, text, expected):
    if isinstance(text, bytes):
        (tmp_path / "epn_cap_map.yml").write_bytes(text)
        text = None
    [problem] = map_file_problems(tmp_path, text)
    assert problem.startswith(f"epn-cap-map-file: {tmp_path}/") and expected in problem, problem


def test_a_map_file_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / "maps").mkdir()
    [problem] = map_file_problems(tmp_path, None, key="maps")
    assert problem.startswith(f"epn-cap-map-file: {tmp_path / 'maps'}: Is a directory; make it a file")


def test_the_map_file_is_read_again_at_each_load(tmp_path):
    path = with_map_file(tmp_path, '"30001": ab12\n')
    assert load_config(path).project_for("30002") is None
    with open(tmp_path / "epn_cap_map.yml", "a", encoding="utf-8") as stream:
        stream.write('"30002": cd34\n')
    assert load_config(path).project_for("30002") == "cd34"


def test_a_large_map_file_loads_with_the_fast_loader(tmp_path, monkeypatch):
    import mxsync.config

    text = "".join(f'"{number}": p{number}\n' for number in range(100000, 110000))
    path = with_map_file(tmp_path, text)
    loaders = []
    real_load = yaml.load
    monkeypatch.setattr(yaml, "load", lambda text, Loader: loaders.append(Loader) or real_load(text, Loader=Loader))
    config = load_config(path)
    assert len(config.epn_cap_map) == 10001 and config.project_for("109999") == "p109999"
    assert loaders == [mxsync.config.YAML_LOADER] * 2  # config.yml, then the map file


def test_check_command_counts_the_map_file_and_refuses_a_missing_one_in_one_line(tmp_path):
    path = with_map_file(tmp_path, '"30001": ab12\n')

    def check():
        command = [str(MXSYNC), "check", "--config", str(path)]
        return subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)

    result = check()
    assert result.returncode == 0, result.stderr
    map_file = tmp_path / "epn_cap_map.yml"
    assert f"2 mapped EPN numbers (epn_cap_map and {map_file})" in result.stdout
    map_file.unlink()
    result = check()
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        f"mxsync: error: {path}: epn-cap-map-file: {map_file} does not exist; "
        "create it (an empty mapping {} is fine) or remove the key\n"
    )


def test_bag_keys_default_to_sha1_bags_and_are_validated(tmp_path):
    config = load_config(write(tmp_path, legacy_data()))
    assert (config.bag, config.bag_algorithm, config.rsync_checksum) == (True, "sha1", "sha1")
    config = load_config(write(tmp_path, {**legacy_data(), "bag": False}))
    assert config.rsync_checksum is None
    (problem,) = problems_of(tmp_path, bag_algorithm="sha256")
    assert problem.startswith("bag-algorithm: ") and "sha1" in problem and "md5" in problem
    (problem,) = problems_of(tmp_path, bag="yes please")
    assert problem.startswith("bag: ")


def test_a_users_checksum_choice_keeps_rsyncs_checksums_out_of_the_bag_with_a_warning(tmp_path):
    config = load_config(write(tmp_path, {**legacy_data(), "rsync-options": ["--cc=xxh128"]}))
    assert config.rsync_checksum is None and config.bag
    assert any("rsync-options: --checksum-choice is set" in warning for warning in config.warnings)
