"""A milter protocol (version 6) client that talks to any milter as Postfix does.

Used by `milters probe`, by the protocol tests and by the benchmarks. It speaks
the Sendmail 8 milter wire protocol (libmilter's mfdef.h: SMFIC_* commands,
SMFIR_* replies, SMFIF_* action flags, SMFIP_* protocol flags) and follows what
Postfix 3.7's milter client (src/milter/milter8.c) does on the wire:

- OPTNEG offers protocol version 6, every action and every protocol bit
  Postfix offers with `milter_protocol = 6`; the milter's answer is honoured: a
  step it negotiated away (SMFIP_NO*) is not sent, a reply it said it will not
  send (SMFIP_NR_*) is not waited for, and macro lists it asked for
  (SMFIR_SETSYMLIST data after the OPTNEG reply) replace the defaults per stage.
- Before each event an SMFIC_MACRO packet carries that stage's macros (Postfix's
  `milter_*_macros` defaults), also for envelope events the milter negotiated
  away, as Postfix does; header events carry the end-of-header list and body
  chunks the end-of-data list.
- Header values are sent as Postfix sends them: the bytes after the colon with
  folded lines joined by "\\n", one leading space removed unless the milter
  negotiated SMFIP_HDR_LEADSPC. The body follows with CRLF line ends in
  SMFIC_BODY chunks of at most 65535 bytes, then an empty SMFIC_BODYEOB.
- After every transaction that got as far as MAIL FROM an SMFIC_ABORT is sent
  (Postfix's smtpd calls milter_abort() from mail_reset()), so several
  messages can share one connection; SMFIC_QUIT ends the session.

`MilterSession` is the step-by-step API; `probe()` runs a whole SMTP dialogue
and returns a `ProbeResult` that `format_probe()` renders for an administrator.
"""

from __future__ import annotations

import contextlib
import enum
import json
import re
import secrets
import socket
import struct
import time
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, NoReturn

from milters.core import model
from milters.core.addresses import parse_address_list
from milters.core.errors import MiltersError
from milters.core.sockets import SocketSpec, parse_socket
from milters.core.verdict import EditKind, HeaderEdit

__all__ = [
    "ALL_ACTIONS",
    "DEFAULT_MACRO_LISTS",
    "POSTFIX_PROTOCOL",
    "ActionFlag",
    "Envelope",
    "MilterClientError",
    "MilterClosed",
    "MilterSession",
    "MilterTimeout",
    "MilterUnavailable",
    "Negotiated",
    "ProbeResult",
    "ProtocolError",
    "ProtocolFlag",
    "RecipientChange",
    "SenderChange",
    "StageReply",
    "apply_header_edits",
    "format_probe",
    "new_queue_id",
    "parse_message",
    "probe",
    "run_transaction",
]

# ---------------------------------------------------------------------------
# Errors


class MilterClientError(MiltersError):
    """the milter dialogue failed"""


class ProtocolError(MilterClientError):
    """the milter broke the milter protocol"""


class MilterTimeout(MilterClientError):
    """the milter did not answer in time"""


class MilterClosed(MilterClientError):
    """the milter closed the connection in the middle of the dialogue"""


class MilterUnavailable(MilterClientError):
    """cannot connect to the milter"""


# ---------------------------------------------------------------------------
# Protocol constants (libmilter mfdef.h)

PROTOCOL_VERSION = 6

# Commands, MTA to milter.
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# Replies, milter to MTA.
SMFIR_ADDRCPT = b"+"
SMFIR_DELRCPT = b"-"
SMFIR_ADDRCPT_PAR = b"2"
SMFIR_SHUTDOWN = b"4"
SMFIR_ACCEPT = b"a"
SMFIR_REPLBODY = b"b"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_CHGFROM = b"e"
SMFIR_CONN_FAIL = b"f"
SMFIR_ADDHEADER = b"h"
SMFIR_INSHEADER = b"i"
SMFIR_SETSYMLIST = b"l"
SMFIR_CHGHEADER = b"m"
SMFIR_PROGRESS = b"p"
SMFIR_QUARANTINE = b"q"
SMFIR_REJECT = b"r"
SMFIR_SKIP = b"s"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"

_REPLY_NAMES = types.MappingProxyType({
    SMFIR_ADDRCPT: "ADDRCPT",
    SMFIR_DELRCPT: "DELRCPT",
    SMFIR_ADDRCPT_PAR: "ADDRCPT_PAR",
    SMFIR_SHUTDOWN: "SHUTDOWN",
    SMFIR_ACCEPT: "ACCEPT",
    SMFIR_REPLBODY: "REPLBODY",
    SMFIR_CONTINUE: "CONTINUE",
    SMFIR_DISCARD: "DISCARD",
    SMFIR_CHGFROM: "CHGFROM",
    SMFIR_CONN_FAIL: "CONN_FAIL",
    SMFIR_ADDHEADER: "ADDHEADER",
    SMFIR_INSHEADER: "INSHEADER",
    SMFIR_SETSYMLIST: "SETSYMLIST",
    SMFIR_CHGHEADER: "CHGHEADER",
    SMFIR_PROGRESS: "PROGRESS",
    SMFIR_QUARANTINE: "QUARANTINE",
    SMFIR_REJECT: "REJECT",
    SMFIR_SKIP: "SKIP",
    SMFIR_TEMPFAIL: "TEMPFAIL",
    SMFIR_REPLYCODE: "REPLYCODE",
    SMFIC_OPTNEG: "OPTNEG",
})

# Connect families (SMFIA_*).
SMFIA_UNKNOWN = b"U"
SMFIA_UNIX = b"L"
SMFIA_INET = b"4"
SMFIA_INET6 = b"6"


