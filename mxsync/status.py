"""`mxsync status`: each EPN of the visits in range with its sync state, as a table or JSON."""

import json
from datetime import datetime, timezone

from mxsync.config import load_config
from mxsync.errors import PortalError
from mxsync.history import LOCK_FILE_NAME, History
from mxsync.names import epn_number
from mxsync.plan import fetch_visits, make_plan
from mxsync.portal import PortalClient
from mxsync.state import IgnoreFile, InstanceLock

STATES = ("running", "failed", "pending", "not ended", "unmapped", "refused", "synced")


def collect_status(config):
    """Return (rows, notes): one row per EPN of the visits in range with its state, plus general notes."""
    synced = IgnoreFile(config.ignore_file).load()
    history = History(config.state_dir, read_only=True)
    service_running = InstanceLock(config.state_dir / LOCK_FILE_NAME).is_held_elsewhere()
    current, previous, _suspicious, errors, current_start = fetch_visits(config, PortalClient(config), datetime.now(timezone.utc))
    if errors and len(errors) >= len(config.equipment):
        raise PortalError(errors[0])
    plan = make_plan(config, current, previous, synced, current_start)
    visits = {visit.epn: visit for visit in previous + current}
    states = {epn: "synced" for epn in plan.synced}
    states.update({epn: "unmapped" for epn in plan.unmapped})
    states.update({epn: "not ended" for epn in plan.not_ended})
    states.update({epn: "refused" for epn in plan.refused})
    states.update({transfer.epn: "pending" for transfer in plan.transfers})
    rows = []
    for epn, state in states.items():
        failure = history.data["epns"].get(epn)
        if state == "pending" and failure:
            state = "failed"
        if service_running and epn in history.data["running"]:
            state = "running"
        visit = visits.get(epn)
        rows.append(
            {
                "epn": epn,
                "state": state,
                "project": config.project_for(epn_number(epn)),
                "visit_end": visit.end.astimezone(timezone.utc).isoformat() if visit and visit.end else None,
                "failures": failure["failures"] if failure else 0,
                "last_error": failure.get("last_error") if failure else None,
            }
        )
    rows.sort(key=lambda row: (STATES.index(row["state"]), row["epn"]))
    notes = list(errors)
    if service_running:
        notes.append("an mxsync service holds the lock (running)")
    notes += [f"source {name}: failing for {entry['failures']} cycle(s): {entry.get('last_error')}" for name, entry in history.data["sources"].items()]
    return rows, notes


def run_status(config_path, as_json=False):
    config = load_config(config_path)
    rows, notes = collect_status(config)
    if as_json:
        print(json.dumps({"epns": rows, "notes": notes}, indent=2))
        return 0
    print(f"{'EPN':<12} {'STATE':<10} {'PROJECT':<12} {'VISIT END (UTC)':<17} DETAIL")
    for row in rows:
        detail = f"{row['failures']} failure(s): {row['last_error']}" if row["failures"] else ""
        visit_end = row["visit_end"][:16].replace("T", " ") if row["visit_end"] else "-"
        print(f"{row['epn']:<12} {row['state']:<10} {row['project'] or '-':<12} {visit_end:<17} {detail}".rstrip())
    for note in notes:
        print(f"note: {note}")
    return 0
