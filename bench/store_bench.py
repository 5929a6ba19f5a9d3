"""The state store's share of a no-op cycle: open `mxsync.db` and read every EPN's state, with 10,000 EPNs in it.

Usage (from the repository root):
    .venv/bin/python -m bench.store_bench                      # 10,000 EPNs, 5 transfers each
    .venv/bin/python -m bench.store_bench --epns 10000 --transfers 50 --runs 30
Prints the median, 95th percentile and maximum of each step (issue 11's target: a no-op cycle under 1 s
beyond the portal call). The store is built in a temporary directory under --workdir and removed after.
"""

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mxsync.portal import Person, Visit  # noqa: E402
from mxsync.store import DB_NAME, STATES, Store  # noqa: E402

START = datetime(2020, 1, 1, tzinfo=timezone.utc)


def build(state_dir, epns, transfers):
    """Fill a store as years of service would: every EPN seen, one visit, its transfers, a state; some alerts."""
    names = [f"{10000 + number}{'abc'[number % 3]}" for number in range(epns)]
    with Store.open(state_dir) as store:
        store.record_seen("portal", {epn: f"p{number % 97}" for number, epn in enumerate(names)}, when=START)
        store.record_visits(visits(names), when=START)
        for number, epn in enumerate(names):
            store.set_state(epn, STATES[number % len(STATES)], when=START + timedelta(hours=number))
        store.alert_sent("unknown-epn", names[: epns // 10], recipients=2, subject="Unknown ownership of EPNs")
        store.reconcile_recorded([epn for number, epn in enumerate(names) if number % 2])
    # Years of transfer attempts, written in one transaction (through the API: one commit each, minutes).
    connection = sqlite3.connect(str(state_dir / DB_NAME))
    with connection:
        connection.executemany(
            "INSERT INTO transfers (epn, kind, started, ended, files, bytes, seconds, outcome, exit_code)"
            " VALUES (?, 'live', ?, ?, 10, 1000000000, 60.0, 'ok', 0)",
            (
                (
                    epn,
                    (START + timedelta(minutes=attempt)).isoformat(),
                    (START + timedelta(minutes=attempt + 1)).isoformat(),
                )
                for epn in names
                for attempt in range(transfers)
            ),
        )
    connection.close()
    return names


def visits(names):
    scientist = Person("Ada", "Lovelace", "ada@example.org")
    return [
        Visit(epn, START + timedelta(hours=number), START + timedelta(hours=number + 8), 23, "MX2", scientist, ())
        for number, epn in enumerate(names)
    ]


def timed(step, runs):
    figures = []
    for _ in range(runs):
        began = time.perf_counter()
        step()
        figures.append(time.perf_counter() - began)
    return figures


def summary(figures):
    ordered = sorted(figures)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"median {statistics.median(ordered) * 1000:8.1f} ms   p95 {p95 * 1000:8.1f} ms   max {ordered[-1] * 1000:8.1f} ms"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.store_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--epns", type=int, default=10000)
    parser.add_argument("--transfers", type=int, default=5, help="transfer attempts per EPN (default 5)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--workdir", default=None, help="where to build the store (default: the system's temp dir)")
    options = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="store-bench-", dir=options.workdir) as workdir:
        state_dir = Path(workdir)
        began = time.perf_counter()
        names = build(state_dir, options.epns, options.transfers)
        size = (state_dir / DB_NAME).stat().st_size
        print(
            f"built: {options.epns} EPNs, {options.epns * options.transfers} transfers, "
            f"{size / 2**20:.1f} MiB, in {time.perf_counter() - began:.1f} s"
        )

        def open_and_read():
            with Store.open(state_dir) as store:
                assert len(store.states()) == options.epns

        with Store.open(state_dir) as store:
            recorded = [epn for epn, state in store.states().items() if state.state == "recorded"]
            steps = {
                "open + states() (the no-op cycle's store cost)": open_and_read,
                "  open alone (incl. quick_check)": lambda: Store.open(state_dir).close(),
                "  states() alone": store.states,
                "reconcile_recorded(ignore.yml), nothing changed": lambda: store.reconcile_recorded(recorded),
                "record_visits(every EPN's visit), a portal poll": lambda: store.record_visits(visits(names)),
            }
            for title, step in steps.items():
                print(f"{title:<52} {summary(timed(step, options.runs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
