"""One rule for every domain list in the config, as in Postfix access tables.

`example.com` is that domain only; `.example.com` is its sub-domains only (not
example.com itself: list both for both). Case and a trailing root dot do not
count. Used by [global] bypass_recipients, [dkim] ignore_domains and [dmarc]
never_reject_domains / always_check_domains, so one entry means one thing
wherever it is written.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


def normalize(domain: str) -> str:
    """Lower case, no surrounding space, no trailing root dot."""
    return domain.strip().lower().rstrip(".")


@dataclass(frozen=True)
class DomainList:
    exact: frozenset[str]
    suffixes: tuple[str, ...]  # ".example.com": its sub-domains

    @classmethod
    def of(cls, entries: Iterable[str]) -> DomainList:
        exact: set[str] = set()
        suffixes: list[str] = []
        for entry in entries:
            e = normalize(entry)
            if e.startswith(".") and len(e) > 1:
                suffixes.append(e)
            elif e and not e.startswith("."):
                exact.add(e)
        return cls(frozenset(exact), tuple(suffixes))

    def __contains__(self, domain: object) -> bool:
        if not isinstance(domain, str):
            return False
        d = normalize(domain)
        return d in self.exact or (bool(self.suffixes) and d.endswith(self.suffixes))

    def __bool__(self) -> bool:
        return bool(self.exact or self.suffixes)
