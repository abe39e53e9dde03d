"""SPF evaluation (RFC 7208) through the suite's resolver: a plain function of the inputs.

pyspf does the record parsing, macro expansion and the processing limits
(10 DNS-querying terms and 2 void lookups, RFC 7208 §4.6.4); its DNS goes through
module-level functions, so `_Query` overrides the one method every lookup passes
through (`query.dns`) and sends it to our Resolver. Nothing module-wide is
replaced: each evaluation carries its own resolver, so libmilter's threads can
evaluate at once. The `spf` filter and the `dmarc` filter's self-validation
both call `check_host`; neither knows pymilter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import spf

from milters.core.errors import TempError
from milters.core.resolver import Resolver

RESULTS = ("none", "neutral", "pass", "fail", "softfail", "temperror", "permerror")

# RFC 7208 §4.6.4: "at least 20 seconds" for the whole evaluation; each lookup
# is bounded by the resolver's own timeout as well.
OVERALL_TIMEOUT = 20.0

# The record types pyspf asks for, and how it wants each answer.
_QTYPES = frozenset({"A", "AAAA", "MX", "PTR", "TXT", "SPF"})


@dataclass(frozen=True)
class SpfOutcome:
    """The result of one check_host() (RFC 7208 §2.6) and what it was about."""

    result: str  # one of RESULTS
    identity: str  # "mailfrom" or "helo"
    domain: str  # MAIL FROM's domain, or the HELO name
    sender: str  # the MAIL FROM address, or postmaster@HELO
    explanation: str  # exp= text or the library's reason
    mechanism: str = ""  # the term that matched, when one did
    problem: str = ""  # for permerror/temperror: what went wrong


class _Query(spf.query):  # type: ignore[misc]  # pyspf has no type hints
    """A pyspf query whose DNS lookups go through one of our Resolvers."""

    def __init__(self, resolver: Resolver, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._resolver = resolver
        self._deadline = time.monotonic() + OVERALL_TIMEOUT

    def dns(self, name: object, qtype: str, cnames: object = None,
            ignore_void: bool = False) -> list[Any]:
        """Records of `qtype` at `name` in pyspf's shapes; counts void lookups.

        Replaces pyspf's `query.dns` (same contract): answers are cached for
        the life of this query, an empty answer counts towards the void lookup
        limit unless `ignore_void`. dnspython follows CNAMEs itself.
        """
        text = str(name).rstrip(".").lower()
        if not _is_dns_name(text):
            return []  # not a valid DNS name (a macro may expand to 8-bit junk): nothing to find
        key = (text, qtype)
        cached: list[Any] = self.cache.get(key, [])
        if cached:
            return cached
        result = self._lookup(text, qtype)
        self.cache[key] = result
        if not result and not ignore_void:
            # RFC 7208 §4.6.4: more than two void lookups is a permerror
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result

    def validated_ptrs(self) -> list[str]:
        """The client's validated names (ptr mechanism, %{p}), RFC 7208 §5.5.

        Unlike pyspf's own, a DNS error skips the name it concerns ("If a DNS
        error occurs while doing an A RR lookup, then that domain name is
        skipped"), and an error on the PTR lookup is no match, not a temperror.
        """
        try:
            names = self.dns_ptr(self.i)[:spf.MAX_PTR]
        except spf.TempError:
            return []
        validated = []
        for name in names:
            try:
                if self.cidrmatch(self.dns_a(name, self.A), self.cidrmax):
                    validated.append(name)
            except spf.TempError:
                continue
        return validated

    def _lookup(self, name: str, qtype: str) -> list[Any]:
        if qtype not in _QTYPES:
            raise spf.PermError(f"unexpected DNS query type {qtype}")
        if time.monotonic() > self._deadline:
            raise spf.TempError(f"SPF evaluation took longer than {OVERALL_TIMEOUT:g} s")
        try:
            records = self._resolver.query(name, qtype)
        except TempError as exc:
            raise spf.TempError(str(exc)) from None
        out: list[Any] = []
        for rdata in records:
            if qtype in ("A", "AAAA"):
                out.append(rdata.address)  # type: ignore[attr-defined]
            elif qtype == "MX":
                out.append((rdata.preference,  # type: ignore[attr-defined]
                            rdata.exchange.to_text()))  # type: ignore[attr-defined]
            elif qtype == "PTR":
                out.append(rdata.target.to_text(omit_final_dot=True))  # type: ignore[attr-defined]
            else:  # TXT, SPF: the strings of one record, joined by pyspf
                out.append(tuple(rdata.strings))  # type: ignore[attr-defined]
        return out


def check_host(ip: str, sender: str, helo: str, resolver: Resolver,
               receiver: str = "unknown") -> SpfOutcome:
    """RFC 7208 §4 for the MAIL FROM identity; the HELO identity when `sender` is null.

    `sender` is the MAIL FROM address without angle brackets ("" for <>); a
    sender without a local part is checked as postmaster@domain (§4.3).
    `receiver` is what the %{r} macro expands to.
    """
    if not sender:
        return check_helo(ip, helo, resolver, receiver)
    domain = sender.rpartition("@")[2].rstrip(".")
    if not _is_domain(domain) or not _is_dns_name(domain):
        # RFC 7208 §4.3: a malformed <domain> (bad labels, not multi-label, or
        # bytes that were not UTF-8: the adapter keeps them as surrogate escapes)
        # makes check_host() return "none" at once, before any DNS query.
        return SpfOutcome("none", "mailfrom", domain, sender,
                          "MAIL FROM domain is not a valid domain name")
    return _evaluate(ip, sender, helo, resolver, receiver)


def check_helo(ip: str, helo: str, resolver: Resolver,
               receiver: str = "unknown") -> SpfOutcome:
    """RFC 7208 §2.3: check_host() of the HELO name, as postmaster@HELO."""
    name = helo.strip().rstrip(".")
    if not _is_domain(name) or not _is_dns_name(name):
        # §2.3/§4.3: an address literal or a name that is not a FQDN has no SPF
        return SpfOutcome("none", "helo", name, f"postmaster@{name}" if name else "",
                          "HELO name is not a domain name")
    return _evaluate(ip, "", name, resolver, receiver)


def _evaluate(ip: str, sender: str, helo: str, resolver: Resolver,
              receiver: str) -> SpfOutcome:
    query = _Query(resolver, i=ip, s=sender, h=helo, receiver=receiver, strict=True)
    result, _code, explanation = query.check()
    if result not in RESULTS:  # "ambiguous" exists only with strict=2
        result = "permerror"
    problem = str(query.prob) if result in ("permerror", "temperror") and \
        getattr(query, "prob", None) else ""
    return SpfOutcome(
        result=result,
        identity=str(query.ident),
        domain=str(query.o),
        sender=str(query.s),
        explanation=str(explanation),
        mechanism=str(query.mechanism or ""),
        problem=problem,
    )


def _is_domain(name: str) -> bool:
    """A multi-label domain name with labels of 1 to 63 characters, not an address literal."""
    if not name or name.startswith("[") or "." not in name:
        return False
    return all(0 < len(label) < 64 for label in name.split("."))


def _is_dns_name(name: str) -> bool:
    """Can `name` be asked in DNS: ASCII labels of 1 to 63 octets (an IDN in its
    A-label form), 253 octets in all. A U-label name is converted to see; a name
    with surrogate-escaped bytes (invalid UTF-8 on the wire) never converts."""
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return False
    labels = name.split(".")
    return len(name) <= 253 and all(0 < len(label) < 64 and label.isprintable()
                                    for label in labels)
