"""DMARC evaluation (RFC 9989) against records served by the loopback DNS: the
Author Domain, records good and bad, both discovery methods, alignment, results."""

from __future__ import annotations

import pytest

from milters.core.errors import PermError
from milters.core.model import Header, parse_message
from milters.core.resolver import Resolver
from milters.dmarc.evaluate import (
    BadFrom,
    DkimInput,
    SpfInput,
    evaluate,
    header_from_domain,
    normalize_domain,
    tree_walk_names,
)
from milters.dmarc.record import UnusableRecord, parse_record
from tests.support.dns import LoopbackDNS

DKIM_PASS = [DkimInput("pass", "example.com", "sel")]


def headers(raw: str) -> list[Header]:
    return parse_message(raw.encode() + b"\r\n\r\nbody\r\n")[0]


# -- the Author Domain -----------------------------------------------------------------


@pytest.mark.parametrize(("field", "domain"), [
    ("From: Alice <alice@Example.COM>", "example.com"),
    ("From: alice@sub.example.com", "sub.example.com"),
    ('From: "Doe, John" <j@example.org>', "example.org"),
    ("From: =?utf-8?q?J=C3=B6rg?= <j@example.net>", "example.net"),
    ("From: u@bücher.example", "xn--bcher-kva.example"),
    ("From: a\r\n\t<a@folded.example>", "folded.example"),
])
def test_author_domain(field: str, domain: str) -> None:
    assert header_from_domain(headers(field)) == domain


@pytest.mark.parametrize("fields", [
    "To: x@example.com",  # no From
    "From: a@example.com\r\nFrom: b@example.com",  # two From fields
    "From: a@example.com, b@example.net",  # two addresses
    "From: undisclosed-recipients:;",  # a group, no address
    "From: alice",  # no domain
    "From: a@[192.0.2.1]",  # an address literal
    "From: a@localhost",  # not a FQDN
])
def test_author_domain_refused(fields: str) -> None:
    with pytest.raises(BadFrom):
        header_from_domain(headers(fields))


def test_very_long_from_header() -> None:
    name = "x" * 5000
    assert header_from_domain(headers(f'From: "{name}" <a@example.com>')) == "example.com"
    long_domain = ".".join(["a" * 63] * 5) + ".com"  # over 253 octets
    with pytest.raises(BadFrom):
        header_from_domain(headers(f"From: a@{long_domain}"))


def test_idn_normalized_and_invalid() -> None:
    assert normalize_domain("BÜCHER.example.") == "xn--bcher-kva.example"
    with pytest.raises(PermError):
        normalize_domain("a..example")


# -- records ----------------------------------------------------------------------------


def test_record_tags_and_defaults() -> None:
    r = parse_record("v=DMARC1; p=reject; sp=quarantine; np=reject; adkim=s; aspf=s; "
                     "rua=mailto:a@example.com,mailto:b@example.net!10m; ruf=mailto:f@x.example; "
                     "fo=1:d; t=y; psd=n")
    assert (r.p, r.sp, r.np, r.adkim, r.aspf, r.fo, r.t, r.psd) == (
        "reject", "quarantine", "reject", "s", "s", "1:d", True, "n")
    assert r.rua == ("mailto:a@example.com", "mailto:b@example.net")
    d = parse_record("v=DMARC1; p=none")
    assert (d.sp, d.np, d.adkim, d.aspf, d.t, d.psd, d.fo) == ("", "", "r", "r", False, "u", "0")
    assert d.subdomain_policy == "none" and d.nonexistent_policy == "none"


def test_record_ignores_unknown_and_removed_tags() -> None:
    r = parse_record("v=DMARC1; p=quarantine; pct=50; rf=afrf; ri=3600; future=1; adkim=x")
    assert r.p == "quarantine" and r.adkim == "r" and not r.t


@pytest.mark.parametrize(("text", "testing"), [
    ("v=DMARC1; p=quarantine; pct=0", True),  # RFC 7489's "apply one step less"
    ("v=DMARC1; p=reject; pct=0; t=n", False),  # t= says it, RFC 9989's own tag
    ("v=DMARC1; p=reject; pct=00", True),  # 1*3DIGIT: the number 0
    ("v=DMARC1; p=reject; pct=abc", False),
    ("v=DMARC1; p=reject; pct=100", False),
])
def test_pct_0_is_read_as_testing_without_t(text: str, testing: bool) -> None:
    assert parse_record(text).t is testing


@pytest.mark.parametrize("text", [
    "v=DMARC1; p=bogus",  # invalid p, no rua
    "v=DMARC1",  # no p, no rua
    "v=DMARC1; p=reject; sp=bogus",  # RFC 9989 §4.10.1: an invalid sp= too
    "v=DMARC1; p=reject; np=",  # and an invalid np=
    "v=DMARC1; p=bogus; rua=http://r.example/",  # no usable rua
])
def test_record_without_usable_policy(text: str) -> None:
    with pytest.raises(UnusableRecord):
        parse_record(text)


