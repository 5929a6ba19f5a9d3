"""Fault-injection primitives for the reliability tests and bench/faults.py: running the tools, signalling
them, cutting their connections, filling and freezing file systems, a portal that answers anything, and the
Tally that counts breaches of the six promises instead of stopping at the first:

1. no EPN recorded as synced unless all its files are at the destination at their size;
2. ignore.yml never loses an entry;
3. no fault crashes the service (no traceback, the exit code says what happened);
4. bad input gives one clear line and a non-zero exit;
5. nothing outside destination-root-path is written;
6. no secret in any log, email, state file or output.

tests/scenarios.py builds the scenarios from these; tests/test_reliability.py runs each once (the kill -9
loop MXSYNC_FAULT_RUNS times) and bench/faults.py many times. Processes are only ever signalled by the pid
of something a scenario started, or of the facility's own sshd children.
"""

import contextlib
import io
import json
import logging
import os
import re
import shlex
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml

from tests.facility.tree import wanted

BIN = Path(sys.executable).parent
MXSYNC = str(BIN / "mxsync")
NOW = datetime.now(timezone.utc)
ENDED = dict(start=NOW - timedelta(days=3), end=NOW - timedelta(days=2))
TRACEBACK_MARKERS = ("Traceback (most recent call last)", "--- Logging error ---")
IS_ROOT = os.geteuid() == 0
ROOT_REASON = "needs root to mount a small tmpfs (disk full, read-only remount); run as root to include it"
SMTP_LOGIN = ("mxsync-mailer", "smtp-pw-S3CRET-3")
# How long a test waits for something that normally takes a second or two; a hang guard only.
PATIENCE = 90.0


def fault_runs(default=5):
    """The number of runs of the long seeded loops: MXSYNC_FAULT_RUNS, else `default`."""
    return int(os.environ.get("MXSYNC_FAULT_RUNS", default))


# ---------------------------------------------------------------- the tally


@dataclass
class Tally:
    """Runs of one fault and every breach of a promise seen in them."""

    fault: str
    runs: int = 0
    wrongly_recorded: list = field(default_factory=list)  # promise 1
    lost: list = field(default_factory=list)  # promise 2
    crashes: list = field(default_factory=list)  # promise 3: tracebacks, unexpected exits
    leaks: list = field(default_factory=list)  # promise 6
    unmet: list = field(default_factory=list)  # everything else the scenario expected (promises 3, 4, 5)
    notes: dict = field(default_factory=dict)  # counts that describe the runs, e.g. how many kills hit a pass

    COLUMNS = ("wrongly_recorded", "lost", "crashes", "leaks", "unmet")

    def expect(self, condition, message):
        """Count `message` as unmet if `condition` is false; return the condition."""
        if not condition:
            self.unmet.append(message)
        return bool(condition)

    @property
    def clean(self):
        return not any(getattr(self, column) for column in self.COLUMNS)

    def note(self, what):
        self.notes[what] = self.notes.get(what, 0) + 1

    def counts(self):
        counts = {column: len(getattr(self, column)) for column in self.COLUMNS}
        return {"fault": self.fault, "runs": self.runs, **counts, "notes": dict(self.notes)}

    def report(self):
        """Every breach, one per line, for an assertion message."""
        lines = [f"{self.fault}: {self.runs} run(s)"]
        for column in self.COLUMNS:
            lines += [f"  {column}: {item}" for item in getattr(self, column)]
        return "\n".join(lines)

    def scan(self, texts, secrets):
        """Given {where: text} and {label: secret}, count tracebacks and leaked secrets."""
        for where, text in texts.items():
            for marker in TRACEBACK_MARKERS:
                if marker in text:
                    start = text.index(marker)
                    self._add_once(self.crashes, f"{where}: {text[start : start + 600]!r}")
            for label, secret in secrets.items():
                if secret and secret in text:
                    self._add_once(self.leaks, f"{label} in {where}")

    @staticmethod
    def _add_once(column, item):
        # Logs are scanned again after each step of a scenario; a breach counts once.
        if item not in column:
            column.append(item)

    def check_records(self, facility, config_path, before=frozenset()):
        """Promises 1 and 2: ignore.yml readable, still holding `before`, and every EPN in it complete."""
        from mxsync.errors import StateFileError
        from mxsync.names import epn_number
        from mxsync.state import IgnoreFile

        try:
            now = IgnoreFile(ignore_path(config_path)).load()
        except StateFileError as error:
            self.lost.append(f"ignore.yml unreadable after the fault: {error}")
            return set()
        self.lost += [f"{epn} no longer in ignore.yml" for epn in sorted(set(before) - now)]
        cap_map = yaml.safe_load(Path(config_path).read_text())["epn_cap_map"]
        for epn in sorted(now):
            project = cap_map.get(epn_number(epn))
            sources = list(facility.root.glob(f"data/*/{epn}"))
            if project is None or not sources:
                continue  # an entry staff wrote by hand for data that is not here
            problems = incomplete(sources[0], facility.destination / project / epn / "data")
            if problems:
                self._add_once(self.wrongly_recorded, f"{epn} recorded but {problems[0]} ({len(problems)} problem(s))")
        return now


