"""The fault scenarios shared by tests/test_reliability.py (a run or a few each) and bench/faults.py (many).

Every scenario is `scenario(facility, tally, rng)`: it gets a fresh running Facility, injects its
fault for real, checks the promises into the Tally and returns nothing. See tests/faults.py.
"""

import contextlib
import os
import re
import shutil
import signal
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tests.facility.tree import make_experiment, tree_manifest, wanted
from tests.faults import (
    ENDED,
    IS_ROOT,
    MXSYNC,
    NOW,
    SMTP_LOGIN,
    RawPortal,
    add_epns,
    control_dirs,
    control_masters,
    cut_ssh_connections,
    cycles_finished,
    failure_entries,
    fill,
    finish,
    hand_edit,
    ignore_path,
    inode,
    kill_group,
    last_cycle,
    log_has,
    log_text,
    manifest,
    mxsync_main,
    new_key,
    outputs,
    outside_destination,
    reap_control_masters,
    record_in_flight,
    recorded,
    remount,
    remove_abandoned_control_dirs,
    require_smtp_login,
    rsync_commands,
    rsync_processes,
    run_tool,
    secrets_of,
    signal_tool,
    snapshot,
    start_tool,
    store_rows,
    subjects,
    tmpfs,
    tools_gone,
    unexpected_rsync_arguments,
    wait_for,
)

EQUIPMENT_PATH = "/api/v1/equipment"
TOKEN_PATH = "/api/v1/oauth/token"


def complete_copy(facility, project, epn):
    """True if the destination holds exactly the bytes of every wanted source file of `epn`, and no other file
    but hidden ones (rsync's temporary files, which an rsync killed by SIGKILL cannot remove)."""
    source = tree_manifest(facility.root / "data" / "mx" / epn, include=wanted)
    return tree_manifest(facility.destination / project / epn / "data", include=wanted) == source


def clear_portal_faults(facility):
    with facility.portal._lock:
        facility.portal._faults.clear()


def check_everything(tally, facility, config, *results, before=frozenset(), key_files=()):
    """Promises 1, 2 and 6 and the absence of tracebacks, over everything the run left behind."""
    tally.check_records(facility, config, before)
    tally.scan(outputs(facility, *results), secrets_of(facility, *key_files))


# ---------------------------------------------------------------- crashes: kill -9 at random moments

KILL_SMALL = [f"12282{letter}" for letter in "abcdefghij"]
KILL_LARGE = ["12283a", "12283b"]
HAND_ENTRIES = {"99999a", "99998b"}  # written by staff, for data not on this facility