def test_tag_twice_is_permerror() -> None:
    # RFC 6376 §3.2 tag-list (RFC 9989 §4.7): a duplicated tag invalidates the list.
    with pytest.raises(PermError) as info:
        parse_record("v=DMARC1; p=none; p=reject")
    assert not isinstance(info.value, UnusableRecord)


def test_syntax_error_in_a_tag_is_ignored() -> None:
    # RFC 9989 §4.8: syntax errors are "discarded in favor of default values".
    r = parse_record("v=DMARC1; p=quarantine; garbage; adkim=s")
    assert (r.p, r.adkim) == ("quarantine", "s")


@pytest.mark.parametrize("text", [
    "v=DMARC1; p=bogus; rua=mailto:r@example.com",
    "v=DMARC1; rua=mailto:r@example.com",
    "v=DMARC1; p=reject; sp=bogus; np=reject; rua=mailto:r@example.com",
])
def test_invalid_policy_with_rua_is_none(text: str) -> None:
    # RFC 9989 §4.10.1: "act as if a record containing p=none was retrieved"
    r = parse_record(text)
    assert (r.p, r.sp, r.np) == ("none", "", "") and not r.p_published
    assert r.rua == ("mailto:r@example.com",)


# -- discovery and results ----------------------------------------------------------------


def test_pass_by_aligned_dkim(dns: LoopbackDNS, resolver: Resolver) -> None:
    dns.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    ev = evaluate("example.com", DKIM_PASS, None, resolver)
    assert (ev.result, ev.policy, ev.disposition, ev.dkim_aligned) == ("pass", "reject",
                                                                      "none", True)


def test_fail_gives_policy(dns: LoopbackDNS, resolver: Resolver) -> None:
    dns.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    ev = evaluate("example.com", [DkimInput("fail", "example.com")],
                  SpfInput("pass", "other.example"), resolver)
    assert (ev.result, ev.policy, ev.disposition) == ("fail", "reject", "reject")


def test_testing_mode_softens(dns: LoopbackDNS, resolver: Resolver) -> None:
    dns.txt("_dmarc.example.com", "v=DMARC1; p=reject; t=y")
    ev = evaluate("example.com", [], None, resolver)
    assert (ev.result, ev.policy, ev.disposition) == ("fail", "reject", "quarantine")


def test_relaxed_and_strict_alignment(dns: LoopbackDNS, resolver: Resolver) -> None:
    dns.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    sub = [DkimInput("pass", "mail.example.com")]
    assert evaluate("example.com", sub, None, resolver).result == "pass"
    assert evaluate("news.example.com", [], SpfInput("pass", "example.com"),
                    resolver).result == "pass"
    dns.txt("_dmarc.example.org", "v=DMARC1; p=reject; adkim=s; aspf=s")
    sub = [DkimInput("pass", "mail.example.org")]
    assert evaluate("example.org", sub, None, resolver).result == "fail"
    assert evaluate("example.org", [], SpfInput("pass", "bounce.example.org"),
                    resolver).result == "fail"
    assert evaluate("example.org", [], SpfInput("pass", "example.org"),
                    resolver).result == "pass"


def test_unaligned_other_domain_and_non_pass(dns: LoopbackDNS, resolver: Resolver) -> None:
    dns.txt("_dmarc.example.com", "v=DMARC1; p=quarantine")
    ev = evaluate("example.com", [DkimInput("pass", "example.net")],
                  SpfInput("softfail", "example.com"), resolver)
    assert (ev.result, ev.disposition) == ("fail", "quarantine")


def test_sub_domain_takes_sp_and_np(dns: LoopbackDNS, resolver: Resolver) -> None:
    dns.txt("_dmarc.example.com", "v=DMARC1; p=none; sp=quarantine; np=reject")
    dns.a("exists.example.com", "192.0.2.1")
    ev = evaluate("exists.example.com", [], None, resolver)
    assert (ev.policy_domain, ev.policy) == ("example.com", "quarantine")
    ev = evaluate("ghost.example.com", [], None, resolver)
    assert ev.policy == "reject"
    assert evaluate("example.com", [], None, resolver).policy == "none"


def test_no_record_is_none(dns: LoopbackDNS, resolver: Resolver) -> None:
    ev = evaluate("a.b.example.com", DKIM_PASS, None, resolver)
    assert ev.result == "none" and ev.queries == 4  # a.b.example.com .. com


def test_tree_walk_at_most_eight_queries(dns: LoopbackDNS, resolver: Resolver) -> None:
    deep = "l1.l2.l3.l4.l5.l6.l7.l8.l9.l10.example.com"
    assert tree_walk_names(deep) == [deep, *[".".join(deep.split(".")[-n:])
                                             for n in range(7, 0, -1)]]
    dns.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    ev = evaluate(deep, [], None, resolver)
    assert (ev.policy_domain, ev.policy, ev.result) == ("example.com", "reject", "fail")
    evaluate("x" + deep, [], None, resolver)
    assert sum(1 for n, _ in dns.resolver.queries if n.startswith("_dmarc.x")) == 1
    assert ev.queries <= 8