def manifest(path, include=wanted):
    """Return {relative path: (size, sha256)} of the regular files under path that `include` accepts.

    Unlike tests.facility.tree_manifest it never follows a symlink and never opens a FIFO or device.
    """
    import hashlib

    found = {}
    for directory, _directories, files in os.walk(path):
        for name in files:
            file_path = Path(directory, name)
            relative = file_path.relative_to(path).as_posix()
            if not stat.S_ISREG(file_path.lstat().st_mode) or (include is not None and not include(relative)):
                continue
            data = file_path.read_bytes()
            found[relative] = (len(data), hashlib.sha256(data).hexdigest())
    return found


def incomplete(source, destination):
    """Return what the destination lacks of the source: each regular file the sync rule wants, at its size."""
    problems = []
    for directory, directories, files in os.walk(source):
        directories[:] = [name for name in directories if not os.path.islink(os.path.join(directory, name))]
        for name in files:
            path = Path(directory, name)
            relative = path.relative_to(source)
            if path.is_symlink() or not path.is_file() or not wanted(relative.as_posix()):
                continue
            try:
                size = (Path(destination) / relative).lstat().st_size
            except OSError:
                problems.append(f"{relative} missing")
                continue
            if size != path.stat().st_size:
                problems.append(f"{relative} is {size} bytes, source {path.stat().st_size}")
    return problems


# ---------------------------------------------------------------- secrets and outputs


def secrets_of(facility, *key_files):
    """Return {label: value} of every secret the facility's config holds or the portal handed out."""
    found = {}
    for scope, credentials in facility.portal.credentials.items():
        found[f"portal password ({scope})"] = credentials.password
        found[f"client secret ({scope})"] = credentials.client_password
    for number, token in enumerate(facility.portal.issued_tokens):
        found[f"access token #{number}"] = token
    login = getattr(facility.smtp, "require_auth", None)
    if login:
        found["SMTP password"] = login[1]
    for key_file in (facility.sshd.client_key, *key_files):
        if Path(key_file).exists():
            body = [line for line in Path(key_file).read_text().splitlines() if line and not line.startswith("-----")]
            for number, line in enumerate(body):
                if len(line) >= 16:
                    found[f"private key {Path(key_file).name} line {number}"] = line
    return found


def outputs(facility, *results):
    """Return {where: text} of everything the tools left: process outputs, logs, state files and emails."""
    texts = {}
    for number, result in enumerate(results):
        texts[f"stdout #{number}"] = _text(result.stdout)
        texts[f"stderr #{number}"] = _text(result.stderr)
    for folder in ("log", "state"):
        for path in sorted((facility.workdir / folder).glob("*")):
            if path.is_file():
                texts[f"{folder}/{path.name}"] = path.read_bytes().decode("utf-8", "replace")
    for number, received in enumerate(facility.smtp.messages):
        parts = [received.raw.decode("utf-8", "replace")]
        parts += [part.get_content() for part in received.message.walk() if not part.is_multipart()]
        texts[f"email #{number}"] = "\n".join(str(part) for part in parts)
    return texts


def _text(value):
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def log_text(facility, name="sync"):
    path = facility.workdir / "log" / f"{name}.log"
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


def ignore_path(config_path):
    return Path(yaml.safe_load(Path(config_path).read_text())["ignore"])


def recorded(config_path):
    path = ignore_path(config_path)
    if not path.exists():
        return set()
    return {str(entry) for entry in (yaml.safe_load(path.read_text()) or {}).get("previouslySynched") or []}


