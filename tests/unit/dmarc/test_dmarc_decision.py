"""The dmarc filter's decision: where DKIM/SPF results come from (trusted upstream
fields, self-validation, forged fields never believed), the disposition, local
overrides, who is skipped, and the history row."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from milters.core.config import DnsSettings, GlobalSettings
from milters.core.dkim_verify import dkim_headers
from milters.core.filter import Env
from milters.core.verdict import Action, EditKind
from milters.dkim.keytools import genkey
from milters.dkim.signing import SignOptions, sign_message
from milters.dmarc import DmarcFilter, DmarcSettings
from milters.dmarc.history import SqliteHistory
from tests.support.dkim import transaction
from tests.support.dns import LoopbackDNS

AUTHSERV = "mx.test.example"
MSG = (b"From: Alice <alice@example.com>\r\nTo: bob@test.example\r\nSubject: hi\r\n"
       b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\nhello\r\n")

Make = Callable[..., DmarcFilter]


@pytest.fixture
def make(dns: LoopbackDNS, tmp_path: Path) -> Make:
    def make(upstream: tuple[str, ...] = (), **settings: Any) -> DmarcFilter:
        settings.setdefault("history", str(tmp_path / "history.sqlite"))
        env = Env(GlobalSettings(authserv_id=AUTHSERV, dns=DnsSettings(
            nameservers=("127.0.0.1",), port=dns.port, timeout=0.5)), upstream=upstream)
        return DmarcFilter(DmarcSettings(**settings), env)
    return make


def with_ar(*values: str, raw: bytes = MSG) -> bytes:
    return b"".join(f"Authentication-Results: {v}\r\n".encode() for v in values) + raw


def dmarc_of(verdict: Any) -> tuple[str, str]:
    (r,) = [r for r in verdict.results if r.method == "dmarc"]
    return r.result, r.comment


@pytest.fixture
def reject_policy(dns: LoopbackDNS) -> LoopbackDNS:
    dns.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    return dns


def test_forged_pass_when_dmarc_is_first_or_alone(make: Make, reject_policy: LoopbackDNS) -> None:
    raw = with_ar(f"{AUTHSERV}; dkim=pass header.d=example.com header.s=x; "
                  "spf=pass smtp.mailfrom=alice@example.com")
    flt = make(reject_failures=True)  # upstream = (): nothing of ours runs before
    v = flt.check(transaction(raw))
    assert dmarc_of(v) == ("fail", "p=reject dis=reject")
    assert v.action is Action.REJECT and str(v.reply).startswith("550 5.7.1")


def test_forged_field_with_another_id_is_ignored(make: Make, reject_policy: LoopbackDNS) -> None:
    raw = with_ar("evil.example; dkim=pass header.d=example.com; "
                  "spf=pass smtp.mailfrom=alice@example.com")
    v = make(upstream=("dkim", "spf")).check(transaction(raw))
    assert dmarc_of(v)[0] == "fail"


def test_forged_spf_not_trusted_when_only_dkim_upstream(make: Make,
                                                        reject_policy: LoopbackDNS) -> None:
    raw = with_ar(f"{AUTHSERV}; dkim=none", f"{AUTHSERV}; spf=pass smtp.mailfrom=a@example.com")
    tx = transaction(raw)
    tx.mail_from = "a@example.com"
    v = make(upstream=("dkim",)).check(tx)  # spf is self-validated: no SPF record -> none
    assert dmarc_of(v)[0] == "fail"


def test_upstream_results_trusted(make: Make, reject_policy: LoopbackDNS) -> None:
    raw = with_ar(f"{AUTHSERV}; dkim=pass header.d=example.com header.s=sel")
    v = make(upstream=("dkim", "spf")).check(transaction(raw))
    assert dmarc_of(v) == ("pass", "p=reject dis=none")
    assert v.action is Action.ACCEPT


def test_listed_trusted_authserv_id(make: Make, reject_policy: LoopbackDNS) -> None:
    raw = with_ar("border.example; spf=pass smtp.mailfrom=bounce@mail.example.com")
    flt = make(trusted_authserv_ids=("border.example",))
    assert dmarc_of(flt.check(transaction(raw)))[0] == "pass"


def test_self_validated_dkim(make: Make, dns: LoopbackDNS, tmp_path: Path) -> None:
    key = genkey("example.com", "sel", "rsa", 1024, str(tmp_path))
    dns.txt("sel._domainkey.example.com", key.key.dns_record())
    dns.txt("_dmarc.example.com", "v=DMARC1; p=reject; adkim=s")
    tx = transaction(MSG)
    value = sign_message(dkim_headers(tx.headers), tx.body.getvalue(), "example.com", "sel",
                         key.key, SignOptions())
    signed = f"DKIM-Signature: {value}".replace("\n", "\r\n").encode() + b"\r\n" + MSG
    v = make(reject_failures=True).check(transaction(signed))
    assert dmarc_of(v)[0] == "pass" and v.action is Action.ACCEPT


def test_reject_failures_off_only_reports(make: Make, reject_policy: LoopbackDNS) -> None:
    v = make().check(transaction(MSG))
    assert dmarc_of(v) == ("fail", "p=reject dis=none") and v.action is Action.ACCEPT


def test_reject_reply_names_domain(make: Make, reject_policy: LoopbackDNS) -> None:
    v = make(reject_failures=True).check(transaction(MSG))
    assert str(v.reply) == "550 5.7.1 rejected by the DMARC policy of example.com"


def test_quarantine_hold_tag_accept(make: Make, dns: LoopbackDNS) -> None:
    dns.txt("_dmarc.example.com", "v=DMARC1; p=quarantine")
    v = make().check(transaction(MSG))
    assert v.quarantine and dmarc_of(v)[1] == "p=quarantine dis=quarantine"
    v = make(on_quarantine="tag").check(transaction(MSG))
    assert not v.quarantine and v.header_edits[0].kind is EditKind.ADD
    assert v.header_edits[0].name == "X-Milters-DMARC"
    v = make(on_quarantine="accept").check(transaction(MSG))
    assert not v.quarantine and not v.header_edits and dmarc_of(v)[1].endswith("dis=none")


def test_never_reject_domains(make: Make, reject_policy: LoopbackDNS) -> None:
    v = make(reject_failures=True, never_reject_domains=("example.com",)).check(
        transaction(MSG))
    assert v.action is Action.ACCEPT and dmarc_of(v)[0] == "fail"
    # One rule for domain lists (core/domains.py): .example.com is its sub-domains
    # only, as documented; it used to cover example.com itself here alone.
    v = make(reject_failures=True, never_reject_domains=(".example.com",)).check(
        transaction(MSG))
    assert v.action is Action.REJECT


def test_internal_and_authenticated_skipped(make: Make, reject_policy: LoopbackDNS) -> None:
    flt = make(reject_failures=True)
    for tx in (transaction(MSG, client="127.0.0.1"), transaction(MSG, auth="alice")):
        v = flt.check(tx)
        assert v.action is Action.ACCEPT and not v.results
    flt = make(reject_failures=True, always_check_domains=("example.com",))
    assert flt.check(transaction(MSG, auth="alice")).action is Action.REJECT


def from_(value: bytes) -> bytes:
    return MSG.replace(b"From: Alice <alice@example.com>", b"From: " + value)


def test_multi_from_spoof_of_reject_domain(make: Make, reject_policy: LoopbackDNS) -> None:
    """Issue 12: an attacker's address beside a p=reject domain's must not switch DMARC
    off. RFC 9989 §11.5: each domain evaluated, the strictest failing policy applies."""
    reject_policy.txt("_dmarc.attacker.example", "v=DMARC1; p=none")
    attacker_dkim = "mx.test.example; dkim=pass header.d=attacker.example header.s=s"
    for raw in (from_(b"support@example.com, x@attacker.example"),
                from_(b"x@attacker.example, <support@example.com>"),
                from_(b"x@attacker.example\r\nFrom: support@example.com"),  # two fields
                with_ar(attacker_dkim, raw=from_(b"support@example.com, x@attacker.example"))):
        v = make(upstream=("dkim", "spf"), reject_failures=True).check(transaction(raw))
        assert v.action is Action.REJECT, raw
        assert dmarc_of(v) == ("fail", "p=reject dis=reject")
        (r,) = v.results
        assert r.properties == (("header", "from", "example.com"),)
        # Without reject_failures: still a fail, never a pass or a permerror.
        v = make(upstream=("dkim", "spf")).check(transaction(raw))
        assert v.action is Action.ACCEPT and dmarc_of(v)[0] == "fail"


def test_same_domain_addresses_are_that_domain(make: Make, reject_policy: LoopbackDNS) -> None:
    """RFC 9989 and OpenDMARC: several addresses of one domain are one Author Domain."""
    aligned = with_ar(f"{AUTHSERV}; dkim=pass header.d=example.com header.s=s",
                      raw=from_(b"a@example.com, B <b@EXAMPLE.com>"))
    v = make(upstream=("dkim", "spf"), reject_failures=True).check(transaction(aligned))
    assert dmarc_of(v) == ("pass", "p=reject dis=none") and v.action is Action.ACCEPT
    v = make(on_bad_from="reject").check(transaction(aligned))
    assert v.action is not Action.REJECT  # one domain is not a bad From


def test_two_domains_all_aligned_pass_only_when_each_passes(make: Make,
                                                             reject_policy: LoopbackDNS) -> None:
    reject_policy.txt("_dmarc.example.net", "v=DMARC1; p=quarantine")
    both = with_ar(f"{AUTHSERV}; dkim=pass header.d=example.com header.s=s; "
                   "dkim=pass header.d=example.net header.s=s",
                   raw=from_(b"a@example.com, b@example.net"))
    v = make(upstream=("dkim", "spf")).check(transaction(both))
    assert dmarc_of(v)[0] == "pass"
    one = with_ar(f"{AUTHSERV}; dkim=pass header.d=example.com header.s=s",
                  raw=from_(b"a@example.com, b@example.net"))
    v = make(upstream=("dkim", "spf")).check(transaction(one))
    assert dmarc_of(v) == ("fail", "p=quarantine dis=quarantine") and v.quarantine


def test_bad_from(make: Make, reject_policy: LoopbackDNS) -> None:
    two = from_(b"a@example.com, b@example.net")
    v = make(on_bad_from="reject").check(transaction(two))
    assert v.action is Action.REJECT and v.reply is not None and v.reply.code == "550"
    v = make(on_bad_from="reject").check(transaction(two, auth="alice"))
    assert v.action is Action.ACCEPT and not v.results  # our own users are not judged
    for value in (b"undisclosed-recipients:;", b"alice", b"a@localhost", b"<>"):
        v = make(reject_failures=True).check(transaction(from_(value)))
        assert dmarc_of(v) == ("permerror", "bad From") and v.action is Action.ACCEPT, value
        v = make(on_bad_from="reject").check(transaction(from_(value)))
        assert v.action is Action.REJECT, value
    no_from = MSG.replace(b"From: Alice <alice@example.com>\r\n", b"")
    assert dmarc_of(make().check(transaction(no_from)))[0] == "permerror"


@pytest.mark.parametrize("value", [
    b"(" * 1000 + b"x" + b")" * 1000 + b" <ceo@example.com>",  # deeper than the bound
    b"Ceo <ceo@example.com",  # no closing '>'
    b'"unterminated <ceo@example.com>',
    b"ceo@example.com (" + b"x" * 200_000 + b")",  # over the size bound
    b"\xff\xfe junk <ceo@example.com> \x80",  # 8-bit bytes (not UTF-8)
])
def test_unparseable_from_still_meets_the_policy(make: Make, reject_policy: LoopbackDNS,
                                                 value: bytes) -> None:
    """A From the grammar refuses is searched for @domain names (a reader's program may
    show them): a p=reject domain among them is refused, and such a From never passes."""
    v = make(reject_failures=True).check(transaction(from_(value)))
    assert v.action is Action.REJECT and dmarc_of(v)[0] == "fail"
    aligned = with_ar(f"{AUTHSERV}; dkim=pass header.d=example.com header.s=s",
                      raw=from_(value))
    v = make(upstream=("dkim", "spf"), reject_failures=True).check(transaction(aligned))
    assert dmarc_of(v)[0] == "permerror" and v.action is Action.ACCEPT


def test_nested_comments_within_bound_parse(make: Make, reject_policy: LoopbackDNS) -> None:
    value = b"(" * 200 + b"x" + b")" * 200 + b" <ceo@example.com>"
    aligned = with_ar(f"{AUTHSERV}; dkim=pass header.d=example.com header.s=s",
                      raw=from_(value))
    v = make(upstream=("dkim", "spf"), reject_failures=True).check(transaction(aligned))
    assert dmarc_of(v)[0] == "pass"


def test_temperror(make: Make, dns: LoopbackDNS) -> None:
    dns.set_fail(True)
    assert dmarc_of(make().check(transaction(MSG)))[0] == "temperror"
    v = make(on_temperror="tempfail").check(transaction(MSG))
    assert v.action is Action.TEMPFAIL and v.reply is not None and v.reply.code == "451"


def test_history_row(make: Make, reject_policy: LoopbackDNS, tmp_path: Path) -> None:
    raw = with_ar(f"{AUTHSERV}; dkim=pass header.d=example.com header.s=sel; "
                  "dkim=fail header.d=other.example header.s=s2")
    tx = transaction(raw)
    tx.mail_from = "bounce@example.net"
    tx.rcpt_to = ["bob@test.example"]
    flt = make(upstream=("dkim", "spf"))
    flt.check(tx)
    assert flt.history is not None
    flt.history.close()  # writes what is queued
    (e,) = SqliteHistory(str(tmp_path / "history.sqlite")).entries(0, 2**40)
    assert (e.source_ip, e.header_from, e.envelope_from, e.envelope_to) == (
        "198.51.100.7", "example.com", "example.net", "test.example")
    assert e.dkim == (("example.com", "sel", "pass"), ("other.example", "s2", "fail"))
    assert (e.result, e.policy, e.disposition, e.dkim_aligned, e.p) == (
        "pass", "reject", "none", True, "reject")


def test_unreadable_ar_is_ignored(make: Make, reject_policy: LoopbackDNS) -> None:
    raw = with_ar(f"{AUTHSERV}; dkim=pass header.d=example.com; ???")
    v = make(upstream=("dkim",), self_validate=False).check(transaction(raw))
    assert dmarc_of(v)[0] == "fail"


def test_8bit_junk_in_envelope_is_a_defined_answer(make: Make, reject_policy: LoopbackDNS,
                                                  tmp_path: Path) -> None:
    """Issue 9: invalid UTF-8 in MAIL FROM or HELO reaches dmarc as surrogate escapes
    (the adapter decodes with surrogateescape): SPF is none (RFC 7208 §4.3, a
    malformed domain), DMARC goes on, the history row is written."""
    flt = make(reject_failures=True)
    for mail_from, helo in (("a@b\udcff.example", "mail.example.net"),
                            ("", "h\udcff\udcfe.example"),
                            ("\udcff@example.com", "\udcff")):
        tx = transaction(MSG)
        tx.mail_from = mail_from
        tx.connection.helo = helo
        v = flt.check(tx)
        assert v.action is Action.REJECT and dmarc_of(v)[0] == "fail", (mail_from, helo)
    assert flt.history is not None
    flt.history.close()
    rows = SqliteHistory(str(tmp_path / "history.sqlite")).entries(0, 2**40)
    assert [r.envelope_from for r in rows] == ["b?.example", "", "example.com"]
