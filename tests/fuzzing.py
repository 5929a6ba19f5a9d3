"""Mutated configs and state files for the property tests (tests/test_fuzz.py) and bench/faults.py.

A sandbox directory holds a valid config.yml (portal and SMTP on closed loopback ports, so every
run fails fast without touching a network), ignore.yml and a state store (mxsync.db). Strategies mutate
them, or put a mutated retired JSON file (mxsync-state.json, epnalert-state.json) beside them as on a
first start; the properties run the real command lines in-process and check what promise 4 asks: an
exit code in {0, 1, 2}, never a traceback, on error only `mxsync: error:` lines, and a state file that
could not be used left byte for byte as it was (a JSON file that cannot be imported left in place with a
warning; a corrupt store moved aside, byte for byte, and a fresh one built).

Path-valued keys only ever get values from PATHS, all inside the sandbox or impossible to create, so
that a mutated config never makes a run (as root) write elsewhere; delays only get small values.
"""

import contextlib
import json
import os
import sqlite3
import tempfile
from pathlib import Path

import yaml
from hypothesis import strategies as st

from mxsync.store import DB_NAME, Store
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
    with Store.open(directory / "state") as store:  # an install's store: a failing EPN, a verified one, a cycle
        for _ in range(2):
            store.set_state("12282z", "failed", error="rsync exit 12")
        store.transfer_finished(store.transfer_started("12282a", "final"), "ok", files=3, bytes_transferred=4096)
        store.set_state("12282a", "recorded", clear_failures=True)
        store.set_note("last_cycle", {"planned": 1, "synced": 1, "failed": [], "stopped": [], "waiting": []})
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
    """mxsync-state.json contents as a first start may find them: the real shape with odd values in it, random JSON,
    and broken JSON."""
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


def store_damages():
    """Ways to damage the sandbox's state store: (kind, where in the file as a fraction, bytes)."""
    kinds = ["truncate", "overwrite", "zero a page", "header", "garbage", "empty"]
    return st.tuples(st.sampled_from(kinds), st.floats(0, 1), st.binary(min_size=1, max_size=64))


