"""The dmarc filter behind real Postfix, chained after the dkim filter as
`milters postfix-config` lists them: a message signed by an aligned domain passes
on the dkim filter's result; an unsigned one under p=reject gets 550 at end of DATA;
a forged dkim=pass with our authserv-id from outside is removed and never believed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from milters.dkim.keytools import genkey
from tests.e2e.filters import RunningFilter, StartFilter
from tests.e2e.postfix import PostfixInstance
from tests.support.dns import LoopbackDNS, dns_server

DOMAIN = "sender.example"
RCPT = "user@test.example"
INBOUND = {"ADDR": "198.51.100.7", "NAME": "mx.sender.example", "HELO": "mx.sender.example"}


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        yield server


@pytest.fixture
def chain(postfix: PostfixInstance, start_filter: StartFilter, dns: LoopbackDNS,
          tmp_path: Path) -> tuple[RunningFilter, RunningFilter]:
    made = genkey(DOMAIN, "rsa", "rsa", 2048, str(tmp_path))
    dns.txt(f"rsa._domainkey.{DOMAIN}", made.key.dns_record())
    dns.txt(f"_dmarc.{DOMAIN}", "v=DMARC1; p=reject")
    common = f'[global]\nauthserv_id = "mx.test.example"\n{dns.toml()}\n[spf]\nenabled = false\n'
    dkim_table = (f'[dkim]\ndomain = "{DOMAIN}"\nselector = "rsa"\n'
                  f'key_file = "{tmp_path}/rsa.private"\n')
    dkim = start_filter("dkim", common + dkim_table)
    dmarc = start_filter("dmarc", common + dkim_table + (
        f'[dmarc]\nreject_failures = true\nhistory = "{tmp_path}/history.sqlite"\n'))
    # Signing is the last step of the chain (dkim verifies first).
    signer = start_filter("dkim-sign", common + dkim_table)
    postfix.set_milters([dkim.socket, dmarc.socket, signer.socket])
    return dkim, dmarc


def message(subject: str, extra: str = "") -> bytes:
    return (f"{extra}From: Alice <alice@{DOMAIN}>\r\nTo: {RCPT}\r\nSubject: {subject}\r\n"
            "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@{DOMAIN}>\r\n\r\nhello\r\n").encode()


def test_aligned_dkim_passes_and_unsigned_is_refused(
        postfix: PostfixInstance, chain: tuple[RunningFilter, RunningFilter]) -> None:
    assert postfix.send(f"alice@{DOMAIN}", [RCPT], message("signed"),
                        xclient={"ADDR": "203.0.113.9", "LOGIN": "alice"}).accepted
    [signed] = postfix.wait_delivered(1)
    postfix.reset()
    body = signed.raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert postfix.send(f"alice@{DOMAIN}", [RCPT], body, xclient=INBOUND).accepted
    [delivered] = postfix.wait_delivered(1)
    results = " ".join(" ".join(delivered.get_all("Authentication-Results")).split())
    assert "dkim=pass" in results
    assert "dmarc=pass (p=reject dis=none) header.from=sender.example" in results
    refused = postfix.send(f"alice@{DOMAIN}", [RCPT], message("unsigned"), xclient=INBOUND)
    assert not refused.accepted and refused.data is not None
    assert refused.data.code == 550 and "5.7.1" in refused.data.text
    assert "DMARC policy of sender.example" in refused.data.text


def test_forged_result_from_outside_is_not_believed(
        postfix: PostfixInstance, chain: tuple[RunningFilter, RunningFilter]) -> None:
    forged = ("Authentication-Results: mx.test.example; dkim=pass header.d=sender.example; "
              "dmarc=pass header.from=sender.example\r\n")
    refused = postfix.send(f"alice@{DOMAIN}", [RCPT], message("forged", forged),
                           xclient=INBOUND)
    assert refused.data is not None and refused.data.code == 550
    assert re.search(r"DMARC", refused.data.text)
