"""The facility portal's REST API: an access token by the password grant, then visits per equipment."""

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

import requests

from mxsync.errors import PortalError
from mxsync.logsetup import FILE_ONLY, masker
from mxsync.names import describe, is_epn

logger = logging.getLogger("mxsync.portal")

TOKEN_PATH = "/api/v1/oauth/token"
VISITS_PATH = "/api/v1/equipment/{equipment_id}/visits"
# A visits answer larger than this is refused rather than held in memory.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Person:
    first_names: str
    last_name: str
    email: str

    @property
    def name(self):
        return " ".join(part for part in (self.first_names, self.last_name) if part)


@dataclass(frozen=True)
class Visit:
    """One booked visit (beamtime) of an EPN on one equipment; times are timezone-aware, or None if the portal omitted them."""

    epn: str
    start: Optional[datetime]
    end: Optional[datetime]
    equipment_id: int
    beamline: str
    principal_scientist: Optional[Person]
    data_scientists: tuple[Person, ...]


@dataclass(frozen=True)
class Suspicious:
    """A name or record a source gave that could not be used; reported, never silently dropped."""

    source: str
    name: str
    reason: str


class PortalClient:
    """Talks to the portal for the configured equipment; one token per set of credentials, renewed once on 401."""

    def __init__(self, config, session=None):
        self.config = config
        self.session = session or requests.Session()
        self._tokens = {}

    def visits(self, equipment, start, end):
        """Given an equipment and an aware time window, return (visits, suspicious records) overlapping it."""
        url = self.config.base_url + VISITS_PATH.format(equipment_id=equipment.id)
        style = self.config.portal_time_format
        params = {"start_time": format_portal_time(start, style), "end_time": format_portal_time(end, style)}
        for attempt in ("first", "after re-authenticating"):
            params["access_token"] = self._token(equipment, renew=attempt != "first")
            response = self._request("GET", url, f"visits of equipment {equipment.id}", params=params)
            if response.status_code != 401:
                break
            logger.info("Portal refused the token for equipment %s (HTTP 401); authenticating again", equipment.id)
        else:
            raise PortalError(
                f"portal {self.config.base_url} refused a fresh access token for equipment {equipment.id} (HTTP 401); "
                "check the equipment's username and password"
            )
        body = self._json(response, f"visits of equipment {equipment.id}")
        raw_visits = body.get("data", {}).get("visits") if isinstance(body.get("data"), dict) else None
        if not isinstance(raw_visits, list):
            raise PortalError(
                f"portal {self.config.base_url}: visits of equipment {equipment.id}: "
                f"expected {{'data': {{'visits': [...]}}}}, got {describe(body)}"
            )
        return parse_visits(raw_visits, equipment)

    def check_token(self, equipment):
        """Fetch a token for the equipment's credentials (for `mxsync check`)."""
        self._token(equipment, renew=True)

    def _token(self, equipment, renew=False):
        credentials = (equipment.username, equipment.password, equipment.client_name, equipment.client_password)
        if renew or credentials not in self._tokens:
            self._tokens[credentials] = self._fetch_token(equipment)
        return self._tokens[credentials]

    def _fetch_token(self, equipment):
        what = f"access token for equipment {equipment.id}"
        response = self._request(
            "POST",
            self.config.base_url + TOKEN_PATH,
            what,
            auth=(equipment.client_name, equipment.client_password),
            data={"username": equipment.username, "password": equipment.password, "grant_type": "password"},
        )
        body = self._json(response, what, allow_error_status=True)
        token = body.get("data", {}).get("access_token") if isinstance(body.get("data"), dict) else None
        if response.status_code != 200 or not isinstance(token, str) or not token:
            reason = _error_message(body) or f"HTTP {response.status_code}"
            raise PortalError(
                f"portal {self.config.base_url} refused the {what}: {reason}; "
                f"check username/password and client_name/client_password of equipment {equipment.id}"
            )
        masker.register(token)
        logger.debug("Obtained an access token for equipment %s", equipment.id)
        return token

    def _request(self, method, url, what, **kwargs):
        """Send one request, retrying connection errors, timeouts and 5xx answers with backoff."""
        attempts = self.config.portal_retries + 1
        for attempt in range(1, attempts + 1):
            problem = None
            try:
                response = self.session.request(method, url, timeout=self.config.portal_timeout, stream=True, **kwargs)
                _read_limited(response)
            except requests.Timeout:
                problem = f"no answer within {self.config.portal_timeout:g} s"
            except requests.ConnectionError as error:
                problem = f"cannot connect ({_short_reason(error)})"
            except requests.RequestException as error:
                problem = masker.mask(str(error))
            else:
                if response.status_code < 500:
                    return response
                problem = f"HTTP {response.status_code}{_page_summary(response)}"
            if attempt < attempts:
                delay = self.config.portal_retry_delay * 2 ** (attempt - 1)
                # File only: if the retries fail, the error says so; under cron every console line becomes mail.
                logger.warning(
                    "Portal %s: %s: %s; retrying in %.1f s (%d/%d)",
                    self.config.base_url,
                    what,
                    problem,
                    delay,
                    attempt,
                    attempts - 1,
                    extra=FILE_ONLY,
                )
                time.sleep(delay)
        raise PortalError(f"portal {self.config.base_url} unusable: {what}: {problem} (after {attempts} attempts)")

    def _json(self, response, what, allow_error_status=False):
        if not allow_error_status and response.status_code != 200:
            reason = _page_summary(response) or f": {describe(response.text, 120)}"
            raise PortalError(f"portal {self.config.base_url}: {what}: HTTP {response.status_code}{reason}")
        if _looks_like_html(response):
            raise PortalError(
                f"portal {self.config.base_url}: {what}: answered HTTP {response.status_code} with an HTML page"
                f"{_page_summary(response)} instead of JSON; the portal may be down for maintenance"
            )
        try:
            body = json.loads(response.content)
        except (ValueError, RecursionError):  # RecursionError: arrays or objects nested thousands deep
            raise PortalError(
                f"portal {self.config.base_url}: {what}: answer is not valid JSON (starts {describe(response.text[:60])})"
            ) from None
        if not isinstance(body, dict):
            raise PortalError(f"portal {self.config.base_url}: {what}: expected a JSON object, got {describe(body)}")
        return body


