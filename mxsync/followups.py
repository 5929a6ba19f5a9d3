"""What runs once an EPN is recorded (on-synced hooks, the scientists' email): each action once per EPN.

An EPN's follow-ups are queued in the store when the pipeline announces Recording, before ignore.yml is written,
and run after the cycle's passes, only for EPNs ignore.yml lists: a crash between the two runs nothing, one
after the record leaves rows that run at the next start. A failed action is retried in later cycles up to
on-synced-retries attempts, then staff are alerted; an action never un-records an EPN.
"""

import logging
import os
import stat

from mxsync import alerts
from mxsync.errors import FollowUpError, TransferStopped
from mxsync.events import Recording
from mxsync.hooks import hooks_from_config
from mxsync.names import epn_number
from mxsync.scientists import NotifyScientists

logger = logging.getLogger("mxsync.followups")


def follow_up_actions(config):
    """Return the follow-up actions the config asks for, in the order they run."""
    actions = list(hooks_from_config(config))
    if config.notify_scientists:
        actions.append(NotifyScientists(config))
    return actions


def _applies(action, project):
    applies = getattr(action, "applies", None)
    return applies is None or applies(project)


def build_record(config, history, epn):
    """Return the EPN's record as actions get it (hooks as JSON on stdin): visit, people, destination, figures."""
    project = config.project_for(epn_number(epn))
    visits = history.visits(epn)
    starts = [visit.start for visit in visits if visit.start is not None]
    ends = [visit.end for visit in visits if visit.end is not None]
    principal, scientists, emails = None, [], set()
    for visit in visits:
        if principal is None and visit.principal_scientist:
            principal = _person(visit.principal_scientist)
        for person in visit.other_scientists:
            entry = _person(person)
            key = (entry["email"] or entry["name"] or "").lower()
            if key not in emails:
                emails.add(key)
                scientists.append(entry)
    verified = history.last_verified_pass(epn)
    return {
        "epn": epn,
        "project": project,
        "destination": str(config.destination_root / project / epn) if project else None,
        "beamline": next((visit.beamline for visit in visits if visit.beamline), None),
        "visit_start": min(starts).isoformat() if starts else None,
        "visit_end": max(ends).isoformat() if ends else None,
        "principal": principal,
        "scientists": scientists,
        "files": verified.files if verified else None,
        "bytes": verified.bytes if verified else None,
        "bagged": bool(project) and _is_file(config.destination_root / project / epn / "bagit.txt"),
    }


def _is_file(path):
    """True for a regular file, never through a symlink (project members can plant one)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _person(person):
    names = (person.get("first_names"), person.get("last_name"))
    name = " ".join(part for part in names if part) or person.get("name") or None
    return {"name": name, "email": person.get("email") or None}


class FollowUps:
    """Queues an EPN's actions when it is being recorded (a listener) and runs those due after the passes."""

    def __init__(self, config, actions, history, dry_run=False, stop=None):
        self.config = config
        self.actions = {action.name: action for action in actions}
        self.history = history
        self.dry_run = dry_run
        self.stop = stop
        self.retries = config.on_synced_retries

    def hear(self, event):
        """Queue the EPN's actions when the pipeline is about to record it (before ignore.yml is written)."""
        if isinstance(event, Recording) and not self.dry_run and self.actions:
            project = self.config.project_for(epn_number(event.epn))
            names = [name for name, action in self.actions.items() if _applies(action, project)]
            if names:
                self.history.followup_queue(event.epn, names)

    def run_due(self, is_recorded, would_record=()):
        """Run each due action once (those of EPNs ignore.yml lists); a dry run says what would run for the EPNs it
        would record too, and changes nothing. Return the number of actions run (or previewed)."""
        rows = [row for row in self.history.followups_due() if is_recorded(row.epn)]
        due = [(row.epn, row.action) for row in rows]
        if self.dry_run:
            queued = {epn for epn, _ in due}
            for epn in would_record:
                project = self.config.project_for(epn_number(epn))
                if epn not in queued:
                    due += [(epn, name) for name, action in self.actions.items() if _applies(action, project)]
        attempts = {(row.epn, row.action): row for row in rows}
        count = 0
        records = {}
        for epn, name in due:
            if self.stop is not None and self.stop.is_set():
                break
            action = self.actions.get(name)
            if action is None:  # taken out of the config since it was queued: it waits in case it comes back
                logger.debug("%s: %s is no longer configured; not run", epn, name)
                continue
            row = attempts.get((epn, name))
            if row is not None and row.attempts >= self.retries and not self.dry_run:
                # Out of attempts (a last failure whose alert did not go out, or one cut off by a crash every
                # time): never run again, only the alert is tried until staff have it.
                self._give_up(epn, action, row.attempts, row.last_error or "cut off by a crash or a stop")
                continue
            if epn not in records:
                records[epn] = build_record(self.config, self.history, epn)
            self._run(action, records[epn])
            count += 1
        return count

    def _run(self, action, record):
        epn, label = record["epn"], _label(action)
        if self.dry_run:
            try:
                action.run(record, dry_run=True)
            except Exception as error:  # a preview never stops the cycle
                logger.warning("%s: %s would fail: %s", epn, label, error)
            return
        self.history.followup_started(epn, action.name)
        try:
            action.run(record, dry_run=False)
        except TransferStopped:
            logger.warning("%s: %s stopped with mxsync; it runs again at the next start", epn, label)
            return  # left 'running': due again at the next start
        except Exception as error:  # a bug in an action is its failure, retried like one; other EPNs go on
            if not isinstance(error, FollowUpError):
                logger.exception("%s: %s: unexpected error", epn, label)
            self._failed(epn, action, str(error) if isinstance(error, FollowUpError) else repr(error))
            return
        self.history.followup_finished(epn, action.name)

    def _failed(self, epn, action, message):
        attempts = self._attempts(epn, action.name)
        # Pending again either way; out of attempts, _give_up marks it failed once staff have the alert.
        self.history.followup_finished(epn, action.name, error=message)
        if attempts < self.retries:
            logger.warning(
                "%s: %s FAILED (attempt %d of %d, retried next cycle): %s",
                epn,
                _label(action),
                attempts,
                self.retries,
                message,
            )
            return
        self._give_up(epn, action, attempts, message)

    def _give_up(self, epn, action, attempts, message):
        """Stop trying an action; once the alert has gone out it is 'failed', until then the alert is retried."""
        label = _label(action)
        logger.error(
            "%s: %s FAILED %d times; given up, staff alerted (the EPN stays recorded): %s",
            epn,
            label,
            attempts,
            message,
        )
        if alerts.send_followup_alert(self.config, epn, label, attempts, message):
            self.history.followup_finished(epn, action.name, error=message, give_up=True)
            self.history.followup_alerted(epn, action.name)

    def _attempts(self, epn, name):
        for row in self.history.followups_due():
            if row.epn == epn and row.action == name:
                return row.attempts
        return self.retries  # the store cannot tell: give up rather than retry forever


def _label(action):
    """How log lines and alerts name an action ('hook 1', 'notify-scientists')."""
    return getattr(action, "label", action.name)
