"""on-synced hooks on the simulated facility: arguments, environment and JSON; retries and the alert; a kill -9
between the record and the hook; hostile names from the portal; a dry run."""

import json
import sys
from pathlib import Path

from tests.test_mxsync import ENDED, mxsync, recorded, sync_log

HOOK = r"""
import json, os, signal, sys, time
from pathlib import Path

here = Path(__file__).parent
call = {
    "argv": sys.argv[1:],
    "env": {key: value for key, value in os.environ.items() if key.startswith("MXSYNC_")},
    "stdin": json.loads(sys.stdin.read()),
}
with open(here / "calls.jsonl", "a") as log:
    log.write(json.dumps(call) + "\n")
if (here / "kill-once").exists():
    (here / "kill-once").unlink()
    os.kill(os.getppid(), signal.SIGKILL)  # mxsync dies after the record, before the hook's outcome is stored
    time.sleep(30)
if (here / "fail").exists():
    print("the scheduler is down", file=sys.stderr)
    sys.exit(3)
with open(here / "done.jsonl", "a") as log:
    log.write(json.dumps(call) + "\n")
"""


def _hook(facility):
    folder = facility.workdir / "hook"
    folder.mkdir(exist_ok=True)
    script = folder / "hook.py"
    script.write_text(HOOK)
    return folder, [sys.executable, str(script), "{epn}", "--data={destination}/data", "to: {principal_email}"]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_hook_gets_the_arguments_variables_and_json_of_each_epn_once(facility):
    facility.add_experiment(
        "mx", "12282a", equipment_id=23, data_scientists=[("Ada", "Lovelace", "ada@uni.example.edu")], **ENDED
    )
    facility.add_experiment(
        "mx", "12282b", equipment_id=23, principal=("Émile", "Zoë", "emile@uni.example.edu"), **ENDED
    )
    folder, command = _hook(facility)
    config = facility.write_config(on_synced=[command])

    mxsync("--config", config, "--execute", "--once", check=0)
    mxsync("--config", config, "--execute", "--once", check=0)  # nothing runs twice

    calls = {call["argv"][0]: call for call in _lines(folder / "calls.jsonl")}
    assert sorted(calls) == ["12282a", "12282b"] and len(_lines(folder / "calls.jsonl")) == 2
    destination = facility.destination / "ny79" / "12282a"
    a, b = calls["12282a"], calls["12282b"]
    assert a["argv"] == ["12282a", f"--data={destination}/data", "to: rosalind.franklin@uni.example.edu"]
    assert b["argv"][2] == "to: emile@uni.example.edu"
    assert a["env"]["MXSYNC_EPN"] == "12282a" and a["env"]["MXSYNC_PROJECT"] == "ny79"
    assert a["env"]["MXSYNC_DESTINATION"] == str(destination) and a["env"]["MXSYNC_BEAMLINE"] == "mx"
    assert a["env"]["MXSYNC_PRINCIPAL_EMAIL"] == "rosalind.franklin@uni.example.edu"
    assert a["env"]["MXSYNC_VISIT_START"].startswith(ENDED["start"].date().isoformat())
    assert a["env"]["MXSYNC_VISIT_END"] == a["stdin"]["visit_end"] and a["stdin"]["visit_end"]
    record = a["stdin"]
    assert record["epn"] == "12282a" and record["project"] == "ny79" and record["destination"] == str(destination)
    assert record["principal"] == {"name": "Rosalind Franklin", "email": "rosalind.franklin@uni.example.edu"}
    assert record["scientists"] == [{"name": "Ada Lovelace", "email": "ada@uni.example.edu"}]
    assert record["bagged"] is True  # the bag is made before the record
    data = [path for path in (destination / "data").rglob("*") if path.is_file() and not path.is_symlink()]
    assert (record["files"], record["bytes"]) == (len(data), sum(path.stat().st_size for path in data))
    assert record["files"] > 0
    assert b["stdin"]["principal"]["name"] == "Émile Zoë"
    assert b["env"]["MXSYNC_EPN"] == "12282b"


