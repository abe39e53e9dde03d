"""What a filter decides: a Verdict (action, reply, results, edits), and named replies.

A Verdict knows nothing of pymilter; the adapter turns it into milter actions.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace


class Action(enum.IntEnum):
    """The message's fate. Ordered by strength: when two decisions meet, the larger wins."""

    ACCEPT = 0
    DISCARD = 1
    TEMPFAIL = 2
    REJECT = 3


_CODE = re.compile(r"^([45])\d\d$")
_XCODE = re.compile(r"^([45])\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: `550 5.7.1 text`."""

    code: str
    xcode: str
    text: str

    def __post_init__(self) -> None:
        if not _CODE.match(self.code):
            raise ValueError(f"bad SMTP reply code {self.code!r}")
        if self.xcode and not _XCODE.match(self.xcode):
            raise ValueError(f"bad enhanced status code {self.xcode!r}")
        if self.xcode and self.xcode[0] != self.code[0]:
            raise ValueError(f"reply code {self.code} and status {self.xcode} disagree")

    @property
    def temporary(self) -> bool:
        return self.code.startswith("4")

    def softened(self) -> Reply:
        """The 4xx form of a 5xx reply, as Postfix's soft_bounce makes it."""
        if not self.code.startswith("5"):
            return self
        xcode = "4" + self.xcode[1:] if self.xcode else ""
        return Reply("4" + self.code[1:], xcode, self.text)

    def __str__(self) -> str:
        return " ".join(p for p in (self.code, self.xcode, self.text) if p)


# Named replies: reply text never comes from exception text.
REPLY_REJECT = Reply("550", "5.7.1", "message content rejected")
REPLY_TEMPFAIL = Reply("451", "4.7.1", "temporary failure, please try again later")
REPLY_INTERNAL_ERROR = Reply("451", "4.3.0", "temporary local problem, please try again later")


@dataclass(frozen=True)
class AuthResult:
    """One RFC 8601 method result, e.g. dkim=pass header.d=example.com."""

    method: str
    result: str
    reason: str = ""
    properties: tuple[tuple[str, str, str], ...] = ()  # (ptype, property, value)
    version: str = ""  # method version, rarely used
    comment: str = ""  # RFC 8601 result comment, e.g. dmarc's "p=reject dis=none"


# An INSERT position: above every field, Postfix's own Received field included
# (milters are not shown it). Where RFC 8601 §5 wants Authentication-Results and
# RFC 7208 §9.1 Received-SPF: above the Received field of the MTA that did the check.
ABOVE_RECEIVED = -1


class EditKind(enum.Enum):
    ADD = "add"  # append at the end of the header
    INSERT = "insert"  # insert before the field the filter saw at this 0-based position
    CHANGE = "change"  # replace the n-th (1-based) field of that name
    DELETE = "delete"  # remove the n-th (1-based) field of that name


@dataclass(frozen=True)
class HeaderEdit:
    kind: EditKind
    name: str
    value: str = ""
    index: int = 0  # INSERT: position; CHANGE/DELETE: occurrence, 1-based

    def describe(self) -> str:
        if self.kind is EditKind.ADD:
            return f"add header {self.name}: {self.value}"
        if self.kind is EditKind.INSERT:
            return f"insert header at {self.index} {self.name}: {self.value}"
        if self.kind is EditKind.CHANGE:
            return f"change header {self.name}[{self.index}] to: {self.value}"
        return f"delete header {self.name}[{self.index}]"


@dataclass(frozen=True)
class Verdict:
    """A filter's decision about one message (or one SMTP stage).

    `action` ends the transaction; `quarantine` (Postfix HOLD) and the edits
    ride along with an ACCEPT. `reason` is for the log line, never the client.
    """

    action: Action = Action.ACCEPT
    reply: Reply | None = None
    reason: str = ""
    quarantine: str = ""
    results: tuple[AuthResult, ...] = ()
    header_edits: tuple[HeaderEdit, ...] = ()
    add_rcpts: tuple[str, ...] = ()
    del_rcpts: tuple[str, ...] = ()
    replace_body: bytes | None = None
    log_notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def final(self) -> bool:
        """True when the message's fate is sealed (nothing later can change it)."""
        return self.action is not Action.ACCEPT

    def with_reply(self, reply: Reply) -> Verdict:
        return replace(self, reply=reply)


ACCEPT = Verdict()


def reject(reply: Reply = REPLY_REJECT, reason: str = "") -> Verdict:
    return Verdict(Action.REJECT, reply=reply, reason=reason)


def tempfail(reply: Reply = REPLY_TEMPFAIL, reason: str = "") -> Verdict:
    return Verdict(Action.TEMPFAIL, reply=reply, reason=reason)


def merge(early: list[Verdict], last: Verdict) -> Verdict:
    """Fold non-final decisions made at earlier stages into the end-of-message one.

    An early HOLD, BCC or WARN (client_checks, sender_checks...) rides along with
    whatever the message-level check decides.
    """
    if not early:
        return last
    quarantine = last.quarantine
    edits: list[HeaderEdit] = []
    add: list[str] = []
    delete: list[str] = []
    notes: list[str] = []
    reasons: list[str] = []
    for v in early:
        quarantine = quarantine or v.quarantine
        edits += v.header_edits
        add += v.add_rcpts
        delete += v.del_rcpts
        notes += v.log_notes
        if v.reason:
            reasons.append(v.reason)
    if last.reason:
        reasons.append(last.reason)
    return replace(
        last,
        quarantine=quarantine,
        header_edits=(*edits, *last.header_edits),
        add_rcpts=(*add, *last.add_rcpts),
        del_rcpts=(*delete, *last.del_rcpts),
        log_notes=(*notes, *last.log_notes),
        reason="; ".join(reasons),
    )
