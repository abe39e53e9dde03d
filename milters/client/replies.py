"""What a milter answers at one stage: the action, Postfix's reply text, and the
modifications it asks for at end of message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from milters.core.verdict import HeaderEdit


@dataclass(frozen=True)
class RecipientChange:
    """SMFIR_ADDRCPT / ADDRCPT_PAR (add, with ESMTP params) or SMFIR_DELRCPT."""

    kind: Literal["add", "delete"]
    address: str
    params: str = ""

    def describe(self) -> str:
        sign = "+" if self.kind == "add" else "-"
        return f"{sign} {self.address}" + (f" {self.params}" if self.params else "")


@dataclass(frozen=True)
class SenderChange:
    """SMFIR_CHGFROM: a new envelope sender, with optional ESMTP params."""

    address: str
    params: str = ""


Modification = HeaderEdit | RecipientChange | SenderChange

Action = Literal[
    "continue", "accept", "reject", "tempfail", "discard", "skip", "shutdown", "conn_fail"
]


@dataclass(frozen=True)
class StageReply:
    """What the milter answered at one stage.

    `sent` is False when the stage was not sent (negotiated away, or skipped after
    SMFIR_SKIP); `replied` is False when no reply was awaited (SMFIP_NR_*). Both
    read as "continue". `smtp_reply` is the text Postfix would give the SMTP
    client for reject/tempfail/shutdown: the milter's SMFIR_REPLYCODE, or
    Postfix's default text.
    """

    stage: str
    action: Action = "continue"
    smtp_reply: str = ""
    argument: str = ""
    sent: bool = True
    replied: bool = True
    custom_reply: bool = False
    quarantine: str = ""
    modifications: tuple[Modification, ...] = ()
    replaced_body: bytes | None = None
    elapsed_ms: float = 0.0
    note: str = ""

    @property
    def final(self) -> bool:
        """True when this answer ends the transaction (or the connection)."""
        return self.action not in ("continue", "skip")

    def describe(self) -> str:
        if not self.sent:
            return f"not sent ({self.note})" if self.note else "not sent"
        text: str = self.action
        if self.smtp_reply:
            text += f": {self.smtp_reply}"
        if not self.replied:
            text += " (no reply expected)"
        if self.quarantine:
            text += f" [quarantine: {self.quarantine}]"
        if self.note:
            text += f" ({self.note})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "argument": self.argument,
            "action": self.action,
            "smtp_reply": self.smtp_reply,
            "sent": self.sent,
            "replied": self.replied,
            "custom_reply": self.custom_reply,
            "quarantine": self.quarantine,
            "modifications": [modification_dict(m) for m in self.modifications],
            "replaced_body_bytes": None if self.replaced_body is None else len(self.replaced_body),
            "elapsed_ms": round(self.elapsed_ms, 3),
            "note": self.note,
        }


def modification_dict(m: Modification) -> dict[str, Any]:
    """One modification as JSON data (`milters probe --json`)."""
    if isinstance(m, HeaderEdit):
        return {
            "type": "header",
            "op": m.kind.value,
            "name": m.name,
            "value": m.value,
            "index": m.index,
        }
    if isinstance(m, RecipientChange):
        return {"type": "recipient", "op": m.kind, "address": m.address, "params": m.params}
    return {"type": "sender", "address": m.address, "params": m.params}
