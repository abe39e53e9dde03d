"""Hostile From fields and envelopes against the dmarc and spf filters as an
administrator runs them (`milters run NAME`, loopback port, loopback DNS, the
milter protocol), issues 9 and 12.

bank.example publishes p=reject and sends from 192.0.2.0/24; the attacker sends
from 198.51.100.7 with its own domain, which passes SPF there. Every case gets a
defined answer well within 5 s, a spoof of bank.example is never dmarc=pass, the
worker stays up and serves a normal message afterwards, and nothing is logged as a
traceback. The null-sender case gives the same answer with dmarc alone (its own
SPF check) and with dmarc after spf (spf's Authentication-Results).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from milters.client.probe import ProbeResult
from milters.client.probe import probe as probe_milter
from milters.core.envelope import Envelope
from milters.core.verdict import EditKind
from tests.support.dns import LoopbackDNS, dns_server
from tests.support.processes import ManagedProcess, ProcessFactory, free_port

ROOT = Path(__file__).resolve().parents[2]
AUTHSERV = "mx.test.example"
BANK_IP = "192.0.2.10"
ATTACKER_IP = "198.51.100.7"
BOUND = 5.0  # seconds: the bound, asserted with its whole margin

Start = Callable[..., tuple[ManagedProcess, str]]


@pytest.fixture(scope="module")
def dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        server.txt("_dmarc.bank.example", "v=DMARC1; p=reject")
        server.txt("bank.example", "v=spf1 ip4:192.0.2.0/24 -all")
        server.a("bank.example", BANK_IP)
        server.txt("_dmarc.attacker.example", "v=DMARC1; p=none")
        server.txt("attacker.example", f"v=spf1 ip4:{ATTACKER_IP} -all")
        yield server


@pytest.fixture(scope="module")
def start(dns: LoopbackDNS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Start]:
    factory = ProcessFactory()

    def start(name: str, extra: str = "", upstream: bool = False) -> tuple[ManagedProcess, str]:
        d = tmp_path_factory.mktemp(name)
        port = free_port()
        # dmarc believes our own spf results only when spf is enabled before it.
        others = "".join(f"[{n}]\nenabled = false\n" for n in ("dkim", "spf")
                         if n != name and not (upstream and n == "spf"))
        (d / "milters.toml").write_text(
            f'[global]\nauthserv_id = "{AUTHSERV}"\ninternal_networks = []\n'
            f"{dns.toml()}{others}"
            f'[{name}]\nsocket = "inet:{port}@127.0.0.1"\n{extra}\n'
        )
        argv = [sys.executable, "-m", "milters", "run", name, "--config",
                str(d / "milters.toml")]
        proc = factory.start(argv, port, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
        return proc, f"inet:{port}@127.0.0.1"

    yield start
    factory.close()


DMARC = 'reject_failures = true\nhistory = ""'
SPF_REPORT_ONLY = 'helo_reject = "never"\nmail_from_reject = "never"'
Running = tuple[ManagedProcess, str]


@pytest.fixture(scope="module")
def dmarc(start: Start) -> Running:
    """dmarc alone (first in the chain): SPF and DKIM evaluated by itself."""
    return start("dmarc", DMARC)


@pytest.fixture(scope="module")
def dmarc_bad_from_reject(start: Start) -> Running:
    return start("dmarc", DMARC + '\non_bad_from = "reject"')


@pytest.fixture(scope="module")
def dmarc_after_spf(start: Start) -> Running:
    """dmarc listed after spf: spf's Authentication-Results are believed."""
    return start("dmarc", DMARC, upstream=True)


@pytest.fixture(scope="module")
def spf(start: Start) -> Running:
    """spf that reports without refusing, so the message reaches the next filter."""
    return start("spf", SPF_REPORT_ONLY)


