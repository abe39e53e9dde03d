"""The spf filter behind real Postfix: XCLIENT makes the filter see a sender's
client address and HELO; an SPF fail is refused at RCPT with 550 5.7.23, a pass
is delivered with spf=pass in Authentication-Results."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.filters import RunningFilter, StartFilter
from tests.e2e.postfix import PostfixInstance
from tests.support.dns import LoopbackDNS, dns_server

RCPT = "user@test.example"
HELO = "mail.sender.example"
XCLIENT = {"ADDR": "192.0.2.5", "NAME": HELO, "HELO": HELO}


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        server.txt("sender.example", "v=spf1 ip4:192.0.2.5 -all")
        server.txt("forged.example", "v=spf1 ip4:198.51.100.0/24 -all exp=why.forged.example")
        server.txt("why.forged.example", "%{i} is not a mail server of %{d}")
        server.txt(HELO, "v=spf1 a -all")
        server.a(HELO, "192.0.2.5")
        yield server


@pytest.fixture
def spf_milter(postfix: PostfixInstance, start_filter: StartFilter,
               dns: LoopbackDNS) -> RunningFilter:
    flt = start_filter("spf", f'[global]\nauthserv_id = "mx.test.example"\n{dns.toml()}\n'
                              '[spf]\nreceived_spf = true\n')
    postfix.set_milters([flt.socket])
    return flt


def message(sender: str) -> bytes:
    return (f"From: {sender}\r\nTo: {RCPT}\r\nSubject: spf\r\n"
            "Message-ID: <spf@sender.example>\r\n\r\nhello\r\n").encode()


def test_spf_fail_is_refused_at_rcpt(postfix: PostfixInstance,
                                     spf_milter: RunningFilter) -> None:
    result = postfix.send("alice@forged.example", [RCPT], message("alice@forged.example"),
                          xclient=XCLIENT)
    assert result.mail is not None and result.mail.code == 250
    reply = result.rcpts[RCPT]
    assert reply.code == 550, result
    assert "5.7.23" in reply.text
    assert "192.0.2.5 is not a mail server of forged.example" in reply.text
    assert result.data is None  # nothing was accepted, so no DATA


def test_spf_pass_is_delivered_with_results(postfix: PostfixInstance,
                                            spf_milter: RunningFilter) -> None:
    result = postfix.send("alice@sender.example", [RCPT], message("alice@sender.example"),
                          xclient=XCLIENT)
    assert result.accepted, result
    [msg] = postfix.wait_delivered(1)
    ar = " ".join(str(msg.get("Authentication-Results")).split())
    assert ar == ("mx.test.example; spf=pass smtp.mailfrom=alice@sender.example "
                  "smtp.helo=mail.sender.example")
    received_spf = " ".join(str(msg.get("Received-SPF")).split())
    assert received_spf.startswith("pass (mx.test.example: domain of alice@sender.example "
                                   "designates 192.0.2.5 as permitted sender)")
    assert received_spf.endswith("identity=mailfrom;")
    # RFC 7208 §9.1 and RFC 8601 §5: both above the fields the sender wrote
    names = msg.header_names
    assert names.index("Received-SPF") < names.index("Received")
    assert names.index("Authentication-Results") < names.index("Received")


def test_an_internal_client_is_accepted_at_connect(postfix: PostfixInstance,
                                                   spf_milter: RunningFilter) -> None:
    """Issue 13: mail from internal_networks (127.0.0.1 here, no XCLIENT) is
    accepted at CONNECT; Postfix then calls the filter no more for the session and
    delivers the message as it came."""
    forged = b"Authentication-Results: mx.test.example; spf=pass smtp.mailfrom=x\r\n"
    result = postfix.send("alice@forged.example", [RCPT],
                          forged + message("alice@forged.example"))
    assert result.accepted, result
    [msg] = postfix.wait_delivered(1)
    assert msg.get_all("Received-SPF") == []
    # Inside our trust boundary (RFC 8601 §5): its own field is left as it was.
    assert msg.get_all("Authentication-Results") == [
        "mx.test.example; spf=pass smtp.mailfrom=x"]
    log = spf_milter.output()
    assert "filter=spf stage=connect client=" in log
    assert "not checked: internal client" in log
    assert "stage=eom" not in log
