"""One message's whole dialogue with a milter, as Postfix would have it:
`probe()` (connect, HELO, the transaction, QUIT) and `run_transaction()` on an
open session, both returning a `ProbeResult`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from milters.client.replies import (
    RecipientChange,
    SenderChange,
    StageReply,
    modification_dict,
)
from milters.client.session import MilterSession
from milters.client.wire import Negotiated
from milters.core.envelope import Envelope
from milters.core.sockets import SocketSpec
from milters.core.verdict import HeaderEdit

ProbeVerdict = Literal["accept", "reject", "tempfail", "discard", "continue"]


@dataclass
class ProbeResult:
    """One message's whole dialogue with a milter, as Postfix would have had it."""

    spec: str
    negotiated: Negotiated
    stages: list[StageReply] = field(default_factory=list)
    verdict: ProbeVerdict = "continue"
    smtp_reply: str = ""
    decided_at: str = ""  # the stage whose answer settled the verdict
    quarantine: str = ""
    rejected_recipients: dict[str, str] = field(default_factory=dict)
    header_edits: list[HeaderEdit] = field(default_factory=list)
    recipient_changes: list[RecipientChange] = field(default_factory=list)
    sender_change: SenderChange | None = None
    replaced_body: bytes | None = None
    elapsed_ms: float = 0.0

    @property
    def delivered(self) -> bool:
        """True when Postfix would queue the message (for at least one recipient)."""
        return self.verdict in ("accept", "continue")

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "negotiated": {
                "version": self.negotiated.version,
                "actions": self.negotiated.action_names,
                "protocol": self.negotiated.protocol_names,
                "macro_lists": {k: list(v) for k, v in self.negotiated.macro_lists.items()},
            },
            "verdict": self.verdict,
            "smtp_reply": self.smtp_reply,
            "decided_at": self.decided_at,
            "quarantine": self.quarantine,
            "rejected_recipients": dict(self.rejected_recipients),
            "header_edits": [modification_dict(e) for e in self.header_edits],
            "recipient_changes": [modification_dict(c) for c in self.recipient_changes],
            "sender_change": None
            if self.sender_change is None
            else {"address": self.sender_change.address, "params": self.sender_change.params},
            "replaced_body": None
            if self.replaced_body is None
            else self.replaced_body.decode("utf-8", "replace"),
            "stages": [s.to_dict() for s in self.stages],
            "elapsed_ms": round(self.elapsed_ms, 3),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)


def run_transaction(
    session: MilterSession, message: bytes, envelope: Envelope | None = None
) -> ProbeResult:
    """MAIL FROM .. end of message on an open, greeted session, then SMFIC_ABORT.

    Follows Postfix: a reject at RCPT rejects only that recipient; a final answer
    at any other stage ends the transaction; ACCEPT before end of message means
    "no more events for this message".
    """
    if envelope is not None:
        session.envelope = envelope
    env = session.envelope
    if not env.rcpt_to:
        raise ValueError("the envelope has no recipient (RCPT TO)")
    result = ProbeResult(str(session.spec), session.negotiated)
    started = time.perf_counter()
    try:
        _transaction(session, message, env, result)
    finally:
        result.elapsed_ms = (time.perf_counter() - started) * 1000.0
    if session.is_open:
        session.abort()
    return result


def _transaction(
    session: MilterSession, message: bytes, env: Envelope, result: ProbeResult
) -> None:
    reply = session.mail()
    _record(result, reply)
    if reply.final:
        _decide(result, reply)
        return
    accepted = 0
    for rcpt in env.rcpt_to:
        reply = session.rcpt(rcpt)
        _record(result, reply)
        if reply.action in ("reject", "tempfail"):
            result.rejected_recipients[rcpt] = reply.smtp_reply
            continue
        if reply.final:  # accept, discard, shutdown: the whole message
            _decide(result, reply)
            return
        accepted += 1
    if not accepted:
        # No valid recipient: Postfix never gets to DATA. The message's fate is
        # that of the last recipient's rejection.
        last = next(s for s in reversed(result.stages) if s.stage == "rcpt")
        _decide(result, last)
        return
    reply = session.data()
    _record(result, reply)
    if reply.final:
        _decide(result, reply)
        return
    for reply in session.message(message):
        _record(result, reply)
        if reply.final or reply.stage == "eom":
            _decide(result, reply)
            return


def _record(result: ProbeResult, reply: StageReply) -> None:
    result.stages.append(reply)
    if reply.quarantine:
        result.quarantine = reply.quarantine
    for mod in reply.modifications:
        if isinstance(mod, HeaderEdit):
            result.header_edits.append(mod)
        elif isinstance(mod, RecipientChange):
            result.recipient_changes.append(mod)
        else:
            result.sender_change = mod
    if reply.replaced_body is not None:
        result.replaced_body = reply.replaced_body


def _decide(result: ProbeResult, reply: StageReply) -> None:
    result.decided_at = reply.stage
    verdicts: dict[str, ProbeVerdict] = {
        "accept": "accept",
        "reject": "reject",
        "tempfail": "tempfail",
        "discard": "discard",
        "shutdown": "tempfail",  # 421: try again later
        "conn_fail": "tempfail",
    }
    result.verdict = verdicts.get(reply.action, "continue")
    result.smtp_reply = reply.smtp_reply


def probe(
    spec: str | SocketSpec,
    message: bytes,
    envelope: Envelope | None = None,
    timeout: float = 10.0,
    **session_options: Any,
) -> ProbeResult:
    """Run one message through a milter as Postfix would, and report everything.

    Connect, negotiate, CONNECT, HELO, then the transaction (see run_transaction),
    then QUIT. A final answer at CONNECT or HELO ends the session there, as in
    Postfix (which then closes the socket without QUIT).
    """
    env = envelope or Envelope()
    started = time.perf_counter()
    with MilterSession(spec, timeout=timeout, **session_options) as session:
        session.envelope = env
        early: list[StageReply] = []
        for step in (session.connect, session.helo):
            reply = step()
            early.append(reply)
            if reply.final and reply.action != "discard":
                # milter8.c: a decision at CONNECT/HELO covers the whole SMTP
                # session; DISCARD there is not allowed and counts as continue.
                result = ProbeResult(str(session.spec), session.negotiated)
                for r in early:
                    _record(result, r)
                _decide(result, reply)
                session.close()
                result.elapsed_ms = (time.perf_counter() - started) * 1000.0
                return result
        result = run_transaction(session, message, env)
        result.stages[:0] = early
        for r in early:
            if r.quarantine and not result.quarantine:
                result.quarantine = r.quarantine
    result.elapsed_ms = (time.perf_counter() - started) * 1000.0
    return result

