"""ARC (RFC 8617): reading a message's ARC sets, validating the chain, sealing a new set.

The cryptography is dkimpy's (`dkim.ARC`); this module decides what dkimpy is
given and what its answer means. It lives in core because two filters need it:
dkim (validation, and sealing in its signing step) and dmarc (the sealers and the
oldest ARC-Authentication-Results, for trusted-forwarder overrides; and
validation when no trusted arc= result is present).

Hostile input is answered with arc=fail, never an exception. Before dkimpy sees
a chain, `read_chain` checks its form (RFC 8617 §4.2.1, §5.2 step 2): every ARC
field has one instance number, 1 to 50, that dkimpy reads the same way; each
instance has exactly one field of each kind and the instances run 1..N without
a gap; tags are well formed. It also keeps dkimpy's slow paths away: runs of
white space that its b= regexp backtracks on quadratically, h= lists that make
its header selection walk the header thousands of times, and (for the body) its
relaxed canonicalization, quadratic on long runs of white space, replaced by our
linear one when every ARC-Message-Signature uses relaxed body canonicalization
(relaxed canonicalization is idempotent, so dkimpy hashes the same bytes).
"""

from __future__ import annotations

import binascii
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import authres
import dkim
import dkim.canonicalization
import nacl.exceptions

from milters.core import authresults
from milters.core.dkim_verify import (
    DNS_BUDGET,
    MAX_SIGNED_FIELDS,
    DkimHeader,
    TxtLookup,
    budgeted,
    canonicalize_body,
    is_domain_name,
    signed_fields_or_none,
    tags_or_none,
)
from milters.core.errors import TempError
from milters.core.verdict import AuthResult

log = logging.getLogger(__name__)

PASS, FAIL, NONE = "pass", "fail", "none"  # RFC 8617 §7.2: the arc= results

SEAL, SIGNATURE, RESULTS = "arc-seal", "arc-message-signature", "arc-authentication-results"
KINDS = (SEAL, SIGNATURE, RESULTS)
# RFC 8617 §4.2.1: instance values are 1 to 50; a chain over 50 fails (§5.1.1).
MAX_INSTANCE = 50
# White space runs in an ARC field: folding is CRLF and a space or two. Longer runs
# only serve to make dkimpy's RE_BTAG backtrack (quadratic: 40,000 bytes, 9 s).
MAX_WSP_RUN = 256
# Field names in all ARC-Message-Signatures together (dkimpy walks the header once
# per name): 50 hops of 20 names each.
MAX_SIGNED_TOTAL = 1024
# A body white space run dkimpy's relaxed canonicalization may meet (only when
# simple and relaxed ARC-Message-Signatures are mixed and ours cannot stand in).
MAX_BODY_WSP_RUN = 1024

_INSTANCE = re.compile(rb"\s*i\s*=\s*([0-9]{1,2})\s*;", re.IGNORECASE)
_WSP_RUN = re.compile(rb"[ \t\r\n]+")
_BODY_WSP_RUN = re.compile(rb"[ \t]+")

# Errors of dkimpy and the libraries under it on hostile input that are not its own
# DKIMException (as in dkim_verify): a chain that raises them fails, nothing more.
_INPUT_ERRORS = (ValueError, IndexError, KeyError, TypeError, UnicodeError, RecursionError,
                 OverflowError, binascii.Error, nacl.exceptions.CryptoError)


@dataclass(frozen=True)
class ArcSet:
    """One instance's three fields, as received (value bytes after the colon)."""

    instance: int
    seal: bytes
    signature: bytes
    results: bytes
    sealer: str  # the ARC-Seal's d=
    selector: str  # the ARC-Seal's s=

    def results_field(self) -> authresults.ArField | None:
        """The ARC-Authentication-Results payload read as an Authentication-Results
        value (RFC 8617 §4.1.1: `i=N;` then the authserv-id and results)."""
        m = _INSTANCE.match(self.results)
        return authresults.read_field(self.results[m.end():]) if m else None


