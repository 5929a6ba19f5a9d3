"""Config loading: the old sample loads unchanged, every problem is reported at its key path."""

import logging
import os
import shutil
from pathlib import Path

import pytest
import yaml

from mxsync.config import load_config
from mxsync.errors import ConfigError

LEGACY = Path(__file__).parent / "data" / "legacy-config.yml"


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


@pytest.mark.parametrize("level, expected", [("logging.DEBUG", 10), ("DEBUG", 10), ("info", 20), ("WARN", 30), (40, 40)])
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


def test_forbidden_rsync_option(tmp_path):
    with pytest.raises(ConfigError, match=r"rsync-options\[1\]: --delete is not allowed"):
        load_config(write(tmp_path, {**legacy_data(), "rsync-options": ["--compress", "--delete"]}))


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


@pytest.mark.parametrize("key, value", [("sync-frequency-hours", 1e300), ("portal-timeout", 1e9), ("epnalert-repeat-days", 4000)])
def test_absurd_durations_are_refused(tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"{key}: expected a number of at most"):
        load_config(write(tmp_path, {**legacy_data(), key: value}))
