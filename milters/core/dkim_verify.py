"""Verifying each DKIM-Signature (RFC 6376 §6) and naming its RFC 8601 result.

dkimpy's own verify() answers True or False and logs the why; we need the
RFC 8601 result of every signature (fail versus permerror versus temperror,
RFC 8301 policy), so this module runs the steps of RFC 6376 §6.1 itself with
dkimpy's parsers and canonicalization, OpenSSL for RSA, and keys from the shared
resolver. It lives in core because two filters need it: dkim (verification) and
dmarc (self-validation when no trusted dkim result is present).

Hostile input is answered per signature: a DKIM-Signature whose tag-list or any
tag is malformed is `permerror` for that signature only (RFC 6376 §3.5, §6.1.1),
never an exception, so the other signatures and DMARC go on. We parse and check
the tags ourselves instead of with dkimpy's validate_signature_fields (which
raises IndexError, ValueError and lets a signature expired up to 10 hours pass).
Work per message is bounded and linear: at most `max_signatures` signatures,
at most MAX_SIGNED_FIELDS names in one h=, header fields indexed by name once per
message, and body canonicalization without dkimpy's regexps (which backtrack
quadratically on long runs of white space).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import dkim
import dkim.crypto
import dkim.util
import nacl.exceptions
import nacl.signing
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError

from milters.core.domains import DomainList
from milters.core.errors import TempError
from milters.core.model import Header
from milters.core.verdict import AuthResult

log = logging.getLogger(__name__)

DkimHeader = tuple[bytes, bytes]

# At most this many names in one h= (RFC 6376 sets no limit). Signers list some
# 20 to 40 names (RFC 6376 §5.4.1 and over-signing); a longer list is a permerror
# for that signature, so a message cannot make us hash one field thousands of times.
MAX_SIGNED_FIELDS = 512

# Seconds of clock difference allowed when checking x= (expiry) and t= (future):
# libopendkim's default clock drift. dkimpy allows 10 hours, under which a
# signature expired 9 hours ago still passes.
DEFAULT_CLOCK_SKEW = 300


def dkim_headers(headers: Sequence[Header]) -> list[DkimHeader]:
    """(name, value) pairs as dkimpy expects them: value after the colon, CRLF ends."""
    out = []
    for h in headers:
        value = h.value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        # As the adapter decoded it: an 8-bit byte in a name is kept, never an error.
        out.append((h.name.encode("utf-8", "surrogateescape"), value + b"\r\n"))
    return out


# RFC 8601 §2.7.1 results, and which of them count as a broken signature.
PASS, FAIL, NEUTRAL, POLICY = "pass", "fail", "neutral", "policy"
TEMPERROR, PERMERROR, NONE = "temperror", "permerror", "none"

TxtLookup = Callable[[str], list[bytes]]
# Seconds of key lookups per message, all signatures together: below Postfix's
# milter_content_timeout (300 s) and, with the default DNS timeout of 5 s, room
# for four signatures whose domains never answer.
DNS_BUDGET = 20.0


@dataclass(frozen=True)
class SignatureResult:
    """The outcome for one DKIM-Signature field, with what AR reports of it."""

    result: str
    reason: str = ""
    domain: str = ""
    identity: str = ""
    selector: str = ""
    algorithm: str = ""
    b_prefix: str = ""  # the first 8 characters of b= (RFC 6008 header.b)
    test_mode: bool = False

    def auth_result(self) -> AuthResult:
        """dkim=RESULT reason="..." header.d= header.i= header.s= header.a= header.b=,
        the properties OpenDKIM writes."""
        props = [("header", name, value) for name, value in (
            ("d", self.domain), ("i", self.identity), ("s", self.selector),
            ("a", self.algorithm), ("b", self.b_prefix)) if value]
        return AuthResult("dkim", self.result, self.reason, tuple(props))


class _Refusal(Exception):
    """A step of RFC 6376 §6.1 ended verification with this result."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


# -- canonicalization, linear in the message size ------------------------------------

_TAB_TO_SPACE = bytes.maketrans(b"\t", b" ")


