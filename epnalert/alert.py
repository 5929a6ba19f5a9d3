"""What the alert is about and when it goes out: unknown EPNs, what is new since the previous alert, the run.

An EPN is *unknown* when it is on SFTP or booked on the portal and its number is not in
epn_cap_map. The state store (shared with mxsync) remembers the EPNs of the last alert sent, so that
the next one can mark what is new; it changes only after a successful send, never in a dry run.
"""

from __future__ import annotations

import logging
import socket
import sys
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

from mxsync.errors import MailError, MxsyncError, StateFileError, StoreError
from mxsync.logsetup import FILE_ONLY
from mxsync.names import epn_number

# datetime.UTC is Python 3.11+; mxsync supports 3.9.
UTC = timezone.utc  # noqa: UP017

logger = logging.getLogger("epnalert")
email_logger = logging.getLogger("epnalert.email")

SUBJECT = "Unknown ownership of EPNs"
STATE_FILE_NAME = "epnalert-state.json"  # retired: imported into the state store once
ALERT_KIND = "unknown-epn"  # its rows in the store's alerts table
# A repeat may come this much early (capped at a tenth of the period): cron's daily 01:00 run
# starts a few seconds earlier or later each day, and "every 7 days" must still mean weekly.
REPEAT_SLACK = timedelta(hours=1)


class NothingToAlertOnError(MxsyncError):
    """Neither SFTP nor the portal could be used, so nothing can be said about unknown EPNs."""


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class UnknownEpn:
    """An EPN nobody has claimed, with where it was seen and its visits (earliest first)."""

    epn: str
    sftp_paths: tuple[str, ...] = ()
    visits: tuple = ()  # mxsync.portal.Visit
    beamlines: tuple[str, ...] = ()
    new: bool = True
    first_alerted: datetime | None = None  # when an earlier alert first listed it; None if new

    @property
    def number(self):
        return epn_number(self.epn)

    @property
    def on_sftp(self):
        return bool(self.sftp_paths)

    @property
    def on_portal(self):
        return bool(self.visits)

    @property
    def seen_on(self):
        return {
            (True, True): "SFTP and portal",
            (True, False): "SFTP",
            (False, True): "portal",
        }[self.on_sftp, self.on_portal]

    @property
    def visit(self):
        """The first visit, or None (most EPNs have exactly one)."""
        return self.visits[0] if self.visits else None


@dataclass
class Alert:
    """Everything one alert says; templates get it as `alert`."""

    unknown: list  # UnknownEpn, new ones first
    suspicious: list = field(default_factory=list)  # mxsync.portal.Suspicious
    failed_sources: list = field(default_factory=list)  # epnalert.sources.SourceFailure
    generated_at: datetime | None = None
    window_start: datetime | None = None
    window_end: datetime | None = None
    previous_sent_at: datetime | None = None
    config_path: str = ""
    hostname: str = ""
    map_file: str = ""  # the epn-cap-map-file, where new mappings go; "" when unset (epn_cap_map in config_path)

    @property
    def new(self):
        return [item for item in self.unknown if item.new]

    @property
    def with_visit(self):
        return [item for item in self.unknown if item.visits]

    @property
    def without_visit(self):
        return [item for item in self.unknown if not item.visits]

    @property
    def complete(self):
        """True if every source answered, so the list is complete."""
        return not self.failed_sources


def epn_sort_key(epn):
    number = epn_number(epn)
    return int(number), epn[len(number) :]


def find_unknown(sftp_folders, visits, cap_map, beamline_of_path=None):
    """Given {EPN: [SFTP paths]}, portal visits and epn_cap_map, return the unknown EPNs sorted by EPN.

    Visits and folders of EPNs whose number is mapped are left out; each unknown EPN carries all of its visits.
    """
    beamline_of_path = beamline_of_path or {}
    # Grouped once: scanning every visit for every unknown EPN was quadratic (10,000 x 10,000 at scale).
    visits_of = {}
    for visit in visits:
        visits_of.setdefault(visit.epn, []).append(visit)
    unknown = []
    for epn in sorted(set(sftp_folders) | set(visits_of), key=epn_sort_key):
        if epn_number(epn) in cap_map:
            continue
        own_visits = sorted(
            visits_of.get(epn, ()),
            key=lambda visit: (
                visit.start is None,
                visit.start or datetime.min.replace(tzinfo=UTC),
            ),
        )
        paths = tuple(sftp_folders.get(epn, ()))
        beamlines = [visit.beamline for visit in own_visits] + [beamline_of_path.get(path) for path in paths]
        unknown.append(
            UnknownEpn(
                epn=epn,
                sftp_paths=paths,
                visits=tuple(own_visits),
                beamlines=tuple(dict.fromkeys(name for name in beamlines if name)),
            )
        )
    return unknown


def mark_new(unknown, previous_epns):
    """Given unknown EPNs and {EPN: first alerted} of the previous alert, return them marked, new ones first."""
    marked = [
        replace(
            item,
            new=item.epn not in previous_epns,
            first_alerted=previous_epns.get(item.epn),
        )
        for item in unknown
    ]
    return sorted(marked, key=lambda item: (not item.new, epn_sort_key(item.epn)))


