"""The state store: one SQLite database, `<state-dir>/mxsync.db`, that mxsync and epnalert share.

It holds every EPN seen, its visits, its lifecycle state, every transfer attempt and every alert sent.
It stores; it decides nothing (the lifecycle does). ignore.yml stays the record staff edit, and wins
(reconcile_recorded). WAL and a busy timeout let separate processes write; every write is one
IMMEDIATE transaction, so a crash at any instant leaves each row whole or absent. A database that is
not a database is moved aside and a fresh one built; one from a newer mxsync is refused, untouched.
"""

import hashlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple, Optional

from mxsync.errors import StoreError
from mxsync.state import NEW_FILE_MODE, file_lock

logger = logging.getLogger("mxsync.store")

DB_NAME = "mxsync.db"
LOCK_NAME = "mxsync.db.lock"  # serialises opening (create, repair, migrate, import) between processes
# The JSON files the store replaces (mxsync.history, epnalert.alert): imported once, then renamed <name>.imported.
HISTORY_FILE = "mxsync-state.json"
ALERT_STATE_FILE = "epnalert-state.json"
BUSY_TIMEOUT = 30.0  # seconds a write waits for another process's transaction before giving up
# epnalert's memory of the last alert it sent: {"last_sent", "last_recipients", "epns": {EPN: first alerted}}.
EPNALERT_NOTE = "epnalert_last_alert"

STATES = (
    "booked",
    "collecting",
    "settling",
    "final",
    "verified",
    "recorded",
    "waiting",
    "failed",
    "unmapped",
    "refused",
)
SOURCES = ("portal", "sftp")  # where an EPN was seen
PASS_KINDS = ("live", "final", "backfill")
OUTCOMES = ("ok", "failed", "stopped", "no-data", "interrupted")
LIFECYCLE_KINDS = ("live", "final")  # the passes an EPN's lifecycle is decided from
# A follow-up's states: 'failed' means it gave up after on-synced-retries attempts; 'running' left by a crash runs again.
FOLLOWUP_STATES = ("pending", "running", "done", "failed")

# Forward migrations: MIGRATIONS[n] takes a database from schema n to n + 1 (0 is a new, empty file).
# Append only; never edit a released step. Each is a list of statements, run in one transaction with the others.
MIGRATIONS = [
    [
        """CREATE TABLE epns (
            epn TEXT PRIMARY KEY,
            project TEXT,                 -- the project it maps to, NULL if unmapped
            state TEXT,                   -- a lifecycle state (STATES); NULL until the lifecycle sets one
            state_since TEXT,
            reason TEXT,                  -- why it is in this state (waiting, refused, ...), for status
            failures INTEGER NOT NULL DEFAULT 0,
            failing_since TEXT,           -- the first failure of the current run of failures
            last_error TEXT,
            last_failure TEXT
        )""",
        """CREATE TABLE sightings (
            epn TEXT NOT NULL REFERENCES epns (epn),
            source TEXT NOT NULL,         -- SOURCES
            first_seen TEXT NOT NULL,
            last_seen TEXT NOT NULL,
            PRIMARY KEY (epn, source)
        )""",
        """CREATE TABLE visits (
            id INTEGER PRIMARY KEY,
            epn TEXT NOT NULL REFERENCES epns (epn),
            start TEXT,
            end TEXT,
            equipment_id INTEGER,
            beamline TEXT,
            principal_scientist TEXT,     -- JSON object or NULL
            other_scientists TEXT NOT NULL DEFAULT '[]',  -- JSON list of objects
            seen_at TEXT NOT NULL
        )""",
        # A visit is its EPN, equipment and start (the portal gives visits no id of their own).
        "CREATE UNIQUE INDEX visits_identity ON visits (epn, ifnull(equipment_id, -1), ifnull(start, ''))",
        """CREATE TABLE transfers (
            id INTEGER PRIMARY KEY,
            epn TEXT NOT NULL REFERENCES epns (epn),
            kind TEXT NOT NULL,           -- PASS_KINDS
            started TEXT NOT NULL,
            ended TEXT,
            files INTEGER,
            bytes INTEGER,
            seconds REAL,
            outcome TEXT,                 -- OUTCOMES; NULL while it runs
            exit_code INTEGER,
            error TEXT
        )""",
        "CREATE INDEX transfers_of_epn ON transfers (epn, id)",
        "CREATE INDEX transfers_running ON transfers (id) WHERE outcome IS NULL",
        """CREATE TABLE alerts (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            key TEXT NOT NULL,            -- what it was about (an EPN, a source), '' for the message as a whole
            sent_at TEXT NOT NULL,
            recipients INTEGER,
            subject TEXT,
            UNIQUE (kind, key, sent_at)
        )""",
        "CREATE INDEX alerts_by_time ON alerts (sent_at)",
        """CREATE TABLE sources (
            name TEXT PRIMARY KEY,        -- portal, ssh, destination, ... failing for `failures` cycles
            failures INTEGER NOT NULL,
            since TEXT NOT NULL,
            last_error TEXT,
            last_failure TEXT
        )""",
        "CREATE TABLE notes (name TEXT PRIMARY KEY, value TEXT NOT NULL)",  # values are JSON
        """CREATE TABLE imports (
            file TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            imported_at TEXT NOT NULL,
            PRIMARY KEY (file, sha256)
        )""",
    ],
    # An EPN taken out of ignore.yml by hand is synced again: its passes up to this transfer id no longer count.
    ["ALTER TABLE epns ADD COLUMN passes_after INTEGER NOT NULL DEFAULT 0"],
    # What runs once an EPN is recorded (on-synced hooks, the scientists' email): each action once per EPN.
    [
        """CREATE TABLE followups (
            epn TEXT NOT NULL,
            action TEXT NOT NULL,         -- the action's stable name: 'hook:1', 'notify-scientists'
            state TEXT NOT NULL,          -- FOLLOWUP_STATES
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            updated REAL,                 -- seconds since the epoch
            PRIMARY KEY (epn, action)
        )""",
    ],
    # The whole-file checksums rsync printed as it transferred (mxsync.bagging), until the EPN is bagged and recorded.
    [
        """CREATE TABLE checksums (
            epn TEXT NOT NULL,
            path BLOB NOT NULL,           -- relative to data/, the bytes of the name (names need not be UTF-8)
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,    -- the file's stamp when the checksum was taken: a changed one means
            ctime_ns INTEGER NOT NULL,    -- the file changed since, and it is hashed again
            inode INTEGER NOT NULL,
            algorithm TEXT NOT NULL,
            digest TEXT NOT NULL,
            PRIMARY KEY (epn, path)
        )""",
    ],
]


