"""The scientists' email: once an EPN is recorded, its principal and data scientists are told where their data is.

A follow-up action (see mxsync/followups.py): `run(record, dry_run)` sends one email, text and HTML from the
templates synced-text.j2 and synced-html.j2 (a site's own in notify-scientists-template-folder win).
Names and addresses come from the portal: names are shown escaped, addresses must be plain ones.
"""

import logging
import socket
from datetime import datetime
from email.headerregistry import Address
from email.utils import formatdate, make_msgid

from epnalert.render import format_time, printable, render_pair
from mxsync.config import EMAIL_PATTERN
from mxsync.errors import FollowUpError, MailError
from mxsync.mail import build_message, send_message
from mxsync.names import describe

logger = logging.getLogger("mxsync.scientists")

TEXT_TEMPLATE = "synced-text.j2"
HTML_TEMPLATE = "synced-html.j2"
UNKNOWN = "unknown"


class NotifyScientists:
    """The follow-up action that emails a recorded EPN's principal and data scientists."""

    name = "notify-scientists"

    def __init__(self, config, hostname=None):
        self.config = config
        self.hostname = hostname or socket.gethostname()

    def applies(self, project):
        """Return whether the scientists of an EPN of this project are emailed (notify-scientists)."""
        setting = self.config.notify_scientists
        return project in setting if isinstance(setting, tuple) else bool(setting)

    def run(self, record, dry_run=False):
        """Send the email for this record (nothing when nobody is left to email); raise FollowUpError if it fails."""
        epn = printable(str(record["epn"]))
        if not self.applies(record.get("project")):
            logger.debug("%s: notify-scientists does not include project %s", epn, record.get("project"))
            return
        people = self.recipients(record)
        if not people:
            logger.info("%s: no scientist with an email address (after notify-scientists-exclude); none emailed", epn)
            return
        shown = ", ".join(map(str, people))
        if dry_run:
            logger.info("%s: would email %s", epn, shown)
            return
        envelope = [person.addr_spec for person in people]
        try:
            message = self.message(record, people)
            answer = send_message(self.config.smtp, message, envelope)
        except MailError as error:
            raise FollowUpError(
                f"{epn}: cannot email its scientists ({', '.join(envelope)}): {error}; "
                "mxsync tries again at its next cycle"
            ) from None
        logger.info("%s: emailed %s (%s)", epn, shown, answer)

    def recipients(self, record):
        """Return the principal's and data scientists' Addresses: each address once, none excluded, names on one line."""
        epn = printable(str(record["epn"]))
        excluded = set(self.config.notify_scientists_exclude)
        found = {}
        for person in _people(record):
            if not person.get("email"):
                continue
            name, email = _one_line(person.get("name") or ""), str(person["email"]).strip()
            if EMAIL_PATTERN.fullmatch(email) is None:
                logger.warning(
                    "%s: %s has the email address %s, which is not one; not emailed", epn, name, describe(email)
                )
                continue
            if email.lower() in excluded or email.lower() in found:
                continue
            found[email.lower()] = Address(display_name=name, addr_spec=email)
        return list(found.values())

    def message(self, record, people):
        """Return the email (text and HTML) for this record, to these recipients (from recipients())."""
        values = self.values(record, people)
        text, html = render_pair(self.config.notify_scientists_template_folder, TEXT_TEMPLATE, HTML_TEMPLATE, values)
        message = build_message(values["subject"], self.config.email_from, list(map(str, people)), text, html)
        message["Reply-To"] = ", ".join(self.config.mxsync_email_to)
        message["Date"] = formatdate(localtime=True)
        message["Message-ID"] = make_msgid(domain=self.config.email_from.rpartition("@")[2].rstrip(">"))
        return message

    def values(self, record, people):
        """Return what the templates get; every string from outside is on one line, hidden characters escaped."""
        from mxsync.pipeline import human_bytes  # not at the top: the pipeline may come to import the follow-ups

        epn = printable(str(record["epn"]))
        files, size = record.get("files"), record.get("bytes")
        return {
            "subject": f"Your data from EPN {epn} is at {self.hostname}",
            "epn": epn,
            "project": printable(str(record.get("project") or UNKNOWN)),
            "destination": printable(str(record["destination"])),
            "beamline": printable(str(record.get("beamline") or UNKNOWN)),
            "visit_start": _when(record.get("visit_start")),
            "visit_end": _when(record.get("visit_end")),
            "names": [person.display_name for person in people if person.display_name],
            "recipients": list(map(str, people)),
            "files": f"{files:,}" if isinstance(files, int) else UNKNOWN,
            "size": human_bytes(size) if isinstance(size, int) else UNKNOWN,
            "bytes": f"{size:,}" if isinstance(size, int) else UNKNOWN,
            "bagged": bool(record.get("bagged")),
            "contacts": list(self.config.mxsync_email_to),
            "hostname": self.hostname,
        }


def check_templates(config):
    """Render the scientists' email on a sample record; return a one-line detail or raise MailError (`mxsync check`)."""
    record = {
        "epn": "20001a",
        "project": "ab12",
        "destination": str(config.destination_root / "ab12" / "20001a"),
        "beamline": "mx",
        "visit_start": "2024-04-28T09:00:00+10:00",
        "visit_end": "2024-04-29T09:00:00+10:00",
        "principal": {"name": "Zoë Ångström", "email": "zoe.angstrom@example.org"},
        "scientists": [{"name": '<b>Bob</b> & "Co"\r\nBcc: x@example.org', "email": "bob@example.org"}],
        "files": 12345,
        "bytes": 987654321098,
        "bagged": False,
    }
    action = NotifyScientists(config)
    action.message(record, action.recipients(record))
    folder = config.notify_scientists_template_folder
    return f"{folder} (or the built-in ones) render on sample data" if folder else "built-in templates render"


def _people(record):
    return [person for person in [record.get("principal")] + list(record.get("scientists") or ()) if person]


def _when(text):
    """Given an ISO 8601 time (or None), return it as epnalert shows times ('2024-04-28 09:00 +10:00')."""
    if not text:
        return UNKNOWN
    try:
        return format_time(datetime.fromisoformat(str(text)))
    except ValueError:
        return _one_line(text)


def _one_line(text):
    """Return a name from outside on one line: hidden characters (CR, LF, bidi overrides) escaped, spaces collapsed."""
    return " ".join(printable(str(text)).split())
