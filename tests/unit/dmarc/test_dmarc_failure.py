"""Failure reports (RFC 9991): which fo= options ask for a report, the redaction
of the header, the spool file, the AFRF message (RFC 6591), and `send_spool`
against aiosmtpd: external destinations checked in DNS, the per-domain cap, a
relay failure retried without sending twice, an old report dropped."""

from __future__ import annotations

import email
import json
import threading
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from milters.core.resolver import Resolver
from milters.dmarc.evaluate import DkimInput, Evaluation, SpfInput
from milters.dmarc.failure import (
    MAX_AGE,
    FailureSpool,
    auth_failures,
    failure_message,
    redact_headers,
    send_spool,
)
from milters.dmarc.record import DmarcRecord
from milters.dmarc.report import Relay
from tests.support.dkim import env_for
from tests.support.dns import LoopbackDNS
from tests.support.processes import free_port

FAIL_DKIM = [DkimInput("fail", "example.com", "sel")]
SPF_FAIL = SpfInput("fail", "bounce.example.org")
SPF_PASS = SpfInput("pass", "example.com")


@pytest.mark.parametrize(("fo", "dkim", "spf", "dkim_aligned", "spf_aligned", "want"), [
    ("0", FAIL_DKIM, SPF_FAIL, False, False, ["dmarc"]),
    ("0", [], SPF_PASS, False, True, []),  # one aligned pass: no DMARC failure
    ("1", [], SPF_PASS, False, True, ["dmarc"]),  # ... but DKIM did not align
    ("1", [DkimInput("pass", "example.com", "s")], SPF_PASS, True, True, []),
    ("d", FAIL_DKIM, SPF_PASS, False, True, ["dkim"]),  # regardless of alignment
    ("d", [DkimInput("pass", "x.example", "s")], SPF_FAIL, False, False, []),
    ("s", [], SPF_FAIL, False, False, ["spf"]),
    ("s", [], SpfInput("softfail", "x.example"), False, False, ["spf"]),
    ("s", [], SpfInput("neutral", "x.example"), False, False, []),
    ("0:d:s", FAIL_DKIM, SPF_FAIL, False, False, ["dmarc", "dkim", "spf"]),
    ("", FAIL_DKIM, SPF_FAIL, False, False, ["dmarc"]),  # fo absent means 0
])
def test_fo_options(fo: str, dkim: list[DkimInput], spf: SpfInput, dkim_aligned: bool,
                    spf_aligned: bool, want: list[str]) -> None:
    assert auth_failures(fo, dkim, spf, dkim_aligned, spf_aligned) == want


HEADERS = [
    ("Received", "from mx.example.org by mx.test.example with ESMTP id 1 for "
                 "<bob.smith@test.example>; Mon, 23 Nov 2026 10:00:00 +0000"),
    ("From", "Alice <alice@example.com>"),
    ("To", "Bob <bob.smith@test.example>, \"C\" <carol+x@other.example>"),
    ("Cc", "dave@test.example"),
    ("Subject", "my medical results"),
    ("Message-ID", "<1@example.com>"),
]


def test_redaction() -> None:
    out = dict(redact_headers(HEADERS))
    assert out["To"] == "Bob <redacted@test.example>, \"C\" <redacted@other.example>"
    assert out["Cc"] == "redacted@test.example"
    assert "for <redacted@test.example>" in out["Received"]
    assert out["Subject"] == "[redacted]"
    assert out["From"] == "Alice <alice@example.com>"  # what the Domain Owner looks into
    assert "bob" not in json.dumps(out) and "medical" not in json.dumps(out)


def evaluation(fo: str = "1", ruf: tuple[str, ...] = ("mailto:ruf@example.com",),
               result: str = "fail") -> Evaluation:
    record = DmarcRecord(p="reject", ruf=ruf, fo=fo)
    return Evaluation(result, "example.com", policy_domain="example.com", record=record,
                      policy="reject", disposition="reject")


def spool(tmp_path: Path, ev: Evaluation, redact: bool = True) -> Path | None:
    return FailureSpool(str(tmp_path / "spool"), redact).consider(
        ev, FAIL_DKIM, SPF_FAIL, HEADERS, "198.51.100.7", "b@bounce.example.org",
        ["bob.smith@test.example"], "reject", "mx.test.example")


def test_spool_only_when_asked(tmp_path: Path) -> None:
    assert spool(tmp_path, evaluation(ruf=())) is None  # no ruf=
    assert spool(tmp_path, evaluation(result="permerror")) is None
    ev = evaluation()
    assert spool(tmp_path, Evaluation("pass", "example.com", record=ev.record,
                                      dkim_aligned=True, spf_aligned=True)) is None
    path = spool(tmp_path, ev)
    assert path is not None
    data = json.loads(path.read_text())
    assert data["auth_failure"] == ["dmarc"] and data["rcpt_to"] == []
    assert data["authentication_results"] == (
        "mx.test.example; dmarc=fail header.from=example.com; dkim=fail "
        "header.d=example.com header.s=sel; spf=fail smtp.mailfrom=bounce.example.org")
    assert "bob.smith" not in path.read_text()
    unredacted = spool(tmp_path, ev, redact=False)
    assert unredacted is not None and "bob.smith" in unredacted.read_text()


