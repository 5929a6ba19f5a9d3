"""Sending and checking mail over TLS: the SMTP sink speaks SSL or STARTTLS with a certificate nobody trusts.

`mxsync check --connect` and a real send go through one connection path, so they agree: both refuse
an untrusted certificate, both work once its CA is trusted (here through SSL_CERT_FILE).
"""

import datetime
import ipaddress
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mxsync.config import SmtpSettings
from mxsync.errors import MailError
from mxsync.mail import build_message, check_smtp, send_message
from tests.facility import SmtpSink

MXSYNC = Path(sys.executable).with_name("mxsync")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """Return (cert file, key file) of a self-signed certificate for 127.0.0.1 and smtp.facility.test."""
    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smtp.facility.test")])
    now = datetime.datetime.now().astimezone()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.DNSName("smtp.facility.test"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "smtp.pem", folder / "smtp.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def server_context(certificate):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*map(str, certificate))
    return context


@pytest.fixture(params=["ssl", "starttls"])
def tls_sink(request, certificate):
    """Return (security, running sink) for implicit TLS and for STARTTLS."""
    security = request.param
    context = server_context(certificate)
    options = {"ssl_context": context} if security == "ssl" else {"tls_context": context}
    with SmtpSink(require_auth=("mailer", "s3cret-pw"), **options) as sink:
        yield security, sink


def settings(sink, security):
    return SmtpSettings(sink.host, sink.port, security, "mailer", "s3cret-pw", 10.0)


def message():
    return build_message("Test", "mxsync@hpc.example.org", ["staff@hpc.example.org"], "Zoë Ångström\n")


def test_untrusted_certificate_fails_the_check_and_the_send_alike(tls_sink, monkeypatch):
    security, sink = tls_sink
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    smtp = settings(sink, security)
    with pytest.raises(MailError) as checked:
        check_smtp(smtp)
    with pytest.raises(MailError) as sent:
        send_message(smtp, message(), ["staff@hpc.example.org"])
    for error in (checked.value, sent.value):
        assert f"SMTP server 127.0.0.1:{sink.port}: its certificate is not trusted" in str(error)
        assert "SSL_CERT_FILE" in str(error) and "\n" not in str(error)
    assert sink.messages == []


def test_trusted_certificate_passes_the_check_and_the_send(tls_sink, certificate, monkeypatch):
    security, sink = tls_sink
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    smtp = settings(sink, security)
    assert check_smtp(smtp).startswith("250 ")
    assert sink.messages == []  # the check sends nothing
    assert send_message(smtp, message(), ["staff@hpc.example.org"]).startswith("250 ")
    [received] = sink.wait_for(1)
    assert received.login == "mailer" and received.message.get_content() == "Zoë Ångström\n"


def test_check_logs_in_as_a_send_does(certificate, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    with SmtpSink(require_auth=("mailer", "s3cret-pw"), tls_context=server_context(certificate)) as sink:
        wrong = SmtpSettings(sink.host, sink.port, "starttls", "mailer", "wrong", 10.0)
        with pytest.raises(MailError, match="refused the login"):
            check_smtp(wrong)
        with pytest.raises(MailError, match="refused the login"):
            send_message(wrong, message(), ["staff@hpc.example.org"])


# ---------------------------------------------------------------- end to end: mxsync check --connect


def smtp_line(result):
    [line] = [line for line in result.stdout.splitlines() if " SMTP " in line]
    return line


@pytest.mark.parametrize("security", ["ssl", "starttls"])
def test_check_connect_refuses_an_untrusted_smtp_certificate(facility, certificate, security):
    context = server_context(certificate)
    options = {"ssl_context": context} if security == "ssl" else {"tls_context": context}
    with SmtpSink(**options) as sink:
        config = facility.write_config(
            epnalert_email_smtp=f"{sink.host}:{sink.port}",
            epnalert_email_smtp_security=security,
        )
        command = [str(MXSYNC), "check", "--config", str(config), "--connect"]
        environment = {"PATH": "/usr/bin:/bin", "HOME": str(facility.workdir)}
        untrusted = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=120,
            env=environment,
            check=False,
        )
        trusted = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=120,
            env={**environment, "SSL_CERT_FILE": str(certificate[0])},
            check=False,
        )
    assert untrusted.returncode == 1
    assert smtp_line(untrusted).startswith(f"FAILED  SMTP 127.0.0.1:{sink.port}: ")
    assert "certificate is not trusted" in smtp_line(untrusted)
    assert smtp_line(trusted).startswith(f"ok      SMTP 127.0.0.1:{sink.port}: 250")
    assert sink.messages == []
