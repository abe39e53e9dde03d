"""ARC (RFC 8617) over the milter protocol: `milters run dkim` validating chains
sealed by dkimpy's arc_sign (1, 2, 3 hops, tampered, broken), with the loopback DNS
serving the sealers' keys."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from milters.client.edits import edited_message
from milters.client.probe import ProbeResult, probe
from milters.core.envelope import Envelope
from tests.support.arc import Sealer, chain
from tests.support.dns import LoopbackDNS, dns_server
from tests.support.processes import ProcessFactory, free_port, others_disabled

ROOT = Path(__file__).resolve().parents[2]
AUTHSERV_ID = "mx.test.example"
FWD = Sealer("fwd.example")
LISTS = Sealer("lists.example", n=1)
THIRD = Sealer("third.example", n=2)
MESSAGE = (b"From: Alice <alice@bank.example>\r\nTo: list@lists.example\r\n"
           b"Subject: statement\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
           b"Message-ID: <s1@bank.example>\r\n\r\nYour statement is ready.\r\n")


@pytest.fixture(scope="module")
def dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        for s in (FWD, LISTS, THIRD):
            s.publish(server)
        yield server


@pytest.fixture(scope="module")
def dkim_spec(dns: LoopbackDNS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("arcverify")
    port = free_port()
    config = d / "milters.toml"
    config.write_text(
        f'[global]\nauthserv_id = "{AUTHSERV_ID}"\ninternal_networks = ["127.0.0.0/8"]\n'
        f"{dns.toml(timeout=2.0)}\n"
        f'[dkim]\nsocket = "inet:{port}@127.0.0.1"\nworkers = 1\n' + others_disabled("dkim"))
    with ProcessFactory() as factory:
        argv = [sys.executable, "-m", "milters", "run", "dkim", "--config", str(config)]
        factory.start(argv, port, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
        yield f"inet:{port}@127.0.0.1"


def inbound(spec: str, raw: bytes) -> ProbeResult:
    env = Envelope(client_ip="198.51.100.7", client_name="mx.lists.example",
                          mail_from="list-bounces@lists.example", rcpt_to=["bob@test.example"])
    return probe(spec, raw, env, timeout=30)


def arc_result(r: ProbeResult) -> str:
    text = " ".join(" ".join(e.value.split()) for e in r.header_edits
                    if e.name == "Authentication-Results")
    m = re.search(r"arc=\S+[^;]*", text)
    assert m, text
    return m.group(0)


@pytest.mark.parametrize("hops", [[FWD], [FWD, LISTS], [FWD, LISTS, THIRD]])
def test_chains_sealed_by_dkimpy_pass(dkim_spec: str, hops: list[Sealer]) -> None:
    r = inbound(dkim_spec, chain(MESSAGE, hops, author="bank.example"))
    assert r.verdict in ("accept", "continue")
    assert arc_result(r) == "arc=pass header.oldest-pass=0 smtp.remote-ip=198.51.100.7"


def test_tampered_and_broken_chains_fail(dkim_spec: str) -> None:
    sealed = chain(MESSAGE, [FWD, LISTS], author="bank.example")
    assert arc_result(inbound(dkim_spec, sealed.replace(b"ready", b"late"))).startswith(
        "arc=fail")
    broken = re.sub(rb"ARC-Seal: i=1;.*?(?=\r\n\S)", b"", sealed, count=1, flags=re.S)
    assert broken != sealed
    assert arc_result(inbound(dkim_spec, broken)).startswith("arc=fail")
    assert arc_result(inbound(dkim_spec, MESSAGE)) == "arc=none"



@pytest.mark.parametrize("fields", [
    b"ARC-Seal: i=99; cv=none; a=rsa-sha256; d=x.example; s=a; b=AAAA\r\n",
    b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=x.example; s=a; b=AAAA\r\n" * 2,
    b"ARC-Message-Signature: i=1; h=" + b":".join([b"x"] * 5000) + b"\r\n",
    b"ARC-Authentication-Results: i=1; \xff\xfe; arc=pass\r\n",
    b"ARC-Seal: i=1; b=" + b"\r\n " * 3000 + b"!\r\n",
])
def test_hostile_arc_fields_fail_and_the_filter_lives(dkim_spec: str, fields: bytes) -> None:
    r = inbound(dkim_spec, fields + MESSAGE)
    assert r.verdict in ("accept", "continue"), r.smtp_reply
    assert arc_result(r).startswith("arc=fail")


# -- the chain: verify, dmarc, seal last -----------------------------------------------

OURS = "ours.example"


@pytest.fixture(scope="module")
def chain_spec(dns: LoopbackDNS, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[str, Path]]:
    """Chain mode: dkim (verifies ARC), spf, dmarc (p=reject refused; fwd.example and
    lists.example trusted), the signing step sealing all forwarded mail as ours.example."""
    from milters.dkim.keytools import genkey

    d = tmp_path_factory.mktemp("arcchain")
    made = genkey(OURS, "seal", "rsa", 2048, str(d))
    dns.txt(f"seal._domainkey.{OURS}", made.key.dns_record())
    dns.txt("_dmarc.bank.example", "v=DMARC1; p=reject; rua=mailto:rua@bank.example")
    port = free_port()
    config = d / "milters.toml"
    config.write_text(
        f'[global]\nauthserv_id = "{AUTHSERV_ID}"\ninternal_networks = ["127.0.0.0/8"]\n'
        f"{dns.toml(timeout=2.0)}\n"
        f'[dkim]\ndomain = ["{OURS}"]\nselector = "seal"\nkey_file = "{d}/seal.private"\n'
        'arc_seal = "all"\n'
        f'[dmarc]\nreject_failures = true\nhistory = "{d}/history.sqlite"\n'
        'trusted_arc_sealers = ["fwd.example", "lists.example"]\n'
        "[clamav]\nenabled = false\n[checks]\nenabled = false\n"
        f'[chain]\nenabled = true\nsocket = "inet:{port}@127.0.0.1"\nworkers = 1\n')
    with ProcessFactory() as factory:
        argv = [sys.executable, "-m", "milters", "run", "chain", "--config", str(config)]
        factory.start(argv, port, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
        yield f"inet:{port}@127.0.0.1", d


def delivered(raw: bytes, r: ProbeResult) -> bytes:
    """The message as Postfix would store (and forward) it after the chain's edits."""
    return edited_message(raw, r.header_edits, leading_space=r.negotiated.leading_space)


