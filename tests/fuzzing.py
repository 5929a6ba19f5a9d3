"""Mutated configs and state files for the property tests (tests/test_fuzz.py) and bench/faults.py.

A sandbox directory holds a valid config.yml (portal and SMTP on closed loopback ports, so every
run fails fast without touching a network), ignore.yml and mxsync-state.json. Strategies mutate
them; the properties run the real command lines in-process and check what promise 4 asks: an exit
code in {0, 1, 2}, never a traceback, on error only `mxsync: error:` lines, and a state file that
could not be used left byte for byte as it was.

Path-valued keys only ever get values from PATHS, all inside the sandbox or impossible to create, so
that a mutated config never makes a run (as root) write elsewhere; delays only get small values.
"""

import contextlib
import json
import os
import tempfile
from pathlib import Path

import yaml
from hypothesis import strategies as st

from tests.faults import closed_port, mxsync_main

TRACEBACK = "Traceback (most recent call last)"

PATH_KEYS = ("ignore", "state-dir", "key-file", "known-hosts", "destination-root-path", "epnalert-template-folder")
LOG_KEYS = ("sync", "epnalert", "email")
# Keys whose valid values would make a run sleep or wait; they only get small or invalid values.
DELAY_KEYS = (
    "portal-retry-delay",
    "rsync-retry-delay",
    "portal-timeout",
    "ssh-connect-timeout",
    "sftp-timeout",
    "sync-frequency-hours",
    "epnalert-email-smtp-timeout",
    "portal-retries",
    "rsync-retries",
)
PATHS = [
    ".",
    "log",
    "sub/dir/file",
    "config.yml/inside",
    "/proc/nonexistent/x",
    "",
    "ignore.yml",
    "state",
    42,
    [],
    {},
    None,
]
SMALL = [0, 0.001, 1, 2, -1, "1", "x", None, True, [], {}, float("nan"), float("inf"), float("-inf")]
ODD_STRINGS = [
    "",
    " ",
    "-",
    "--delete",
    "..",
    "../..",
    "/",
    "~",
    "logging.DEBUG",
    "DEBUG",
    "12282",
    "ny79",
    "a\nb",
    "\x00",
    "null",
    "yes",
    "0x10",
    "1e309",
    "https://",
    "ftp://x",
    "x" * 300,
    "ü",
    "'",
    '"',
    "{beamline}",
    "{0}",
    "{beamline!r}",
    "a@b",
    "a@@b",
    "127.0.0.1:0",
    "h:99999",
    "aes128-ctr;rm",
]


def values():
    """Any value YAML can hold, with the awkward ones over-represented."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.integers(-3, 70000),
        st.floats(),
        st.text(max_size=20),
        st.sampled_from(ODD_STRINGS),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=3),
        ),
        max_leaves=6,
    )


@contextlib.contextmanager
def sandbox():
    """A fresh sandbox directory (see make_sandbox), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="mxsync-fuzz-") as directory:
        make_sandbox(directory)
        yield directory


def make_sandbox(directory):
    """Write a valid config.yml, ignore.yml and state in `directory`; return the config as a dict."""
    directory = Path(directory)
    for name in ("log", "state", "destination"):
        (directory / name).mkdir(parents=True, exist_ok=True)
    (directory / "key").write_text("not really a key\n")
    os.chmod(directory / "key", 0o600)  # ssh refuses a key others can read, and so does the config check
    (directory / "known_hosts").write_text("")
    config = {
        "epn_cap_map": {"12282": "ny79", "13000": "ab12"},
        "ignore": "state/ignore.yml",
        "equipment": [
            {
                "id": 23,
                "username": "mx-sync",
                "password": "portal-pw-S3CRET-1",
                "client_name": "hpc-client",
                "client_password": "client-pw-S3CRET-2",
                "beamline": "mx",
            }
        ],
        "base-url": f"http://127.0.0.1:{closed_port()}",
        "beamline": "mx",
        "host": "127.0.0.1",
        "username": "nobody",
        "port": closed_port(),
        "key-file": "key",
        "known-hosts": "known_hosts",
        "epnalert-email-to": "staff@hpc.example.org",
        "epnalert-email-from": "mxsync@hpc.example.org",
        "epnalert-email-smtp": f"127.0.0.1:{closed_port()}",
        "visit-day-range": 30,
        "destination-root-path": "destination",
        "sync-frequency-hours": 1,
        "max-tasks": 2,
        "portal-retries": 0,
        "portal-retry-delay": 0,
        "ssh-connect-timeout": 2,
        "log-level": "DEBUG",
        "log-files": {name: f"log/{name}.log" for name in LOG_KEYS},
    }
    write_config(directory, config)
    (directory / "state" / "ignore.yml").write_text("previouslySynched:\n- 12282a\n- 99999b\n")
    (directory / "state" / "mxsync-state.json").write_text(
        json.dumps(
            {"epns": {"12282z": {"failures": 2, "alerted": False, "last_error": "x"}}, "sources": {}, "running": {}}
        )
    )
    return config


