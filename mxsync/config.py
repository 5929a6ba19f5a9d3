"""Load config.yml once, validate every key, and return typed objects; nothing deeper reads raw dicts.

The file format is the one HPC ASSyncy used; every old key keeps its meaning. Problems are all
collected and reported together, each at its key path (`equipment[1].id: expected ...`).
"""

import difflib
import inspect
import logging
import math
import os
import re
import stat
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.utils import getaddresses
from pathlib import Path
from typing import Optional

import yaml

from mxsync.errors import ConfigError
from mxsync.hooks import PLACEHOLDERS, unknown_placeholders
from mxsync.names import EPN_NUMBER_PATTERN, describe, is_project

logger = logging.getLogger("mxsync.config")

SMTP_SECURITY_CHOICES = ("none", "starttls", "ssl")
# How visit queries write their times (see format_portal_time in mxsync/portal.py).
PORTAL_TIME_FORMATS = ("local", "utc", "utc-offset")
BAG_ALGORITHMS = ("md5", "sha1")  # those rsync prints with %C that the bagit package validates
HOST_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*")
# '@' is allowed: HPC ASSyncy logged in as help@massive.org.au, and ssh and rsync split
# `user@host` at the last '@'. No leading '-' (an ssh option), no ':', '/' or whitespace.
USERNAME_PATTERN = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.@-]*[A-Za-z0-9_.-])?")
# A bare address as the SMTP envelope takes it: a dot-atom local part (RFC 5322), then a domain
# name or an [address literal]. ASCII only: smtplib sends envelope commands as ASCII
# (an international domain is written in its xn-- form); display names may be any text.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
EMAIL_PATTERN = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@(?:{_LABEL}(?:\.{_LABEL})*|\[[A-Za-z0-9.:]+\])")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
# Python 3.13 (and the 2024 security releases before it) parses strictly by default and refuses 'a@x.edu; b@y.edu',
# which HPC ASSyncy sent to; ask for its lax parser where there is the choice, so every Python reads a config alike.
GETADDRESSES_OPTIONS = {"strict": False} if "strict" in inspect.signature(getaddresses).parameters else {}
# A running visit's new files reach home within minutes, while a pass that finds nothing new costs one listing.
LIVE_INTERVAL_MINUTES = 10
# The facility's MX auto-processing runs after collection and can queue for hours; its output is part of the EPN.
SETTLE_MINUTES = 240


@dataclass(frozen=True)
class Equipment:
    """One portal equipment (beamline endpoint) with its API credentials."""

    id: int
    username: str
    password: str = field(repr=False)
    client_name: str
    client_password: str = field(repr=False)
    beamline: str
    source_path: str


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    security: str
    username: Optional[str]
    password: Optional[str] = field(repr=False)
    timeout: float


@dataclass(frozen=True)
class LogFiles:
    sync: Optional[Path]
    epnalert: Optional[Path]
    email: Optional[Path]


@dataclass(frozen=True)
class Config:
    """The validated configuration; paths are absolute, durations in seconds unless named otherwise."""

    path: Path
    epn_cap_map: dict  # config.yml's epn_cap_map merged with the epn-cap-map-file's entries
    epn_cap_map_file: Optional[Path]
    ignore_file: Path
    state_dir: Path
    equipment: tuple[Equipment, ...]
    base_url: str
    host: str
    username: Optional[str]
    port: int
    key_file: Optional[Path]
    known_hosts: Optional[Path]
    ssh_connect_timeout: float
    ssh_keepalive_interval: int
    ssh_cipher: Optional[str]
    ssh_connection_sharing: bool
    sftp_timeout: float
    portal_timeout: float
    portal_retries: int
    portal_retry_delay: float
    portal_time_format: str
    # Addresses as headers show them ('Staff <s@x.edu>' or 's@x.edu'); smtplib puts the bare ones in the envelope.
    email_to: tuple[str, ...]
    email_from: str
    smtp: SmtpSettings
    mxsync_email_to: tuple[str, ...]
    template_folder: Optional[Path]
    template_text: Optional[str]
    template_html: Optional[str]
    epnalert_only_new: bool
    epnalert_repeat_days: float
    visit_day_range: float  # an int when whole
    destination_root: Path
    destination_must_be_mount_point: bool
    sync_frequency_hours: float
    max_tasks: int
    live_interval_minutes: int  # 0: no passes while a visit runs
    settle_minutes: int  # 0: the final pass as soon as the visit ends
    rsync_options: tuple[str, ...]
    rsync_bwlimit: Optional[str]
    rsync_io_timeout: int
    rsync_retries: int
    rsync_retry_delay: float
    failure_alert_cycles: int
    waiting_for_data_alert_hours: float
    log_level: int
    log_files: LogFiles
    log_max_bytes: int
    log_backup_count: int
    # False, True, or a tuple of the projects whose scientists are emailed when an EPN is recorded.
    notify_scientists: object
    notify_scientists_exclude: tuple[str, ...]  # bare addresses, lowercased
    notify_scientists_template_folder: Optional[Path]
    # on-synced: commands run once an EPN is recorded (mxsync.hooks), each a tuple of arguments.
    on_synced: tuple[tuple[str, ...], ...] = ()
    on_synced_timeout: float = 600.0
    on_synced_retries: int = 3
    bag: bool = True  # every recorded EPN folder a BagIt bag (mxsync.bagging)
    bag_algorithm: str = "sha1"
    warnings: tuple[str, ...] = ()

    def project_for(self, epn_number):
        """Given an EPN number such as '12282', return its project folder or None if unmapped."""
        return self.epn_cap_map.get(epn_number)

    def secrets(self):
        """Return every secret value in the config, for log masking."""
        values = [self.smtp.password]
        for equipment in self.equipment:
            values += [equipment.password, equipment.client_password]
        return [value for value in values if value]

    @property
    def rsync_checksum(self):
        """The checksum rsync is asked to print for the bag's manifest, or None (no bag, or the user chose rsync's
        --checksum-choice: then the bag hashes its files here)."""
        if not self.bag or any(_is_checksum_choice(option) for option in self.rsync_options):
            return None
        return self.bag_algorithm

    @property
    def ssh_target(self):
        """Return `[username@]host` as ssh and rsync expect it."""
        return f"{self.username}@{self.host}" if self.username else self.host

    @property
    def source_paths(self):
        """Return the distinct remote EPN parent directories, one per beamline, in config order."""
        return tuple(dict.fromkeys(equipment.source_path for equipment in self.equipment))


