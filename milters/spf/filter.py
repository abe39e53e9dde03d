"""The spf filter: check HELO and MAIL FROM at MAIL FROM, refuse at RCPT, report at the end.

The outcome is found once per message in on_mail (core/spf_eval.py, through the
shared resolver) and kept in the Transaction's notes; on_rcpt gives the refusal
it calls for (Postfix then refuses each recipient, as with policyd-spf), and
check() writes the Authentication-Results result and, if configured, a
Received-SPF field. The filter itself holds no per-message state.
"""

from __future__ import annotations

import ipaddress
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass

from milters.core import authresults
from milters.core.config import FilterSettings
from milters.core.filter import Env, Filter, Network, Stage
from milters.core.model import Connection, Transaction
from milters.core.spf_eval import SpfOutcome, check_helo, check_host
from milters.core.verdict import (
    ABOVE_RECEIVED,
    Action,
    AuthResult,
    EditKind,
    HeaderEdit,
    Reply,
    Verdict,
)
from milters.spf.settings import SpfSettings

RECEIVED_SPF = "Received-SPF"

# Reply texts (RFC 7372 §3.2: X.7.23 SPF validation failed, X.7.24 SPF validation
# error; RFC 3463 X.4.3: directory server failure). RFC 7208 §8.4 wants the
# domain's explanation (exp=) in the reply of a fail: it fills {explanation}.
REFUSED_TEXT = "SPF {result} for {what} {domain}: {explanation}"
TEMPERROR_TEXT = "SPF check of {what} {domain} failed for now, try again later"
PERMERROR_TEXT = "SPF record of {what} {domain} is invalid"

# Results each rule refuses. temperror and permerror have keys of their own, and
# not_pass (policyd-spf's SPF_Not_Pass: "reject if result not Pass/None/Tempfail")
# refuses permerror too; none is mail from a domain without SPF, never refused.
_REFUSED: Mapping[str, frozenset[str]] = types.MappingProxyType({
    "fail": frozenset({"fail"}),
    "softfail": frozenset({"fail", "softfail"}),
    "not_pass": frozenset({"fail", "softfail", "neutral", "permerror"}),
    "null": frozenset({"fail"}),
})

# RFC 5322 dot-atom: what may stand unquoted as a Received-SPF value (RFC 7208 §9.1).
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_MAX_EXPLANATION = 300


@dataclass(frozen=True)
class SpfDecision:
    """What on_mail found, for on_rcpt and check()."""

    mail_from: SpfOutcome | None = None  # None: not checked
    helo: SpfOutcome | None = None  # None: not checked (or the same as mail_from)
    refusal: Verdict | None = None  # what each recipient gets; None: accept
    skipped: str = ""  # why nothing was checked


