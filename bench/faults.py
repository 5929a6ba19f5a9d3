"""Run every fault scenario of tests/scenarios.py many times and print the reliability figures.

Usage (from the repository root; as root, so that the tmpfs faults run too):
    .venv/bin/python bench/faults.py                            # moderate counts, about 40 minutes on 2 busy cores
    .venv/bin/python bench/faults.py --runs 3 --kill-runs 20 --examples 100     # a quick pass
    .venv/bin/python bench/faults.py --only kill portal         # rows whose name contains a word
Each row: the fault, how many runs (or fuzz examples), and the breaches of the promises counted in
them: EPNs recorded wrongly, ignore.yml entries lost, crashes (tracebacks, unexpected exits), secrets
leaked, and other expectations not met. Every count must be 0.
Writes bench/results/faults.json. Exit status 0 if every count is 0, 1 if not.
"""

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests import fuzzing, scenarios  # noqa: E402
from tests.facility import Facility  # noqa: E402
from tests.faults import IS_ROOT, Tally, kill_leftovers  # noqa: E402

RESULTS = REPO / "bench" / "results" / "faults.json"
COLUMNS = ("wrongly_recorded", "lost", "crashes", "leaks", "unmet")
HEADINGS = ("fault", "runs", "recorded wrongly", "entries lost", "crashes", "secrets leaked", "other")


def _portal_group(kinds, make):
    return [make(kind) for kind in kinds]


