"""An SMTP server on 127.0.0.1 that keeps every message it accepts, or refuses them on request."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from tests.facility.net import LOOPBACK, free_port

BIND_ATTEMPTS = 3


@dataclass(frozen=True)
class ReceivedMessage:
    """One accepted message: the envelope, the parsed message, the raw bytes and the AUTH login if any."""

    mail_from: str
    rcpt_tos: list
    message: EmailMessage
    raw: bytes
    login: str | None = None


class SmtpSink:
    """Collects mail sent to 127.0.0.1:`port`; set `fail_with` (e.g. "451 Try again later") to refuse DATA.

    `ssl_context` makes it speak TLS from the start (port 465 style), `tls_context` offers STARTTLS.
    """

    def __init__(self, require_auth=None, fail_with=None, ssl_context=None, tls_context=None):
        self.require_auth = require_auth
        self.fail_with = fail_with
        self.ssl_context = ssl_context
        self.tls_context = tls_context
        self.messages = []
        self.host = LOOPBACK
        self.port = None
        self._received = threading.Condition()
        self._controller = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def start(self):
        """Listen on a free port, retrying if another process takes it first."""
        for attempt in range(BIND_ATTEMPTS):
            controller = self._make_controller(free_port())
            try:
                controller.start()
            except OSError:
                if attempt == BIND_ATTEMPTS - 1:
                    raise
                continue
            self._controller, self.port = controller, controller.port
            return

    def stop(self):
        """Stop listening; does nothing if not started."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def wait_for(self, count=1, timeout=5.0):
        """Return the first `count` messages once they have arrived; raise TimeoutError if they do not."""
        with self._received:
            if not self._received.wait_for(lambda: len(self.messages) >= count, timeout):
                raise TimeoutError(f"expected {count} message(s) within {timeout} s, got {len(self.messages)}")
            return self.messages[:count]

    async def handle_DATA(self, server, session, envelope):
        """aiosmtpd hook: keep the message, or refuse it with `fail_with`."""
        if self.fail_with:
            return self.fail_with
        raw = envelope.original_content
        login = session.auth_data.login.decode() if session.authenticated else None
        received = ReceivedMessage(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            # SMTP lines end in CRLF; parsed with LF, get_content() gives the text as it was written.
            message=BytesParser(policy=policy.default).parsebytes(raw.replace(b"\r\n", b"\n")),
            raw=raw,
            login=login,
        )
        with self._received:
            self.messages.append(received)
            self._received.notify_all()
        return "250 Message accepted"

    def _make_controller(self, port):
        # A fixed server_hostname spares aiosmtpd a getfqdn() DNS lookup that can stall.
        options = {
            "hostname": self.host,
            "port": port,
            "server_hostname": "smtp.facility.test",
        }
        if self.ssl_context:
            options["ssl_context"] = self.ssl_context
        if self.tls_context:
            options["tls_context"] = self.tls_context
        if self.require_auth:
            options.update(
                authenticator=self._authenticate,
                auth_required=True,
                auth_require_tls=False,
            )
        return Controller(self, **options)

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        """aiosmtpd authenticator: accept only the configured (user, password)."""
        user, password = self.require_auth
        accepted = (auth_data.login, auth_data.password) == (
            user.encode(),
            password.encode(),
        )
        # handled=False lets aiosmtpd itself answer a refusal with 535.
        return AuthResult(success=accepted, handled=False, auth_data=auth_data)
