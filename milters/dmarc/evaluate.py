"""DMARC evaluation (RFC 9989) as plain functions: Author Domain, policy discovery,
Organizational Domains, identifier alignment, the result and the disposition.

Policy discovery is the RFC 9989 (DNS Tree Walk) DNS Tree Walk (at most 8 queries, a
`psd=` record ends the search for an Organizational Domain), or, by a setting,
the RFC 7489 §3.2 Public Suffix List method with the list of the maintained
`publicsuffixlist` package (no download at run time). Lookups go through a
small per-message memo on top of the shared resolver, so a domain walked for the
policy is not asked again for alignment.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from types import MappingProxyType
from typing import Literal, Protocol

from publicsuffixlist import PublicSuffixList

from milters.core.addresses import parse_address_list, salvage_domains
from milters.core.errors import PermError, TempError
from milters.core.model import Header
from milters.dmarc.record import DmarcRecord, UnusableRecord, is_dmarc, parse_record

Discovery = Literal["treewalk", "psl"]

# The dmarc results of RFC 8601 §2.7 / RFC 9989
PASS, FAIL, NONE, TEMPERROR, PERMERROR = "pass", "fail", "none", "temperror", "permerror"

# RFC 9989 (DNS Tree Walk): a Tree Walk never takes more than eight queries.
MAX_TREE_WALK_QUERIES = 8
# RFC 9989 §11.5: evaluating many Author Domains is a denial-of-service risk;
# "limiting the number of Author Domains processed will avoid this risk".
MAX_AUTHOR_DOMAINS = 10
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


class DnsLookup(Protocol):
    """What evaluation needs of the shared resolver (milters.core.resolver.Resolver)."""

    def txt(self, name: str) -> list[bytes]: ...

    def query(self, name: str, rdtype: str) -> Sequence[object]: ...


class BadFrom(PermError):
    """the message has no single RFC5322.From address (RFC 9989 (alignment))"""


class MultipleRecords(PermError):
    """more than one DMARC record at one name: no DMARC processing (RFC 7489 §6.6.3)"""


@dataclass(frozen=True)
class DkimInput:
    """One DKIM signature's result, as evaluation needs it."""

    result: str
    domain: str
    selector: str = ""


@dataclass(frozen=True)
class SpfInput:
    """The SPF result for the MAIL FROM identity: RFC 9989 §3.2.4 "relies solely on SPF
    validation of the MAIL FROM identity", which for a null reverse-path is
    postmaster@HELO (RFC 7208 §2.4), so `domain` is then the HELO name."""

    result: str
    domain: str


@dataclass(frozen=True)
class PolicyFound:
    domain: str  # where the record is (the policy domain)
    record: DmarcRecord
    policy: str  # p, sp or np as it applies to the Author Domain


@dataclass(frozen=True)
class Evaluation:
    """The DMARC outcome for one message."""

    result: str
    header_from_domain: str
    reason: str = ""
    policy_domain: str = ""
    record: DmarcRecord | None = None
    policy: str = "none"  # what the record asks for this Author Domain
    disposition: str = "none"  # what the policy amounts to (t=y: one step less)
    dkim_aligned: bool = False
    spf_aligned: bool = False
    discovery: Discovery = "treewalk"
    queries: int = 0

    @property
    def testing(self) -> bool:
        return self.record is not None and self.record.t


# -- the Author Domain --------------------------------------------------------------


def normalize_domain(domain: str) -> str:
    """Lower-case A-label form of a domain; PermError when it is not a host name."""
    d = domain.strip().rstrip(".").lower()
    if not d or d.startswith("["):
        raise PermError(f"not a domain name: {domain[:80]!r}")
    try:
        ascii_ = d if d.isascii() else d.encode("idna").decode("ascii")
    except UnicodeError:
        raise PermError(f"not a valid IDN domain: {domain[:80]!r}") from None
    labels = ascii_.split(".")
    if len(ascii_) > 253 or len(labels) < 2 or not all(_LABEL.match(x) for x in labels):
        raise PermError(f"not a domain name: {domain[:80]!r}")
    return ascii_


