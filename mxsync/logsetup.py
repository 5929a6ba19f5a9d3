"""Logging for both tools: rotating log files, a quiet console for cron, and secret masking on every handler."""

import logging
import logging.handlers
import os
import re
import sys
import threading

MASK = "*****"
# HPC ASSyncy's own file format, kept field for field so that sites' greps and parsers of sync.log
# still work: "2024-04-28 09:00:00,123 - mxsync.sync - INFO:4242: message".
LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s:%(process)s: %(message)s"
# Pass as `extra=` for a record that belongs in the log files but not on the console, e.g. the
# details of an error the program is about to print as its one-line reason anyway.
FILE_ONLY = {"file_only": True}
# Control characters from the portal, SFTP or a file name must not forge log lines or move the cursor:
# they are escaped, and a line break starts an indented continuation, which no parser takes for a record.
CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")
LOG_FILE_MODE = 0o640  # staff read logs through the group; others have no business in them


class SecretMasker(logging.Filter):
    """Replaces every registered secret (passwords, tokens) in a record's final text with a mask."""

    def __init__(self):
        super().__init__()
        self._secrets = set()
        self._lock = threading.Lock()

    def register(self, secret):
        # Very short values would mask ordinary words; the config validator rejects empty secrets anyway.
        if secret and len(secret) >= 4:
            with self._lock:
                self._secrets.add(secret)

    def mask(self, text):
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, MASK)
        return text

    def filter(self, record):
        if getattr(record, "mxsync_cleaned", False):  # every handler runs this filter on the same record
            return True
        record.mxsync_cleaned = True
        message = printable(self.mask(record.getMessage()))
        if self._secrets:
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self.mask(record.exc_text)
        record.msg, record.args = message, None
        return True


def printable(text):
    """Escape control characters and indent continuation lines, so that no text can pass for a log record."""
    text = CONTROL.sub(
        lambda match: f"\\x{ord(match.group()):02x}" if ord(match.group()) < 0x100 else f"\\u{ord(match.group()):04x}",
        text,
    )
    return text.replace("\n", "\n    ")


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log file created owner read-write and group read, whatever the umask."""

    def _open(self):
        descriptor = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, LOG_FILE_MODE)
        return os.fdopen(descriptor, "a", encoding=self.encoding, errors=self.errors)


# One masker for the process: clients register tokens here as they receive them.
masker = SecretMasker()


def setup_logging(
    level, log_file=None, extra_files=(), max_bytes=0, backup_count=5, secrets=(), dry_run=False, verbose=False
):
    """Given the configured level and files, route logs: files get everything at `level`, the console less under cron.

    `extra_files` is a list of (logger name, path) for dedicated logs such as the email log.
    """
    for secret in secrets:
        masker.register(secret)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    # A dry run labels every line, so none can be mistaken for a real transfer or record.
    label = "[dry run] " if dry_run else ""
    formatter = logging.Formatter(LOG_FORMAT.replace("%(message)s", label + "%(message)s"))

    console = logging.StreamHandler(sys.stderr)
    # Under cron every line on stderr becomes mail; with a log file, the console carries only problems.
    interactive = verbose or sys.stderr.isatty() or log_file is None
    console.setLevel(level if interactive else logging.WARNING)
    console.setFormatter(logging.Formatter(f"%(levelname)s %(name)s: {label}%(message)s"))
    console.addFilter(lambda record: not getattr(record, "file_only", False))
    handlers = [console]
    if log_file is not None:
        handlers.append(_file_handler(log_file, max_bytes, backup_count, formatter))
    for handler in handlers:
        handler.addFilter(masker)
        root.addHandler(handler)
    for logger_name, path in extra_files:
        if path is not None:
            handler = _file_handler(path, max_bytes, backup_count, formatter)
            handler.addFilter(masker)
            logging.getLogger(logger_name).addHandler(handler)
    # urllib3 logs every URL at DEBUG; the portal wants the token in the query string, so keep it masked and quiet.
    logging.getLogger("urllib3").setLevel(max(level, logging.INFO))
    logging.getLogger("paramiko").setLevel(max(level, logging.WARNING))


def _file_handler(path, max_bytes, backup_count, formatter):
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = PrivateRotatingFileHandler(path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8")
    handler.setFormatter(formatter)
    return handler