class EpnState(NamedTuple):
    epn: str
    state: Optional[str]
    since: Optional[datetime]
    reason: Optional[str]
    failures: int
    failing_since: Optional[datetime]
    last_error: Optional[str]
    last_failure: Optional[datetime]
    project: Optional[str]


class VisitRecord(NamedTuple):
    epn: str
    start: Optional[datetime]
    end: Optional[datetime]
    equipment_id: Optional[int]
    beamline: Optional[str]
    principal_scientist: Optional[dict]
    other_scientists: list
    seen_at: datetime


class Transfer(NamedTuple):
    id: int
    epn: str
    kind: str
    started: datetime
    ended: Optional[datetime]
    files: Optional[int]
    bytes: Optional[int]
    seconds: Optional[float]
    outcome: Optional[str]  # None while it runs
    exit_code: Optional[int]
    error: Optional[str]


class FollowUp(NamedTuple):
    epn: str
    action: str
    state: str
    attempts: int
    last_error: Optional[str]
    updated: Optional[float]


class AlertRecord(NamedTuple):
    kind: str
    key: str
    sent_at: datetime
    recipients: Optional[int]
    subject: Optional[str]


class SourceFailure(NamedTuple):
    name: str
    failures: int
    since: datetime
    last_error: Optional[str]
    last_failure: Optional[datetime]