@dataclass(frozen=True)
class AuthorDomains:
    """The Author Domains of a message (RFC 9989 §5.3.1) and what is wrong with its From.

    `domains`: distinct, normalized, in order, at most MAX_AUTHOR_DOMAINS.
    `problem`: "" when the From fields were readable and every address had a usable
    domain; otherwise why not (no From, an unparseable field, an address whose domain
    is not a host name, too many domains). `fields`: how many From fields there were.
    """

    domains: tuple[str, ...]
    problem: str = ""
    fields: int = 1

    @property
    def single(self) -> bool:
        """One From field, one Author Domain, nothing wrong: the case RFC 9989 covers."""
        return self.fields == 1 and len(self.domains) == 1 and not self.problem


def author_domains(headers: Sequence[Header]) -> AuthorDomains:
    """Every Author Domain in the RFC5322.From fields, never an exception.

    A field the grammar refuses (core/addresses.py: too deep, too long, malformed)
    still gives the domains that appear in it after an `@` (salvage_domains), with
    `problem` set: a reader's program may show such an address, and RFC 9989 §11.5
    warns that a From that escapes DMARC processing is how a spoof gets through.
    """
    values = [h.value for h in headers if h.name.lower() == "from"]
    if not values:
        return AuthorDomains((), "no From field", 0)
    problems: list[str] = []
    if len(values) > 1:
        problems.append(f"{len(values)} From fields (RFC 5322 §3.6 allows one)")
    found: dict[str, None] = {}
    for raw in values:
        # Header values are bytes; 8-bit junk stays as surrogate escapes, which no
        # domain check accepts (normalize_domain), and never raises here.
        text = raw.decode("utf-8", "surrogateescape")
        parsed = parse_address_list(text)
        if parsed.ok:
            candidates = parsed.domains
            if not candidates:
                problems.append("From without an address")
        else:
            problems.append(f"unparseable From: {parsed.error}")
            candidates = salvage_domains(text, MAX_AUTHOR_DOMAINS + 1)
        for candidate in candidates:
            try:
                found.setdefault(normalize_domain(candidate), None)
            except PermError as exc:
                problems.append(str(exc))
    domains = tuple(found)
    if len(domains) > MAX_AUTHOR_DOMAINS:
        problems.append(f"more than {MAX_AUTHOR_DOMAINS} From domains")
        domains = domains[:MAX_AUTHOR_DOMAINS]
    # The problem text may be logged and written in an AR comment: keep it printable.
    problem = "; ".join(problems).encode("ascii", "backslashreplace").decode("ascii")
    return AuthorDomains(domains, problem[:200], len(values))


def header_from_domain(headers: Sequence[Header]) -> str:
    """The single Author Domain; BadFrom unless one From field whose addresses all have
    that one, valid domain (RFC 9989 §5.3.1)."""
    authors = author_domains(headers)
    if not authors.single:
        raise BadFrom(authors.problem or f"{len(authors.domains)} From domains")
    return authors.domains[0]


# -- lookups --------------------------------------------------------------------------


@lru_cache(maxsize=1)
def public_suffix_list() -> PublicSuffixList:
    """The list shipped with the publicsuffixlist package, loaded once."""
    return PublicSuffixList()