class ActionFlag(enum.IntFlag):
    """SMFIF_*: what the milter may do at end of message."""

    ADDHDRS = 0x01
    CHGBODY = 0x02
    ADDRCPT = 0x04
    DELRCPT = 0x08
    CHGHDRS = 0x10
    QUARANTINE = 0x20
    CHGFROM = 0x40
    ADDRCPT_PAR = 0x80
    SETSYMLIST = 0x100


class ProtocolFlag(enum.IntFlag):
    """SMFIP_*: steps the milter does not want (NO*), replies it won't send (NR_*)."""

    NOCONNECT = 0x1
    NOHELO = 0x2
    NOMAIL = 0x4
    NORCPT = 0x8
    NOBODY = 0x10
    NOHDRS = 0x20
    NOEOH = 0x40
    NR_HDR = 0x80
    NOUNKNOWN = 0x100
    NODATA = 0x200
    SKIP = 0x400
    RCPT_REJ = 0x800
    NR_CONN = 0x1000
    NR_HELO = 0x2000
    NR_MAIL = 0x4000
    NR_RCPT = 0x8000
    NR_DATA = 0x10000
    NR_UNKN = 0x20000
    NR_EOH = 0x40000
    NR_BODY = 0x80000
    HDR_LEADSPC = 0x100000
    MDS_256K = 0x10000000
    MDS_1M = 0x20000000


ALL_ACTIONS = ActionFlag(0x1FF)
# milter8.c MILTER8_V6_PROTO_MASK: every NO* and NR_* bit, SKIP, RCPT_REJ and
# HDR_LEADSPC; that is what Postfix 3.7 offers with milter_protocol = 6.
POSTFIX_PROTOCOL = ProtocolFlag(0x1FFFFF)

# Macro stages (SMFIM_*), the numbers SMFIR_SETSYMLIST data uses.
MACRO_STAGES = types.MappingProxyType(
    {0: "connect", 1: "helo", 2: "mail", 3: "rcpt", 4: "data", 5: "eom", 6: "eoh"}
)

# `postconf -d` of Postfix 3.7.11: milter_connect_macros ... milter_end_of_data_macros.
# Header events carry the end-of-header list, body chunks the end-of-data list.
DEFAULT_MACRO_LISTS: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    "connect": ("j", "{daemon_name}", "{daemon_addr}", "v", "_"),
    "helo": ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}"),
    "mail": (
        "i",
        "{auth_type}",
        "{auth_authen}",
        "{auth_author}",
        "{mail_addr}",
        "{mail_host}",
        "{mail_mailer}",
    ),
    "rcpt": ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
    "data": ("i",),
    "eoh": ("i",),
    "eom": ("i",),
    "unknown": (),
})

POSTFIX_VERSION_MACRO = "Postfix 3.7.11"  # `v` = $mail_name $mail_version
MILTER_CHUNK_SIZE = 65535  # milter8.c: body chunk size
MAX_PACKET = 64 * 1024 * 1024  # larger is garbage (an HTTP server answers "HTTP" = 1.2 GB)

# Postfix's reply texts when a milter answers without SMFIR_REPLYCODE (milter8.c).
POSTFIX_REJECT_TEXT = "550 5.7.1 Command rejected"
POSTFIX_TEMPFAIL_TEXT = "451 4.7.1 Service unavailable - try again later"
POSTFIX_SHUTDOWN_TEXT = "421 4.7.0 Server closing connection"

_LEADSPC_BIT = int(ProtocolFlag.HDR_LEADSPC)
_LEN = struct.Struct(">I")
_HDR = struct.Struct(">IB")


# ---------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class _Event:
    name: str
    cmd: bytes
    no_flag: ProtocolFlag  # the SMFIP_NO* bit that negotiates it away
    nr_flag: ProtocolFlag  # the SMFIP_NR_* bit that drops its reply
    macros: str  # which macro list rides along
    # milter8.c sends envelope-stage macros even when the event itself was
    # negotiated away; content callbacks are not run at all then (no macros).
    macros_when_skipped: bool
    no_bit: int = field(init=False)  # the flags as plain ints, for speed
    nr_bit: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "no_bit", int(self.no_flag))
        object.__setattr__(self, "nr_bit", int(self.nr_flag))


_NONE = ProtocolFlag(0)
_CONNECT = _Event(
    "connect", SMFIC_CONNECT, ProtocolFlag.NOCONNECT, ProtocolFlag.NR_CONN, "connect", True
)
_HELO = _Event("helo", SMFIC_HELO, ProtocolFlag.NOHELO, ProtocolFlag.NR_HELO, "helo", True)
_MAIL = _Event("mail", SMFIC_MAIL, ProtocolFlag.NOMAIL, ProtocolFlag.NR_MAIL, "mail", True)
_RCPT = _Event("rcpt", SMFIC_RCPT, ProtocolFlag.NORCPT, ProtocolFlag.NR_RCPT, "rcpt", True)
_DATA = _Event("data", SMFIC_DATA, ProtocolFlag.NODATA, ProtocolFlag.NR_DATA, "data", True)
_UNKNOWN = _Event(
    "unknown", SMFIC_UNKNOWN, ProtocolFlag.NOUNKNOWN, ProtocolFlag.NR_UNKN, "unknown", True
)
_HEADER = _Event("header", SMFIC_HEADER, ProtocolFlag.NOHDRS, ProtocolFlag.NR_HDR, "eoh", False)
_EOH = _Event("eoh", SMFIC_EOH, ProtocolFlag.NOEOH, ProtocolFlag.NR_EOH, "eoh", False)
_BODY = _Event("body", SMFIC_BODY, ProtocolFlag.NOBODY, ProtocolFlag.NR_BODY, "eom", False)
_EOM = _Event("eom", SMFIC_BODYEOB, _NONE, _NONE, "eom", False)


