"""`mxsync check`: validate the config and, on request, try every file and connection it names."""

import logging
import sys
from pathlib import Path

from mxsync.config import load_config
from mxsync.environment import protected_home_problem
from mxsync.errors import ConfigError, MxsyncError

logger = logging.getLogger("mxsync.check")


def run_check(config_path, connect=False, name=None):
    """Print one ok/failed line per item; return 0 only if everything passed (a bad config raises ConfigError).

    `name` is what messages call the config file: the Ansible role checks a temporary copy of the config.yml it installs.
    """
    path = str(Path(config_path).expanduser().absolute())
    try:
        config = load_config(config_path)
    except ConfigError as error:
        if name is None or error.path != path:
            raise
        raise ConfigError(name, [problem.replace(path, name) for problem in error.problems]) from None
    shown = name or str(config.path)
    for warning in config.warnings:
        print(f"warning {_renamed(warning, path, shown)}", file=sys.stderr)
    mapped = f"{len(config.epn_cap_map)} mapped EPN numbers"
    if config.epn_cap_map_file is not None:
        mapped += f" (epn_cap_map and {config.epn_cap_map_file})"
    print(f"ok      config {shown}: {len(config.equipment)} equipment, {mapped}")
    problem = protected_home_problem()
    if problem:
        print(f"warning {problem}")
    if not connect:
        return 0
    failures = 0
    for item, probe in _probes(config):
        try:
            detail = probe()
        except MxsyncError as error:
            failures += 1
            print(f"FAILED  {item}: {error}")
        else:
            print(f"ok      {item}" + (f": {detail}" if detail else ""))
    return 1 if failures else 0


def _renamed(message, path, name):
    """Given a message starting with the config's path, return it starting with `name` instead."""
    return name + message[len(path) :] if message.startswith(path + ":") else message


def _probes(config):
    """Yield (name, callable) for every check; each callable returns a detail or raises MxsyncError."""
    from epnalert.render import check_templates
    from mxsync import destination, rsync, state
    from mxsync.portal import PortalClient
    from mxsync.sftp import SftpClient

    yield (
        "ignore file",
        lambda: f"{config.ignore_file}: {len(state.IgnoreFile(config.ignore_file).load())} EPNs recorded",
    )
    for key, path in (("key-file", config.key_file), ("known-hosts", config.known_hosts)):
        if path is not None:
            yield key, lambda path=path, key=key: _readable(key, path)
    yield "epnalert templates", lambda: check_templates(config)
    if config.notify_scientists:
        from mxsync import scientists

        yield "scientists' email templates", lambda: scientists.check_templates(config)
    yield "state directory", lambda: _writable_folder(config.state_dir)
    if config.ignore_file.parent != config.state_dir:
        yield "ignore file folder", lambda: _writable_folder(config.ignore_file.parent)
    for key in ("sync", "epnalert", "email"):
        path = getattr(config.log_files, key)
        if path is not None:
            yield f"log file {key}", lambda path=path: _appendable(path)
    yield "destination", lambda: destination.check_destination_root(config) or str(config.destination_root)
    for project in sorted({project for project in config.epn_cap_map.values() if project}):
        yield (
            f"project folder {project}",
            lambda project=project: _writable_folder(config.destination_root / project, create=False),
        )

    def list_sources():
        with SftpClient(config) as client:
            counts = [f"{path}: {len(client.list_epns(path)[0])} EPN folders" for path in config.source_paths]
        return "; ".join(counts)

    yield f"SSH login and SFTP listing on {config.ssh_target}:{config.port}", list_sources
    yield f"shared ssh connection to {config.ssh_target}", lambda: _shared_connection(config)
    for path in config.source_paths:
        yield (
            f"rsync over ssh {config.ssh_target}:{path}",
            lambda path=path: rsync.RsyncRunner(config).check_listing(path),
        )
    portal = PortalClient(config)
    for equipment in config.equipment:
        yield f"portal token for equipment {equipment.id}", lambda equipment=equipment: portal.check_token(equipment)
    yield f"SMTP {config.smtp.host}:{config.smtp.port}", lambda: _smtp(config.smtp)


def _readable(key, path):
    try:
        with open(path, "rb"):
            return str(path)
    except OSError as error:
        raise MxsyncError(f"{key} {path}: {error.strerror}") from None


def _writable_folder(folder, create=True):
    """Check that files can be created in `folder` (or, if it does not exist, in the nearest existing parent)."""
    import tempfile

    target = folder
    while not target.exists() and target != target.parent:
        target = target.parent
    if target != folder and not create:
        detail = f"does not exist yet; mxsync will create it in {target}"
    else:
        detail = str(folder)
    try:
        with tempfile.TemporaryFile(dir=target, prefix=".mxsync-check-"):
            pass
    except OSError as error:
        raise MxsyncError(f"{target}: cannot create files there ({error.strerror}); fix its owner or mode") from None
    return detail


def _appendable(path):
    """Check that the log file can be written without creating it (a check run as root must not own it)."""
    if not path.exists():
        return _writable_folder(path.parent)
    try:
        with open(path, "a"):
            return str(path)
    except OSError as error:
        raise MxsyncError(f"{path}: cannot write ({error.strerror}); fix its owner or mode") from None


def _shared_connection(config):
    """Open the shared ssh connection exactly as a cycle does; say whether transfers will share it."""
    from mxsync import rsync

    if not config.ssh_connection_sharing:
        return "off (ssh-connection-sharing: false); each transfer logs in on its own"
    runner = rsync.RsyncRunner(config)
    try:
        reason = runner.connect()
        if reason is not None:
            print(f"warning shared ssh connection could not start ({reason}); each transfer will log in on its own")
            return "login works without it"
        return f"{len(runner.connection.masters)} master connection(s)"
    finally:
        runner.close()


def _smtp(smtp):
    """Greet the SMTP server as a send does; the check's line names the server once, so drop it from the error."""
    from mxsync import mail

    try:
        return mail.check_smtp(smtp)
    except MxsyncError as error:
        text = str(error)
        where = f"SMTP server {smtp.host}:{smtp.port}"
        raise MxsyncError(text[len(where) :].lstrip(": ") if text.startswith(where) else text) from None
