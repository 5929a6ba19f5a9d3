"""A throw-away OpenSSH server on 127.0.0.1 that lets the current user in with a generated key."""

import os
import pwd
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.facility.net import LOOPBACK, free_port

SSHD = Path("/usr/sbin/sshd")
REAPER = Path(__file__).with_name("reaper.py")
# sshd run as root refuses to start without its privilege separation directory.
PRIVSEP_DIR = Path("/run/sshd")
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
BIND_ATTEMPTS = 3
LOG_TAIL_LINES = 20
POLL_INTERVAL = 0.02


class SshServerError(RuntimeError):
    """sshd did not come up; the message ends with the tail of its log."""


class SshServer:
    """An sshd subprocess serving shell, rsync and SFTP to the current user; start/stop may repeat."""

    def __init__(self, workdir, max_sessions=10):
        self.workdir = Path(workdir).resolve()
        self.host = LOOPBACK
        # sshd's own default: production servers refuse an 11th session on one connection.
        self.max_sessions = max_sessions
        # Not getpass.getuser(): it trusts $USER, which su and sudo can leave naming someone else.
        self.username = pwd.getpwuid(os.geteuid()).pw_name
        self.port = None
        self.host_key = self.workdir / "host_ed25519"
        self.client_key = self.workdir / "client_ed25519"
        self.known_hosts = self.workdir / "known_hosts"
        self.log_file = self.workdir / "sshd.log"
        self._authorized_keys = self.workdir / "authorized_keys"
        self._config = self.workdir / "sshd_config"
        self._process = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def target(self):
        """Return `user@127.0.0.1`, the login ssh and rsync are given."""
        return f"{self.username}@{self.host}"

    def start(self):
        """Start sshd, making keys on first use, and return once it sends its SSH banner."""
        if self._process is not None:
            raise RuntimeError("sshd is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.client_key.exists():
            _keygen(self.client_key, "facility client")
            self._authorized_keys.write_bytes(self.client_key.with_suffix(".pub").read_bytes())
        if not self.host_key.exists():
            _keygen(self.host_key, "facility host")
        if os.geteuid() == 0:
            PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        first_start = self.port is None
        # A restart keeps its port, so clients see an outage rather than a different server.
        ports = (free_port() for _ in range(BIND_ATTEMPTS)) if first_start else [self.port]
        if not any(self._launch(port) for port in ports):
            raise SshServerError(f"sshd could not bind a port on {self.host}:\n{self._log_tail()}")
        if first_start:
            self._write_known_hosts()

    def stop(self):
        """Stop sshd and cut every open session, as a network failure would; does nothing if stopped."""
        if self._process is None:
            return
        process, self._process = self._process, None
        _terminate(process)

    def regenerate_host_key(self, update_known_hosts=False):
        """Replace the host key (restarting sshd if it runs); known_hosts keeps the old key unless asked."""
        was_running = self._process is not None
        self.stop()
        _keygen(self.host_key, "facility host")
        if update_known_hosts:
            self._write_known_hosts()
        if was_running:
            self.start()

    def ssh_base_command(self):
        """Return the ssh argument list without a destination, as `rsync -e shlex.join(...)` wants it."""
        # "-F none" and IdentitiesOnly keep the user's own ssh config and agent out of the tests.
        return [
            "ssh",
            "-F",
            "none",
            "-i",
            str(self.client_key),
            "-p",
            str(self.port),
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
        ]

    def ssh_command(self, *remote_command):
        """Return the argument list that runs `remote_command` (or a session) on this server."""
        return [*self.ssh_base_command(), self.target, *remote_command]

    def _launch(self, port):
        """Run sshd on `port`; return False if the port was taken, raise on any other failure."""
        self._write_config(port)
        log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open(self.log_file, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, str(REAPER), str(SSHD), "-D", "-e", "-f", str(self._config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                with open(self.log_file, "rb") as log:
                    log.seek(log_start)
                    if b"Address already in use" in log.read():
                        return False
                raise SshServerError(f"sshd exited with status {process.returncode}:\n{self._log_tail()}")
            if self._banner_received(port):
                self._process, self.port = process, port
                return True
            time.sleep(POLL_INTERVAL)
        _terminate(process)
        raise SshServerError(f"sshd sent no banner within {READY_TIMEOUT} s:\n{self._log_tail()}")

    def _banner_received(self, port):
        try:
            with socket.create_connection((self.host, port), timeout=1) as connection:
                return connection.recv(64).startswith(b"SSH-2.0")
        except OSError:
            return False

    def _write_config(self, port):
        settings = [
            ("ListenAddress", self.host),
            ("Port", port),
            ("HostKey", _quoted(self.host_key)),
            ("AuthorizedKeysFile", _quoted(self._authorized_keys)),
            ("PasswordAuthentication", "no"),
            ("KbdInteractiveAuthentication", "no"),
            ("PubkeyAuthentication", "yes"),
            ("PermitRootLogin", "prohibit-password"),
            # Test directories sit under world-writable /tmp, which StrictModes would reject.
            ("StrictModes", "no"),
            ("UsePAM", "no"),
            ("Subsystem", "sftp internal-sftp"),
            ("PidFile", _quoted(self.workdir / "sshd.pid")),
            ("LogLevel", "VERBOSE"),
            # Benchmarks open many connections at once; the default (10:30:100) would refuse some.
            ("MaxStartups", "100:30:200"),
            ("MaxSessions", self.max_sessions),
        ]
        self._config.write_text("".join(f"{name} {value}\n" for name, value in settings))

    def _write_known_hosts(self):
        key_type, key_blob = self.host_key.with_suffix(".pub").read_text().split()[:2]
        self.known_hosts.write_text(f"[{self.host}]:{self.port} {key_type} {key_blob}\n")

    def _log_tail(self):
        if not self.log_file.exists():
            return "(no log)"
        lines = self.log_file.read_text(errors="replace").splitlines()
        return "\n".join(lines[-LOG_TAIL_LINES:])


def _terminate(process):
    """Stop the reaper running sshd; it ends sshd and every session, even with clients connected."""
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _keygen(path, comment):
    """Write a new passphrase-less ed25519 key pair at `path` and `path`.pub."""
    # ssh-keygen would stop to ask before overwriting.
    path.unlink(missing_ok=True)
    path.with_suffix(".pub").unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )


def _quoted(path):
    """Quote `path` for sshd_config, which would otherwise split it at spaces."""
    return f'"{path}"'
