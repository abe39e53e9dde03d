"""Sending aggregate reports: RFC 9990 file name and Subject with the receiver
domain (not org_name), STARTTLS / implicit TLS and SMTP AUTH against aiosmtpd with
a self-signed certificate made here, a certificate not signed by the configured CA
refused, and `milters dmarc report` with its sent-report log: a second run sends
nothing again, a failed send is retried by a later run once its back-off has
passed, and a report of an earlier period is retried too."""

from __future__ import annotations

import datetime as dt
import email
import gzip
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from milters import cli
from milters.dmarc.history import SqliteHistory
from milters.dmarc.report import Relay, build_reports, next_retry, report_message, send_report
from tests.support.dns import LoopbackDNS
from tests.support.processes import free_port
from tests.unit.dmarc.test_dmarc_report import BASE, BEGIN, END

USER, PASSWORD = "reporter", "s3cret pass"


@dataclass
class Cert:
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    """A self-signed certificate for 127.0.0.1 (its own CA)."""
    d = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(hours=1))
         .not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.SubjectAlternativeName(
             [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
         .sign(key, hashes.SHA256()))
    out = Cert(d / "cert.pem", d / "key.pem")
    out.cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    out.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return out


class Sink:
    """Keeps what it is given, with whether TLS and AUTH were used."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], Message, bool, str]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append((list(envelope.rcpt_tos),
                                  email.message_from_bytes(bytes(envelope.content)),
                                  # on the wire: STARTTLS and a TLS port alike
                                  server.transport.get_extra_info("ssl_object") is not None,
                                  session.auth_data.decode() if session.authenticated else ""))
        return "250 OK"


def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                  data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
        USER.encode(), PASSWORD.encode())
    # handled=False: aiosmtpd then answers 535 itself (its default, True, answers nothing).
    return AuthResult(success=ok, handled=False, auth_data=data.login if ok else None)


@pytest.fixture
def smtp_tls(cert: Cert) -> Iterator[tuple[Sink, int, str]]:
    """A relay that requires STARTTLS and AUTH (port, kind "starttls")."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert.cert, cert.key)
    sink, port = Sink(), free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port, tls_context=ctx,
                            require_starttls=True, auth_required=True,
                            authenticator=authenticator,
                            # smtplib falls back to LOGIN after a refused PLAIN, and
                            # aiosmtpd 1.4's LOGIN then waits for a line that never comes.
                            auth_exclude_mechanism=["LOGIN"])
    controller.start()
    yield sink, port, "starttls"
    controller.stop()


def reports() -> list[Any]:
    entries = [BASE, replace(BASE, time=BEGIN + 5)]
    return build_reports(entries, BEGIN, END, "Example Mail Receiver Inc.",
                         "dmarc-noreply@mx.receiver.example")


def test_file_name_and_subject_name_the_receiver_domain() -> None:
    (rep,) = reports()
    assert rep.receiver == "mx.receiver.example"
    assert rep.filename == (f"mx.receiver.example!example.com!{BEGIN}!{END}!"
                            f"{rep.report_id}.xml.gz")
    assert " " not in rep.filename and "!" not in rep.report_id
    msg = report_message(rep, "dmarc-noreply@mx.receiver.example", ["rua@example.com"])
    assert msg["Subject"] == (f"Report Domain: example.com Submitter: mx.receiver.example "
                              f"Report-ID: <{rep.report_id}>")
    assert b"<org_name>Example Mail Receiver Inc.</org_name>" in rep.xml
    # The same period gives the same id: a retried report is recognisably the same.
    assert reports()[0].report_id == rep.report_id


def test_starttls_and_auth(smtp_tls: tuple[Sink, int, str], cert: Cert) -> None:
    sink, port, _ = smtp_tls
    (rep,) = reports()
    msg = report_message(rep, "dmarc-noreply@mx.receiver.example", ["rua@example.com"])
    send_report(msg, Relay("127.0.0.1", port, "starttls", str(cert.cert), USER, PASSWORD))
    ((rcpts, got, tls, login),) = sink.messages
    assert rcpts == ["rua@example.com"] and tls and login == USER
    (part,) = [p for p in got.walk() if p.get_content_type() == "application/gzip"]
    assert part.get_filename() == rep.filename
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes) and gzip.decompress(payload) == rep.xml


def test_relay_refusals(smtp_tls: tuple[Sink, int, str], cert: Cert,
                        tmp_path: Path) -> None:
    import smtplib

    sink, port, _ = smtp_tls
    (rep,) = reports()
    msg = report_message(rep, "dmarc-noreply@mx.receiver.example", ["rua@example.com"])
    with pytest.raises(smtplib.SMTPAuthenticationError):
        send_report(msg, Relay("127.0.0.1", port, "starttls", str(cert.cert), USER, "wrong"))
    with pytest.raises(smtplib.SMTPException, match="without TLS"):
        send_report(msg, Relay("127.0.0.1", port, "none", "", USER, PASSWORD))
    # Without STARTTLS the relay refuses the mail (require_starttls).
    with pytest.raises(smtplib.SMTPException):
        send_report(msg, Relay("127.0.0.1", port))
    # The system CAs do not know our self-signed certificate: not sent.
    with pytest.raises(ssl.SSLCertVerificationError):
        send_report(msg, Relay("127.0.0.1", port, "starttls", "", USER, PASSWORD))
    assert sink.messages == []


