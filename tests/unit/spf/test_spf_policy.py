"""The spf filter's decisions: which results refuse, what is reported, who is skipped.

DNS answers come from the loopback server; the filter's hooks are called as the
pipeline calls them: on_mail, on_rcpt for each recipient, check at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from milters.core.config import DnsSettings, GlobalSettings
from milters.core.filter import Env
from milters.core.model import Connection, Transaction
from milters.core.spf_eval import check_helo, check_host
from milters.core.verdict import Action, AuthResult, EditKind, Verdict
from milters.spf import SpfFilter, SpfSettings
from milters.spf.filter import clean_text, received_spf
from tests.support.dns import LoopbackDNS, dns_server

CLIENT = "192.0.2.5"
OTHER = "198.51.100.9"
HELO = "mail.sender.example"


@pytest.fixture(scope="module")
def module_dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        yield server


@pytest.fixture
def dns(module_dns: LoopbackDNS) -> LoopbackDNS:
    d = module_dns
    d.clear()
    d.txt("sender.example", f"v=spf1 ip4:{CLIENT} -all")
    d.txt("soft.example", f"v=spf1 ip4:{CLIENT} ~all")
    d.txt("neutral.example", "v=spf1 ?all")
    d.txt("broken.example", "v=spf1 ip4:192.0.2.300 -all")
    d.txt("exp.example", "v=spf1 -all exp=why.exp.example")
    d.txt("why.exp.example", "%{i} is not a mail server of %{d}")
    d.txt("nospf.example", "some other text")
    d.txt(HELO, "v=spf1 a -all")
    d.a(HELO, CLIENT)
    d.txt("bad-helo.example", "v=spf1 -all")
    d.timeout("slow.example")
    return d


FilterFactory = Callable[..., SpfFilter]


@pytest.fixture
def spf_filter(dns: LoopbackDNS) -> FilterFactory:
    def make(**settings: Any) -> SpfFilter:
        env = Env(GlobalSettings(authserv_id="mx.test.example", dns=DnsSettings(
            nameservers=(dns.address,), port=dns.port, timeout=0.3)))
        return SpfFilter(SpfSettings(**settings), env)

    return make


def transaction(mail_from: str, client: str = CLIENT, helo: str = HELO,
                auth: str = "") -> Transaction:
    macros = {"{auth_authen}": auth} if auth else {}
    conn = Connection(client_addr=client, client_name="unknown", helo=helo, macros=macros)
    return Transaction(conn, mail_from=mail_from, macros={"i": "QID"})


def run(flt: SpfFilter, tx: Transaction) -> tuple[Verdict | None, Verdict]:
    """(what each recipient gets, the end-of-message verdict) as the pipeline asks."""
    assert flt.on_mail(tx) is None  # decided at MAIL FROM, refused at RCPT
    refusal = flt.on_rcpt(tx, "user@test.example")
    return refusal, flt.check(tx)


def spf_result(verdict: Verdict) -> AuthResult:
    (result,) = verdict.results
    return result


# -- results and what they lead to ------------------------------------------------

def test_pass_is_accepted_and_reported(spf_filter: FilterFactory) -> None:
    refusal, verdict = run(spf_filter(), transaction("alice@sender.example"))
    assert refusal is None
    assert verdict.action is Action.ACCEPT
    assert spf_result(verdict) == AuthResult("spf", "pass", properties=(
        ("smtp", "mailfrom", "alice@sender.example"), ("smtp", "helo", HELO)))


def test_fail_refuses_each_recipient_with_5723(spf_filter: FilterFactory) -> None:
    refusal, _ = run(spf_filter(), transaction("alice@sender.example", client=OTHER,
                                               helo="other.example"))
    assert refusal is not None and refusal.action is Action.REJECT
    assert refusal.reply is not None
    assert (refusal.reply.code, refusal.reply.xcode) == ("550", "5.7.23")
    assert "sender.example" in refusal.reply.text
    assert "SPF fail - not authorized" in refusal.reply.text


def test_fail_reply_carries_the_domains_explanation(spf_filter: FilterFactory) -> None:
    refusal, _ = run(spf_filter(), transaction("bob@exp.example", client=OTHER,
                                               helo="other.example"))
    assert refusal is not None and refusal.reply is not None
    # RFC 7208 §6.2: exp= text with macros expanded
    assert refusal.reply.text.endswith(f"{OTHER} is not a mail server of exp.example")


def test_explanation_is_made_safe_for_a_reply() -> None:
    assert clean_text("bad\r\n\tnews \u00e9 \x00") == "bad news ? ?"
    assert len(clean_text("x" * 1000)) == 300


@pytest.mark.parametrize(("policy", "domain", "refused"), [
    ("fail", "soft.example", False),
    ("softfail", "soft.example", True),
    ("softfail", "sender.example", True),
    ("softfail", "neutral.example", False),
    ("not_pass", "neutral.example", True),
    ("not_pass", "broken.example", True),
    ("not_pass", "nospf.example", False),
    ("not_pass", "nothing.example", False),
    ("never", "sender.example", False),
    ("no_check", "sender.example", False),
])
def test_mail_from_reject_policies(spf_filter: FilterFactory, policy: str, domain: str,
                                   refused: bool) -> None:
    flt = spf_filter(mail_from_reject=policy, helo_reject="never")
    refusal, verdict = run(flt, transaction(f"a@{domain}", client=OTHER, helo="x.example"))
    assert (refusal is not None) is refused
    if refused:
        assert refusal is not None and refusal.reply is not None
        assert refusal.reply.xcode == ("5.7.24" if domain == "broken.example" else "5.7.23")
    if policy == "no_check":
        assert verdict.results == ()


def test_not_pass_accepts_pass(spf_filter: FilterFactory) -> None:
    refusal, verdict = run(spf_filter(mail_from_reject="not_pass"),
                           transaction("a@sender.example"))
    assert refusal is None
    assert spf_result(verdict).result == "pass"


def test_never_still_reports_the_fail(spf_filter: FilterFactory) -> None:
    refusal, verdict = run(spf_filter(mail_from_reject="never", helo_reject="never"),
                           transaction("a@sender.example", client=OTHER))
    assert refusal is None
    assert spf_result(verdict).result == "fail"


def test_temperror_is_accepted_by_default(spf_filter: FilterFactory) -> None:
    refusal, verdict = run(spf_filter(), transaction("a@slow.example", helo="x.example"))
    assert refusal is None
    assert spf_result(verdict).result == "temperror"


def test_temperror_tempfails_when_configured(spf_filter: FilterFactory) -> None:
    refusal, _ = run(spf_filter(on_temperror="tempfail"),
                     transaction("a@slow.example", helo="x.example"))
    assert refusal is not None and refusal.action is Action.TEMPFAIL
    assert refusal.reply is not None
    assert (refusal.reply.code, refusal.reply.xcode) == ("451", "4.4.3")
    assert "timed out" not in refusal.reply.text  # never exception text


def test_permerror_policies(spf_filter: FilterFactory) -> None:
    tx = transaction("a@broken.example", helo="x.example")
    refusal, verdict = run(spf_filter(), tx)
    assert refusal is None
    assert spf_result(verdict).result == "permerror"
    refusal, _ = run(spf_filter(on_permerror="reject"), transaction("a@broken.example"))
    assert refusal is not None and refusal.reply is not None
    assert (refusal.reply.code, refusal.reply.xcode) == ("550", "5.7.24")


# -- the HELO identity ----------------------------------------------------------------

def test_null_sender_is_checked_as_postmaster_at_helo(spf_filter: FilterFactory) -> None:
    refusal, verdict = run(spf_filter(), transaction(""))
    assert refusal is None
    # RFC 7208 §2.4: the MAIL FROM identity of the null sender is postmaster@HELO; the
    # comment says so to a reader (RFC 9989 §3.2.4 aligns it as the MAIL FROM identity).
    assert spf_result(verdict) == AuthResult("spf", "pass", properties=(
        ("smtp", "mailfrom", f"postmaster@{HELO}"), ("smtp", "helo", HELO)),
        comment="null sender: HELO identity")


def test_null_sender_with_a_failing_helo_is_refused(spf_filter: FilterFactory) -> None:
    refusal, _ = run(spf_filter(), transaction("", client=OTHER))
    assert refusal is not None and refusal.reply is not None
    assert "HELO" in refusal.reply.text


def test_helo_fail_refuses_even_when_mail_from_passes(spf_filter: FilterFactory) -> None:
    refusal, _ = run(spf_filter(), transaction("a@sender.example", helo="bad-helo.example"))
    assert refusal is not None and refusal.reply is not None
    assert "HELO bad-helo.example" in refusal.reply.text


def test_helo_reject_null_only_refuses_the_null_sender(spf_filter: FilterFactory) -> None:
    flt = spf_filter(helo_reject="null")
    refusal, _ = run(flt, transaction("a@sender.example", helo="bad-helo.example"))
    assert refusal is None
    refusal, _ = run(flt, transaction("", helo="bad-helo.example"))
    assert refusal is not None


def test_helo_no_check_makes_no_helo_lookups(spf_filter: FilterFactory,
                                              dns: LoopbackDNS) -> None:
    run(spf_filter(helo_reject="no_check"), transaction("a@sender.example"))
    assert all(name != HELO for name, _ in dns.resolver.queries)


def test_helo_result_is_reported_separately(spf_filter: FilterFactory) -> None:
    _, verdict = run(spf_filter(helo_result=True, helo_reject="never"),
                     transaction("a@sender.example", helo="bad-helo.example"))
    assert verdict.results == (
        AuthResult("spf", "pass", properties=(("smtp", "mailfrom", "a@sender.example"),
                                               ("smtp", "helo", "bad-helo.example"))),
        AuthResult("spf", "fail", properties=(("smtp", "helo", "bad-helo.example"),)),
    )


def test_helo_that_is_not_a_domain_has_no_spf(dns: LoopbackDNS) -> None:
    env = Env(GlobalSettings(dns=DnsSettings(nameservers=(dns.address,), port=dns.port)))
    for helo in ("[192.0.2.5]", "localhost", ""):
        assert check_helo(CLIENT, helo, env.resolver).result == "none"


# -- who is skipped -------------------------------------------------------------------

@pytest.mark.parametrize(("tx", "why"), [
    (transaction("a@sender.example", client="127.0.0.1"), "internal client"),
    (transaction("a@sender.example", client=OTHER, auth="alice"), "authenticated client"),
    (transaction("a@sender.example", client="203.0.113.9"), "client in skip_addresses"),
    (transaction("a@sender.example", client=""), "internal client"),
])
def test_skipped_clients_are_not_looked_up(spf_filter: FilterFactory, dns: LoopbackDNS,
                                           tx: Transaction, why: str) -> None:
    refusal, verdict = run(spf_filter(skip_addresses=("203.0.113.0/24",)), tx)
    assert refusal is None
    assert verdict.results == ()
    assert verdict.reason == f"not checked: {why}"
    assert dns.resolver.queries == []


# -- Received-SPF -----------------------------------------------------------------------

def test_received_spf_field(spf_filter: FilterFactory) -> None:
    _, verdict = run(spf_filter(received_spf=True), transaction("alice@sender.example"))
    (edit,) = verdict.header_edits
    assert (edit.kind, edit.name, edit.index) == (EditKind.INSERT, "Received-SPF", -1)
    value = " ".join(edit.value.split())
    assert value == (
        "pass (mx.test.example: domain of alice@sender.example designates 192.0.2.5 as "
        'permitted sender) client-ip=192.0.2.5; envelope-from="alice@sender.example"; '
        'helo=mail.sender.example; mechanism="ip4:192.0.2.5"; receiver=mx.test.example; '
        "identity=mailfrom;"
    )
    assert all(len(line) < 80 for line in edit.value.split("\n"))


def test_received_spf_for_the_helo_identity(dns: LoopbackDNS) -> None:
    env = Env(GlobalSettings(dns=DnsSettings(nameservers=(dns.address,), port=dns.port)))
    outcome = check_host("2001:db8::1", "", HELO, env.resolver)
    value = " ".join(received_spf(outcome, "2001:db8::1", HELO, "", "mx.example").split())
    assert value.startswith("fail (mx.example: domain of postmaster@mail.sender.example "
                            "does not designate 2001:db8::1 as permitted sender) "
                            'client-ip="2001:db8::1"; helo=mail.sender.example;')
    assert value.endswith("identity=helo;")
    assert "envelope-from" not in value


# -- decided once ---------------------------------------------------------------------

def test_decided_once_at_mail_from(spf_filter: FilterFactory, dns: LoopbackDNS) -> None:
    flt = spf_filter()
    tx = transaction("a@sender.example", client=OTHER, helo="x.example")
    flt.on_mail(tx)
    asked = len(dns.resolver.queries)
    for rcpt in ("a@test.example", "b@test.example"):
        assert flt.on_rcpt(tx, rcpt) is not None
    assert len(dns.resolver.queries) == asked


def test_check_without_mail_stage_decides_then(spf_filter: FilterFactory) -> None:
    # `milters test` and a MAIL stage that failed: the end-of-message check still reports
    verdict = spf_filter().check(transaction("a@sender.example"))
    assert spf_result(verdict).result == "pass"


# -- what the client said cannot forge a result ------------------------------------------

def test_helo_and_sender_cannot_end_the_ar_property(spf_filter: FilterFactory) -> None:
    _, verdict = run(spf_filter(helo_reject="never", mail_from_reject="never"),
                     transaction('"x;dkim=pass"@sender.example', helo="x;dkim=pass"))
    (result,) = verdict.results
    assert result.properties == (
        ("smtp", "mailfrom", '"\\"x;dkim=pass\\"@sender.example"'),
        ("smtp", "helo", '"x;dkim=pass"'),
    )


def test_received_spf_comment_stays_one_comment(dns: LoopbackDNS) -> None:
    env = Env(GlobalSettings(dns=DnsSettings(nameservers=(dns.address,), port=dns.port)))
    outcome = check_host(OTHER, '"a)b"@sender.example', HELO, env.resolver)
    value = received_spf(outcome, OTHER, HELO, '"a)b"@sender.example', "mx.example")
    assert '"a\\)b"@sender.example' in value
    assert 'envelope-from="\\"a)b\\"@sender.example";' in " ".join(value.split())


@pytest.mark.parametrize(("mail_from", "helo", "identity"), [
    ("alice@sender\udcff.example", HELO, "mailfrom"),  # 8-bit junk in the domain
    ("", "mail\udcff\udcfe.example", "helo"),  # null sender, junk HELO
    ("alice@xn--\udcff.example", HELO, "mailfrom"),
    ("alice@" + "a" * 64 + ".example", HELO, "mailfrom"),  # a label over 63 octets
])
def test_malformed_domain_is_none(spf_filter: FilterFactory, dns: LoopbackDNS,
                                  mail_from: str, helo: str, identity: str) -> None:
    """Issue 9: invalid UTF-8 in MAIL FROM or HELO (surrogate escapes from the adapter).
    RFC 7208 §4.3: a malformed domain gives "none" at once, no DNS query, no exception;
    what is reported can be written in a header field."""
    dns.resolver.queries.clear()
    refusal, verdict = run(spf_filter(helo_reject="never"), transaction(mail_from, helo=helo))
    assert refusal is None
    result = spf_result(verdict)
    assert result.result == "none"
    for _, _, value in result.properties:
        value.encode("utf-8")  # no surrogates left: a header field can carry it
        assert "\udcff" not in value
    outcome = check_host(CLIENT, mail_from, helo, spf_filter().env.resolver)
    assert (outcome.result, outcome.identity) == ("none", identity)
    # Nothing about the malformed name was asked in DNS (the HELO name may be).
    assert all(name.rstrip(".") in (HELO, "") for name, _ in dns.resolver.queries), \
        dns.resolver.queries
