"""The spf filter as an administrator runs it: `milters run spf` on a loopback port,
its DNS answered by the loopback server, driven over the milter protocol."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from milters.client.probe import ProbeResult, probe
from milters.core.envelope import Envelope
from milters.core.verdict import EditKind
from tests.support.dns import LoopbackDNS, dns_server
from tests.support.processes import ProcessFactory, free_port

ROOT = Path(__file__).resolve().parents[2]
CLIENT = "192.0.2.5"
OTHER = "198.51.100.9"
HELO = "mail.sender.example"
MESSAGE = (b"From: a@sender.example\r\nTo: u@test.example\r\nSubject: hi\r\n"
           b"Authentication-Results: mx.test.example; spf=pass smtp.mailfrom=forged.example\r\n"
           b"\r\nhello\r\n")

Start = Callable[..., str]


@pytest.fixture(scope="module")
def dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        server.txt("sender.example", f"v=spf1 ip4:{CLIENT} -all")
        server.txt("soft.example", f"v=spf1 ip4:{CLIENT} ~all")
        server.txt("exp.example", "v=spf1 -all exp=why.exp.example")
        server.txt("why.exp.example", "%{i} may not send for %{d}")
        server.txt(HELO, "v=spf1 a -all")
        server.a(HELO, CLIENT)
        server.timeout("slow.example")
        yield server


@pytest.fixture(scope="module")
def start(dns: LoopbackDNS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Start]:
    """start(spf_table_lines) -> socket spec of a running `milters run spf`."""
    factory = ProcessFactory()

    def start(extra: str = "") -> str:
        d = tmp_path_factory.mktemp("spf")
        port = free_port()
        (d / "milters.toml").write_text(
            f'[global]\nauthserv_id = "mx.test.example"\n'
            f'[spf]\nsocket = "inet:{port}@127.0.0.1"\n{extra}\n'
            + dns.toml(timeout=0.5)
        )
        argv = [sys.executable, "-m", "milters", "run", "spf", "--config",
                str(d / "milters.toml")]
        factory.start(argv, port, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
        return f"inet:{port}@127.0.0.1"

    yield start
    factory.close()


@pytest.fixture(scope="module")
def spf(start: Start) -> str:
    return start()


def send(spec: str, mail_from: str, client_ip: str = CLIENT, helo: str = HELO,
         rcpt: tuple[str, ...] = ("u@test.example",), auth: str = "") -> ProbeResult:
    env = Envelope(client_ip=client_ip, client_name="unknown", helo=helo,
                   mail_from=mail_from, rcpt_to=list(rcpt), auth_user=auth)
    return probe(spec, MESSAGE, env, timeout=15)


def ar_values(r: ProbeResult) -> list[str]:
    return [" ".join(e.value.split()) for e in r.header_edits
            if e.name == "Authentication-Results" and e.kind is not EditKind.DELETE]


def test_negotiates_only_what_spf_needs(spf: str) -> None:
    r = send(spf, "a@sender.example")
    names = set(r.negotiated.protocol_names)
    assert "NOBODY" in names  # never receives the body
    assert "NOHELO" not in names and "NOMAIL" not in names and "NORCPT" not in names


def test_pass_is_delivered_with_ar(spf: str) -> None:
    r = send(spf, "a@sender.example")
    assert r.delivered and not r.rejected_recipients
    assert ar_values(r) == [
        "mx.test.example; spf=pass smtp.mailfrom=a@sender.example smtp.helo=mail.sender.example"
    ]
    # the incoming field claiming our authserv-id for spf is removed
    assert any(e.kind is EditKind.DELETE and e.name == "Authentication-Results"
               for e in r.header_edits)


def test_fail_is_refused_at_rcpt(spf: str) -> None:
    r = send(spf, "a@exp.example", client_ip=OTHER, helo="other.example",
             rcpt=("u@test.example", "v@test.example"))
    assert not r.delivered
    assert set(r.rejected_recipients) == {"u@test.example", "v@test.example"}
    reply = r.rejected_recipients["u@test.example"]
    assert reply.startswith("550 5.7.23 ")
    assert f"{OTHER} may not send for exp.example" in reply


def test_softfail_policies(spf: str, start: Start) -> None:
    r = send(spf, "a@soft.example", client_ip=OTHER, helo="other.example")
    assert r.delivered
    assert ar_values(r)[0].startswith("mx.test.example; spf=softfail ")
    strict = start('mail_from_reject = "softfail"')
    r = send(strict, "a@soft.example", client_ip=OTHER, helo="other.example")
    assert r.rejected_recipients["u@test.example"].startswith("550 5.7.23 ")


def test_temperror_with_slow_dns(spf: str, start: Start) -> None:
    r = send(spf, "a@slow.example", helo="other.example")
    assert r.delivered
    assert ar_values(r)[0].startswith("mx.test.example; spf=temperror ")
    defer = start('on_temperror = "tempfail"')
    r = send(defer, "a@slow.example", helo="other.example")
    assert r.rejected_recipients["u@test.example"].startswith("451 4.4.3 ")


@pytest.mark.parametrize(("client_ip", "auth"), [("127.0.0.1", ""), (OTHER, "alice")])
def test_internal_and_authenticated_clients_are_skipped(spf: str, client_ip: str,
                                                        auth: str) -> None:
    r = send(spf, "a@sender.example", client_ip=client_ip, auth=auth)
    assert r.delivered and not r.rejected_recipients
    assert ar_values(r) == []
    if auth:
        # SASL comes with MAIL FROM: the dialogue goes on, and the forged field
        # from outside our trust boundary is removed (RFC 8601 §5).
        assert r.decided_at == "eom"
        assert [e.kind for e in r.header_edits] == [EditKind.DELETE]
    else:
        # Issue 13: an internal client is accepted at CONNECT, and Postfix calls
        # the filter no more for the session; its fields are inside our boundary.
        assert (r.decided_at, r.verdict, r.header_edits) == ("connect", "accept", [])


def test_skip_addresses_and_received_spf(start: Start) -> None:
    spec = start(f'skip_addresses = ["{OTHER}/32"]\nreceived_spf = true')
    r = send(spec, "a@sender.example", client_ip=OTHER)
    assert r.delivered and ar_values(r) == []
    r = send(spec, "a@sender.example")
    (received,) = [e for e in r.header_edits if e.name == "Received-SPF"]
    assert " ".join(received.value.split()).startswith(
        "pass (mx.test.example: domain of a@sender.example designates 192.0.2.5")


def test_report_mode_delivers_a_fail(start: Start) -> None:
    spec = start('mode = "report"')
    r = send(spec, "a@sender.example", client_ip=OTHER, helo="other.example")
    assert r.delivered and not r.rejected_recipients
    assert ar_values(r)[0].startswith("mx.test.example; spf=fail ")
    assert any(e.name == "X-Milters-Report" and "would reject" in e.value
               for e in r.header_edits)
