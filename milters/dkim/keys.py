"""Private keys, the DNS records that publish them, and which keys sign which sender.

Keys are read when the filter is built (so SIGHUP, which rebuilds it, rotates
keys): PEM files (PKCS#1 `RSA PRIVATE KEY`, as opendkim-genkey writes in
`.private` files, or PKCS#8 `PRIVATE KEY`, as OpenSSL 3 writes for RSA and
Ed25519) or a bare base64 Ed25519 seed (dkimpy-milter's format). A key file,
or a key_table holding an inline key, that group or others can read is refused
unless allow_insecure_keys is set.

Who signs what: the simple case (domain + selector + key_file, optionally an
Ed25519 key beside it) or OpenDKIM's KeyTable and SigningTable files.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nacl.exceptions
import nacl.signing
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa

from milters.core.errors import ConfigError

log = logging.getLogger(__name__)

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]

MIN_RSA_BITS = 1024  # RFC 8301 §3.2: signers MUST use at least 1024 bits
MAX_RSA_BITS = 4096

# RFC 8410 §7: an Ed25519 PKCS#8 key is this DER prefix and the 32-byte seed.
ED25519_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_PEM = re.compile(rb"-----BEGIN ([A-Z ]+)-----\s*(.*?)\s*-----END \1-----", re.DOTALL)


@dataclass(frozen=True, repr=False)
class PrivateKey:
    """A loaded signing key: RSA (in OpenSSL, via `cryptography`: signing takes about
    1 ms there against 8 ms of Python big-number arithmetic) or an Ed25519 seed."""

    algorithm: Algorithm
    bits: int
    rsa: crypto_rsa.RSAPrivateKey | None = field(default=None, compare=False)
    ed25519_seed: bytes = b""

    def __repr__(self) -> str:  # never print key material
        return f"PrivateKey({self.algorithm}, {self.bits} bits)"

    @property
    def key_type(self) -> str:
        """The k= value of the DNS record (RFC 6376 §3.6.1, RFC 8463 §4)."""
        return "ed25519" if self.algorithm == "ed25519-sha256" else "rsa"

    def public_key_b64(self) -> str:
        """The p= value: SubjectPublicKeyInfo for RSA, the raw 32 bytes for Ed25519."""
        if self.algorithm == "ed25519-sha256":
            verify_key = nacl.signing.SigningKey(self.ed25519_seed).verify_key
            return base64.b64encode(bytes(verify_key)).decode("ascii")
        assert self.rsa is not None
        return base64.b64encode(_spki(self.rsa.public_key())).decode("ascii")

    def dns_record(self) -> str:
        """The TXT record text that publishes this key."""
        hashes = "h=sha256; " if self.algorithm == "rsa-sha256" else ""
        return f"v=DKIM1; {hashes}k={self.key_type}; p={self.public_key_b64()}"


def _spki(key: crypto_rsa.RSAPublicKey) -> bytes:
    """SubjectPublicKeyInfo (RFC 5280 §4.1.2.7), what DKIM's p= holds for RSA."""
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def parse_private_key(data: bytes, source: str) -> PrivateKey:
    """A PrivateKey from PEM (RSA PKCS#1/#8, Ed25519 PKCS#8) or a base64 Ed25519 seed."""
    m = _PEM.search(data)
    if m is None:
        try:
            seed = base64.b64decode(b"".join(data.split()), validate=True)
        except binascii.Error:
            raise ConfigError(f"{source}: not a PEM private key nor a base64 Ed25519 key") \
                from None
        if len(seed) != 32:
            raise ConfigError(f"{source}: not a PEM private key nor a base64 Ed25519 key")
        return PrivateKey("ed25519-sha256", 256, ed25519_seed=seed)
    try:
        der = base64.b64decode(b"".join(m.group(2).split()), validate=True)
    except binascii.Error:
        raise ConfigError(f"{source}: the PEM block is not base64") from None
    if der.startswith(ED25519_PKCS8_PREFIX) and len(der) == len(ED25519_PKCS8_PREFIX) + 32:
        return PrivateKey("ed25519-sha256", 256, ed25519_seed=der[-32:])
    try:
        rsa = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{source}: not an RSA or Ed25519 private key ({exc})") from None
    if not isinstance(rsa, crypto_rsa.RSAPrivateKey):
        raise ConfigError(f"{source}: not an RSA or Ed25519 private key")
    if not MIN_RSA_BITS <= rsa.key_size <= MAX_RSA_BITS:
        raise ConfigError(
            f"{source}: RSA key of {rsa.key_size} bits; DKIM keys must have "
            f"{MIN_RSA_BITS}-{MAX_RSA_BITS} bits (RFC 8301 §3.2)"
        )
    return PrivateKey("rsa-sha256", rsa.key_size, rsa=rsa)