class Store:
    """An open state store; use Store.open(state_dir), as a context manager or with close()."""

    def __init__(self, path, connection, dry_run=False):
        self.path = Path(path)
        self.dry_run = dry_run  # a copy in memory: writes change only the copy
        self.moved_aside = None  # where a corrupt database was moved when this one was built, else None
        self.imported = []  # the retired JSON files (<name>.imported) this open imported
        self._db = connection
        self._lock = threading.Lock()  # one connection, shared by mxsync's transfer threads
        self._inode = None if dry_run else os.stat(self.path).st_ino

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, state_dir, dry_run=False, busy_timeout=BUSY_TIMEOUT):
        """Open (creating, repairing, migrating and importing as needed) `<state_dir>/mxsync.db`.

        dry_run gives a copy in memory, imports included, that writes change and nothing on disk does
        (SQLite may leave its empty -wal and -shm beside an existing file). Raises StoreError, one line.
        """
        path = Path(state_dir) / DB_NAME
        if dry_run:
            return cls._copy_in_memory(path, busy_timeout)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with file_lock(path.with_name(LOCK_NAME)):
                return cls._set_up(path, busy_timeout)
        except OSError as error:
            raise StoreError(f"{path}: cannot open the state store: {error.strerror or error}") from None

    @classmethod
    def _set_up(cls, path, busy_timeout):
        moved_aside, connection = None, None
        _create(path)
        try:
            connection = _connect(path, busy_timeout)
            try:
                version = _probe(connection, path)
            except _Corrupt as problem:
                connection.close()
                moved_aside = _move_aside(path, problem)
                _create(path)
                connection = _connect(path, busy_timeout)
                version = _probe(connection, path)
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":  # another process kept it busy: it works, with less concurrency
                logger.warning("%s: could not switch to WAL journaling (still %s); it will be tried again", path, mode)
            connection.execute("PRAGMA synchronous = FULL")
            _migrate(connection, path, version)
            store = cls(path, connection)
        except BaseException as error:
            if connection is not None:
                connection.close()
            if isinstance(error, sqlite3.Error):
                raise StoreError(f"{path}: cannot open the state store: {_describe(error)}") from None
            raise
        store.moved_aside = moved_aside
        try:
            store.imported = store._import_retired_files()
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def _copy_in_memory(cls, path, busy_timeout):
        """The file copied into memory (migrated and imported into there), or a new store there if none."""
        memory = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        memory.text_factory = _lenient_text
        try:
            if path.exists():
                source = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=busy_timeout)
                source.text_factory = _lenient_text
                try:
                    version = _probe(source, path)
                    source.backup(memory)
                except _Corrupt as problem:
                    raise StoreError(
                        f"{path}: the state store {problem}; a run that is not a dry run moves it aside"
                    ) from None
                finally:
                    source.close()
            else:
                version = 0
            _migrate(memory, path, version, quiet=True)
        except sqlite3.Error as error:
            memory.close()
            raise StoreError(f"{path}: cannot read the state store: {error}") from None
        except BaseException:
            memory.close()
            raise
        store = cls(path, memory, dry_run=True)
        store.imported = store._import_retired_files()
        return store

    def close(self):
        with self._lock:
            self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # ------------------------------------------------------------ transactions

    @contextmanager
    def _transaction(self, doing):
        """One IMMEDIATE write transaction (it takes the write lock at once, so the busy timeout applies)."""
        with self._lock:
            if not self.dry_run:
                self._check_same_file()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as error:
                raise StoreError(f"{self.path}: cannot {doing}: {_describe(error)}") from None

    def _query(self, sql, parameters=()):
        with self._lock:
            try:
                return self._db.execute(sql, parameters).fetchall()
            except sqlite3.Error as error:
                raise StoreError(f"{self.path}: cannot read the state store: {_describe(error)}") from None

    def _check_same_file(self):
        """Refuse to write to a database another process moved aside (our connection would still reach it)."""
        try:
            same = os.stat(self.path).st_ino == self._inode
        except OSError:
            same = False
        if not same:
            raise StoreError(f"{self.path}: the state store was replaced since it was opened (moved aside?); reopen it")

    # ------------------------------------------------------------ EPNs and visits

    def record_seen(self, source, epns, when=None):
        """Note that `source` (portal, sftp) lists the EPNs of the mapping {EPN: project or None} now."""
        _check(source, SOURCES, "source")
        now = _text(when)
        with self._transaction("record EPNs seen") as db:
            db.executemany(
                "INSERT INTO epns (epn, project) VALUES (?, ?) ON CONFLICT (epn) DO UPDATE SET project = excluded.project",
                list(epns.items()),
            )
            _saw(db, ((epn, source) for epn in epns), now)

    def record_visits(self, visits, when=None):
        """Store portal visits (objects shaped like mxsync.portal.Visit); the same visit seen again is updated."""
        now = _text(when)
        rows = [
            (
                visit.epn,
                _text_or_none(visit.start),
                _text_or_none(visit.end),
                visit.equipment_id,
                visit.beamline,
                json.dumps(_person(visit.principal_scientist)) if visit.principal_scientist else None,
                json.dumps([_person(person) for person in visit.data_scientists]),
                now,
            )
            for visit in visits
        ]
        with self._transaction("record visits") as db:
            db.executemany("INSERT INTO epns (epn) VALUES (?) ON CONFLICT (epn) DO NOTHING", [(r[0],) for r in rows])
            _saw(db, ((row[0], "portal") for row in rows), now)
            db.executemany(
                "INSERT INTO visits (epn, start, end, equipment_id, beamline, principal_scientist, other_scientists,"
                " seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (epn, ifnull(equipment_id, -1), ifnull(start, ''))"
                " DO UPDATE SET end = excluded.end, beamline = excluded.beamline,"
                " principal_scientist = excluded.principal_scientist, other_scientists = excluded.other_scientists,"
                " seen_at = excluded.seen_at",
                rows,
            )

    def visits(self, epn):
        """Return the EPN's visits, earliest first."""
        rows = self._query(
            "SELECT epn, start, end, equipment_id, beamline, principal_scientist, other_scientists, seen_at"
            " FROM visits WHERE epn = ? ORDER BY start IS NULL, start, id",
            (epn,),
        )
        return [
            VisitRecord(
                row[0],
                _time(row[1]),
                _time(row[2]),
                row[3],
                row[4],
                json.loads(row[5]) if row[5] else None,
                json.loads(row[6]),
                _time(row[7]),
            )
            for row in rows
        ]

    def sightings(self, epn):
        """Return {source: (first seen, last seen)} for the EPN."""
        rows = self._query("SELECT source, first_seen, last_seen FROM sightings WHERE epn = ?", (epn,))
        return {source: (_time(first), _time(last)) for source, first, last in rows}

    # ------------------------------------------------------------ lifecycle state

    def set_state(self, epn, state, error=None, reason=None, clear_failures=False, when=None):
        """Put the EPN in `state` (its since changes only if the state does); `error` counts one failure more.

        `reason` says why, for status (replaced each time); clear_failures ends its run of failures.
        """
        _check(state, STATES, "state")
        if error is not None and clear_failures:
            raise ValueError("an error counts a failure; it cannot also clear the failures")
        now = _text(when)
        with self._transaction(f"set the state of {epn}") as db:
            db.execute("INSERT INTO epns (epn) VALUES (?) ON CONFLICT (epn) DO NOTHING", (epn,))
            db.execute(
                "UPDATE epns SET state_since = CASE WHEN state IS ? THEN state_since ELSE ? END,"
                " state = ?, reason = ? WHERE epn = ?",
                (state, now, state, reason, epn),
            )
            if error is not None:
                db.execute(
                    "UPDATE epns SET failures = failures + 1, failing_since = ifnull(failing_since, ?),"
                    " last_error = ?, last_failure = ? WHERE epn = ?",
                    (now, error, now, epn),
                )
            elif clear_failures:
                db.execute(
                    "UPDATE epns SET failures = 0, failing_since = NULL, last_error = NULL, last_failure = NULL"
                    " WHERE epn = ?",
                    (epn,),
                )
            if state == "recorded":  # bagged: the checksums kept for its bag are not needed any more
                db.execute("DELETE FROM checksums WHERE epn = ?", (epn,))

    def states(self, state=None):
        """Return {EPN: EpnState} for every EPN in the store, or those in `state` (None: no lifecycle state set yet)."""
        if state is None:
            return {row[0]: _epn_state(row) for row in self._query(f"SELECT {_EPN_COLUMNS} FROM epns")}
        _check(state, STATES, "state")
        return {
            row[0]: _epn_state(row) for row in self._query(f"SELECT {_EPN_COLUMNS} FROM epns WHERE state = ?", (state,))
        }

    def failing(self, min_failures=1):
        """Return {EPN: EpnState} of the EPNs with at least `min_failures` failures in a row."""
        rows = self._query(f"SELECT {_EPN_COLUMNS} FROM epns WHERE failures >= ?", (max(1, min_failures),))
        return {row[0]: _epn_state(row) for row in rows}

    def state(self, epn):
        """Return the EPN's EpnState, or None if the store has never heard of it."""
        rows = self._query(f"SELECT {_EPN_COLUMNS} FROM epns WHERE epn = ?", (epn,))
        return _epn_state(rows[0]) if rows else None

    def reconcile_recorded(self, recorded_epns, unrecorded_state="final", when=None):
        """Make the store agree with ignore.yml, which wins; return (EPNs newly recorded, EPNs no longer recorded).

        EPNs in ignore.yml become 'recorded' (their failures end); those the store had as recorded but ignore.yml
        no longer lists (removed by hand) go to `unrecorded_state` and their passes so far stop counting
        (last_pass, failed_passes), so they are synced again.
        """
        _check(unrecorded_state, STATES, "state")
        if unrecorded_state == "recorded":
            raise ValueError("unrecorded_state must not be 'recorded'")
        recorded = set(recorded_epns)
        now = _text(when)
        with self._transaction("reconcile with ignore.yml") as db:
            in_store = {row[0] for row in db.execute("SELECT epn FROM epns WHERE state = 'recorded'")}
            added, reopened = recorded - in_store, in_store - recorded
            db.executemany(
                "INSERT INTO epns (epn, state, state_since) VALUES (?, 'recorded', ?) ON CONFLICT (epn) DO UPDATE"
                " SET state = 'recorded', state_since = excluded.state_since, reason = NULL, failures = 0,"
                " failing_since = NULL, last_error = NULL, last_failure = NULL",
                [(epn, now) for epn in sorted(added)],
            )
            # A recorded EPN is bagged: the checksums kept for its bag are not needed any more.
            db.executemany("DELETE FROM checksums WHERE epn = ?", [(epn,) for epn in sorted(added)])
            # In the same transaction: a reopened EPN whose old final pass still counted would look verified.
            db.executemany(
                "UPDATE epns SET state = ?, state_since = ?, reason = 'no longer in ignore.yml',"
                " passes_after = (SELECT ifnull(max(id), 0) FROM transfers) WHERE epn = ?",
                [(unrecorded_state, now, epn) for epn in sorted(reopened)],
            )
        return added, reopened

    # ------------------------------------------------------------ transfers

    def transfer_started(self, epn, kind, when=None):
        """Record the start of a transfer pass (live, final, backfill) of the EPN; return its id."""
        _check(kind, PASS_KINDS, "pass kind")
        now = _text(when)
        with self._transaction(f"record the start of a transfer of {epn}") as db:
            db.execute("INSERT INTO epns (epn) VALUES (?) ON CONFLICT (epn) DO NOTHING", (epn,))
            return db.execute("INSERT INTO transfers (epn, kind, started) VALUES (?, ?, ?)", (epn, kind, now)).lastrowid

    def transfer_finished(
        self, transfer_id, outcome, files=None, bytes_transferred=None, exit_code=None, error=None, when=None
    ):
        """Record how a started transfer ended; its seconds are counted from its start."""
        _check(outcome, OUTCOMES, "outcome")
        ended = _aware(when)
        with self._transaction(f"record the end of transfer {transfer_id}") as db:
            row = db.execute(
                "SELECT started FROM transfers WHERE id = ? AND outcome IS NULL", (transfer_id,)
            ).fetchone()
            if row is None:
                raise ValueError(f"transfer {transfer_id} is unknown or already finished")
            seconds = max(0.0, (ended - _time(row[0])).total_seconds())
            db.execute(
                "UPDATE transfers SET ended = ?, files = ?, bytes = ?, seconds = ?, outcome = ?, exit_code = ?,"
                " error = ? WHERE id = ?",
                (_text(ended), files, bytes_transferred, seconds, outcome, exit_code, error, transfer_id),
            )

    def last_transfer(self, epn, kind=None):
        """Return the EPN's latest Transfer (of `kind` if given), or None."""
        rows = self._query(
            f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE epn = ? AND (? IS NULL OR kind = ?)"
            " ORDER BY id DESC LIMIT 1",
            (epn, kind, kind),
        )
        return _transfer(rows[0]) if rows else None

    def transfers(self, epn):
        """Return every Transfer of the EPN, oldest first."""
        return [
            _transfer(row)
            for row in self._query(f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE epn = ? ORDER BY id", (epn,))
        ]

    def last_pass(self, epn):
        """Return the EPN's latest finished live or final Transfer that still counts (see reconcile_recorded), or None."""
        rows = self._query(
            f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE epn = ? AND outcome IS NOT NULL"
            f" AND kind IN {LIFECYCLE_KINDS} AND id > (SELECT passes_after FROM epns WHERE epn = ?)"
            " ORDER BY id DESC LIMIT 1",
            (epn, epn),
        )
        return _transfer(rows[0]) if rows else None

    def failed_passes(self, epn):
        """Return how many of the EPN's final passes failed since its last pass that succeeded or found no data (stops
        say nothing; a live pass's failure is not the EPN's: its data are still being written)."""
        rows = self._query(
            "SELECT count(*) FROM transfers WHERE epn = ? AND outcome = 'failed' AND kind = 'final' AND id > max("
            " (SELECT passes_after FROM epns WHERE epn = ?),"
            " (SELECT ifnull(max(id), 0) FROM transfers WHERE epn = ? AND outcome IN ('ok', 'no-data')))",
            (epn, epn, epn),
        )
        return rows[0][0]

    def passes(self):
        """Return {EPN: (last_pass, failed_passes)} of every EPN with a pass that counts, in two queries."""
        last = self._query(
            f"SELECT {', '.join('t.' + column for column in _TRANSFER_COLUMNS.split(', '))} FROM transfers t JOIN"
            " (SELECT u.epn, max(u.id) AS id FROM transfers u JOIN epns e ON e.epn = u.epn WHERE u.outcome IS NOT NULL"
            f" AND u.kind IN {LIFECYCLE_KINDS} AND u.id > e.passes_after GROUP BY u.epn) m ON t.id = m.id"
        )
        failed = dict(
            self._query(
                "SELECT u.epn, count(*) FROM transfers u JOIN epns e ON e.epn = u.epn WHERE u.outcome = 'failed'"
                " AND u.kind = 'final'"
                " AND u.id > max(e.passes_after, (SELECT ifnull(max(v.id), 0) FROM transfers v WHERE v.epn = u.epn"
                " AND v.outcome IN ('ok', 'no-data'))) GROUP BY u.epn"
            )
        )
        return {row[1]: (_transfer(row), failed.get(row[1], 0)) for row in last}

    def running_transfers(self):
        """Return the transfers started and not finished (after a crash: those the crash interrupted)."""
        return [
            _transfer(row)
            for row in self._query(f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE outcome IS NULL ORDER BY id")
        ]

    # ------------------------------------------------------------ checksums for the bag (mxsync.bagging)

    def save_checksums(self, epn, algorithm, entries):
        """Keep {path bytes: (size, (mtime_ns, ctime_ns, inode), hex digest)} of the EPN's files (replacing older)."""
        rows = [(epn, bytes(path), size, *stamp, algorithm, digest) for path, (size, stamp, digest) in entries.items()]
        with self._transaction(f"save the checksums of {epn}") as db:
            db.executemany(
                "INSERT INTO checksums (epn, path, size, mtime_ns, ctime_ns, inode, algorithm, digest)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (epn, path) DO UPDATE SET size = excluded.size,"
                " mtime_ns = excluded.mtime_ns, ctime_ns = excluded.ctime_ns, inode = excluded.inode,"
                " algorithm = excluded.algorithm, digest = excluded.digest",
                rows,
            )

    def checksums(self, epn):
        """Return {path bytes: (size, (mtime_ns, ctime_ns, inode), algorithm, hex digest)} kept for the EPN."""
        rows = self._query(
            "SELECT path, size, mtime_ns, ctime_ns, inode, algorithm, digest FROM checksums WHERE epn = ?", (epn,)
        )
        return {bytes(row[0]): (row[1], (row[2], row[3], row[4]), row[5], row[6]) for row in rows}

    def forget_checksums(self, epn):
        with self._transaction(f"forget the checksums of {epn}") as db:
            db.execute("DELETE FROM checksums WHERE epn = ?", (epn,))

    # ------------------------------------------------------------ follow-ups of a record

    def followup_queue(self, epn, actions, when=None):
        """Queue each named action for the EPN as pending; a row that exists (in any state) is left alone: never twice."""
        now = _aware(when).timestamp()
        with self._transaction(f"queue the follow-ups of {epn}") as db:
            db.executemany(
                "INSERT INTO followups (epn, action, state, attempts, updated) VALUES (?, ?, 'pending', 0, ?)"
                " ON CONFLICT (epn, action) DO NOTHING",
                [(epn, action, now) for action in actions],
            )

    def followups_due(self):
        """Return the FollowUps pending or left running (by a crash or a stop), oldest first."""
        return self.followups(("pending", "running"))

    def followups(self, states=FOLLOWUP_STATES):
        """Return the FollowUps in `states`, oldest first."""
        for state in states:
            _check(state, FOLLOWUP_STATES, "follow-up state")
        marks = ", ".join("?" for _ in states)
        rows = self._query(
            "SELECT epn, action, state, attempts, last_error, updated FROM followups"
            f" WHERE state IN ({marks}) ORDER BY updated, epn, action",
            tuple(states),
        )
        return [FollowUp(*row) for row in rows]

    def followup_started(self, epn, action, when=None):
        """Mark a follow-up running and count the attempt (a crash now leaves it running: it runs at the next start)."""
        with self._transaction(f"note the start of {action} for {epn}") as db:
            db.execute(
                "UPDATE followups SET state = 'running', attempts = attempts + 1, updated = ? WHERE epn = ? AND action = ?",
                (_aware(when).timestamp(), epn, action),
            )

    def followup_finished(self, epn, action, error=None, give_up=False, when=None):
        """Record a follow-up's outcome: done, pending again after an error, or failed when it gives up."""
        state = "done" if error is None else ("failed" if give_up else "pending")
        with self._transaction(f"record the outcome of {action} for {epn}") as db:
            db.execute(
                "UPDATE followups SET state = ?, last_error = ?, updated = ? WHERE epn = ? AND action = ?",
                (state, error, _aware(when).timestamp(), epn, action),
            )

    # ------------------------------------------------------------ alerts and failing sources

    def alert_sent(self, kind, keys=("",), recipients=None, subject=None, when=None, note=None):
        """Record one alert email of `kind` about `keys` (EPNs, sources): one row each.

        note=(name, value) saves a note in the same transaction (what the sender must remember of it).
        """
        now = _text(when)
        rows = [(kind, key, now, recipients, subject) for key in (keys or ("",))]
        with self._transaction(f"record the {kind} alert") as db:
            db.executemany(
                "INSERT INTO alerts (kind, key, sent_at, recipients, subject) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (kind, key, sent_at) DO NOTHING",
                rows,
            )
            if note is not None:
                _set_note(db, *note)

    def alerts_since(self, since=None, kind=None, key=None):
        """Return the AlertRecords sent at or after `since` (all if None), of `kind` and about `key` if given, oldest first."""
        rows = self._query(
            "SELECT kind, key, sent_at, recipients, subject FROM alerts WHERE sent_at >= ?"
            " AND (? IS NULL OR kind = ?) AND (? IS NULL OR key = ?) ORDER BY sent_at, id",
            ("" if since is None else _text(since), kind, kind, key, key),
        )
        return [AlertRecord(row[0], row[1], _time(row[2]), row[3], row[4]) for row in rows]

    def source_failed(self, name, error, when=None):
        """Count one more failing cycle of a source (portal, ssh, destination, ...); return its count."""
        now = _text(when)
        with self._transaction(f"record the failure of {name}") as db:
            db.execute(
                "INSERT INTO sources (name, failures, since, last_error, last_failure) VALUES (?, 1, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET failures = failures + 1, last_error = excluded.last_error,"
                " last_failure = excluded.last_failure",
                (name, now, error, now),
            )
            return db.execute("SELECT failures FROM sources WHERE name = ?", (name,)).fetchone()[0]

    def source_ok(self, name):
        """End a source's run of failures."""
        with self._transaction(f"clear the failures of {name}") as db:
            db.execute("DELETE FROM sources WHERE name = ?", (name,))

    def source_failures(self):
        """Return {name: SourceFailure} for the sources failing now."""
        rows = self._query("SELECT name, failures, since, last_error, last_failure FROM sources")
        return {row[0]: SourceFailure(row[0], row[1], _time(row[2]), row[3], _time(row[4])) for row in rows}

    # ------------------------------------------------------------ notes

    def set_note(self, name, value):
        """Keep a small JSON value under `name` (e.g. the last cycle's summary)."""
        with self._transaction(f"save the note {name}") as db:
            _set_note(db, name, value)

    def get_note(self, name, default=None):
        rows = self._query("SELECT value FROM notes WHERE name = ?", (name,))
        try:
            return json.loads(rows[0][0]) if rows else default
        except (TypeError, ValueError):
            raise StoreError(f"{self.path}: the note {name} is damaged; it is replaced when next saved") from None

    # ------------------------------------------------------------ importing the retired JSON files

    def _import_retired_files(self):
        """Import mxsync-state.json and epnalert-state.json if present, then rename each <name>.imported (not in a dry run)."""
        retired = []
        for name, importer in ((HISTORY_FILE, _import_history), (ALERT_STATE_FILE, _import_alert_state)):
            source = self.path.with_name(name)
            try:
                raw = source.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as error:
                logger.warning("%s: cannot read it to import into %s: %s; left in place", source, self.path, error)
                continue
            digest = hashlib.sha256(raw).hexdigest()
            try:
                data = json.loads(raw.decode("utf-8")) if raw.strip() else {}
                if not isinstance(data, dict):
                    raise _Unusable("is not a JSON object")
                with self._transaction(f"import {source}") as db:
                    done = db.execute("SELECT 1 FROM imports WHERE file = ? AND sha256 = ?", (name, digest)).fetchone()
                    counts = None if done else importer(db, data)
                    db.execute(
                        "INSERT INTO imports (file, sha256, imported_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                        (name, digest, _text(None)),
                    )
            except (ValueError, OverflowError, _Unusable) as problem:  # JSON and UTF-8 errors are ValueErrors
                logger.warning(
                    "%s: cannot be imported into %s (%s); left in place: fix or remove it", source, self.path, problem
                )
                continue
            if self.dry_run:
                done = f" ({counts})" if counts else ", already imported"
                logger.info(
                    "Imported %s into a copy of %s in memory%s; the file is left as it is", source, self.path, done
                )
                continue
            try:
                aside = _retire(source)
            except OSError as error:
                logger.warning("%s: imported into %s but cannot be renamed: %s", source, self.path, error)
                continue
            retired.append(aside)
            if counts is None:
                logger.info("%s: already imported into %s; retired as %s", source, self.path, aside.name)
            else:
                logger.info("Imported %s into %s (%s); retired as %s", source, self.path, counts, aside.name)
        return retired


class _Corrupt(Exception):
    """The file is not a usable SQLite database."""


class _Unusable(Exception):
    """A JSON file to import does not have the shape the old code wrote."""


_EPN_COLUMNS = "epn, state, state_since, reason, failures, failing_since, last_error, last_failure, project"
_TRANSFER_COLUMNS = "id, epn, kind, started, ended, files, bytes, seconds, outcome, exit_code, error"


def _epn_state(row):
    return EpnState(row[0], row[1], _time(row[2]), row[3], row[4], _time(row[5]), row[6], _time(row[7]), row[8])


def _transfer(row):
    return Transfer(row[0], row[1], row[2], _time(row[3]), _time(row[4]), *row[5:])


# ---------------------------------------------------------------- opening, repair, migration


def _create(path):
    """Create an empty database file 0640 whatever the umask (SQLite gives its -wal and -shm the same mode)."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(descriptor, NEW_FILE_MODE)
    finally:
        os.close(descriptor)


def _connect(path, busy_timeout):
    connection = sqlite3.connect(str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    connection.text_factory = _lenient_text
    connection.execute("PRAGMA foreign_keys = ON")
    return connection


def _lenient_text(data):
    """Text from the file as str: bytes that are not UTF-8 (a damaged page) never raise."""
    return data.decode("utf-8", "replace")


def _probe(connection, path):
    """Return the file's schema version; raise _Corrupt if it is not a sound database, StoreError if it is newer."""
    try:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        # Not quick_check: it misses an index that lost rows, which then hides transfers from last_pass (fuzzing).
        problems = connection.execute("PRAGMA integrity_check(1)").fetchall()
    except sqlite3.DatabaseError as error:
        if not _is_corrupt(error):
            raise
        raise _Corrupt(f"is not a usable database ({error})") from None
    except UnicodeDecodeError:  # SQLite's own error message quoted the damaged bytes
        raise _Corrupt("is not a usable database (its schema holds bytes that are not UTF-8)") from None
    if problems != [("ok",)]:
        raise _Corrupt(f"is damaged ({' '.join(str(problems[0][0]).split())})")
    if version > len(MIGRATIONS):
        raise StoreError(
            f"{path}: the state store was written by a newer mxsync (schema {version}; this one knows up to "
            f"{len(MIGRATIONS)}); it is left as it is: run the newer mxsync, or move the file aside to start afresh"
        )
    return version


def _is_corrupt(error):
    """True for 'not a database' and 'malformed'; never for busy, locked, read-only, full or I/O errors."""
    if isinstance(error, sqlite3.OperationalError):
        return False
    text = str(error).lower()
    return "not a database" in text or "malformed" in text


def _move_aside(path, problem):
    """Rename a corrupt database (and its -wal, -shm) to mxsync.db.corrupt-<UTC time>; log one warning."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    number = 1
    while aside.exists():
        number += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{number}")
    os.rename(path, aside)
    for suffix in ("-wal", "-shm"):  # a stale log must not be replayed into the new database
        try:
            os.rename(f"{path}{suffix}", f"{aside}{suffix}")
        except FileNotFoundError:
            pass
    logger.warning(
        "%s: the state store %s; moved it to %s and built a fresh one (the record is rebuilt from ignore.yml)",
        path,
        problem,
        aside,
    )
    return aside


def _migrate(connection, path, version, quiet=False):
    """Apply the forward migrations from `version`, all in one transaction: the file ends at the new schema or the old."""
    target = len(MIGRATIONS)
    if version == target:
        return
    connection.execute("BEGIN IMMEDIATE")
    try:
        version = connection.execute("PRAGMA user_version").fetchone()[0]  # another process may have done it
        if version > target:
            raise StoreError(f"{path}: the state store was written by a newer mxsync (schema {version}); left as it is")
        for step in MIGRATIONS[version:]:
            for statement in step:
                connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {target:d}")
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    if quiet or version == target:
        return
    if version == 0:
        logger.info("%s: created the state store (schema %d)", path, target)
    else:
        logger.info("%s: migrated the state store from schema %d to %d", path, version, target)


def _retire(source):
    """Rename an imported JSON file to <name>.imported (never replacing an earlier one); return the new path."""
    aside = source.with_name(source.name + ".imported")
    if aside.exists():
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        aside = source.with_name(f"{source.name}.imported-{stamp}")
        number = 1
        while aside.exists():
            number += 1
            aside = source.with_name(f"{source.name}.imported-{stamp}-{number}")
    os.rename(source, aside)
    return aside


def _describe(error):
    text = str(error)
    if "locked" in text or "busy" in text:
        return f"{text} (another process held it longer than the busy timeout)"
    return text


# ---------------------------------------------------------------- values


def _check(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def _aware(when):
    """Return `when` (now if None) as an aware UTC datetime; a naive one is refused (whose local time would it be?)."""
    if when is None:
        return datetime.now(timezone.utc)
    if when.tzinfo is None:
        raise ValueError(f"time {when!r} has no time zone")
    return when.astimezone(timezone.utc)


def _text(when):
    """Times are stored as UTC ISO 8601 with microseconds, so that text order is time order."""
    return _aware(when).isoformat(timespec="microseconds")


def _text_or_none(when):
    return None if when is None else _text(when)


def _time(text):
    return None if text is None else datetime.fromisoformat(text)


def _person(person):
    """A portal Person (or a mapping) as a JSON-ready dict."""
    return dict(person) if isinstance(person, Mapping) else dict(vars(person))  # vars(): asdict was 40% of a poll


def _set_note(db, name, value):
    db.execute(
        "INSERT INTO notes (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (name, json.dumps(value, sort_keys=True)),
    )


def _saw(db, pairs, now):
    db.executemany(
        "INSERT INTO sightings (epn, source, first_seen, last_seen) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (epn, source) DO UPDATE SET last_seen = excluded.last_seen",
        [(epn, source, now, now) for epn, source in pairs],
    )


# ---------------------------------------------------------------- the retired JSON formats


def _imported_time(value, where):
    """A time from an old JSON file: ISO 8601, naive meaning UTC (as epnalert reads them)."""
    try:
        moment = datetime.fromisoformat(value)
        return _text(moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc))
    except (TypeError, ValueError, OverflowError):  # OverflowError: year 1 or 9999 moved to UTC
        raise _Unusable(f"{where} is not a time: {value!r}") from None


def _section(data, key):
    entries = data.get(key, {})
    if not isinstance(entries, dict):
        raise _Unusable(f"its '{key}' section is not a mapping")
    return entries


def _entry(entries, name, key, field=None):
    entry = entries[name]
    if not isinstance(entry, dict):
        raise _Unusable(f"{key}.{name} is not a mapping")
    if field is not None:
        failures = entry.get(field)
        if not isinstance(failures, int) or isinstance(failures, bool) or not 0 <= failures < 2**63:
            raise _Unusable(f"{key}.{name}.{field} is not a count")
    return entry


def _optional_time(entry, field, where):
    value = entry.get(field)
    return None if value is None else _imported_time(value, f"{where}.{field}")


def _import_history(db, data):
    """Map mxsync-state.json (mxsync.history) onto the schema; an EPN or source the store knows already is kept."""
    epns, sources, running, waiting = (_section(data, key) for key in ("epns", "sources", "running", "waiting"))
    now = _text(None)
    rows, alerts = {}, []
    for epn in epns:
        entry = _entry(epns, epn, "epns", "failures")
        last = _optional_time(entry, "last_attempt", f"epns.{epn}")
        error = entry.get("last_error")
        rows[epn] = ["failed", last or now, None, entry["failures"], last, None if error is None else str(error), last]
        if entry.get("alerted"):
            alerts.append(("epn-failure", epn, last or now))
    for epn in waiting:
        entry = _entry(waiting, epn, "waiting")
        since = _optional_time(entry, "since", f"waiting.{epn}") or now
        reason = entry.get("reason")
        row = rows.setdefault(epn, [None, None, None, 0, None, None, None])
        row[0:3] = ["waiting", since, None if reason is None else str(reason)]
    failing = []
    for name in sources:
        entry = _entry(sources, name, "sources", "failures")
        last = _optional_time(entry, "last_attempt", f"sources.{name}")
        since = _optional_time(entry, "since", f"sources.{name}") or last or now
        error = entry.get("last_error")
        failing.append((name, entry["failures"], since, None if error is None else str(error), last))
        if entry.get("alerted"):
            alerts.append(("source-failure", name, last or now))
    interrupted = [(epn, _imported_time(started, f"running.{epn}")) for epn, started in running.items()]
    last_cycle = data.get("last_cycle")

    db.executemany(
        "INSERT INTO epns (epn, state, state_since, reason, failures, failing_since, last_error, last_failure)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (epn) DO NOTHING",
        [(epn, *row) for epn, row in rows.items()],
    )
    db.executemany(
        "INSERT INTO sources (name, failures, since, last_error, last_failure) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (name) DO NOTHING",
        failing,
    )
    db.executemany(
        "INSERT INTO alerts (kind, key, sent_at, subject) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
        [(*alert, f"(imported from {HISTORY_FILE})") for alert in alerts],
    )
    db.executemany("INSERT INTO epns (epn) VALUES (?) ON CONFLICT (epn) DO NOTHING", [(epn,) for epn, _ in interrupted])
    db.executemany(
        "INSERT INTO transfers (epn, kind, started, outcome, error) VALUES (?, 'final', ?, 'interrupted', ?)",
        [(epn, started, f"running when mxsync stopped (imported from {HISTORY_FILE})") for epn, started in interrupted],
    )
    if isinstance(last_cycle, dict):
        db.execute(
            "INSERT INTO notes (name, value) VALUES ('last_cycle', ?) ON CONFLICT (name) DO NOTHING",
            (json.dumps(last_cycle, sort_keys=True),),
        )
    return (
        f"{len(epns)} failing EPNs, {len(waiting)} waiting, {len(failing)} failing sources, "
        f"{len(interrupted)} interrupted transfers"
    )


def _import_alert_state(db, data):
    """Map epnalert-state.json (epnalert.alert.AlertHistory) onto alert rows, one per EPN per alert it was in."""
    epns = _section(data, "epns")
    recipients = data.get("last_recipients", [])
    if not isinstance(recipients, list):
        raise _Unusable("its 'last_recipients' is not a list")
    last_sent = _optional_time(data, "last_sent", "the file")
    subject = "Unknown ownership of EPNs"  # epnalert.alert.SUBJECT
    alerts, first_alerted = [], {}
    for epn in epns:
        entry = _entry(epns, epn, "epns")
        if "first_alerted" not in entry:
            raise _Unusable(f"epns.{epn} has no first_alerted")
        first_alerted[epn] = _imported_time(entry["first_alerted"], f"epns.{epn}.first_alerted")
        # A row for the first alert that listed it and one for the latest; only the last one sent has known recipients.
        for sent_at in {_imported_time(entry["first_alerted"], f"epns.{epn}.first_alerted")} | {
            _optional_time(entry, "last_alerted", f"epns.{epn}")
        } - {None}:
            alerts.append((epn, sent_at, len(recipients) if sent_at == last_sent else None))
    db.executemany("INSERT INTO epns (epn) VALUES (?) ON CONFLICT (epn) DO NOTHING", [(epn,) for epn in epns])
    db.executemany(
        "INSERT INTO alerts (kind, key, sent_at, recipients, subject) VALUES ('unknown-epn', ?, ?, ?, ?)"
        " ON CONFLICT DO NOTHING",
        [(*alert, subject) for alert in alerts],
    )
    if last_sent is not None:  # what epnalert.alert.AlertHistory reads: the alert rows alone cannot say it
        note = {"last_sent": last_sent, "last_recipients": [str(r) for r in recipients], "epns": first_alerted}
        db.execute(
            "INSERT INTO notes (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            (EPNALERT_NOTE, json.dumps(note, sort_keys=True)),
        )
    return f"{len(epns)} EPNs alerted as unknown, last alert {last_sent or 'never'}"