def test_psd_record_ends_org_walk(dns: LoopbackDNS, resolver: Resolver) -> None:
    # A public suffix operator (psd=y) with a policy for names below it.
    dns.txt("_dmarc.gov.example", "v=DMARC1; p=reject; psd=y")
    dns.a("agency.gov.example", "192.0.2.1")
    ev = evaluate("agency.gov.example", [DkimInput("pass", "gov.example")], None, resolver)
    # gov.example is a PSD: the Organizational Domain of agency.gov.example is itself.
    assert (ev.result, ev.policy_domain, ev.policy) == ("fail", "gov.example", "reject")
    ev = evaluate("agency.gov.example", [DkimInput("pass", "mail.agency.gov.example")],
                  None, resolver)
    assert ev.result == "pass"


def test_psd_n_is_the_org_domain(dns: LoopbackDNS, resolver: Resolver) -> None:
    dns.txt("_dmarc.example.com", "v=DMARC1; p=none")
    dns.txt("_dmarc.dept.example.com", "v=DMARC1; p=reject; psd=n")
    ev = evaluate("dept.example.com", [DkimInput("pass", "example.com")], None, resolver)
    assert ev.result == "fail"  # the org domain is dept.example.com, not example.com
    ev = evaluate("dept.example.com", [DkimInput("pass", "x.dept.example.com")], None,
                  resolver)
    assert ev.result == "pass"


def test_psl_method(dns: LoopbackDNS, resolver: Resolver) -> None:
    dns.txt("_dmarc.example.co.uk", "v=DMARC1; p=reject; sp=quarantine")
    ev = evaluate("a.b.example.co.uk", [], None, resolver, discovery="psl")
    assert (ev.policy_domain, ev.policy, ev.discovery) == ("example.co.uk", "quarantine", "psl")
    assert ev.queries == 2  # the author domain, then the Organizational Domain
    ev = evaluate("a.b.example.co.uk", [DkimInput("pass", "example.co.uk")], None,
                  resolver, discovery="psl")
    assert ev.result == "pass"


def test_split_txt_strings(dns: LoopbackDNS, resolver: Resolver) -> None:
    rua = ",".join(f"mailto:reports{i}@example.net" for i in range(12))
    dns.txt("_dmarc.example.com", f"v=DMARC1; p=quarantine; rua={rua}")  # > 255 bytes
    ev = evaluate("example.com", [], None, resolver)
    assert ev.record is not None and len(ev.record.rua) == 12 and ev.policy == "quarantine"


def test_non_dmarc_txt_records_are_skipped(dns: LoopbackDNS, resolver: Resolver) -> None:
    dns.txt("_dmarc.example.com", "v=spf1 -all")
    dns.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    assert evaluate("example.com", [], None, resolver).policy == "reject"


def test_duplicated_records_no_processing(dns: LoopbackDNS, resolver: Resolver) -> None:
    dns.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    dns.txt("_dmarc.example.com", "v=DMARC1; p=none")
    ev = evaluate("example.com", [], None, resolver)
    assert ev.result == "none" and "2 DMARC records" in ev.reason


def test_invalid_p_without_rua_is_none(dns: LoopbackDNS, resolver: Resolver) -> None:
    """Issue 12 / RFC 9989 §4.10.1: the record is unusable, there is no policy: none."""
    dns.txt("_dmarc.example.com", "v=DMARC1; p=bogus")
    ev = evaluate("example.com", [], None, resolver)
    assert (ev.result, ev.policy, ev.disposition) == ("none", "none", "none")
    dns.txt("_dmarc.example.net", "v=DMARC1; p=bogus; rua=mailto:r@example.net")
    ev = evaluate("example.net", [], None, resolver)
    assert (ev.result, ev.policy, ev.disposition) == ("fail", "none", "none")


def test_tag_twice_is_permerror_at_evaluation(dns: LoopbackDNS, resolver: Resolver) -> None:
    dns.txt("_dmarc.example.com", "v=DMARC1; p=reject; p=none")
    assert evaluate("example.com", [], None, resolver).result == "permerror"


def test_dns_timeout_is_temperror(dns: LoopbackDNS, resolver: Resolver) -> None:
    dns.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    dns.set_delay(1.0)
    assert evaluate("example.com", DKIM_PASS, None, resolver).result == "temperror"


def test_servfail_is_temperror(dns: LoopbackDNS, resolver: Resolver) -> None:
    dns.set_fail(True)
    assert evaluate("example.com", [], None, resolver).result == "temperror"


def test_idn_author_domain_lookup(dns: LoopbackDNS, resolver: Resolver) -> None:
    dns.txt("_dmarc.xn--bcher-kva.example", "v=DMARC1; p=reject")
    author = header_from_domain(headers("From: u@bücher.example"))
    ev = evaluate(author, [DkimInput("pass", "xn--bcher-kva.example")], None, resolver)
    assert ev.result == "pass" and ev.policy_domain == "xn--bcher-kva.example"
