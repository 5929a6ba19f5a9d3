"""on-synced hooks: commands run once an EPN is recorded, each an argument list (never a shell string).

Placeholders are replaced inside arguments with str.replace, one by one, so a value is never parsed again: an EPN
or a person's name from the portal arrives as part of one argument, whatever quotes, `$(...)` or newlines it holds.
"""

import hashlib
import json
import logging
import os
import re
import shlex
import tempfile

from mxsync.errors import FollowUpError, ProcessStartError, TransferStopped
from mxsync.processes import supervisor as default_supervisor
from mxsync.processes import tail_text

logger = logging.getLogger("mxsync.hooks")

# Placeholder -> the record's field it takes (and MXSYNC_<NAME> is the same value in the environment).
PLACEHOLDERS = ("epn", "project", "destination", "beamline", "visit_start", "visit_end", "principal_email")
# What looks like a placeholder: an unknown one is refused at config load (a typo would reach the command as is).
PLACEHOLDER_PATTERN = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def unknown_placeholders(argument):
    """Return the placeholders in `argument` that are not PLACEHOLDERS, e.g. ['{epm}']."""
    return [f"{{{name}}}" for name in PLACEHOLDER_PATTERN.findall(argument) if name not in PLACEHOLDERS]


# Values from the portal that may stand alone as an argument: a plain address and a beamline name, never one that
# starts with '-' (an option to the hook's program) or holds anything else; otherwise the value is ''.
SAFE_EMAIL = re.compile(r"[A-Za-z0-9._%+][A-Za-z0-9._%+-]*@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
SAFE_BEAMLINE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def hook_values(record):
    """Given an EPN's record, return {placeholder: text}; an unknown value, or a portal value not of its form, is ''."""
    principal = record.get("principal") or {}
    values = {name: record.get(name) for name in PLACEHOLDERS if name != "principal_email"}
    values["principal_email"] = principal.get("email")
    values = {name: "" if value is None else str(value) for name, value in values.items()}
    for name, form in (("principal_email", SAFE_EMAIL), ("beamline", SAFE_BEAMLINE)):
        if values[name] and not form.fullmatch(values[name]):
            logger.warning("%s: %s %r is not of the expected form; hooks get ''", record.get("epn"), name, values[name])
            values[name] = ""
    return values


def substitute(arguments, values):
    """Return the arguments with each {placeholder} replaced by its value (values are never substituted again)."""
    result = []
    for argument in arguments:
        # Split at the placeholders first, so that a value holding '{epn}' stays as it came.
        parts = re.split(r"(\{[A-Za-z_][A-Za-z0-9_]*\})", argument)
        result.append("".join(values.get(part[1:-1], part) if part.startswith("{") else part for part in parts))
    return result


def hook_environment(values, base=None):
    """Return the hook's environment: ours, plus MXSYNC_EPN, MXSYNC_PROJECT, ... for each placeholder."""
    environment = dict(os.environ if base is None else base)
    environment.update({f"MXSYNC_{name.upper()}": value for name, value in values.items()})
    return environment


def _shown(arguments):
    """A command as a log line shows it: shell-quoted, control characters escaped (one line, whatever it holds)."""
    text = shlex.join(arguments)
    return text.encode("unicode_escape").decode("ascii") if re.search(r"[\x00-\x1f\x7f]", text) else text


class Hook:
    """One on-synced command: a follow-up action keyed by its arguments, shown as 'hook <n>' (its place, from 1).

    The key is a digest of the command, not its place: a pending row never runs another command after the list
    is reordered or edited, and a command put back later finds its rows again.
    """

    def __init__(self, number, arguments, timeout, supervisor=None):
        self.number = number
        self.arguments = tuple(arguments)
        digest = hashlib.sha256(json.dumps(self.arguments).encode("utf-8")).hexdigest()[:12]
        self.name = f"hook:{digest}"
        self.label = f"hook {number}"
        self.timeout = timeout
        self.supervisor = supervisor or default_supervisor

    def run(self, record, dry_run):
        """Run the command for the EPN's record (JSON on stdin); raise FollowUpError if it fails or times out."""
        epn = record["epn"]
        values = hook_values(record)
        arguments = substitute(self.arguments, values)
        if dry_run:
            logger.info("%s: would run hook %d: %s", epn, self.number, _shown(arguments))
            return
        logger.info("%s: running hook %d: %s", epn, self.number, _shown(arguments))
        with tempfile.TemporaryFile() as stdin:
            stdin.write(json.dumps(record, ensure_ascii=False, indent=2).encode("utf-8") + b"\n")
            stdin.seek(0)
            try:
                finished = self.supervisor.run(
                    arguments,
                    f"hook {self.number} for {epn}",
                    self.timeout,
                    stdin=stdin,
                    env=hook_environment(values),
                    output=True,
                )
            except ProcessStartError as error:
                raise FollowUpError(str(error)) from None
        if finished.stopped:
            raise TransferStopped(f"hook {self.number} for {epn}: stopped with mxsync")
        if finished.returncode != 0:
            how = (
                f"killed by signal {-finished.returncode}" if finished.returncode < 0 else f"exit {finished.returncode}"
            )
            raise FollowUpError(f"hook {self.number} ({arguments[0]}) {how}: {tail_text(finished.stderr_tail)}")
        logger.info("%s: hook %d done", epn, self.number)


def hooks_from_config(config, supervisor=None):
    """Return a Hook for each on-synced command of the config, in order."""
    return [
        Hook(number, arguments, config.on_synced_timeout, supervisor)
        for number, arguments in enumerate(config.on_synced, start=1)
    ]
