"""`milters dkim genkey` and `milters dkim testkey`: make a key pair, check its DNS record.

genkey writes what opendkim-genkey writes: SELECTOR.private (PEM, mode 0600,
readable by OpenDKIM too) and SELECTOR.txt (the TXT record in zone-file form).
RSA keys come from OpenSSL through `cryptography`; Ed25519 keys from PyNaCl.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

import dkim.util
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa

from milters.core.errors import ConfigError, MiltersError, TempError
from milters.core.resolver import Resolver
from milters.dkim.keys import (
    ED25519_PKCS8_PREFIX,
    MAX_RSA_BITS,
    MIN_RSA_BITS,
    PrivateKey,
    load_private_key,
    parse_private_key,
)

TXT_STRING_MAX = 255  # RFC 1035 §3.3: a character-string holds at most 255 bytes


def zone_strings(record: str, size: int = TXT_STRING_MAX) -> list[str]:
    """The record cut into strings of at most `size` bytes (RFC 6376 §3.6.2.2:
    a verifier joins them), so DNS servers that refuse longer strings take it."""
    return [record[i:i + size] for i in range(0, len(record), size)]


def zone_text(domain: str, selector: str, key: PrivateKey) -> str:
    """A zone-file TXT record, as opendkim-genkey writes SELECTOR.txt."""
    strings = "\n\t".join(f'"{s}"' for s in zone_strings(key.dns_record()))
    return (f"{selector}._domainkey\tIN\tTXT\t( {strings} )  "
            f"; ----- DKIM key {selector} for {domain}\n")


def _pem(label: str, der: bytes) -> bytes:
    b64 = base64.b64encode(der).decode("ascii")
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return ("\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"])
            + "\n").encode("ascii")


def new_private_key_pem(algorithm: str, bits: int) -> bytes:
    """A new private key as PEM: RSA PKCS#1 (as opendkim-genkey) or Ed25519 PKCS#8."""
    if algorithm == "ed25519":
        seed = bytes(nacl.signing.SigningKey.generate())
        return _pem("PRIVATE KEY", ED25519_PKCS8_PREFIX + seed)
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise MiltersError(f"RSA keys have {MIN_RSA_BITS} to {MAX_RSA_BITS} bits, not {bits}")
    key = crypto_rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class GeneratedKey:
    private_path: Path
    txt_path: Path
    key: PrivateKey
    zone: str


def genkey(domain: str, selector: str, algorithm: str = "rsa", bits: int = 2048,
           directory: str = ".") -> GeneratedKey:
    """Write DIR/SELECTOR.private (0600) and DIR/SELECTOR.txt; never overwrite."""
    d = Path(directory)
    if not d.is_dir():
        # Not created here: who owns the key directory, and its mode, is the
        # administrator's choice (README: /etc/milters/dkim, 0750 milters).
        raise MiltersError(f"{d}: no such directory; create it first (--dir)")
    private_path = d / f"{selector}.private"
    txt_path = d / f"{selector}.txt"
    for p in (private_path, txt_path):
        if p.exists():
            raise MiltersError(f"{p} exists; remove it or choose another selector or --dir")
    pem = new_private_key_pem(algorithm, bits)
    key = parse_private_key(pem, "the new key")
    # Created 0600 from the start: the key is never readable by others, not even briefly.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    zone = zone_text(domain, selector, key)
    txt_path.write_text(zone)
    return GeneratedKey(private_path, txt_path, key, zone)


@dataclass(frozen=True)
class KeyTest:
    """What testkey found: ok, and a sentence for the administrator."""

    ok: bool
    message: str
    temporary: bool = False


def testkey(domain: str, selector: str, key_file: str, resolver: Resolver,
            allow_insecure: bool = False) -> KeyTest:
    """Look up SELECTOR._domainkey.DOMAIN and say whether it publishes this key."""
    try:
        key = load_private_key(key_file, allow_insecure)
    except ConfigError as exc:
        return KeyTest(False, str(exc))
    name = f"{selector}._domainkey.{domain}"
    try:
        records = resolver.txt(name)
    except TempError as exc:
        return KeyTest(False, f"{name}: lookup failed, try again later: {exc}", temporary=True)
    if not records:
        zone = zone_text(domain, selector, key)
        return KeyTest(False, f"{name}: no TXT record; publish:\n{zone}")
    try:
        tags = dkim.util.parse_tag_value(records[0])
    except dkim.util.InvalidTagValueList:
        return KeyTest(False, f"{name}: the TXT record is not a DKIM key record")
    p = b"".join(tags.get(b"p", b"").split()).decode("ascii", "replace")
    if not p:
        return KeyTest(False, f"{name}: the key is revoked (empty p=)")
    k = tags.get(b"k", b"rsa").decode("ascii", "replace")
    if k != key.key_type:
        return KeyTest(False, f"{name}: the record has k={k}, the key file is {key.key_type}")
    if p != key.public_key_b64():
        return KeyTest(False, f"{name}: the record's public key does not match {key_file}")
    extra = " (t=y: testing mode)" if b"y" in tags.get(b"t", b"").split(b":") else ""
    return KeyTest(True, f"{name}: key OK, {key.algorithm} {key.bits} bits{extra}")
