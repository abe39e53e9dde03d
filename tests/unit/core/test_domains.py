"""One rule for domain lists (core/domains.py), the same wherever a list is read."""

from __future__ import annotations

from milters.core.dkim_verify import ignored
from milters.core.domains import DomainList
from milters.core.policy import is_bypassed
from milters.dmarc.filter import listed

ENTRIES = ("Example.COM.", ".sub.example.org")
CASES = {
    "example.com": True, "EXAMPLE.com.": True, "mail.example.com": False,
    "sub.example.org": False, "a.sub.example.org": True, "b.a.sub.example.org": True,
    "notsub.example.org": False, "example.org": False, "": False,
}


def test_the_rule() -> None:
    domains = DomainList.of(ENTRIES)
    assert {d: d in domains for d in CASES} == CASES
    assert not DomainList.of(()) and not DomainList.of(("", "."))


def test_every_list_follows_it() -> None:
    for domain, expected in CASES.items():
        assert listed(domain, ENTRIES) is expected, domain
        assert ignored(domain, ENTRIES) is expected, domain
        if domain:
            assert is_bypassed(f"user@{domain}", ENTRIES) is expected, domain