def load_private_key(path: str, allow_insecure: bool) -> PrivateKey:
    """Read a key file, refusing one that group or others may read."""
    try:
        st = os.stat(path)
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"key file {path}: cannot read: {exc.strerror}") from None
    _refuse_if_readable(f"key file {path}", st.st_mode, allow_insecure)
    return parse_private_key(data, f"key file {path}")


def _refuse_if_readable(what: str, st_mode: int, allow_insecure: bool) -> None:
    """ConfigError when `what` (a file holding private key material) may be read by
    group or others; a warning instead with allow_insecure_keys."""
    if st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        mode = stat.filemode(st_mode)
        if not allow_insecure:
            raise ConfigError(
                f"{what} is readable by group or others ({mode}): "
                f"chmod 600 it (or set allow_insecure_keys = true in [dkim])"
            )
        log.warning("INSECURE: %s is readable by group or others (%s); "
                    "accepted because allow_insecure_keys = true", what, mode)


@dataclass(frozen=True)
class SigningKey:
    """One named key: its domain (or "%": the sender's), selector and key."""

    name: str
    domain: str
    selector: str
    key: PrivateKey

    def for_domain(self, sender_domain: str) -> tuple[str, str, PrivateKey]:
        """(d=, s=, key) for mail from `sender_domain`."""
        return (sender_domain if self.domain == "%" else self.domain), self.selector, self.key


@dataclass(frozen=True)
class SigningRule:
    """A SigningTable line: an address pattern and the keys it signs with."""

    pattern: str
    key_names: tuple[str, ...]
    _regex: re.Pattern[str]

    @classmethod
    def parse(cls, pattern: str, key_names: Sequence[str]) -> SigningRule:
        # refile: patterns: `*` matches any run of characters (OpenDKIM's
        # refile data sets); a bare domain matches every address at it.
        p = pattern.lower()
        if "@" not in p and "*" not in p:
            p = "*@" + p.lstrip(".") if not p.startswith(".") else "*@*" + p
        regex = re.compile("".join(".*" if c == "*" else re.escape(c) for c in p) + r"\Z")
        return cls(pattern, tuple(key_names), regex)

    def matches(self, address: str) -> bool:
        return self._regex.match(address.lower()) is not None


@dataclass(frozen=True)
class KeyRing:
    """Every signing key, and the rules that choose them for a sender address."""

    keys: tuple[SigningKey, ...]
    rules: tuple[SigningRule, ...]

    def keys_for(self, address: str) -> tuple[tuple[str, str, PrivateKey], ...]:
        """(d=, s=, key) for each signature mail from `address` gets; () for none."""
        domain = address.rpartition("@")[2].lower()
        by_name = {k.name: k for k in self.keys}
        for rule in self.rules:
            if rule.matches(address):
                return tuple(by_name[n].for_domain(domain) for n in rule.key_names)
        return ()

    def describe(self) -> list[str]:
        out = [f"key {k.name}: d={k.domain} s={k.selector} {k.key.algorithm} {k.key.bits} bits"
               for k in self.keys]
        out += [f"sign {r.pattern} with {', '.join(r.key_names)}" for r in self.rules]
        return out