# (row name, [scenario functions], runs: "runs" | "fraction" of runs | "loop" | "fuzz", needs root)
ROWS = [
    ("kill -9 at random moments of a 12-EPN pass", [scenarios.kill9_loop], "loop", False),
    ("kill -9 during live and final passes: the state store", [scenarios.kill9_store_loop], "loop", False),
    ("a source file grows while rsync sends it", [scenarios.source_grows_mid_transfer], "runs", False),
    ("SIGTERM to the service mid-transfer", [scenarios.sigterm_mid_transfer], "runs", False),
    (
        "SIGINT mid-transfer: to mxsync; to its process group (Ctrl-C)",
        [scenarios.sigint(group, "transfer") for group in (False, True)],
        "runs",
        False,
    ),
    (
        "SIGINT mid-record (ignore.yml being written): to mxsync; to its process group",
        [scenarios.sigint(group, "record") for group in (False, True)],
        "runs",
        False,
    ),
    (
        "SIGINT just after the last record, the ssh master slow to exit: to mxsync; to its process group",
        [scenarios.sigint(group, "last record") for group in (False, True)],
        "runs",
        False,
    ),
    (
        "SIGINT while the ssh connection starts: to mxsync; to its process group",
        [scenarios.sigint(group, "connect") for group in (False, True)],
        "runs",
        False,
    ),
    (
        "SIGHUP mid-transfer: to the service; to its process group; then a stop",
        [scenarios.sighup(group) for group in (False, True)],
        "runs",
        False,
    ),
    ("network cut: ssh connection killed mid-transfer", [scenarios.connection_cut], "runs", False),
    ("network cut: sshd stopped mid-transfer", [scenarios.sshd_stopped], "runs", False),
    ("sshd refuses the login (unknown key)", [scenarios.login_refused], "runs", False),
    ("facility host key changed", [scenarios.host_key_changed], "runs", False),
    ("disk full at the destination (3 MiB tmpfs)", [scenarios.disk_full], "runs", True),
    ("destination read-only (root; one project folder)", [scenarios.destination_read_only], "runs", True),
    ("state file system full (ignore.yml, history)", [scenarios.state_disk_full], "runs", True),
    ("SMTP refuses the failure alert", [scenarios.smtp_refusing], "runs", False),
    ("service loop: 6 cycles, a fault in each, SIGTERM", [scenarios.service_under_faults], "fraction", False),
    (
        "second mxsync while one runs (test_mxsync)",
        ["tests.test_mxsync:test_second_instance_refuses_while_the_first_holds_the_lock"],
        "runs",
        False,
    ),
    ("edits of ignore.yml under its lock during a pass", [scenarios.scripted_hand_edits], "runs", False),
    (
        "ignore.yml typos while the service runs: unclosed [, tab, stray key, binary, empty",
        [scenarios.ignore_typo(kind) for kind in scenarios.IGNORE_TYPOS],
        "fraction",
        False,
    ),
    (
        f"refused rsync options ({len(scenarios.REFUSED_RSYNC_OPTIONS)} each run): check and --execute --once",
        [scenarios.refused_rsync_options],
        "runs",
        False,
    ),
    ("no data at the facility yet: missing, empty folder (dry run, real runs)", [scenarios.no_data_yet], "runs", False),
    (
        "portal: 500, HTML, timeout, garbage, truncated, 401 loop, hang-up; token endpoint: HTML, 500, garbage",
        _portal_group(sorted(scenarios.PORTAL_FAULTS), scenarios.portal_fault),
        "runs",
        False,
    ),
    (
        "portal answers: wrong envelope (5 kinds), HTML 200, empty, 100 000-deep nesting, 65 MiB, 404",
        _portal_group(sorted(scenarios.PORTAL_ANSWERS), scenarios.portal_answer),
        "runs",
        False,
    ),
    ("portal: visits with missing or wrongly typed fields", [scenarios.malformed_visits], "runs", False),
    ("portal: times without offset or with odd offsets", [scenarios.odd_times], "runs", False),
    ("portal: 30 000 visits in one answer", [scenarios.huge_answer], "fraction", False),
    (
        f"hostile EPN names from the portal ({len(scenarios.HOSTILE_EPNS)} at once)",
        [scenarios.hostile_portal_names],
        "runs",
        False,
    ),
    (
        f"hostile file names ({len(scenarios.HOSTILE_FILES) + 1}) and symlinks in an EPN",
        [scenarios.hostile_file_names],
        "runs",
        False,
    ),
    (
        f"hostile project folders in epn_cap_map ({len(scenarios.HOSTILE_PROJECTS)} each run)",
        [scenarios.hostile_projects],
        "runs",
        False,
    ),
    (
        "a project member's symlinks to another project, the state, outside: planted before the cycle",
        [scenarios.hostile_project_member("before the cycle")],
        "runs",
        True,
    ),
    (
        "a project member swaps the EPN folder or data/ for a symlink as the transfer starts",
        [scenarios.hostile_project_member("while the transfer starts")],
        "runs",
        True,
    ),
    (
        "a project member swaps a folder inside data/ for a symlink during the transfer",
        [scenarios.hostile_project_member("inside data/ during the transfer")],
        "runs",
        True,
    ),
    ("epnalert: hostile SFTP folder names", [scenarios.epnalert_hostile_folders], "runs", False),
    ("epnalert: a folder name that is not UTF-8", [scenarios.epnalert_undecodable_folder], "runs", False),
    (
        "epnalert: portal timeout, truncated, 401 loop, hang-up, token HTML",
        _portal_group(sorted(scenarios.EPNALERT_PORTAL_FAULTS), scenarios.epnalert_portal_fault),
        "runs",
        False,
    ),
    ("epnalert: SMTP login refused", [scenarios.epnalert_smtp_login_refused], "runs", False),
    (
        "fuzz: mutated config -> mxsync check",
        [("check", lambda: fuzzing.mutated_config(_base(), sandboxed=False))],
        "fuzz",
        False,
    ),
    (
        "fuzz: mangled config text -> mxsync check",
        [("check", lambda: fuzzing.mutated_text(_base_text()))],
        "fuzz",
        False,
    ),
    ("fuzz: random YAML as config -> mxsync check", [("check", fuzzing.random_yaml)], "fuzz", False),
    (
        "fuzz: mutated config -> mxsync run (dry)",
        [("run", lambda: fuzzing.mutated_config(_base(), sandboxed=True))],
        "fuzz",
        False,
    ),
    ("fuzz: mutated ignore.yml -> mxsync run --execute", [("ignore", fuzzing.ignore_texts)], "fuzz", False),
    (
        "fuzz: mutated mxsync-state.json on a first start -> run --execute (imported, or kept with a warning)",
        [("history", fuzzing.history_texts)],
        "fuzz",
        False,
    ),
    (
        "fuzz: mutated epnalert-state.json on a first start -> epnalert (imported, or kept with a warning)",
        [("alert", fuzzing.epnalert_state_texts)],
        "fuzz",
        False,
    ),
    (
        "fuzz: damaged mxsync.db -> run --execute (moved aside and rebuilt, or kept and reported)",
        [("store", fuzzing.store_damages)],
        "fuzz",
        False,
    ),
]

