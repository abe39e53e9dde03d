"""The dkim filter: sign mail that is ours, verify the signatures on the rest.

Built once from settings (keys read and checked, tables parsed; every problem
a ConfigError naming the file), then immutable: SIGHUP builds a new one, which
is how keys rotate. check() holds its per-message state in locals only.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from milters.core import arc, authresults
from milters.core.addresses import parse_address_list
from milters.core.config import FilterSettings
from milters.core.dkim_verify import (
    FAIL,
    PASS,
    PERMERROR,
    TEMPERROR,
    DkimHeader,
    dkim_headers,
    verify_all,
)
from milters.core.errors import ConfigError
from milters.core.filter import Env, Filter, Network, Stage
from milters.core.model import Connection, Transaction
from milters.core.verdict import (
    ACCEPT,
    Action,
    AuthResult,
    EditKind,
    HeaderEdit,
    Reply,
    Verdict,
)
from milters.dkim.arcseal import build_sealer
from milters.dkim.keys import (
    KeyRing,
    PrivateKey,
    load_key_table,
    load_private_key,
    load_signing_table,
    simple_key_ring,
)
from milters.dkim.message import break_long_body_lines, fold_long_fields
from milters.dkim.settings import DkimSettings, OnResult
from milters.dkim.signing import SIGNATURE_FIELD, SignOptions, sign_message

log = logging.getLogger(__name__)

TAG_HEADER = "X-Milters-DKIM"

# RFC 7372 §3.1: 5.7.20 "No passing DKIM signature found".
REPLY_BAD_SIGNATURE = Reply("550", "5.7.20", "no passing DKIM signature found")
REPLY_NO_SIGNATURE = Reply("550", "5.7.20", "no DKIM signature found")
# RFC 3463 X.4.3: directory server failure (the key could not be looked up).
REPLY_DNS_ERROR = Reply("451", "4.4.3", "cannot look up the DKIM key now, try again later")
REPLY_TEMP_BAD = Reply("451", "4.7.20", "no passing DKIM signature found, try again later")


def _networks(values: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def _in(conn: Connection, nets: Sequence[Network]) -> bool:
    ip = conn.client_ip
    return ip is not None and any(ip in n for n in nets)


class DkimFilter(Filter):
    """DKIM signing and verification (RFC 6376, RFC 8301, RFC 8463), replacing
    OpenDKIM and dkimpy-milter.

    Mail that is ours (internal networks or internal_hosts, a SASL login, or a
    daemon name in sign_daemons) is signed when a key matches the From domain;
    other mail has each DKIM-Signature verified, one dkim= result each in
    Authentication-Results. The simple case needs domain, selector and key_file;
    many domains and keys use OpenDKIM's KeyTable and SigningTable files.
    Keys: `milters dkim genkey` makes one, `milters dkim testkey` checks its DNS record.
    """

    name = "dkim"
    default_port = 8891
    settings_class = DkimSettings
    stages = Stage.HEADER | Stage.BODY
    may_quarantine = True
    may_replace_body = True  # body lines over 998 bytes, broken before signing
    ar_methods = frozenset({"dkim", "arc"})

    def __init__(self, settings: FilterSettings, env: Env) -> None:
        super().__init__(settings, env)
        assert isinstance(settings, DkimSettings)
        self.dkim = settings
        self.keyring = build_key_ring(settings)
        self.sealer = build_sealer(settings, self.keyring)
        self.internal_hosts = _networks(settings.internal_hosts)
        self.peer_hosts = _networks(settings.peer_hosts)
        self.external_ignore = _networks(settings.external_ignore)
        self.sign_options = SignOptions(
            canonicalization=settings.canonicalization,
            sign_headers=settings.sign_headers,
            oversign_headers=settings.oversign_headers,
            signature_ttl=settings.signature_ttl,
            body_length_tag=settings.body_length_tag,
        )

    def describe(self) -> list[str]:
        lines = self.keyring.describe()
        if self.sealer is not None:
            lines.append(f"ARC seal ({self.sealer.mode}): d={self.sealer.domain} "
                         f"s={self.sealer.selector} rsa-sha256")
        return lines or ["no signing keys: mail is verified only"]

    def load_warnings(self) -> list[str]:
        s = self.dkim
        warnings = []
        if (s.sign and not s.sign_socket and self.env.downstream
                and self.keyring.keys):
            warnings.append(
                f"[dkim] sign_socket is empty: mail is signed at the dkim socket, "
                f"before {', '.join(self.env.downstream)} edit it; an edit of a "
                "signed field (a checks REPLACE of Subject) breaks the signature")
        if self.sealer is not None and not s.sign_socket and self.env.downstream:
            warnings.append(
                f"[dkim] sign_socket is empty: mail is ARC-sealed at the dkim socket, "
                f"without the results of {', '.join(self.env.downstream)} and before "
                "their edits (which break the seal)")
        return warnings

    # -- who is who ------------------------------------------------------------

    def is_ours(self, conn: Connection) -> bool:
        """Mail we sign: internal client, SASL login, or a signing daemon name."""
        s = self.dkim
        return (self.env.is_internal(conn) or _in(conn, self.internal_hosts)
                or (s.sign_authenticated and bool(conn.sasl_user))
                or (bool(conn.daemon_name) and conn.daemon_name in s.sign_daemons))

    def check(self, tx: Transaction) -> Verdict:
        conn = tx.connection
        if _in(conn, self.peer_hosts):
            return Verdict(reason="peer host: not signed nor verified")
        ours = self.is_ours(conn)
        verdict = self.verify(tx) if not ours and self.dkim.verify else ACCEPT
        # With a signing step of its own at the end of the chain, that step signs
        # and seals, after every other filter's edits.
        if DkimSignFilter.name in self.env.downstream:
            return verdict
        return self.sign_and_seal(tx, ours, verdict)

    def sign_and_seal(self, tx: Transaction, ours: bool, verdict: Verdict) -> Verdict:
        """Our mail signed, mail we forward sealed (ARC), as configured."""
        signs = ours and self.dkim.sign
        seals = (self.sealer is not None and not verdict.final and not verdict.quarantine
                 and self.sealer.wants(tx, ours))
        if not (signs or seals):
            return verdict
        out = self.outgoing(tx)
        if signs:
            verdict = self.sign(tx, out)
        if seals:
            verdict = self.seal(tx, verdict, out)
        return verdict

    # -- signing -----------------------------------------------------------------

    def signer_address(self, tx: Transaction) -> str:
        """The address whose domain signs: From, else (if configured) Sender."""
        names = ("from", "sender") if self.dkim.sender_header_fallback else ("from",)
        found = [a for a in (_single_address(tx, n) for n in names) if a]
        for address in found:
            if self.keyring.keys_for(address):
                return address
        return found[0] if found else ""

    def outgoing(self, tx: Transaction) -> Outgoing:
        """The message as Postfix will send it, which is what we sign and seal: lines
        over 998 bytes are folded now (and the field replaced), else Postfix's smtp
        client breaks them after we signed; long body lines likewise."""
        edits: list[HeaderEdit] = []
        headers = list(tx.headers)
        for f in fold_long_fields(headers):
            try:
                text = f.value.decode("utf-8")
            except UnicodeDecodeError:
                continue  # not representable in a milter edit; Postfix will fold it
            edits.append(HeaderEdit(EditKind.CHANGE, f.name, text, f.occurrence))
            seen = 0
            for i, h in enumerate(headers):
                if h.name.lower() == f.name.lower():
                    seen += 1
                    if seen == f.occurrence:
                        headers[i] = replace(h, value=f.value)
        body = tx.body.getvalue()
        new_body = break_long_body_lines(body)
        return Outgoing(tuple(edits), dkim_headers(headers),
                        body if new_body is None else new_body, new_body)

    def sign(self, tx: Transaction, out: Outgoing | None = None) -> Verdict:
        address = self.signer_address(tx)
        keys = self.keyring.keys_for(address) if address else ()
        if not keys:
            why = f"no key for {address}" if address else "no single From address"
            return Verdict(reason=f"not signed: {why}", log_notes=(f"not signed: {why}",))
        out = out or self.outgoing(tx)
        edits = list(out.edits)
        cache: dict[tuple[str, str], bytes] = {}
        done = []
        for domain, selector, key in keys:
            value = sign_message(out.headers, out.body, domain, selector, key,
                                 self.sign_options, body_cache=cache)
            edits.append(HeaderEdit(EditKind.INSERT, SIGNATURE_FIELD, value, index=0))
            done.append(f"d={domain} s={selector} a={key.algorithm}")
        return Verdict(reason="signed " + ", ".join(done), header_edits=tuple(edits),
                       replace_body=out.new_body)

    def seal(self, tx: Transaction, verdict: Verdict, out: Outgoing) -> Verdict:
        """`verdict` with an ARC set of ours on top (RFC 8617 §5.1), over our results:
        those our filters before this one wrote, and this verdict's own."""
        assert self.sealer is not None
        own = authresults.normalize_id(self.env.global_.authserv_id)
        results = [v for v in tx.header_values(authresults.FIELD_NAME)
                   if authresults.authserv_id_of(v) == own]
        if verdict.results:
            results.append(authresults.format_value(self.env.global_.authserv_id,
                                                    verdict.results).encode())
        try:
            fields = arc.seal(out.headers, out.body, results, self.sealer.domain,
                              self.sealer.selector, self.sealer.key_pem)
        except arc.SealError as exc:
            note = f"not sealed: {exc}"
            return replace(verdict, log_notes=(*verdict.log_notes, note))
        edits = list(verdict.header_edits)
        edits += [e for e in out.edits if e not in edits]  # folds, when not signed
        # Each insert at 0 goes above the one before: ARC-Seal ends on top.
        edits += [HeaderEdit(EditKind.INSERT, name, value, index=0)
                  for name, value in reversed(fields)]
        instance = re.match(r"\s*i=(\d+)", fields[0][1])
        what = f"sealed i={instance.group(1) if instance else '?'} d={self.sealer.domain}"
        reason = f"{verdict.reason}; {what}" if verdict.reason else what
        return replace(verdict, reason=reason, header_edits=tuple(edits),
                       replace_body=out.new_body)

    # -- verification --------------------------------------------------------------

    def verify(self, tx: Transaction) -> Verdict:
        s = self.dkim
        headers = dkim_headers(tx.headers)
        body = tx.body.getvalue()
        results, skipped = verify_all(
            headers, body, self.env.resolver.txt,
            s.max_signatures, s.min_key_bits, s.ignore_domains, s.clock_skew,
        )
        notes = []
        if skipped:
            notes.append(f"{skipped} signature(s) beyond max_signatures not verified")
        address = self.signer_address(tx)
        if address and self.keyring.keys_for(address) and not _in(
                tx.connection, self.external_ignore):
            # OpenDKIM's warning for mail claiming our domain from outside.
            notes.append(f"external host {tx.connection.client_name}"
                         f"[{tx.connection.client_addr}] tried to send mail as "
                         f"{address.rpartition('@')[2]}")
        ar = tuple(r.auth_result() for r in results) or (AuthResult("dkim", "none"),)
        summary = ", ".join(f"{r.result} d={r.domain or '?'}" for r in results) or "none"
        if s.arc_verify:
            chain = arc.verify_chain(headers, body, self.env.resolver.txt, s.min_key_bits)
            ar += (chain.auth_result(tx.connection.client_addr),)
            if chain.result != arc.NONE:
                summary += f"; {chain.describe()}"
            if chain.reason:
                notes.append(f"arc={chain.result}: {chain.reason}")
        verdict = Verdict(reason=f"dkim {summary}", results=ar, log_notes=tuple(notes))
        if any(r.result == PASS for r in results):
            return verdict
        if any(r.result == TEMPERROR for r in results):
            return self._act(verdict, s.on_dns_error, "DNS error", REPLY_DNS_ERROR)
        if any(r.result in (FAIL, PERMERROR) for r in results):
            return self._act(verdict, s.on_bad_signature, "bad signature",
                             REPLY_BAD_SIGNATURE)
        # No signature, or only unusable ones (rsa-sha1, t=y failures): unsigned mail.
        return self._act(verdict, s.on_no_signature, "no signature", REPLY_NO_SIGNATURE)

    @staticmethod
    def _act(verdict: Verdict, action: OnResult, what: str, reply: Reply) -> Verdict:
        if action == "accept":
            return verdict
        if action == "tag":
            edit = HeaderEdit(EditKind.ADD, TAG_HEADER, f"{what} ({verdict.reason})")
            return replace(verdict, header_edits=(edit,))
        if action == "quarantine":
            return replace(verdict, quarantine=f"dkim: {what}")
        if action == "reject":
            return replace(verdict, action=Action.REJECT, reply=reply)
        temp = reply if reply.temporary else REPLY_TEMP_BAD
        return replace(verdict, action=Action.TEMPFAIL, reply=temp)


