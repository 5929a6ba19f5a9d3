"""`mxsync check`: validate the config and, on request, try every file and connection it names."""

import logging
import sys

from mxsync.config import load_config
from mxsync.errors import MxsyncError

logger = logging.getLogger("mxsync.check")


def run_check(config_path, connect=False):
    """Print one ok/failed line per item; return 0 only if everything passed (a bad config raises ConfigError)."""
    config = load_config(config_path)
    for warning in config.warnings:
        print(f"warning {warning}", file=sys.stderr)
    print(f"ok      config {config.path}: {len(config.equipment)} equipment, {len(config.epn_cap_map)} mapped EPN numbers")
    if not connect:
        return 0
    failures = 0
    for name, probe in _probes(config):
        try:
            detail = probe()
        except MxsyncError as error:
            failures += 1
            print(f"FAILED  {name}: {error}")
        else:
            print(f"ok      {name}" + (f": {detail}" if detail else ""))
    return 1 if failures else 0


def _probes(config):
    """Yield (name, callable) for every check; each callable returns a detail or raises MxsyncError."""
    from mxsync import destination, mail, rsync, state
    from mxsync.portal import PortalClient
    from mxsync.sftp import SftpClient

    yield "ignore file", lambda: f"{config.ignore_file}: {len(state.IgnoreFile(config.ignore_file).load())} EPNs recorded"
    for key, path in (("key-file", config.key_file), ("known-hosts", config.known_hosts)):
        if path is not None:
            yield key, lambda path=path, key=key: _readable(key, path)
    for name in (config.template_text, config.template_html):
        if name is not None:
            yield f"template {name}", lambda name=name: _readable("epnalert-template-folder", config.template_folder / name)
    yield "destination", lambda: destination.check_destination_root(config) or str(config.destination_root)

    def list_sources():
        with SftpClient(config) as client:
            counts = [f"{path}: {len(client.list_epns(path)[0])} EPN folders" for path in config.source_paths]
        return "; ".join(counts)

    yield f"SSH login and SFTP listing on {config.ssh_target}:{config.port}", list_sources
    for path in config.source_paths:
        yield f"rsync over ssh {config.ssh_target}:{path}", lambda path=path: rsync.RsyncRunner(config).check_listing(path)
    portal = PortalClient(config)
    for equipment in config.equipment:
        yield f"portal token for equipment {equipment.id}", lambda equipment=equipment: portal.check_token(equipment)
    yield f"SMTP {config.smtp.host}:{config.smtp.port}", lambda: mail.check_smtp(config.smtp)


def _readable(key, path):
    try:
        with open(path, "rb"):
            return str(path)
    except OSError as error:
        raise MxsyncError(f"{key} {path}: {error.strerror}") from None