_BASE = {}


def _base():
    if "config" not in _BASE:
        with fuzzing.sandbox() as directory:
            _BASE["config"] = fuzzing.make_sandbox(directory)
    return _BASE["config"]


def _base_text():
    import yaml

    return yaml.safe_dump(_base(), sort_keys=False)


# ---------------------------------------------------------------- running the rows


def run_row(name, items, mode, options, workdir):
    tally = Tally(name)
    started = time.monotonic()
    if mode == "loop":
        try:
            with Facility(workdir / "kill9") as facility:
                try:
                    items[0](facility, tally, random.Random(options.seed), runs=options.kill_runs)
                finally:
                    kill_leftovers()
        except Exception:
            tally.unmet.append(f"harness error: {traceback.format_exc()[-800:]}")
    elif mode == "fuzz":
        run_fuzz(tally, *items[0], options.examples, workdir)
    else:
        runs = max(1, options.runs // 5) if mode == "fraction" else options.runs
        for number in range(runs):
            for item in items:
                run_once(
                    tally, item, random.Random(options.seed * 1000 + number), workdir / f"run{number}-{_name(item)}"
                )
    tally.seconds = time.monotonic() - started
    return tally


def run_once(tally, item, rng, directory):
    """One run of a scenario on a fresh facility; a harness error counts as an unmet expectation."""
    try:
        with Facility(directory) as facility:
            if isinstance(item, str):  # an existing test, reused as it is
                module, function = item.split(":")
                __import__(module)
                tally.runs += 1
                try:
                    getattr(sys.modules[module], function)(facility)
                except AssertionError as error:
                    tally.unmet.append(f"{function}: {error}"[:500])
            else:
                try:
                    item(facility, tally, rng)
                finally:
                    kill_leftovers()
    except Exception:
        tally.unmet.append(f"harness error in {_name(item)}: {traceback.format_exc()[-800:]}")


def run_fuzz(tally, target, strategy, examples, workdir):
    """Run a property over `examples` generated inputs, counting every problem instead of stopping at the first."""
    if target == "alert":
        facility = Facility(workdir / "alert-fuzz").__enter__()
        facility.add_experiment("mx", "20001a", equipment_id=23, frames=1, small_files=0)
        alert_config = facility.write_config()

    def check(value):
        tally.runs += 1
        if target == "alert":
            problems = fuzzing.run_epnalert_state(alert_config, value)
        else:
            with fuzzing.sandbox() as sandbox:
                if target == "check":
                    problems = fuzzing.check_config(sandbox, value if isinstance(value, (str, bytes)) else _yaml(value))
                elif target == "run":
                    problems = fuzzing.run_config(sandbox, value)
                elif target == "ignore":
                    problems = fuzzing.run_state(sandbox, ignore_text=value)
                elif target == "store":
                    problems = fuzzing.run_store(sandbox, value)
                else:
                    problems = fuzzing.run_state(sandbox, history_text=value)
        for problem in problems:
            column = tally.crashes if problem.startswith("traceback") else tally.unmet
            column.append(f"{problem[:400]} <- {value!r}"[:700])

    try:
        settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))(
            given(strategy())(check)
        )()
    finally:
        if target == "alert":
            facility.__exit__(None, None, None)


def _yaml(value):
    import yaml

    return yaml.safe_dump(value, allow_unicode=True)


def _name(item):
    return item.split(":")[-1] if isinstance(item, str) else getattr(item, "__name__", "scenario")


# ---------------------------------------------------------------- reporting


