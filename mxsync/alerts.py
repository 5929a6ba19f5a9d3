"""Telling staff about persistent failures; a notification that fails is logged and never fails the job."""

import logging

from mxsync.errors import MailError
from mxsync.mail import build_message, send_message

logger = logging.getLogger("mxsync.alerts")

SOURCE_ADVICE = {
    "portal": "the portal could not be asked for visits; no new EPN can be planned until it answers",
    "ssh": "the facility host refused or did not answer the ssh login; no transfer can start",
    "local": "rsync or ssh cannot be run on this machine (installed? in PATH?); no transfer can start",
    "config": "config.yml was changed but cannot be used; mxsync goes on with the previous settings until it is fixed",
    "record": "ignore.yml cannot be read; nothing is transferred until it is fixed (mxsync never overwrites it)",
    "destination": "the destination root is unusable; no transfer was started so nothing fills the wrong file system",
}


def send_failure_alert(config, epns, sources):
    """Given failing EPN and source entries from the history, email staff; return True if the email went out."""
    lines = ["mxsync needs attention.", ""]
    for name, entry in sorted(sources.items()):
        lines += [
            f"* {name}: failing for {entry['failures']} cycle(s) since {entry.get('since', '?')}",
            f"  {SOURCE_ADVICE.get(name, '')}",
            f"  last error: {entry.get('last_error', '')}",
            "",
        ]
    for epn, entry in sorted(epns.items()):
        lines += [
            f"* EPN {epn}: failed in {entry['failures']} consecutive cycle(s), last at {entry.get('last_attempt', '?')}",
            f"  last error: {entry.get('last_error', '')}",
            "",
        ]
    lines += [
        "Each EPN is retried every cycle and recorded only once it is complete at the destination.",
        f"Status: mxsync status --config {config.path}",
        f"Log: {config.log_files.sync or 'the service journal'}",
    ]
    what = ", ".join([*sorted(sources), *sorted(epns)])
    subject = (
        f"mxsync: failing for {config.failure_alert_cycles}+ cycles: {what}" if epns else f"mxsync: {what} failing"
    )
    return _send_to_staff(config, subject, lines, "failure alert", what)


def send_followup_alert(config, epn, action, attempts, error):
    """Email staff that a follow-up of a recorded EPN gave up; return True if the email went out."""
    what = f"{epn} {action}"
    lines = [
        f"mxsync gave up on {action} for EPN {epn} after {attempts} attempt(s).",
        "",
        f"  last error: {error}",
        "",
        f"{epn} is synced, verified and stays recorded in ignore.yml; only this follow-up did not happen.",
        "Run it by hand, or fix the cause: mxsync does not try it again.",
        f"Log: {config.log_files.sync or 'the service journal'}",
    ]
    return _send_to_staff(config, f"mxsync: {action} failed for {epn}", lines, "follow-up alert", what)


def _send_to_staff(config, subject, lines, kind, what):
    """Email `lines` to mxsync-email-to; log the outcome naming the `kind` of alert and `what` it is about."""
    message = build_message(subject, config.email_from, config.mxsync_email_to, "\n".join(lines) + "\n")
    try:
        answer = send_message(config.smtp, message, config.mxsync_email_to)
    except MailError as error:
        logger.error("Could not send the %s about %s: %s", kind, what, error)
        return False
    logger.warning("Sent a %s about %s to %s (%s)", kind, what, ", ".join(config.mxsync_email_to), answer)
    return True
