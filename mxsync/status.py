"""`mxsync status`: each EPN of the visits in range with its sync state, as a table or JSON.

It shows what is known even when the portal or ignore.yml cannot be read (exactly when an operator
looks): failures, EPNs waiting for data, the last cycle, the lock holder and the transfers running now.
"""

import json
import time
from datetime import datetime, timezone

from mxsync.config import load_config
from mxsync.errors import PortalError, StateFileError
from mxsync.history import LOCK_FILE_NAME, History
from mxsync.lifecycle import EpnFacts, Timing, assess, describe
from mxsync.names import epn_number
from mxsync.pipeline import human_bytes
from mxsync.plan import fetch_visits, make_plan
from mxsync.portal import PortalClient
from mxsync.service import ACTIVITY_FILE_NAME
from mxsync.state import IgnoreFile, InstanceLock

# The lifecycle's states (mxsync.lifecycle), the ones that need a look first.
STATES = (
    "running",
    "failed",
    "waiting",
    "final",
    "verified",
    "settling",
    "collecting",
    "booked",
    "unmapped",
    "refused",
    "synced",
)


def collect_status(config):
    """Return (rows, notes, running, portal error or None): one row per EPN known, and what else is known."""
    notes = []
    try:
        synced = IgnoreFile(config.ignore_file).load()
    except StateFileError as error:
        synced = set()
        notes.append(f"ignore.yml cannot be read, so no EPN shows as synced: {error}")
    lock = InstanceLock(config.state_dir / LOCK_FILE_NAME)
    service_running = lock.is_held_elsewhere()
    running = _running_transfers(config) if service_running else {}
    portal_error = None
    # A copy of the store in memory: a damaged one is reported here, never moved aside.
    with History(config.state_dir, read_only=True) as view:
        view.reconcile(synced)  # as the next cycle will: an EPN removed from ignore.yml by hand is synced again
        failing, waiting_for_data = view.failing_epns(), view.waiting_epns()
        sources, last = view.failing_sources(), view.last_cycle()
        try:
            states, visits, following = _plan_states(config, synced, view, notes)
        except PortalError as error:
            states, visits, following, portal_error = {}, {}, {}, str(error)
    if view.problem:
        notes.append(view.problem)
    # Without the portal, what the history knows still shows; failures counted before any pass on record
    # (imported from an older mxsync) make a pass that is merely due show as failed.
    for epn in failing:
        if states.get(epn, "final") == "final":
            states[epn] = "failed"
    for epn in waiting_for_data:
        states.setdefault(epn, "waiting")
    for epn in running:
        states[epn] = "running"

    rows = []
    for epn, state in states.items():
        failure = failing.get(epn) or {}
        waiting = waiting_for_data.get(epn) or {}
        visit = visits.get(epn)
        rows.append(
            {
                "epn": epn,
                "state": state,
                "project": config.project_for(epn_number(epn)),
                "visit_end": visit.end.astimezone(timezone.utc).isoformat() if visit and visit.end else None,
                "failures": failure.get("failures", 0),
                "last_error": failure.get("last_error") or waiting.get("reason"),
                "next": following.get(epn),
            }
        )
    rows.sort(key=lambda row: (STATES.index(row["state"]), row["epn"]))
    if service_running:
        notes.append(f"an mxsync service holds the lock: {_lock_holder(lock)}")
    if last is not None:
        notes.append(
            f"last cycle finished {last.get('finished', '?')}: {last.get('synced', 0)} synced, "
            f"{last.get('live', 0)} copied live, "
            f"{len(last.get('failed') or [])} failed, {len(last.get('waiting') or [])} waiting for data"
        )
    notes += [
        f"source {name}: failing for {entry['failures']} cycle(s): {entry.get('last_error')}"
        for name, entry in sources.items()
    ]
    return rows, notes, running, portal_error


def _plan_states(config, synced, history, notes):
    """Ask the portal and place each EPN in its lifecycle as a cycle would; return ({epn: state}, {epn: visit},
    {epn: what comes next}) or raise PortalError."""
    now = datetime.now(timezone.utc)
    visits, _suspicious, errors = fetch_visits(config, PortalClient(config), now)
    if errors and len(errors) >= len(config.equipment):
        raise PortalError(errors[0])
    notes.extend(errors)
    plan = make_plan(config, visits, synced, now)
    states = {epn: "synced" for epn in plan.synced}
    states.update({epn: "unmapped" for epn in plan.unmapped})
    states.update({epn: "refused" for epn in plan.refused})
    following = {}
    timing = Timing.from_config(config)
    passes = history.passes()
    for candidate in plan.candidates:
        last, failures = passes.get(candidate.epn, (None, 0))
        entry = assess(EpnFacts(candidate.epn, candidate.visits, last_pass=last, failures=failures), now, timing)
        states[candidate.epn] = entry.state.value
        following[candidate.epn] = describe(entry, now).split("; next: ", 1)[-1]
    latest = {}
    for visit in visits:
        if visit.epn not in latest or (visit.end and latest[visit.epn].end and visit.end > latest[visit.epn].end):
            latest[visit.epn] = visit
    return states, latest, following


def _running_transfers(config):
    """Return {epn: {started, files, bytes, rate}} from the service's activity file (empty if there is none)."""
    try:
        snapshot = json.loads((config.state_dir / ACTIVITY_FILE_NAME).read_text(encoding="utf-8"))
        transfers = snapshot["transfers"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    now = time.time()
    running = {}
    for epn, figures in transfers.items():
        started = figures.get("started", now)
        transferred = figures.get("bytes", 0)
        running[epn] = {
            "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
            "files": figures.get("files", 0),
            "bytes": transferred,
            "rate": transferred / max(now - started, 1e-3),
        }
    return running


def _lock_holder(lock):
    try:
        return lock.path.read_text(encoding="utf-8").strip() or "an unknown process"
    except OSError:
        return "an unknown process"


def run_status(config_path, as_json=False):
    config = load_config(config_path, check_files=False)  # a missing key must not hide what is known
    rows, notes, running, portal_error = collect_status(config)
    if as_json:
        print(json.dumps({"epns": rows, "running": running, "notes": notes, "portal_error": portal_error}, indent=2))
    else:
        print_table(rows, notes, running)
    if portal_error:
        # What is known is printed above; the one error line and exit 1 tell scripts the view is partial.
        raise PortalError(f"{portal_error}; the portal could not be asked, so only what mxsync knows is shown")
    return 0


def print_table(rows, notes, running):
    print(f"{'EPN':<12} {'STATE':<10} {'PROJECT':<12} {'VISIT END (UTC)':<17} DETAIL")
    for row in rows:
        detail = f"{row['failures']} failure(s): {row['last_error']}" if row["failures"] else (row["last_error"] or "")
        if row.get("next"):
            detail = f"{detail}; next: {row['next']}" if detail else f"next: {row['next']}"
        transfer = running.get(row["epn"])
        if transfer:
            detail = (
                f"since {transfer['started'][11:19]} UTC: {transfer['files']} files, "
                f"{human_bytes(transfer['bytes'])} ({human_bytes(transfer['rate'])}/s)"
            )
        visit_end = row["visit_end"][:16].replace("T", " ") if row["visit_end"] else "-"
        print(f"{row['epn']:<12} {row['state']:<10} {row['project'] or '-':<12} {visit_end:<17} {detail}".rstrip())
    for note in notes:
        print(f"note: {note}")