def decide(alert, last_sent, now, only_new=False, repeat_days=0.0):
    """Given an alert, when the previous one was sent and the options, return (send?, reason)."""
    if not alert.unknown:
        return False, "no unknown EPNs"
    if alert.new:
        return True, f"{len(alert.new)} new unknown EPN(s)"
    if last_sent is None:
        return True, "no alert sent before"
    if only_new:
        return (
            False,
            f"nothing new since the alert of {last_sent.isoformat(timespec='minutes')} (epnalert-only-new)",
        )
    if repeat_days <= 0:
        return True, "unchanged, repeated every run (epnalert-repeat-days 0)"
    period = timedelta(days=repeat_days)
    due = last_sent + period - min(REPEAT_SLACK, period / 10)
    if now >= due:
        return (
            True,
            f"unchanged, repeated after {repeat_days:g} days (epnalert-repeat-days)",
        )
    return False, (
        f"nothing new since the alert of {last_sent.isoformat(timespec='minutes')}; "
        f"repeated after {repeat_days:g} days (epnalert-repeat-days)"
    )


# ---------------------------------------------------------------- the state store


@dataclass
class Previous:
    """What the state store says about the last alert sent."""

    sent_at: datetime | None = None
    epns: dict = field(default_factory=dict)  # EPN -> first alerted (aware datetime)


class AlertHistory:
    """The last alert sent and the EPNs it listed, with when each was first alerted, in `<state-dir>/mxsync.db`.

    Every alert is a row per EPN in the store's alerts table; a note keeps what the next alert needs.
    A dry run reads a copy in memory and writes nothing.
    """

    def __init__(self, state_dir, dry_run=False):
        from mxsync.store import DB_NAME

        self.state_dir = state_dir
        self.path = state_dir / DB_NAME
        self.dry_run = dry_run
        self._store = None

    def load(self):
        """Open the store (importing epnalert-state.json once) and return the Previous alert; raise StoreError."""
        from mxsync.store import EPNALERT_NOTE, Store

        if self._store is None:
            self._store = Store.open(self.state_dir, dry_run=self.dry_run)
        note = self._store.get_note(EPNALERT_NOTE)
        if not note:
            return Previous()
        try:
            sent_at = _parse_time(note["last_sent"]) if note.get("last_sent") else None
            epns = {str(epn): _parse_time(first) for epn, first in note.get("epns", {}).items()}
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as error:
            raise StateFileError(
                f"{self.path}: epnalert's note of the last alert is not in the expected form "
                f"({type(error).__name__}: {error}); every unknown EPN is marked new until an alert is sent"
            ) from None
        return Previous(sent_at=sent_at, epns=epns)

    def record(self, alert, previous, sent_at, recipients, keep_unseen=False):
        """Remember the alert just sent; with keep_unseen (a source failed) EPNs not seen this time stay remembered."""
        from mxsync.store import EPNALERT_NOTE, Store

        epns = {}
        if keep_unseen:
            epns.update({epn: first.isoformat() for epn, first in previous.epns.items()})
        for item in alert.unknown:
            epns[item.epn] = (item.first_alerted or sent_at).isoformat()
        note = {"last_sent": sent_at.isoformat(), "last_recipients": list(recipients), "epns": epns}
        if self._store is None:
            self._store = Store.open(self.state_dir, dry_run=self.dry_run)
        self._store.alert_sent(
            ALERT_KIND,
            [item.epn for item in alert.unknown],
            recipients=len(recipients),
            subject=SUBJECT,
            when=sent_at,
            note=(EPNALERT_NOTE, note),
        )

    def seen(self, config, gathered):
        """Note in the store every EPN this run saw (SFTP folders, the portal's visits), mapped or not."""
        from mxsync.names import epn_number

        def projects(epns):
            return {epn: config.project_for(epn_number(epn)) for epn in epns}

        try:
            self._store.record_seen("sftp", projects(gathered.sftp_folders))
            self._store.record_seen("portal", projects({visit.epn for visit in gathered.visits}))
            self._store.record_visits(gathered.visits)
        except StoreError as error:  # bookkeeping only: the alert goes out all the same
            logger.warning("%s; the EPNs seen this run are not remembered", error, extra=FILE_ONLY)

    def close(self):
        if self._store is not None:
            self._store.close()
            self._store = None


def _parse_time(text):
    """Return a stored time in the local time zone, as the email shows it (naive means UTC)."""
    moment = datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone()


# ---------------------------------------------------------------- the run


def run_alert(config, dry_run=False, now=None):
    """Gather, decide, render and send (or print, in a dry run); return the exit code."""
    now = now or datetime.now(UTC)
    history = AlertHistory(config.state_dir, dry_run=dry_run)
    try:
        return _run_alert(config, dry_run, now, history)
    finally:
        history.close()


