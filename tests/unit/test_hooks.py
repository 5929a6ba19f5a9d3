"""on-synced hooks and the follow-up runner: placeholders, config validation, queueing, retries, dry run."""

import logging
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from mxsync.config import load_config
from mxsync.errors import ConfigError, FollowUpError
from mxsync.events import Recording
from mxsync.followups import FollowUps, build_record
from mxsync.history import History
from mxsync.hooks import hook_environment, hook_values, substitute, unknown_placeholders
from mxsync.portal import Person, Visit

LEGACY = Path(__file__).resolve().parents[1] / "data" / "legacy-config.yml"
RECORD = {
    "epn": "12282a",
    "project": "ny79",
    "destination": "/data/ny79/12282a",
    "beamline": "mx",
    "visit_start": "2026-01-01T09:00:00+00:00",
    "visit_end": None,
    "principal": {"name": "R F", "email": "rf@uni.example.edu"},
}


def test_placeholders_are_replaced_inside_arguments_and_values_are_never_parsed_again():
    values = hook_values({**RECORD, "epn": "{project}$(rm -rf /)"})
    arguments = substitute(["--epn={epn}", "{destination}/data", "{visit_end}", "{unknown}", "{{epn}}"], values)
    assert arguments == [
        "--epn={project}$(rm -rf /)",
        "/data/ny79/12282a/data",
        "",
        "{unknown}",
        "{{project}$(rm -rf /)}",
    ]
    assert values["principal_email"] == "rf@uni.example.edu" and values["visit_start"] == RECORD["visit_start"]
    assert hook_values({"epn": "1a", "principal": None})["principal_email"] == ""
    environment = hook_environment(values, base={"PATH": "/bin"})
    assert environment["PATH"] == "/bin" and environment["MXSYNC_EPN"] == "{project}$(rm -rf /)"
    assert environment["MXSYNC_PRINCIPAL_EMAIL"] == "rf@uni.example.edu" and environment["MXSYNC_VISIT_END"] == ""
    assert unknown_placeholders("{epn}-{epm} {a: .b} {}") == ["{epm}"]


def _problems(tmp_path, value):
    data = yaml.safe_load(LEGACY.read_text())
    data["on-synced"] = value
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(data))
    path.chmod(0o600)
    with pytest.raises(ConfigError) as raised:
        load_config(path, check_files=False)
    return [problem for problem in raised.value.problems if problem.startswith("on-synced")]


def test_on_synced_is_a_list_of_argument_lists_with_known_placeholders(tmp_path):
    assert _problems(tmp_path, ["sbatch job.sh {epn}"]) == [
        "on-synced[0]: an argument list, not a shell string: write 'sbatch job.sh {epn}' as [program, argument, ...];"
        " no shell runs it"
    ]
    assert _problems(tmp_path, [["sbatch", "{epn}", "--x={epm}"]]) == [
        "on-synced[0][2]: unknown placeholder {epm}; known: {epn}, {project}, {destination}, {beamline},"
        " {visit_start}, {visit_end}, {principal_email}"
    ]
    assert _problems(tmp_path, []) == ["on-synced: is an empty list; leave the key out for no hooks"]
    assert _problems(tmp_path, [[]])[0].startswith("on-synced[0]: expected a non-empty argument list")
    assert _problems(tmp_path, [["a"], ["b", ""]])[0].startswith("on-synced[1][1]: expected a non-empty string")
    assert _problems(tmp_path, "curl x")[0].startswith("on-synced: expected a list of commands")


def test_on_synced_loads_as_tuples_with_its_defaults(tmp_path):
    data = yaml.safe_load(LEGACY.read_text())
    data["on-synced"] = [["sbatch", "--parsable", "{destination}/data"], ["true"]]
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(data))
    path.chmod(0o600)
    config = load_config(path, check_files=False)
    assert config.on_synced == (("sbatch", "--parsable", "{destination}/data"), ("true",))
    assert config.on_synced_timeout == 600.0 and config.on_synced_retries == 3
    del data["on-synced"]
    path.write_text(yaml.safe_dump(data))
    assert load_config(path, check_files=False).on_synced == ()


class Action:
    def __init__(self, name, failures=0, projects=None):
        self.name, self.failures, self.projects, self.runs = name, failures, projects, []

    def applies(self, project):
        return self.projects is None or project in self.projects

    def run(self, record, dry_run):
        self.runs.append((record["epn"], dry_run))
        if not dry_run and self.failures:
            self.failures -= 1
            raise FollowUpError("it broke")


@pytest.fixture
def setup(tmp_path):
    data = yaml.safe_load(LEGACY.read_text())
    data.update({"state-dir": str(tmp_path), "on-synced-retries": 2})
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(data))
    path.chmod(0o600)
    config = load_config(path, check_files=False)
    with History(tmp_path) as history:
        yield config, history


