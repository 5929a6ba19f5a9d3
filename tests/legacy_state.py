"""The retired JSON state files exactly as the code before the state store wrote them (tests/data/legacy-state)."""

import json
import shutil
from datetime import datetime
from pathlib import Path

from epnalert.alert import Previous

LEGACY_STATE = Path(__file__).resolve().parent / "data" / "legacy-state"
HISTORY_FILE = "mxsync-state.json"
ALERT_STATE_FILE = "epnalert-state.json"


def install(state_dir, name):
    """Copy one of the files into state_dir as an existing install has it; return its parsed JSON."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(LEGACY_STATE / name, state_dir / name)
    return json.loads((state_dir / name).read_text())


def previous_alert(data):
    """What the old epnalert read from epnalert-state.json: the last alert sent and {EPN: first alerted}."""
    return Previous(
        sent_at=datetime.fromisoformat(data["last_sent"]),
        epns={epn: datetime.fromisoformat(entry["first_alerted"]) for epn, entry in data["epns"].items()},
    )