def write_config(directory, config):
    path = Path(directory) / "config.yml"
    text = config if isinstance(config, (str, bytes)) else yaml.safe_dump(config, allow_unicode=True, sort_keys=False)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    os.chmod(path, 0o600)
    return path


# ---------------------------------------------------------------- config mutations


@st.composite
def mutated_config(draw, base, sandboxed=True):
    """Given a valid config dict, return a copy with 1-4 keys deleted, replaced, retyped or added.

    With `sandboxed`, path keys get values from PATHS and delays from SMALL (safe to run as root).
    """
    config = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 4))):
        target, key = _draw_place(draw, config)
        action = draw(st.sampled_from(["delete", "replace", "retype", "add"]))
        if action == "delete" and isinstance(target, dict) and key in target:
            del target[key]
        elif action == "add" and isinstance(target, dict):
            target[draw(st.sampled_from(["extra", "portal_timeout", "log-file", "Host", "ignore ", 7, None]))] = draw(
                values()
            )
        elif isinstance(target, (dict, list)):
            target[key] = _value_for(
                draw, key, target.get(key) if isinstance(target, dict) else target[key], action == "retype", sandboxed
            )
    return config


def _draw_place(draw, config):
    """Pick (container, key): a top-level key, an equipment entry or a key in one, or a key of epn_cap_map or
    log-files (each kind equally likely, so the nested keys are not drowned by the top-level ones)."""
    kinds = {"top": [(config, key) for key in config] or [(config, "ignore")]}
    for nested, fallback in (("epn_cap_map", "12282"), ("log-files", "sync")):
        if isinstance(config.get(nested), dict):
            kinds[nested] = [(config[nested], key) for key in config[nested]] or [(config[nested], fallback)]
    if isinstance(config.get("equipment"), list) and config["equipment"]:
        kinds["equipment"] = [(config["equipment"], index) for index in range(len(config["equipment"]))]
        kinds["equipment"] += [
            (entry, key) for entry in config["equipment"] if isinstance(entry, dict) for key in entry
        ]
    return draw(st.sampled_from(kinds[draw(st.sampled_from(sorted(kinds)))]))


def _value_for(draw, key, current, retype, sandboxed):
    if sandboxed and (key in PATH_KEYS or key in LOG_KEYS):
        return draw(st.sampled_from(PATHS))
    if sandboxed and key in DELAY_KEYS:
        return draw(st.sampled_from(SMALL))
    if sandboxed and key in ("base-url", "epnalert-email-smtp", "host", "port"):
        return draw(
            st.sampled_from(["http://", "ftp://x", "", 42, None, [], "a b", "127.0.0.1:x", 0, 70000, "x" * 300])
        )
    if retype:
        return {
            str: lambda v: [v],
            int: str,
            float: str,
            bool: int,
            list: lambda v: {"a": v},
            dict: lambda v: list(v),
        }.get(type(current), lambda v: draw(values()))(current)
    return draw(values())