def hand_edit(config_path, entries):
    """Rewrite ignore.yml the way staff do, in place with a plain write (no lock, no rename)."""
    path = ignore_path(config_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"previouslySynched": sorted(entries)}, default_flow_style=False))


def snapshot(root, exclude=()):
    """Return {relative path: (type, size, mtime, link target)} for everything under root outside `exclude`."""
    root, exclude = Path(root), [Path(path) for path in exclude]
    entries = {}
    for directory, directories, files in os.walk(root):
        directories[:] = [name for name in directories if Path(directory, name) not in exclude]
        for name in directories + files:
            path = Path(directory, name)
            if path in exclude:
                continue
            info = path.lstat()
            kind = stat.S_IFMT(info.st_mode)
            entries[str(path.relative_to(root))] = (
                kind,
                info.st_size if stat.S_ISREG(kind) else 0,
                info.st_mtime_ns,
                os.readlink(path) if stat.S_ISLNK(kind) else None,
            )
    return entries


def outside_destination(facility):
    """Snapshot everything in the test's directory but the destination and the tools' own logs, state and sshd files."""
    workdir = facility.workdir
    return snapshot(
        workdir.parent, exclude=[facility.destination, workdir / "log", workdir / "state", workdir / "sshd"]
    )


def unexpected_rsync_arguments(command, ssh_target, source_root, destination_root, epns):
    """Given one rsync argument list from the log, return what in it is not the options mxsync sets, the
    ssh command, `ssh_target:source_root/EPN/` and `destination_root/<project>/EPN/data/` for one of `epns`."""
    from mxsync.commands import BASE_OPTIONS, checksum_options
    from mxsync.config import BAG_ALGORITHMS

    expected = set(BASE_OPTIONS).union(*(checksum_options(algorithm) for algorithm in BAG_ALGORITHMS))

    problems = []
    if command[:1] != ["rsync"] or len(command) < 4:
        return [f"not an rsync command: {command[:3]}"]
    *options, source, destination = command[1:]
    epn = source[len(f"{ssh_target}:{source_root}/") :].rstrip("/")
    if source != f"{ssh_target}:{source_root}/{epn}/" or epn not in epns:
        problems.append(f"source {source!r}")
    parts = (
        Path(destination).relative_to(destination_root).parts if destination.startswith(f"{destination_root}/") else ()
    )
    # A transfer writes into the open data folder, named through its descriptor (mxsync.destination); a dry run's path.
    open_folder = re.fullmatch(r"/proc/self/fd/[0-9]+/", destination) and "--dry-run" not in options
    if not open_folder and (len(parts) != 3 or parts[1:] != (epn, "data") or not destination.endswith("/data/")):
        problems.append(f"destination {destination!r}")
    position = 0
    while position < len(options):
        option = options[position]
        if option == "--rsh":
            rsh = options[position + 1] if position + 1 < len(options) else ""
            if not rsh.startswith("ssh -p ") or any(character in rsh for character in ";|&$`\n"):
                problems.append(f"--rsh {rsh!r}")
            position += 2
            continue
        if option not in expected and option != "--dry-run" and not option.startswith(("--timeout=", "--bwlimit=")):
            problems.append(f"option {option!r}")
        position += 1
    return problems


def rsync_commands(log):
    """Return the argument lists of every rsync transfer the DEBUG log shows ('Running (EPN: rsync): rsync ...')."""
    commands = []
    for line in log.splitlines():
        match = re.search(r": Running \([^()]*: rsync\): (rsync .*)$", line)
        if match:
            commands.append(shlex.split(match.group(1)))
    return commands


# ---------------------------------------------------------------- running the tools


@dataclass
class Outcome:
    returncode: object
    stdout: str
    stderr: str


