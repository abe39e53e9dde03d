"""ARC sealing (RFC 8617 §5.1) by the dkim filter and its signing step: which mail
is sealed, what the ARC-Authentication-Results carries, and that dkimpy's
arc_verify validates our seals (and fails them once the message is tampered with)."""

from __future__ import annotations

import re
from typing import Any

import dkim
import pytest

from milters.core import arc
from milters.core.config import DnsSettings, GlobalSettings
from milters.core.dkim_verify import dkim_headers
from milters.core.errors import ConfigError
from milters.core.filter import Env
from milters.core.model import parse_message
from milters.dkim import DkimSettings, DkimSignFilter
from milters.dkim.filter import DkimFilter
from tests.support.arc import Sealer, chain
from tests.support.dkim import outgoing, transaction
from tests.support.dns import LoopbackDNS
from tests.unit.dkim.conftest import DOMAIN, FilterFactory, TestKeys

FWD = Sealer("fwd.example")
MESSAGE = (b"From: Alice <alice@bank.example>\r\nTo: team@example.com\r\n"
           b"Subject: figures\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
           b"Message-ID: <f1@bank.example>\r\n\r\nThe figures  are in. \r\n")


def dnsfunc(dns_records: dict[str, str]) -> Any:
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        value = dns_records.get(name.decode().rstrip("."))
        return value.encode() if value is not None else None
    return lookup


@pytest.fixture
def records(dns: LoopbackDNS, keys: TestKeys) -> dict[str, str]:
    FWD.publish(dns)
    return {**keys.records, f"{FWD.selector}._domainkey.{FWD.domain}": FWD.record()}


def sealed_by(flt: DkimFilter, raw: bytes, **tx: Any) -> tuple[bytes, list[str]]:
    v = flt.check(transaction(raw, **tx))
    names = [e.name for e in v.header_edits]
    return outgoing(raw, v), names


def test_forwarded_mail_is_sealed_and_dkimpy_validates_it(
        dkim_filter: FilterFactory, records: dict[str, str]) -> None:
    flt = dkim_filter(arc_seal="all")
    out, names = sealed_by(flt, chain(MESSAGE, [FWD], author="bank.example"))
    assert names[-3:] == ["ARC-Authentication-Results", "ARC-Message-Signature", "ARC-Seal"]
    cv, results, reason = dkim.arc_verify(out, dnsfunc=dnsfunc(records))
    assert (cv, reason) == (b"pass", "success")
    assert [r["as-domain"] for r in results] == [DOMAIN.encode(), b"fwd.example"]
    [aar] = [r["aar-value"] for r in results if r["instance"] == 2]
    assert aar.startswith(b"i=2; mx.test.example;") and b"arc=pass" in aar, aar
    assert b"dkim=none" in aar
    # Ours as well, and tampering breaks it for both.
    headers, body = parse_message(out)
    ours = arc.verify_chain(dkim_headers(headers), body, flt.env.resolver.txt)
    assert (ours.result, ours.sealers) == ("pass", ("fwd.example", DOMAIN))
    tampered = out.replace(b"are in.", b"are out.")
    assert dkim.arc_verify(tampered, dnsfunc=dnsfunc(records))[0] == b"fail"
    headers, body = parse_message(tampered)
    assert arc.verify_chain(dkim_headers(headers), body, flt.env.resolver.txt).result == "fail"


def test_first_seal_has_cv_none(dkim_filter: FilterFactory, records: dict[str, str]) -> None:
    out, _ = sealed_by(dkim_filter(arc_seal="all"), MESSAGE)
    assert re.search(rb"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=example.com; s=rsa;", out)
    assert dkim.arc_verify(out, dnsfunc=dnsfunc(records))[0] == b"pass"


def test_our_mail_is_signed_not_sealed(dkim_filter: FilterFactory) -> None:
    _, names = sealed_by(dkim_filter(arc_seal="all"),
                         MESSAGE.replace(b"bank.example>", b"example.com>"), auth="alice")
    assert "DKIM-Signature" in names and "ARC-Seal" not in names


def test_listed_daemons_and_recipient_domains(dkim_filter: FilterFactory,
                                              records: dict[str, str]) -> None:
    flt = dkim_filter(arc_seal="listed", arc_seal_daemons=("FORWARD",),
                      arc_seal_recipient_domains=(".gmail.example",))
    assert "ARC-Seal" in sealed_by(flt, MESSAGE, daemon="FORWARD")[1]
    assert "ARC-Seal" not in sealed_by(flt, MESSAGE, daemon="mx")[1]
    tx = transaction(MESSAGE, daemon="mx")
    tx.rcpt_to = ["bob@mail.gmail.example"]
    assert "ARC-Seal" in [e.name for e in flt.check(tx).header_edits]
    tx.rcpt_to = ["bob@gmail.example"]  # .domain is its sub-domains only
    assert "ARC-Seal" not in [e.name for e in flt.check(tx).header_edits]