@st.composite
def mutated_text(draw, base_text):
    """Given config text, return bytes with a few random edits: characters inserted or deleted, lines dropped,
    duplicated or swapped, the end cut off, or invalid UTF-8 spliced in."""
    text = base_text.encode("utf-8")
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, len(text)))
        edit = draw(st.sampled_from(["insert", "delete", "cut", "lines", "bytes"]))
        if edit == "insert":
            text = (
                text[:position]
                + draw(
                    st.sampled_from(
                        [
                            b":",
                            b"-",
                            b" ",
                            b"\t",
                            b"\n",
                            b"{",
                            b"[",
                            b"&a",
                            b"*a",
                            b"!!python/object:os.system",
                            b"'",
                            b'"',
                            b"%",
                            b"@",
                            b"|",
                            b">",
                            b"#",
                            b"? ",
                            b"---\n",
                        ]
                    )
                )
                + text[position:]
            )
        elif edit == "delete":
            text = text[:position] + text[position + draw(st.integers(1, 40)) :]
        elif edit == "cut":
            text = text[:position]
        elif edit == "bytes":
            text = text[:position] + draw(st.binary(min_size=1, max_size=4)) + text[position:]
        else:
            lines = text.split(b"\n")
            first, second = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            choice = draw(st.sampled_from(["drop", "duplicate", "swap"]))
            if choice == "drop":
                del lines[first]
            elif choice == "duplicate":
                lines.insert(second, lines[first])
            else:
                lines[first], lines[second] = lines[second], lines[first]
            text = b"\n".join(lines)
    return text


def random_yaml():
    """Random YAML documents: any structure at the top, or plain text."""
    return st.one_of(
        values().map(lambda value: yaml.safe_dump(value, allow_unicode=True)),
        st.text(max_size=200),
        st.binary(max_size=100),
    )


# ---------------------------------------------------------------- state file mutations


def ignore_texts():
    """ignore.yml contents: valid lists, odd but valid ones, and broken ones."""
    entries = st.lists(st.one_of(st.from_regex(r"[0-9]{1,6}[a-z]{1,2}", fullmatch=True), values()), max_size=5)
    return st.one_of(
        entries.map(lambda items: yaml.safe_dump({"previouslySynched": items}, allow_unicode=True)),
        values().map(lambda value: yaml.safe_dump({"previouslySynched": value}, allow_unicode=True)),
        values().map(lambda value: yaml.safe_dump(value, allow_unicode=True)),
        st.sampled_from(
            [
                "",
                "previouslySynched:\n",
                "previouslySynched: [12282a\n",
                "previouslySynched: [a, b]\nother: 1\n",
                "- 12282a\n",
                "previouslySynched: !!python/object/apply:os.system ['true']\n",
                "\ufeffprev: [",
                "previouslySynched: &a [*a]\n",
            ]
        ),
        st.binary(max_size=60),
    )


def history_texts():
    """mxsync-state.json contents: the real shape with odd values in it, random JSON, and broken JSON."""
    entry = st.one_of(
        st.fixed_dictionaries(
            {"failures": values(), "alerted": values()}, optional={"last_error": values(), "since": values()}
        ),
        values(),
    )
    section = st.one_of(st.dictionaries(st.text(max_size=8), entry, max_size=3), values())
    shaped = st.fixed_dictionaries(
        {}, optional={"epns": section, "sources": section, "running": section, "last_cycle": values()}
    )
    return st.one_of(
        shaped.map(lambda data: json.dumps(data)),
        values().map(lambda value: json.dumps(value)),
        st.sampled_from(["", "{", '{"epns": {"12282a": {"failures": 1}}', "null", "[]", '{"epns": NaN}']),
        st.binary(max_size=60),
    )


# ---------------------------------------------------------------- the properties


def check_config(sandbox, text):
    """`mxsync check --config` on config text: 0 with 'ok config', or 2 with only error lines; never a traceback."""
    path = write_config(sandbox, text)
    before = _state_bytes(sandbox)
    result = mxsync_main(["check", "--config", path])
    problems = _common_problems(result, before, _state_bytes(sandbox), allowed=(0, 2))
    if result.returncode == 0 and "ok      config" not in result.stdout:
        problems.append("exit 0 without 'ok config'")
    if result.returncode == 0 and any(not line.startswith("warning ") for line in result.stderr.splitlines()):
        problems.append(f"exit 0 with stderr other than warnings: {result.stderr[:300]!r}")
    return problems


def run_config(sandbox, config):
    """`mxsync --config C --once` (a dry run) on a mutated config: exit 1 (the portal is down) or 2; state untouched."""
    path = write_config(sandbox, config)
    before = _state_bytes(sandbox)
    result = mxsync_main(["--config", path, "--once"])
    return _common_problems(result, before, _state_bytes(sandbox), allowed=(1, 2), state_may_change=False)