def new_queue_id() -> str:
    """A Postfix-looking short queue id (10 upper-case hex digits)."""
    return secrets.token_hex(5).upper()


@dataclass
class Envelope:
    """What the MTA knows about the SMTP client and the message envelope.

    `macros` adds or overrides macro values by name (`"{tls_version}"`, `"j"`);
    a stage sends the macros of its list that have a value, as Postfix does.
    """

    client_ip: str = "192.0.2.1"  # "" for a local submission (no client address)
    client_port: int = 40000
    client_name: str = "unknown"  # verified name; Postfix says "unknown" without one
    helo: str = "client.example"
    mail_from: str = "sender@example.com"  # without angle brackets; "" = null sender
    mail_params: tuple[str, ...] = ()
    rcpt_to: list[str] = field(default_factory=lambda: ["recipient@example.com"])
    auth_user: str = ""  # SASL login -> {auth_authen}
    auth_type: str = "PLAIN"  # -> {auth_type}, sent only with auth_user
    daemon_name: str = "mta.localhost"  # Postfix: $myhostname, for `j` and {daemon_name}
    daemon_addr: str = "127.0.0.1"
    daemon_port: int = 25
    queue_id: str = field(default_factory=new_queue_id)
    macros: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_message(cls, message: bytes, **overrides: Any) -> Envelope:
        """An envelope whose sender and recipients come from the message's header.

        MAIL FROM from Return-Path (else From), RCPT TO from To and Cc, unless given.
        """
        headers, _ = parse_message(message)

        def addresses(*names: str) -> list[str]:
            values = [
                v.decode("utf-8", "replace").replace("\n", " ")
                for n, v in headers
                if n.lower() in names
            ]
            # The bounded reader: a From with deeply nested comments is a defined
            # "no address here", not a RecursionError (email.utils.getaddresses).
            return [m.address for v in values for m in parse_address_list(v).mailboxes]

        if "mail_from" not in overrides:
            found = addresses("return-path") or addresses("from")
            if found:
                overrides["mail_from"] = found[0]
        if "rcpt_to" not in overrides:
            found = addresses("to", "cc")
            if found:
                overrides["rcpt_to"] = found
        return cls(**overrides)


@dataclass(frozen=True)
class Negotiated:
    """The outcome of OPTNEG: protocol version, actions, protocol flags, macro lists."""

    version: int
    actions: ActionFlag
    protocol: ProtocolFlag
    macro_lists: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def action_names(self) -> list[str]:
        return _flag_names(self.actions)

    @property
    def protocol_names(self) -> list[str]:
        return _flag_names(self.protocol)

    def wants(self, stage: str) -> bool:
        """False when the milter negotiated this stage away (SMFIP_NO*)."""
        ev = _EVENTS_BY_NAME.get(stage)
        return ev is None or not (ev.no_flag and self.protocol & ev.no_flag)

    def replies(self, stage: str) -> bool:
        """False when the milter said it will not reply at this stage (SMFIP_NR_*)."""
        ev = _EVENTS_BY_NAME.get(stage)
        return ev is None or not (ev.nr_flag and self.protocol & ev.nr_flag)

    @property
    def leading_space(self) -> bool:
        return bool(self.protocol & ProtocolFlag.HDR_LEADSPC)


_EVENTS_BY_NAME = {
    ev.name: ev
    for ev in (_CONNECT, _HELO, _MAIL, _RCPT, _DATA, _UNKNOWN, _HEADER, _EOH, _BODY, _EOM)
}


def _flag_names(flags: enum.IntFlag) -> list[str]:
    names = [m.name or "" for m in type(flags) if m in flags]
    known = 0
    for m in type(flags):
        known |= m.value
    unknown = int(flags) & ~known
    if unknown:
        names.append(f"0x{unknown:x}")
    return names


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
            "modifications": [_modification_dict(m) for m in self.modifications],
            "replaced_body_bytes": None if self.replaced_body is None else len(self.replaced_body),
            "elapsed_ms": round(self.elapsed_ms, 3),
            "note": self.note,
        }


def _modification_dict(m: Modification) -> dict[str, Any]:
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
            "header_edits": [_modification_dict(e) for e in self.header_edits],
            "recipient_changes": [_modification_dict(c) for c in self.recipient_changes],
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


# ---------------------------------------------------------------------------
# Message helpers