def run_tool(program, *arguments, timeout=PATIENCE, env=None):
    """Run a console script to the end; return its CompletedProcess (text)."""
    return subprocess.run(
        [program, *map(str, arguments)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


STARTED = []  # every tool start_tool started, so that an interrupted scenario leaves none running


def start_tool(program, *arguments, env=None):
    """Start a console script in its own session, so that a kill of its group takes its rsync and ssh too."""
    process = subprocess.Popen(
        [program, *map(str, arguments)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    STARTED.append(process)
    return process


def kill_leftovers():
    """Kill the process group of every tool start_tool started that still runs (after a scenario broke off)."""
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            kill_group(process)
            process.communicate()


def finish(process, timeout=PATIENCE):
    """Wait for a started tool; return an Outcome (returncode None if it had to be killed as a hang)."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        returncode = process.returncode
    except subprocess.TimeoutExpired:
        kill_group(process)
        stdout, stderr = process.communicate()
        returncode = None
    return Outcome(returncode, _text(stdout), _text(stderr))


def kill_group(process, signal_number=signal.SIGKILL):
    """Signal the process group of a tool started with start_tool (its pid is the group id)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal_number)


def run_in_process(main, argv):
    """Run a command line's main(argv) in this process, capturing its output; a traceback lands in stderr.

    Logging handlers, signal handlers, the secret masker and the process supervisor are restored afterwards, so
    that runs do not see each other (the masker starts empty and children may start, as in a fresh process).
    """
    from mxsync.logsetup import masker
    from mxsync.processes import supervisor

    root = logging.getLogger()
    named = ("epnalert.email", "urllib3", "paramiko")
    saved_root = (root.handlers[:], root.level)
    saved_named = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level) for name in named}
    saved_signals = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    saved_secrets = set(masker._secrets)
    masker._secrets.clear()
    # A fresh process has no logging handlers (so Python's last-resort handler prints warnings to stderr).
    for handler in saved_root[0]:
        root.removeHandler(handler)
    # Every run ends by stopping the process supervisor for good (a real process exits then).
    supervisor.reset()
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                returncode = main(list(map(str, argv)))
            except SystemExit as exit:
                returncode = exit.code
            except Exception:  # what a fresh process would print before exiting 1
                traceback.print_exc()
                returncode = 1
    finally:
        for logger, (handlers, level) in [(root, saved_root)] + [
            (logging.getLogger(n), s) for n, s in saved_named.items()
        ]:
            for handler in logger.handlers[:]:
                if handler not in handlers:
                    logger.removeHandler(handler)
                    handler.close()
            for handler in handlers:
                if handler not in logger.handlers:
                    logger.addHandler(handler)
            logger.setLevel(level)
        for number, handler in saved_signals.items():
            signal.signal(number, handler)
        masker._secrets.clear()
        masker._secrets.update(saved_secrets)
        supervisor.reset()
    return Outcome(returncode, stdout.getvalue(), _without_server_noise(stderr.getvalue()))


SERVER_NOISE = re.compile(r"-{40}\nException occurred during processing of request from .*?\n-{40}\n", re.S)


def _without_server_noise(text):
    """Drop what a simulated server's thread printed meanwhile (a client hanging up on it): not the tool's output."""
    return SERVER_NOISE.sub("", text)


def mxsync_main(argv):
    from mxsync.cli import main

    return run_in_process(main, argv)


def wait_for(condition, process=None, timeout=PATIENCE, what="condition"):
    """Poll `condition` until true; False if `process` exits first or the hang guard fires."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            return condition()
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def log_has(facility, text, name="sync"):
    return lambda: text in log_text(facility, name)


def cycles_finished(facility):
    return log_text(facility).count("Cycle finished")


# ---------------------------------------------------------------- processes the scenarios started


def _process_table():
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_text = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat_text[stat_text.rindex(")") + 2 :].split()[1])
        table[int(entry.name)] = (parent, [part.decode("utf-8", "replace") for part in command if part])
    return table


def descendants(pid, table=None):
    table = table or _process_table()
    found, parents = [], [pid]
    while parents:
        parent = parents.pop()
        children = [child for child, (child_parent, _) in table.items() if child_parent == parent]
        found += children
        parents += children
    return found


def cut_ssh_connections(facility):
    """Kill every connection the facility's sshd serves (its per-connection children), as a network cut would.

    The listening sshd stays up, so a new connection succeeds. Returns how many processes were killed.
    """
    listener = int((facility.sshd.workdir / "sshd.pid").read_text())
    killed = 0
    for pid in descendants(listener):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


def control_masters(facility):
    """Return {pid: control directory} of the shared ssh connections mxsync left for this facility."""
    masters = {}
    known_hosts = f"UserKnownHostsFile={facility.sshd.known_hosts}"
    for pid, (_, command) in _process_table().items():
        if command[:1] == ["ssh"] and known_hosts in command and "ControlMaster=yes" in command:
            path = next((part.split("=", 1)[1] for part in command if part.startswith("ControlPath=")), None)
            masters[pid] = Path(path).parent if path else None
    return masters


def reap_control_masters(facility):
    """End the shared ssh connections a killed mxsync left running (systemd would end its cgroup)."""
    for pid, directory in control_masters(facility).items():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if directory is not None and CONTROL_DIR.fullmatch(directory.name):
            wait_for(lambda directory=directory: not any(directory.glob("*")), timeout=5)
            with contextlib.suppress(OSError):
                for leftover in directory.iterdir():
                    leftover.unlink()
                directory.rmdir()


# mxsync.connection.short_directory: tempfile.mkdtemp(prefix="mxsync-"), eight random characters.
CONTROL_DIR = re.compile(r"mxsync-[a-z0-9_]{8}")


def control_dirs():
    """The control directories of shared ssh connections under the temporary directory, now."""
    return {path for path in Path(tempfile.gettempdir()).glob("mxsync-*") if CONTROL_DIR.fullmatch(path.name)}


def remove_abandoned_control_dirs(created, settle=5.0):
    """Remove those of `created` (control directories made by mxsync runs we killed) that stayed empty and unused.

    A killed mxsync may leave the empty directory it made for its shared connection; one of another, live
    mxsync is in use within milliseconds, so an empty directory that nobody names after `settle` s is ours.
    """
    time.sleep(settle)
    named = " ".join(" ".join(command) for _, command in _process_table().values())
    for directory in created:
        with contextlib.suppress(OSError):
            if not any(directory.iterdir()) and str(directory) not in named:
                directory.rmdir()


def rsync_processes(destination):
    """Return the pids of rsync processes writing under `destination`: named in their arguments, or holding a folder
    there open (mxsync gives rsync the open data folder as /proc/self/fd/N)."""
    return [
        pid
        for pid, (_, command) in _process_table().items()
        if command
        and Path(command[0]).name == "rsync"
        and (any(str(destination) in part for part in command) or _holds_folder_under(pid, destination))
    ]


def _holds_folder_under(pid, destination):
    try:
        descriptors = [f"fd/{name}" for name in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    for name in ["cwd", *descriptors]:
        try:
            target = os.readlink(f"/proc/{pid}/{name}")
        except OSError:
            continue
        if target == str(destination) or target.startswith(f"{destination}/"):
            return True
    return False


def tool_processes(facility):
    """Return {pid: command line} of every rsync or ssh process working for this facility's tools.

    That is what `pgrep -f` would find: an rsync naming the destination, an ssh (rsync's remote shell, a
    shared connection, a probe) naming the facility's known-hosts file or client key.
    """
    marks = (str(facility.destination), str(facility.sshd.known_hosts), str(facility.sshd.client_key))
    return {
        pid: " ".join(command)
        for pid, (_, command) in _process_table().items()
        if command
        and Path(command[0]).name in ("rsync", "ssh")
        and any(mark in part for part in command for mark in marks)
    }


def tools_gone(facility):
    """Wait until no rsync or ssh of the facility's tools runs; return what is still running (empty if none)."""
    wait_for(lambda: not tool_processes(facility), timeout=10)
    return tool_processes(facility)


def signal_tool(process, signal_number, group):
    """Send a signal to a tool started with start_tool: to its process group (a terminal's Ctrl-C) or to it alone."""
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(process.pid, signal_number)
        else:
            os.kill(process.pid, signal_number)


def store_rows(config_path, sql, parameters=()):
    """Rows of a query on the state store (<state-dir>/mxsync.db), read-only with plain sqlite3; [] if there is none."""
    path = ignore_path(config_path).parent / "mxsync.db"
    if not path.exists():
        return []
    connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        return connection.execute(sql, parameters).fetchall()
    finally:
        connection.close()


def failure_entries(config_path):
    """Return {name: entry} of every EPN and source the state store counts a failure against."""
    epns = store_rows(config_path, "SELECT epn, failures, last_error FROM epns WHERE failures > 0")
    sources = store_rows(config_path, "SELECT name, failures, last_error FROM sources WHERE failures > 0")
    return {
        f"{section} {name}": {"failures": failures, "last_error": error}
        for section, rows in (("epns", epns), ("sources", sources))
        for name, failures, error in rows
    }


def last_cycle(config_path):
    """The summary of the last cycle in the state store ({} if none): planned, synced, failed, stopped, waiting."""
    rows = store_rows(config_path, "SELECT value FROM notes WHERE name = 'last_cycle'")
    return json.loads(rows[0][0]) if rows else {}


def record_in_flight(ignore):
    """True if mxsync is writing `ignore` (ignore.yml's path) now: the temporary file of its atomic write exists."""
    with contextlib.suppress(OSError), os.scandir(ignore.parent) as entries:
        return any(entry.name.startswith(f".{ignore.name}.") and entry.name.endswith(".tmp") for entry in entries)
    return False


def inode(path):
    """The inode of `path`, or None: an atomic write (temporary file, rename) gives the file a new one."""
    try:
        return path.stat().st_ino
    except OSError:
        return None


# ---------------------------------------------------------------- file systems (root only)


@contextlib.contextmanager
def tmpfs(path, size):
    """Mount a tmpfs of `size` (e.g. '3m') on `path` for the block."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield Path(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path, *options, timeout=30.0):
    """Remount the file system at `path` with options (e.g. 'ro'); retried while it is busy; return success."""
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(["mount", "-o", ",".join(("remount", *options)), str(path)], capture_output=True)
        if result.returncode == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)


def fill(directory):
    """Write a file in `directory` until its file system is full."""
    with open(Path(directory) / "filler", "wb", buffering=0) as filler:
        with contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 4096)


# ---------------------------------------------------------------- a portal that answers anything


class RawPortal:
    """An HTTP server that issues a token and answers every visits request with a fixed status, type and body.

    Given `visits` instead, it answers {"data": {"visits": [...]}} with those overlapping the requested
    window, reading their times however they are written (no offset means UTC); visits whose times it
    cannot read are always listed, as the facility simulator does.
    """

    TOKEN = "raw-portal-token-S3CRET-4"

    def __init__(self, status=200, content_type="application/json", body=b"{}", visits=None):
        self.status, self.content_type, self.body, self.visits = status, content_type, body, visits
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _RawHandler)
        self._server.raw_portal = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._server.shutdown()
        self._server.server_close()

    def answer(self, query):
        if self.visits is None:
            return self.status, self.content_type, self.body
        start, end = (_lenient_time(query.get(name, [""])[-1]) for name in ("start_time", "end_time"))
        listed = []
        for visit in self.visits:
            visit_start, visit_end = _lenient_time(visit.get("start_time")), _lenient_time(visit.get("end_time"))
            if visit_start is None or visit_end is None or (visit_start <= end and visit_end >= start):
                listed.append(visit)
        return 200, "application/json", json.dumps({"data": {"visits": listed}}).encode()


def _lenient_time(text):
    try:
        moment = datetime.fromisoformat(text.strip().replace("z", "+00:00").replace("Z", "+00:00"))
    except (AttributeError, TypeError, ValueError):
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class _RawHandler(BaseHTTPRequestHandler):
    def log_message(self, format, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send(200, "application/json", json.dumps({"data": {"access_token": RawPortal.TOKEN}}).encode())

    def do_GET(self):
        self._send(*self.server.raw_portal.answer(parse_qs(urlsplit(self.path).query)))

    def _send(self, status, content_type, body):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):  # a client refusing a huge answer hangs up mid-body
            self.wfile.write(body)


def closed_port():
    """Return a loopback port nothing listens on (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- facility set-ups


def add_epns(facility, names, frames=1, frame_size=8 * 1024, small_files=1, **visit):
    for name in names:
        facility.add_experiment(
            "mx",
            name,
            equipment_id=23,
            frames=frames,
            frame_size=frame_size,
            small_files=small_files,
            **(visit or ENDED),
        )


def require_smtp_login(facility):
    """Restart the facility's SMTP server requiring SMTP_LOGIN; return config overrides that use it."""
    facility.smtp.stop()
    facility.smtp.require_auth = SMTP_LOGIN
    facility.smtp.start()
    return {
        "epnalert_email_smtp": f"{facility.smtp.host}:{facility.smtp.port}",
        "epnalert_email_smtp_username": SMTP_LOGIN[0],
        "epnalert_email_smtp_password": SMTP_LOGIN[1],
    }


def new_key(path):
    """Generate a passphrase-less ed25519 key pair nobody authorised; return the private key's path."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "stranger", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    return Path(path)


def subjects(facility):
    return [received.message["Subject"] for received in facility.smtp.messages]
