"""Sending email through the configured SMTP server (plain, STARTTLS or SSL, with optional login)."""

import logging
import smtplib
import ssl
from contextlib import contextmanager
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY

from mxsync.errors import MailError

logger = logging.getLogger("mxsync.mail")


def build_message(subject, sender, recipients, text, html=None):
    """Given the parts, return a text (or multipart text + HTML) message; non-ASCII is encoded properly."""
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
    return message


def send_message(smtp, message, recipients):
    """Given SmtpSettings, a message and its recipients, send it; return the server's answer to the data."""
    with (
        _reported(smtp, "cannot send email", "refused the email"),
        _session(smtp) as (server, _),
    ):
        code, answer = _send(server, message, recipients)
    return f"{code} {_text(answer)}"


def check_smtp(smtp):
    """Connect, greet, secure and log in exactly as a send does, sending nothing; return the greeting."""
    with (
        _reported(smtp, "cannot connect", "answered"),
        _session(smtp) as (_, (code, answer)),
    ):
        pass
    return f"{code} {_text(answer).splitlines()[0] if answer else ''}"


@contextmanager
def _session(smtp):
    """Yield (server, EHLO answer) once connected, greeted, secured as configured (certificate verified) and logged in."""
    # One verifying context for SSL and STARTTLS alike: the system's trust store, or SSL_CERT_FILE/SSL_CERT_DIR.
    context = ssl.create_default_context()
    if smtp.security == "ssl":
        server = smtplib.SMTP_SSL(smtp.host, smtp.port, timeout=smtp.timeout, context=context)
    else:
        server = smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout)
    with server:
        greeting = server.ehlo()
        if smtp.security == "starttls":
            server.starttls(context=context)
            greeting = server.ehlo()
        if smtp.username:
            server.login(smtp.username, smtp.password)
        yield server, greeting


@contextmanager
def _reported(smtp, doing, refusal):
    """Turn whatever the SMTP exchange raises into one MailError naming the server and what to do."""
    where = f"SMTP server {smtp.host}:{smtp.port}"
    try:
        yield
    except ssl.SSLCertVerificationError as error:
        raise MailError(
            f"{where}: its certificate is not trusted ({error.verify_message}); add the CA that signed it "
            "to this machine's trust store, or point SSL_CERT_FILE at it"
        ) from None
    except smtplib.SMTPAuthenticationError as error:
        raise MailError(
            f"{where} refused the login ({error.smtp_code}); check epnalert-email-smtp-username/-password"
        ) from None
    except smtplib.SMTPResponseException as error:
        raise MailError(f"{where} {refusal}: {error.smtp_code} {_text(error.smtp_error)}") from None
    except smtplib.SMTPRecipientsRefused as error:
        raise MailError(f"{where} refused the recipients {', '.join(error.recipients)}") from None
    except (smtplib.SMTPException, OSError) as error:
        raise MailError(f"{where}: {doing}: {error or type(error).__name__}") from None


def _send(server, message, recipients):
    """Run MAIL, RCPT and DATA ourselves so that the server's final answer can be logged."""
    payload = message.as_bytes(policy=SMTP_POLICY)
    options = ["SMTPUTF8"] if server.has_extn("smtputf8") and not payload.isascii() else []
    code, answer = server.mail(message["From"], options)
    if code != 250:
        raise smtplib.SMTPSenderRefused(code, answer, message["From"])
    accepted = 0
    for recipient in recipients:
        code, answer = server.rcpt(recipient)
        accepted += code in (250, 251)
    if not accepted:
        raise smtplib.SMTPRecipientsRefused({recipient: (code, answer) for recipient in recipients})
    code, answer = server.data(payload)
    if code != 250:
        raise smtplib.SMTPDataError(code, answer)
    return code, answer


def _text(answer):
    return answer.decode("utf-8", "replace") if isinstance(answer, bytes) else str(answer)
