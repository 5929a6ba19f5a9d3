"""The Ansible role's filters (ansible/roles/mxsync/filter_plugins): pure Python, tested without Ansible."""

import importlib.util
from pathlib import Path

import pytest
import yaml

from mxsync.config import TOP_LEVEL

ROLE = Path(__file__).resolve().parents[2] / "ansible" / "roles" / "mxsync"
_spec = importlib.util.spec_from_file_location("mxsync_role_filters", ROLE / "filter_plugins" / "mxsync_config.py")
filters = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(filters)

ROLE_VARIABLES = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
KEY_VARIABLES = ROLE_VARIABLES["_mxsync_config_key_variables"]

RENDERED = """---
# Ansible managed
comment: "Managed by Ansible (role mxsync)"
epn_cap_map: {}
equipment:
  - id: 23
    username: "api"
    password: "new pw"
    client_name: "cl"
    client_password: "cp"
epnalert-email-to: ["staff@example.org"]
visit-day-range: 30
sync-frequency-hours: 1.0
log-level: "INFO"
ignore: "/opt/mx_sync/var/lib/ignore.yml"
epnalert-email-smtp-password: "smtp pw"
"""

OLD = """comment: "This is a sample config file"
epn_cap_map:
    "12282": ny79
ignore: /opt/mx_sync/etc/ignore.yml
equipment:
    - { username: 'api', password: 'it''s "old"', client_name: 'cl', client_password: 'cp', id: 23}
epnalert-email-to: staff@example.org
epnalert-template-folder: /opt/mx_sync/etc
epnalert-template-text: epnalert-text.j2
visit-day-range: 200
sync-frequency-hours: 1
log-level: logging.INFO
epnalert-email-smtp-password: smtp pw
"""


def upgrade(installed, rendered=RENDERED, extra=()):
    return filters.mxsync_config_upgrade(installed, rendered, KEY_VARIABLES, list(extra), "/opt/mx_sync/etc/config.yml")


def test_every_key_mxsync_knows_is_known_to_the_role_and_no_other():
    assert ROLE_VARIABLES["_mxsync_known_config_keys"] == list(TOP_LEVEL)
    assert set(KEY_VARIABLES) <= set(TOP_LEVEL)


def test_masking_hides_every_password_written_as_block_flow_or_quoted():
    masked = filters.mask_secrets(OLD + 'x:\n  client_password: "a \\" b"\n  api-token: t0k\n')
    assert "it''s" not in masked and "smtp pw" not in masked and "a \\" not in masked and "t0k" not in masked
    assert "- { username: 'api', password: \"********\", client_name: 'cl', client_password: \"********\", id: 23}" in (
        masked
    )
    assert 'epnalert-email-smtp-password: "********"' in masked
    assert "visit-day-range: 200" in masked


@pytest.mark.parametrize(
    "text",
    [
        "password: ab#cd\nx: 1\n",
        "epnalert-email-smtp-password: p,w\nx: 1\n",
        "equipment:\n  - {password: ab#cd, id: 1}\n",
        "password: |\n  ab#cd\nx: 1\n",
        "password: >-\n  ab#cd\nx: 1\n",
        "password:\n  ab#cd\nx: 1\n",
    ],
    ids=["hash", "comma", "flow-hash", "literal-block", "folded-block", "next-line"],
)
def test_masking_hides_a_password_written_in_any_yaml_form(text):
    masked = filters.mask_secrets(text)
    assert "ab" not in masked and "cd" not in masked and "p,w" not in masked, masked
    assert '"********"' in masked and "x: 1" in masked or "id: 1" in masked


def test_text_that_does_not_parse_is_not_shown_at_all():
    assert "s3cret" not in filters.mask_secrets("password: s3cret\n  bad: [\n")


def test_a_config_the_role_did_not_write_is_adopted_with_each_differing_setting_named():
    result = upgrade(OLD)
    assert result["adopted"] and result["installed"]
    # Written differently but equal: a list of one and a string, 1 and 1.0, logging.INFO and INFO.
    assert result["differences"] == [
        "equipment: installed and role values differ (not shown: they hold passwords) (mxsync_equipment)",
        "visit-day-range: installed 200, role 30 (mxsync_visit_day_range)",
    ]
    assert result["relocated"] == ["ignore: /opt/mx_sync/etc/ignore.yml -> /opt/mx_sync/var/lib/ignore.yml"]
    assert result["cap_map"] == {"12282": "ny79"}
    assert result["carried"] == ["epnalert-template-folder", "epnalert-template-text"]
    assert "it's" not in str(result["differences"]) and "new pw" not in result["masked_new"]


def test_carried_keys_are_appended_as_a_marked_section_and_carried_again_from_there():
    first = upgrade(OLD)
    installed = RENDERED + first["carried_yaml"]
    assert yaml.safe_load(installed)["epnalert-template-text"] == "epnalert-text.j2"
    # Staff may edit a carried key in place; the next run keeps the edit, and adopts nothing.
    edited = installed.replace("epnalert-text.j2", "site-text.j2")
    again = upgrade(edited)
    assert not again["adopted"] and again["differences"] == [] and again["cap_map"] == {}
    assert again["carried"] == ["epnalert-template-folder", "epnalert-template-text"]
    assert again["masked_new"] == filters.mask_secrets(edited)


def test_a_carried_key_later_set_by_the_role_is_no_longer_carried():
    installed = RENDERED + upgrade(OLD)["carried_yaml"]
    result = upgrade(installed, extra=["epnalert-template-text"])
    assert result["carried"] == ["epnalert-template-folder"]


def test_a_key_outside_the_carried_section_of_a_role_config_is_not_carried():
    # Removed from mxsync_config_extra, it must go: only the marked section is carried.
    installed = RENDERED + "rsync-bwlimit: 50M\n"
    assert upgrade(installed)["carried"] == []


def test_no_installed_config_is_a_fresh_install():
    result = upgrade("")
    assert (result["installed"], result["adopted"], result["carried"], result["differences"]) == (False, False, [], [])
    assert result["masked_installed"] == ""


def test_a_typo_gets_the_likeliest_key():
    assert (
        filters.close_key("rsync-bwlimt", list(TOP_LEVEL))
        == "unknown key 'rsync-bwlimt', did you mean 'rsync-bwlimit'?"
    )
    assert filters.close_key("zzz", list(TOP_LEVEL)) == "unknown key 'zzz'"
