"""[dkim] settings: signing keys and rules, verification limits and actions.

Each key has a place for an OpenDKIM option (README.md maps them one to one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from milters.core.config import (
    FilterSettings,
    check_networks,
    check_optional_socket,
    check_range,
    setting,
)

# What a verification outcome leads to, like OpenDKIM's On-* values:
# accept (deliver, AR result only), tag (also an X-Milters-DKIM header naming the
# problem), quarantine (Postfix hold queue), reject (5xx), tempfail (4xx).
OnResult = Literal["accept", "tag", "quarantine", "reject", "tempfail"]
# Which mail gets an ARC set of ours: none, all mail that is not ours (a host that
# forwards everything it receives), or mail that came through arc_seal_daemons or
# has a recipient in arc_seal_recipient_domains.
ArcSeal = Literal["off", "all", "listed"]

CANONICALIZATIONS = ("relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple",
                     "relaxed", "simple")

# RFC 6376 §5.4.1: fields that SHOULD be signed when present.
DEFAULT_SIGN_HEADERS = (
    "From", "Reply-To", "Subject", "Date", "To", "Cc", "Resent-Date", "Resent-From",
    "Resent-To", "Resent-Cc", "In-Reply-To", "References", "List-Id", "List-Help",
    "List-Unsubscribe", "List-Subscribe", "List-Post", "List-Owner", "List-Archive",
    "Message-ID", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
    "Content-Disposition", "Sender", "List-Unsubscribe-Post",
)
# RFC 6376 §8.15: signed once more than present, so that nobody can add one later
# (a second From or Subject shown by the mail reader instead of the signed one).
DEFAULT_OVERSIGN_HEADERS = (
    "From", "To", "Cc", "Subject", "Date", "Reply-To", "Message-ID", "Sender",
    "MIME-Version", "Content-Type", "Content-Transfer-Encoding", "In-Reply-To",
    "References", "List-Unsubscribe", "List-Unsubscribe-Post",
)


def check_canonicalization(value: Any) -> str | None:
    if value not in CANONICALIZATIONS:
        return "header/body canonicalization: " + ", ".join(CANONICALIZATIONS[:4])
    return None


@dataclass(frozen=True)
class DkimSettings(FilterSettings):
    """[dkim]: sign outgoing mail, verify incoming signatures."""

    # -- what to do ---------------------------------------------------------
    sign: bool = setting(True, "sign mail that is ours (OpenDKIM Mode s)")
    verify: bool = setting(True, "verify signatures on mail that is not ours (Mode v)")
    sign_socket: str = setting(
        "inet:8896@127.0.0.1",
        "where mail is signed when other filters follow dkim: a socket of its own, last "
        "in smtpd_milters, so signatures cover every edit of the chain (a checks REPLACE...) "
        "while verification (this table's `socket`) sees mail as received; empty: sign in "
        "`socket`, before the other filters' edits (they may break the signature)",
        check_optional_socket,
    )

    # -- signing: the simple case ---------------------------------------------
    domain: tuple[str, ...] = setting(
        (), "domains to sign for with key_file and selector (OpenDKIM Domain)"
    )
    selector: str = setting("", "selector of key_file (OpenDKIM Selector)")
    key_file: str = setting(
        "", "private key for `domain`: PEM or OpenDKIM .private, RSA or Ed25519 (KeyFile)"
    )
    ed25519_selector: str = setting(
        "", "selector of ed25519_key_file, for a second signature next to the RSA one"
    )
    ed25519_key_file: str = setting(
        "", "an Ed25519 private key for `domain`, signed with next to key_file (RFC 8463)"
    )
    sub_domains: bool = setting(
        False, "also sign mail from sub-domains of `domain` (OpenDKIM SubDomains)"
    )

    # -- signing: the table case ----------------------------------------------
    key_table: str = setting(
        "",
        "OpenDKIM KeyTable file: `name domain:selector:/path/to/key` per line; "
        "a domain of % means the sender's domain",
    )
    signing_table: str = setting(
        "",
        "OpenDKIM SigningTable file (refile: patterns): `*@example.com name [name...]`, "
        "`*.example.com`, `user@example.com` or `*` per line; the first match signs "
        "with each key named",
    )

    # -- signing: how ---------------------------------------------------------
    canonicalization: str = setting(
        "relaxed/relaxed", "header/body canonicalization (OpenDKIM Canonicalization)",
        check_canonicalization,
    )
    sign_headers: tuple[str, ...] = setting(
        DEFAULT_SIGN_HEADERS, "fields signed when present, RFC 6376 §5.4.1 (SignHeaders)"
    )
    oversign_headers: tuple[str, ...] = setting(
        DEFAULT_OVERSIGN_HEADERS,
        "fields signed once more than present, so none can be added (OversignHeaders)",
    )
    signature_ttl: int = setting(
        0, "seconds a signature stays valid (x= tag); 0: no expiry (SignatureTTL)",
        check_range(0, 10 * 365 * 86400),
    )
    body_length_tag: bool = setting(
        False, "add l= (signed body length); leaves room for appended text, so off"
    )
    sender_header_fallback: bool = setting(
        False,
        "when From names no domain we have a key for, sign for the Sender domain "
        "(OpenDKIM SenderHeaders)",
    )
    allow_insecure_keys: bool = setting(
        False,
        "accept key files readable by group or others, with a warning "
        "(OpenDKIM RequireSafeKeys false)",
    )

    # -- which mail is ours ---------------------------------------------------
    internal_hosts: tuple[str, ...] = setting(
        (),
        "networks whose mail is signed, besides [global] internal_networks (InternalHosts)",
        check_networks,
    )
    sign_authenticated: bool = setting(True, "sign mail from SASL-authenticated clients")
    sign_daemons: tuple[str, ...] = setting(
        ("ORIGINATING",),
        "Postfix daemon names ({daemon_name}, milter_macro_daemon_name) whose mail is "
        "signed, e.g. ORIGINATING on the submission service (OpenDKIM MTA)",
    )
    peer_hosts: tuple[str, ...] = setting(
        (), "networks whose mail is neither signed nor verified (OpenDKIM PeerList)",
        check_networks,
    )
    external_ignore: tuple[str, ...] = setting(
        (),
        "networks that may send as our domains without credentials: no warning is "
        "logged for them (OpenDKIM ExternalIgnoreList)",
        check_networks,
    )

    # -- verification ---------------------------------------------------------
    max_signatures: int = setting(
        10, "signatures verified per message, top down; more get no result and a log "
        "note (MaximumSignaturesToVerify)",
        check_range(1, 1000),
    )
    min_key_bits: int = setting(
        1024, "RSA keys shorter than this are a permerror, RFC 8301 §3.2 (MinimumKeyBits)",
        check_range(1024, 16384),
    )
    clock_skew: int = setting(
        300,
        "seconds of clock difference allowed when checking x= (expiry) and t= (future); "
        "an expired signature is a permerror, RFC 6376 §6.1.1 (libopendkim's clock drift)",
        check_range(0, 86400),
    )
    ignore_domains: tuple[str, ...] = setting(
        (),
        "signing domains (d=) not verified nor reported; .example.com: its sub-domains",
    )
    arc_verify: bool = setting(
        True,
        "validate the ARC chain (RFC 8617) of mail that is verified and write arc=pass, "
        "fail or none with smtp.remote-ip and header.oldest-pass; dmarc reads it for "
        "[dmarc] trusted_arc_sealers. Mail without ARC fields costs nothing more",
    )
    arc_seal: ArcSeal = setting(
        "off",
        'add an ARC set (RFC 8617) over our Authentication-Results to mail we forward, '
        'in the signing step, after every other edit: "off", "all" (all mail that is '
        'not ours: a host that relays what it receives) or "listed" (mail received '
        "through arc_seal_daemons, or with a recipient in arc_seal_recipient_domains); "
        "needs arc_verify and an RSA key for arc_seal_domain",
    )
    arc_seal_domain: str = setting(
        "",
        "d= of our ARC seals; its RSA key comes from key_file or the key_table/"
        "signing_table entry for that domain (default: the first of `domain`)",
    )
    arc_seal_daemons: tuple[str, ...] = setting(
        (),
        'with arc_seal = "listed": Postfix daemon names ({daemon_name}) whose mail is '
        "sealed, e.g. a smtpd with -o milter_macro_daemon_name=FORWARD",
    )
    arc_seal_recipient_domains: tuple[str, ...] = setting(
        (),
        'with arc_seal = "listed": mail with a recipient in these domains is sealed '
        "(domain, or .domain for its sub-domains), e.g. where aliases forward to",
    )
    on_bad_signature: OnResult = setting(
        "accept", "no signature passed and one failed (OpenDKIM On-BadSignature)"
    )
    on_no_signature: OnResult = setting(
        "accept", "no usable signature at all (OpenDKIM On-NoSignature)"
    )
    on_dns_error: OnResult = setting(
        "accept",
        "no signature passed and a key lookup failed for now (OpenDKIM On-DNSError, whose "
        "default is tempfail; accept leaves dkim=temperror to DMARC)",
    )