@dataclass
class Lookups:
    """DNS for one evaluation: the shared resolver plus a memo of what was asked."""

    dns: DnsLookup
    discovery: Discovery = "treewalk"
    records: dict[str, list[bytes]] = field(default_factory=dict)
    orgs: dict[str, str] = field(default_factory=dict)
    queries: int = 0

    def dmarc_txt(self, domain: str) -> list[bytes]:
        """The TXT values at _dmarc.DOMAIN that start with v=DMARC1 (RFC 9989 (DNS Tree Walk))."""
        if domain not in self.records:
            self.queries += 1
            self.records[domain] = [t for t in self.dns.txt(f"_dmarc.{domain}") if is_dmarc(t)]
        return self.records[domain]

    def record_at(self, domain: str) -> DmarcRecord | None:
        """The one valid record at a name, else None (for Organizational Domain walks)."""
        found = self.dmarc_txt(domain)
        if len(found) != 1:
            return None
        try:
            return parse_record(found[0])
        except PermError:
            return None

    def exists(self, domain: str) -> bool:
        """RFC 9989 (non-existent domain): NXDOMAIN or NODATA for A, AAAA and MX."""
        return any(self.dns.query(domain, t) for t in ("A", "AAAA", "MX"))

    def org_domain(self, domain: str) -> str:
        if domain not in self.orgs:
            if self.discovery == "psl":
                self.orgs[domain] = public_suffix_list().privatesuffix(domain) or domain
            else:
                self.orgs[domain] = self._org_by_tree_walk(domain)
        return self.orgs[domain]

    def _org_by_tree_walk(self, domain: str) -> str:
        """RFC 9989 (Organizational Domain): psd=n is the Organizational Domain, psd=y makes it the
        name one label below, else the record with the fewest labels; none: itself."""
        labels = domain.split(".")
        fewest = ""
        for name in tree_walk_names(domain):
            record = self.record_at(name)
            if record is None:
                continue
            if record.psd == "n":
                return name
            if record.psd == "y" and name != domain:
                return ".".join(labels[-(name.count(".") + 2):])
            fewest = name
        return fewest or domain


def tree_walk_names(domain: str) -> list[str]:
    """The names a Tree Walk asks, in order (RFC 9989 (DNS Tree Walk)): the domain itself,
    then at most seven labels, then one label fewer each time; eight at most."""
    labels = domain.split(".")
    names = [domain]
    for n in range(min(len(labels) - 1, MAX_TREE_WALK_QUERIES - 1), 0, -1):
        names.append(".".join(labels[-n:]))
    return names


def discover_policy(author: str, lk: Lookups) -> PolicyFound | None:
    """The DMARC Policy Record for the Author Domain, and which of p/sp/np applies.

    Raises TempError (DNS), MultipleRecords, or PermError (an unusable record).
    """
    if lk.discovery == "psl":
        org = lk.org_domain(author)
        names = [author] if org == author else [author, org]
    else:
        names = tree_walk_names(author)
    for name in names:
        found = lk.dmarc_txt(name)
        if not found:
            continue
        if len(found) > 1:
            raise MultipleRecords(f"{len(found)} DMARC records at _dmarc.{name}")
        record = parse_record(found[0])
        if name == author:
            policy = record.p
        elif record.np and not lk.exists(author):
            policy = record.nonexistent_policy
        else:
            policy = record.subdomain_policy
        return PolicyFound(name, record, policy)
    return None


# -- alignment and the result ------------------------------------------------------------


def aligned(author: str, domain: str, mode: str, lk: Lookups) -> bool:
    """RFC 9989 (alignment): strict is the same name; relaxed, the same Organizational Domain."""
    try:
        d = normalize_domain(domain)
    except PermError:
        return False
    if d == author:
        return True
    if mode == "s":
        return False
    # Cheap refusal first: relaxed alignment needs a common parent domain.
    if author.rsplit(".", 1)[-1] != d.rsplit(".", 1)[-1]:
        return False
    return lk.org_domain(d) == lk.org_domain(author)


