"""Sending email through the configured SMTP server (plain, STARTTLS or SSL, with optional login)."""

import logging
import smtplib
import ssl
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
    where = f"SMTP server {smtp.host}:{smtp.port}"
    try:
        if smtp.security == "ssl":
            server = smtplib.SMTP_SSL(smtp.host, smtp.port, timeout=smtp.timeout, context=ssl.create_default_context())
        else:
            server = smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout)
        with server:
            server.ehlo()
            if smtp.security == "starttls":
                server.starttls(context=ssl.create_default_context())
                server.ehlo()
            if smtp.username:
                server.login(smtp.username, smtp.password)
            code, answer = _send(server, message, recipients)
    except smtplib.SMTPAuthenticationError as error:
        raise MailError(f"{where} refused the login ({error.smtp_code}); check epnalert-email-smtp-username/-password") from None
    except smtplib.SMTPResponseException as error:
        raise MailError(f"{where} refused the email: {error.smtp_code} {_text(error.smtp_error)}") from None
    except smtplib.SMTPRecipientsRefused as error:
        raise MailError(f"{where} refused the recipients {', '.join(error.recipients)}") from None
    except (smtplib.SMTPException, OSError) as error:
        raise MailError(f"{where}: cannot send email: {error or type(error).__name__}") from None
    return f"{code} {_text(answer)}"


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


def check_smtp(smtp):
    """Open a connection and exchange greetings (and TLS/login if configured), sending nothing."""
    where = f"SMTP server {smtp.host}:{smtp.port}"
    try:
        factory = smtplib.SMTP_SSL if smtp.security == "ssl" else smtplib.SMTP
        with factory(smtp.host, smtp.port, timeout=smtp.timeout) as server:
            code, answer = server.ehlo()
            if smtp.security == "starttls":
                server.starttls(context=ssl.create_default_context())
            if smtp.username:
                server.login(smtp.username, smtp.password)
    except (smtplib.SMTPException, OSError) as error:
        raise MailError(f"{where}: {error or type(error).__name__}") from None
    return f"{code} {_text(answer).splitlines()[0] if answer else ''}"


def _text(answer):
    return answer.decode("utf-8", "replace") if isinstance(answer, bytes) else str(answer)