class _Invalid(Exception):
    """A value does not fit its key; the message says what was expected."""


# ---------------------------------------------------------------- value converters


def _expected(what, value):
    return _Invalid(f"expected {what}, got {describe(value)}")


def _something(value):
    """Refuse a key written with no value (`equipment:`), which YAML reads as null: not the same as leaving it out."""
    if value is None:
        raise _Invalid("has no value; list the portal's equipment here (id, username, password, client_name, ...)")
    return value


def _string(value):
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or value == "":
        raise _expected("a non-empty string", value)
    return str(value)


def _integer(minimum=None, maximum=None):
    def convert(value):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value)
            else:
                raise _expected("an integer", value)
        if minimum is not None and value < minimum:
            raise _Invalid(f"expected an integer of at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise _Invalid(f"expected an integer of at most {maximum}, got {value}")
        return value

    return convert


def _number(minimum=0, maximum=86400):
    def convert(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _expected("a number", value)
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            number = math.inf
        if not math.isfinite(number):  # YAML's .nan and .inf would pass every comparison below, then crash a sleep
            raise _expected("a finite number", value)
        if number < minimum:
            raise _Invalid(f"expected a number of at least {minimum}, got {value}")
        # Larger values are typos, and would overflow the timers they feed.
        if number > maximum:
            raise _Invalid(f"expected a number of at most {maximum}, got {value}")
        return number

    return convert


def _boolean(value):
    if not isinstance(value, bool):
        raise _expected("true or false", value)
    return value


def _choice(*choices):
    def convert(value):
        if value not in choices:
            raise _expected("one of " + ", ".join(choices), value)
        return value

    return convert


def _pattern(regex, what):
    def convert(value):
        value = _string(value)
        if regex.fullmatch(value) is None:
            raise _expected(what, value)
        return value

    return convert


EMAIL_LIST_EXPECTED = "email addresses ('a@x.edu', 'Staff <s@x.edu>'), separated by commas or as a YAML list"


def _addresses(text, expected):
    """Given 'a@x.edu, Staff <s@x.edu>', return each address as it goes in a header ('Staff <s@x.edu>')."""
    if not isinstance(text, str) or CONTROL_CHARACTERS.search(text):
        raise _expected(expected, text)
    # HPC ASSyncy's smtplib took its recipients from this parser, so whatever it sent to parses here too.
    # ('', '') is what is left of a stray separator: 'a@x.edu,' or Outlook's 'a@x.edu; b@y.edu'.
    pairs = [pair for pair in getaddresses([text], **GETADDRESSES_OPTIONS) if pair != ("", "")]
    # The parser is lax: it may drop what it cannot read, or glue words ('a@x.edu junk' -> 'a@x.edujunk').
    # So every '@' written must come out, and every address must be written as it came out.
    if text.count("@") != sum(name.count("@") + address.count("@") for name, address in pairs):
        raise _Invalid(f"expected {expected}, got {describe(text)}, of which a part is not an address")
    addresses = []
    for name, address in pairs:
        if EMAIL_PATTERN.fullmatch(address) is None or address not in text:
            raise _Invalid(
                f"expected {expected}, got {describe(text)}, in which {describe(address or name)} is not an email address"
            )
        addresses.append(str(Address(display_name=name, addr_spec=address)))
    if not addresses:
        raise _expected(expected, text)
    return addresses


def _email_list(value):
    items = value if isinstance(value, list) else [value]
    addresses = [address for item in items for address in _addresses(item, EMAIL_LIST_EXPECTED)]
    if not addresses:
        raise _expected(EMAIL_LIST_EXPECTED, value)
    return tuple(addresses)


def _email_address(value):
    expected = "one email address, e.g. 'mxsync@x.edu' or 'MX sync <mxsync@x.edu>'"
    addresses = _addresses(value, expected)
    if len(addresses) != 1:
        raise _expected(expected, value)
    return addresses[0]


def _string_list(value):
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str) and item for item in items):
        raise _expected("a string or a list of strings", value)
    return tuple(items)


def _day_count(value):
    """Days as a number (HPC ASSyncy passed the value to timedelta, so 7.5 worked); whole days stay integers."""
    if isinstance(value, str) and value.strip().isdigit():  # as the integer this key used to be
        value = int(value)
    days = _number(1, 36500)(value)
    return int(days) if days.is_integer() else days


