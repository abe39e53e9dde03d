"""Failure reports end to end: `milters run dmarc` with failure_reports = true,
driven over the milter protocol, spools a report for a p=reject failure whose
record has ruf= (fo=1) and none for a domain with fo=0 that passes; then
`milters dmarc failures` (a subprocess, as its timer runs it) sends it through an
aiosmtpd relay: the header only, recipients and Subject redacted, never the body.
Without failure_reports (the default) nothing is spooled."""

from __future__ import annotations

import email
import subprocess
import sys
import threading
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from milters.client.probe import ProbeResult, probe
from milters.core.envelope import Envelope
from tests.support.dns import LoopbackDNS, dns_server
from tests.support.processes import ProcessFactory, free_port

ROOT = Path(__file__).resolve().parents[2]
AUTHSERV = "mx.test.example"
SECRET = "SECRET BODY TEXT"


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        server.txt("_dmarc.example.com",
                   "v=DMARC1; p=reject; ruf=mailto:ruf@example.com; fo=1")
        server.txt("example.com", "v=spf1 ip4:192.0.2.0/24 -all")
        server.txt("_dmarc.ok.example", "v=DMARC1; p=reject; ruf=mailto:ruf@ok.example; fo=0")
        server.txt("ok.example", "v=spf1 ip4:192.0.2.0/24 -all")
        yield server


class Sink:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], Message]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append((list(envelope.rcpt_tos),
                                  email.message_from_bytes(bytes(envelope.content))))
        return "250 OK"


def send(spec: str, domain: str, client_ip: str) -> ProbeResult:
    msg = (f"From: Alice <alice@{domain}>\r\nTo: Bob <bob.smith@test.example>\r\n"
           f"Subject: private matters\r\nMessage-ID: <42@{domain}>\r\n\r\n{SECRET}\r\n"
           ).encode()
    env = Envelope(client_ip=client_ip, client_name="mail.example.net",
                   helo="mail.example.net", mail_from=f"bounce@{domain}",
                   rcpt_to=["bob.smith@test.example"])
    return probe(spec, msg, env, timeout=15)


def start(factory: ProcessFactory, d: Path, dns: LoopbackDNS, extra: str,
          relay_port: int) -> tuple[str, Path]:
    port = free_port()
    config = d / f"milters-{port}.toml"
    config.write_text(
        f'[global]\nauthserv_id = "{AUTHSERV}"\ninternal_networks = []\n{dns.toml()}'
        "[dkim]\nenabled = false\n[spf]\nenabled = false\n"
        f'[dmarc]\nsocket = "inet:{port}@127.0.0.1"\nhistory = ""\n'
        f'reject_failures = true\nreport_smtp_port = {relay_port}\n'
        f'failure_spool = "{d}/spool-{port}"\n{extra}')
    argv = [sys.executable, "-m", "milters", "run", "dmarc", "--config", str(config)]
    factory.start(argv, port, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
    return f"inet:{port}@127.0.0.1", config


def test_failure_report_spooled_and_sent_redacted(dns: LoopbackDNS, tmp_path: Path) -> None:
    sink, relay_port = Sink(), free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=relay_port)
    controller.start()
    try:
        with ProcessFactory() as factory:
            spec, config = start(factory, tmp_path, dns, "failure_reports = true\n",
                                 relay_port)
            assert send(spec, "example.com", "198.51.100.7").verdict == "reject"
            assert send(spec, "ok.example", "192.0.2.10").verdict in ("accept", "continue")
            spool = next(tmp_path.glob("spool-*"))
            (spooled,) = spool.glob("*.json")  # one: ok.example passed under fo=0
            assert SECRET not in spooled.read_text()

            off_spec, _ = start(factory, tmp_path, dns, "", relay_port)
            assert send(off_spec, "example.com", "198.51.100.7").verdict == "reject"
            assert len(list(tmp_path.glob("spool-*"))) == 1  # nothing from the default

        run = subprocess.run([sys.executable, "-m", "milters", "dmarc", "failures",
                              "--config", str(config)], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert "sent to ruf@example.com" in run.stdout
    finally:
        controller.stop()
    ((rcpts, report),) = sink.messages
    assert rcpts == ["ruf@example.com"] and report.get_content_type() == "multipart/report"
    raw = report.as_string()
    assert SECRET not in raw and "bob.smith" not in raw and "private matters" not in raw
    parts = {p.get_content_type(): p for p in report.walk()}
    headers = parts["text/rfc822-headers"].get_payload(decode=True)
    assert isinstance(headers, bytes)
    assert b"To: Bob <redacted@test.example>" in headers
    assert b"Message-ID: <42@example.com>" in headers
    (feedback,) = parts["message/feedback-report"].get_payload()
    assert feedback["Feedback-Type"] == "auth-failure"
    assert feedback["Source-IP"] == "198.51.100.7"
    assert feedback["Delivery-Result"] == "reject"
    assert "dmarc=fail header.from=example.com" in feedback["Authentication-Results"]
    assert not list(spool.glob("*.json"))  # sent: removed from the spool