def disposition_for(policy: str, testing: bool) -> str:
    """RFC 9989 (policy record) t=y: apply one step less than the policy (reject -> quarantine)."""
    if not testing:
        return policy
    return {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")


def evaluate(author: str, dkim: Sequence[DkimInput], spf: SpfInput | None,
             dns: DnsLookup, discovery: Discovery = "treewalk") -> Evaluation:
    """The DMARC result for a message from `author` (already normalized)."""
    lk = Lookups(dns, discovery)
    try:
        found = discover_policy(author, lk)
    except TempError as exc:
        return Evaluation(TEMPERROR, author, str(exc), discovery=discovery, queries=lk.queries)
    except (MultipleRecords, UnusableRecord) as exc:
        # RFC 9989 §4.10.1: no usable record, "no DMARC processing": no policy.
        return Evaluation(NONE, author, str(exc), discovery=discovery, queries=lk.queries)
    except PermError as exc:
        return Evaluation(PERMERROR, author, str(exc), discovery=discovery, queries=lk.queries)
    if found is None:
        return Evaluation(NONE, author, "no DMARC record", discovery=discovery,
                          queries=lk.queries)
    record = found.record
    try:
        dkim_ok = any(s.result == PASS and aligned(author, s.domain, record.adkim, lk)
                      for s in dkim)
        spf_ok = (spf is not None and spf.result == PASS
                  and aligned(author, spf.domain, record.aspf, lk))
    except TempError as exc:
        return Evaluation(TEMPERROR, author, str(exc), found.domain, record, found.policy,
                          discovery=discovery, queries=lk.queries)
    if dkim_ok or spf_ok:
        return Evaluation(PASS, author, "aligned " + ("dkim" if dkim_ok else "spf"),
                          found.domain, record, found.policy, "none", dkim_ok, spf_ok,
                          discovery, lk.queries)
    return Evaluation(FAIL, author, "no aligned dkim or spf pass", found.domain, record,
                      found.policy, disposition_for(found.policy, record.t), False, False,
                      discovery, lk.queries)


# -- several Author Domains --------------------------------------------------------------

# Worst first: a failure (under the strictest disposition) outranks every other result,
# and nothing short of every domain passing is reported as a pass.
_SEVERITY = MappingProxyType({PASS: 0, NONE: 1, PERMERROR: 2, TEMPERROR: 3, FAIL: 4})
_STRICTNESS = MappingProxyType({"none": 0, "quarantine": 1, "reject": 2})


def strictest(evaluations: Sequence[Evaluation]) -> Evaluation:
    """The evaluation that decides for a message with several Author Domains: a failure
    with the strictest disposition (then policy), else the worst result."""
    return max(evaluations, key=lambda e: (_SEVERITY.get(e.result, 2),
                                           _STRICTNESS.get(e.disposition, 0),
                                           _STRICTNESS.get(e.policy, 0)))


def evaluate_authors(authors: AuthorDomains, dkim: Sequence[DkimInput],
                     spf: SpfInput | None, dns: DnsLookup,
                     discovery: Discovery = "treewalk") -> Evaluation:
    """DMARC for every Author Domain of a message; the strictest outcome decides.

    RFC 9989 §5.3.1 puts a From with several domains outside the protocol but lets a
    receiver go on ("MAY choose to go forward with DMARC validation anyway"), and
    §11.5 recommends, after RFC 7489 §6.6.1, to "apply the DMARC mechanism to each
    domain found in the RFC5322.From field as the Author Domain and apply the most
    strict policy selected among the checks that fail": so a `p=reject` domain that
    fails is refused even when another address was added beside it. Several
    addresses of one domain are that domain (as OpenDMARC does). A From with a
    problem (unparseable, two fields, a bad address) is never reported as better
    than permerror, though a failing policy among its domains still applies.
    Needs at least one domain.
    """
    if not authors.domains:
        raise BadFrom(authors.problem or "no Author Domain")
    evaluations = [evaluate(d, dkim, spf, dns, discovery) for d in authors.domains]
    ev = strictest(evaluations)
    if len(evaluations) > 1:
        ev = replace(ev, reason=f"{len(evaluations)} From domains, strictest: {ev.reason}")
    if authors.problem and _SEVERITY[ev.result] < _SEVERITY[PERMERROR]:
        return Evaluation(PERMERROR, ev.header_from_domain, authors.problem,
                          discovery=discovery, queries=sum(e.queries for e in evaluations))
    return ev