def dnsfunc(dns: LoopbackDNS) -> Callable[..., bytes | None]:
    """dkimpy's dnsfunc over the loopback DNS (what a receiver downstream would ask)."""
    from milters.core.config import DnsSettings
    from milters.core.resolver import Resolver

    resolver = Resolver(DnsSettings(nameservers=("127.0.0.1",), port=dns.port, timeout=2.0))
    return resolver.dkim_dnsfunc


def test_forwarded_mail_is_sealed_and_validates_in_dkimpy(
        chain_spec: tuple[str, Path], dns: LoopbackDNS) -> None:
    import dkim

    spec, _ = chain_spec
    raw = chain(MESSAGE.replace(b"bank.example", b"plain.example"), [FWD],
                author="plain.example")
    r = inbound(spec, raw)
    assert r.verdict in ("accept", "continue"), r.smtp_reply
    out = delivered(raw, r)
    cv, results, reason = dkim.arc_verify(out, dnsfunc=dnsfunc(dns))
    assert (cv, reason) == (b"pass", "success")
    [ours] = [x for x in results if x["instance"] == 2]
    assert ours["as-domain"] == OURS.encode()
    aar = b" ".join(ours["aar-value"].split())
    assert aar.startswith(f"i=2; {AUTHSERV_ID};".encode())
    for result in (b"arc=pass", b"dkim=none", b"dmarc=none", b"spf="):
        assert result in aar, aar
    tampered = out.replace(b"statement is ready", b"statement is late")
    assert dkim.arc_verify(tampered, dnsfunc=dnsfunc(dns))[0] == b"fail"
    # Back through our own chain (the next hop runs our verifier): pass, 2 sealers.
    assert arc_result(inbound(spec, out)).startswith("arc=pass")


def list_copy(sealer: Sealer) -> bytes:
    """A bank.example (p=reject) message as a list sends it on: DMARC passed on the way
    in, then a subject tag and a footer (the author's alignment is gone), then sealed."""
    from tests.support.arc import seal

    edited = (MESSAGE.replace(b"Subject: statement", b"Subject: [team] statement")
              + b"--\r\nteam mailing list\r\n")
    return seal(edited, sealer, "dmarc=pass header.from=bank.example")


def test_trusted_forwarder_overrides_p_reject(chain_spec: tuple[str, Path]) -> None:
    from milters.dmarc.history import SqliteHistory
    from tests.support.processes import wait_until

    spec, d = chain_spec
    r = inbound(spec, list_copy(LISTS))
    assert r.verdict in ("accept", "continue"), r.smtp_reply
    text = " ".join(" ".join(e.value.split()) for e in r.header_edits
                    if e.name == "Authentication-Results")
    assert "dmarc=fail (p=reject dis=none override=trusted_forwarder)" in text, text
    history = SqliteHistory(str(d / "history.sqlite"))

    def overridden() -> list[object]:
        return [(e.override, e.override_comment) for e in history.entries(0, 2**40)
                if e.override]

    assert wait_until(lambda: bool(overridden()), 5)
    assert overridden() == [("trusted_forwarder", "arc=pass as[1].d=lists.example")]


def test_untrusted_sealer_is_rejected(chain_spec: tuple[str, Path]) -> None:
    spec, _ = chain_spec
    r = inbound(spec, list_copy(THIRD))  # third.example seals, but is not trusted
    assert r.verdict == "reject" and r.smtp_reply.startswith("550 5.7.1"), r.smtp_reply