class SpfFilter(Filter):
    """SPF checks of the HELO name and MAIL FROM (RFC 7208), replacing
    postfix-policyd-spf-python.

    Both identities are checked at MAIL FROM (HELO alone for the null sender);
    a result the policy refuses (mail_from_reject, helo_reject) refuses each
    recipient with 550 5.7.23 and the domain's explanation. Results go into
    Authentication-Results (spf=... smtp.mailfrom=... smtp.helo=...) and, if
    configured, Received-SPF. Internal, authenticated and skip_addresses clients
    are not checked.
    """

    name = "spf"
    default_port = 8892
    settings_class = SpfSettings
    stages = Stage.HELO | Stage.MAIL | Stage.RCPT
    ar_methods = frozenset({"spf"})

    def __init__(self, settings: FilterSettings, env: Env) -> None:
        super().__init__(settings, env)
        assert isinstance(settings, SpfSettings)
        self.spf = settings
        self.skip_networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in settings.skip_addresses
        )

    def describe(self) -> list[str]:
        s = self.spf
        return [f"MAIL FROM: reject on {s.mail_from_reject}; HELO: reject on {s.helo_reject}; "
                f"temperror: {s.on_temperror}; permerror: {s.on_permerror}"]

    # -- stage hooks --------------------------------------------------------------

    def on_mail(self, tx: Transaction) -> Verdict | None:
        tx.notes[self.name] = self.decide(tx)
        return None

    def on_rcpt(self, tx: Transaction, rcpt: str) -> Verdict | None:
        return self.decision(tx).refusal

    def check(self, tx: Transaction) -> Verdict:
        d = self.decision(tx)
        if d.skipped:
            return Verdict(reason=f"not checked: {d.skipped}")
        conn = tx.connection
        # The HELO result on its own when asked for, or when it is all there is
        # (mail_from_reject = "no_check").
        show_helo = self.spf.helo_result or d.mail_from is None
        reported = [o for o in (d.mail_from, d.helo if show_helo else None) if o]
        results = tuple(self.auth_result(o, conn.helo, helo_only=o is d.helo)
                        for o in reported)
        edits: tuple[HeaderEdit, ...] = ()
        if self.spf.received_spf:
            # RFC 7208 §9.1: prepended "above the Received: field that is generated
            # by the SMTP receiver".
            edits = tuple(
                HeaderEdit(EditKind.INSERT, RECEIVED_SPF,
                           received_spf(o, str(conn.client_ip), conn.helo, tx.mail_from,
                                        self.env.global_.authserv_id), index=ABOVE_RECEIVED)
                for o in reported
            )
        summary = ", ".join(f"{o.identity} {o.result} {o.domain or '-'}" for o in reported)
        return Verdict(reason=f"spf {summary or 'not checked'}", results=results,
                       header_edits=edits)

    # -- deciding -------------------------------------------------------------------

    def decision(self, tx: Transaction) -> SpfDecision:
        """The decision made at MAIL FROM; made now if that stage did not run."""
        found = tx.notes.get(self.name)
        if isinstance(found, SpfDecision):
            return found
        decision = self.decide(tx)
        tx.notes[self.name] = decision
        return decision

    def skips_internal(self) -> bool:
        return True  # skip_reason: an internal client is never checked

    def skip_reason(self, conn: Connection) -> str:
        if self.env.is_internal(conn):
            return "internal client"
        if conn.client_ip is None:
            return "no client address"
        if conn.sasl_user:
            return "authenticated client"
        ip = conn.client_ip
        if ip is not None and any(ip in net for net in self.skip_networks):
            return "client in skip_addresses"
        return ""

    def decide(self, tx: Transaction) -> SpfDecision:
        conn = tx.connection
        skipped = self.skip_reason(conn)
        if skipped:
            return SpfDecision(skipped=skipped)
        s = self.spf
        ip = str(conn.client_ip)
        resolver = self.env.resolver
        receiver = self.env.global_.authserv_id
        null_sender = not tx.mail_from
        helo: SpfOutcome | None = None
        if s.helo_reject != "no_check" and (
                null_sender or s.helo_result or s.helo_reject != "never"):
            helo = check_helo(ip, conn.helo, resolver, receiver)
        mail_from: SpfOutcome | None = None
        if s.mail_from_reject != "no_check":
            if null_sender and helo is not None:
                mail_from = helo  # RFC 7208 §2.4: the HELO identity stands in
            else:
                mail_from = check_host(ip, tx.mail_from, conn.helo, resolver, receiver)
        refusal = None
        if helo is not None:
            refusal = self.refusal(helo, s.helo_reject, null_sender, "HELO")
        if refusal is None and mail_from is not None:
            refusal = self.refusal(mail_from, s.mail_from_reject, null_sender, "MAIL FROM")
        return SpfDecision(mail_from, None if helo is mail_from else helo, refusal)

    def refusal(self, outcome: SpfOutcome, rule: str, null_sender: bool,
                what: str) -> Verdict | None:
        """The verdict for each recipient that `rule` gives `outcome`; None: accept."""
        if rule in ("never", "no_check") or (rule == "null" and not null_sender):
            return None
        result = outcome.result
        domain = outcome.domain or "-"
        reason = f"spf {outcome.identity} {result} {domain}"
        if result == "temperror":
            if self.spf.on_temperror != "tempfail":
                return None
            reply = Reply("451", "4.4.3", TEMPERROR_TEXT.format(what=what, domain=domain))
            return Verdict(Action.TEMPFAIL, reply=reply, reason=reason)
        if result == "permerror":
            if self.spf.on_permerror != "reject" and result not in _REFUSED[rule]:
                return None
            reply = Reply("550", "5.7.24", PERMERROR_TEXT.format(what=what, domain=domain))
            return Verdict(Action.REJECT, reply=reply, reason=reason)
        if result not in _REFUSED[rule]:
            return None
        text = REFUSED_TEXT.format(result=result, what=what, domain=domain,
                                   explanation=clean_text(outcome.explanation) or result)
        return Verdict(Action.REJECT, reply=Reply("550", "5.7.23", text), reason=reason)

    # -- reporting -------------------------------------------------------------------

    @staticmethod
    def auth_result(outcome: SpfOutcome, helo: str, helo_only: bool = False) -> AuthResult:
        """RFC 8601 §2.7.2: spf=<result> smtp.mailfrom=<sender> smtp.helo=<helo>.

        The MAIL FROM result names the identity checked (postmaster@HELO for the
        null sender) and the HELO name; a separate HELO result names the HELO only.
        """
        props: list[tuple[str, str, str]] = []
        comment = ""
        if not helo_only and outcome.sender:
            props.append(("smtp", "mailfrom", ar_address(ar_text(outcome.sender))))
            if outcome.identity == "helo":
                # RFC 7208 §2.4: for the null reverse-path the MAIL FROM identity IS
                # postmaster@HELO, and RFC 9989 §3.2.4 aligns it as such; the
                # comment tells a reader why the address is not one the client sent.
                comment = "null sender: HELO identity"
        if helo:
            # The HELO name is whatever the client said: never let it end the
            # property (`EHLO x;dkim=pass` would read as a result of its own).
            props.append(("smtp", "helo", authresults.quote_value(ar_text(helo))))
        return AuthResult("spf", outcome.result, properties=tuple(props), comment=comment)