def _log_level(value):
    """Accept what the old tool took (`logging.DEBUG`) as well as `DEBUG`, `debug` or a number."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        name = value.strip().upper()
        name = name[len("LOGGING.") :] if name.startswith("LOGGING.") else name
        name = {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(name, name)
        if name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            return getattr(logging, name)
    raise _expected("a log level (DEBUG, INFO, WARNING, ERROR; 'logging.DEBUG' also works)", value)


def _bwlimit(value):
    text = str(value).strip() if not isinstance(value, bool) else ""
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?[KMGkmg]?", text) is None:
        raise _expected("a bandwidth in KiB/s, or with a unit like '50M'", value)
    return text


def _cap_map(value):
    if not isinstance(value, dict):
        raise _expected("a mapping of EPN number to project folder", value)
    return value  # entries are checked one by one in _check_cap_map, each at its own key path


def _smtp_address(value):
    text = _string(value)
    host, _, port = text.partition(":")
    if not HOST_PATTERN.fullmatch(host) or (port and not port.isdigit()):
        raise _expected("'host' or 'host:port'", value)
    return host, (int(port) if port else None)


# ---------------------------------------------------------------- the schema

# key: (converter, default); a default of REQUIRED means the key must be present.
REQUIRED = object()

TOP_LEVEL = {
    "comment": (None, None),  # free text, never read (HPC ASSyncy did not read it either)
    "epn_cap_map": (_cap_map, REQUIRED),
    "ignore": (_string, REQUIRED),
    "state-dir": (_string, None),
    "equipment": (_something, REQUIRED),  # checked by _check_equipment
    "base-url": (_pattern(re.compile(r"https?://[^\s/]+(/\S*)?"), "an http:// or https:// URL"), REQUIRED),
    "beamline": (_pattern(re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*"), "a beamline name such as 'mx'"), None),
    "host": (_pattern(HOST_PATTERN, "a host name or address"), REQUIRED),
    "username": (
        _pattern(
            USERNAME_PATTERN,
            "a login name such as help@massive.org.au (letters, digits, '_', '.', '-', '@'; "
            "starting with a letter, digit or '_')",
        ),
        None,
    ),
    "port": (_integer(1, 65535), 22),
    "key-file": (_string, None),
    "known-hosts": (_string, None),
    "source-path": (_string, "/data/{beamline}"),
    "ssh-connect-timeout": (_number(1), 30.0),
    "ssh-keepalive-interval": (_integer(0, 3600), 30),
    "ssh-cipher": (_pattern(re.compile(r"[a-z0-9@.,-]+"), "an ssh cipher name such as aes128-gcm@openssh.com"), None),
    "ssh-connection-sharing": (_boolean, True),
    "sftp-timeout": (_number(1), 60.0),
    "portal-timeout": (_number(1), 60.0),
    "portal-retries": (_integer(0, 20), 3),
    "portal-retry-delay": (_number(0), 2.0),
    "portal-time-format": (_choice(*PORTAL_TIME_FORMATS), "local"),
    "epnalert-email-to": (_email_list, REQUIRED),
    "epnalert-email-from": (_email_address, REQUIRED),
    "epnalert-email-smtp": (_smtp_address, REQUIRED),
    "epnalert-email-smtp-security": (_choice(*SMTP_SECURITY_CHOICES), "none"),
    "epnalert-email-smtp-username": (_string, None),
    "epnalert-email-smtp-password": (_string, None),
    "epnalert-email-smtp-timeout": (_number(1), 30.0),
    "epnalert-template-folder": (_string, None),
    "epnalert-template-text": (_string, None),
    "epnalert-template-html": (_string, None),
    "epnalert-only-new": (_boolean, False),
    "epnalert-repeat-days": (_number(0, 3650), 0.0),
    "mxsync-email-to": (_email_list, None),
    "visit-day-range": (_day_count, 30),
    "destination-root-path": (_string, REQUIRED),
    "destination-must-be-mount-point": (_boolean, False),
    "sync-frequency-hours": (_number(0.001, 8760), 24.0),
    "max-tasks": (_integer(1, 64), 1),
    # A day between live passes is no longer live, and a week of settling is beyond any processing queue: typos.
    "live-interval-minutes": (_integer(0, 1440), LIVE_INTERVAL_MINUTES),
    "settle-minutes": (_integer(0, 10080), SETTLE_MINUTES),
    "rsync-options": (_string_list, ()),
    "rsync-bwlimit": (_bwlimit, None),
    "rsync-io-timeout": (_integer(0, 86400), 600),
    "rsync-retries": (_integer(0, 20), 2),
    "rsync-retry-delay": (_number(0), 30.0),
    "failure-alert-cycles": (_integer(1, 1000), 3),
    "waiting-for-data-alert-hours": (_number(1, 8760), 48.0),
    "log-level": (_log_level, logging.INFO),
    "log-files": (None, None),  # checked by _check_log_files
    "log-max-bytes": (_integer(0), 10 * 1024 * 1024),
    "log-backup-count": (_integer(0, 1000), 5),
    "epn-cap-map-file": (_string, None),  # read by _read_cap_map_file
    "on-synced": (None, ()),  # checked by _check_on_synced
    "on-synced-timeout": (_number(1, 86400), 600.0),
    "on-synced-retries": (_integer(1, 100), 3),
    "notify-scientists": (None, False),  # checked by _check_notify_scientists
    "notify-scientists-exclude": (_email_list, None),
    "notify-scientists-template-folder": (_string, None),
    "bag": (_boolean, True),
    # Those rsync can print (%C) and the bagit package validates; sha1 costs rsync far less CPU than md5 (bench 8b).
    "bag-algorithm": (_choice(*BAG_ALGORITHMS), "sha1"),
}

EQUIPMENT_KEYS = {
    "id": (_integer(0), REQUIRED),
    "username": (_string, REQUIRED),
    "password": (_string, REQUIRED),
    "client_name": (_string, REQUIRED),
    "client_password": (_string, REQUIRED),
    "beamline": (TOP_LEVEL["beamline"][0], None),
}

LOG_FILE_KEYS = ("sync", "epnalert", "email")

# ---------------------------------------------------------------- rsync-options
# mxsync's rsync itemises every file in its own --out-format, never deletes, and is checked by
# size afterwards. So extra options may only change how bytes travel: never which files are sent
# or deleted, where or how they are written, the transport, or the output mxsync reads.


def _rsync_choice(*names):
    def check(value):
        if value not in names:
            raise _Invalid(f"expected one of {', '.join(names)}")

    return check


def _rsync_integer(minimum, maximum):
    def check(value):
        if not value.isdigit() or not minimum <= int(value) <= maximum:
            raise _Invalid(f"expected an integer from {minimum} to {maximum}")

    return check


def _rsync_size(minimum, maximum, example):
    units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}

    def check(value):
        match = re.fullmatch(r"([0-9]{1,15})([KMG]?)", value.upper())
        size = int(match.group(1)) * units[match.group(2)] if match else None
        if size is None or not minimum <= size <= maximum:
            raise _Invalid(f"expected a size from {minimum} to {maximum} bytes, or with a unit like '{example}'")

    return check


def _rsync_checksum_choice(value):
    # 'none' would turn off rsync's check of each file's content once it is written.
    names = ("auto", "xxh128", "xxh3", "xxh64", "xxhash", "md5", "md4", "sha1")
    if not all(name in names for name in value.split(",", 1)):
        raise _Invalid(f"expected one of {', '.join(names)}, or two of them as 'transfer,checksum' ('none' is refused)")


def _rsync_skip_compress(value):
    if re.fullmatch(r"[A-Za-z0-9._\[\]-]+(/[A-Za-z0-9._\[\]-]+)*", value) is None:
        raise _Invalid("expected file suffixes separated by '/', e.g. 'gz/bz2/h5'")


# long name: (short letter or None, check of the value after '=' or None for a flag).
ALLOWED_RSYNC_OPTIONS = {
    "--compress": ("z", None),
    "--compress-choice": (None, _rsync_choice("zstd", "lz4", "zlibx", "zlib", "none")),
    "--compress-level": (None, _rsync_integer(0, 22)),
    "--skip-compress": (None, _rsync_skip_compress),
    "--bwlimit": (None, _bwlimit),
    "--checksum-choice": (None, _rsync_checksum_choice),
    "--block-size": (None, _rsync_size(1, 131072, "128K")),
    "--whole-file": ("W", None),
    "--no-whole-file": (None, None),
    "--sparse": ("S", None),
    "--omit-dir-times": ("O", None),
    "--fsync": (None, None),
    "--max-alloc": (None, _rsync_size(1024 * 1024, 2**50, "4G")),
    "--numeric-ids": (None, None),
    "--ipv4": ("4", None),
    "--ipv6": ("6", None),
}
RSYNC_OPTION_ALIASES = {
    "--zc": "--compress-choice",
    "--zl": "--compress-level",
    "--cc": "--checksum-choice",
    "--no-W": "--no-whole-file",
}
ALLOWED_RSYNC_SHORT = {short: name for name, (short, _) in ALLOWED_RSYNC_OPTIONS.items() if short}
ALLOWED_RSYNC_SUMMARY = "allowed: " + ", ".join(
    (f"-{short}/" if short else "") + name + ("" if check is None else "=")
    for name, (short, check) in ALLOWED_RSYNC_OPTIONS.items()
)

# Why well-known options are refused, for a message that says more than "not allowed".
_RSYNC_REFUSALS = (
    (
        "deletes files; nothing mxsync runs deletes, at the destination or at the facility",
        ("--del", "--remove-source-files", "--remove-sent-files", "--max-delete", "--force", "--ignore-errors"),
    ),
    (
        "changes how rsync reaches or runs on the facility, which mxsync sets itself",
        (
            "-e",
            "--rsh",
            "--rsync-path",
            "-M",
            "--remote-option",
            "--port",
            "--sockopts",
            "--address",
            "--blocking-io",
            "--password-file",
            "--early-input",
            "--contimeout",
            "--no-motd",
            "-s",
            "--protect-args",
            "--secluded-args",
            "--old-args",
            "--trust-sender",
            "--copy-as",
            "--server",
            "--sender",
            "--daemon",
            "--config",
            "--dparam",
        ),
    ),
    (
        "does not transfer: mxsync decides itself when a run is a dry run",
        ("-n", "--dry-run", "--list-only", "--write-batch", "--only-write-batch", "--read-batch"),
    ),
    (
        "changes rsync's output, which mxsync reads to learn which files arrived",
        (
            "-v",
            "--verbose",
            "-q",
            "--quiet",
            "-h",
            "--human-readable",
            "-i",
            "--itemize-changes",
            "--out-format",
            "--log-format",
            "--info",
            "--debug",
            "--progress",
            "-P",
            "--stats",
            "-8",
            "--8-bit-output",
            "--msgs2stderr",
            "--stderr",
            "--outbuf",
            "--log-file",
            "--log-file-format",
        ),
    ),
    (
        "changes which files are compared or sent, so an EPN could be recorded as synced without all its files",
        (
            "--exclude",
            "--include",
            "--filter",
            "-f",
            "-F",
            "--exclude-from",
            "--include-from",
            "--files-from",
            "-0",
            "--from0",
            "-C",
            "--cvs-exclude",
            "--max-size",
            "--min-size",
            "--existing",
            "--ignore-existing",
            "--ignore-non-existing",
            "-u",
            "--update",
            "-x",
            "--one-file-system",
            "-m",
            "--prune-empty-dirs",
            "--compare-dest",
            "--copy-dest",
            "--link-dest",
            "--ignore-missing-args",
            "--stop-after",
            "--stop-at",
            "--time-limit",
            "-c",
            "--checksum",
            "-I",
            "--ignore-times",
            "--modify-window",
            "-@",
            "--append",
            "--append-verify",
        ),
    ),
    (
        (
            "changes how or where files are written; mxsync lets rsync write each file under a temporary name "
            "and rename it when complete"
        ),
        (
            "--partial-dir",
            "-T",
            "--temp-dir",
            "--delay-updates",
            "-b",
            "--backup",
            "--backup-dir",
            "--suffix",
            "-R",
            "--relative",
            "--mkpath",
            "-K",
            "--keep-dirlinks",
            "-y",
            "--fuzzy",
            "--write-devices",
        ),
    ),
    (
        "copies ownership, links, devices or other attributes, which mxsync sets by its own rules",
        (
            "-a",
            "--archive",
            "-o",
            "--owner",
            "-g",
            "--group",
            "--chown",
            "--usermap",
            "--groupmap",
            "--chmod",
            "-D",
            "--devices",
            "--specials",
            "--copy-devices",
            "-A",
            "--acls",
            "-X",
            "--xattrs",
            "-E",
            "--executability",
            "--super",
            "--fake-super",
            "-U",
            "--atimes",
            "-N",
            "--crtimes",
            "-H",
            "--hard-links",
            "-l",
            "--links",
            "-L",
            "--copy-links",
            "--copy-unsafe-links",
            "--safe-links",
            "--munge-links",
            "-k",
            "--copy-dirlinks",
            "-J",
            "--omit-link-times",
            "--no-perms",
            "--no-p",
            "--no-times",
            "--no-t",
            "--no-recursive",
            "--no-r",
        ),
    ),
    ("is set by mxsync already", ("-r", "--recursive", "-t", "--times", "-p", "--perms", "--partial")),
)
RSYNC_REFUSAL_REASONS = {name: reason for reason, names in _RSYNC_REFUSALS for name in names}
RSYNC_REFUSAL_REASONS.update(
    {
        "--timeout": "is set by mxsync from the key rsync-io-timeout; set that key instead",
        "--iconv": "converts file names, so the names at the destination could differ from the facility's",
        "--inplace": "writes into the file under its final name, so a reader or an interrupted run sees old and new "
        "content mixed; mxsync lets rsync write a temporary file and rename it when complete",
        "--preallocate": "gives an unfinished file its full size at once, so an interrupted file would pass "
        "mxsync's size checks as complete",
        "--size-only": "would leave a file copied by a live pass while the facility still wrote it (at its final "
        "size) as it was; mxsync compares size and modification time",
    }
)


def _rsync_refusal(name):
    if name.startswith("--delete"):
        return RSYNC_REFUSAL_REASONS["--del"]
    return RSYNC_REFUSAL_REASONS.get(name, "is not one of the options known to be safe with mxsync's transfer")


def rsync_option_problem(option):
    """Given one entry of rsync-options, return why mxsync refuses it, or None if it is allowed."""
    if not isinstance(option, str) or not option.startswith("-") or option in ("-", "--"):
        return f"expected an rsync option such as --compress, got {describe(option)}"
    if any(char.isspace() or not char.isprintable() for char in option):
        return (
            f"{describe(option)} holds whitespace or a control character; "
            "give each option as its own list item, with its value after '=' (--bwlimit=50M)"
        )
    if not option.startswith("--"):
        for letter in option[1:]:
            if letter not in ALLOWED_RSYNC_SHORT:
                short = "-" + letter
                where = "" if option == short else f" (in {option})"
                return f"{short}{where} {_rsync_refusal(short)}; {ALLOWED_RSYNC_SUMMARY}"
        return None
    name, has_value, value = option.partition("=")
    canonical = RSYNC_OPTION_ALIASES.get(name, name)
    if canonical not in ALLOWED_RSYNC_OPTIONS:
        return f"{name} {_rsync_refusal(name)}; {ALLOWED_RSYNC_SUMMARY}"
    check = ALLOWED_RSYNC_OPTIONS[canonical][1]
    if check is None:
        return f"{option}: {name} takes no value" if has_value else None
    if not has_value:
        return f"{name} needs its value after '=' in the same item, e.g. {name}=..."
    try:
        check(value)
    except _Invalid as invalid:
        return f"{option}: {invalid}"
    return None


def _is_checksum_choice(option):
    return option.partition("=")[0] in ("--checksum-choice", "--cc")


def _check_rsync_options(options, bwlimit, collector):
    for index, option in enumerate(options):
        problem = rsync_option_problem(option)
        if problem is None and bwlimit is not None and option.startswith("--bwlimit="):
            problem = f"{option}: rsync-bwlimit is set too; keep one of the two"
        if problem is not None:
            collector.problem(f"rsync-options[{index}]", problem)


class _Collector:
    """Gathers problems and warnings with their key paths."""

    def __init__(self):
        self.problems = []
        self.warnings = []

    def problem(self, key_path, message):
        self.problems.append(f"{key_path}: {message}")

    def warning(self, key_path, message):
        self.warnings.append(f"{key_path}: {message}")

    def convert(self, mapping, schema, key_path_prefix=""):
        """Given a raw mapping and its schema, return {key: converted value}; unknown keys warn."""
        values = {}
        for key, (converter, default) in schema.items():
            key_path = f"{key_path_prefix}{key}"
            if key not in mapping or mapping[key] is None and default is not REQUIRED:
                if default is REQUIRED:
                    self.problem(key_path, "required key is missing")
                values[key] = None if default is REQUIRED else default
                continue
            if converter is None:
                values[key] = mapping[key]
                continue
            try:
                values[key] = converter(mapping[key])
            except _Invalid as invalid:
                self.problem(key_path, str(invalid))
                values[key] = None if default is REQUIRED else default
        for key in mapping:
            if key not in schema:
                close = difflib.get_close_matches(str(key), list(schema), n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else " and is ignored"
                self.warning(f"{key_path_prefix}{key}", f"unknown key{hint}")
        return values


def load_config(path, check_files=True):
    """Given the path of config.yml, return a validated Config or raise ConfigError listing every problem.

    check_files=False skips the checks of the ssh files the config names, to validate a template.
    """
    path = Path(path).expanduser().absolute()
    raw = _read_yaml(path)
    collector = _Collector()
    values = collector.convert(raw, TOP_LEVEL)
    base_dir = path.parent

    def resolve(key, value=None):
        value = values[key] if value is None else value
        return None if value is None else (base_dir / os.path.expanduser(value)).resolve()

    cap_map = _check_cap_map(values["epn_cap_map"] or {}, collector)
    cap_map_file = resolve("epn-cap-map-file")
    if cap_map_file is not None:
        cap_map = _merge_cap_map_file(cap_map, cap_map_file, path.name, collector)
    equipment = _check_equipment(values, collector)
    log_files = _check_log_files(values["log-files"], collector, resolve)
    smtp = _check_smtp(values, collector)
    _check_rsync_options(values["rsync-options"], values["rsync-bwlimit"], collector)
    if values["bag"] and any(
        _is_checksum_choice(option) and rsync_option_problem(option) is None for option in values["rsync-options"]
    ):
        collector.warning(
            "rsync-options",
            "--checksum-choice is set, so rsync cannot give the bag its checksums; each final pass hashes the "
            "EPN's files here instead (slower). Remove it to let rsync use bag-algorithm",
        )

    ignore_file = resolve("ignore")
    state_dir = resolve("state-dir") or (ignore_file.parent if ignore_file else base_dir)
    template_names = (values["epnalert-template-text"], values["epnalert-template-html"])
    if values["epnalert-template-folder"] is None and any(template_names):
        collector.problem("epnalert-template-folder", "required when epnalert-template-text or -html is set")
    if values["epnalert-template-folder"] is not None and not any(template_names):
        collector.problem("epnalert-template-folder", "set epnalert-template-text and/or epnalert-template-html too")
    for key, name in zip(("epnalert-template-text", "epnalert-template-html"), template_names):
        if name is not None and (Path(name).is_absolute() or ".." in Path(name).parts):
            collector.problem(key, f"expected a file name inside epnalert-template-folder, got {describe(name)}")

    for key in ("key-file", "known-hosts") if check_files else ():
        _check_ssh_file(key, resolve(key), values, collector)
    _check_waiting_for_data(values, collector)
    _check_settle(values, collector)
    on_synced = _check_on_synced(values["on-synced"], collector)
    notify_scientists = _check_notify_scientists(values["notify-scientists"], cap_map, collector)

    passwords = any(e.password or e.client_password for e in equipment) or smtp.password
    _warn_if_readable_by_others(path, passwords, collector)

    if collector.problems:
        # Typos often cause the errors (a misspelt required key), so the warnings go with them.
        raise ConfigError(path, collector.problems + collector.warnings)
    email_to = values["epnalert-email-to"]
    return Config(
        path=path,
        epn_cap_map=cap_map,
        epn_cap_map_file=cap_map_file,
        ignore_file=ignore_file,
        state_dir=state_dir,
        equipment=tuple(equipment),
        base_url=values["base-url"].rstrip("/"),
        host=values["host"],
        username=values["username"],
        port=values["port"],
        key_file=resolve("key-file"),
        known_hosts=resolve("known-hosts"),
        ssh_connect_timeout=values["ssh-connect-timeout"],
        ssh_keepalive_interval=values["ssh-keepalive-interval"],
        ssh_cipher=values["ssh-cipher"],
        ssh_connection_sharing=values["ssh-connection-sharing"],
        sftp_timeout=values["sftp-timeout"],
        portal_timeout=values["portal-timeout"],
        portal_retries=values["portal-retries"],
        portal_retry_delay=values["portal-retry-delay"],
        portal_time_format=values["portal-time-format"],
        email_to=email_to,
        email_from=values["epnalert-email-from"],
        smtp=smtp,
        mxsync_email_to=values["mxsync-email-to"] or email_to,
        template_folder=resolve("epnalert-template-folder"),
        template_text=values["epnalert-template-text"],
        template_html=values["epnalert-template-html"],
        epnalert_only_new=values["epnalert-only-new"],
        epnalert_repeat_days=values["epnalert-repeat-days"],
        visit_day_range=values["visit-day-range"],
        destination_root=Path(os.path.abspath(base_dir / os.path.expanduser(values["destination-root-path"]))),
        destination_must_be_mount_point=values["destination-must-be-mount-point"],
        sync_frequency_hours=values["sync-frequency-hours"],
        max_tasks=values["max-tasks"],
        live_interval_minutes=values["live-interval-minutes"],
        settle_minutes=values["settle-minutes"],
        rsync_options=values["rsync-options"],
        rsync_bwlimit=values["rsync-bwlimit"],
        rsync_io_timeout=values["rsync-io-timeout"],
        rsync_retries=values["rsync-retries"],
        rsync_retry_delay=values["rsync-retry-delay"],
        failure_alert_cycles=values["failure-alert-cycles"],
        waiting_for_data_alert_hours=values["waiting-for-data-alert-hours"],
        log_level=values["log-level"],
        log_files=log_files,
        log_max_bytes=values["log-max-bytes"],
        log_backup_count=values["log-backup-count"],
        on_synced=on_synced,
        on_synced_timeout=values["on-synced-timeout"],
        on_synced_retries=values["on-synced-retries"],
        notify_scientists=notify_scientists,
        notify_scientists_exclude=tuple(
            getaddresses([address])[0][1].lower() for address in values["notify-scientists-exclude"] or ()
        ),
        notify_scientists_template_folder=resolve("notify-scientists-template-folder"),
        bag=values["bag"],
        bag_algorithm=values["bag-algorithm"],
        warnings=tuple(f"{path}: {warning}" for warning in collector.warnings),
    )


# libyaml's loader when PyYAML has it: a 10,000-line epn_cap_map reads in 0.2 s instead of 1.3 s, and a service
# reads config.yml before every cycle. Same safe types; a file that does not parse is read again by PyYAML's own
# loader, whose line numbers are the ones an editor shows.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_yaml(path):
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, ["file not found; pass --config with the path of your config.yml"]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(path, [f"cannot read the file: {error}"]) from None
    try:
        raw = _parse_yaml(text)
    except _Invalid as invalid:
        raise ConfigError(path, [str(invalid)]) from None
    if not isinstance(raw, dict):
        raise ConfigError(path, [f"expected a mapping of settings at the top level, got {describe(raw)}"])
    return raw


def _parse_yaml(text):
    """Return the YAML document in `text`; raise _Invalid saying where it does not parse."""
    try:
        return yaml.load(text, Loader=YAML_LOADER)  # noqa: S506 (a safe loader)
    except yaml.YAMLError:
        pass  # read again below with the pure-Python loader, whose error marks point where people look
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise _Invalid(f"{where}not valid YAML ({problem})") from None


def _check_cap_map(raw_map, collector, key_path_prefix="epn_cap_map."):
    cap_map = {}
    for number, project in raw_map.items():
        key_path = f"{key_path_prefix}{number}"
        if isinstance(project, int) and not isinstance(project, bool):
            project = str(project)  # HPC ASSyncy put the value into the path as text: 1234 is folder '1234'
        if isinstance(number, bool) or EPN_NUMBER_PATTERN.fullmatch(str(number)) is None:
            collector.problem(key_path, f"expected an EPN number (digits only, e.g. '12282'), got {describe(number)}")
        elif project is None:
            # HPC ASSyncy treated an entry without a folder as unmapped; a placeholder must not stop every sync.
            collector.warning(
                key_path,
                "no project folder given, so its EPNs are treated as unmapped: not synced, "
                "and listed by epnalert; add the folder name",
            )
        elif not is_project(project):
            collector.problem(
                key_path, f"expected a project folder name (letters, digits, '_.+-'), got {describe(project)}"
            )
        else:
            cap_map[str(number)] = project
    return cap_map


def _merge_cap_map_file(cap_map, path, config_name, collector):
    """Return config.yml's epn_cap_map with the entries of the epn-cap-map-file added; a number mapped twice
    to different folders is a problem naming both places."""
    key = "epn-cap-map-file"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        collector.problem(key, f"{path} does not exist; create it (an empty mapping {{}} is fine) or remove the key")
        return cap_map
    except UnicodeDecodeError:
        collector.problem(key, f"{path}: not UTF-8 text; save it as UTF-8")
        return cap_map
    except OSError as error:
        collector.problem(key, f"{path}: {error.strerror or error}; make it a file the tools' account can read")
        return cap_map
    try:
        raw = _parse_yaml(text)
    except _Invalid as invalid:
        collector.problem(key, f"{path}: {invalid}")
        return cap_map
    if raw is None:
        return cap_map  # an empty file (or comments only) maps nothing, like {}
    if not isinstance(raw, dict):
        collector.problem(
            key, f"{path}: expected a mapping of EPN number to project folder ('\"12282\": ny79'), got {describe(raw)}"
        )
        return cap_map
    if list(raw) == ["epn_cap_map"]:
        # Copied from config.yml with its key: the entries belong at the top level of this file.
        collector.problem(
            key, f"{path}: write the entries at the top level ('\"12282\": ny79'), without 'epn_cap_map:'"
        )
        return cap_map
    merged = dict(cap_map)
    for number, project in _check_cap_map(raw, collector, f"{key}: {path}: ").items():
        if merged.get(number, project) != project:
            collector.problem(
                f"{key}: {path}: {number}",
                f"maps it to {describe(project)}, but {config_name} epn_cap_map.{number} maps it to "
                f"{describe(merged[number])}; keep one of the two",
            )
        else:
            merged[number] = project
    return merged


def _check_equipment(values, collector):
    raw = values["equipment"]
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        collector.problem("equipment", f"expected a list of equipment entries, got {describe(raw)}")
        return []
    equipment, seen_ids = [], set()
    for index, entry in enumerate(raw):
        prefix = f"equipment[{index}]"
        if not isinstance(entry, dict):
            collector.problem(
                prefix,
                f"expected a mapping with id, username, password, client_name, client_password, got {describe(entry)}",
            )
            continue
        fields = collector.convert(entry, EQUIPMENT_KEYS, prefix + ".")
        beamline = fields["beamline"] or values["beamline"]
        if beamline is None:
            collector.problem(f"{prefix}.beamline", "no beamline: set 'beamline' at the top level or in this entry")
            continue
        if fields["id"] in seen_ids:
            collector.problem(f"{prefix}.id", f"equipment id {fields['id']} is listed twice")
        seen_ids.add(fields["id"])
        source_path = _source_path(values["source-path"], beamline, collector)
        required = ("id", "username", "password", "client_name", "client_password")
        if any(fields[key] is None for key in required) or source_path is None:
            continue
        equipment.append(
            Equipment(
                id=fields["id"],
                username=fields["username"],
                password=fields["password"],
                client_name=fields["client_name"],
                client_password=fields["client_password"],
                beamline=beamline,
                source_path=source_path,
            )
        )
    return equipment


def _source_path(template, beamline, collector):
    try:
        path = template.format(beamline=beamline)
    except (KeyError, IndexError, ValueError):
        collector.problem("source-path", f"only the placeholder {{beamline}} is allowed, got {describe(template)}")
        return None
    if not path.startswith("/") or "\n" in path or "'" in path:
        collector.problem("source-path", f"expected an absolute remote path, got {describe(path)}")
        return None
    return path.rstrip("/") or "/"


def _check_log_files(raw, collector, resolve):
    if raw is None:
        return LogFiles(None, None, None)
    if not isinstance(raw, dict):
        collector.problem("log-files", f"expected a mapping with sync, epnalert and email paths, got {describe(raw)}")
        return LogFiles(None, None, None)
    paths = {}
    for key in LOG_FILE_KEYS:
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            collector.problem(f"log-files.{key}", f"expected a file path, got {describe(value)}")
            value = None
        paths[key] = resolve(key, value) if value else None
    for key in raw:
        if key not in LOG_FILE_KEYS:
            close = difflib.get_close_matches(str(key), LOG_FILE_KEYS, n=1)
            collector.warning(
                f"log-files.{key}", "unknown key" + (f"; did you mean '{close[0]}'?" if close else " and is ignored")
            )
    return LogFiles(**paths)


def _check_smtp(values, collector):
    host, port = values["epnalert-email-smtp"] or ("localhost", None)
    security = values["epnalert-email-smtp-security"]
    username, password = values["epnalert-email-smtp-username"], values["epnalert-email-smtp-password"]
    if bool(username) != bool(password):
        collector.problem(
            "epnalert-email-smtp-password", "set both epnalert-email-smtp-username and -password, or neither"
        )
    if username and security == "none" and host not in ("localhost", "127.0.0.1", "::1"):
        collector.warning(
            "epnalert-email-smtp-security", "an SMTP password would be sent unencrypted; set starttls or ssl"
        )
    default_port = {"none": 25, "starttls": 587, "ssl": 465}[security]
    return SmtpSettings(host, port or default_port, security, username, password, values["epnalert-email-smtp-timeout"])


def _check_ssh_file(key, path, values, collector):
    """A missing or unreadable key or known_hosts file is a local problem: report it here, not as the host failing."""
    if path is None:
        return
    if key == "key-file":
        advice = (
            "set key-file to the private SSH key of the facility login, readable by the account that runs "
            "mxsync, or remove the key to let ssh use that account's own keys"
        )
    else:
        advice = (
            f"create it with 'ssh-keyscan -p {values['port']} {values['host']} > {path}', compare the fingerprints "
            "with the facility's, and make it readable by the account that runs mxsync"
        )
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            collector.problem(key, f"{path}: not a regular file; {advice}")
            return
        with open(path, "rb"):  # the real test of readability, whoever runs this (root, ACLs)
            pass
    except OSError as error:
        collector.problem(key, f"{path}: {error.strerror}; {advice}")
        return
    # ssh refuses a private key of its own user that others may read ("UNPROTECTED PRIVATE KEY FILE").
    if key == "key-file" and info.st_uid == os.getuid() and info.st_mode & 0o077:
        collector.problem(
            key,
            f"{path}: mode {stat.S_IMODE(info.st_mode):o} lets others read the key, so ssh refuses it; "
            f"run: chmod 600 {path}",
        )


def _check_on_synced(value, collector):
    """Return on-synced as a tuple of argument tuples; every problem is reported at its own key path."""
    if value is None or value == ():
        return ()
    example = "e.g. on-synced: [[sbatch, /opt/jobs/process.sh, '{destination}']]"
    if not isinstance(value, list):
        collector.problem("on-synced", f"expected a list of commands, each an argument list; {example}")
        return ()
    if not value:
        collector.problem("on-synced", "is an empty list; leave the key out for no hooks")
        return ()
    commands = []
    for index, command in enumerate(value):
        key_path = f"on-synced[{index}]"
        if isinstance(command, str):
            collector.problem(
                key_path,
                f"an argument list, not a shell string: write {describe(command)} as [program, argument, ...]; "
                "no shell runs it",
            )
            continue
        if not isinstance(command, list) or not command:
            collector.problem(
                key_path, f"expected a non-empty argument list [program, argument, ...], got {describe(command)}"
            )
            continue
        arguments = []
        for position, argument in enumerate(command):
            if isinstance(argument, bool) or not isinstance(argument, (str, int, float)) or argument == "":
                collector.problem(f"{key_path}[{position}]", f"expected a non-empty string, got {describe(argument)}")
                continue
            argument = str(argument)
            unknown = unknown_placeholders(argument)
            if unknown:
                known = ", ".join(f"{{{name}}}" for name in PLACEHOLDERS)
                collector.problem(
                    f"{key_path}[{position}]", f"unknown placeholder {', '.join(unknown)}; known: {known}"
                )
            arguments.append(argument)
        commands.append(tuple(arguments))
    return tuple(commands)


def _check_waiting_for_data(values, collector):
    hours, days = values["waiting-for-data-alert-hours"], values["visit-day-range"]
    if hours is not None and days is not None and hours > days * 24:
        collector.warning(
            "waiting-for-data-alert-hours",
            f"{hours:g} hours is beyond visit-day-range ({days} days), "
            "whose visits are the only ones looked at, so this alert would never come",
        )


def _check_notify_scientists(value, cap_map, collector):
    """Return False, True or a tuple of project names; a problem is reported at the item's key path."""
    expected = "true, false or a list of project names (e.g. [ny79])"
    if isinstance(value, bool):
        return value
    if not isinstance(value, list):
        collector.problem("notify-scientists", f"expected {expected}, got {describe(value)}")
        return False
    if not value:
        collector.problem("notify-scientists", "an empty list emails nobody; write false, or list project names")
        return False
    projects = set(cap_map.values())
    for index, project in enumerate(value):
        if not is_project(project):
            collector.problem(f"notify-scientists[{index}]", f"expected a project name, got {describe(project)}")
        elif project not in projects:
            collector.warning(f"notify-scientists[{index}]", f"project {project} is not in epn_cap_map")
    return tuple(value)


def _check_settle(values, collector):
    minutes, days = values["settle-minutes"], values["visit-day-range"]
    if minutes is not None and days is not None and minutes > days * 24 * 60:
        collector.warning(
            "settle-minutes",
            f"{minutes} minutes is beyond visit-day-range ({days} days), whose visits are the only ones looked at, "
            "so a visit could leave the range before its final pass and never be recorded",
        )


def _warn_if_readable_by_others(path, holds_passwords, collector):
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if holds_passwords and mode & (stat.S_IRWXG | stat.S_IRWXO):
        collector.warning(
            "(file)",
            f"holds passwords but is readable by group or others (mode {stat.S_IMODE(mode):o}); run: chmod 600 {path}",
        )