def test_implicit_tls(cert: Cert) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert.cert, cert.key)
    sink, port = Sink(), free_port()
    # auth_require_tls=False: aiosmtpd counts only STARTTLS as TLS, not a TLS port.
    controller = Controller(sink, hostname="127.0.0.1", port=port, ssl_context=ctx,
                            authenticator=authenticator, auth_require_tls=False,
                            auth_exclude_mechanism=["LOGIN"])
    controller.start()
    try:
        (rep,) = reports()
        send_report(report_message(rep, "d@mx.receiver.example", ["rua@example.com"]),
                    Relay("127.0.0.1", port, "tls", str(cert.cert), USER, PASSWORD))
    finally:
        controller.stop()
    ((_, _, tls, login),) = sink.messages
    assert tls and login == USER


def test_back_off() -> None:
    assert [next_retry(0, n) for n in (1, 2, 3, 6, 20)] == [3600, 7200, 14400, 86400, 86400]


def _config(tmp_path: Path, dns: LoopbackDNS, db: Path, port: int, cert: Cert,
            password: str = PASSWORD) -> Path:
    (tmp_path / "password").write_text(password + "\n")
    config = tmp_path / "milters.toml"
    config.write_text(
        f'[global]\nauthserv_id = "mx.receiver.example"\n{dns.toml(1.0)}'
        f'[dmarc]\nhistory = "{db}"\nreport_org_name = "Example Mail Receiver Inc."\n'
        f'report_smtp_port = {port}\nreport_smtp_tls = "starttls"\n'
        f'report_smtp_cafile = "{cert.cert}"\nreport_smtp_user = "{USER}"\n'
        f'report_smtp_password_file = "{tmp_path / "password"}"\n')
    return config


def test_cli_sends_once_and_retries_failures(
        dns: LoopbackDNS, tmp_path: Path, smtp_tls: tuple[Sink, int, str], cert: Cert,
        capsys: pytest.CaptureFixture[str]) -> None:
    sink, port, _ = smtp_tls
    db = tmp_path / "h.sqlite"
    store = SqliteHistory(str(db))
    day2 = replace(BASE, time=END + 10)
    for e in (BASE, replace(BASE, time=BEGIN + 5), day2):
        store.record(e)
    store.close()
    # example.com's rua has one destination outside: authorized in DNS.
    dns.txt("example.com._report._dmarc.reports.example.net", "v=DMARC1")
    day1 = ["--begin", str(BEGIN), "--end", str(END)]
    now = END + 3600  # the morning after day 1

    def run(*argv: str, config: Path) -> int:
        return cli.main(["dmarc", "report", "--config", str(config), *argv])

    # Day 1, wrong password at the relay: both destinations fail, exit 1, logged.
    bad = _config(tmp_path, dns, db, port, cert, password="wrong")
    assert run(*day1, "--now", str(now), config=bad) == 1
    assert "failed (retried later)" in capsys.readouterr().err
    assert sink.messages == []
    log = SqliteHistory(str(db)).sends()
    assert [(s.destination, s.state, s.attempts, s.next_attempt) for s in log] == [
        ("dmarc@reports.example.net", "failed", 1, now + 3600),
        ("rua@example.com", "failed", 1, now + 3600)]

    good = _config(tmp_path, dns, db, port, cert)
    # Before the back-off has passed: not tried again.
    assert run(*day1, "--now", str(now + 60), config=good) == 0
    assert "next attempt at" in capsys.readouterr().out and sink.messages == []
    # The next day's run (default period: day 2) also retries day 1's report.
    assert run("--now", str(END + 86400 + 600), config=good) == 0
    out = capsys.readouterr().out
    assert out.count("sent to") == 4, out  # day 1 retried and day 2, two destinations each
    subjects = sorted(str(m["Subject"]) for _, m, _, _ in sink.messages)
    assert len(subjects) == 4 and len(set(subjects)) == 2
    assert all("Submitter: mx.receiver.example " in x for x in subjects)
    assert all(tls and login == USER for _, _, tls, login in sink.messages)
    # Run again (both periods): everything is already sent.
    assert run(*day1, "--now", str(END + 86400 + 700), config=good) == 0
    assert run("--now", str(END + 86400 + 700), config=good) == 0
    assert capsys.readouterr().out.count("already sent") == 4
    assert len(sink.messages) == 4
    sends = SqliteHistory(str(db)).sends()
    assert [(s.state, s.attempts) for s in sends] == [("sent", 2)] * 2 + [("sent", 1)] * 2
    # --resend does send again.
    assert run(*day1, "--resend", "--now", str(END + 86400 + 800), config=good) == 0
    assert len(sink.messages) == 6