@dataclass(frozen=True)
class Chain:
    """A message's ARC sets, oldest first; `problem` says why the form is invalid."""

    sets: tuple[ArcSet, ...] = ()
    problem: str = ""
    signed_names: frozenset[bytes] = frozenset()  # every h= name of every AMS
    body_algorithms: frozenset[bytes] = frozenset()  # the AMS body canonicalizations

    @property
    def sealers(self) -> tuple[str, ...]:
        return tuple(s.sealer for s in self.sets)


def _dkimpy_instance(value: bytes) -> int | None:
    """The instance number as dkimpy's sorted_arc_headers reads it (relaxed value)."""
    relaxed = dkim.canonicalization.Relaxed.canonicalize_headers([(b"x", value)])[0][1]
    m = dkim.ARC.INSTANCE_RE.search(relaxed)
    if m is None:
        return None
    try:
        return int(m.group(1))
    except ValueError:
        return None


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace")


def read_chain(headers: Sequence[DkimHeader]) -> Chain:
    """The ARC sets of a message, checked for form (never an exception)."""
    found: dict[int, dict[str, bytes]] = {}
    count = 0
    for name, value in headers:
        kind = name.lower().decode("ascii", "replace")
        if kind not in KINDS:
            continue
        count += 1
        if count > 3 * MAX_INSTANCE:
            return Chain(problem=f"more than {3 * MAX_INSTANCE} ARC fields")
        if any(len(run) > MAX_WSP_RUN for run in _WSP_RUN.findall(value)):
            return Chain(problem=f"{name.decode('ascii', 'replace')}: white space run "
                                 f"over {MAX_WSP_RUN} bytes")
        if kind == RESULTS:
            m = _INSTANCE.match(value)
            instance = int(m.group(1)) if m else None
        else:
            tags = tags_or_none(value)
            i = tags.get(b"i") if tags is not None else None
            instance = int(i) if i is not None and re.fullmatch(rb"[0-9]{1,2}", i) else None
        if instance is None or not 1 <= instance <= MAX_INSTANCE:
            return Chain(problem=f"{kind}: no instance (i=) from 1 to {MAX_INSTANCE}")
        if _dkimpy_instance(value) != instance:
            return Chain(problem=f"{kind}: ambiguous instance (i=)")
        fields = found.setdefault(instance, {})
        if kind in fields:
            return Chain(problem=f"two {kind} fields for instance {instance}")
        fields[kind] = value
    if not found:
        return Chain()
    top = max(found)
    sets = []
    names: set[bytes] = set()
    total = 0
    bodies: set[bytes] = set()
    for instance in range(1, top + 1):
        fields = found.get(instance, {})
        if len(fields) != 3:
            return Chain(problem=f"ARC set {instance} is incomplete")
        seal = tags_or_none(fields[SEAL])
        sig = tags_or_none(fields[SIGNATURE])
        if seal is None or sig is None:
            return Chain(problem=f"ARC set {instance}: malformed tag-list")
        for tags, what in ((seal, "ARC-Seal"), (sig, "ARC-Message-Signature")):
            d, s = tags.get(b"d", b""), tags.get(b"s", b"")
            if not is_domain_name(d.rstrip(b".")) or not re.fullmatch(rb"[A-Za-z0-9_.-]{1,63}",
                                                                       s):
                return Chain(problem=f"{what} {instance}: d= or s= is not a name")
        if b"h" in seal:
            return Chain(problem=f"ARC-Seal {instance} has h=")  # RFC 8617 §4.1.3
        signed = signed_fields_or_none(sig.get(b"h", b""))
        if signed is None:
            return Chain(problem=f"ARC-Message-Signature {instance}: h= is malformed")
        total += len(signed)
        if len(signed) > MAX_SIGNED_FIELDS or total > MAX_SIGNED_TOTAL:
            return Chain(problem="ARC-Message-Signatures sign too many fields")
        names.update(signed)
        c = sig.get(b"c", b"relaxed/relaxed").strip().lower()
        header_c, _, body_c = c.partition(b"/")
        body_c = body_c or b"simple"
        if header_c not in (b"simple", b"relaxed") or body_c not in (b"simple", b"relaxed"):
            return Chain(problem=f"ARC-Message-Signature {instance}: unknown c=")
        bodies.add(body_c)
        sets.append(ArcSet(instance, fields[SEAL], fields[SIGNATURE], fields[RESULTS],
                           _text(seal[b"d"]).lower().rstrip("."), _text(seal[b"s"])))
    return Chain(tuple(sets), "", frozenset(names), frozenset(bodies))


