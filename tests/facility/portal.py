"""A stand-in for the Australian Synchrotron portal API: OAuth tokens and equipment visits, with faults."""

import base64
import itertools
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from tests.facility.net import LOOPBACK

TOKEN_PATH = "/api/v1/oauth/token"
VISITS_PATH = re.compile(r"/api/v1/equipment/(?P<equipment_id>\d+)/visits")
FAULT_KINDS = ("http500", "html", "slow", "garbage", "truncated", "unauthorized", "close")
MAINTENANCE_PAGE = (
    b"<!DOCTYPE html><html><head><title>Down for maintenance</title></head>"
    b"<body><h1>Down for maintenance</h1><p>The portal will be back shortly.</p></body></html>"
)
# Faults answered without looking at the request: (status, content type, body).
CANNED_FAULTS = {
    "http500": (500, "application/json", b'{"meta": {"error_message": "Internal Server Error"}}'),
    "html": (503, "text/html; charset=utf-8", MAINTENANCE_PAGE),
    "garbage": (200, "application/json", b"this is not JSON \x00\xff"),
    "unauthorized": (401, "application/json", b'{"meta": {"error_message": "Unauthorized"}}'),
}
DEFAULT_PRINCIPAL = ("Rosalind", "Franklin", "rosalind.franklin@uni.example.edu")


@dataclass(frozen=True)
class Credentials:
    """What a client presents for a token: form username/password and HTTP basic client name/password."""

    username: str
    password: str
    client_name: str
    client_password: str


DEFAULT_CREDENTIALS = Credentials("mx-sync", "portal-pw-S3CRET-1", "hpc-client", "client-pw-S3CRET-2")


