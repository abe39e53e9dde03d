"""Trusted ARC sealers ([dmarc] trusted_arc_sealers): a p=reject failure that passed
DMARC at a trusted forwarder, then was altered by it, is let through as
trusted_forwarder (history, aggregate report, AR comment); an untrusted sealer, a
failing chain, a dmarc=fail or another From domain in the oldest results are not."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from milters.core import arc
from milters.core.config import DnsSettings, GlobalSettings
from milters.core.domains import DomainList
from milters.core.filter import Env
from milters.core.verdict import Action
from milters.dmarc import DmarcFilter, DmarcSettings
from milters.dmarc.forwarded import ArcEvidence, trusted_forwarding
from milters.dmarc.history import SqliteHistory
from milters.dmarc.report import build_reports
from tests.support.arc import Sealer, chain, seal
from tests.support.dkim import transaction
from tests.support.dns import LoopbackDNS

AUTHSERV = "mx.test.example"
LIST = Sealer("lists.example")
EVIL = Sealer("evil.example", n=1)
MSG = (b"From: Alice <alice@bank.example>\r\nTo: team@lists.example\r\nSubject: minutes\r\n"
       b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <n1@bank.example>\r\n"
       b"\r\nThe minutes are attached.\r\n")

Make = Callable[..., DmarcFilter]


@pytest.fixture
def published(dns: LoopbackDNS) -> LoopbackDNS:
    dns.txt("_dmarc.bank.example", "v=DMARC1; p=reject; rua=mailto:rua@bank.example")
    LIST.publish(dns)
    EVIL.publish(dns)
    return dns


@pytest.fixture
def make(published: LoopbackDNS, tmp_path: Path) -> Make:
    def make(upstream: tuple[str, ...] = (), **settings: Any) -> DmarcFilter:
        settings.setdefault("history", str(tmp_path / "history.sqlite"))
        settings.setdefault("reject_failures", True)
        settings.setdefault("trusted_arc_sealers", ("lists.example",))
        env = Env(GlobalSettings(authserv_id=AUTHSERV, dns=DnsSettings(
            nameservers=("127.0.0.1",), port=published.port, timeout=0.5)), upstream=upstream)
        return DmarcFilter(DmarcSettings(**settings), env)
    return make


def through_list(sealer: Sealer, dmarc: str = "pass", author: str = "bank.example") -> bytes:
    """As a list sends it: DMARC seen as `dmarc` on the way in, subject tagged and a
    footer added (which breaks the author's DKIM and SPF alignment), then sealed."""
    edited = (MSG.replace(b"Subject: minutes", b"Subject: [team] minutes")
              + b"--\r\nteam mailing list\r\n")
    return seal(edited, sealer, f"dmarc={dmarc} header.from={author}")


def altered_after_sealing(sealer: Sealer) -> bytes:
    """Sealed, then changed: the chain fails (newest AMS)."""
    return seal(MSG, sealer, "dmarc=pass header.from=bank.example").replace(
        b"attached.", b"attached!")


def dmarc_of(verdict: Any) -> tuple[str, str]:
    (r,) = [r for r in verdict.results if r.method == "dmarc"]
    return r.result, r.comment


def history_rows(flt: DmarcFilter) -> list[Any]:
    assert flt.history is not None
    flt.history.close()
    assert isinstance(flt.history, SqliteHistory)
    return SqliteHistory(flt.history.path).entries(0, 2**40)


def test_trusted_list_sets_the_reject_aside(make: Make) -> None:
    """The chain validated here (self_validate: no dkim filter upstream)."""
    flt = make()
    assert flt.check(transaction(altered_after_sealing(LIST))).action is Action.REJECT
    v = flt.check(transaction(through_list(LIST)))
    assert v.action is Action.ACCEPT and not v.quarantine
    assert dmarc_of(v) == ("fail", "p=reject dis=none override=trusted_forwarder")
    assert any("trusted_forwarder (arc=pass as[1].d=lists.example)" in n for n in v.log_notes)
    [row] = [r for r in history_rows(flt) if r.disposition == "none"]
    assert (row.override, row.override_comment) == ("trusted_forwarder",
                                                    "arc=pass as[1].d=lists.example")
    [report] = build_reports(history_rows(flt), 0, 2**40, AUTHSERV, "dmarc@test.example")
    xml = report.xml.decode()
    assert "<type>trusted_forwarder</type>" in xml
    assert "<comment>arc=pass as[1].d=lists.example</comment>" in xml


def test_untrusted_sealer_is_rejected(make: Make) -> None:
    sealed = seal(MSG, EVIL, "dmarc=pass header.from=bank.example")
    assert make().check(transaction(sealed)).action is Action.REJECT


def test_one_untrusted_hop_among_trusted_ones_is_rejected(make: Make) -> None:
    sealed = chain(MSG, [EVIL, LIST], author="bank.example")
    v = make().check(transaction(sealed))
    assert v.action is Action.REJECT
    assert make(trusted_arc_sealers=("lists.example", "evil.example")).check(
        transaction(sealed)).action is Action.ACCEPT


def test_oldest_results_must_be_a_pass_for_this_from_domain(make: Make) -> None:
    failed = seal(MSG, LIST, "dmarc=fail header.from=bank.example")
    assert make().check(transaction(failed)).action is Action.REJECT
    other = seal(MSG, LIST, "dmarc=pass header.from=other.example")
    assert make().check(transaction(other)).action is Action.REJECT


def test_the_dkim_filters_arc_result_is_used_when_trusted(make: Make) -> None:
    """With dkim upstream, its arc= result decides (no validation here): a forged
    chain the dkim filter failed is not honoured though the sets read well."""
    sealed = through_list(LIST)
    ar = f"Authentication-Results: {AUTHSERV}; dkim=none; arc=%s\r\n"
    flt = make(upstream=("dkim",))
    assert flt.check(transaction((ar % "pass").encode() + sealed)).action is Action.ACCEPT
    assert flt.check(transaction((ar % "fail").encode() + sealed)).action is Action.REJECT
    # Our id from outside (dmarc first in the chain): not believed, validated here.
    forged = (ar % "pass").encode() + altered_after_sealing(LIST)
    assert make().check(transaction(forged)).action is Action.REJECT


def test_no_trusted_sealers_no_override(make: Make) -> None:
    v = make(trusted_arc_sealers=()).check(transaction(through_list(LIST)))
    assert v.action is Action.REJECT and dmarc_of(v) == ("fail", "p=reject dis=reject")


def test_trusted_forwarding_decision() -> None:
    headers = [(b"ARC-Seal", b" i=1; cv=none; a=rsa-sha256; d=Lists.Example.; s=a; b=AAAA"),
               (b"ARC-Message-Signature", b" i=1; a=rsa-sha256; d=lists.example; s=a; "
                b"h=from; bh=AAAA; b=AAAA"),
               (b"ARC-Authentication-Results", b" i=1; mx.lists.example; "
                b"dmarc=pass header.from=bank.example")]
    evidence = ArcEvidence(arc.PASS, arc.read_chain(headers))
    trusted = DomainList.of([".example"])
    assert trusted_forwarding(evidence, "bank.example", trusted) == \
        "arc=pass as[1].d=lists.example"
    assert trusted_forwarding(evidence, "bank.example", DomainList.of(["x.example"])) == ""
    assert trusted_forwarding(ArcEvidence(arc.FAIL, evidence.chain), "bank.example",
                              trusted) == ""
    assert trusted_forwarding(evidence, "other.example", trusted) == ""