def format_portal_time(moment, style):
    """Given an aware datetime, return it as a visits query sends it: 'local', 'utc' or 'utc-offset'.

    'local' is what HPC ASSyncy sent (`datetime.now().isoformat()`): this host's wall-clock time
    without an offset, the form the production portal is known to accept.
    """
    if style == "utc-offset":
        return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")
    zone = timezone.utc if style == "utc" else None  # astimezone(None) is this host's local time
    return moment.astimezone(zone).replace(tzinfo=None).isoformat(timespec="microseconds")


def parse_visits(raw_visits, equipment):
    """Given the portal's visit records for one equipment, return (visits, suspicious records)."""
    visits, suspicious = [], []
    source = f"portal equipment {equipment.id}"
    for raw in raw_visits:
        if not isinstance(raw, dict):
            suspicious.append(Suspicious(source, describe(raw), "visit record is not an object"))
            continue
        epn = raw.get("epn")
        if not is_epn(epn):
            suspicious.append(Suspicious(source, describe(epn), "visit's EPN is not of the form digits + letters"))
            continue
        visits.append(
            Visit(
                epn=epn,
                start=_parse_time(raw.get("start_time"), source, epn, suspicious),
                end=_parse_time(raw.get("end_time"), source, epn, suspicious),
                equipment_id=equipment.id,
                beamline=equipment.beamline,
                principal_scientist=_person(raw.get("principal_scientist")),
                data_scientists=tuple(person for person in map(_person, raw.get("data_scientists") or []) if person)
                if isinstance(raw.get("data_scientists"), (list, type(None)))
                else (),
            )
        )
    return visits, suspicious


def _parse_time(value, source, epn, suspicious):
    """Return an aware datetime; times without an offset are taken as UTC, unusable ones are reported."""
    if not isinstance(value, str):
        suspicious.append(Suspicious(source, epn, f"visit time missing or not text: {describe(value)}"))
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        suspicious.append(Suspicious(source, epn, f"visit time is not ISO 8601: {describe(value)}"))
        return None
    if moment.tzinfo is None:
        logger.debug("Visit of %s has a time without offset (%s); taking it as UTC", epn, value)
        moment = moment.replace(tzinfo=timezone.utc)
    return moment


def _person(raw):
    if not isinstance(raw, dict):
        return None
    fields = [raw.get(key) for key in ("first_names", "last_name", "email")]
    fields = [value.strip() if isinstance(value, str) else "" for value in fields]
    return Person(*fields) if any(fields) else None


def _read_limited(response):
    """Read the body into response._content, refusing answers over MAX_RESPONSE_BYTES."""
    chunks, size = [], 0
    for chunk in response.iter_content(chunk_size=1024 * 1024):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            response.close()
            raise requests.RequestException(f"answer larger than {MAX_RESPONSE_BYTES // (1024 * 1024)} MiB refused")
        chunks.append(chunk)
    response._content = b"".join(chunks)


def _looks_like_html(response):
    content_type = response.headers.get("Content-Type", "")
    return "html" in content_type or response.content.lstrip()[:1] == b"<"


def _page_summary(response):
    """Return ': <title or first text>' of an HTML error page, or '' if the answer is not HTML."""
    if not response.content or not _looks_like_html(response):
        return ""
    from bs4 import BeautifulSoup  # only needed on this error path

    page = BeautifulSoup(response.content, "html.parser")
    title = page.title.get_text(" ", strip=True) if page.title else ""
    text = title or " ".join(page.get_text(" ", strip=True).split())
    return f": '{text[:120]}'" if text else ""


def _error_message(body):
    meta = body.get("meta")
    message = meta.get("error_message") if isinstance(meta, dict) else None
    return describe(message, 160) if message else None


def _short_reason(error):
    """Return the innermost reason of a connection error, without the URL (which carries the token)."""
    reason = error.args[0] if error.args else error
    reason = getattr(reason, "reason", reason)
    return masker.mask(str(reason))