def damage(data, how):
    """Given a database file's bytes and a store_damages() value, return the damaged bytes."""
    kind, where, chunk = how
    position = min(int(where * len(data)), len(data))
    if kind == "truncate":
        return data[:position]
    if kind == "header":  # the first 100 bytes: page size, versions, schema cookie, user_version (at 60)
        position = int(where * 99)
    if kind in ("overwrite", "header"):
        return data[:position] + chunk + data[position + len(chunk) :]
    if kind == "zero a page":
        start = position // 4096 * 4096
        return data[:start] + bytes(len(data[start : start + 4096])) + data[start + 4096 :]
    if kind == "garbage":
        return (chunk * (4096 // len(chunk) + 1))[:4096]
    return b""


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
    """`mxsync --config C --execute --once` with the given ignore.yml, or a mxsync-state.json left by the old mxsync:
    exit 1 (the portal is down) or 2 with error lines; ignore.yml never rewritten; the JSON file imported (renamed
    <name>.imported, byte for byte) or left in place with a warning naming it; the store sound."""
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
    if history_text is not None:
        problems += _retired_file_problems(state / "mxsync-state.json", before, result)
    problems += _store_problems(state)
    return problems


def _retired_file_problems(path, before, result):
    """A retired JSON file is imported and renamed <name>.imported, or left in place with a warning; never changed."""
    imported = path.with_name(path.name + ".imported")
    if path.exists():
        if path.read_bytes() != before[path.name]:
            return [f"{path.name} was changed"]
        if result.returncode != 2 and f"{path}: cannot be imported" not in result.stderr:
            return [f"{path.name} was neither imported nor warned about: {result.stderr[-300:]!r}"]
        return []
    if not imported.exists() or imported.read_bytes() != before[path.name]:
        return [f"{path.name} is gone, and not as {imported.name} byte for byte"]
    return []


def _store_problems(state):
    """The state store, if there is one, passes SQLite's integrity check."""
    path = state / DB_NAME
    if not path.exists():
        return []
    try:
        connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        connection.text_factory = lambda data: data.decode("utf-8", "replace")  # it may quote a damaged page
        try:
            verdict = connection.execute("PRAGMA integrity_check").fetchall()
        finally:
            connection.close()
    except (sqlite3.Error, UnicodeDecodeError) as error:  # SQLite's error message may quote the damaged bytes
        return [f"the state store cannot be checked: {error}"]
    return [] if verdict == [("ok",)] else [f"the state store is not sound: {verdict[:3]}"]


def run_store(sandbox, how):
    """`mxsync --config C --execute --once` on a damaged state store: exit 1 (the portal is down) or 2 with error
    lines, never a traceback; ignore.yml never rewritten; a corrupt store moved aside byte for byte with a warning and
    a sound one built, which ignore.yml then fills (History.reconcile); an unusable one left byte for byte."""
    from mxsync.history import History
    from mxsync.state import IgnoreFile

    state = Path(sandbox) / "state"
    path = state / DB_NAME
    damaged = damage(path.read_bytes(), how)
    path.write_bytes(damaged)
    before = _state_bytes(sandbox)
    result = mxsync_main(["--config", Path(sandbox) / "config.yml", "--execute", "--once"])
    problems = _common_problems(result, before, _state_bytes(sandbox), allowed=(1, 2), state_may_change=True)
    if (state / "ignore.yml").read_bytes() != before["ignore.yml"]:
        problems.append("ignore.yml was rewritten although nothing was synced")
    aside = [entry for entry in state.glob(DB_NAME + ".corrupt-*") if not entry.name.endswith(("-wal", "-shm"))]
    unsound = _store_problems(state)
    if len(aside) > 1:
        problems.append(f"moved aside more than once: {sorted(entry.name for entry in aside)}")
    elif aside:
        if aside[0].read_bytes() != damaged:
            problems.append("the store moved aside is not the damaged file byte for byte")
        if result.stderr.count("moved it to") != 1:
            problems.append(f"moved aside without one warning: {result.stderr[-300:]!r}")
        problems += unsound  # the fresh one
    elif unsound and (path.read_bytes() != damaged or "state store" not in result.stderr):
        problems.append(f"a damaged store was neither moved aside nor left as it was and reported: {unsound}")
    if aside:  # the caller reconciles a rebuilt store with ignore.yml, which wins
        with History(state) as history:
            history.reconcile(IgnoreFile(state / "ignore.yml").load())
        with Store.open(state) as store:
            if {epn for epn, entry in store.states().items() if entry.state == "recorded"} != {"12282a", "99999b"}:
                problems.append("the rebuilt store does not hold ignore.yml's record")
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
    """{name: bytes} of the state files, less locks and what SQLite may leave beside a database it only read: its
    -shm (shared memory) and an empty -wal."""
    state = Path(sandbox) / "state"
    files = {
        path.name: path.read_bytes()
        for path in state.iterdir()
        if path.is_file() and not path.name.endswith((".lock", "-shm"))
    }
    return {name: data for name, data in files.items() if data or not name.endswith("-wal")}


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
    """`epnalert --config C` with a given epnalert-state.json left by the old epnalert on a first start: exit 0, the
    alert sent; the file imported (renamed .imported, byte for byte) or left in place with a warning; never a
    traceback; the store sound."""
    from epnalert.cli import main as epnalert_main
    from tests.faults import run_in_process

    config = yaml.safe_load(Path(config_path).read_text())
    state = Path(config["ignore"]).parent
    path = state / "epnalert-state.json"
    for leftover in state.glob("epnalert-state.json*"):  # an earlier example's, imported or not
        leftover.unlink()
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    before = {path.name: path.read_bytes()}
    result = run_in_process(epnalert_main, ["--config", config_path])
    problems = []
    if result.returncode != 0:
        problems.append(f"exit {result.returncode!r}: {result.stderr[-300:]!r}")
    if TRACEBACK in result.stdout + result.stderr:
        problems.append("traceback: " + (result.stdout + result.stderr).split(TRACEBACK, 1)[1][-700:])
    return problems + _retired_file_problems(path, before, result) + _store_problems(state)