def _run_alert(config, dry_run, now, history):
    from epnalert.sources import gather

    try:
        previous, state_problem = history.load(), None
    except (StoreError, StateFileError) as error:
        # The alert matters more than its bookkeeping: send it with everything marked new, record nothing, fail after.
        previous, state_problem = Previous(), error
        logger.error(
            "%s; alerting with every EPN marked new, the state store is left as it is",
            error,
            extra=FILE_ONLY,
        )

    gathered = gather(config, now)
    if state_problem is None:
        history.seen(config, gathered)
    alert = build_alert(config, gathered, previous, now)
    send, reason = decide(
        alert,
        previous.sent_at,
        now,
        config.epnalert_only_new,
        config.epnalert_repeat_days,
    )
    logger.info(
        "%d unknown EPNs (%d new), %d suspicious names, %d failed sources: %s",
        len(alert.unknown),
        len(alert.new),
        len(alert.suspicious),
        len(alert.failed_sources),
        ("sending the alert" if send else "no email") + f" ({reason})",
    )
    # Suspicious names always reach the log; as warnings (so cron mails them) only when no alert carries them.
    for record in alert.suspicious:
        logger.log(
            logging.INFO if send else logging.WARNING,
            "Suspicious name from %s: %s (%s)",
            record.source,
            record.name,
            record.reason,
        )

    if dry_run:
        _print_dry_run(config, alert, send, reason)
    elif send:
        _send(config, alert)
        if state_problem is None:
            try:
                history.record(
                    alert,
                    previous,
                    now,
                    config.email_to,
                    keep_unseen=bool(alert.failed_sources),
                )
            except StoreError as error:
                raise StoreError(f"the alert was sent, but it could not be recorded: {error}") from None
    if state_problem is not None:
        raise state_problem
    return 0


def build_alert(config, gathered, previous, now):
    """Given what the sources gave and the previous alert, return the Alert; raise if both sources failed."""
    from epnalert.sources import PORTAL, SFTP

    if gathered.failed(SFTP) and gathered.failed(PORTAL):
        for failure in gathered.failures:
            logger.error("%s", failure, extra=FILE_ONLY)
        reasons = "; ".join(_one_line(str(failure)) for failure in gathered.failures)
        raise NothingToAlertOnError(f"both SFTP and the portal failed, no alert sent: {reasons}")
    for failure in gathered.failures:
        logger.warning("Source failed, the alert will say so: %s", failure)
    beamline_of_path = {equipment.source_path: equipment.beamline for equipment in config.equipment}
    unknown = find_unknown(gathered.sftp_folders, gathered.visits, config.epn_cap_map, beamline_of_path)
    return Alert(
        unknown=mark_new(unknown, previous.epns),
        suspicious=list(gathered.suspicious),
        failed_sources=list(gathered.failures),
        generated_at=now.astimezone(),
        window_start=gathered.window_start.astimezone(),
        window_end=gathered.window_end.astimezone(),
        previous_sent_at=previous.sent_at,
        config_path=str(config.path),
        hostname=socket.gethostname(),
        map_file=str(config.epn_cap_map_file or ""),
    )


def _print_dry_run(config, alert, send, reason):
    if not alert.unknown:
        output = "# epnalert --dry-run: no unknown EPNs, so no email would be sent.\n"
    else:
        verdict = f"would be sent to {', '.join(config.email_to)}" if send else "would NOT be sent"
        output = f"# epnalert --dry-run: this email {verdict} ({reason}); nothing sent, no state changed.\n"
        output += describe_message(compose(config, alert)) + "\n"
    sys.stdout.write(output)
    # Flushed here, not at exit: a reader that went away (`| head`) must show up while errors are still handled.
    sys.stdout.flush()


def _send(config, alert):
    from mxsync.mail import send_message

    message = compose(config, alert)
    try:
        answer = send_message(config.smtp, message, config.email_to)
    except MailError as error:
        logger.error("Alert about %s not sent: %s", _epn_list(alert), error, extra=FILE_ONLY)
        raise
    email_logger.info(
        "Sent to %s, subject %r, EPNs %s; SMTP answer: %s",
        ", ".join(config.email_to),
        SUBJECT,
        _epn_list(alert),
        _one_line(answer),
    )


def compose(config, alert):
    """Given the config and an alert, return the email message (text and, unless only a text template is set, HTML)."""
    from email.utils import formatdate, make_msgid

    from epnalert.render import render_email
    from mxsync.mail import build_message

    text, html = render_email(config, alert, SUBJECT)
    message = build_message(SUBJECT, config.email_from, config.email_to, text, html)
    message["Date"] = formatdate(alert.generated_at.timestamp(), localtime=True)
    message["Message-ID"] = make_msgid(domain=config.email_from.rpartition("@")[2])
    return message


def describe_message(message):
    """Given a message, return its headers and each part decoded, for reading on a terminal."""
    lines = [f"{name}: {value}" for name, value in message.items()]
    for part in message.walk():
        if part.is_multipart():
            continue
        lines += [
            "",
            f"----- {part.get_content_type()} -----",
            part.get_content().rstrip("\n"),
        ]
    return "\n".join(lines) + "\n"


def _epn_list(alert):
    return ", ".join(item.epn + (" (new)" if item.new else "") for item in alert.unknown)


def _one_line(text):
    return " ".join(str(text).split())
