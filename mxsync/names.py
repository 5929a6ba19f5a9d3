"""Validation of the names that become paths or command arguments: EPNs and project folders."""

import re

from mxsync.errors import UnsafeNameError

# An EPN is the experiment number followed by lower-case letters, e.g. 12282a.
EPN_PATTERN = re.compile(r"[0-9]{1,12}[a-z]{1,4}")
EPN_NUMBER_PATTERN = re.compile(r"[0-9]{1,12}")
# Project folders are HPC project codes such as ny79; no separators, no leading dot or dash.
PROJECT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


def is_epn(name):
    """Given any value, return True if it is a well-formed EPN string."""
    return isinstance(name, str) and EPN_PATTERN.fullmatch(name) is not None


def epn_number(epn):
    """Given an EPN such as '12282a', return its number '12282'."""
    return epn.rstrip("abcdefghijklmnopqrstuvwxyz")


def check_epn(name, source):
    """Given a name from `source`, return it if it is a valid EPN, else raise UnsafeNameError."""
    if not is_epn(name):
        raise UnsafeNameError(
            f"{source} gave {describe(name)}, which is not a valid EPN (digits then lower-case letters)"
        )
    return name


def is_project(name):
    """Given any value, return True if it is a safe project folder name."""
    return isinstance(name, str) and PROJECT_PATTERN.fullmatch(name) is not None and ".." not in name


def describe(value, limit=60):
    """Given an untrusted value, return a short printable repr of it for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