def _strip_trailing_lines(body: bytes) -> bytes:
    """RFC 6376 §3.4.3/§3.4.4: empty lines at the end removed, one CRLF kept (and a
    CRLF added when the body does not end with one), as dkimpy does it, without
    its Python loop over each trailing CRLF."""
    if not body.endswith(b"\r\n"):
        return body + b"\r\n"
    tail = body[len(body.rstrip(b"\r\n")):]  # only CR and LF bytes, ends with CRLF
    # After the last doubled byte (CRCR or LFLF) the tail alternates CR/LF: its
    # CRLF pairs are the trailing lines.
    run = tail[max(tail.rfind(b"\r\r"), tail.rfind(b"\n\n")) + 1:]
    if run.startswith(b"\n"):
        run = run[1:]
    return body[:len(body) - len(run) + 2]


def canonicalize_body(algorithm: bytes, body: bytes) -> bytes:
    """The body canonicalized by `algorithm` (b"simple" or b"relaxed"), byte for byte
    what dkimpy gives, in linear time (dkimpy's `[\\t ]+\\r\\n` regexp is quadratic on
    a long run of white space, and slow on a long line)."""
    if algorithm != b"relaxed":
        return _strip_trailing_lines(body)
    # RFC 6376 §3.4.4: WSP runs become one SP, WSP at line ends is removed.
    body = body.translate(_TAB_TO_SPACE)
    while b"  " in body:  # each pass halves every run: log2(longest run) passes
        body = body.replace(b"  ", b" ")
    body = _strip_trailing_lines(body.replace(b" \r\n", b"\r\n"))
    return b"" if body == b"\r\n" else body


@dataclass
class _MessageCache:
    """Canonicalized header and body of one message, shared by its signatures, and
    the header fields indexed by name, so that selecting a signature's h= fields
    costs one step per name (dkimpy's select_headers walks the header per name)."""

    headers: Sequence[DkimHeader]
    body: bytes
    canon_headers: dict[bytes, list[DkimHeader]] = field(default_factory=dict)
    by_name: dict[bytes, dict[bytes, list[int]]] = field(default_factory=dict)
    canon_body: dict[bytes, bytes] = field(default_factory=dict)

    def headers_for(self, policy: CanonicalizationPolicy) -> list[DkimHeader]:
        key = policy.header_algorithm.name
        if key not in self.canon_headers:
            canon = policy.canonicalize_headers(list(self.headers))
            index: dict[bytes, list[int]] = {}
            for i, (name, _) in enumerate(canon):
                index.setdefault(name.lower(), []).append(i)
            self.canon_headers[key] = canon
            self.by_name[key] = index
        return self.canon_headers[key]

    def select(self, policy: CanonicalizationPolicy, signed: Sequence[bytes]
               ) -> list[DkimHeader]:
        """The fields h= signs, in h= order: a name listed n times takes its last n
        instances bottom up; one listed more often than present takes nothing more
        (RFC 6376 §5.4.2), as dkimpy's select_headers does."""
        canon = self.headers_for(policy)
        index = self.by_name[policy.header_algorithm.name]
        used: dict[bytes, int] = {}
        out = []
        for name in signed:
            positions = index.get(name, [])
            n = used.get(name, 0)
            if n < len(positions):
                out.append(canon[positions[-1 - n]])
            used[name] = n + 1
        return out

    def body_for(self, policy: CanonicalizationPolicy) -> bytes:
        key = policy.body_algorithm.name
        if key not in self.canon_body:
            self.canon_body[key] = canonicalize_body(key, self.body)
        return self.canon_body[key]


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace")


def _b64(value: bytes, what: str) -> bytes:
    try:
        return base64.b64decode(re.sub(rb"\s+", b"", value), validate=True)
    except binascii.Error:
        raise _Refusal(PERMERROR, f"{what} is not base64") from None


def verify_all(headers: Sequence[DkimHeader], body: bytes, lookup: TxtLookup,
               max_signatures: int, min_key_bits: int,
               ignore_domains: Sequence[str] = (), clock_skew: int = DEFAULT_CLOCK_SKEW,
               now: float | None = None, dns_budget: float = DNS_BUDGET
               ) -> tuple[list[SignatureResult], int]:
    """Results for the first `max_signatures` DKIM-Signature fields (top down), and
    how many further signatures were left unverified (they get no result, as in
    OpenDKIM: RFC 8601 asks for no result per signature).

    Key lookups share `dns_budget` seconds: ten signatures whose domains all time
    out would otherwise cost ten DNS timeouts, past Postfix's milter timeouts; a
    signature whose key is looked up after the budget is spent is a temperror.
    """
    cache = _MessageCache(headers, body)
    fields = [h for h in headers if h[0].lower() == b"dkim-signature"]
    when = int(time.time() if now is None else now)
    results = []
    within_budget = budgeted(lookup, dns_budget)
    for sig_field in fields[:max_signatures]:
        r = verify_one(sig_field, cache, within_budget, min_key_bits, ignore_domains,
                       clock_skew, when)
        if r is not None:
            results.append(r)
    return results, max(0, len(fields) - max_signatures)