class DkimSignFilter(DkimFilter):
    """The signing step of the dkim filter, last in the chain ([dkim] sign_socket).

    Signatures made here cover every edit our filters made before (a checks
    REPLACE of Subject, an added field), which a signature made at the dkim
    socket, first in the chain, would not survive. Verification stays at the
    dkim socket, which sees the message as received. Settings are [dkim]'s.
    """

    name = "dkim-sign"
    default_port = 8896
    may_quarantine = False
    ar_methods = frozenset()  # the verifying step owns dkim= results

    def check(self, tx: Transaction) -> Verdict:
        if _in(tx.connection, self.peer_hosts):
            return ACCEPT
        return self.sign_and_seal(tx, self.is_ours(tx.connection), ACCEPT)


@dataclass(frozen=True)
class Outgoing:
    """A message as it will leave: fold edits, header as (name, value) bytes, body."""

    edits: tuple[HeaderEdit, ...]
    headers: list[DkimHeader]
    body: bytes
    new_body: bytes | None  # the body replaced (long lines broken), if it had to be


def _single_address(tx: Transaction, name: str) -> str:
    """The one address in the one `name` field; "" when none or ambiguous (RFC 5322 §3.6)."""
    values = tx.header_values(name)
    if len(values) != 1:
        return ""
    text = values[0].decode("utf-8", "replace").replace("\n", " ")
    addresses = [m.address for m in parse_address_list(text).mailboxes]
    return addresses[0] if len(addresses) == 1 else ""


