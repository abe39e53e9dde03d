"""Site policy applied to every filter's verdict, in one place.

A filter says what the message deserves; this module says what the site lets
it do: `mode = "report"` (log and tag, change nothing), `soft_bounce` (5xx
becomes 4xx, as in Postfix), `bypass_recipients` (never refused), and
`on_error` (what an internal error gives).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from milters.core.domains import DomainList
from milters.core.verdict import (
    REPLY_INTERNAL_ERROR,
    REPLY_REJECT,
    REPLY_TEMPFAIL,
    Action,
    EditKind,
    HeaderEdit,
    Reply,
    Verdict,
)

REPORT_HEADER = "X-Milters-Report"
# Header edits that alter what the sender wrote (report mode holds them back).
_ALTERING = frozenset({EditKind.CHANGE, EditKind.DELETE})

# RFC 3463 §3.6 / RFC 5321 §4.5.3.1.10: a recipient whose policy differs from the
# recipients already accepted must be sent in a transaction of its own.
REPLY_SPLIT_TRANSACTION = Reply(
    "452", "4.5.3", "recipients with a different filtering policy: send them separately"
)


@dataclass(frozen=True)
class SitePolicy:
    """The settings this module needs, resolved for one filter."""

    filter_name: str
    mode: str  # "enforce" | "report"
    soft_bounce: bool
    on_error: str  # "tempfail" | "accept"
    bypass_recipients: tuple[str, ...]


def is_bypassed(rcpt: str, patterns: Sequence[str]) -> bool:
    """True when `rcpt` matches a bypass entry.

    Entries, as in Postfix access tables: `user@domain` (exact), `user@` (that
    local part at any domain), `domain` (that domain), `.domain` (its sub-domains).
    """
    address = rcpt.strip().strip("<>").lower()
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    for entry in patterns:
        e = entry.strip().lower()
        if not e:
            continue
        if "@" in e:
            if e.endswith("@"):
                if local == e[:-1]:
                    return True
            elif e.startswith("@"):
                if domain == e[1:]:
                    return True
            elif address == e:
                return True
        elif domain in DomainList.of((e,)):  # domain or .domain (core/domains.py)
            return True
    return False


def describe(verdict: Verdict) -> str:
    """A short text for logs and the report header: `reject 550 5.7.1 ...`."""
    if verdict.action is Action.ACCEPT and verdict.quarantine:
        words = [f"quarantine ({verdict.quarantine})"]
    else:
        words = [verdict.action.name.lower()]
        if verdict.reply is not None and verdict.action is not Action.ACCEPT:
            words.append(str(verdict.reply))
        if verdict.quarantine:
            words.append(f"quarantine ({verdict.quarantine})")
    if verdict.reason:
        words.append(f"[{verdict.reason}]")
    return " ".join(words)


def _would(verdict: Verdict) -> bool:
    """Does the verdict do anything that report mode holds back?

    Report mode is a dry run of everything that refuses, diverts or alters mail:
    refusals, quarantine, recipient and body changes, changed or deleted header
    fields. Fields a filter only adds (results, X-Virus-Status, a signature) are
    information and go through.
    """
    return bool(
        verdict.action is not Action.ACCEPT
        or verdict.quarantine
        or verdict.add_rcpts
        or verdict.del_rcpts
        or verdict.replace_body is not None
        or any(e.kind in _ALTERING for e in verdict.header_edits)
    )


def report_only(verdict: Verdict, policy: SitePolicy) -> Verdict:
    """Report mode: keep AR results, add a report header, change nothing else."""
    if not _would(verdict):
        return verdict
    text = f"{policy.filter_name} would {describe(verdict)}"
    held = [e for e in verdict.header_edits if e.kind in _ALTERING]
    kept = tuple(e for e in verdict.header_edits if e.kind not in _ALTERING)
    extra = [e.describe() for e in held]
    extra += [f"add recipient {r}" for r in verdict.add_rcpts]
    extra += [f"delete recipient {r}" for r in verdict.del_rcpts]
    if verdict.replace_body is not None:
        extra.append("replace the body")
    if extra:
        text += "; " + "; ".join(extra)
    return Verdict(
        action=Action.ACCEPT,
        reason=f"report mode: would {describe(verdict)}",
        results=verdict.results,
        header_edits=(*kept, report_edit(text)),
        log_notes=verdict.log_notes,
    )


def report_edit(text: str, limit: int = 900) -> HeaderEdit:
    """The X-Milters-Report field saying what was held back, on one line."""
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return HeaderEdit(EditKind.ADD, REPORT_HEADER, text)


def default_reply(action: Action) -> Reply | None:
    if action is Action.REJECT:
        return REPLY_REJECT
    if action is Action.TEMPFAIL:
        return REPLY_TEMPFAIL
    return None


def _with_reply(verdict: Verdict) -> Verdict:
    """A refusal without a reply gets the named default one."""
    if verdict.reply is None and verdict.action in (Action.REJECT, Action.TEMPFAIL):
        return replace(verdict, reply=default_reply(verdict.action))
    return verdict


def _soft_bounced(verdict: Verdict, policy: SitePolicy) -> Verdict:
    """Postfix's soft_bounce: a 5xx rejection becomes the 4xx deferral."""
    if policy.soft_bounce and verdict.reply is not None and verdict.action is Action.REJECT:
        return replace(verdict, action=Action.TEMPFAIL, reply=verdict.reply.softened())
    return verdict