def run_state(sandbox, ignore_text=None, history_text=None):
    """`mxsync --config C --execute --once` with the given ignore.yml and mxsync-state.json: exit 1 (the portal is
    down) or 2 with error lines; ignore.yml never rewritten; a history that stops the run left as it was."""
    state = Path(sandbox) / "state"
    for name, text in (("ignore.yml", ignore_text), ("mxsync-state.json", history_text)):
        if text is not None:
            (state / name).write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    before = _state_bytes(sandbox)
    result = mxsync_main(["--config", Path(sandbox) / "config.yml", "--execute", "--once"])
    after = _state_bytes(sandbox)
    problems = _common_problems(result, before, after, allowed=(1, 2), state_may_change=result.returncode != 2)
    if after.get("ignore.yml") != before.get("ignore.yml"):
        problems.append("ignore.yml was rewritten although nothing was synced")
    if result.returncode == 1 and "mxsync-state.json" in after:
        try:
            data = json.loads(after["mxsync-state.json"])
            assert isinstance(data, dict) and isinstance(data.get("epns"), dict)
        except (ValueError, AssertionError):
            problems.append("the history written after the run is not a usable JSON object")
    return problems


def _common_problems(result, before, after, allowed, state_may_change=False):
    problems = []
    if result.returncode not in allowed:
        problems.append(f"exit {result.returncode!r}, expected one of {allowed}")
    for stream in (result.stdout, result.stderr):
        if TRACEBACK in stream:
            problems.append("traceback: " + stream[stream.index(TRACEBACK) :][-700:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.returncode == 2 and (not lines or any(not line.startswith("mxsync: error: ") for line in lines)):
        problems.append(f"exit 2 but stderr is not only error lines: {result.stderr[:400]!r}")
    if (result.returncode == 2 or not state_may_change) and after != before:
        problems.append(
            f"state files changed: {sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))}"
        )
    return problems


def _state_bytes(sandbox):
    state = Path(sandbox) / "state"
    return {
        path.name: path.read_bytes() for path in state.iterdir() if path.is_file() and not path.name.endswith(".lock")
    }


def epnalert_state_texts():
    """epnalert-state.json contents: its real shape with odd values, random JSON, broken JSON."""
    epn_entry = st.one_of(
        st.fixed_dictionaries({"first_alerted": values()}, optional={"last_alerted": values()}), values()
    )
    moment = st.one_of(
        st.datetimes().map(lambda when: when.isoformat()), st.sampled_from(["", "yesterday", "2024-02-30"]), values()
    )
    shaped = st.fixed_dictionaries(
        {},
        optional={
            "version": values(),
            "last_sent": moment,
            "last_recipients": values(),
            "epns": st.one_of(st.dictionaries(st.text(max_size=8), epn_entry, max_size=3), values()),
        },
    )
    return st.one_of(
        shaped.map(json.dumps),
        values().map(json.dumps),
        st.binary(max_size=60),
        st.sampled_from(["", "{", "null", "[]", '{"epns": {"1a": {"first_alerted": "2024-01-01T00:00:00+25:00"}}}']),
    )


def run_epnalert_state(config_path, text):
    """`epnalert --config C` with the given epnalert-state.json: exit 0, or 2 (the alert still sent) with only
    error lines and the state file as it was; never a traceback."""
    from epnalert.cli import main as epnalert_main
    from tests.faults import run_in_process

    config = yaml.safe_load(Path(config_path).read_text())
    state = Path(config["ignore"]).parent / "epnalert-state.json"
    state.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    before = state.read_bytes()
    result = run_in_process(epnalert_main, ["--config", config_path])
    problems = []
    if result.returncode not in (0, 2):
        problems.append(f"exit {result.returncode!r}: {result.stderr[-300:]!r}")
    if TRACEBACK in result.stdout + result.stderr:
        problems.append("traceback: " + (result.stdout + result.stderr).split(TRACEBACK, 1)[1][-700:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("epnalert: error: ")]
    if result.returncode == 2 and (len(errors) != 1 or state.read_bytes() != before):
        problems.append(f"exit 2 but not one error line and an untouched file: {result.stderr[:300]!r}")
    if result.returncode == 0:
        try:
            assert isinstance(json.loads(state.read_bytes()), dict)
        except (ValueError, AssertionError):
            problems.append("the state written after a good run is not a JSON object")
    return problems