@dataclass(frozen=True)
class ArcResult:
    """The chain validation status of a message and what a reader of it needs."""

    result: str  # pass, fail, none
    reason: str = ""
    oldest_pass: int | None = None  # RFC 8617 §5.2: 0 when every AMS validates
    chain: Chain = Chain()

    @property
    def sealers(self) -> tuple[str, ...]:
        return self.chain.sealers

    def auth_result(self, remote_ip: str) -> AuthResult:
        """arc=RESULT with the properties RFC 8617 §7.2 registers: smtp.remote-ip
        (the client that handed us the message) and header.oldest-pass."""
        props: list[tuple[str, str, str]] = []
        if self.result == PASS and self.oldest_pass is not None:
            props.append(("header", "oldest-pass", str(self.oldest_pass)))
        if remote_ip and self.result != NONE:
            props.append(("smtp", "remote-ip", remote_ip))
        reason = self.reason if self.result == FAIL else ""
        return AuthResult("arc", self.result, reason[:200], tuple(props))

    def describe(self) -> str:
        """`arc=pass as[2].d=lists.example as[1].d=fwd.example`, as OpenDMARC's
        aggregate reports write it, newest sealer first."""
        sealers = " ".join(f"as[{s.instance}].d={s.sealer}" for s in reversed(self.chain.sets))
        return f"arc={self.result} {sealers}".strip()


def _dnsfunc(lookup: TxtLookup) -> Callable[..., bytes | None]:
    """dkimpy's dnsfunc (name bytes with a final dot -> first TXT record or None) over
    our resolver; a TempError goes through dkimpy to us."""

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        records = lookup(text.rstrip("."))
        return records[0] if records else None

    return dnsfunc


def _body_for_dkimpy(chain: Chain, body: bytes) -> bytes | None:
    """The body to give dkimpy: our relaxed canonicalization when every AMS hashes
    the relaxed body (identical bytes after dkimpy's own pass, in linear time), the
    body itself when none does; None when both are mixed over a body dkimpy
    cannot canonicalize in bounded time."""
    if chain.body_algorithms == {b"relaxed"}:
        return canonicalize_body(b"relaxed", body)
    if b"relaxed" not in chain.body_algorithms:
        return body
    if max((len(r) for r in _BODY_WSP_RUN.findall(body)), default=0) > MAX_BODY_WSP_RUN:
        return None
    return body


def oldest_pass(results: Sequence[dict[str, object]]) -> int:
    """RFC 8617 §5.2 step 4: the instance of the oldest AMS that validates with every
    newer one, 0 when they all do. `results` is dkimpy's, newest first."""
    oldest = 0
    for r in results:
        if not r.get("ams-valid"):
            return oldest
        oldest = int(str(r.get("instance", 0)))
    return 0


