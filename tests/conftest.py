"""Shared fixtures: the simulated facility and its parts (see tests/facility)."""

import shutil

import pytest

from tests.facility import Facility, PortalSimulator, SmtpSink, SshServer
from tests.facility.sshd import SSHD

REQUIRED_TOOLS = ("ssh", "ssh-keygen", "rsync")


def _skip_without_ssh_tools():
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if not SSHD.exists():
        missing.append(str(SSHD))
    if missing:
        pytest.skip(f"simulated facility needs OpenSSH and rsync; missing: {', '.join(missing)}")


@pytest.fixture
def facility(tmp_path):
    """A running Facility in this test's own temporary directory."""
    _skip_without_ssh_tools()
    with Facility(tmp_path / "facility") as running:
        yield running


@pytest.fixture
def ssh_server(tmp_path):
    """A running SshServer alone, for tests that restart it or change its host key."""
    _skip_without_ssh_tools()
    with SshServer(tmp_path / "sshd") as server:
        yield server


@pytest.fixture
def portal():
    """A running PortalSimulator alone."""
    with PortalSimulator() as simulator:
        yield simulator


@pytest.fixture
def smtp_sink():
    """A running SmtpSink alone."""
    with SmtpSink() as sink:
        yield sink
