"""Verifying each DKIM-Signature (RFC 6376 §6) and naming its RFC 8601 result.

dkimpy's own verify() answers True or False and logs the why; we need the
RFC 8601 result of every signature (fail versus permerror versus temperror,
RFC 8301 policy), so this module runs the steps of RFC 6376 §6.1 itself with
dkimpy's parsers and canonicalization, OpenSSL for RSA, and keys from the shared
resolver. It lives in core because two filters need it: dkim (verification) and
dmarc (self-validation when no trusted dkim result is present).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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

from milters.core.errors import TempError
from milters.core.model import Header
from milters.core.verdict import AuthResult

DkimHeader = tuple[bytes, bytes]


def dkim_headers(headers: Sequence[Header]) -> list[DkimHeader]:
    """(name, value) pairs as dkimpy expects them: value after the colon, CRLF ends."""
    out = []
    for h in headers:
        value = h.value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        out.append((h.name.encode("ascii", "surrogateescape"), value + b"\r\n"))
    return out


# RFC 8601 §2.7.1 results, and which of them count as a broken signature.
PASS, FAIL, NEUTRAL, POLICY = "pass", "fail", "neutral", "policy"
TEMPERROR, PERMERROR, NONE = "temperror", "permerror", "none"

TxtLookup = Callable[[str], list[bytes]]


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


@dataclass
class _MessageCache:
    """Canonicalized header and body of one message, shared by its signatures."""

    headers: Sequence[DkimHeader]
    body: bytes
    canon_headers: dict[bytes, list[DkimHeader]] = field(default_factory=dict)
    canon_body: dict[bytes, bytes] = field(default_factory=dict)

    def headers_for(self, policy: CanonicalizationPolicy) -> list[DkimHeader]:
        key = policy.header_algorithm.__name__.encode()
        if key not in self.canon_headers:
            self.canon_headers[key] = policy.canonicalize_headers(list(self.headers))
        return self.canon_headers[key]

    def body_for(self, policy: CanonicalizationPolicy) -> bytes:
        key = policy.body_algorithm.__name__.encode()
        if key not in self.canon_body:
            self.canon_body[key] = policy.canonicalize_body(self.body)
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
               ignore_domains: Sequence[str] = ()) -> tuple[list[SignatureResult], int]:
    """Results for the first `max_signatures` DKIM-Signature fields (top down), and
    how many further signatures were left unverified."""
    cache = _MessageCache(headers, body)
    fields = [h for h in headers if h[0].lower() == b"dkim-signature"]
    results = []
    for sig_field in fields[:max_signatures]:
        r = verify_one(sig_field, cache, lookup, min_key_bits, ignore_domains)
        if r is not None:
            results.append(r)
    return results, max(0, len(fields) - max_signatures)


def ignored(domain: str, ignore_domains: Sequence[str]) -> bool:
    d = domain.lower().rstrip(".")
    for entry in ignore_domains:
        e = entry.lower().rstrip(".")
        if (e.startswith(".") and d.endswith(e)) or d == e:
            return True
    return False


def verify_one(sig_field: DkimHeader, cache: _MessageCache, lookup: TxtLookup,
               min_key_bits: int, ignore_domains: Sequence[str] = ()
               ) -> SignatureResult | None:
    """One signature's result; None when its domain is in ignore_domains."""
    tags: dict[bytes, bytes] = {}
    try:
        tags = dkim.util.parse_tag_value(sig_field[1])
    except dkim.util.InvalidTagValueList as exc:
        # Duplicate tags (§3.2: "MUST be treated as a PERMFAIL") and broken syntax.
        return SignatureResult(PERMERROR, f"malformed signature: {type(exc).__name__}")
    d = _text(tags.get(b"d", b""))
    if d and ignored(d, ignore_domains):
        return None
    base = SignatureResult(
        NONE, domain=d, identity=_text(tags.get(b"i", b"@" + tags[b"d"] if d else b"")),
        selector=_text(tags.get(b"s", b"")), algorithm=_text(tags.get(b"a", b"")),
        b_prefix=_text(re.sub(rb"\s+", b"", tags.get(b"b", b""))[:8]),
    )
    try:
        test_mode = _verify(tags, sig_field, cache, lookup, min_key_bits)
    except _Refusal as r:
        return _with(base, r.result, r.reason)
    except TempError as exc:
        return _with(base, TEMPERROR, f"key lookup failed: {exc}")
    return _with(base, PASS, "", test_mode)


def _with(base: SignatureResult, result: str, reason: str,
          test_mode: bool = False) -> SignatureResult:
    return SignatureResult(result, reason, base.domain, base.identity, base.selector,
                           base.algorithm, base.b_prefix, test_mode)


def _verify(tags: dict[bytes, bytes], sig_field: DkimHeader, cache: _MessageCache,
            lookup: TxtLookup, min_key_bits: int) -> bool:
    """Raise _Refusal unless the signature verifies; return whether the key is t=y."""
    try:
        # §6.1.1: required tags, v=1, known a=, base64 b=/bh=, i= within d=, x= not past.
        dkim.validate_signature_fields(tags)
    except dkim.ValidationError as exc:
        # dkimpy's messages show bytes reprs (b'x'); the value in brackets is input.
        raise _Refusal(PERMERROR, re.sub(r"b'([^']*)'", r"\1", str(exc).split(" (")[0])) \
            from None
    algorithm = tags[b"a"]
    if algorithm == b"rsa-sha1":
        # RFC 8301 §3.1: rsa-sha1 MUST NOT be used for verifying: signed, not acceptable.
        raise _Refusal(POLICY, "rsa-sha1 is not accepted (RFC 8301)")
    signed = [n.lower() for n in re.split(rb"\s*:\s*", tags[b"h"].strip())]
    if b"from" not in signed:
        raise _Refusal(PERMERROR, "From is not signed")  # RFC 6376 §6.1.1
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

    h = hashlib.sha256()
    dkim.hash_headers(h, policy, cache.headers_for(policy), signed, sig_field, tags)
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
        try:
            # As dkimpy reads p=: SubjectPublicKeyInfo, or a bare RSAPublicKey.
            numbers = dkim.crypto.parse_public_key(public)
            rsa_key = crypto_rsa.RSAPublicNumbers(numbers["publicExponent"],
                                                  numbers["modulus"]).public_key()
        except (dkim.crypto.UnparsableKeyError, dkim.asn1.ASN1FormatError, IndexError,
                ValueError):
            raise _Refusal(PERMERROR, "key p= is not an RSA public key") from None
        bits = rsa_key.key_size
        if bits < min_key_bits:
            # RFC 8301 §3.2: verifiers MUST NOT consider keys under 1024 bits valid.
            raise _Refusal(PERMERROR, f"key of {bits} bits is too short (RFC 8301)")
    elif key_type == b"ed25519":
        if len(public) != 32:
            raise _Refusal(PERMERROR, "key p= is not an Ed25519 public key")
    else:
        raise _Refusal(PERMERROR, "unknown key type (k=)")
    return key_type, public, rsa_key, b"y" in flags
