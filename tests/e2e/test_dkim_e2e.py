"""The dkim filter behind real Postfix: an authenticated submission (and mail on the
ORIGINATING submission service) is signed as Postfix delivers it, long header lines
included; inbound mail gets dkim= results in Authentication-Results."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest

from milters.dkim.keytools import genkey
from tests.e2e.filters import RunningFilter, StartFilter
from tests.e2e.postfix import PostfixInstance
from tests.support.dns import LoopbackDNS, dns_server
from tests.support.processes import others_disabled

DOMAIN = "sender.example"
RCPT = "user@test.example"


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        yield server


@pytest.fixture
def dkim_milter(postfix: PostfixInstance, start_filter: StartFilter, dns: LoopbackDNS,
                tmp_path: Path) -> RunningFilter:
    for sel, alg in (("rsa", "rsa"), ("ed", "ed25519")):
        made = genkey(DOMAIN, sel, alg, 2048, str(tmp_path))
        dns.txt(f"{sel}._domainkey.{DOMAIN}", made.key.dns_record())
    flt = start_filter("dkim", (
        f'[global]\nauthserv_id = "mx.test.example"\n{dns.toml()}\n'
        f'[dkim]\ndomain = "{DOMAIN}"\nselector = "rsa"\nkey_file = "{tmp_path}/rsa.private"\n'
        f'ed25519_selector = "ed"\ned25519_key_file = "{tmp_path}/ed.private"\n'
        + others_disabled("dkim")))
    postfix.set_milters([flt.socket])
    return flt


def message(subject: str, extra: str = "") -> bytes:
    return (f"From: Alice <alice@{DOMAIN}>\r\nTo: {RCPT}\r\nSubject: {subject}\r\n{extra}"
            "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@{DOMAIN}>\r\n\r\nhello  there\r\n"
            ).encode()


def dkimpy_verifies(raw: bytes, dns: LoopbackDNS) -> list[bool]:
    """dkimpy's verdict on each signature of the delivered file (keys from our DNS)."""
    records = dict(dns.resolver.records)

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        rrs = records.get((name.decode().rstrip(".").lower(), "TXT"))
        return b"".join(bytes(s) for s in rrs[0].data) if rrs else None

    wire = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    d = dkim.DKIM(wire)
    count = sum(1 for n, _ in d.headers if n.lower() == b"dkim-signature")
    return [bool(d.verify(idx=i, dnsfunc=lookup)) for i in range(count)]


def test_authenticated_submission_is_signed_as_delivered(
        postfix: PostfixInstance, dkim_milter: RunningFilter, dns: LoopbackDNS) -> None:
    long_to = ", ".join(f"user{i}@test.example" for i in range(70))
    raw = message("signed", extra=f"X-Recipients: {long_to}\r\n")
    result = postfix.send(f"alice@{DOMAIN}", [RCPT], raw,
                          xclient={"ADDR": "203.0.113.9", "NAME": "laptop.example.net",
                                   "LOGIN": "alice"})
    assert result.accepted, result
    [msg] = postfix.wait_delivered(1)
    assert len(msg.get_all("DKIM-Signature")) == 2
    assert max(len(line) for line in msg.raw.split(b"\n")) <= 998
    assert dkimpy_verifies(msg.raw, dns) == [True, True]


def test_submission_service_is_signed_without_login(
        postfix: PostfixInstance, dkim_milter: RunningFilter, dns: LoopbackDNS) -> None:
    result = postfix.send(f"alice@{DOMAIN}", [RCPT], message("originating"),
                          port=postfix.submission_port,
                          xclient={"ADDR": "203.0.113.10", "NAME": "office.example.net"})
    assert result.accepted, result
    [msg] = postfix.wait_delivered(1)
    assert dkimpy_verifies(msg.raw, dns) == [True, True]


def test_inbound_mail_gets_results(postfix: PostfixInstance, dkim_milter: RunningFilter,
                                   dns: LoopbackDNS) -> None:
    assert postfix.send(f"alice@{DOMAIN}", [RCPT], message("first hop"),
                        xclient={"ADDR": "203.0.113.9", "LOGIN": "alice"}).accepted
    [signed] = postfix.wait_delivered(1)
    postfix.reset()
    inbound = {"ADDR": "198.51.100.7", "NAME": "mx.sender.example", "HELO": "mx.sender.example"}
    # The signed message arrives from outside as it left: its Received lines and all.
    body = signed.raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert postfix.send(f"alice@{DOMAIN}", [RCPT], body, xclient=inbound).accepted
    unsigned = message("plain")
    assert postfix.send(f"alice@{DOMAIN}", [RCPT], unsigned, xclient=inbound).accepted
    delivered = postfix.wait_delivered(2)
    results = {m.get("Subject"): " ".join(" ".join(m.get_all("Authentication-Results")).split())
               for m in delivered}
    assert re.findall(r"dkim=(\w+)", results["first hop"]) == ["pass", "pass"]
    assert "header.d=sender.example" in results["first hop"]
    assert results["plain"] == "mx.test.example; dkim=none; arc=none"