def finalize(verdict: Verdict, policy: SitePolicy, rcpt_to: Sequence[str] = ()) -> Verdict:
    """The verdict the adapter carries out, after site policy."""
    verdict = _with_reply(verdict)
    if (
        verdict.action in (Action.REJECT, Action.DISCARD, Action.TEMPFAIL)
        and rcpt_to
        and policy.bypass_recipients
        and all(is_bypassed(r, policy.bypass_recipients) for r in rcpt_to)
    ):
        # Recipients are kept homogeneous at RCPT time (see split_reply), so
        # "all bypassed" is the only case left: deliver, and say what was spared.
        return Verdict(
            action=Action.ACCEPT,
            reason=f"bypass recipients: would {describe(verdict)}",
            results=verdict.results,
            header_edits=(report_edit(
                f"{policy.filter_name} would {describe(verdict)} (bypass recipient)"),),
            log_notes=verdict.log_notes,
        )
    if policy.mode == "report":
        return report_only(verdict, policy)
    return _soft_bounced(verdict, policy)


def finalize_stage(verdict: Verdict, policy: SitePolicy, rcpt: str = "") -> Verdict:
    """Policy for an early (connect/HELO/MAIL/RCPT) decision.

    In report mode nothing is refused early: the note is carried to end of
    message by the adapter and reported there.
    """
    if verdict.action is Action.ACCEPT:
        return verdict
    verdict = _with_reply(verdict)
    if rcpt and policy.bypass_recipients and is_bypassed(rcpt, policy.bypass_recipients):
        return Verdict(reason=f"bypass recipient {rcpt}: would {describe(verdict)}")
    if policy.mode == "report":
        return Verdict(reason=f"report mode: would {describe(verdict)}")
    return _soft_bounced(verdict, policy)


def split_reply(rcpt_to: Sequence[str], rcpt: str, policy: SitePolicy) -> Reply | None:
    """A 452 4.5.3 for a recipient whose bypass class differs from the first one's.

    A reject at end of message refuses every recipient at once, so a message for
    postmaster@ and for a user cannot be both spared and refused. Deferring the
    odd recipient makes the client send it in a second transaction (RFC 5321
    §3.3); nothing is lost and no policy is bypassed by adding a recipient.
    """
    if not policy.bypass_recipients or not rcpt_to:
        return None
    first = is_bypassed(rcpt_to[0], policy.bypass_recipients)
    if is_bypassed(rcpt, policy.bypass_recipients) != first:
        return REPLY_SPLIT_TRANSACTION
    return None


def error_verdict(policy: SitePolicy, what: str) -> Verdict:
    """What an internal error yields: on_error = tempfail (4xx) or accept."""
    if policy.on_error == "accept":
        return Verdict(reason=f"error, accepted per on_error: {what}")
    return Verdict(Action.TEMPFAIL, reply=REPLY_INTERNAL_ERROR, reason=f"error: {what}")