def budgeted(lookup: TxtLookup, budget: float) -> TxtLookup:
    """`lookup` that raises TempError once `budget` seconds have passed since now."""
    deadline = time.monotonic() + budget

    def within_budget(name: str) -> list[bytes]:
        if time.monotonic() >= deadline:
            raise TempError(f"the message's {budget:g} s budget for key lookups is spent")
        return lookup(name)

    return within_budget


def ignored(domain: str, ignore_domains: Sequence[str]) -> bool:
    """`domain` is in the list, by the one rule for domain lists (core/domains.py)."""
    return bool(ignore_domains) and domain in DomainList.of(ignore_domains)


# -- the tag-list (RFC 6376 §3.2) and the signature's tags (§3.5) -----------------------

# §3.2: tag-name = ALPHA *ALNUMPUNC; a value holds VALCHAR (%x21-3A / %x3C-7E) and
# FWS only: a NUL, another control byte or an 8-bit byte makes the list malformed.
_TAG_NAME = re.compile(rb"[A-Za-z][A-Za-z0-9_]*")
_BAD_BYTE = re.compile(rb"[^\x21-\x7e \t\r\n]")
_WSP = b" \t\r\n"
# RFC 5321 sub-domain (RFC 6376 §3.5 d=): letters, digits, inner hyphens, 63 at most.
_LDH_LABEL = re.compile(rb"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# A selector label: what DNS takes in practice (underscores included).
_SELECTOR_LABEL = re.compile(rb"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
# §2.2 ftext: printable ASCII but ":"; after FWS is removed.
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
ALGORITHMS = (b"rsa-sha256", b"rsa-sha1", b"ed25519-sha256")


def parse_tags(value: bytes) -> dict[bytes, bytes]:
    """The tags of a DKIM-Signature value; _Refusal(permerror) for a malformed list,
    duplicate tags (§3.2: "MUST be treated as a PERMFAIL") or bytes outside the grammar."""
    if _BAD_BYTE.search(value):
        raise _Refusal(PERMERROR, "malformed signature: control or 8-bit byte")
    specs = value.split(b";")  # VALCHAR excludes ";": every ";" ends a tag-spec
    if not specs[-1].strip(_WSP):
        specs.pop()  # §3.2: a trailing ";" is allowed
    tags: dict[bytes, bytes] = {}
    for spec in specs:
        name, eq, tag_value = spec.partition(b"=")
        name = name.strip(_WSP)
        if not eq or not _TAG_NAME.fullmatch(name):
            raise _Refusal(PERMERROR, "malformed signature: bad tag-list")
        if name in tags:
            raise _Refusal(PERMERROR, f"malformed signature: duplicate {_text(name)}=")
        tags[name] = tag_value.strip(_WSP)
    return tags


def tags_or_none(value: bytes) -> dict[bytes, bytes] | None:
    """The tags of a tag-list as parse_tags reads them; None when it is malformed
    (for readers of other tag-list fields, such as ARC's, that only need to know)."""
    try:
        return parse_tags(value)
    except _Refusal:
        return None


def is_domain_name(name: bytes, label: re.Pattern[bytes] = _LDH_LABEL) -> bool:
    """Whether `name` can be a DNS name of such labels (253 bytes at most, RFC 1035)."""
    return (0 < len(name) <= 253
            and all(label.fullmatch(part) for part in name.split(b".")))


def signed_fields(h: bytes) -> list[bytes]:
    """The lower-cased names of h=, split without a regexp (no backtracking on FWS)."""
    names = [n.strip(_WSP).lower() for n in h.split(b":")]
    if not all(_FIELD_NAME.fullmatch(n) for n in names):
        raise _Refusal(PERMERROR, "h= is malformed")
    return names


def signed_fields_or_none(h: bytes) -> list[bytes] | None:
    """signed_fields, None when the list is malformed."""
    try:
        return signed_fields(h)
    except _Refusal:
        return None


def check_tags(tags: dict[bytes, bytes], now: int, clock_skew: int) -> list[bytes]:
    """RFC 6376 §6.1.1 on the tags; the h= names. _Refusal for what is not a valid
    signature: permerror, or policy for rsa-sha1 (RFC 8301 §3.1)."""
    for tag in (b"v", b"a", b"b", b"bh", b"d", b"h", b"s"):
        if tag not in tags:
            raise _Refusal(PERMERROR, f"missing {_text(tag)}=")
    if tags[b"v"] != b"1":
        raise _Refusal(PERMERROR, "v= is not 1")
    if tags[b"a"] not in ALGORITHMS:
        raise _Refusal(PERMERROR, "unknown signature algorithm (a=)")
    d = tags[b"d"]
    if not is_domain_name(d.rstrip(b".")):
        raise _Refusal(PERMERROR, "d= is not a domain name")
    name = tags[b"s"] + b"._domainkey." + d.rstrip(b".")
    if not is_domain_name(tags[b"s"], _SELECTOR_LABEL) or len(name) > 253:
        raise _Refusal(PERMERROR, "s= is not a selector (or makes too long a name)")
    if b"i" in tags:
        _, at, i_domain = tags[b"i"].rpartition(b"@")
        i_domain = i_domain.lower().rstrip(b".")
        base = d.lower().rstrip(b".")
        if not at:
            raise _Refusal(PERMERROR, "i= has no @")
        if i_domain != base and not i_domain.endswith(b"." + base):
            raise _Refusal(PERMERROR, "i= is not in d= or a sub-domain of it")
    names = signed_fields(tags[b"h"])
    if len(names) > MAX_SIGNED_FIELDS:
        raise _Refusal(PERMERROR, f"h= lists more than {MAX_SIGNED_FIELDS} fields")
    if b"from" not in names:
        raise _Refusal(PERMERROR, "From is not signed")
    if not re.sub(rb"\s+", b"", tags[b"b"]):
        raise _Refusal(PERMERROR, "b= is empty")
    _b64(tags[b"b"], "b=")
    _b64(tags[b"bh"], "bh=")
    if b"l" in tags and not re.fullmatch(rb"[0-9]{1,76}", tags[b"l"]):
        raise _Refusal(PERMERROR, "l= is not a decimal number")
    if b"q" in tags and b"dns/txt" not in [m.strip(_WSP) for m in tags[b"q"].split(b":")]:
        raise _Refusal(PERMERROR, "q= has no dns/txt")
    t = _timestamp(tags, b"t")
    x = _timestamp(tags, b"x")
    if t is not None and t > now + clock_skew:
        # §3.5: verifiers MAY ignore signatures with a timestamp in the future.
        raise _Refusal(PERMERROR, "t= is in the future")
    if x is not None:
        if t is not None and x < t:
            raise _Refusal(PERMERROR, "x= is before t=")  # §3.5
        if x < now - clock_skew:
            # §6.1.1: an expired signature is ignored, "PERMFAIL (signature expired)".
            raise _Refusal(PERMERROR, "signature expired (x=)")
    if tags[b"a"] == b"rsa-sha1":
        # RFC 8301 §3.1: rsa-sha1 MUST NOT be used for verifying: signed, not acceptable.
        raise _Refusal(POLICY, "rsa-sha1 is not accepted (RFC 8301)")
    return names


def _timestamp(tags: dict[bytes, bytes], tag: bytes) -> int | None:
    if tag not in tags:
        return None
    if not re.fullmatch(rb"[0-9]{1,12}", tags[tag]):  # §3.5: 1*12DIGIT
        raise _Refusal(PERMERROR, f"{_text(tag)}= is not a timestamp")
    return int(tags[tag])


def without_b(value: bytes) -> bytes:
    """The signature field's value with the b= tag's value removed and all else kept
    (RFC 6376 §3.7), as dkimpy's RE_BTAG does for a well-formed field, without its
    regexp (nested FWS quantifiers) and without touching "b=" inside other values."""
    specs = value.split(b";")
    for i, spec in enumerate(specs):
        name, eq, tag_value = spec.partition(b"=")
        if eq and name.strip(_WSP) == b"b":
            kept = tag_value.rstrip(_WSP)
            # White space after the value stays (it ends the hashed field when b= is
            # last, and is removed there by canonicalization either way).
            specs[i] = name + eq + tag_value[len(kept):]
    return b";".join(specs)


# -- one signature ------------------------------------------------------------------------

# Errors of the libraries we call on hostile input (dkimpy's parsers, ASN.1, base64,
# OpenSSL, libsodium) that are not theirs: caught per signature, so one signature can
# never end the message in on_error (issue 9).
_INPUT_ERRORS = (ValueError, IndexError, KeyError, TypeError, UnicodeError, RecursionError,
                 OverflowError, binascii.Error, nacl.exceptions.CryptoError)


def verify_one(sig_field: DkimHeader, cache: _MessageCache, lookup: TxtLookup,
               min_key_bits: int, ignore_domains: Sequence[str] = (),
               clock_skew: int = DEFAULT_CLOCK_SKEW, now: int | None = None
               ) -> SignatureResult | None:
    """One signature's result; None when its domain is in ignore_domains."""
    try:
        tags = parse_tags(sig_field[1])
    except _Refusal as r:
        return SignatureResult(r.result, r.reason)
    d = _text(tags.get(b"d", b""))
    if d and ignored(d, ignore_domains):
        return None
    base = SignatureResult(
        NONE, domain=d, identity=_text(tags.get(b"i", b"@" + tags[b"d"] if d else b"")),
        selector=_text(tags.get(b"s", b"")), algorithm=_text(tags.get(b"a", b"")),
        b_prefix=_text(re.sub(rb"\s+", b"", tags.get(b"b", b""))[:8]),
    )
    when = int(time.time()) if now is None else now
    try:
        test_mode = _verify(tags, sig_field, cache, lookup, min_key_bits, clock_skew, when)
    except _Refusal as r:
        return _with(base, r.result, r.reason)
    except TempError as exc:
        return _with(base, TEMPERROR, f"key lookup failed: {exc}")
    except _INPUT_ERRORS as exc:
        log.info("dkim: d=%s s=%s: %s on malformed input: permerror", base.domain,
                 base.selector, type(exc).__name__)
        return _with(base, PERMERROR, f"malformed signature or key ({type(exc).__name__})")
    return _with(base, PASS, "", test_mode)


def _with(base: SignatureResult, result: str, reason: str,
          test_mode: bool = False) -> SignatureResult:
    return SignatureResult(result, reason, base.domain, base.identity, base.selector,
                           base.algorithm, base.b_prefix, test_mode)


def _verify(tags: dict[bytes, bytes], sig_field: DkimHeader, cache: _MessageCache,
            lookup: TxtLookup, min_key_bits: int, clock_skew: int, now: int) -> bool:
    """Raise _Refusal unless the signature verifies; return whether the key is t=y."""
    signed = check_tags(tags, now, clock_skew)  # §6.1.1
    algorithm = tags[b"a"]
    try:
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError:
        raise _Refusal(PERMERROR, "unknown canonicalization") from None

    key_type, public, rsa_key, test_mode = _key(tags, lookup, min_key_bits)
    expected = b"ed25519" if algorithm == b"ed25519-sha256" else b"rsa"
    if key_type != expected:
        raise _Refusal(PERMERROR, "key type does not match a=")  # §6.1.2 step 6

    # §6.1.3: body hash, over l= bytes when given.
    body = cache.body_for(policy)
    if b"l" in tags:
        length = int(tags[b"l"])
        if length > len(body):
            raise _failed(test_mode, "l= is longer than the body")
        body = body[:length]
    if hashlib.sha256(body).digest() != _b64(tags[b"bh"], "bh="):
        raise _failed(test_mode, "body hash did not verify")

    # §3.7: the signed fields, then this field with b= empty and no trailing CRLF.
    h = hashlib.sha256()
    for name, value in cache.select(policy, signed):
        h.update(name)
        h.update(b":")
        h.update(value)
    [(name, value)] = policy.canonicalize_headers([(sig_field[0], without_b(sig_field[1]))])
    h.update(name)
    h.update(b":")
    h.update(value.rstrip())
    signature = _b64(tags[b"b"], "b=")
    if key_type == b"ed25519":
        try:
            nacl.signing.VerifyKey(public).verify(h.digest(), signature)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
            raise _failed(test_mode, "signature did not verify") from None
        return test_mode
    assert rsa_key is not None  # _key gives one for k=rsa
    try:
        rsa_key.verify(signature, h.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    except InvalidSignature:
        raise _failed(test_mode, "signature did not verify") from None
    return test_mode


def _failed(test_mode: bool, reason: str) -> _Refusal:
    # RFC 6376 §3.6.1 t=y: treat as unsigned, so a failure is reported as neutral
    # and not acted on.
    if test_mode:
        return _Refusal(NEUTRAL, f"{reason}; key in test mode (t=y)")
    return _Refusal(FAIL, reason)


@lru_cache(maxsize=256)
def _rsa_key(public: bytes) -> crypto_rsa.RSAPublicKey | None:
    """The RSA key in p= (as dkimpy reads it: SubjectPublicKeyInfo, or a bare
    RSAPublicKey), None when it is not one. Memoised: a busy domain signs every
    message with the same key, and parsing it cost as much as the verification
    (a pure function of its argument; lru_cache is thread-safe)."""
    try:
        numbers = dkim.crypto.parse_public_key(public)
        return crypto_rsa.RSAPublicNumbers(numbers["publicExponent"],
                                           numbers["modulus"]).public_key()
    except (dkim.crypto.UnparsableKeyError, dkim.asn1.ASN1FormatError, IndexError,
            ValueError):
        return None


def _key(tags: dict[bytes, bytes], lookup: TxtLookup, min_key_bits: int
         ) -> tuple[bytes, bytes, crypto_rsa.RSAPublicKey | None, bool]:
    """(k=, public key bytes, the RSA key for k=rsa, t=y) from DNS, checked as
    RFC 6376 §6.1.2 says. RSA runs in OpenSSL (`cryptography`), 15x faster than
    Python's big-number arithmetic."""
    name = f"{_text(tags[b's'])}._domainkey.{_text(tags[b'd'])}"
    records = lookup(name)  # TempError propagates: temperror
    if not records:
        raise _Refusal(PERMERROR, "no key for signature")
    try:
        key = dkim.util.parse_tag_value(records[0])
    except dkim.util.InvalidTagValueList:
        raise _Refusal(PERMERROR, "key record is malformed") from None
    if key.get(b"v", b"DKIM1") != b"DKIM1":
        raise _Refusal(PERMERROR, "key record has a bad version")
    key_hashes = key.get(b"h")
    if key_hashes is not None:
        allowed = [x.strip() for x in key_hashes.split(b":")]
        if tags[b"a"].split(b"-")[-1] not in allowed:
            raise _Refusal(PERMERROR, "hash algorithm not allowed by the key (h=)")
    services = [x.strip() for x in key.get(b"s", b"*").split(b":")]
    if b"*" not in services and b"email" not in services:
        raise _Refusal(PERMERROR, "key is not for email (s=)")
    flags = [x.strip() for x in key.get(b"t", b"").split(b":")]
    if b"s" in flags:
        # t=s: i= must be exactly d=, not a sub-domain of it.
        identity = tags.get(b"i", b"@" + tags[b"d"])
        if identity.rpartition(b"@")[2].lower() != tags[b"d"].lower():
            raise _Refusal(PERMERROR, "i= sub-domain not allowed by the key (t=s)")
    p = key.get(b"p")
    if p is None:
        raise _Refusal(PERMERROR, "key record has no p=")
    if not p.strip():
        raise _Refusal(PERMERROR, "key revoked")  # §3.6.1: an empty p= revokes
    public = _b64(p, "key p=")
    key_type = key.get(b"k", b"rsa")
    rsa_key: crypto_rsa.RSAPublicKey | None = None
    if key_type == b"rsa":
        rsa_key = _rsa_key(public)
        if rsa_key is None:
            raise _Refusal(PERMERROR, "key p= is not an RSA public key")
        bits = rsa_key.key_size
        if bits < min_key_bits:
            # RFC 8301 §3.2: verifiers MUST NOT consider keys under 1024 bits valid, and
            # "verifier policies can use the length of the signing key" to decide what
            # is acceptable: RFC 8601 §2.7.1 policy, as for rsa-sha1 (and OpenDKIM).
            raise _Refusal(POLICY, f"key of {bits} bits is too short (RFC 8301)")
    elif key_type == b"ed25519":
        if len(public) != 32:
            raise _Refusal(PERMERROR, "key p= is not an Ed25519 public key")
    else:
        raise _Refusal(PERMERROR, "unknown key type (k=)")
    return key_type, public, rsa_key, b"y" in flags