def parts(msg: Message) -> dict[str, Message]:
    return {p.get_content_type(): p for p in msg.walk()}


def test_afrf_message(tmp_path: Path) -> None:
    path = spool(tmp_path, evaluation())
    assert path is not None
    msg = email.message_from_bytes(
        failure_message(json.loads(path.read_text()), "dmarc@mx.test.example",
                        "ruf@example.com").as_bytes())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "feedback-report"
    got = parts(msg)
    assert set(got) >= {"text/plain", "message/feedback-report", "text/rfc822-headers"}
    # A parser reads message/feedback-report as a header block (RFC 5965 §3).
    (report,) = got["message/feedback-report"].get_payload()
    fields = [[k, v] for k, v in report.items()]
    assert ["Feedback-Type", "auth-failure"] in fields and ["Version", "1"] in fields
    assert ["Auth-Failure", "dmarc"] in fields and ["Source-IP", "198.51.100.7"] in fields
    assert ["Reported-Domain", "example.com"] in fields
    assert ["Identity-Alignment", "none"] in fields
    assert ["Delivery-Result", "reject"] in fields
    assert ["DKIM-Domain", "example.com"] in fields
    headers = got["text/rfc822-headers"].get_payload(decode=True)
    assert isinstance(headers, bytes)
    assert b"Message-ID: <1@example.com>" in headers and b"redacted@test.example" in headers
    assert "Submitter" not in str(msg["Subject"]) and "mx.test.example" in str(msg["Subject"])


class Sink:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], Message]] = []
        self.lock = threading.Lock()
        self.refuse = False

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.refuse:
            return "451 4.3.0 try later"
        with self.lock:
            self.messages.append((list(envelope.rcpt_tos),
                                  email.message_from_bytes(bytes(envelope.content))))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Sink, int]]:
    sink, port = Sink(), free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    yield sink, port
    controller.stop()


def test_send_spool(tmp_path: Path, dns: LoopbackDNS, resolver: Resolver,
                    smtp: tuple[Sink, int]) -> None:
    sink, port = smtp
    ruf = ("mailto:ruf@example.com", "mailto:forensic@reports.example.net")
    for _ in range(7):
        spool(tmp_path, evaluation(ruf=ruf))
    d = str(tmp_path / "spool")
    relay = Relay("127.0.0.1", port)
    # The external destination has not authorized us: only ruf@example.com gets them,
    # and 5 of 7 (failure_max_per_domain); the other two are dropped.
    sink.refuse = True
    run = send_spool(d, resolver, "treewalk", relay, "dmarc@mx.test.example", 5)
    assert len(run.failed) == 5 and sink.messages == [] and run.dropped["example.com"] == 2
    assert {why for _, _, why in run.refused} == {
        "no v=DMARC1 record at example.com._report._dmarc.reports.example.net"}
    assert len(list(Path(d).glob("*.json"))) == 5  # kept for the next run
    dns.txt("example.com._report._dmarc.reports.example.net", "v=DMARC1")
    resolver = env_for(dns).resolver  # a new one: the first cached the NXDOMAIN
    sink.refuse = False
    run = send_spool(d, resolver, "treewalk", relay, "dmarc@mx.test.example", 5)
    assert len(run.sent) == 10 and not run.failed
    assert sorted({r[0] for r, _ in sink.messages}) == ["forensic@reports.example.net",
                                                        "ruf@example.com"]
    assert not list(Path(d).glob("*.json"))
    # A file sent to one destination, then the relay failed: the retry sends only
    # what is missing.
    path = spool(tmp_path, evaluation(ruf=ruf))
    assert path is not None
    data = json.loads(path.read_text())
    data["sent_to"] = ["ruf@example.com"]
    path.write_text(json.dumps(data))
    sink.messages.clear()
    send_spool(d, resolver, "treewalk", relay, "dmarc@mx.test.example", 5)
    assert [r for r, _ in sink.messages] == [["forensic@reports.example.net"]]
    # Too old: dropped, not sent.
    path = spool(tmp_path, evaluation(ruf=ruf))
    assert path is not None
    data = json.loads(path.read_text())
    sink.messages.clear()
    run = send_spool(d, resolver, "treewalk", relay, "dmarc@mx.test.example", 5,
                     now=data["time"] + MAX_AGE + 1)
    assert sink.messages == [] and run.failed[0][2] == "too old, dropped"
    assert not path.exists()