def kill9_loop(facility, tally, rng, runs):
    """kill -9 the whole mxsync process group at a random moment of a multi-EPN pass, `runs` times.

    Before each run staff force a re-sync of a random few EPNs (removing them from ignore.yml and
    sometimes damaging their copy), so that every run has transfers and records in flight. After
    each kill: ignore.yml must parse and keep every entry, and every EPN in it must be complete.
    A last run without a kill must then finish everything.
    """
    add_epns(facility, KILL_SMALL)
    add_epns(facility, KILL_LARGE, frames=3, frame_size=256 * 1024)
    everything = set(KILL_SMALL + KILL_LARGE)
    config = facility.write_config(epn_cap_map={"12282": "ny79", "12283": "ab12"}, max_tasks=2, rsync_bwlimit="4096")
    hand_edit(config, HAND_ENTRIES)
    dirs_before = control_dirs()
    for _ in range(runs):
        present = recorded(config)
        synced = sorted(present & everything)
        forced = set(rng.sample(synced, k=rng.randint(min(1, len(synced)), len(synced))))
        if forced:
            hand_edit(config, present - forced)
        for epn in sorted(forced):
            project = "ab12" if epn.startswith("12283") else "ny79"
            frames = sorted((facility.destination / project / epn / "data" / "frames").glob("*.cbf"))
            if frames and rng.random() < 0.5:
                victim = rng.choice(frames)
                with open(victim, "r+b") as file:
                    file.truncate(victim.stat().st_size // 2)
        before = recorded(config)
        process = start_tool(MXSYNC, "--config", config, "--execute", "--once")
        # A pass takes about 0.8 s to start and 0.3 s per EPN here (2 cores): kills land anywhere in it.
        moment = rng.uniform(0.0, 0.8 + 0.3 * len(everything - before))
        deadline = time.monotonic() + moment
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        killed = process.poll() is None
        kill_group(process)
        result = finish(process)
        reap_control_masters(facility)
        tally.runs += 1
        tally.note("killed mid-pass" if killed else "pass ended before the kill")
        if killed and recorded(config) - before:
            tally.note("killed mid-pass after recording some EPNs")
        # 0: the pass ended before the kill; -9: killed. Anything else is a failure without a cause.
        tally.expect(
            result.returncode in (0, -signal.SIGKILL), f"exit {result.returncode} after a kill at {moment:.2f} s"
        )
        check_everything(tally, facility, config, result, before=before)
    final = run_tool(MXSYNC, "--config", config, "--execute", "--once")
    remove_abandoned_control_dirs(control_dirs() - dirs_before, settle=1.0)
    tally.expect(final.returncode == 0, f"the pass after the kills exits {final.returncode}: {final.stderr[-500:]}")
    tally.expect(recorded(config) == everything | HAND_ENTRIES, f"after the kills, recorded {sorted(recorded(config))}")
    check_everything(tally, facility, config, final, before=HAND_ENTRIES)
    for epn in sorted(everything):
        tally.expect(complete_copy(facility, "ab12" if epn.startswith("12283") else "ny79", epn), f"{epn} copy differs")
    for leftover in facility.destination.rglob(".*"):
        if leftover.name != ".info":
            tally.note("temporary file left at the destination by a killed rsync")


KILL_LIVE = ["12284a", "12284b"]  # visits running: live passes, never recorded


def kill9_store_loop(facility, tally, rng, runs):
    """kill -9 the whole mxsync process group at a random moment while live and final passes write the state store.

    After each kill the store must pass SQLite's integrity check, every transfer it holds must have a start, and
    no EPN of a running visit may be recorded; the next run closes the passes the kill left open ("interrupted")
    and repeats nothing verified. A last run without a kill must then finish every ended visit.
    """
    add_epns(facility, KILL_SMALL[:6])
    add_epns(
        facility,
        KILL_LIVE,
        frames=3,
        frame_size=256 * 1024,
        start=NOW - timedelta(hours=1),
        end=NOW + timedelta(hours=8),
    )
    ended = set(KILL_SMALL[:6])
    config = facility.write_config(
        epn_cap_map={"12282": "ny79", "12284": "ny79"}, max_tasks=2, rsync_bwlimit="4096", live_interval_minutes=1
    )
    for _ in range(runs):
        present = recorded(config)
        forced = set(rng.sample(sorted(present & ended), k=rng.randint(0, len(present & ended))))
        if forced:
            hand_edit(config, present - forced)
        before = recorded(config)
        process = start_tool(MXSYNC, "--config", config, "--execute", "--once")
        moment = rng.uniform(0.0, 0.8 + 0.3 * (len(ended - before) + len(KILL_LIVE)))
        deadline = time.monotonic() + moment
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        killed = process.poll() is None
        kill_group(process)
        result = finish(process)
        reap_control_masters(facility)
        tally.runs += 1
        tally.note("killed mid-pass" if killed else "pass ended before the kill")
        open_passes = store_rows(config, "SELECT count(*) FROM transfers WHERE outcome IS NULL")
        if killed and open_passes and open_passes[0][0]:
            tally.note("killed with passes open in the store")
        tally.expect(result.returncode in (0, 1, -signal.SIGKILL), f"exit {result.returncode} after a kill")
        integrity = store_rows(config, "PRAGMA integrity_check")
        tally.expect(integrity in ([], [("ok",)]), f"the store after a kill: {integrity[:3]}")
        tally.expect(not recorded(config) & set(KILL_LIVE), "an EPN of a running visit was recorded")
        check_everything(tally, facility, config, result, before=before)
    final = run_tool(MXSYNC, "--config", config, "--execute", "--once")
    tally.expect(final.returncode == 0, f"the pass after the kills exits {final.returncode}: {final.stderr[-500:]}")
    tally.expect(recorded(config) == ended, f"after the kills, recorded {sorted(recorded(config))}")
    left_open = store_rows(config, "SELECT epn FROM transfers WHERE outcome IS NULL")
    tally.expect(not left_open, f"passes still open in the store after a clean run: {left_open[:3]}")
    for _ in range(store_rows(config, "SELECT count(*) FROM transfers WHERE outcome = 'interrupted'")[0][0]):
        tally.note("pass closed as interrupted by the next run")
    for epn in sorted(ended):
        tally.expect(complete_copy(facility, "ny79", epn), f"{epn} copy differs")
    check_everything(tally, facility, config, final, before=ended)


# ---------------------------------------------------------------- interruptions


def _start_slow_pass(facility, tally, **overrides):
    """Start a pass whose first EPN (12282a, 1.5 MiB at 512 KiB/s) takes about 3 s; return (config, process)."""
    add_epns(facility, ["12282a"], frames=3, frame_size=512 * 1024)
    add_epns(facility, ["12282b"])
    options = dict(rsync_bwlimit="512", max_tasks=1, rsync_retries=2, ssh_connect_timeout=3)
    options.update(overrides)
    config = facility.write_config(**options)
    process = start_tool(MXSYNC, "--config", config, "--execute", "--once")
    started = wait_for(log_has(facility, "12282a: started"), process)
    tally.expect(started, "12282a never started")
    partial = facility.destination / "ny79" / "12282a" / "data"
    # Wait for the first bytes at the destination (rsync's temporary file), then a random moment more.
    wait_for(lambda: any(path.is_file() for path in partial.rglob("*")), process, timeout=20)
    return config, process


def sigterm_mid_transfer(facility, tally, rng):
    """SIGTERM the service (no --once) mid-transfer: it exits 0 within seconds, records nothing unfinished."""
    add_epns(facility, ["12282a"], frames=3, frame_size=512 * 1024)
    config = facility.write_config(rsync_bwlimit="512", sync_frequency_hours=0.001)
    process = start_tool(MXSYNC, "--config", config, "--execute")
    tally.expect(wait_for(log_has(facility, "12282a: started"), process), "12282a never started")
    time.sleep(rng.uniform(0.1, 2.0))
    process.send_signal(signal.SIGTERM)
    result = finish(process, timeout=30)  # a hang guard: it stops within a second or two
    tally.runs += 1
    tally.expect(result.returncode == 0, f"exit {result.returncode} after SIGTERM (expected 0)")
    tally.expect(not rsync_processes(facility.destination), "rsync still running after the service stopped")
    if "12282a" not in recorded(config):
        tally.expect("12282a: stopped before it finished; nothing recorded" in log_text(facility), "no 'stopped' line")
    check_everything(tally, facility, config, result)
    again = run_tool(MXSYNC, "--config", facility.write_config(), "--execute", "--once")
    tally.expect(
        again.returncode == 0 and complete_copy(facility, "ny79", "12282a"), "the next pass did not complete it"
    )
    check_everything(tally, facility, config, result, again)


def connection_cut(facility, tally, rng):
    """Kill the ssh connection mid-transfer (sshd stays up): rsync's retry resumes and the EPN completes."""
    config, process = _start_slow_pass(facility, tally)
    time.sleep(rng.uniform(0.0, 1.0))
    tally.expect(cut_ssh_connections(facility) > 0, "no ssh connection to cut")
    result = finish(process)
    tally.runs += 1
    tally.expect(
        result.returncode == 0, f"exit {result.returncode} (the retry should complete it): {result.stderr[-400:]}"
    )
    retried = (
        "retrying in",
        "retrying over a connection of its own",
    )  # rsync-retries, or the shared connection's fallback
    tally.expect(any(text in log_text(facility) for text in retried), "no retry logged after the cut")
    tally.expect(recorded(config) == {"12282a", "12282b"}, f"recorded {sorted(recorded(config))}")
    tally.expect(complete_copy(facility, "ny79", "12282a"), "12282a differs from the source after resuming")
    check_everything(tally, facility, config, result)


def sshd_stopped(facility, tally, rng):
    """Stop the facility's sshd mid-transfer: the EPN fails and is not recorded; once it is back, the next pass completes."""
    config, process = _start_slow_pass(facility, tally, rsync_retries=1)
    time.sleep(rng.uniform(0.0, 1.0))
    facility.sshd.stop()
    result = finish(process)
    tally.runs += 1
    tally.expect(result.returncode == 1, f"exit {result.returncode} with the host down (expected 1)")
    tally.expect("12282a" not in recorded(config), "12282a recorded although the host went down mid-transfer")
    tally.expect("12282a: FAILED" in log_text(facility), "no FAILED line for 12282a")
    check_everything(tally, facility, config, result)
    facility.sshd.start()
    again = run_tool(MXSYNC, "--config", config, "--execute", "--once")
    tally.expect(again.returncode == 0, f"exit {again.returncode} once the host is back")
    tally.expect(complete_copy(facility, "ny79", "12282a"), "12282a incomplete once the host is back")
    check_everything(tally, facility, config, result, again)


def login_refused(facility, tally, rng):
    """sshd refuses our key: no transfer starts, nothing is recorded, staff are told; check names the problem."""
    add_epns(facility, ["12282a"])
    stranger = new_key(facility.workdir / "stranger_ed25519")
    config = facility.write_config(key_file=str(stranger), failure_alert_cycles=1, **require_smtp_login(facility))
    result = run_tool(MXSYNC, "--config", config, "--execute", "--once")
    check = run_tool(MXSYNC, "check", "--config", config, "--connect")
    tally.runs += 1
    log = log_text(facility)
    tally.expect(result.returncode == 1, f"exit {result.returncode} (expected 1)")
    tally.expect("Permission denied" in log, "ssh's refusal is not in the log")
    tally.expect("12282a: started" not in log, "a transfer started although the login was refused")
    tally.expect(recorded(config) == set() and not any(facility.destination.iterdir()), "something recorded or written")
    tally.expect(
        wait_for(lambda: facility.smtp.messages, timeout=10) and "ssh" in subjects(facility)[0], "no alert about ssh"
    )
    failed = [line for line in check.stdout.splitlines() if line.startswith("FAILED")]
    tally.expect(
        check.returncode == 1 and any("SSH login" in line and "login refused" in line for line in failed),
        f"check --connect does not name the refused login: {check.stdout}",
    )
    check_everything(tally, facility, config, result, check, key_files=[stranger])


def host_key_changed(facility, tally, rng):
    """The facility's host key changes: ssh and SFTP refuse it, nothing is transferred, the message says why."""
    add_epns(facility, ["12282a"])
    config = facility.write_config()
    facility.sshd.regenerate_host_key()  # known_hosts keeps the old key
    result = run_tool(MXSYNC, "--config", config, "--execute", "--once")
    check = run_tool(MXSYNC, "check", "--config", config, "--connect")
    tally.runs += 1
    tally.expect(result.returncode == 1, f"exit {result.returncode} (expected 1)")
    tally.expect(
        "REMOTE HOST IDENTIFICATION HAS CHANGED" in log_text(facility)
        or "Host key verification failed" in log_text(facility),
        "no host key message in the log",
    )
    tally.expect(recorded(config) == set() and not any(facility.destination.iterdir()), "something recorded or written")
    tally.expect(
        any(
            line.startswith("FAILED  SSH login") and "host key does not match" in line
            for line in check.stdout.splitlines()
        ),
        f"check --connect: {check.stdout}",
    )
    check_everything(tally, facility, config, result, check)


# ---------------------------------------------------------------- the destination (root: small tmpfs)


def disk_full(facility, tally, rng):
    """A 3 MiB destination: the EPN that does not fit fails and is not recorded; with room, the next pass completes."""
    with tmpfs(facility.destination, "3m"):
        add_epns(facility, ["12282a", "12282c"])
        add_epns(facility, ["12282b"], frames=6, frame_size=1024 * 1024)
        config = facility.write_config(max_tasks=1)
        result = run_tool(MXSYNC, "--config", config, "--execute", "--once")
        tally.runs += 1
        tally.expect(result.returncode == 1, f"exit {result.returncode} with a full destination (expected 1)")
        tally.expect("12282b" not in recorded(config), "12282b recorded although it did not fit")
        tally.expect("No space left on device" in log_text(facility), "the log does not say the disk is full")
        check_everything(tally, facility, config, result)
        tally.expect(remount(facility.destination, "size=64m"), "could not grow the tmpfs")
        again = run_tool(MXSYNC, "--config", config, "--execute", "--once")
        tally.expect(
            again.returncode == 0 and recorded(config) == {"12282a", "12282b", "12282c"},
            f"after freeing space: exit {again.returncode}, recorded {sorted(recorded(config))}",
        )
        tally.expect(
            all(complete_copy(facility, "ny79", epn) for epn in ("12282a", "12282b", "12282c")), "copies differ"
        )
        check_everything(tally, facility, config, result, again)


def destination_read_only(facility, tally, rng):
    """A read-only destination root: no rsync starts and staff are told at once; a read-only project folder
    fails only its EPN. Writable again, everything completes.

    (Linux refuses to remount a file system read-only while rsync holds a file open for writing, so a
    root turning read-only in the middle of a transfer cannot be staged; a disk filling up can: disk_full.)
    """
    with tmpfs(facility.destination, "64m"):
        add_epns(facility, ["12282a"], frames=2)
        add_epns(facility, ["13000a"])
        config = facility.write_config(epn_cap_map={"12282": "ny79", "13000": "ab12"}, max_tasks=1, rsync_retries=0)
        tally.runs += 1
        # 1. The whole root read-only before the cycle.
        tally.expect(remount(facility.destination, "ro"), "could not remount read-only")
        first = run_tool(MXSYNC, "--config", config, "--execute", "--once")
        tally.expect(first.returncode == 1, f"exit {first.returncode} on a read-only root (expected 1)")
        tally.expect("not writable (Read-only file system)" in log_text(facility), "no 'not writable' line")
        tally.expect(": rsync): rsync" not in log_text(facility), "rsync ran on a read-only root")
        tally.expect(
            wait_for(lambda: facility.smtp.messages, timeout=10) and "destination" in subjects(facility)[0],
            "no immediate alert about the destination",
        )
        tally.expect(remount(facility.destination, "rw"), "could not remount read-write")
        # 2. One project folder read-only: only its EPN fails.
        (facility.destination / "ab12").mkdir()
        with tmpfs(facility.destination / "ab12", "1m"):
            remount(facility.destination / "ab12", "ro")
            second = run_tool(MXSYNC, "--config", config, "--execute", "--once")
        tally.expect(
            second.returncode == 1 and recorded(config) == {"12282a"},
            f"read-only project folder: exit {second.returncode}, recorded {sorted(recorded(config))}",
        )
        tally.expect("13000a: FAILED" in log_text(facility), "no FAILED line for the read-only project folder")
        check_everything(tally, facility, config, first, second)
        third = run_tool(MXSYNC, "--config", config, "--execute", "--once")
        tally.expect(
            third.returncode == 0 and recorded(config) == {"12282a", "13000a"},
            f"writable again: exit {third.returncode}, recorded {sorted(recorded(config))}",
        )
        tally.expect(
            complete_copy(facility, "ny79", "12282a") and complete_copy(facility, "ab12", "13000a"), "copies differ"
        )
        check_everything(tally, facility, config, first, second, third)


def state_disk_full(facility, tally, rng):
    """The file system holding ignore.yml and the state is full: the EPN is transferred but not recorded, nothing
    is lost, nothing crashes; with no room even for the instance lock, one line and exit 2. With room, all is well."""
    add_epns(facility, ["12282a"])
    config = facility.write_config()
    state = ignore_path(config).parent
    with tmpfs(state, "256k"):
        hand_edit(config, {"99999a"})
        (state / "mxsync.lock").write_text("pid 0 on nowhere\n")
        before = ignore_path(config).read_bytes()
        fill(state)
        during = run_tool(MXSYNC, "--config", config, "--execute", "--once")
        tally.runs += 1
        tally.expect(
            during.returncode == 1 and "12282a: FAILED" in log_text(facility) and "cannot record" in log_text(facility),
            f"full state file system: exit {during.returncode}: {during.stderr[-300:]}",
        )
        (state / "mxsync.lock").unlink()
        fill(state)
        start = run_tool(MXSYNC, "--config", config, "--execute", "--once")
        lines = start.stderr.splitlines()
        tally.expect(
            start.returncode == 2 and len(lines) == 1 and "cannot write the instance lock" in lines[0],
            f"no room for the lock: exit {start.returncode}: {start.stderr[-300:]}",
        )
        tally.expect(ignore_path(config).read_bytes() == before, "ignore.yml changed although nothing could be written")
        check_everything(tally, facility, config, during, start, before={"99999a"})
        (state / "filler").unlink()
        again = run_tool(MXSYNC, "--config", config, "--execute", "--once")
        tally.expect(
            again.returncode == 0 and recorded(config) == {"12282a", "99999a"}, "not recorded once there is room"
        )
        check_everything(tally, facility, config, during, start, again, before={"99999a"})


# ---------------------------------------------------------------- the portal

# fault kind, requests it applies to, what the error must say
PORTAL_FAULTS = {
    "http500": (EQUIPMENT_PATH, "HTTP 500"),
    "html": (EQUIPMENT_PATH, "Down for maintenance"),
    "slow": (EQUIPMENT_PATH, "no answer within 1 s"),
    "garbage": (EQUIPMENT_PATH, "not valid JSON"),
    "truncated": (EQUIPMENT_PATH, "not valid JSON"),
    "unauthorized": (EQUIPMENT_PATH, "refused a fresh access token"),
    "close": (EQUIPMENT_PATH, "cannot connect"),
    "token-html": (TOKEN_PATH, "Down for maintenance"),
    "token-500": (TOKEN_PATH, "HTTP 500"),
    "token-garbage": (TOKEN_PATH, "not valid JSON"),
}


def portal_fault(kind):
    """A scenario: the portal keeps answering with `kind`; the run fails cleanly and transfers nothing, status
    shows what it knows and names the fault."""

    def scenario(facility, tally, rng):
        path, expected = PORTAL_FAULTS[kind]
        simulator_kind = {"token-html": "html", "token-500": "http500", "token-garbage": "garbage"}.get(kind, kind)
        add_epns(facility, ["12282a"])
        facility.portal.slow_seconds = 2.5
        # Timeouts take a second each, so no retry for them; the other faults go through the retry path.
        config = facility.write_config(
            portal_retries=0 if kind == "slow" else 1, portal_timeout=1, failure_alert_cycles=1
        )
        facility.portal.add_fault(simulator_kind, path, count=1000)
        run = mxsync_main(["--config", config, "--execute", "--once"])
        status = mxsync_main(["status", "--config", config])
        clear_portal_faults(facility)
        tally.runs += 1
        _expect_clean_failure(tally, "run", run, 1, expected, one_line=False)
        _expect_status_without_portal(tally, status, expected)
        tally.expect("12282a: started" not in log_text(facility), "a transfer started without the portal")
        tally.expect(recorded(config) == set(), "something recorded without the portal")
        portal = failure_entries(config).get("sources portal", {})
        tally.expect(portal.get("failures") == 1, "the portal failure is not counted")
        tally.expect(
            wait_for(lambda: facility.smtp.messages, timeout=10) and "portal" in subjects(facility)[0],
            "no alert about the portal",
        )
        check_everything(tally, facility, config, run, status)

    scenario.__name__ = f"portal_{kind.replace('-', '_')}"
    return scenario


def _expect_clean_failure(tally, what, result, code, expected, one_line):
    """Bad input: the exit code, no traceback, and (for a one-line command) exactly one 'mxsync: error:' line."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    tally.expect(
        result.returncode == code, f"{what}: exit {result.returncode} (expected {code}): {result.stderr[-300:]}"
    )
    tally.expect(any(expected in line for line in lines), f"{what}: no line says {expected!r}: {lines[-3:]}")
    if one_line:
        tally.expect(len(lines) == 1 and lines[0].startswith("mxsync: error: "), f"{what}: not one error line: {lines}")


def _expect_status_without_portal(tally, result, expected):
    """`mxsync status` with the portal failing: what it knows on stdout, and exit 1 with one error line naming the
    portal's fault (so scripts know the view is partial)."""
    _expect_clean_failure(tally, "status", result, 1, expected, one_line=True)
    tally.expect("the portal could not be asked" in result.stderr, f"status: {result.stderr[-300:]!r}")
    tally.expect(result.stdout.startswith("EPN "), f"status printed no table: {result.stdout[:200]!r}")


# Envelopes a broken or hostile portal might send: (status, content type, body or a function making it, what
# the error must say).
HUGE = 65 * 1024 * 1024
PORTAL_ANSWERS = {
    "list-at-top": (200, "application/json", b"[]", "expected a JSON object"),
    "null": (200, "application/json", b"null", "expected a JSON object"),
    "data-is-list": (200, "application/json", b'{"data": []}', "expected {'data': {'visits': [...]}}"),
    "visits-is-object": (200, "application/json", b'{"data": {"visits": {}}}', "expected {'data': {'visits': [...]}}"),
    "visits-null": (200, "application/json", b'{"data": {"visits": null}}', "expected {'data': {'visits': [...]}}"),
    "html-200": (200, "text/html", b"<html><title>Sign in</title><body>Login</body></html>", "Sign in"),
    "empty-200": (200, "application/json", b"", "not valid JSON"),
    "deep-nesting": (200, "application/json", b"[" * 100000 + b"]" * 100000, "not valid JSON"),
    "huge": (200, "application/json", lambda: b'{"data": {"visits": [' + b" " * HUGE + b"]}}", "larger than 64 MiB"),
    "404": (404, "application/json", b'{"meta": {"error_message": "Equipment 23 not found"}}', "HTTP 404"),
}


def portal_answer(kind):
    """A scenario: the visits endpoint answers with a malformed envelope; the run fails with a clear line, status
    names it in a note."""

    def scenario(facility, tally, rng):
        status_code, content_type, body, expected = PORTAL_ANSWERS[kind]
        add_epns(facility, ["12282a"])
        with RawPortal(status_code, content_type, body() if callable(body) else body) as portal:
            config = facility.write_config(base_url=portal.url, portal_retries=0)
            run = mxsync_main(["--config", config, "--execute", "--once"])
            status = mxsync_main(["status", "--config", config])
        tally.runs += 1
        _expect_clean_failure(tally, "run", run, 1, expected, one_line=False)
        _expect_status_without_portal(tally, status, expected)
        tally.expect(recorded(config) == set(), "something recorded from a broken portal answer")
        secrets = secrets_of(facility)
        secrets["raw portal token"] = RawPortal.TOKEN
        tally.scan(outputs(facility, run, status), secrets)

    scenario.__name__ = f"portal_answer_{kind.replace('-', '_')}"
    return scenario


def malformed_visits(facility, tally, rng):
    """Visit records with missing or wrongly typed fields are reported as suspicious; good visits still sync.

    A visit whose start is readable but whose end is not counts as running for LONGEST_VISIT: its own EPN is not
    recorded meanwhile; the other EPNs follow their own visits.
    """
    add_epns(facility, ["12282a"])
    start, end = ENDED["start"].isoformat(), ENDED["end"].isoformat()
    for epn in ("12282b", "12282i", "12282j", "12282k", "12282m"):
        make_experiment(facility.root, "mx", epn, frames=1, frame_size=4096, small_files=0)
    records = [
        {"id": 1, "epn": "12282b", "start_time": start, "end_time": end},  # the bare minimum
        "just a string",
        42,
        None,
        ["12282c"],
        {},
        {"id": 2},  # no EPN at all
        {"epn": 12282, "start_time": start, "end_time": end},
        {"epn": ["12282d"], "start_time": start, "end_time": end},
        {"epn": "12282e", "end_time": end},  # no start
        {"epn": "12282h", "start_time": {"at": start}, "end_time": end},
        {
            "epn": "12282i",
            "start_time": start,
            "end_time": end,
            "principal_scientist": "Dr Who",
            "data_scientists": "all",
        },
        {
            "epn": "12282j",
            "start_time": start,
            "end_time": end,
            "principal_scientist": {"first_names": 7, "email": None},
            "data_scientists": [None, 3, {"last_name": ["x"]}],
        },
        {"epn": "12282k", "start_time": start, "end_time": end, "data_scientists": {"a": 1}, "id": {"x": []}},
    ]
    for record in records:
        facility.portal.add_raw_visit(23, record)
    config = facility.write_config()
    first = mxsync_main(["--config", config, "--execute", "--once"])
    tally.runs += 1
    synced = recorded(config)
    tally.expect(synced == {"12282a", "12282b", "12282i", "12282j", "12282k"}, f"recorded {sorted(synced)}")
    tally.expect(first.returncode == 0, f"exit {first.returncode}: {first.stderr[-300:]}")
    tally.expect(
        log_text(facility).count("Suspicious record from portal equipment 23") >= 9,
        "suspicious records not all reported",
    )
    # A visit with no readable end, started two days ago, may still run: its own EPN is not recorded (it gets live
    # passes, here waiting for data), while 12282m, whose own visit ended a day ago, is (each EPN follows its visits).
    facility.portal.add_raw_visit(
        23, {"epn": "12282f", "start_time": (NOW - timedelta(days=2)).isoformat(), "end_time": 1e9}
    )
    facility.portal.add_visit(23, "12282m", NOW - timedelta(days=1, hours=8), NOW - timedelta(days=1))
    second = mxsync_main(["--config", config, "--execute", "--once"])
    tally.expect(
        "12282f" not in recorded(config) and "12282m" in recorded(config) and second.returncode == 0,
        f"second run: exit {second.returncode}, recorded {sorted(recorded(config))}",
    )
    check_everything(tally, facility, config, first, second)


def odd_times(facility, tally, rng):
    """Times without offset (read as UTC), with odd offsets (+14:00, -12:00, +05:45, +0530, 'z'), or unusable:
    each visit is planned by its real instant; unusable ones are reported and never synced."""
    ended, running = NOW - timedelta(days=2), NOW - timedelta(hours=1)
    visits = {
        "12282a": (ended - timedelta(hours=8), ended, "+14:00"),
        "12282b": (ended - timedelta(hours=8), ended, "-12:00"),
        "12282c": (ended - timedelta(hours=8), ended, "+05:45"),
        "12282d": (ended - timedelta(hours=8), ended, "naive"),
        "12282e": (ended - timedelta(hours=8), ended, "z"),
        "12282f": (ended - timedelta(hours=8), ended, "+0530"),
        "12282g": (running, NOW + timedelta(hours=5), "-12:00"),  # running: not synced
        # Ends in 30 minutes, and in UTC+14 its end "looks" a day ahead: running, and it sets the cut-off.
        "12282h": (running - timedelta(days=1), NOW + timedelta(minutes=30), "+14:00"),
        # Ended 30 minutes ago, but written in UTC-12 its date "looks" like yesterday: after the cut-off, waits.
        "12282i": (running - timedelta(hours=10), NOW - timedelta(minutes=30), "-12:00"),
    }
    records = []
    for epn, (start, end, zone) in visits.items():
        make_experiment(facility.root, "mx", epn, frames=1, frame_size=4096, small_files=0)
        records.append({"epn": epn, "start_time": _in_zone(start, zone), "end_time": _in_zone(end, zone)})
    for epn, text in {
        "12282j": "2024-02-30T00:00:00Z",
        "12282k": "yesterday",
        "12282m": "2024-01-01T00:00:00+25:00",
        "12282n": "",
        "12282p": "2024-01-01T00:00:00+05:45:30.5x",
    }.items():
        make_experiment(facility.root, "mx", epn, frames=1, frame_size=4096, small_files=0)
        records.append({"epn": epn, "start_time": text, "end_time": text})
    with RawPortal(visits=records) as portal:
        config = facility.write_config(base_url=portal.url)
        result = mxsync_main(["--config", config, "--execute", "--once"])
    tally.runs += 1
    synced = recorded(config)
    # The cut-off is 12282h's start (25 h ago): only visits that ended before it count.
    tally.expect(synced == {"12282a", "12282b", "12282c", "12282d", "12282e", "12282f"}, f"recorded {sorted(synced)}")
    tally.expect(result.returncode == 0, f"exit {result.returncode}: {result.stderr[-300:]}")
    tally.expect(all(complete_copy(facility, "ny79", epn) for epn in synced), "a copy differs")
    tally.expect(log_text(facility).count("visit time is not ISO 8601") >= 2 * 5, "unusable times not reported")
    secrets = secrets_of(facility)
    secrets["raw portal token"] = RawPortal.TOKEN
    tally.scan(outputs(facility, result), secrets)
    tally.check_records(facility, config)


def _in_zone(moment, zone):
    if zone in ("naive", "z"):
        return moment.astimezone(timezone.utc).replace(tzinfo=None).isoformat() + ("z" if zone == "z" else "")
    sign = 1 if zone[0] == "+" else -1
    hours, minutes = int(zone[1:3]), int(zone[-2:])
    text = moment.astimezone(timezone(sign * timedelta(hours=hours, minutes=minutes))).isoformat()
    return text if ":" in zone else text[:-3] + text[-2:]  # +0530: no colon in the offset


def huge_answer(facility, tally, rng):
    """A large but legal answer (30 000 visits, most unmapped) is planned normally."""
    add_epns(facility, ["12282a"])
    start, end = ENDED["start"].isoformat(), ENDED["end"].isoformat()
    for number in range(30000):
        facility.portal.add_raw_visit(
            23,
            {
                "id": number,
                "epn": f"{50000 + number}a",
                "start_time": start,
                "end_time": end,
                "principal_scientist": {"first_names": "A", "last_name": "B", "email": "a@b.c"},
            },
        )
    config = facility.write_config(log_level="INFO")
    result = mxsync_main(["--config", config, "--execute", "--once"])
    tally.runs += 1
    tally.expect(
        result.returncode == 0 and recorded(config) == {"12282a"}, f"exit {result.returncode}: {result.stderr[-300:]}"
    )
    tally.expect("30000 unmapped" in log_text(facility), "the plan does not count 30000 unmapped EPNs")
    check_everything(tally, facility, config, result)


# ---------------------------------------------------------------- SMTP


def smtp_refusing(facility, tally, rng):
    """The SMTP server refuses the failure alert: logged, the run goes on; the alert goes out once SMTP works."""
    add_epns(facility, ["12282a", "12282z"])
    # A folder at the destination where one of 12282z's files must go: it fails every cycle.
    frame = min((facility.root / "data/mx/12282z/frames").glob("*.cbf"))
    (facility.destination / "ny79/12282z/data/frames" / frame.name / "in-the-way").mkdir(parents=True)
    config = facility.write_config(failure_alert_cycles=1, **require_smtp_login(facility))
    facility.smtp.fail_with = "554 5.7.1 Message rejected by policy"
    first = run_tool(MXSYNC, "--config", config, "--execute", "--once")
    tally.runs += 1
    tally.expect(
        first.returncode == 1 and recorded(config) == {"12282a"}, f"exit {first.returncode}, {recorded(config)}"
    )
    tally.expect(
        "Could not send the failure alert" in log_text(facility) and "554" in log_text(facility),
        "the refused alert is not logged with the server's answer",
    )
    facility.smtp.fail_with = None
    second = run_tool(MXSYNC, "--config", config, "--execute", "--once")
    tally.expect(
        wait_for(lambda: facility.smtp.messages, timeout=10) and "12282z" in subjects(facility)[0],
        "the alert was not sent once SMTP accepted mail",
    )
    tally.expect(facility.smtp.messages[0].login == SMTP_LOGIN[0] if facility.smtp.messages else False, "no SMTP login")
    check_everything(tally, facility, config, first, second)


# ---------------------------------------------------------------- the service keeps going


def service_under_faults(facility, tally, rng):
    """The real service loop (a cycle every 3.6 s) through a fault per cycle, then SIGTERM mid-transfer.

    1 portal down + SMTP refusing; 2 portal down, config.yml made invalid, SMTP back (alert sent);
    3 host key changed (alert); 4 destination unusable (alert at once); 5 one EPN blocked at the
    destination while the others sync (alert); 6 a slow new EPN, SIGTERM in the middle of it.
    """
    add_epns(facility, ["12282a", "12282b", "12282c"])
    smtp = require_smtp_login(facility)
    options = dict(
        sync_frequency_hours=0.001,
        failure_alert_cycles=1,
        portal_retries=1,
        ssh_connect_timeout=3,
        rsync_retries=0,
        max_tasks=2,
        **smtp,
    )
    config = facility.write_config(**options)
    facility.portal.add_fault("html", EQUIPMENT_PATH, count=4)  # two attempts per cycle, two cycles
    facility.smtp.fail_with = "451 4.3.0 Mail server temporarily unavailable"
    with contextlib.ExitStack() as mounts:
        # As root the destination is a tmpfs that cycle 4 makes read-only; otherwise cycle 4 moves it away.
        mounted = IS_ROOT and mounts.enter_context(tmpfs(facility.destination, "64m"))
        _service_cycles(facility, tally, rng, config, options, mounted)


def _service_cycles(facility, tally, rng, config, options, mounted):
    process = start_tool(MXSYNC, "--config", config, "--execute")
    try:

        def after_cycle(number):
            reached = wait_for(lambda: cycles_finished(facility) >= number, process, timeout=60)
            return tally.expect(reached, f"cycle {number} never finished (exit {process.poll()})")

        if after_cycle(1):
            facility.smtp.fail_with = None
            facility.write_config(**dict(options, max_tasks="lots"))
        if after_cycle(2):
            facility.write_config(**options)
            facility.sshd.regenerate_host_key()
        if after_cycle(3):
            facility.sshd.stop()
            facility.sshd.regenerate_host_key(update_known_hosts=True)
            facility.sshd.start()
            if mounted:
                remount(facility.destination, "ro")
            else:
                facility.destination.rename(facility.destination.with_name("destination-away"))
        if after_cycle(4):
            if mounted:
                remount(facility.destination, "rw")
            else:
                facility.destination.with_name("destination-away").rename(facility.destination)
            frame = sorted((facility.root / "data/mx/12282b/frames").glob("*.cbf"))[0]
            (facility.destination / "ny79/12282b/data/frames" / frame.name / "in-the-way").mkdir(parents=True)
        if after_cycle(5):
            add_epns(facility, ["12282d"], frames=4, frame_size=512 * 1024)
            facility.write_config(**dict(options, rsync_bwlimit="256"))
            wait_for(log_has(facility, "12282d: started"), process, timeout=60)
            time.sleep(rng.uniform(0.2, 1.5))
        process.send_signal(signal.SIGTERM)
        result = finish(process, timeout=30)
    finally:
        if process.poll() is None:
            kill_group(process)
            process.wait()
        reap_control_masters(facility)
        if mounted:
            remount(facility.destination, "rw")
    tally.runs += 1
    log = log_text(facility)
    tally.expect(result.returncode == 0, f"exit {result.returncode} after SIGTERM (expected 0): {result.stderr[-500:]}")
    tally.expect(cycles_finished(facility) == 6, f"{cycles_finished(facility)} cycles finished (expected 6)")
    for evidence in (
        "Down for maintenance",
        "Could not send the failure alert",
        "config.yml changed but is invalid",
        "12282b: FAILED",
        "12282d: stopped before it finished; nothing recorded",
        "mxsync stopped",
    ):
        tally.expect(evidence in log, f"the log lacks {evidence!r}")
    tally.expect(
        "REMOTE HOST IDENTIFICATION HAS CHANGED" in log or "Host key verification failed" in log, "no host key line"
    )
    tally.expect(("not writable" if mounted else "does not exist") in log, "no destination line")
    tally.expect(recorded(config) == {"12282a", "12282c"}, f"recorded {sorted(recorded(config))}")
    tally.expect(all(complete_copy(facility, "ny79", epn) for epn in ("12282a", "12282c")), "a copy differs")
    tally.expect(not rsync_processes(facility.destination), "rsync left running")
    wait_for(lambda: len(facility.smtp.messages) >= 4, timeout=10)
    alerts = subjects(facility)
    for topic in ("portal", "ssh", "destination", "12282b"):
        tally.expect(any(topic in subject for subject in alerts), f"no alert about {topic}: {alerts}")
    check_everything(tally, facility, config, result)


# ---------------------------------------------------------------- hostile names

HOSTILE_EPNS = [
    "../../12282a",
    "12282a/../../x",
    "/etc/passwd",
    "..",
    ".",
    "",
    " 12282a",
    "12282a ",
    "12282 a",
    "-e touch pwned",
    "--rsh=sh -c 'touch pwned'",
    "-12282a",
    "12282a\n",
    "12282a\nrm -rf /",
    "12282a;touch pwned",
    "12282a$(touch pwned)",
    "12282a`touch pwned`",
    "12282a|touch pwned",
    "12282a&&touch pwned",
    "12282a*",
    "12282?",
    "１２２８２a",
    "12282а",
    "12282ａ",
    "12282a\u200b",
    "12282a\u202e",
    "12282a\x00",
    "1" * 300 + "a",
    "12282" + "a" * 300,
    "%2e%2e%2f12282a",
    "12282a/",
    "~root",
    "12282A",
]

HOSTILE_FILES = [
    "-rf",
    "--delete",
    "-e sh",
    "--rsh=touch pwned",
    "new\nline",
    "tab\tname",
    " leading space",
    "trailing space ",
    "...",
    "..a",
    "..\\..\\x",
    "$(touch pwned)",
    "`touch pwned`",
    ";touch pwned",
    "a|b",
    "a&b",
    "x\\#012y",
    "caf\u00e9",
    "\u202eexe.cbf",
    "L" * 255,
]


def hostile_portal_names(facility, tally, rng):
    """Hostile EPN names from the portal never become paths or rsync arguments; the good EPN still syncs."""
    add_epns(facility, ["12282a"])
    for name in HOSTILE_EPNS:
        facility.portal.add_raw_visit(
            23, {"epn": name, "start_time": ENDED["start"].isoformat(), "end_time": ENDED["end"].isoformat()}
        )
    config = facility.write_config()
    outside = outside_destination(facility)
    result = run_tool(MXSYNC, "--config", config, "--execute", "--once")
    tally.runs += 1
    tally.expect(result.returncode == 0, f"exit {result.returncode}: {result.stderr[-300:]}")
    tally.expect(recorded(config) == {"12282a"}, f"recorded {sorted(recorded(config))}")
    tally.expect(outside_destination(facility) == outside, "something outside the destination changed")
    tally.expect(
        sorted(os.listdir(facility.destination)) == ["ny79"], f"destination: {os.listdir(facility.destination)}"
    )
    tally.expect(os.listdir(facility.destination / "ny79") == ["12282a"], "more than 12282a under ny79")
    _expect_safe_rsync_argv(tally, facility, config, {"12282a"})
    _expect_no_canary(tally, facility)
    tally.expect(
        log_text(facility).count("Suspicious record from portal equipment 23") == len(HOSTILE_EPNS),
        "not every hostile name was reported as suspicious",
    )
    check_everything(tally, facility, config, result)


def _expect_safe_rsync_argv(tally, facility, config, epns):
    """Every rsync transfer in the DEBUG log copies exactly host:source/EPN/ into root/project/EPN/data/."""
    commands = rsync_commands(log_text(facility))
    tally.expect(commands, "no rsync command line in the DEBUG log")
    for command in commands:
        problems = unexpected_rsync_arguments(
            command,
            f"{facility.sshd.username}@{facility.sshd.host}",
            f"{facility.root}/data/mx",
            str(facility.destination),
            epns,
        )
        tally.expect(not problems, f"rsync argument list: {problems}")


def _expect_no_canary(tally, facility):
    for place in (facility.workdir.parent, Path.cwd(), Path("/tmp"), Path("/")):
        tally.expect(not (place / "pwned").exists(), f"{place / 'pwned'} exists: a name reached a shell")


def hostile_file_names(facility, tally, rng):
    """Hostile file names inside an EPN arrive as plain files; symlinks are not followed, out or in."""
    experiment = facility.add_experiment("mx", "12282a", equipment_id=23, frames=1, frame_size=4096, small_files=1)
    outside = facility.workdir / "outside"  # outside the destination and the facility's data
    outside.mkdir()
    (outside / "secret.txt").write_text("OUTSIDE-CONTENT-must-not-be-copied\n")
    for number, name in enumerate(HOSTILE_FILES):
        (experiment / "frames" / name).write_bytes(f"hostile {number}\n".encode())
    (experiment / os.fsdecode(b"bad\xff\xfename")).write_bytes(b"not utf-8 name\n")
    os.symlink(outside / "secret.txt", experiment / "frames" / "link-out.cbf")
    os.symlink(outside, experiment / "dir-link-out")
    os.symlink("../../../../../../../../etc/passwd", experiment / "relative-link")
    os.mkfifo(experiment / "frames" / "a-fifo")
    # Planted at the destination before the sync: symlinks that would lead writes outside.
    data = facility.destination / "ny79" / "12282a" / "data"
    (data / "frames").mkdir(parents=True)
    os.symlink(outside, data / "home")
    os.symlink(outside / "secret.txt", data / "frames" / "-rf")
    config = facility.write_config()
    before = outside_destination(facility)
    result = run_tool(MXSYNC, "--config", config, "--execute", "--once")
    tally.runs += 1
    tally.expect(result.returncode == 0, f"exit {result.returncode}: {result.stderr[-400:]}")
    tally.expect(recorded(config) == {"12282a"}, "12282a not recorded")
    expected, got = manifest(experiment), manifest(data, include=None)
    tally.expect(
        got == expected,
        f"destination differs: missing {sorted(set(expected) - set(got))[:3]}, "
        f"extra {sorted(set(got) - set(expected))[:3]}",
    )
    links = [str(path) for path in data.rglob("*") if path.is_symlink()]
    tally.expect(not links, f"symlinks at the destination: {links}")
    tally.expect(all(b"OUTSIDE-CONTENT" not in (data / path).read_bytes() for path in got), "outside content copied")
    tally.expect(outside_destination(facility) == before, "something outside the destination changed")
    _expect_safe_rsync_argv(tally, facility, config, {"12282a"})
    _expect_no_canary(tally, facility)
    check_everything(tally, facility, config, result)


HOSTILE_PROJECTS = [
    "..",
    "../x",
    "/etc",
    "ny79/../../x",
    "ny79/",
    "ny 79",
    " ny79",
    "ny79\n",
    "-rf",
    "--delete",
    "$(touch pwned)",
    "ny79;touch pwned",
    "ny79`id`",
    "ｎｙ７９",
    "ny79\u200b",
    "ny\u202e97",
    "a" * 300,
    ".hidden",
    "",
    "~root",
    "ny..79",
    ["ny79"],
    {"ny": 79},
]  # None (unmapped, with a warning) and 79 (folder '79') are what HPC ASSyncy accepted: see tests/test_compat.py


def hostile_projects(facility, tally, rng):
    """A hostile project folder in epn_cap_map stops mxsync and epnalert with one line per problem, exit 2,
    before anything is written: no destination folder, no state file, no log."""
    from epnalert.cli import main as epnalert_main
    from tests.faults import run_in_process

    add_epns(facility, ["12282a"])
    for project in HOSTILE_PROJECTS:
        config = facility.write_config(epn_cap_map={"12282": project, "13000": "ab12"})
        before = outside_destination(facility)
        results = [
            mxsync_main(["--config", config, "--execute", "--once"]),
            run_in_process(epnalert_main, ["--config", config]),
        ]
        tally.runs += 1
        for program, result in zip(("mxsync", "epnalert"), results):
            lines = result.stderr.splitlines()
            tally.expect(
                result.returncode == 2
                and lines
                and all(line.startswith(f"{program}: error: ") for line in lines)
                and any("epn_cap_map.12282" in line for line in lines),
                f"{project!r}: {program} exit {result.returncode}, stderr {result.stderr[:300]!r}",
            )
        tally.expect(not any(facility.destination.iterdir()), f"{project!r}: something written at the destination")
        tally.expect(outside_destination(facility) == before, f"{project!r}: something changed outside the destination")
        tally.expect(
            not any(any((facility.workdir / folder).iterdir()) for folder in ("state", "log")),
            f"{project!r}: a state or log file was written",
        )
        _expect_no_canary(tally, facility)
        tally.scan(outputs(facility, *results), secrets_of(facility))


# ---------------------------------------------------------------- epnalert


def _epnalert(config, *arguments):
    from epnalert.cli import main as epnalert_main
    from tests.faults import run_in_process

    return run_in_process(epnalert_main, ["--config", config, *arguments])


def _alert_text(facility):
    """The text part of the first alert received, or '' if none came."""
    if not wait_for(lambda: facility.smtp.messages, timeout=10):
        return ""
    return facility.smtp.messages[0].message.get_body(("plain",)).get_content()


HOSTILE_FOLDERS = [
    "-rf",
    "--delete",
    "new\nline",
    " 20001a",
    "20001a ",
    "$(touch pwned)",
    "a;touch pwned",
    "`id`",
    "２００１a",
    "20001а",
    "<script>alert(1)",
    "<img src=x onerror=alert(1)>",
    "..a",
    "x" * 250,
    "20001A",
    "20001a\u202e",
]


def epnalert_hostile_folders(facility, tally, rng):
    """Hostile folder names on SFTP are reported as suspicious, escaped in the HTML part, and reach nothing else."""
    from bs4 import BeautifulSoup

    facility.add_experiment("mx", "20001a", equipment_id=23, frames=1, small_files=0)
    listing = facility.root / "data" / "mx"
    for name in HOSTILE_FOLDERS:
        (listing / name).mkdir()
    (listing / "20002a").write_text("a file where a folder should be\n")
    os.symlink(facility.workdir, listing / "20003a")
    config = facility.write_config(**require_smtp_login(facility))
    before = outside_destination(facility)
    result = _epnalert(config, "-v")
    tally.runs += 1
    tally.expect(result.returncode == 0, f"exit {result.returncode}: {result.stderr[-300:]}")
    text = _alert_text(facility)
    tally.expect("20001a" in text, "the real unknown EPN is not in the alert")
    html = facility.smtp.messages[0].message.get_body(("html",)).get_content() if facility.smtp.messages else ""
    page = BeautifulSoup(html, "html.parser")
    tally.expect(html and page.find("script") is None and page.find("img") is None, "a folder name became HTML")
    for name in ("<script>alert(1)", "<img src=x onerror=alert(1)>", "$(touch pwned)", "-rf", "..a"):
        tally.expect(name in text or repr(name) in text, f"suspicious folder {name!r} not reported in the alert")
    tally.expect(outside_destination(facility) == before, "something changed outside the tools' own files")
    tally.expect(not any(facility.destination.iterdir()), "epnalert wrote at the destination")
    _expect_no_canary(tally, facility)
    tally.scan(outputs(facility, result), secrets_of(facility))


def epnalert_undecodable_folder(facility, tally, rng):
    """A folder name that is not UTF-8 makes that SFTP listing fail cleanly: epnalert still alerts from the portal
    and says why, `mxsync check --connect` prints a FAILED line."""
    facility.add_experiment("mx", "20001a", equipment_id=23, frames=1, small_files=0)
    os.mkdir(os.fsencode(facility.root / "data" / "mx") + b"/bad\xff\xfename")
    config = facility.write_config()
    result = _epnalert(config)
    tally.runs += 1
    tally.expect(result.returncode == 0, f"exit {result.returncode}: {result.stderr[-400:]}")
    banner = _alert_text(facility).split("\n\n")[0]
    tally.expect("THIS LIST MAY BE INCOMPLETE" in banner and "not UTF-8" in banner, f"banner: {banner[:300]!r}")
    check = mxsync_main(["check", "--config", config, "--connect"])
    tally.expect(
        check.returncode == 1
        and any(
            line.startswith("FAILED  SSH login and SFTP listing") and "not UTF-8" in line
            for line in check.stdout.splitlines()
        ),
        f"check --connect: {check.stdout}",
    )
    tally.scan(outputs(facility, result, check), secrets_of(facility))


EPNALERT_PORTAL_FAULTS = {
    "slow": "no answer within 1 s",
    "truncated": "not valid JSON",
    "unauthorized": "refused a fresh access token",
    "close": "cannot connect",
    "token-html": "Down for maintenance",
}


def epnalert_portal_fault(kind):
    """A scenario: the portal keeps failing with `kind`; epnalert alerts from SFTP and the banner names the fault."""

    def scenario(facility, tally, rng):
        facility.add_experiment("mx", "20001a", equipment_id=23, frames=1, small_files=0)
        facility.portal.slow_seconds = 2.5
        path = TOKEN_PATH if kind.startswith("token-") else EQUIPMENT_PATH
        facility.portal.add_fault(kind.replace("token-", ""), path, count=1000)
        config = facility.write_config(portal_retries=0 if kind == "slow" else 1, portal_timeout=1)
        result = _epnalert(config)
        clear_portal_faults(facility)
        tally.runs += 1
        tally.expect(result.returncode == 0, f"exit {result.returncode}: {result.stderr[-300:]}")
        banner = _alert_text(facility).split("\n\n")[0]
        tally.expect(
            "THIS LIST MAY BE INCOMPLETE" in banner and EPNALERT_PORTAL_FAULTS[kind] in banner,
            f"banner: {banner[:300]!r}",
        )
        tally.expect(
            all(line.startswith("WARNING") for line in result.stderr.splitlines() if line.strip()),
            f"stderr beyond the source warning: {result.stderr[:300]!r}",
        )
        tally.scan(outputs(facility, result), secrets_of(facility))

    scenario.__name__ = f"epnalert_portal_{kind.replace('-', '_')}"
    return scenario


def epnalert_smtp_login_refused(facility, tally, rng):
    """The SMTP server refuses our login: exit 1, one line, the password nowhere; the right one works at DEBUG."""
    facility.add_experiment("mx", "20001a", equipment_id=23, frames=1, small_files=0)
    good = require_smtp_login(facility)
    wrong = dict(good, epnalert_email_smtp_password="wrong-smtp-pw-S3CRET-5")
    refused = _epnalert(facility.write_config(**wrong), "-v")
    tally.runs += 1
    lines = [line for line in refused.stderr.splitlines() if line.startswith("epnalert: error: ")]
    tally.expect(
        refused.returncode == 1 and len(lines) == 1 and "refused the login" in lines[0],
        f"exit {refused.returncode}: {refused.stderr[-300:]}",
    )
    accepted = _epnalert(facility.write_config(**good), "-v")
    tally.expect(accepted.returncode == 0 and facility.smtp.messages, f"exit {accepted.returncode}")
    secrets = secrets_of(facility)
    secrets["wrong SMTP password"] = wrong["epnalert_email_smtp_password"]
    tally.scan(outputs(facility, refused, accepted), secrets)


# ---------------------------------------------------------------- promise 2: edits while the service records


def scripted_hand_edits(facility, tally, rng):
    """A script edits ignore.yml every few milliseconds during a 10-EPN pass, in place (truncate, write), holding
    `flock ignore.yml.lock` as the README asks of scripts: no edit of it and no record of mxsync is ever lost."""
    import fcntl
    import threading

    import yaml

    epns = [f"12282{letter}" for letter in "abcdefghij"]
    add_epns(facility, epns)
    config = facility.write_config(max_tasks=2)
    path = ignore_path(config)
    hand_edit(config, {"99999a"})
    added, removed, stop = set(), set(), threading.Event()

    def edit_forever():
        number = 0
        while not stop.is_set():
            with open(path.with_name(path.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                entries = {str(e) for e in (yaml.safe_load(path.read_text()) or {}).get("previouslySynched") or []}
                number += 1
                entry = f"{90000 + number}z"
                entries.add(entry)
                added.add(entry)
                if rng.random() < 0.3 and added - removed - {entry}:
                    gone = rng.choice(sorted(added - removed - {entry}))
                    entries.discard(gone)
                    removed.add(gone)
                with open(path, "w") as file:  # in place: truncate, then write
                    file.write("previouslySynched:\n")
                    file.flush()
                    time.sleep(0.001)  # a slow editor: the file is briefly empty
                    file.write("".join(f"- {item}\n" for item in sorted(entries)))
                fcntl.flock(lock, fcntl.LOCK_UN)
            time.sleep(rng.uniform(0.0, 0.02))

    editor = threading.Thread(target=edit_forever, daemon=True)
    editor.start()
    result = run_tool(MXSYNC, "--config", config, "--execute", "--once")
    stop.set()
    editor.join()
    tally.runs += 1
    final = recorded(config)
    tally.expect(result.returncode == 0, f"exit {result.returncode}: {result.stderr[-300:]}")
    tally.expect(len(added) > 20, f"only {len(added)} edits were made during the pass")
    tally.lost += [f"hand-added {entry} lost" for entry in sorted(added - removed - final)]
    tally.lost += [f"{epn} (recorded by mxsync) lost" for epn in epns if epn not in final]
    tally.expect(not (removed & final), f"hand-removed entries came back: {sorted(removed & final)}")
    tally.expect("99999a" in final, "the entry written before the pass was lost")
    check_everything(tally, facility, config, result)


# ---------------------------------------------------------------- promise 1: the source changes under the transfer


def source_grows_mid_transfer(facility, tally, rng):
    """A file of the EPN grows at the facility while rsync sends it (auto-processing still writing after the
    visit ended): the copy then lacks the new bytes, so the EPN must not be recorded until a later pass has them."""
    experiment = facility.add_experiment("mx", "12282a", equipment_id=23, frames=2, frame_size=768 * 1024, **ENDED)
    config = facility.write_config(rsync_bwlimit="512", rsync_retries=0)
    process = start_tool(MXSYNC, "--config", config, "--execute", "--once")
    data = facility.destination / "ny79" / "12282a" / "data" / "frames"
    # The first frame is on its way (rsync's temporary file exists): the file grows at the source.
    tally.expect(
        wait_for(lambda: any(data.glob(".12282a_0001.cbf.*")), process, timeout=30), "the transfer never started"
    )
    time.sleep(rng.uniform(0.0, 0.5))
    with open(experiment / "frames" / "12282a_0001.cbf", "ab") as growing:
        growing.write(os.urandom(rng.randint(1, 64 * 1024)))
    result = finish(process)
    tally.runs += 1
    check_everything(tally, facility, config, result)
    again = run_tool(MXSYNC, "--config", config, "--execute", "--once")
    tally.expect(
        again.returncode == 0 and "12282a" in recorded(config) and complete_copy(facility, "ny79", "12282a"),
        f"the next pass did not complete 12282a (exit {again.returncode})",
    )
    check_everything(tally, facility, config, result, again)


# ---------------------------------------------------------------- signals a user sends (issue 10, items 3 and 4)


def _shared_connection_dirs(facility):
    """The folders of the shared ssh connections mxsync holds open for this facility now."""
    return {directory for directory in control_masters(facility).values() if directory is not None}


def _expect_a_stop(tally, facility, config, result, name, connection_dirs):
    """A stop the user asked for: not a failure, not counted, not alerted, and nothing of mxsync's left running."""
    log, cycle = log_text(facility), last_cycle(config)
    # The cycle's summary accounts for every EPN it planned (`mxsync status` shows it).
    accounted = (
        cycle.get("synced", 0)
        + cycle.get("live", 0)
        + sum(len(cycle.get(key, ())) for key in ("failed", "stopped", "waiting"))
    )
    tally.expect(
        cycle and accounted == cycle.get("planned"),
        f"after {name}, the last cycle leaves planned EPNs unaccounted for: {cycle}",
    )
    if f"Received {name}" in log:  # --once exits 1 when stopped, whatever it finished (README, "mxsync --once")
        tally.expect(
            result.returncode == 1, f"exit {result.returncode} after {name} (expected 1): {result.stderr[-300:]}"
        )
        tally.expect(f"mxsync stopped: {name} received" in log, f"the log does not say mxsync stopped on {name}")
    else:  # the pass ended before the signal
        complete = cycle.get("synced", 0) + len(cycle.get("waiting", ())) == cycle.get("planned")
        tally.expect(result.returncode == (0 if complete else 1), f"exit {result.returncode}: {result.stderr[-300:]}")
    failed = [line for line in log.splitlines() if "FAILED" in line]
    tally.expect(not failed, f"a stop logged as a failure: {failed[:2]}")
    tally.expect(not failure_entries(config), f"the state store counts failures: {sorted(failure_entries(config))}")
    tally.expect(not facility.smtp.messages, f"alert sent after a stop: {subjects(facility)}")
    left = tools_gone(facility)
    tally.expect(not left, f"left running after {name}: {sorted(left.values())[:3]}")
    _expect_connection_dirs_gone(tally, connection_dirs)


def _expect_connection_dirs_gone(tally, connection_dirs):
    """mxsync removed the folders of its shared connections; any it left is counted, then removed (it is ours)."""
    left = [directory for directory in connection_dirs if directory.exists()]
    tally.expect(not left, f"a shared connection's folder was left: {left}")
    for directory in left:
        with contextlib.suppress(OSError):
            for leftover in directory.iterdir():
                leftover.unlink()
            directory.rmdir()


def _expect_next_pass_completes(tally, facility, config, epns, *results, before=frozenset()):
    again = run_tool(MXSYNC, "--config", config, "--execute", "--once")
    tally.expect(
        again.returncode == 0 and epns <= recorded(config),
        f"the next pass: exit {again.returncode}, recorded {sorted(recorded(config))}",
    )
    tally.expect(all(complete_copy(facility, "ny79", epn) for epn in epns), "a copy differs after the next pass")
    check_everything(tally, facility, config, *results, again, before=before)


def sigint(group, moment):
    """A scenario: SIGINT to mxsync --once (alone, or its whole process group as a terminal's Ctrl-C does) at
    `moment` (transfer, record, last record, connect): "stopped", never a failure, nothing left running."""

    def scenario(facility, tally, rng):
        moments = {
            "transfer": _sigint_mid_transfer,
            "record": _sigint_mid_record,
            "last record": _sigint_after_last_record,
            "connect": _sigint_mid_connect,
        }
        moments[moment](facility, tally, rng, group)

    scenario.__name__ = f"sigint_{'group' if group else 'process'}_mid_{moment.replace(' ', '_')}"
    return scenario


def _sigint_mid_transfer(facility, tally, rng, group):
    config, process = _start_slow_pass(facility, tally, failure_alert_cycles=1)
    connection_dirs = _shared_connection_dirs(facility)
    time.sleep(rng.uniform(0.0, 1.0))
    signal_tool(process, signal.SIGINT, group)
    result = finish(process, timeout=30)  # a hang guard: it stops within a second or two
    tally.runs += 1
    tally.expect(
        "12282a: stopped before it finished; nothing recorded" in log_text(facility), "no 'stopped' line for 12282a"
    )
    tally.expect("12282a" not in recorded(config), "12282a recorded although SIGINT stopped its transfer")
    _expect_a_stop(tally, facility, config, result, "SIGINT", connection_dirs)
    check_everything(tally, facility, config, result)
    _expect_next_pass_completes(tally, facility, config, {"12282a", "12282b"}, result)


def _sigint_mid_record(facility, tally, rng, group):
    """SIGINT while ignore.yml is being written: at the first moment its temporary file exists from a random
    record of the pass on (or, if no poll catches one in flight, just after that record)."""
    add_epns(facility, KILL_SMALL)
    config = facility.write_config(max_tasks=2, failure_alert_cycles=1)
    hand_edit(config, HAND_ENTRIES)
    ignore = ignore_path(config)
    process = start_tool(MXSYNC, "--config", config, "--execute", "--once")
    tally.expect(wait_for(log_has(facility, ": started,"), process), "no transfer started")
    connection_dirs = _shared_connection_dirs(facility)
    target, records, last, caught = rng.randint(1, 4), 0, inode(ignore), False
    while process.poll() is None and records <= target:
        if records >= target - 1 and record_in_flight(ignore):
            caught = True
            break
        now = inode(ignore)
        if now != last:
            records, last = records + 1, now
        time.sleep(0.0002)
    signal_tool(process, signal.SIGINT, group)
    result = finish(process, timeout=30)
    tally.runs += 1
    tally.note(
        "SIGINT while ignore.yml was being written"
        if caught
        else "SIGINT just after a record"
        if "Received SIGINT" in log_text(facility)
        else "the pass ended before the SIGINT"
    )
    log = log_text(facility)
    for epn in KILL_SMALL:
        if f"{epn}: started" in log and epn not in recorded(config):
            tally.expect(
                f"{epn}: stopped before it finished; nothing recorded" in log, f"{epn} neither recorded nor stopped"
            )
    _expect_a_stop(tally, facility, config, result, "SIGINT", connection_dirs)
    check_everything(tally, facility, config, result, before=HAND_ENTRIES)
    _expect_next_pass_completes(tally, facility, config, set(KILL_SMALL), result, before=HAND_ENTRIES)


def _sigint_after_last_record(facility, tally, rng, group):
    """SIGINT the moment the pass has recorded its last EPN and saved its history, just before it closes the
    shared connection, whose ssh master is slow to exit (held with SIGSTOP for 0.3 s, as a loaded machine may
    hold it for a few ms): the records stand, and mxsync ends as after any stop, without a traceback."""
    epns = ["12282a", "12282b"]
    add_epns(facility, epns)
    config = facility.write_config(failure_alert_cycles=1)
    ignore = ignore_path(config)
    process = start_tool(MXSYNC, "--config", config, "--execute", "--once")
    tally.expect(wait_for(log_has(facility, ": started,"), process), "no transfer started")
    connection_dirs, masters = _shared_connection_dirs(facility), list(control_masters(facility))
    log = ignore.with_name("mxsync.db-wal")  # the state store's log: every write of the history appends to it
    records, last = 0, inode(ignore)
    while process.poll() is None and records < len(epns):
        now = inode(ignore)
        if now != last:
            records, last = records + 1, now
        time.sleep(0.0002)
    # After the last record mxsync saves that EPN's history, then closes the shared connection: signal in between,
    # with the master connection slow to exit (stopped for a moment, as on a loaded machine).
    saved = _signature(log)
    while process.poll() is None and _signature(log) == saved:
        time.sleep(0.0002)
    for pid in masters:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    signal_tool(process, signal.SIGINT, group)
    time.sleep(0.3)
    for pid in masters:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    result = finish(process, timeout=30)
    tally.runs += 1
    tally.note(
        "SIGINT as the connection closes"
        if "Received SIGINT" in log_text(facility)
        else "the pass ended before the SIGINT"
    )
    _expect_a_stop(tally, facility, config, result, "SIGINT", connection_dirs)
    check_everything(tally, facility, config, result)
    _expect_next_pass_completes(tally, facility, config, set(epns), result)


def _signature(path):
    """What changes whenever a file is written to: its modification time and size (None if it is not there)."""
    try:
        details = path.stat()
    except OSError:
        return None
    return details.st_mtime_ns, details.st_size


def _sigint_mid_connect(facility, tally, rng, group):
    """SIGINT while the shared ssh connection starts (the plan made, no transfer begun): every planned EPN is
    stopped, none recorded, and --once says so with exit 1."""
    add_epns(facility, ["12282a", "12282b"])
    config = facility.write_config(failure_alert_cycles=1)
    process = start_tool(MXSYNC, "--config", config, "--execute", "--once")
    tally.expect(
        wait_for(log_has(facility, "Running (shared ssh connection)"), process), "no shared connection started"
    )
    time.sleep(rng.uniform(0.0, 0.1))
    connection_dirs = _shared_connection_dirs(facility)
    early = ": started," not in log_text(facility)
    signal_tool(process, signal.SIGINT, group)
    result = finish(process, timeout=30)
    tally.runs += 1
    tally.note("SIGINT before any transfer started" if early else "SIGINT after a transfer had started")
    tally.expect(
        not early or recorded(config) == set(),
        f"recorded {sorted(recorded(config))} although stopped before transferring",
    )
    _expect_a_stop(tally, facility, config, result, "SIGINT", connection_dirs)
    check_everything(tally, facility, config, result)
    _expect_next_pass_completes(tally, facility, config, {"12282a", "12282b"}, result)


def sighup(group):
    """A scenario: SIGHUP to the service (alone, or its process group) mid-transfer: it logs the reload, keeps
    running, the transfer completes and is recorded, the changed config is applied; SIGTERM then stops it."""

    def scenario(facility, tally, rng):
        add_epns(facility, ["12282a"], frames=3, frame_size=512 * 1024)
        options = {"rsync_bwlimit": "512", "sync_frequency_hours": 24, "failure_alert_cycles": 1}
        config = facility.write_config(**options)
        process = start_tool(MXSYNC, "--config", config, "--execute")
        try:
            tally.expect(wait_for(log_has(facility, "12282a: started"), process), "12282a never started")
            partial = facility.destination / "ny79" / "12282a" / "data"
            wait_for(lambda: any(path.is_file() for path in partial.rglob("*")), process, timeout=20)
            time.sleep(rng.uniform(0.0, 1.0))
            facility.write_config(**{**options, "failure_alert_cycles": 2})  # what the reload must pick up
            tally.expect("12282a" not in recorded(config), "12282a was recorded before the SIGHUP: not mid-transfer")
            signal_tool(process, signal.SIGHUP, group)
            tally.expect(
                wait_for(log_has(facility, "Received SIGHUP: reloading the configuration"), process, timeout=30),
                "no line says SIGHUP was received",
            )
            tally.expect(
                wait_for(lambda: "12282a" in recorded(config), process), "12282a not recorded after the SIGHUP"
            )
            tally.expect(
                wait_for(log_has(facility, "Configuration reloaded from"), process), "the new config was not loaded"
            )
            tally.expect(process.poll() is None, f"the service exited after SIGHUP (exit {process.poll()})")
            connection_dirs = _shared_connection_dirs(facility)
            signal_tool(process, signal.SIGTERM, group)
            result = finish(process, timeout=30)
        finally:
            if process.poll() is None:
                kill_group(process)
                process.wait()
        tally.runs += 1
        log = log_text(facility)
        tally.expect(
            result.returncode == 0, f"exit {result.returncode} after SIGTERM (expected 0): {result.stderr[-300:]}"
        )
        tally.expect(
            log.count("12282a: started") == 1 and "12282a: synced and verified" in log,
            "the transfer did not complete in one go",
        )
        for unwanted in ("stopped before it finished", "FAILED", "retrying in"):
            tally.expect(unwanted not in log, f"the log says {unwanted!r} after a SIGHUP")
        tally.expect("mxsync stopped: SIGTERM received" in log, "the log does not say mxsync stopped on SIGTERM")
        tally.expect(complete_copy(facility, "ny79", "12282a"), "12282a differs from the source")
        tally.expect(not failure_entries(config) and not facility.smtp.messages, "a failure counted or alerted")
        left = tools_gone(facility)
        tally.expect(not left, f"left running after SIGTERM: {sorted(left.values())[:3]}")
        _expect_connection_dirs_gone(tally, connection_dirs)
        check_everything(tally, facility, config, result)

    scenario.__name__ = f"sighup_{'group' if group else 'process'}"
    return scenario


# ---------------------------------------------------------------- refused rsync options (issue 10, item 5)

REFUSED_RSYNC_OPTIONS = [
    "--del",
    "--delete-after",
    "--delete-excluded",
    "-essh",
    "-an",
    "--rsync-path=x",
    "--remote-option=--remove-source-files",
    "--only-write-batch=x",
    "--list-only",
    "-q",
    "--out-format=%n",
]
SCIENTISTS_NOTES = "analysis_notes.txt"


def refused_rsync_options(facility, tally, rng):
    """Each option rsync-options must refuse stops `mxsync check` and `mxsync --execute --once` with one line
    naming it, exit 2, before anything runs: a scientist's file in the EPN's data/ survives. An allowed
    option then syncs the EPN and leaves that file alone too."""
    add_epns(facility, ["12282a"])
    data = facility.destination / "ny79" / "12282a" / "data"
    data.mkdir(parents=True)
    notes = data / SCIENTISTS_NOTES
    notes.write_text("peak at 3.2 A; redo the merge with the 0.9 cutoff\n")
    before = snapshot(facility.destination)
    for option in REFUSED_RSYNC_OPTIONS:
        config = facility.write_config(rsync_options=[option], failure_alert_cycles=1)
        results = [mxsync_main(["check", "--config", config]), mxsync_main(["--config", config, "--execute", "--once"])]
        tally.runs += 1
        name = option.partition("=")[0]
        for what, result in zip(("check", "run"), results):
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            tally.expect(
                result.returncode == 2
                and len(lines) == 1
                and lines[0].startswith("mxsync: error: ")
                and "rsync-options[0]" in lines[0]
                and name in lines[0],
                f"{option}: {what} exit {result.returncode}, stderr {result.stderr[:300]!r}",
            )
        tally.expect(snapshot(facility.destination) == before, f"{option}: the destination changed")
        tally.expect(recorded(config) == set() and not facility.smtp.messages, f"{option}: something recorded or sent")
        tally.scan(outputs(facility, *results), secrets_of(facility))
    # The control: with an allowed option the same EPN syncs, so the refusals above are what kept it from running.
    config = facility.write_config(rsync_options=["--compress"])
    check, allowed = (
        mxsync_main(["check", "--config", config]),
        mxsync_main(["--config", config, "--execute", "--once"]),
    )
    tally.expect(
        check.returncode == 0 and allowed.returncode == 0 and recorded(config) == {"12282a"},
        f"--compress: check exit {check.returncode}, run exit {allowed.returncode}: {allowed.stderr[-300:]}",
    )
    source = tree_manifest(facility.root / "data" / "mx" / "12282a", include=wanted)
    copy = tree_manifest(data, include=lambda path: wanted(path) and path != SCIENTISTS_NOTES)
    tally.expect(copy == source, "12282a differs from the source with --compress")
    tally.expect(notes.exists() and notes.read_text().startswith("peak at 3.2 A"), "the scientist's notes were lost")
    check_everything(tally, facility, config, check, allowed)


# ---------------------------------------------------------------- ignore.yml typos while the service runs (item 7)

IGNORE_TYPOS = {
    "unclosed": lambda rng: b"previouslySynched: [12282a, 99999a\n",
    "tab": lambda rng: b"previouslySynched:\n- 12282a\n\t- 99999a\n",
    "stray-key": lambda rng: b"previouslySynched: [12282a, 99999a]\nsynched: [12282b]\n",
    "binary": lambda rng: b"\x00\xff" + bytes(rng.randrange(256) for _ in range(rng.randint(1, 4096))),
    "empty": lambda rng: b"",
}


def ignore_typo(kind):
    """A scenario: staff save ignore.yml with `kind` of typo between two cycles of the service.

    It stays up, transfers nothing and never writes the file while it is broken, emails staff once
    over several cycles, and resumes by itself once the file is fixed. An empty file is documented
    as an empty record: no alert, and the EPNs are recorded again.
    """

    def scenario(facility, tally, rng):
        add_epns(facility, ["12282a"])
        config = facility.write_config(sync_frequency_hours=0.001)  # a cycle every 3.6 s
        ignore = ignore_path(config)
        hand_edit(config, {"99999a"})
        process = start_tool(MXSYNC, "--config", config, "--execute")
        try:
            tally.expect(wait_for(lambda: cycles_finished(facility) >= 1, process), "the first cycle never finished")
            tally.expect(recorded(config) == {"12282a", "99999a"}, f"first cycle recorded {sorted(recorded(config))}")
            typo = IGNORE_TYPOS[kind](rng)
            ignore.write_bytes(typo)  # in place, as an editor that truncates and writes
            add_epns(facility, ["12282b"])  # new data, to show that nothing moves while the record is unreadable
            if kind == "empty":
                tally.expect(
                    wait_for(lambda: recorded(config) == {"12282a", "12282b"}, process),
                    f"after an empty ignore.yml, recorded {sorted(recorded(config))}",
                )
            else:
                seen = wait_for(lambda: log_text(facility).count("no transfer starts until it is fixed") >= 2, process)
                tally.expect(seen, "two cycles did not both find ignore.yml unreadable")
                tally.expect(
                    process.poll() is None, f"the service exited on a broken ignore.yml (exit {process.poll()})"
                )
                tally.expect(ignore.read_bytes() == typo, "ignore.yml was written while it was broken")
                moved = "12282b: started" in log_text(facility) or (facility.destination / "ny79" / "12282b").exists()
                tally.expect(not moved, "a transfer ran while ignore.yml was unreadable")
                hand_edit(config, {"12282a", "99999a"})  # staff fix it
                tally.expect(
                    wait_for(lambda: "12282b" in recorded(config), process), "no resume once ignore.yml was fixed"
                )
            # Stopped between cycles: a stop as a cycle ends is the "SIGINT just after the last record" row's.
            tally.expect(
                wait_for(lambda: _finished_after(log_text(facility), "12282b: synced"), process),
                "the cycle that recorded 12282b never finished",
            )
            signal_tool(process, signal.SIGTERM, group=False)
            result = finish(process, timeout=30)
        finally:
            if process.poll() is None:
                kill_group(process)
                process.wait()
        tally.runs += 1
        tally.expect(result.returncode == 0, f"exit {result.returncode} after SIGTERM: {result.stderr[-300:]}")
        alerts = subjects(facility)
        if kind == "empty":
            tally.expect(not alerts, f"alerts about an empty ignore.yml: {alerts}")
        else:
            tally.expect(
                len(alerts) == 1 and "record" in alerts[0], f"expected one alert about the record, got {alerts}"
            )
        tally.expect(complete_copy(facility, "ny79", "12282b"), "12282b differs from the source")
        left = tools_gone(facility)
        tally.expect(not left, f"left running: {sorted(left.values())[:3]}")
        check_everything(tally, facility, config, result, before=set() if kind == "empty" else {"12282a", "99999a"})

    scenario.__name__ = f"ignore_typo_{kind.replace('-', '_')}"
    return scenario


def _finished_after(log, text):
    """True if a cycle finished after the first line holding `text`."""
    return text in log and log.rfind("Cycle finished") > log.index(text)


# ---------------------------------------------------------------- no data at the facility yet (item 9)


def no_data_yet(facility, tally, rng):
    """Visits booked whose folder is missing, empty, or holds only empty folders: "waiting for data" in the dry
    run and the real run alike, exit 0, no failure, no alert, no folder at the destination; once data
    arrive the next pass syncs them."""
    now = datetime.now().astimezone()
    recent = {
        "start": now - timedelta(hours=30),
        "end": now - timedelta(hours=6),
    }  # within waiting-for-data-alert-hours
    add_epns(facility, ["12282a"], **recent)
    waiting = {
        "12282m": "no folder at the facility yet",
        "12282e": "its folder at the facility is empty",
        "12282f": "its folder at the facility is empty",
    }
    for epn in waiting:
        facility.portal.add_visit(23, epn, **recent)
    (facility.root / "data" / "mx" / "12282e").mkdir()
    (facility.root / "data" / "mx" / "12282f" / "frames" / "empty").mkdir(parents=True)
    config = facility.write_config(failure_alert_cycles=1)
    dry = run_tool(MXSYNC, "--config", config, "--once")
    real = run_tool(MXSYNC, "--config", config, "--execute", "--once")
    again = run_tool(MXSYNC, "--config", config, "--execute", "--once")
    tally.runs += 1
    log = log_text(facility).splitlines()
    dry_lines = [line for line in log if "[dry run]" in line]
    real_lines = [line for line in log if "[dry run]" not in line]
    said = {name: _waiting_said(lines) for name, lines in (("dry run", dry_lines), ("real run", real_lines))}
    for name, result in (("dry run", dry), ("real run", real), ("second run", again)):
        tally.expect(result.returncode == 0, f"{name}: exit {result.returncode}: {result.stderr[-300:]}")
    tally.expect(said["dry run"] == said["real run"] == waiting, f"waiting for data: {said}")
    would = {epn for epn in {"12282a", *waiting} if any(f"{epn}: would sync" in line for line in dry_lines)}
    tally.expect(
        would == {"12282a"} == recorded(config),
        f"dry run would sync {sorted(would)}, the real run recorded {sorted(recorded(config))}",
    )
    failed = [line for line in log if "FAILED" in line]
    tally.expect(not failed, f"waiting for data logged as a failure: {failed[:2]}")
    tally.expect(not failure_entries(config) and not facility.smtp.messages, "waiting for data counted or alerted")
    made = [epn for epn in waiting if (facility.destination / "ny79" / epn).exists()]
    tally.expect(not made, f"folders made at the destination for EPNs without data: {made}")
    check_everything(tally, facility, config, dry, real, again)
    # The data arrive: the next pass syncs them.
    for epn in waiting:
        make_experiment(facility.root, "mx", epn, frames=1, frame_size=4096, small_files=1)
    later = run_tool(MXSYNC, "--config", config, "--execute", "--once")
    tally.expect(
        later.returncode == 0 and recorded(config) == {"12282a", *waiting},
        f"once the data arrived: exit {later.returncode}, recorded {sorted(recorded(config))}",
    )
    tally.expect(all(complete_copy(facility, "ny79", epn) for epn in waiting), "a copy differs once the data arrived")
    check_everything(tally, facility, config, dry, real, again, later)


def _waiting_said(lines):
    """{EPN: reason} from the 'waiting for data' lines of a log."""
    found = {}
    for line in lines:
        match = re.search(r"(\d{5}[a-z]): waiting for data: (.*?)(, although .*)?$", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


HOSTILE_MEMBER_ATTACKS = {
    "before the cycle": "test_links_planted_before_the_cycle_redirect_nothing",
    "while the transfer starts": "test_links_planted_while_the_transfer_starts_redirect_nothing",
    "inside data/ during the transfer": "test_link_planted_inside_data_during_the_transfer_redirects_nothing",
}


def hostile_project_member(attack):
    """A project member's symlinks towards another project, the state folder and outside the root (issue 19).

    Runs tests/test_security.py's case for `attack` on a site of its own (the attacker is a second real account),
    as root or as an unprivileged service account and with the installed or an older rsync, picked at random.
    """

    def scenario(facility, tally, rng):
        from tests import test_security as security
        from tests.facility.oldrsync import old_rsync_directory

        service = rng.choice([None, security.service_account()])
        older = rng.random() < 0.5
        rsync = old_rsync_directory() / "rsync" if older else Path(shutil.which("rsync"))
        tally.notes["older rsync"] = tally.notes.get("older rsync", 0) + older
        tally.notes["as service account"] = tally.notes.get("as service account", 0) + (service is not None)
        with security.security_site(service, rsync) as site:
            tally.runs += 1
            try:
                getattr(security, HOSTILE_MEMBER_ATTACKS[attack])(site)
            except AssertionError as error:
                tally.unmet.append(f"{attack}: {error}"[:500])

    scenario.__name__ = f"hostile_project_member_{attack.split()[0]}"
    return scenario