def message(from_field: bytes, extra: bytes = b"") -> bytes:
    return (extra + from_field + b"\r\nTo: u@test.example\r\nSubject: hi\r\n"
            b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\nhello\r\n")


def probe(spec: str, raw: bytes, client_ip: str = ATTACKER_IP,
          mail_from: str = "x@attacker.example", helo: str = "mail.attacker.example",
          ) -> ProbeResult:
    env = Envelope(client_ip=client_ip, client_name="unknown", helo=helo,
                   mail_from=mail_from, rcpt_to=["u@test.example"])
    started = time.monotonic()
    r = probe_milter(spec, raw, env, timeout=BOUND * 3)
    assert time.monotonic() - started < BOUND, f"{time.monotonic() - started:.1f} s"
    return r


def ar_values(r: ProbeResult) -> list[str]:
    return [" ".join(e.value.split()) for e in r.header_edits
            if e.kind is EditKind.INSERT and e.name == "Authentication-Results"]


def dmarc_result(r: ProbeResult) -> str:
    found = [v for v in ar_values(r) if "dmarc=" in v]
    return found[0].split("dmarc=", 1)[1].split()[0] if found else ""


def serves_normal_mail(proc: ManagedProcess, spec: str) -> None:
    """The worker is alive, answers a genuine bank.example message, logged no traceback."""
    r = probe(spec, message(b"From: CEO <ceo@bank.example>"), client_ip=BANK_IP,
              mail_from="ceo@bank.example", helo="mail.bank.example")
    assert r.delivered and dmarc_result(r) == "pass", ar_values(r)
    assert proc.proc.poll() is None
    assert "Traceback" not in proc.output(), proc.output()[-3000:]


HOSTILE_FROM = {
    "nested-comments-1000": b"From: " + b"(" * 1000 + b"x" + b")" * 1000
                            + b" <ceo@bank.example>",
    "multi-from-spoof": b"From: support@bank.example, x@attacker.example",
    "multi-from-spoof-reversed": b"From: X <x@attacker.example>, <support@bank.example>",
    "two-from-fields": b"From: x@attacker.example\r\nFrom: support@bank.example",
    "two-from-fields-reversed": b"From: support@bank.example\r\nFrom: x@attacker.example",
    "malformed-unterminated-angle": b"From: CEO <ceo@bank.example",
    "malformed-unterminated-quote": b'From: "CEO <ceo@bank.example>',
    "malformed-unbalanced-comment": b"From: (CEO ceo@bank.example",
    "huge-100k-display-name": b'From: "' + b"x" * 100_000 + b'" <ceo@bank.example>',
    "huge-100k-comments": b"From: " + b"(a)" * 34_000 + b" <ceo@bank.example>",
    "8bit-junk": b"From: \xff\xfe\xc3 CEO <ceo@bank.example> \x80\x81",
    "8bit-junk-in-domain": b"From: ceo@bank.example, x@b\xffnk.example",
    "route-and-group": b"From: Staff: <@relay.example:ceo@bank.example>;",
}


@pytest.mark.parametrize("name", list(HOSTILE_FROM))
def test_hostile_from_never_passes_a_spoof(dmarc: Running, name: str) -> None:
    """The attacker passes SPF for attacker.example, aligned with the attacker's own
    address; bank.example's p=reject must still refuse (RFC 9989 §11.5)."""
    proc, spec = dmarc
    r = probe(spec, message(HOSTILE_FROM[name]))
    assert r.verdict == "reject", (r.verdict, ar_values(r))
    assert r.smtp_reply.startswith("550 5.7.1") and "bank.example" in r.smtp_reply
    serves_normal_mail(proc, spec)


@pytest.mark.parametrize("from_field", [
    b"From: " + b"(" * 1000 + b")" * 1000,  # nothing but comments
    b"From: " + b"x" * 100_000,  # 100 KB, no address at all
    b"From: \xff\xfe\xfd",
    b"From: undisclosed-recipients:;",
])
def test_from_without_a_domain_is_permerror(dmarc: Running, dmarc_bad_from_reject: Running,
                                            from_field: bytes) -> None:
    proc, spec = dmarc
    r = probe(spec, message(from_field))
    assert r.delivered and dmarc_result(r) == "permerror", ar_values(r)
    proc2, spec2 = dmarc_bad_from_reject
    r = probe(spec2, message(from_field))
    assert r.verdict == "reject" and r.smtp_reply.startswith("550 5.7.1")
    serves_normal_mail(proc, spec)
    serves_normal_mail(proc2, spec2)


def test_same_domain_addresses_pass_when_aligned(dmarc: Running) -> None:
    _, spec = dmarc
    r = probe(spec, message(b"From: a@bank.example, B <b@bank.example>"), client_ip=BANK_IP,
              mail_from="bounce@bank.example")
    assert r.delivered and dmarc_result(r) == "pass", ar_values(r)


def spf_field(spec: str, client_ip: str, helo: str, mail_from: str) -> bytes:
    """What the spf filter adds, as the next filter in the chain sees it."""
    r = probe(spec, message(b"From: x@y.example"), client_ip=client_ip, mail_from=mail_from,
              helo=helo)
    (value,) = ar_values(r)
    return f"Authentication-Results: {value}\r\n".encode()


@pytest.mark.parametrize(("client_ip", "expected"), [
    (ATTACKER_IP, ("reject", "550")),  # HELO bank.example from an address it does not list
    (BANK_IP, ("continue", "pass")),  # a real bounce from bank.example's server
])
def test_null_sender_same_answer_alone_and_in_the_chain(
        dmarc: Running, dmarc_after_spf: Running, spf: Running, client_ip: str,
        expected: tuple[str, str]) -> None:
    """Issue 9: RFC 9989 §3.2.4 uses only the MAIL FROM identity, which for the null
    reverse-path is postmaster@HELO (RFC 7208 §2.4): dmarc alone (its own SPF) and
    dmarc after spf (spf's smtp.mailfrom=postmaster@HELO) give one answer."""
    field = spf_field(spf[1], client_ip, "bank.example", "")
    assert "smtp.mailfrom=postmaster@bank.example" in field.decode()
    assert "(null sender: HELO identity)" in field.decode()
    answers = []
    for spec, extra in ((dmarc[1], b""), (dmarc_after_spf[1], field)):
        r = probe(spec, message(b"From: MAILER-DAEMON <postmaster@bank.example>", extra),
                  client_ip=client_ip, mail_from="", helo="bank.example")
        verdict = "continue" if r.delivered else r.verdict
        answers.append((verdict, dmarc_result(r) or r.smtp_reply[:3]))
    assert answers == [expected, expected]


# 8-bit bytes in MAIL FROM or HELO (reachable from SMTP with smtputf8_enable = no):
# the adapter decodes them with surrogateescape, and spf and dmarc answer.
@pytest.mark.parametrize(("mail_from", "helo", "spf_result"), [
    ("x@attacker\udcff.example", "mail.attacker.example", "none"),  # 8-bit MAIL FROM domain
    ("", "bank\udcff.example", "none"),  # null sender, 8-bit HELO
    ("\udcff\udcfe@bank.example", "\udcff", "fail"),  # 8-bit local part: bank's SPF applies
])
def test_8bit_envelope_is_a_defined_answer(dmarc: Running, spf: Running, mail_from: str,
                                           helo: str, spf_result: str) -> None:
    """Invalid UTF-8 in MAIL FROM or HELO (issue 9): spf answers (none for a malformed
    domain, RFC 7208 §4.3) in a field it can carry; dmarc still refuses the spoof;
    both keep serving."""
    spf_proc, spf_spec = spf
    r = probe(spf_spec, message(b"From: x@y.example"), mail_from=mail_from, helo=helo)
    assert r.delivered, (r.verdict, r.smtp_reply, spf_proc.output()[-3000:])
    (value,) = ar_values(r)
    assert value.split("; ", 1)[1].startswith(f"spf={spf_result}"), value
    value.encode("utf-8")  # no surrogate escapes: a header field can carry it
    proc, spec = dmarc
    r = probe(spec, message(b"From: CEO <ceo@bank.example>"), mail_from=mail_from, helo=helo)
    assert r.verdict == "reject", ar_values(r)
    serves_normal_mail(proc, spec)
    assert spf_proc.proc.poll() is None and "Traceback" not in spf_proc.output()