def build_key_ring(s: DkimSettings) -> KeyRing:
    """The keys and signing rules from [dkim], read now (a ConfigError names the file)."""
    problems: list[str] = []
    simple = bool(s.domain or s.key_file or s.selector)
    table = bool(s.key_table or s.signing_table)
    if simple and table:
        raise ConfigError("[dkim]: use domain/selector/key_file or key_table/signing_table, "
                          "not both")
    if table:
        if not (s.key_table and s.signing_table):
            raise ConfigError("[dkim]: key_table and signing_table go together")
        keys = load_key_table(s.key_table, s.allow_insecure_keys)
        rules = load_signing_table(s.signing_table, {k.name for k in keys})
        return KeyRing(keys, rules)
    if not simple:
        return KeyRing((), ())
    if not (s.domain and s.selector and s.key_file):
        raise ConfigError("[dkim]: domain, selector and key_file go together")
    pairs: list[tuple[str, PrivateKey]] = []
    for selector, path in ((s.selector, s.key_file), (s.ed25519_selector, s.ed25519_key_file)):
        if not path:
            continue
        if not selector:
            problems.append(f"[dkim]: {path} needs its selector")
            continue
        try:
            pairs.append((selector, load_private_key(path, s.allow_insecure_keys)))
        except ConfigError as exc:
            problems += exc.problems
    if s.ed25519_key_file and pairs and pairs[-1][1].algorithm != "ed25519-sha256":
        problems.append(f"[dkim]: ed25519_key_file {s.ed25519_key_file} is not an Ed25519 key")
    if problems:
        raise ConfigError(problems=problems)
    return simple_key_ring(s.domain, s.sub_domains, pairs)