def test_queued_at_recording_run_once_only_when_recorded(setup, monkeypatch):
    config, history = setup
    alerts = []
    monkeypatch.setattr("mxsync.alerts.send_followup_alert", lambda *arguments: alerts.append(arguments) or True)
    good, bad, other = Action("hook:1"), Action("hook:2", failures=5), Action("mail", projects=["elsewhere"])
    followups = FollowUps(config, [good, bad, other], history)
    followups.hear(Recording("12282a"))
    followups.hear(Recording("12282a"))  # never queued twice

    assert followups.run_due(lambda epn: False) == 0  # ignore.yml was never written: nothing runs
    assert followups.run_due({"12282a"}.__contains__) == 2
    assert good.runs == [("12282a", False)] and bad.runs == [("12282a", False)] and other.runs == []
    assert followups.run_due({"12282a"}.__contains__) == 1  # the failed one is retried, the done one not
    assert len(good.runs) == 1 and len(bad.runs) == 2
    assert [alert[1:4] for alert in alerts] == [("12282a", "hook:2", 2)]
    assert followups.run_due({"12282a"}.__contains__) == 0  # given up
    assert history.followups_due() == []


def test_a_row_left_running_runs_again_and_a_dry_run_changes_nothing(setup, caplog):
    config, history = setup
    history.followup_queue("12282a", ["hook:1"])
    history.followup_started("12282a", "hook:1")  # then the process died
    action = Action("hook:1")
    caplog.set_level(logging.INFO)
    FollowUps(config, [action], history, dry_run=True).run_due({"12282a"}.__contains__, would_record=["12282b"])
    assert action.runs == [("12282a", True), ("12282b", True)]
    assert [row.state for row in history.followups_due()] == ["running"]
    FollowUps(config, [action], history).run_due({"12282a"}.__contains__)
    assert action.runs[-1] == ("12282a", False) and history.followups_due() == []


def test_the_record_comes_from_the_config_and_the_stored_visits(setup):
    config, history = setup
    start = datetime(2026, 1, 1, 9, tzinfo=timezone.utc)
    people = (Person("Ada", "Lovelace", "ada@x.edu"), Person("Ada", "Lovelace", "ADA@x.edu"))
    visit = Visit("12282a", start, start.replace(hour=17), 23, "mx", Person("Ros", "F", "rf@x.edu"), people)
    history.seen("portal", {"12282a": "ny79"}, [visit])
    record = build_record(config, history, "12282a")
    assert record == {
        "epn": "12282a",
        "project": "ny79",
        "destination": str(config.destination_root / "ny79" / "12282a"),
        "beamline": "mx",
        "visit_start": "2026-01-01T09:00:00+00:00",
        "visit_end": "2026-01-01T17:00:00+00:00",
        "principal": {"name": "Ros F", "email": "rf@x.edu"},
        "scientists": [{"name": "Ada Lovelace", "email": "ada@x.edu"}],
        "files": None,
        "bytes": None,
        "bagged": False,
    }


def test_an_action_out_of_attempts_is_not_run_again_and_its_alert_is_retried_until_sent(setup, monkeypatch):
    config, history = setup  # on-synced-retries: 2
    sent = []
    answers = iter([False, True])  # the SMTP server is down at the give-up, up a cycle later
    monkeypatch.setattr(
        "mxsync.alerts.send_followup_alert", lambda *arguments: sent.append(arguments[1:3]) or next(answers)
    )
    bad = Action("hook:abc", failures=5)
    followups = FollowUps(config, [bad], history)
    followups.hear(Recording("12282a"))
    followups.run_due({"12282a"}.__contains__)
    followups.run_due({"12282a"}.__contains__)  # the last attempt; the alert does not go out
    assert len(bad.runs) == 2 and [row.state for row in history.followups_due()] == ["pending"]
    followups.run_due({"12282a"}.__contains__)  # not run again: only the alert, which goes out now
    assert len(bad.runs) == 2 and sent == [("12282a", "hook:abc"), ("12282a", "hook:abc")]
    assert history.followups_due() == []


def test_an_action_cut_off_by_a_crash_every_time_is_given_up(setup, monkeypatch):
    config, history = setup
    monkeypatch.setattr("mxsync.alerts.send_followup_alert", lambda *arguments: True)
    history.followup_queue("12282a", ["hook:abc"])
    for _ in range(2):
        history.followup_started("12282a", "hook:abc")  # each time, mxsync died while it ran
    action = Action("hook:abc")
    FollowUps(config, [action], history).run_due({"12282a"}.__contains__)
    assert action.runs == [] and history.followups_due() == []


def test_a_hook_is_keyed_by_its_command_not_its_place():
    from mxsync.hooks import Hook

    first, moved = Hook(1, ["sbatch", "{epn}"], 60), Hook(2, ["sbatch", "{epn}"], 60)
    other = Hook(1, ["curl", "{epn}"], 60)
    assert first.name == moved.name != other.name and first.label == "hook 1"


def test_portal_values_not_of_their_form_reach_no_hook():
    from mxsync.hooks import hook_values

    record = {"epn": "12282a", "beamline": "-rf", "principal": {"email": "-oProxyCommand=x@y.org"}}
    assert hook_values(record)["principal_email"] == "" and hook_values(record)["beamline"] == ""
    record = {"epn": "12282a", "beamline": "MX2", "principal": {"email": "ada.l+mx@uni.example.edu"}}
    assert hook_values(record)["principal_email"] == "ada.l+mx@uni.example.edu"