class PortalSimulator:
    """An HTTP server on 127.0.0.1 answering the portal's token and visits endpoints; thread-safe."""

    def __init__(self):
        # Credentials keyed by equipment id, or None for credentials valid on every equipment.
        self.credentials = {None: DEFAULT_CREDENTIALS}
        self.token_lifetime = 3600.0
        self.slow_seconds = 5.0
        # How a query's times are read: a time without offset (HPC ASSyncy's form) in this zone, None
        # meaning this machine's local time; with offsets_ignored, any offset is dropped first.
        self.naive_time_zone = None
        self.offsets_ignored = False
        self.requests_log = []
        self.issued_tokens = []
        self.url = None
        self._visits = {}
        self._tokens = {}
        self._faults = []
        self._visit_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._server = None
        self._thread = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def start(self):
        """Listen on a free port of 127.0.0.1 and serve from a daemon thread."""
        self._server = ThreadingHTTPServer((LOOPBACK, 0), _Handler)
        self._server.simulator = self
        self.url = f"http://{LOOPBACK}:{self._server.server_address[1]}"
        # A short poll interval keeps stop() quick.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def stop(self):
        """Stop serving and close the socket; does nothing if not started."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = self._thread = None

    def add_equipment(self, equipment_id):
        """Make `equipment_id` known (with no visits yet), so its visits answer 200 rather than 404."""
        with self._lock:
            self._visits.setdefault(int(equipment_id), [])

    def set_credentials(self, credentials, equipment_id=None):
        """Accept `credentials` for one equipment's visits, or for every equipment when no id is given."""
        with self._lock:
            self.credentials[equipment_id] = credentials

    def add_visit(self, equipment_id, epn, start, end, principal=DEFAULT_PRINCIPAL, data_scientists=(), **extra):
        """Add a well-formed visit and return it; people are (first names, last name, email) tuples."""
        visit = {
            "id": next(self._visit_ids),
            "epn": epn,
            "start_time": _iso(start),
            "end_time": _iso(end),
            "principal_scientist": _person(principal),
            "data_scientists": [_person(scientist) for scientist in data_scientists],
            **extra,
        }
        return self.add_raw_visit(equipment_id, visit)

    def add_raw_visit(self, equipment_id, visit):
        """Add `visit` exactly as given (it may be malformed on purpose) and return it."""
        with self._lock:
            self._visits.setdefault(int(equipment_id), []).append(visit)
        return visit

    def expire_tokens(self):
        """Make every token issued so far answer 401."""
        with self._lock:
            self._tokens.clear()

    def add_fault(self, kind, path_prefix=None, count=1):
        """Queue a fault for the next `count` requests whose path starts with `path_prefix` (any if None)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; expected one of {FAULT_KINDS}")
        with self._lock:
            self._faults.append([kind, path_prefix or "", count])

    def _take_fault(self, path):
        """Return the kind of the first queued fault matching `path` and use it up, or None."""
        with self._lock:
            for fault in self._faults:
                kind, prefix, _ = fault
                if path.startswith(prefix):
                    fault[2] -= 1
                    if fault[2] == 0:
                        self._faults.remove(fault)
                    return kind
        return None

    def _log_request(self, method, path, query):
        with self._lock:
            self.requests_log.append((method, path, {k: v for k, v in query.items() if k != "access_token"}))

    def _issue_token(self, authorization, form):
        """Answer a token request: return (status, body)."""
        if form.get("grant_type") != "password":
            return 400, _error("unsupported grant_type; expected 'password'")
        client_name, client_password = _basic_auth(authorization)
        presented = (form.get("username"), form.get("password"), client_name, client_password)
        with self._lock:
            scope = {
                equipment_id
                for equipment_id, credentials in self.credentials.items()
                if presented
                == (credentials.username, credentials.password, credentials.client_name, credentials.client_password)
            }
            if not scope:
                return 401, _error("Invalid username, password or client credentials")
            token = secrets.token_urlsafe(24)
            self._tokens[token] = (time.monotonic(), scope)
            self.issued_tokens.append(token)
        return 200, {"data": {"access_token": token}}

    def _list_visits(self, equipment_id, query):
        """Answer a visits request: return (status, body)."""
        with self._lock:
            issued, scope = self._tokens.get(query.get("access_token"), (None, set()))
            if issued is None or time.monotonic() - issued > self.token_lifetime:
                return 401, _error("Invalid or expired access token")
            if equipment_id not in self._visits:
                return 404, _error(f"Equipment {equipment_id} not found")
            if None not in scope and equipment_id not in scope:
                return 403, _error(f"Token does not grant access to equipment {equipment_id}")
            visits = list(self._visits[equipment_id])
        try:
            window_start, window_end = (
                _parse_query_time(query.get(name), self.naive_time_zone, self.offsets_ignored)
                for name in ("start_time", "end_time")
            )
        except ValueError as error:
            return 400, _error(str(error))
        return 200, {"data": {"visits": [visit for visit in visits if _overlaps(visit, window_start, window_end)]}}


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to the simulator, applying any queued fault."""

    def do_GET(self):
        self._respond("GET")

    def do_POST(self):
        self._respond("POST")

    def log_message(self, format, *args):
        """Keep the test output quiet; requests_log records what matters."""

    def _respond(self, method):
        simulator = self.server.simulator
        url = urlsplit(self.path)
        query = {name: values[-1] for name, values in parse_qs(url.query).items()}
        simulator._log_request(method, url.path, query)
        fault = simulator._take_fault(url.path)
        if fault == "close":
            self.close_connection = True
            return
        if fault == "slow":
            time.sleep(simulator.slow_seconds)
        if fault in CANNED_FAULTS:
            self._send(*CANNED_FAULTS[fault])
            return
        status, body = self._route(simulator, method, url.path, query)
        payload = json.dumps(body).encode()
        if fault == "truncated":
            status, payload = 200, payload[: len(payload) // 2]
        self._send(status, "application/json", payload)

    def _route(self, simulator, method, path, query):
        visits = VISITS_PATH.fullmatch(path)
        if path == TOKEN_PATH:
            if method != "POST":
                return 405, _error("Use POST")
            return simulator._issue_token(self.headers.get("Authorization"), self._read_form())
        if visits:
            if method != "GET":
                return 405, _error("Use GET")
            return simulator._list_visits(int(visits["equipment_id"]), query)
        return 404, _error(f"No route for {path}")

    def _read_form(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", errors="replace")
        return {name: values[-1] for name, values in parse_qs(body).items()}

    def _send(self, status, content_type, payload):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def _error(message):
    return {"meta": {"error_message": message}}


def _basic_auth(header):
    """Return (user, password) from an HTTP basic Authorization header, or (None, None)."""
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except ValueError:
        return None, None
    return user, password


def _iso(moment):
    """Return `moment` (a datetime, naive meaning UTC, or an already formatted string) as ISO 8601."""
    if isinstance(moment, str):
        return moment
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.isoformat()


def _person(person):
    """Return a portal person from a (first names, last name, email) tuple or a ready dict."""
    if isinstance(person, dict):
        return person
    first_names, last_name, email = person
    return {"first_names": first_names, "last_name": last_name, "email": email}


def _parse_query_time(text, naive_zone, offsets_ignored):
    """Parse a query's ISO 8601 time; one without an offset is read in `naive_zone` (None: local time)."""
    if not isinstance(text, str) or not text:
        raise ValueError("start_time and end_time are required")
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None or offsets_ignored:
        wall_clock = moment.replace(tzinfo=None)
        moment = wall_clock.replace(tzinfo=naive_zone) if naive_zone else wall_clock.astimezone()
    return moment


def _parse_time(text):
    """Parse a stored visit's ISO 8601 time, which must carry a UTC offset."""
    if not isinstance(text, str) or not text:
        raise ValueError("start_time and end_time are required")
    try:
        # fromisoformat() before Python 3.11 does not read a trailing "Z".
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise ValueError(f"{text!r} is not an ISO 8601 time with a UTC offset")
    return moment


def _overlaps(visit, window_start, window_end):
    """True if the visit's times overlap the window; a visit with unreadable times is always listed."""
    # Malformed visits are there to test the client's checks, so the filter must let them through.
    try:
        return _parse_time(visit["start_time"]) <= window_end and _parse_time(visit["end_time"]) >= window_start
    except (KeyError, TypeError, ValueError):
        return True
