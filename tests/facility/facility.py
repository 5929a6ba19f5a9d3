"""The whole simulated facility: ssh/SFTP server, portal and SMTP sink over one data tree, plus its config."""

import json
import os
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tests.facility.portal import PortalSimulator
from tests.facility.smtp import SmtpSink
from tests.facility.sshd import SshServer
from tests.facility.tree import make_experiment

DEFAULT_EQUIPMENT_ID = 23
DEFAULT_BEAMLINE = "mx"
TREE_OPTIONS = ("frames", "frame_size", "small_files", "seed")
LOG_NAMES = ("sync", "epnalert", "email")


class Facility:
    """Starts sshd, the portal and the SMTP sink together; data lives under `root`/data/<beamline>."""

    def __init__(self, workdir):
        self.workdir = Path(workdir).resolve()
        self.root = self.workdir / "facility"
        self.destination = self.workdir / "destination"
        self.sshd = SshServer(self.workdir / "sshd")
        self.portal = PortalSimulator()
        self.smtp = SmtpSink()
        # Equipment id -> beamline, shared by the portal and the config's equipment list.
        self.equipment = {DEFAULT_EQUIPMENT_ID: DEFAULT_BEAMLINE}
        self.portal.add_equipment(DEFAULT_EQUIPMENT_ID)
        self._services = ExitStack()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def secrets(self):
        """Every portal password and every access token issued so far, for log-leak checks."""
        passwords = [
            secret
            for credentials in self.portal.credentials.values()
            for secret in (credentials.password, credentials.client_password)
        ]
        return passwords + list(self.portal.issued_tokens)

    def start(self):
        """Create the directories and start the three services; if one fails, those started are stopped."""
        (self.root / "data" / DEFAULT_BEAMLINE).mkdir(parents=True, exist_ok=True)
        self.destination.mkdir(parents=True, exist_ok=True)
        with ExitStack() as started:
            for service in (self.sshd, self.portal, self.smtp):
                service.start()
                started.callback(service.stop)
            self._services = started.pop_all()

    def stop(self):
        """Stop the services in reverse order of starting."""
        self._services.close()

    def add_experiment(self, beamline, epn, equipment_id=None, start=None, end=None, **options):
        """Create an experiment's data and, given `equipment_id`, its visit (by default ended a day ago).

        Returns the data path; `options` go to make_experiment if it takes them, else to add_visit."""
        tree_options = {name: options.pop(name) for name in TREE_OPTIONS if name in options}
        experiment = make_experiment(self.root, beamline, epn, **tree_options)
        if equipment_id is None:
            if options:
                raise TypeError(f"visit options {sorted(options)} need an equipment_id")
            return experiment
        if self.equipment.setdefault(equipment_id, beamline) != beamline:
            raise ValueError(f"equipment {equipment_id} serves beamline {self.equipment[equipment_id]!r}")
        now = datetime.now(timezone.utc)
        self.portal.add_visit(
            equipment_id, epn, start or now - timedelta(days=2), end or now - timedelta(days=1), **options
        )
        return experiment

    def write_config(self, path=None, **overrides):
        """Write a config.yml (mode 0600) pointing at the running services and return its path.

        Overrides spell dashes as underscores (max_tasks=4 sets max-tasks); a None value removes the key."""
        if self.sshd.port is None:
            raise RuntimeError("start the facility before writing its config")
        state_dir, log_dir = self.workdir / "state", self.workdir / "log"
        config = {
            "epn_cap_map": {"12282": "ny79"},
            "ignore": str(state_dir / "ignore.yml"),
            "equipment": [self._equipment_entry(equipment_id) for equipment_id in self.equipment],
            "base-url": self.portal.url,
            "beamline": DEFAULT_BEAMLINE,
            "host": self.sshd.host,
            "username": self.sshd.username,
            "port": self.sshd.port,
            "key-file": str(self.sshd.client_key),
            "known-hosts": str(self.sshd.known_hosts),
            "source-path": f"{self.root}/data/{{beamline}}",
            "epnalert-email-to": "staff@hpc.example.org",
            "epnalert-email-from": "mxsync@hpc.example.org",
            "epnalert-email-smtp": f"{self.smtp.host}:{self.smtp.port}",
            "visit-day-range": 30,
            "destination-root-path": str(self.destination),
            "sync-frequency-hours": 1,
            "max-tasks": 2,
            "portal-retry-delay": 0.05,
            "rsync-retry-delay": 0.1,
            "log-level": "DEBUG",
            "log-files": {name: str(log_dir / f"{name}.log") for name in LOG_NAMES},
        }
        for name, value in overrides.items():
            # epn_cap_map is the one key spelt with underscores in the real file.
            key = name if name in config else name.replace("_", "-")
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        state_dir.mkdir(exist_ok=True)
        log_dir.mkdir(exist_ok=True)
        path = Path(path) if path else self.workdir / "config.yml"
        _write_private(path, _to_yaml(config))
        return path

    def _equipment_entry(self, equipment_id):
        credentials = self.portal.credentials.get(equipment_id) or self.portal.credentials[None]
        return {
            "id": equipment_id,
            "username": credentials.username,
            "password": credentials.password,
            "client_name": credentials.client_name,
            "client_password": credentials.client_password,
            "beamline": self.equipment[equipment_id],
        }


def _to_yaml(config):
    """Render a mapping as YAML, one key a line, each value in JSON syntax (which YAML reads as flow style)."""
    lines = ["---"] + [f"{key}: {json.dumps(value, ensure_ascii=False)}" for key, value in config.items()]
    return "\n".join(lines) + "\n"


def _write_private(path, text):
    """Write `text` to `path` readable by its owner only, as a file holding passwords should be."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    # O_CREAT's mode applies to new files only; an existing file keeps its old mode.
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(text)
