"""Making a DKIM-Signature (RFC 6376 §5) with dkimpy's canonicalization and crypto.

We assemble the field ourselves rather than call dkimpy's sign(), to choose
the header set (over-signing), add x= and fold the way the adapter inserts it
("\\n\\t"), so the bytes we hash are the bytes Postfix sends.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import dkim
import dkim.crypto
import nacl.signing
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy

from milters.core.dkim_verify import DkimHeader, canonicalize_body
from milters.dkim.keys import PrivateKey

SIGNATURE_FIELD = "DKIM-Signature"
_LINE = 76  # fold the field's tags at about this width


@dataclass(frozen=True)
class SignOptions:
    """How to sign, from [dkim] settings."""

    canonicalization: str = "relaxed/relaxed"
    sign_headers: tuple[str, ...] = ()
    oversign_headers: tuple[str, ...] = ()
    signature_ttl: int = 0
    body_length_tag: bool = False


def canonicalization_policy(c: str) -> CanonicalizationPolicy:
    return CanonicalizationPolicy.from_c_value(c.encode("ascii"))


def headers_to_sign(headers: Sequence[DkimHeader], sign: Sequence[str],
                    oversign: Sequence[str]) -> list[bytes]:
    """The h= list: each present field of `sign` as often as present, plus one more
    for each field of `oversign` (RFC 6376 §8.15), so none can be added later.

    RFC 6376 §5.4.2: the same name listed n times signs its last n instances,
    bottom up; a name listed more often than present signs a "null" one.
    """
    counts: dict[bytes, int] = {}
    for name, _ in headers:
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    over = {n.lower().encode("ascii") for n in oversign}
    out: list[bytes] = []
    seen: set[bytes] = set()
    for n in (*sign, *oversign):
        name = n.lower().encode("ascii")
        if name in seen:
            continue
        seen.add(name)
        times = counts.get(name, 0) + (1 if name in over else 0)
        out += [name] * times
    if b"from" not in out:  # RFC 6376 §5.4: From MUST be signed
        out.insert(0, b"from")
    return out


def _fold_tags(tags: Sequence[tuple[str, str]]) -> str:
    """`t=v; ...` folded with "\\n\\t" between tags (and inside h= and b= when long)."""
    lines: list[str] = []
    line = ""
    for tag, value in tags:
        pieces = [f"{tag}={value}"]
        if tag == "h":
            names = value.split(":")
            pieces = [f"h={names[0]}"] + [f":{n}" for n in names[1:]]
        for i, piece in enumerate(pieces):
            sep = "" if not line or i > 0 else " "
            if line and len(line) + len(sep) + len(piece) + 1 > _LINE:
                lines.append(line)
                line = piece
            else:
                line += sep + piece
        line += ";" if tag != "b" else ""
    lines.append(line)
    return "\n\t".join(lines)


def sign_message(headers: Sequence[DkimHeader], body: bytes, domain: str, selector: str,
                 key: PrivateKey, options: SignOptions, now: float | None = None,
                 body_cache: dict[tuple[str, str], bytes] | None = None) -> str:
    """The value of a DKIM-Signature field (after the colon, no leading space),
    folded with "\\n\\t", for the message `headers` + `body`.

    `body_cache` lets several signatures share one canonicalized body hash.
    """
    c = options.canonicalization
    if "/" not in c:
        c = f"{c}/simple"  # RFC 6376 §3.5: c=relaxed means relaxed/simple
    policy = canonicalization_policy(c)
    cache = body_cache if body_cache is not None else {}
    body_c = cache.get((c, "body"))
    if body_c is None:
        # Ours, not dkimpy's: linear on long lines and long runs of white space.
        body_c = cache[(c, "body")] = canonicalize_body(policy.body_algorithm.name, body)
    body_hash = cache.get((c, "sha256"))
    if body_hash is None:
        body_hash = cache[(c, "sha256")] = base64.b64encode(hashlib.sha256(body_c).digest())
    signed = headers_to_sign(headers, options.sign_headers, options.oversign_headers)
    timestamp = int(now if now is not None else time.time())
    tags: list[tuple[str, str]] = [
        ("v", "1"), ("a", key.algorithm), ("c", c), ("d", domain), ("s", selector),
        ("t", str(timestamp)),
    ]
    if options.signature_ttl:
        tags.append(("x", str(timestamp + options.signature_ttl)))
    if options.body_length_tag:
        tags.append(("l", str(len(body_c))))
    tags += [("h", ":".join(n.decode("ascii") for n in signed)),
             ("bh", body_hash.decode("ascii")), ("b", "")]
    unsigned = _fold_tags(tags)
    # What the receiver hashes: the field as inserted (the adapter adds the space
    # after the colon; Postfix writes the folds as CRLF), b= empty (§3.7).
    field = (SIGNATURE_FIELD.encode("ascii"),
             b" " + unsigned.replace("\n", "\r\n").encode("ascii"))
    h = hashlib.sha256()
    canon_headers = policy.canonicalize_headers(list(headers))
    dkim.hash_headers(h, policy, canon_headers, signed, field, {})
    if key.algorithm == "ed25519-sha256":
        # RFC 8463 §3: Ed25519 signs the SHA-256 hash of the header data.
        signature = nacl.signing.SigningKey(key.ed25519_seed).sign(h.digest()).signature
    else:
        assert key.rsa is not None
        signature = key.rsa.sign(h.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    b64 = base64.b64encode(signature).decode("ascii")
    # b= folded on lines of its own; FWS inside b= is ignored when verifying (§3.5).
    chunks = [b64[i:i + _LINE - 4] for i in range(0, len(b64), _LINE - 4)]
    return unsigned + "\n\t" + "\n\t".join(chunks)