def machine():
    def version(command):
        try:
            return subprocess.run(command, capture_output=True, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            return "?"

    release = (
        Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else platform.platform()
    )
    return {
        "cores": os.cpu_count(),
        "system": f"Debian {release}" if Path("/etc/debian_version").exists() else release,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "rsync": version(["rsync", "--version"]),
        "ssh": subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip(),
        "root": IS_ROOT,
    }


def table(rows):
    widths = [max(len(HEADINGS[0]), *(len(row["fault"]) for row in rows))] + [len(heading) for heading in HEADINGS[1:]]
    lines = [
        "| " + " | ".join(heading.ljust(width) for heading, width in zip(HEADINGS, widths)) + " |",
        "| "
        + " | ".join("-" * width if index == 0 else "-" * (width - 1) + ":" for index, width in enumerate(widths))
        + " |",
    ]
    for row in rows:
        cells = [row["fault"], row["runs"] if row["runs"] is not None else "skipped"] + [
            row.get(column, "") for column in COLUMNS
        ]
        lines.append(
            "| "
            + " | ".join(
                str(cell).ljust(widths[0]) if index == 0 else str(cell).rjust(width)
                for index, (cell, width) in enumerate(zip(cells, widths))
            )
            + " |"
        )
    return "\n".join(lines)


def parse_arguments(argv):
    parser = argparse.ArgumentParser(prog="bench/faults.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=int, default=10, help="runs of each scenario (default 10; the slow ones a fifth)"
    )
    parser.add_argument("--kill-runs", type=int, default=100, help="kill -9 moments in the seeded loop (default 100)")
    parser.add_argument("--examples", type=int, default=500, help="generated inputs per fuzz property (default 500)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random moments and choices (default 1)")
    parser.add_argument("--only", nargs="+", metavar="WORD", help="only rows whose name contains one of these words")
    parser.add_argument("--output", default=str(RESULTS), help=f"results JSON (default {RESULTS.relative_to(REPO)})")
    return parser.parse_args(argv)


def quiet_simulators():
    """Keep the simulated servers' own complaints (a client hanging up on them, AUTH without TLS) off the table."""
    import logging
    import socketserver
    import warnings

    original = socketserver.BaseServer.handle_error

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            original(self, request, client_address)

    socketserver.BaseServer.handle_error = handle_error
    warnings.filterwarnings("ignore", module="aiosmtpd")
    warnings.filterwarnings("ignore", message=".*AUTH while not requiring TLS.*")
    logging.getLogger("mail.log").setLevel(logging.ERROR)


def _interrupted(signal_number, frame):
    raise KeyboardInterrupt  # so that the scratch directory and the tmpfs mounts are cleaned up


def main(argv=None):
    options = parse_arguments(sys.argv[1:] if argv is None else argv)
    quiet_simulators()
    signal.signal(signal.SIGTERM, _interrupted)
    os.environ.setdefault("VIRTUAL_ENV", str(Path(sys.executable).parent.parent))
    selected = [row for row in ROWS if not options.only or any(word.lower() in row[0].lower() for word in options.only)]
    started, results = time.monotonic(), []
    with tempfile.TemporaryDirectory(prefix="mxsync-faults-") as scratch:
        for number, (name, items, mode, needs_root) in enumerate(selected):
            if needs_root and not IS_ROOT:
                print(f"[{number + 1}/{len(selected)}] {name}: skipped (needs root to mount a tmpfs)", flush=True)
                results.append({"fault": name, "runs": None, "skipped": "needs root"})
                continue
            print(f"[{number + 1}/{len(selected)}] {name} ...", end=" ", flush=True)
            tally = run_row(name, items, mode, options, Path(scratch) / f"row{number}")
            row = dict(
                tally.counts(),
                seconds=round(tally.seconds, 1),
                details={column: getattr(tally, column)[:5] for column in COLUMNS if getattr(tally, column)},
            )
            results.append(row)
            print(
                f"{tally.runs} runs, {sum(len(getattr(tally, c)) for c in COLUMNS)} breaches, {tally.seconds:.0f} s",
                flush=True,
            )
    report = {
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started),
        "machine": machine(),
        "settings": {
            "runs": options.runs,
            "kill_runs": options.kill_runs,
            "examples": options.examples,
            "seed": options.seed,
        },
        "faults": results,
    }
    output = Path(options.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(results))
    totals = {column: sum(row.get(column, 0) for row in results) for column in COLUMNS}
    print(
        f"\nTotal runs {sum(row['runs'] or 0 for row in results)}; breaches {totals}; "
        f"{report['seconds']} s on {report['machine']['cores']} cores, {report['machine']['system']}. Details: {output}"
    )
    for row in results:
        if row.get("notes"):
            print(f"  {row['fault']}: " + ", ".join(f"{count} {what}" for what, count in row["notes"].items()))
    for row in results:
        for column, items in row.get("details", {}).items():
            for item in items:
                print(f"  {row['fault']}: {column}: {item}")
    return 0 if not any(totals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