def test_signing_step_seals_every_result_of_the_chain(keys: TestKeys, dns: LoopbackDNS,
                                                       records: dict[str, str]) -> None:
    """The signing step, last of the chain, seals the results the filters before it
    wrote (dkim's arc= and dkim=, dmarc's), not a forged field of another id."""
    settings = DkimSettings(domain=(DOMAIN,), selector="rsa", key_file=str(keys.rsa),
                            arc_seal="all")
    env = Env(GlobalSettings(authserv_id="mx.test.example", dns=DnsSettings(
        nameservers=("127.0.0.1",), port=dns.port, timeout=1.0)),
        upstream=("dkim", "spf", "dmarc"))
    step = DkimSignFilter(settings, env)
    raw = (b"Authentication-Results: mx.test.example; dmarc=fail (p=reject dis=none) "
           b"header.from=bank.example\r\n"
           b"Authentication-Results: mx.test.example; dkim=none; arc=none\r\n"
           b"Authentication-Results: elsewhere.example; dmarc=pass\r\n" + MESSAGE)
    v = step.check(transaction(raw))
    [aar] = [e.value for e in v.header_edits if e.name == "ARC-Authentication-Results"]
    text = " ".join(aar.split())
    assert text.startswith("i=1; mx.test.example;")
    assert "dmarc=fail header.from=bank.example" in text and "arc=none" in text
    assert "elsewhere" not in text
    assert dkim.arc_verify(outgoing(raw, v), dnsfunc=dnsfunc(records))[0] == b"pass"
    # Nothing of ours to seal: a note, no set.
    v = step.check(transaction(MESSAGE))
    assert not v.header_edits and any("not sealed" in n for n in v.log_notes)


@pytest.mark.parametrize(("settings", "problem"), [
    ({"arc_seal": "all", "arc_verify": False}, "needs arc_verify"),
    ({"arc_seal": "listed"}, "needs arc_seal_daemons"),
    ({"arc_seal": "all", "arc_seal_domain": "other.example"}, "no RSA key for other.example"),
])
def test_sealing_that_cannot_work_is_a_config_error(dkim_filter: FilterFactory,
                                                     settings: dict[str, Any],
                                                     problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        dkim_filter(**settings)


def test_ed25519_alone_cannot_seal(dkim_filter: FilterFactory, keys: TestKeys) -> None:
    with pytest.raises(ConfigError, match="seals are rsa-sha256"):
        dkim_filter(arc_seal="all", selector="ed", key_file=str(keys.ed),
                    ed25519_selector="", ed25519_key_file="")


def test_sealing_before_other_filters_is_warned(keys: TestKeys, dns: LoopbackDNS) -> None:
    settings = DkimSettings(domain=(DOMAIN,), selector="rsa", key_file=str(keys.rsa),
                            arc_seal="all", sign_socket="", sign=False)
    env = Env(GlobalSettings(authserv_id="mx.test.example"), downstream=("dmarc",))
    [warning] = DkimFilter(settings, env).load_warnings()
    assert "ARC-sealed at the dkim socket, without the results of dmarc" in warning
    assert DkimFilter(settings, Env(GlobalSettings())).load_warnings() == []


def test_hostile_mail_is_not_sealed_and_never_raises(dkim_filter: FilterFactory) -> None:
    flt = dkim_filter(arc_seal="all")
    many_to = b"".join(b"To: x%d@example.net\r\n" % i for i in range(600)) + MESSAGE
    v = flt.check(transaction(many_to))
    assert "ARC-Seal" not in [e.name for e in v.header_edits]
    assert any("more than 512 fields" in n for n in v.log_notes)
    # A chain at the instance limit: no 51st set (dkimpy refuses, we note it).
    at_limit = (
        b"ARC-Seal: i=50; cv=pass; a=rsa-sha256; d=x.example; s=a; b=AAAA\r\n"
        b"ARC-Message-Signature: i=50; a=rsa-sha256; d=x.example; s=a; h=from; bh=AAAA; "
        b"b=AAAA\r\nARC-Authentication-Results: i=50; x.example; dmarc=pass\r\n") + MESSAGE
    v = flt.check(transaction(at_limit))
    assert "ARC-Seal" not in [e.name for e in v.header_edits]
    assert any(n.startswith("not sealed") for n in v.log_notes), v.log_notes
