"""A simulated synchrotron facility on 127.0.0.1 for tests: sshd, portal API, SMTP sink and data tree."""

from tests.facility.facility import Facility
from tests.facility.portal import Credentials, PortalSimulator
from tests.facility.smtp import ReceivedMessage, SmtpSink
from tests.facility.sshd import SshServer, SshServerError
from tests.facility.tree import make_experiment, tree_manifest, wanted

__all__ = [
    "Credentials",
    "Facility",
    "PortalSimulator",
    "ReceivedMessage",
    "SmtpSink",
    "SshServer",
    "SshServerError",
    "make_experiment",
    "tree_manifest",
    "wanted",
]
