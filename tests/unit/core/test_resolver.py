"""The shared resolver against a DNS server on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from milters.core.config import DnsSettings
from milters.core.errors import TempError
from milters.core.resolver import Resolver
from tests.support.dns import LoopbackDNS, dns_server


@pytest.fixture(scope="module")
def dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        yield server


@pytest.fixture
def resolver(dns: LoopbackDNS) -> Resolver:
    dns.clear()
    return Resolver(DnsSettings(nameservers=("127.0.0.1",), port=dns.port, timeout=1.0))


def test_txt_joins_strings_of_long_records(dns: LoopbackDNS, resolver: Resolver) -> None:
    value = "v=DKIM1; k=rsa; p=" + "A" * 400
    dns.txt("sel._domainkey.example.com", value)
    assert resolver.txt("sel._domainkey.example.com") == [value.encode()]
    assert resolver.dkim_dnsfunc(b"sel._domainkey.example.com.") == value.encode()


def test_missing_name_is_empty_not_an_error(resolver: Resolver) -> None:
    assert resolver.txt("nothing.example.com") == []
    assert resolver.dkim_dnsfunc("nothing.example.com.") is None


def test_several_records(dns: LoopbackDNS, resolver: Resolver) -> None:
    dns.txt("example.org", "v=spf1 -all")
    dns.txt("example.org", "other")
    assert sorted(resolver.txt("example.org")) == [b"other", b"v=spf1 -all"]
    dns.a("mx.example.org", "192.0.2.25")
    assert [r.to_text() for r in resolver.query("mx.example.org", "A")] == ["192.0.2.25"]


def test_timeout_is_temperror(dns: LoopbackDNS) -> None:
    dns.clear()
    dns.txt("slow.example", "x")
    dns.set_delay(1.5)
    r = Resolver(DnsSettings(nameservers=("127.0.0.1",), port=dns.port, timeout=0.3))
    with pytest.raises(TempError, match="timed out"):
        r.txt("slow.example")
    dns.set_delay(0)


def test_servfail_is_temperror(dns: LoopbackDNS, resolver: Resolver) -> None:
    dns.set_fail(True)
    with pytest.raises(TempError):
        resolver.txt("fail.example")
    dns.set_fail(False)


@pytest.mark.parametrize("name", [
    "a" * 64 + ".example.com",                 # LabelTooLong
    "a..example.com",                          # EmptyLabel
    ".".join(["abcdefghij" * 6] * 5),          # NameTooLong
    "exa\\mple.com\\",                         # BadEscape
    "ex\udcffample.com",                       # not encodable
])
def test_name_that_cannot_exist_is_empty_not_temperror(dns: LoopbackDNS,
                                                       resolver: Resolver, name: str) -> None:
    # Even with the server failing, a name that cannot be a DNS name is never asked
    # for and is a permanent "no such name", not a temperror to retry.
    dns.set_fail(True)
    try:
        assert resolver.txt(name) == []
        assert resolver.query(name, "A") == []
    finally:
        dns.set_fail(False)


def test_a_positive_answer_is_served_from_memory_until_it_expires(
        dns: LoopbackDNS, resolver: Resolver, monkeypatch: pytest.MonkeyPatch) -> None:
    dns.txt("cached.example", "v=spf1 -all")
    assert resolver.txt("CACHED.example") == [b"v=spf1 -all"]
    asked = len(dns.resolver.queries)
    assert resolver.txt("cached.example") == [b"v=spf1 -all"]  # case folded, one entry
    assert len(dns.resolver.queries) == asked
    # Past the record's TTL (60 s here) the server is asked again.
    later = time.time() + 61
    monkeypatch.setattr("milters.core.resolver.time.time", lambda: later)
    dns.clear()
    assert resolver.txt("cached.example") == []


def test_a_failure_is_not_remembered(dns: LoopbackDNS, resolver: Resolver) -> None:
    dns.set_fail(True)
    with pytest.raises(TempError):
        resolver.txt("failing.example")
    dns.set_fail(False)
    dns.txt("failing.example", "fine")
    assert resolver.txt("failing.example") == [b"fine"]


@pytest.mark.parametrize("exists", [False, True], ids=["nxdomain", "no-such-type"])
def test_a_negative_answer_is_kept_as_long_as_dnspython_keeps_it(
        dns: LoopbackDNS, resolver: Resolver, monkeypatch: pytest.MonkeyPatch,
        exists: bool) -> None:
    if exists:
        dns.a("negative.example", "192.0.2.1")  # the name exists, without TXT
    assert resolver.txt("negative.example") == []
    asked = len(dns.resolver.queries)
    dns.txt("negative.example", "v=DMARC1; p=none")
    # Within the negative TTL (the test server sends no SOA: dnspython's 300 s)
    # the answer comes from memory, as it would from dnspython's cache.
    assert resolver.txt("negative.example") == []
    assert len(dns.resolver.queries) == asked
    later = time.time() + 301
    monkeypatch.setattr("milters.core.resolver.time.time", lambda: later)
    assert resolver.txt("negative.example") == [b"v=DMARC1; p=none"]
    assert len(dns.resolver.queries) == asked + 1