def test_a_failing_hook_is_retried_then_alerts_and_the_epn_stays_recorded(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    folder, command = _hook(facility)
    (folder / "fail").touch()
    config = facility.write_config(on_synced=[command], on_synced_retries=2)

    mxsync("--config", config, "--execute", "--once")
    assert recorded(config) == {"12282a"} and len(_lines(folder / "calls.jsonl")) == 1
    assert facility.smtp.messages == []
    assert "hook 1 FAILED (attempt 1 of 2, retried next cycle)" in sync_log(facility)
    assert "the scheduler is down" in sync_log(facility)

    mxsync("--config", config, "--execute", "--once")
    assert len(_lines(folder / "calls.jsonl")) == 2
    facility.smtp.wait_for(1)
    (message,) = facility.smtp.messages
    assert "hook 1 failed for 12282a" in message.message["Subject"]
    assert "the scheduler is down" in message.message.get_content()

    mxsync("--config", config, "--execute", "--once")  # given up: not run again, not alerted again
    assert len(_lines(folder / "calls.jsonl")) == 2 and len(facility.smtp.messages) == 1
    assert recorded(config) == {"12282a"}


def test_kill_9_between_record_and_hook_runs_the_hook_at_the_next_start_exactly_once(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    folder, command = _hook(facility)
    (folder / "kill-once").touch()
    config = facility.write_config(on_synced=[command])

    first = mxsync("--config", config, "--execute", "--once")
    assert first.returncode == -9
    assert recorded(config) == {"12282a"}  # recorded before the hook ran
    assert len(_lines(folder / "calls.jsonl")) == 1 and _lines(folder / "done.jsonl") == []

    mxsync("--config", config, "--execute", "--once", check=0)
    mxsync("--config", config, "--execute", "--once", check=0)
    assert [call["argv"][0] for call in _lines(folder / "done.jsonl")] == ["12282a"]
    assert len(_lines(folder / "calls.jsonl")) == 2


def test_hostile_names_from_the_portal_arrive_verbatim_as_one_argument(facility):
    hostile_email = 'x@y.example\'; touch pwned-email; echo "$(touch pwned-subst)"\n`touch pwned-tick`'
    facility.add_experiment(
        "mx",
        "12282a",
        equipment_id=23,
        principal=("Robert'); $(touch pwned-name); --", "Tables;\ntouch pwned-newline", hostile_email),
        **ENDED,
    )
    facility.portal.add_visit(23, "12282b; touch pwned-epn", **ENDED)  # refused: never recorded, never hooked
    folder, command = _hook(facility)
    config = facility.write_config(on_synced=[command + ["{principal_email}"]])

    mxsync("--config", config, "--execute", "--once")

    (call,) = _lines(folder / "done.jsonl")
    # Not an address: alone as an argument it could be anything (an option, say), so hooks get '' for it.
    assert call["argv"][2:] == ["to: ", ""]
    assert call["env"]["MXSYNC_PRINCIPAL_EMAIL"] == ""
    assert call["stdin"]["principal"]["email"] == hostile_email.strip()  # the JSON keeps what the portal said
    assert call["stdin"]["principal"]["name"] == "Robert'); $(touch pwned-name); -- Tables;\ntouch pwned-newline"
    assert not list(facility.workdir.rglob("pwned*")) and not list(Path.cwd().glob("pwned*"))


def test_a_dry_run_runs_no_hook_and_says_what_would_run(facility):
    facility.add_experiment("mx", "12282a", equipment_id=23, **ENDED)
    folder, command = _hook(facility)
    config = facility.write_config(on_synced=[command])

    result = mxsync("--config", config, "--once", "-v", check=0)

    assert not (folder / "calls.jsonl").exists()
    destination = facility.destination / "ny79" / "12282a"
    assert f"12282a: would run hook 1: {sys.executable} {folder / 'hook.py'} 12282a --data={destination}/data" in (
        result.stderr
    )