def ar_text(text: str) -> str:
    """Client-given text made writable in a header field: bytes that were not UTF-8
    (surrogate escapes from the adapter) and control characters become "?"."""
    return "".join("?" if "\udc80" <= c <= "\udcff" or (c.isascii() and not c.isprintable())
                   else c for c in text)


def ar_address(address: str) -> str:
    """An RFC 8601 pvalue for an envelope address: local@domain when both parts are
    plain (dot-atoms), else a quoted-string, so no address can end the property."""
    local, at, domain = address.rpartition("@")
    if at and _DOT_ATOM.match(local) and _DOT_ATOM.match(domain):
        return address
    return authresults.quote_value(address)


def clean_text(text: str) -> str:
    """A domain's explanation made safe for an SMTP reply: printable ASCII, one line, short."""
    kept = "".join(c if c.isascii() and c.isprintable() else "?" for c in " ".join(text.split()))
    return kept[:_MAX_EXPLANATION]


def _quote(value: str) -> str:
    if _DOT_ATOM.match(value):
        return value
    return '"' + re.sub(r'(["\\])', r"\\\1", value) + '"'


_COMMENTS: Mapping[str, str] = types.MappingProxyType({
    "pass": "domain of {sender} designates {ip} as permitted sender",
    "fail": "domain of {sender} does not designate {ip} as permitted sender",
    "softfail": "domain of {sender} discourages use of {ip} as sender",
    "neutral": "{ip} is neither permitted nor denied by domain of {sender}",
    "none": "domain of {sender} does not publish SPF",
    "temperror": "temporary error while checking domain of {sender}",
    "permerror": "permanent error in the SPF record of domain of {sender}",
})


def received_spf(outcome: SpfOutcome, ip: str, helo: str, mail_from: str,
                 receiver: str) -> str:
    """The Received-SPF field value, RFC 7208 §9.1."""
    comment = _COMMENTS[outcome.result].format(sender=outcome.sender, ip=ip)
    pairs = [("client-ip", ip)]
    if mail_from:
        pairs.append(("envelope-from", mail_from))
    if helo:
        pairs.append(("helo", helo))
    if outcome.problem and outcome.result in ("permerror", "temperror"):
        pairs.append(("problem", clean_text(outcome.problem)[:200]))
    if outcome.mechanism:
        pairs.append(("mechanism", outcome.mechanism))
    pairs += [("receiver", receiver), ("identity", outcome.identity)]
    kv = "; ".join(f"{k}={_quote(clean_text(v))}" for k, v in pairs)
    # RFC 5322 §3.2.2: a comment's own parentheses and backslashes are quoted
    text = re.sub(r"([()\\])", r"\\\1", clean_text(f"{receiver}: {comment}"))
    value = f"{outcome.result} ({text}) {kv};"
    return authresults.fold(value, RECEIVED_SPF)