def _strip_dataset(spec: str) -> str:
    # OpenDKIM data set prefixes: file: and refile: name a flat file.
    for prefix in ("refile:", "file:"):
        if spec.startswith(prefix):
            return spec[len(prefix):]
    return spec


def _table_lines(path: str, what: str) -> list[tuple[int, list[str]]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path}: cannot read: {exc}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            out.append((n, line.replace(",", " ").split()))
    return out


def _mode_of(path: str) -> int:
    try:
        return os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError(f"{path}: cannot stat: {exc.strerror}") from None


def load_key_table(spec: str, allow_insecure: bool) -> tuple[SigningKey, ...]:
    """OpenDKIM KeyTable: `name domain:selector:keyfile` (keyfile may be inline base64)."""
    path = _strip_dataset(spec)
    keys: list[SigningKey] = []
    problems: list[str] = []
    inline_checked = False
    for n, words in _table_lines(path, "key_table"):
        where = f"key_table {path}:{n}"
        if len(words) != 2 or words[1].count(":") < 2:
            problems.append(f"{where}: expected `name domain:selector:/path/to/key`")
            continue
        name = words[0]
        domain, selector, key_spec = words[1].split(":", 2)
        try:
            if key_spec.startswith("/") or key_spec.startswith("."):
                key = load_private_key(key_spec, allow_insecure)
            else:
                # An inline key makes the table itself key material: it must be as
                # private as a key file (issue 9: a 0644 table was accepted silently).
                if not inline_checked:
                    inline_checked = True
                    _refuse_if_readable(f"key_table {path} (inline key on line {n})",
                                        _mode_of(path), allow_insecure)
                key = parse_private_key(key_spec.encode(), where)
        except ConfigError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if any(k.name == name for k in keys):
            problems.append(f"{where}: key name {name!r} defined twice")
            continue
        keys.append(SigningKey(name, domain.lower(), selector, key))
    if problems:
        raise ConfigError(problems=problems)
    return tuple(keys)


def load_signing_table(spec: str, key_names: set[str]) -> tuple[SigningRule, ...]:
    """OpenDKIM SigningTable (refile: patterns): `pattern keyname [keyname...]`."""
    path = _strip_dataset(spec)
    rules: list[SigningRule] = []
    problems: list[str] = []
    for n, words in _table_lines(path, "signing_table"):
        where = f"signing_table {path}:{n}"
        if len(words) < 2:
            problems.append(f"{where}: expected `pattern keyname [keyname...]`")
            continue
        unknown = [w for w in words[1:] if w not in key_names]
        if unknown:
            problems.append(f"{where}: no key named {', '.join(unknown)} in key_table")
            continue
        # OpenDKIM with MultipleSignatures: several lines for the same pattern add keys.
        same = [i for i, r in enumerate(rules) if r.pattern.lower() == words[0].lower()]
        if same:
            old = rules[same[0]]
            rules[same[0]] = SigningRule.parse(old.pattern, (*old.key_names, *words[1:]))
            continue
        rules.append(SigningRule.parse(words[0], words[1:]))
    if problems:
        raise ConfigError(problems=problems)
    return tuple(rules)


def simple_key_ring(domains: Sequence[str], sub_domains: bool,
                    keys: Sequence[tuple[str, PrivateKey]]) -> KeyRing:
    """The simple case: every domain signed with each (selector, key).

    Sub-domains are signed with d= the configured domain, where the key is
    published (as OpenDKIM's SubDomains does); DMARC's relaxed alignment accepts it.
    """
    signing: list[SigningKey] = []
    rules: list[SigningRule] = []
    for d in domains:
        d = d.lower().strip(".")
        mine = [SigningKey(f"{d}/{selector}", d, selector, key) for selector, key in keys]
        signing += mine
        names = tuple(k.name for k in mine)
        rules.append(SigningRule.parse(f"*@{d}", names))
        if sub_domains:
            rules.append(SigningRule.parse(f"*@*.{d}", names))
    return KeyRing(tuple(signing), tuple(rules))
