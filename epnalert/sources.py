"""Gathering what the facility shows: EPN folders on SFTP and visits on the portal.

Each source may fail on its own; a failure is recorded with its reason and the other source
still counts. Only when nothing at all could be learnt does the caller give up.
"""

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from mxsync.errors import PortalError, SftpError

logger = logging.getLogger("epnalert.sources")

# Visits starting up to this many days ahead count too: staff can map an EPN before its data arrives.
UPCOMING_DAYS = 7

SFTP, PORTAL = "SFTP", "portal"


@dataclass(frozen=True)
class SourceFailure:
    """One part of a source (the SFTP login, one listing, one equipment's visits) that could not be used."""

    source: str  # SFTP or portal
    part: str  # e.g. "sftp.example.org:22" or "equipment 23 (mx1)"
    reason: str

    def __str__(self):
        return f"{self.source} {self.part}: {self.reason}"


@dataclass
class Gathered:
    """Everything learnt in one run, with what could not be learnt."""

    window_start: object
    window_end: object
    sftp_folders: dict = field(default_factory=dict)  # EPN -> [source paths it was listed under]
    visits: list = field(default_factory=list)  # mxsync.portal.Visit
    suspicious: list = field(default_factory=list)  # mxsync.portal.Suspicious
    failures: list[SourceFailure] = field(default_factory=list)
    sftp_parts_ok: int = 0
    portal_parts_ok: int = 0

    def failed(self, source):
        """Return True if no part of `source` gave an answer."""
        parts_ok = self.sftp_parts_ok if source == SFTP else self.portal_parts_ok
        return parts_ok == 0 and any(failure.source == source for failure in self.failures)


def visit_window(config, now):
    """Given an aware `now`, return the (start, end) of the visits that count."""
    return now - timedelta(days=config.visit_day_range), now + timedelta(days=UPCOMING_DAYS)


def gather(config, now):
    """Given the config and an aware `now`, list SFTP (one connection) and ask the portal for every equipment."""
    start, end = visit_window(config, now)
    gathered = Gathered(window_start=start, window_end=end)
    _list_sftp(config, gathered)
    _ask_portal(config, gathered)
    return gathered


def _list_sftp(config, gathered):
    from mxsync.sftp import SftpClient

    client = SftpClient(config)
    try:
        client.connect()
    except SftpError as error:
        gathered.failures.append(SourceFailure(SFTP, client.where, _without_prefix(error, client)))
        return
    try:
        for path in config.source_paths:
            try:
                epns, suspicious = client.list_epns(path)
            except SftpError as error:
                gathered.failures.append(SourceFailure(SFTP, f"{client.where} {path}", _without_prefix(error, client)))
                continue
            gathered.sftp_parts_ok += 1
            for epn in epns:
                gathered.sftp_folders.setdefault(epn, []).append(path)
            gathered.suspicious += suspicious
            logger.info("SFTP %s:%s lists %d EPN folders", client.where, path, len(epns))
    finally:
        client.close()


def _without_prefix(error, client):
    """The SFTP error without its 'SFTP host:port: ' prefix, which the failure's own label already gives."""
    text, prefix = str(error), f"SFTP {client.where}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _ask_portal(config, gathered):
    from mxsync.portal import PortalClient

    portal = PortalClient(config)
    for equipment in config.equipment:
        part = f"equipment {equipment.id} ({equipment.beamline})"
        try:
            visits, suspicious = portal.visits(equipment, gathered.window_start, gathered.window_end)
        except PortalError as error:
            gathered.failures.append(SourceFailure(PORTAL, part, str(error)))
            continue
        gathered.portal_parts_ok += 1
        gathered.visits += visits
        gathered.suspicious += suspicious
        logger.info(
            "Portal %s: %d visits from %s to %s",
            part,
            len(visits),
            gathered.window_start.date(),
            gathered.window_end.date(),
        )