def verify_chain(headers: Sequence[DkimHeader], body: bytes, lookup: TxtLookup,
                 min_key_bits: int = 1024, dns_budget: float = DNS_BUDGET) -> ArcResult:
    """Validate the ARC chain (RFC 8617 §5.2); never raises on what the message holds."""
    chain = read_chain(headers)
    if chain.problem:
        return ArcResult(FAIL, chain.problem, chain=Chain())
    if not chain.sets:
        return ArcResult(NONE)
    dkimpy_body = _body_for_dkimpy(chain, body)
    if dkimpy_body is None:
        return ArcResult(FAIL, "body white space run too long for mixed canonicalization",
                         chain=chain)
    # Only the fields a signature can cover: ARC's own and those named in an h=.
    # Others never change dkimpy's answer, and each costs a walk per signature.
    wanted = chain.signed_names | {k.encode() for k in KINDS}
    arc = dkim.ARC(minkey=min_key_bits)
    arc.headers = [[name, value] for name, value in headers if name.lower() in wanted]
    arc.body = dkimpy_body
    try:
        cv, results, reason = arc.verify(dnsfunc=_dnsfunc(budgeted(lookup, dns_budget)))
    except dkim.DKIMException as exc:
        return ArcResult(FAIL, f"{type(exc).__name__}: {exc}", chain=chain)
    except TempError as exc:
        # RFC 8617 has no temperror: a chain that cannot be validated now fails.
        return ArcResult(FAIL, f"key lookup failed: {exc}", chain=chain)
    except _INPUT_ERRORS as exc:
        log.info("arc: %s on malformed input: fail", type(exc).__name__)
        return ArcResult(FAIL, f"malformed ARC set ({type(exc).__name__})", chain=chain)
    text = reason if isinstance(reason, str) else str(reason)
    if cv == dkim.CV_Pass:
        return ArcResult(PASS, "", oldest_pass(results), chain)
    # dkimpy's None: an ARC-Seal said cv=fail (RFC 8617 §5.2 step 2: fail).
    return ArcResult(FAIL, text, chain=chain)


# -- sealing (RFC 8617 §5.1) ----------------------------------------------------------


class SealError(Exception):
    """No ARC set could be made for this message (the reason is for the log)."""


def seal(headers: Sequence[DkimHeader], body: bytes, our_results: Sequence[bytes],
         domain: str, selector: str, key_pem: bytes) -> list[tuple[str, str]]:
    """The next ARC set for a message, as (name, value) pairs in the order to put them
    on top (ARC-Seal first), values folded with "\\n " as the milter inserts them.

    `our_results` are the values of our own Authentication-Results fields: they make
    the ARC-Authentication-Results, and their arc= result the seal's cv= (none when
    there is no chain yet). dkimpy signs rsa-sha256, c=relaxed/relaxed; it is given
    our relaxed body (idempotent under its own canonicalization, linear in time).
    """
    if not our_results:
        raise SealError("no Authentication-Results of ours to seal")
    # dkimpy picks the fields whose authres-parsed id equals srv_id: give it ours only,
    # under the name it looks for, and the id as authres spells it.
    srv_id = _authres_id(our_results[0])
    signer = dkim.ARC()
    signer.headers = [[name, value] for name, value in headers
                      if name.lower() != authresults.FIELD_NAME.lower().encode()]
    signer.headers += [[authresults.FIELD_NAME.encode(), b" " + v.strip() + b"\r\n"]
                       for v in our_results]
    signer.body = canonicalize_body(b"relaxed", body)
    signed = signer.default_sign_headers()
    if len(signed) > MAX_SIGNED_FIELDS:
        # Thousands of To fields would make an h= (and a field) of that size.
        raise SealError(f"more than {MAX_SIGNED_FIELDS} fields to sign")
    try:
        fields = signer.sign(selector.encode(), domain.encode(), key_pem, srv_id.encode(),
                             include_headers=signed)
    except dkim.DKIMException as exc:
        raise SealError(f"{type(exc).__name__}: {exc}") from None
    if not fields:
        raise SealError("dkimpy made no set (an existing chain without an arc= result)")
    out = []
    for raw in fields:
        name, _, value = raw.decode("ascii").partition(":")
        out.append((name, value.strip().replace("\r\n", "\n")))
    return out


def _authres_id(value: bytes) -> str:
    try:
        parsed = authres.AuthenticationResultsHeader.parse(
            "Authentication-Results: " + value.decode("utf-8", "replace"))
    except authres.core.SyntaxError as exc:
        raise SealError(f"our Authentication-Results field does not parse: {exc}") from None
    return str(parsed.authserv_id)