def parse_message(message: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """Header fields as (name, value after the colon) pairs and the body, as Postfix
    sends them to a milter (see milters.core.model.parse_message)."""
    headers, body = model.parse_message(message)
    return [(h.name, h.value) for h in headers], body


def apply_header_edits(
    headers: Sequence[tuple[str, bytes]],
    edits: Iterable[Modification],
    *,
    leading_space: bool = False,
) -> list[tuple[str, bytes]]:
    """Apply header modifications in order, as Postfix's cleanup does.

    `headers` are (name, value-after-colon) pairs as `parse_message` returns them;
    other modification kinds in `edits` are ignored. A value from the milter gets
    one leading space unless the milter negotiated SMFIP_HDR_LEADSPC
    (`leading_space=True`), as Postfix writes it. INSHEADER index 0 is the very
    top (in real Postfix its own Received header counts as a field there);
    CHGHEADER counts fields of that name from 1 (0 is taken as 1, as Postfix
    does); a change of a missing field appends it, a delete of one does nothing.
    """
    out = list(headers)
    for edit in edits:
        if not isinstance(edit, HeaderEdit):
            continue
        value = edit.value.encode("utf-8", "surrogateescape")
        if not leading_space:
            value = b" " + value
        if edit.kind is EditKind.ADD:
            out.append((edit.name, value))
        elif edit.kind is EditKind.INSERT:
            out.insert(min(max(edit.index, 0), len(out)), (edit.name, value))
        else:
            wanted = max(edit.index, 1)
            lname = edit.name.lower()
            seen = 0
            at = -1
            for i, (name, _) in enumerate(out):
                if name.lower() == lname:
                    seen += 1
                    if seen == wanted:
                        at = i
                        break
            if edit.kind is EditKind.CHANGE:
                if at < 0:
                    out.append((edit.name, value))
                else:
                    out[at] = (edit.name, value)
            elif at >= 0:
                del out[at]
    return out


def _bracket(address: str) -> str:
    return address if address.startswith("<") and address.endswith(">") else f"<{address}>"


def _unbracket(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        return address[1:-1]
    return address


def _domain(address: str) -> str:
    return address.rpartition("@")[2] if "@" in address else ""


def _cstr(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape") + b"\0"


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _postfix_reply_text(raw: str) -> str:
    # milter8.c: Sendmail uses the reply as a format string, so milters double
    # '%'; Postfix turns '%%' into '%' and drops a lone '%'.
    if "%" not in raw:
        return raw
    return re.sub(r"%(.?)", lambda m: m.group(1), raw, flags=re.DOTALL)


_REPLYCODE = re.compile(r"^[45]\d\d[ -]")


# ---------------------------------------------------------------------------
# The session


class MilterSession:
    """One MTA-side connection to a milter; a context manager.

    Entering opens the socket and negotiates (OPTNEG); then call the SMTP stages
    in order: connect, helo, mail, rcpt..., data, header..., eoh, body, eom,
    abort (after each transaction), and finally quit. Each returns a StageReply.
    Stages the milter negotiated away come back with `sent=False`; replies it
    said it would not send are not waited for. Any protocol failure raises a
    MilterClientError subclass and leaves the session closed.
    """

    def __init__(
        self,
        spec: str | SocketSpec,
        *,
        timeout: float = 10.0,
        connect_timeout: float | None = None,
        actions: ActionFlag = ALL_ACTIONS,
        protocol: ProtocolFlag = POSTFIX_PROTOCOL,
        macro_lists: Mapping[str, Sequence[str]] | None = None,
        tcp_nodelay: bool = True,
    ) -> None:
        self.spec = spec if isinstance(spec, SocketSpec) else parse_socket(spec)
        self.timeout = timeout
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self.offer_actions = actions
        self.offer_protocol = protocol
        self.tcp_nodelay = tcp_nodelay
        self._lists = {k: tuple(v) for k, v in DEFAULT_MACRO_LISTS.items()}
        if macro_lists:
            self._lists.update({k: tuple(v) for k, v in macro_lists.items()})
        self.envelope = Envelope()
        self._sock: socket.socket | None = None
        self._rbuf = bytearray()
        self._out: list[bytes] = []
        self._negotiated: Negotiated | None = None
        self._skip_event: bytes | None = None  # after SMFIR_SKIP (milter8.c skip_event_type)
        self._not_in_version = 0  # SMFIP_NO* bits of events the milter's version lacks
        self._proto = 0  # the negotiated SMFIP_* bits as a plain int
        self._macro_cache: dict[tuple[bytes, str, str, bool, bool], bytes] = {}
        self._in_transaction = False
        self._queue_id_known = False  # Postfix opens the queue file after the 1st RCPT
        self._sender = ""
        self._rcpt = ""

    # -- context manager -------------------------------------------------

    def __enter__(self) -> MilterSession:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None and self._sock is not None:
            try:
                self.quit()
            except MilterClientError:
                self.close()
        else:
            self.close()

    # -- connection ------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    @property
    def negotiated(self) -> Negotiated:
        if self._negotiated is None:
            raise MilterClientError(f"milter {self.spec}: not negotiated yet (call open())")
        return self._negotiated

    def open(self) -> Negotiated:
        """Connect and negotiate (SMFIC_OPTNEG)."""
        if self._sock is not None:
            return self.negotiated
        self._sock = self._connect_socket()
        payload = struct.pack(
            ">III", PROTOCOL_VERSION, int(self.offer_actions), int(self.offer_protocol)
        )
        self._queue(SMFIC_OPTNEG, payload)
        self._flush("negotiation")
        cmd, data = self._read_packet("negotiation")
        if cmd != SMFIC_OPTNEG:
            self._fail(ProtocolError, f"answered {_reply_name(cmd)} to option negotiation")
        self._negotiated = self._parse_optneg(data)
        self._proto = int(self._negotiated.protocol)
        return self._negotiated

    def _connect_socket(self) -> socket.socket:
        spec = self.spec
        try:
            if spec.family == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.connect_timeout)
                try:
                    sock.connect(spec.path)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((spec.host, spec.port), self.connect_timeout)
                # Each of our writes is a whole batch of packets: don't let Nagle
                # hold it back waiting for the milter's delayed ACK. (Postfix sets
                # no TCP_NODELAY; tcp_nodelay=False reproduces its stalls.)
                if self.tcp_nodelay:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except TimeoutError:
            raise MilterUnavailable(
                f"cannot connect to milter {spec}: no answer within {self.connect_timeout:g} s"
            ) from None
        except OSError as e:
            raise MilterUnavailable(f"cannot connect to milter {spec}: {e.strerror or e}") from None
        sock.settimeout(self.timeout)
        return sock

    def _parse_optneg(self, data: bytes) -> Negotiated:
        if len(data) < 12:
            self._fail(ProtocolError, f"OPTNEG reply too short ({len(data)} bytes, need 12)")
        version, actions, proto = struct.unpack_from(">III", data)
        # milter8.c refuses a newer version and actions it did not offer.
        if version > PROTOCOL_VERSION or version < 2:
            self._fail(ProtocolError, f"unsupported milter protocol version {version}")
        if actions & ~int(self.offer_actions):
            extra = ActionFlag(actions & ~int(self.offer_actions))
            self._fail(ProtocolError, f"asks for actions not offered: {_flag_names(extra)}")
        if version < 4:  # milter8.c: no SMFIC_DATA before v4, no SMFIC_UNKNOWN before v3
            self._not_in_version |= int(ProtocolFlag.NODATA)
        if version < 3:
            self._not_in_version |= int(ProtocolFlag.NOUNKNOWN)
        lists: dict[str, tuple[str, ...]] = {}
        rest = data[12:]
        # Secondary negotiation: (uint32 stage, "macro names\0") pairs.
        while rest:
            if len(rest) < 5:
                self._fail(ProtocolError, "truncated macro list in OPTNEG reply")
            (stage,) = _LEN.unpack_from(rest)
            end = rest.find(b"\0", 4)
            if end < 0:
                self._fail(ProtocolError, "macro list in OPTNEG reply lacks its NUL")
            names = tuple(_text(rest[4:end]).replace(",", " ").split())
            rest = rest[end + 1 :]
            stage_name = MACRO_STAGES.get(stage)
            if stage_name is None:
                continue  # milter8.c: "ignoring unknown macro type"
            lists[stage_name] = names
        return Negotiated(version, ActionFlag(actions), ProtocolFlag(proto), lists)

    def close(self) -> None:
        """Close the socket without a word (what Postfix does after a connect-level
        accept or reject: libmilter closes its side on its own)."""
        sock, self._sock = self._sock, None
        self._out.clear()
        self._rbuf.clear()
        if sock is not None:
            sock.close()

    def disconnect(self) -> None:
        """Drop the connection abruptly (mid-message, no ABORT, no QUIT), for tests."""
        sock, self._sock = self._sock, None
        self._out.clear()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def quit(self) -> None:
        """SMFIC_QUIT, then close; the milter's close callback runs."""
        if self._sock is None:
            return
        try:
            self._queue(SMFIC_QUIT, b"")
            self._flush("quit")
        finally:
            self.close()

    def abort(self) -> None:
        """SMFIC_ABORT: end the current transaction (no reply); Postfix sends it after
        every transaction that reached MAIL FROM, including delivered ones."""
        self._queue(SMFIC_ABORT, b"")
        self._flush("abort")
        self._in_transaction = False
        self._queue_id_known = False
        self._sender = self._rcpt = ""

    def send_raw(self, cmd: bytes, data: bytes = b"") -> None:
        """Write one packet as is (tests of milter robustness)."""
        self._queue(cmd, data)
        self._flush("raw packet")

    # -- SMTP stages -----------------------------------------------------

    def connect(self, envelope: Envelope | None = None) -> StageReply:
        """SMFIC_CONNECT with the client's name, family, port and address."""
        if envelope is not None:
            self.envelope = envelope
        self._macro_cache.clear()
        env = self.envelope
        name = env.client_name or "unknown"
        if name == "unknown" and env.client_ip:
            # milter8.c: Postfix's "unknown" becomes Sendmail's "[addr]".
            name = f"[{env.client_ip}]"
        if not env.client_ip:
            payload = _cstr(name) + SMFIA_UNKNOWN
        else:
            family = SMFIA_INET6 if ":" in env.client_ip else SMFIA_INET
            payload = (
                _cstr(name) + family + struct.pack(">H", env.client_port) + _cstr(env.client_ip)
            )
        return self._event(_CONNECT, payload, argument=f"{name} {env.client_ip}".strip())

    def helo(self, name: str | None = None) -> StageReply:
        helo = self.envelope.helo if name is None else name
        return self._event(_HELO, _cstr(helo), argument=helo)

    def mail(self, sender: str | None = None, params: Sequence[str] | None = None) -> StageReply:
        """SMFIC_MAIL; an open transaction is aborted first (Postfix's mail_reset)."""
        if self._in_transaction:
            self.abort()
        self._macro_cache.clear()  # a new transaction, maybe a new envelope
        sender = self.envelope.mail_from if sender is None else _unbracket(sender)
        params = self.envelope.mail_params if params is None else params
        self._sender = sender
        self._in_transaction = True
        argv = [_bracket(sender), *params]
        return self._event(_MAIL, b"".join(_cstr(a) for a in argv), argument=argv[0])

    def rcpt(self, recipient: str, params: Sequence[str] = ()) -> StageReply:
        self._rcpt = _unbracket(recipient)
        argv = [_bracket(self._rcpt), *params]
        reply = self._event(_RCPT, b"".join(_cstr(a) for a in argv), argument=argv[0])
        if not reply.final:
            self._queue_id_known = True
        self._rcpt = ""
        return reply

    def data(self) -> StageReply:
        self._queue_id_known = True
        reply = self._event(_DATA, b"")
        # Postfix's smtpd hands the milter socket to cleanup here (milter8_send
        # flushes), so whatever DATA queued leaves now, on its own.
        self._flush("data")
        return reply

    def unknown(self, command: str) -> StageReply:
        return self._event(_UNKNOWN, _cstr(command), argument=command)

    def header(self, name: str, value: bytes) -> StageReply:
        """SMFIC_HEADER; `value` is every byte after the colon, folded lines joined
        with "\\n". One leading space goes unless the milter asked for
        SMFIP_HDR_LEADSPC (milter8.c: Sendmail eats one space, not a tab)."""
        if not self._proto & _LEADSPC_BIT and value[:1] == b" ":
            value = value[1:]
        payload = name.encode("utf-8", "surrogateescape") + b"\0" + value + b"\0"
        return self._event(_HEADER, payload, argument=name)

    def eoh(self) -> StageReply:
        return self._event(_EOH, b"")

    def body(self, body: bytes) -> StageReply:
        """SMFIC_BODY in chunks of at most 65535 bytes; stops at the first final
        answer or after SMFIR_SKIP. Returns the last answer."""
        reply = StageReply("body", sent=False, note="empty body")
        view = memoryview(body)
        for start in range(0, len(body), MILTER_CHUNK_SIZE):
            reply = self._event(_BODY, bytes(view[start : start + MILTER_CHUNK_SIZE]))
            if reply.final or reply.action == "skip" or not reply.sent:
                break
        return reply

    def eom(self) -> StageReply:
        """SMFIC_BODYEOB; collects the end-of-message modifications and the verdict."""
        return self._event(_EOM, b"")

    def message(self, message: bytes) -> list[StageReply]:
        """Header fields, end of header, body and end of message, as Postfix's
        cleanup sends them; stops at the first answer that ends the transaction."""
        headers, body = parse_message(message)
        replies: list[StageReply] = []
        for name, value in headers:
            reply = self.header(name, value)
            replies.append(reply)
            if reply.final:
                return replies
            if not reply.sent or reply.action == "skip":
                break  # negotiated away or SKIP: no further header goes out
        for step in (self.eoh, lambda: self.body(body)):
            reply = step()
            replies.append(reply)
            if reply.final:
                return replies
        replies.append(self.eom())
        return replies

    # -- core ------------------------------------------------------------

    def _event(self, ev: _Event, payload: bytes, argument: str = "") -> StageReply:
        neg = self.negotiated
        if self._sock is None:
            raise MilterClientError(f"milter {self.spec}: session is closed")
        # Plain ints: enum.IntFlag arithmetic costs more than the rest of an event.
        proto = self._proto
        if ev.no_bit & self._not_in_version:
            return StageReply(
                ev.name,
                argument=argument,
                sent=False,
                note=f"not in protocol version {neg.version}",
            )
        if self._skip_event is not None:
            if self._skip_event == ev.cmd:
                return StageReply(ev.name, argument=argument, sent=False, note="skipped after SKIP")
            self._skip_event = None
        negotiated_away = bool(ev.no_bit & proto)
        if negotiated_away and not ev.macros_when_skipped:
            return StageReply(ev.name, argument=argument, sent=False, note="negotiated away")
        self._queue(SMFIC_MACRO, self._macro_payload(ev))
        if negotiated_away:
            return StageReply(ev.name, argument=argument, sent=False, note="negotiated away")
        self._queue(ev.cmd, payload)
        if ev.nr_bit & proto:
            return StageReply(ev.name, argument=argument, replied=False)
        started = time.perf_counter()
        self._flush(ev.name)
        return self._read_reply(ev, argument, started)

    def _macro_payload(self, ev: _Event) -> bytes:
        """SMFIC_MACRO data: the event's command letter, then name/value pairs."""
        # Every header of a message carries the same macros: build them once.
        key = (ev.cmd, self._sender, self._rcpt, self._queue_id_known, self._in_transaction)
        cached = self._macro_cache.get(key)
        if cached is not None:
            return cached
        if len(self._macro_cache) > 64:
            self._macro_cache.clear()
        names = self.negotiated.macro_lists.get(ev.macros) or self._lists.get(ev.macros, ())
        data = ev.cmd + self._macro_pairs(names) if names else ev.cmd
        self._macro_cache[key] = data
        return data

    def _macro_pairs(self, names: Sequence[str]) -> bytes:
        values = self._macro_values()
        out = bytearray()
        for name in names:
            key = name[1:-1] if name.startswith("{") and name.endswith("}") else name
            value = values.get(key)
            if value is not None:
                out += _cstr(name) + _cstr(value)
        return bytes(out)

    def _macro_values(self) -> dict[str, str]:
        """Values Postfix's smtpd_milter_eval() would give at this point."""
        env = self.envelope
        name = env.client_name or "unknown"
        values = {
            "j": env.daemon_name,
            "daemon_name": env.daemon_name,
            "daemon_addr": env.daemon_addr,
            "daemon_port": str(env.daemon_port),
            "v": POSTFIX_VERSION_MACRO,
            "_": f"{name} [{env.client_ip}]" if env.client_ip else name,
            "client_addr": env.client_ip,
            "client_port": str(env.client_port),
            "client_name": name,
            "client_ptr": name,
            "client_resolve": "OK" if name != "unknown" else "FAIL",
        }
        if self._queue_id_known:
            values["i"] = env.queue_id
        if env.auth_user:
            values["auth_type"] = env.auth_type
            values["auth_authen"] = env.auth_user
        if self._in_transaction:
            sender = self._sender
            values["mail_addr"] = sender
            # The resolver's next hop and transport; for a remote address that is
            # its domain and "smtp", for the null sender the local machine.
            values["mail_host"] = _domain(sender) or env.daemon_name
            values["mail_mailer"] = "smtp" if _domain(sender) else "local"
        if self._rcpt:
            values["rcpt_addr"] = self._rcpt
            values["rcpt_host"] = _domain(self._rcpt) or env.daemon_name
            values["rcpt_mailer"] = "smtp" if _domain(self._rcpt) else "local"
        for key, value in env.macros.items():
            values[key[1:-1] if key.startswith("{") and key.endswith("}") else key] = value
        return values

    def _read_reply(self, ev: _Event, argument: str, started: float) -> StageReply:
        quarantine = ""
        mods: list[Modification] = []
        body_chunks: list[bytes] | None = None
        is_eom = ev is _EOM
        while True:
            cmd, data = self._read_packet(ev.name)
            if cmd == SMFIR_PROGRESS:
                self._expect_empty(cmd, data, ev)
                continue  # still working: keep waiting, each read with a fresh timeout
            if cmd == SMFIR_QUARANTINE:
                # milter8.c: no state change; the final answer still follows.
                quarantine = _text(data.rstrip(b"\0"))
                continue
            if cmd == SMFIR_REPLBODY and is_eom:
                if body_chunks is None:
                    body_chunks = []
                body_chunks.append(data)
                continue
            if cmd in _MOD_REPLIES:
                if not is_eom:
                    self._fail(
                        ProtocolError,
                        f"sent {_reply_name(cmd)} in reply to {ev.name} "
                        "(modifications are allowed only at end of message)",
                    )
                mods.append(self._parse_modification(cmd, data))
                continue
            action, text, custom = self._final_action(cmd, data, ev)
            if action == "skip":
                self._skip_event = ev.cmd
            return StageReply(
                ev.name,
                action=action,
                smtp_reply=text,
                argument=argument,
                custom_reply=custom,
                quarantine=quarantine,
                modifications=tuple(mods),
                replaced_body=None if body_chunks is None else b"".join(body_chunks),
                elapsed_ms=(time.perf_counter() - started) * 1000.0,
            )

    def _final_action(self, cmd: bytes, data: bytes, ev: _Event) -> tuple[Action, str, bool]:
        simple: dict[bytes, tuple[Action, str]] = {
            SMFIR_CONTINUE: ("continue", ""),
            SMFIR_ACCEPT: ("accept", ""),
            SMFIR_DISCARD: ("discard", ""),
            SMFIR_REJECT: ("reject", POSTFIX_REJECT_TEXT),
            SMFIR_TEMPFAIL: ("tempfail", POSTFIX_TEMPFAIL_TEXT),
            SMFIR_SKIP: ("skip", ""),
            SMFIR_SHUTDOWN: ("shutdown", POSTFIX_SHUTDOWN_TEXT),
            SMFIR_CONN_FAIL: ("conn_fail", POSTFIX_SHUTDOWN_TEXT),
        }
        if cmd in simple:
            self._expect_empty(cmd, data, ev)
            action, text = simple[cmd]
            return action, text, False
        if cmd == SMFIR_REPLYCODE:
            raw = _text(data.rstrip(b"\0"))
            if not _REPLYCODE.match(raw):
                self._fail(ProtocolError, f"malformed REPLYCODE {raw[:80]!r} in reply to {ev.name}")
            text = _postfix_reply_text(raw)
            return ("tempfail" if raw[0] == "4" else "reject"), text, True
        if cmd in _REPLY_NAMES:
            self._fail(ProtocolError, f"unexpected reply {_reply_name(cmd)} to {ev.name}")
        self._fail(ProtocolError, f"unknown reply code {cmd!r} in reply to {ev.name}")

    def _expect_empty(self, cmd: bytes, data: bytes, ev: _Event) -> None:
        if data:
            self._fail(
                ProtocolError,
                f"reply {_reply_name(cmd)} to {ev.name} carries {len(data)} unexpected data bytes",
            )

    def _parse_modification(self, cmd: bytes, data: bytes) -> Modification:
        name = _reply_name(cmd)
        index = 0
        if cmd in (SMFIR_INSHEADER, SMFIR_CHGHEADER):
            if len(data) < 4:
                self._fail(ProtocolError, f"{name} packet too short for its index")
            (index,) = _LEN.unpack_from(data)
            data = data[4:]
        if not data.endswith(b"\0"):
            self._fail(ProtocolError, f"{name} packet does not end with a NUL")
        parts = [_text(p) for p in data[:-1].split(b"\0")]
        if cmd in (SMFIR_ADDHEADER, SMFIR_INSHEADER, SMFIR_CHGHEADER):
            if len(parts) != 2 or not parts[0]:
                self._fail(ProtocolError, f"{name} packet needs a header name and a value")
            hname, value = parts
            if cmd == SMFIR_ADDHEADER:
                return HeaderEdit(EditKind.ADD, hname, value)
            if cmd == SMFIR_INSHEADER:
                return HeaderEdit(EditKind.INSERT, hname, value, index)
            # Sendmail 8 semantics, kept by Postfix: an empty value deletes.
            kind = EditKind.CHANGE if value else EditKind.DELETE
            return HeaderEdit(kind, hname, value, index)
        if cmd in (SMFIR_ADDRCPT, SMFIR_DELRCPT):
            if len(parts) != 1:
                self._fail(ProtocolError, f"{name} packet needs exactly one address")
            return RecipientChange("add" if cmd == SMFIR_ADDRCPT else "delete", parts[0])
        # CHGFROM and ADDRCPT_PAR: an address and optional ESMTP parameters.
        if not 1 <= len(parts) <= 2:
            self._fail(ProtocolError, f"{name} packet needs an address and optional parameters")
        params = parts[1] if len(parts) == 2 else ""
        if cmd == SMFIR_CHGFROM:
            return SenderChange(parts[0], params)
        return RecipientChange("add", parts[0], params)

    # -- wire ------------------------------------------------------------

    def _queue(self, cmd: bytes, data: bytes) -> None:
        if self._sock is None:
            raise MilterClientError(f"milter {self.spec}: session is closed")
        self._out.append(_HDR.pack(len(data) + 1, cmd[0]))
        if data:
            self._out.append(data)

    def _flush(self, stage: str) -> None:
        if not self._out or self._sock is None:
            return
        payload = b"".join(self._out)
        self._out.clear()
        try:
            self._sock.sendall(payload)
        except TimeoutError:
            self._fail(MilterTimeout, f"did not take our {stage} data within {self.timeout:g} s")
        except OSError as e:
            self._fail(MilterClosed, f"connection lost while sending {stage}: {e.strerror or e}")

    def _read_packet(self, stage: str) -> tuple[bytes, bytes]:
        (length,) = _LEN.unpack(self._read_exact(4, stage))
        if length < 1:
            self._fail(ProtocolError, f"bad packet length {length} in reply to {stage}")
        if length > MAX_PACKET:
            self._fail(
                ProtocolError,
                f"unreasonable packet length {length} in reply to {stage} (is this a milter?)",
            )
        packet = self._read_exact(length, stage)
        return packet[:1], packet[1:]

    def _read_exact(self, n: int, stage: str) -> bytes:
        buf = self._rbuf
        sock = self._sock
        while len(buf) < n:
            if sock is None:
                raise MilterClientError(f"milter {self.spec}: session is closed")
            try:
                chunk = sock.recv(max(65536, n - len(buf)))
            except TimeoutError:
                self._fail(MilterTimeout, f"did not answer {stage} within {self.timeout:g} s")
            except OSError as e:
                self._fail(
                    MilterClosed,
                    f"connection lost waiting for the reply to {stage}: {e.strerror or e}",
                )
            if not chunk:
                self._fail(
                    MilterClosed, f"closed the connection while we waited for the reply to {stage}"
                )
            buf += chunk
        data = bytes(buf[:n])
        del buf[:n]
        return data

    def _fail(self, kind: type[MilterClientError], message: str) -> NoReturn:
        self.close()
        raise kind(f"milter {self.spec}: {message}")


_MOD_REPLIES = frozenset(
    {
        SMFIR_ADDHEADER,
        SMFIR_INSHEADER,
        SMFIR_CHGHEADER,
        SMFIR_ADDRCPT,
        SMFIR_ADDRCPT_PAR,
        SMFIR_DELRCPT,
        SMFIR_CHGFROM,
        SMFIR_REPLBODY,
    }
)


def _reply_name(cmd: bytes) -> str:
    name = _REPLY_NAMES.get(cmd)
    if name:
        return f"SMFIR_{name}" if cmd != SMFIC_OPTNEG else "SMFIC_OPTNEG"
    return f"unknown reply {cmd!r}"


# ---------------------------------------------------------------------------
# The whole dialogue


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


# ---------------------------------------------------------------------------
# Report


def format_probe(result: ProbeResult) -> str:
    """A multi-line report an administrator reads (`milters probe`)."""
    neg = result.negotiated
    lines = [f"milter {result.spec}: protocol version {neg.version}, {result.elapsed_ms:.1f} ms"]
    lines.append("  may:      " + (" ".join(neg.action_names) or "(no actions)"))
    skipped = [
        s
        for s in ("connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body", "unknown")
        if not neg.wants(s)
    ]
    no_reply = [
        s
        for s in ("connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body", "unknown")
        if neg.wants(s) and not neg.replies(s)
    ]
    lines.append("  skips:    " + (" ".join(skipped) or "nothing"))
    lines.append("  no reply: " + (" ".join(no_reply) or "none (answers every step)"))
    extras = [n for n in ("SKIP", "RCPT_REJ", "HDR_LEADSPC") if n in neg.protocol_names]
    if extras:
        lines.append("  options:  " + " ".join(extras))
    for stage, names in neg.macro_lists.items():
        lines.append(f"  macros asked for at {stage}: {' '.join(names) or '(none)'}")
    lines.append("")
    lines.append("stages:")
    quiet = [s for s in result.stages if s.stage == "header" and s.action == "continue"]
    summarise = len(quiet) > 3
    quiet_ids = {id(s) for s in quiet}
    for s in result.stages:
        if summarise and id(s) in quiet_ids:
            if s is quiet[0]:
                how = "no reply expected" if not s.replied else "continue"
                if not s.sent:
                    how = s.describe()
                lines.append(f"  {'header':<8} {f'({len(quiet)} fields)':<40} {how}")
            continue
        arg = f" {s.argument}" if s.argument else ""
        lines.append(f"  {s.stage:<8}{arg[:60]:<41} {s.describe()}")
    lines.append("")
    verdict = result.verdict.upper()
    if result.verdict == "continue":
        verdict = "CONTINUE (Postfix accepts)"
    where = f" at {result.decided_at}" if result.decided_at else ""
    lines.append(
        f"verdict:  {verdict}{where}" + (f" -> {result.smtp_reply}" if result.smtp_reply else "")
    )
    for rcpt, reply in result.rejected_recipients.items():
        lines.append(f"  recipient {rcpt} rejected: {reply}")
    if result.quarantine:
        lines.append(f"quarantine (Postfix hold queue): {result.quarantine}")
    if result.header_edits:
        lines.append("header changes:")
        for e in result.header_edits:
            lines.append(f"  {_describe_edit(e)}")
    if result.recipient_changes or result.sender_change:
        lines.append("envelope changes:")
        if result.sender_change:
            sc = result.sender_change
            lines.append(f"  sender -> {sc.address}" + (f" {sc.params}" if sc.params else ""))
        for c in result.recipient_changes:
            lines.append(f"  recipient {c.describe()}")
    if result.replaced_body is not None:
        lines.append(f"body replaced: {len(result.replaced_body)} bytes")
    return "\n".join(lines)


def _describe_edit(e: HeaderEdit) -> str:
    value = e.value.replace("\r", "").replace("\n", "\\n")
    if len(value) > 200:
        value = value[:200] + "..."
    if e.kind is EditKind.ADD:
        return f"add      {e.name}: {value}"
    if e.kind is EditKind.INSERT:
        return f"insert   at {e.index}: {e.name}: {value}"
    if e.kind is EditKind.CHANGE:
        return f"change   {e.name}[{max(e.index, 1)}]: {value}"
    return f"delete   {e.name}[{max(e.index, 1)}]"
