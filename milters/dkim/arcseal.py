"""Which mail we ARC-seal, and with which key ([dkim] arc_seal and friends).

RFC 8617 §5.1: an intermediary that forwards mail adds an ARC set over its own
authentication results. A milter cannot see whether Postfix will deliver a
message here or relay it, so the administrator says which mail that is: all mail
not ours (a host that only forwards), or mail through listed daemon names or to
listed recipient domains. Seals are rsa-sha256 only: dkimpy signs and validates
ARC sets with no other algorithm, and neither does OpenARC, so an Ed25519 seal
would be one nobody downstream can validate.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization

from milters.core.domains import DomainList
from milters.core.errors import ConfigError
from milters.core.model import Transaction
from milters.dkim.keys import KeyRing
from milters.dkim.settings import DkimSettings


@dataclass(frozen=True, repr=False)
class ArcSealer:
    """Our sealing identity and the rule that picks the mail to seal."""

    mode: str  # "all" or "listed"
    domain: str
    selector: str
    key_pem: bytes  # PKCS#1 PEM, what dkimpy's ARC signer reads
    daemons: frozenset[str]
    recipient_domains: DomainList

    def __repr__(self) -> str:  # never print key material
        return f"ArcSealer({self.mode}, d={self.domain} s={self.selector})"

    def wants(self, tx: Transaction, ours: bool) -> bool:
        """Whether this message gets an ARC set of ours."""
        if self.mode == "all":
            return not ours
        if tx.connection.daemon_name and tx.connection.daemon_name in self.daemons:
            return True
        return any(r.rpartition("@")[2] in self.recipient_domains for r in tx.rcpt_to)


def build_sealer(s: DkimSettings, keyring: KeyRing) -> ArcSealer | None:
    """The sealer [dkim] asks for, None when arc_seal is off; ConfigError when it
    cannot seal (no arc_verify, nothing listed, no RSA key for the domain)."""
    if s.arc_seal == "off":
        return None
    if not s.arc_verify:
        raise ConfigError("[dkim] arc_seal needs arc_verify = true: a seal states the "
                          "chain's validation status (cv=)")
    if s.arc_seal == "listed" and not (s.arc_seal_daemons or s.arc_seal_recipient_domains):
        raise ConfigError('[dkim] arc_seal = "listed" needs arc_seal_daemons or '
                          "arc_seal_recipient_domains")
    domain = (s.arc_seal_domain or (s.domain[0] if s.domain else "")).lower().strip(".")
    if not domain:
        raise ConfigError("[dkim] arc_seal needs arc_seal_domain (or `domain`)")
    rsa = [(d, sel, k) for d, sel, k in keyring.keys_for(f"postmaster@{domain}")
           if k.algorithm == "rsa-sha256" and k.rsa is not None]
    if not rsa:
        raise ConfigError(f"[dkim] arc_seal: no RSA key for {domain} (seals are rsa-sha256; "
                          "key_file or a key_table/signing_table entry)")
    d, selector, key = rsa[0]
    assert key.rsa is not None
    pem = key.rsa.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    return ArcSealer(s.arc_seal, d, selector, pem, frozenset(s.arc_seal_daemons),
                     DomainList.of(s.arc_seal_recipient_domains))
