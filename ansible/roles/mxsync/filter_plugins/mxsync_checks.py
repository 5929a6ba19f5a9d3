"""Filters of the mxsync role: host key lines that hold real keys, and earlier epnalert cron entries to retire.

Pure Python, run on the controller: no ssh-keygen needed there, and the same answer whatever OpenSSH it has.
"""

import base64
import binascii
import re
import struct

# known_hosts markers (sshd(8) "SSH_KNOWN_HOSTS FILE FORMAT"); a line may start with one.
MARKERS = ("@cert-authority", "@revoked")
# The entry the role itself writes in the service account's crontab, and the one HPC ASSyncy's deployment wrote.
CRON_MARKER = "#Ansible: mxsync crontab"
# A command word "epnalert" (a path ending in it, or the name alone), as cron would start it.
RUNS_EPNALERT = re.compile(r"(^|[\s/;&|(`])epnalert($|[\s;&|)`])")
# KEY=value lines of a crontab set cron's environment; they run nothing.
CRON_ENVIRONMENT = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_]*\s*=")


def host_key_problem(line):
    """Given a known_hosts line, return what is wrong with its key ('' if it holds a public key of its type)."""
    fields = str(line).split()
    if fields and fields[0] in MARKERS:
        fields = fields[1:]
    if len(fields) < 3:
        return "expected 'HOST KEYTYPE BASE64-KEY'"
    key_type, text = fields[1], fields[2]
    try:
        blob = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return f"the {key_type} key '{_shorten(text)}' is not base64"
    # The key blob starts with its own type name as an SSH string (RFC 4253 6.6): uint32 length, then the name.
    if len(blob) < 4:
        return f"the {key_type} key '{_shorten(text)}' is too short to be a key"
    (length,) = struct.unpack(">I", blob[:4])
    embedded = blob[4 : 4 + length]
    if length > 64 or len(embedded) != length or len(blob) <= 4 + length:
        return f"the {key_type} key '{_shorten(text)}' is not an SSH public key"
    embedded = embedded.decode("ascii", "replace")
    if embedded != key_type:
        return f"the line says {key_type} but the key is {embedded}"
    return ""


def host_key_problems(lines):
    """Given known_hosts lines, return one message per line whose key is not a public key of its stated type."""
    problems = []
    for number, line in enumerate(lines, start=1):
        problem = host_key_problem(line)
        if problem:
            problems.append(f"line {number}: {problem}")
    return problems


def runs_epnalert(line):
    """Given a crontab line, tell whether cron would run epnalert from it (comments and variables run nothing)."""
    stripped = str(line).strip()
    if not stripped or stripped.startswith("#") or CRON_ENVIRONMENT.match(stripped):
        return False
    return bool(RUNS_EPNALERT.search(stripped))


def retire_epnalert_lines(text, prefix, keep_marked=False):
    """Comment out the lines of a crontab (or /etc/cron.d file) that run epnalert; leave every other line as is.

    Returns {"content": the new text, "retired": the lines retired}. With keep_marked, a line right under the
    role's marker is kept (the role's own entry); otherwise the marker goes too, so Ansible's cron module no
    longer takes the retired line for its entry.
    """
    lines = str(text).split("\n")
    retire = set()
    for index, line in enumerate(lines):
        marked = index > 0 and lines[index - 1].strip() == CRON_MARKER
        if runs_epnalert(line) and not (keep_marked and marked):
            retire.add(index)
            if marked:
                retire.add(index - 1)
    retired = [lines[index] for index in sorted(retire)]
    content = "\n".join(prefix + line if index in retire else line for index, line in enumerate(lines))
    return {"content": content, "retired": retired}


def _shorten(text, limit=24):
    return text if len(text) <= limit else text[:limit] + "..."


class FilterModule:
    """The filters above, for the role's tasks."""

    def filters(self):
        return {
            "host_key_problems": host_key_problems,
            "retire_epnalert_lines": retire_epnalert_lines,
        }
