"""ARC chains for tests, sealed by dkimpy's arc_sign as other intermediaries would:
each hop writes its own Authentication-Results (its authserv-id, the arc= result it
found, DMARC as it saw it), then seals."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from functools import lru_cache

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.dns import LoopbackDNS


@lru_cache(maxsize=8)
def _rsa_key(bits: int, n: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@dataclass(frozen=True)
class Sealer:
    """An intermediary's sealing key: domain, selector and an RSA key."""

    domain: str
    selector: str = "arc"
    bits: int = 2048
    n: int = 0  # which cached key of that size

    @property
    def key(self) -> rsa.RSAPrivateKey:
        return _rsa_key(self.bits, self.n)

    @property
    def pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption())

    def record(self) -> str:
        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")

    def publish(self, dns: LoopbackDNS) -> None:
        dns.txt(f"{self.selector}._domainkey.{self.domain}", self.record())

    @property
    def authserv_id(self) -> str:
        return f"mx.{self.domain}"


def seal(message: bytes, sealer: Sealer, results: str, arc: str = "") -> bytes:
    """`message` after one hop: the hop's Authentication-Results field (`results`,
    plus arc=`arc` when given), then its ARC set on top."""
    ar = f"{sealer.authserv_id}; " + (f"arc={arc}; " if arc else "") + results
    with_ar = f"Authentication-Results: {ar}\r\n".encode() + message
    fields = dkim.arc_sign(with_ar, sealer.selector.encode(), sealer.domain.encode(),
                           sealer.pem, sealer.authserv_id.encode())
    assert fields, "dkimpy made no ARC set"
    return b"".join(fields) + with_ar


def chain(message: bytes, sealers: list[Sealer], author: str = "example.com") -> bytes:
    """`message` sealed by each hop in turn, each having seen DMARC pass for `author`
    and (after the first) the previous chain pass."""
    for i, s in enumerate(sealers):
        message = seal(message, s, f"dmarc=pass header.from={author}",
                       arc="pass" if i else "")
    return message
