"""The milter protocol (version 6) on the wire: libmilter's mfdef.h constants, the
events Postfix sends, and the encoding and decoding of packets.

A packet is a 4-byte big-endian length, a command or reply letter, and data.
SMFIC_* are commands (MTA to milter), SMFIR_* replies, SMFIF_* action flags and
SMFIP_* protocol flags. The decoders raise ProtocolError with what is wrong; the
session (session.py) closes the connection and names the milter.
"""

from __future__ import annotations

import enum
import re
import struct
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from milters.client.errors import ProtocolError
from milters.client.replies import Action, Modification, RecipientChange, SenderChange
from milters.core.protocol import (  # the constants both sides share, re-exported
    PROTOCOL_VERSION as PROTOCOL_VERSION,
)
from milters.core.protocol import (
    SMFIA_INET as SMFIA_INET,
)
from milters.core.protocol import (
    SMFIA_INET6 as SMFIA_INET6,
)
from milters.core.protocol import (
    SMFIA_UNIX as SMFIA_UNIX,
)
from milters.core.protocol import (
    SMFIA_UNKNOWN as SMFIA_UNKNOWN,
)
from milters.core.protocol import (
    SMFIC_ABORT as SMFIC_ABORT,
)
from milters.core.protocol import (
    SMFIC_BODY as SMFIC_BODY,
)
from milters.core.protocol import (
    SMFIC_BODYEOB as SMFIC_BODYEOB,
)
from milters.core.protocol import (
    SMFIC_CONNECT as SMFIC_CONNECT,
)
from milters.core.protocol import (
    SMFIC_DATA as SMFIC_DATA,
)
from milters.core.protocol import (
    SMFIC_EOH as SMFIC_EOH,
)
from milters.core.protocol import (
    SMFIC_HEADER as SMFIC_HEADER,
)
from milters.core.protocol import (
    SMFIC_HELO as SMFIC_HELO,
)
from milters.core.protocol import (
    SMFIC_MACRO as SMFIC_MACRO,
)
from milters.core.protocol import (
    SMFIC_MAIL as SMFIC_MAIL,
)
from milters.core.protocol import (
    SMFIC_OPTNEG as SMFIC_OPTNEG,
)
from milters.core.protocol import (
    SMFIC_QUIT as SMFIC_QUIT,
)
from milters.core.protocol import (
    SMFIC_QUIT_NC as SMFIC_QUIT_NC,
)
from milters.core.protocol import (
    SMFIC_RCPT as SMFIC_RCPT,
)
from milters.core.protocol import (
    SMFIC_UNKNOWN as SMFIC_UNKNOWN,
)
from milters.core.protocol import (
    SMFIR_ACCEPT as SMFIR_ACCEPT,
)
from milters.core.protocol import (
    SMFIR_ADDHEADER as SMFIR_ADDHEADER,
)
from milters.core.protocol import (
    SMFIR_ADDRCPT as SMFIR_ADDRCPT,
)
from milters.core.protocol import (
    SMFIR_ADDRCPT_PAR as SMFIR_ADDRCPT_PAR,
)
from milters.core.protocol import (
    SMFIR_CHGFROM as SMFIR_CHGFROM,
)
from milters.core.protocol import (
    SMFIR_CHGHEADER as SMFIR_CHGHEADER,
)
from milters.core.protocol import (
    SMFIR_CONN_FAIL as SMFIR_CONN_FAIL,
)
from milters.core.protocol import (
    SMFIR_CONTINUE as SMFIR_CONTINUE,
)
from milters.core.protocol import (
    SMFIR_DELRCPT as SMFIR_DELRCPT,
)
from milters.core.protocol import (
    SMFIR_DISCARD as SMFIR_DISCARD,
)
from milters.core.protocol import (
    SMFIR_INSHEADER as SMFIR_INSHEADER,
)
from milters.core.protocol import (
    SMFIR_PROGRESS as SMFIR_PROGRESS,
)
from milters.core.protocol import (
    SMFIR_QUARANTINE as SMFIR_QUARANTINE,
)
from milters.core.protocol import (
    SMFIR_REJECT as SMFIR_REJECT,
)
from milters.core.protocol import (
    SMFIR_REPLBODY as SMFIR_REPLBODY,
)
from milters.core.protocol import (
    SMFIR_REPLYCODE as SMFIR_REPLYCODE,
)
from milters.core.protocol import (
    SMFIR_SETSYMLIST as SMFIR_SETSYMLIST,
)
from milters.core.protocol import (
    SMFIR_SHUTDOWN as SMFIR_SHUTDOWN,
)
from milters.core.protocol import (
    SMFIR_SKIP as SMFIR_SKIP,
)
from milters.core.protocol import (
    SMFIR_TEMPFAIL as SMFIR_TEMPFAIL,
)
from milters.core.protocol import (
    ActionFlag as ActionFlag,
)
from milters.core.protocol import (
    ProtocolFlag as ProtocolFlag,
)
from milters.core.verdict import EditKind, HeaderEdit

REPLY_NAMES = types.MappingProxyType({
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

# The replies that carry a modification (allowed only at end of message).
MOD_REPLIES = frozenset(
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

ALL_ACTIONS = ActionFlag(0x1FF)
# milter8.c MILTER8_V6_PROTO_MASK: every NO* and NR_* bit, SKIP, RCPT_REJ and
# HDR_LEADSPC; that is what Postfix 3.7 offers with milter_protocol = 6.
POSTFIX_PROTOCOL = ProtocolFlag(0x1FFFFF)

# Macro stages (SMFIM_*), the numbers SMFIR_SETSYMLIST data uses.
MACRO_STAGES = types.MappingProxyType(
    {0: "connect", 1: "helo", 2: "mail", 3: "rcpt", 4: "data", 5: "eom", 6: "eoh"}
)

POSTFIX_VERSION_MACRO = "Postfix 3.7.11"  # `v` = $mail_name $mail_version
MILTER_CHUNK_SIZE = 65535  # milter8.c: body chunk size
MAX_PACKET = 64 * 1024 * 1024  # larger is garbage (an HTTP server answers "HTTP" = 1.2 GB)

# Postfix's reply texts when a milter answers without SMFIR_REPLYCODE (milter8.c).
POSTFIX_REJECT_TEXT = "550 5.7.1 Command rejected"
POSTFIX_TEMPFAIL_TEXT = "451 4.7.1 Service unavailable - try again later"
POSTFIX_SHUTDOWN_TEXT = "421 4.7.0 Server closing connection"

LEADSPC_BIT = int(ProtocolFlag.HDR_LEADSPC)
PACKET_LENGTH = struct.Struct(">I")
PACKET_HEAD = struct.Struct(">IB")  # length (letter included), then the letter


# ---------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class Event:
    """One thing the MTA tells the milter, with the flags that concern it."""

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
CONNECT = Event(
    "connect", SMFIC_CONNECT, ProtocolFlag.NOCONNECT, ProtocolFlag.NR_CONN, "connect", True
)
HELO = Event("helo", SMFIC_HELO, ProtocolFlag.NOHELO, ProtocolFlag.NR_HELO, "helo", True)
MAIL = Event("mail", SMFIC_MAIL, ProtocolFlag.NOMAIL, ProtocolFlag.NR_MAIL, "mail", True)
RCPT = Event("rcpt", SMFIC_RCPT, ProtocolFlag.NORCPT, ProtocolFlag.NR_RCPT, "rcpt", True)
DATA = Event("data", SMFIC_DATA, ProtocolFlag.NODATA, ProtocolFlag.NR_DATA, "data", True)
UNKNOWN = Event(
    "unknown", SMFIC_UNKNOWN, ProtocolFlag.NOUNKNOWN, ProtocolFlag.NR_UNKN, "unknown", True
)
HEADER = Event("header", SMFIC_HEADER, ProtocolFlag.NOHDRS, ProtocolFlag.NR_HDR, "eoh", False)
EOH = Event("eoh", SMFIC_EOH, ProtocolFlag.NOEOH, ProtocolFlag.NR_EOH, "eoh", False)
BODY = Event("body", SMFIC_BODY, ProtocolFlag.NOBODY, ProtocolFlag.NR_BODY, "eom", False)
EOM = Event("eom", SMFIC_BODYEOB, _NONE, _NONE, "eom", False)

EVENTS_BY_NAME = types.MappingProxyType({
    ev.name: ev for ev in (CONNECT, HELO, MAIL, RCPT, DATA, UNKNOWN, HEADER, EOH, BODY, EOM)
})


# ---------------------------------------------------------------------------
# Negotiation


@dataclass(frozen=True)
class Negotiated:
    """The outcome of OPTNEG: protocol version, actions, protocol flags, macro lists."""

    version: int
    actions: ActionFlag
    protocol: ProtocolFlag
    macro_lists: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def action_names(self) -> list[str]:
        return flag_names(self.actions)

    @property
    def protocol_names(self) -> list[str]:
        return flag_names(self.protocol)

    def wants(self, stage: str) -> bool:
        """False when the milter negotiated this stage away (SMFIP_NO*)."""
        ev = EVENTS_BY_NAME.get(stage)
        return ev is None or not (ev.no_flag and self.protocol & ev.no_flag)

    def replies(self, stage: str) -> bool:
        """False when the milter said it will not reply at this stage (SMFIP_NR_*)."""
        ev = EVENTS_BY_NAME.get(stage)
        return ev is None or not (ev.nr_flag and self.protocol & ev.nr_flag)

    @property
    def leading_space(self) -> bool:
        return bool(self.protocol & ProtocolFlag.HDR_LEADSPC)


def flag_names(flags: enum.IntFlag) -> list[str]:
    names = [m.name or "" for m in type(flags) if m in flags]
    known = 0
    for m in type(flags):
        known |= m.value
    unknown = int(flags) & ~known
    if unknown:
        names.append(f"0x{unknown:x}")
    return names


def optneg_payload(actions: ActionFlag, protocol: ProtocolFlag) -> bytes:
    """SMFIC_OPTNEG data: the version, actions and protocol flags we offer."""
    return struct.pack(">III", PROTOCOL_VERSION, int(actions), int(protocol))


def parse_optneg(data: bytes, offered_actions: ActionFlag) -> tuple[Negotiated, int]:
    """The milter's OPTNEG reply, and the SMFIP_NO* bits of the events its
    protocol version lacks."""
    if len(data) < 12:
        raise ProtocolError(f"OPTNEG reply too short ({len(data)} bytes, need 12)")
    version, actions, proto = struct.unpack_from(">III", data)
    # milter8.c refuses a newer version and actions it did not offer.
    if version > PROTOCOL_VERSION or version < 2:
        raise ProtocolError(f"unsupported milter protocol version {version}")
    if actions & ~int(offered_actions):
        extra = ActionFlag(actions & ~int(offered_actions))
        raise ProtocolError(f"asks for actions not offered: {flag_names(extra)}")
    not_in_version = 0
    if version < 4:  # milter8.c: no SMFIC_DATA before v4, no SMFIC_UNKNOWN before v3
        not_in_version |= int(ProtocolFlag.NODATA)
    if version < 3:
        not_in_version |= int(ProtocolFlag.NOUNKNOWN)
    lists: dict[str, tuple[str, ...]] = {}
    rest = data[12:]
    # Secondary negotiation: (uint32 stage, "macro names\0") pairs.
    while rest:
        if len(rest) < 5:
            raise ProtocolError("truncated macro list in OPTNEG reply")
        (stage,) = PACKET_LENGTH.unpack_from(rest)
        end = rest.find(b"\0", 4)
        if end < 0:
            raise ProtocolError("macro list in OPTNEG reply lacks its NUL")
        names = tuple(text(rest[4:end]).replace(",", " ").split())
        rest = rest[end + 1 :]
        stage_name = MACRO_STAGES.get(stage)
        if stage_name is None:
            continue  # milter8.c: "ignoring unknown macro type"
        lists[stage_name] = names
    negotiated = Negotiated(version, ActionFlag(actions), ProtocolFlag(proto), lists)
    return negotiated, not_in_version


# ---------------------------------------------------------------------------
# Command data


def cstr(value: str) -> bytes:
    """A NUL-terminated string; undecodable bytes round-trip (surrogateescape)."""
    return value.encode("utf-8", "surrogateescape") + b"\0"


def text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def cstrings(values: Iterable[str]) -> bytes:
    """SMFIC_MAIL / SMFIC_RCPT data: the address, then ESMTP parameters."""
    return b"".join(cstr(v) for v in values)


def connect_payload(name: str, client_ip: str, client_port: int) -> bytes:
    """SMFIC_CONNECT data: the client's name, family, port and address."""
    if not client_ip:
        return cstr(name) + SMFIA_UNKNOWN
    family = SMFIA_INET6 if ":" in client_ip else SMFIA_INET
    return cstr(name) + family + struct.pack(">H", client_port) + cstr(client_ip)


def header_payload(name: str, value: bytes) -> bytes:
    """SMFIC_HEADER data: the name and the value, each NUL-terminated."""
    return name.encode("utf-8", "surrogateescape") + b"\0" + value + b"\0"


# ---------------------------------------------------------------------------
# Reply data


_REPLYCODE = re.compile(r"^[45]\d\d[ -]")

_SIMPLE_REPLIES: types.MappingProxyType[bytes, tuple[Action, str]] = types.MappingProxyType({
    SMFIR_CONTINUE: ("continue", ""),
    SMFIR_ACCEPT: ("accept", ""),
    SMFIR_DISCARD: ("discard", ""),
    SMFIR_REJECT: ("reject", POSTFIX_REJECT_TEXT),
    SMFIR_TEMPFAIL: ("tempfail", POSTFIX_TEMPFAIL_TEXT),
    SMFIR_SKIP: ("skip", ""),
    SMFIR_SHUTDOWN: ("shutdown", POSTFIX_SHUTDOWN_TEXT),
    SMFIR_CONN_FAIL: ("conn_fail", POSTFIX_SHUTDOWN_TEXT),
})


def reply_name(cmd: bytes) -> str:
    name = REPLY_NAMES.get(cmd)
    if name:
        return f"SMFIR_{name}" if cmd != SMFIC_OPTNEG else "SMFIC_OPTNEG"
    return f"unknown reply {cmd!r}"


def expect_empty(cmd: bytes, data: bytes, stage: str) -> None:
    if data:
        raise ProtocolError(
            f"reply {reply_name(cmd)} to {stage} carries {len(data)} unexpected data bytes"
        )


def final_action(cmd: bytes, data: bytes, stage: str) -> tuple[Action, str, bool]:
    """The action of a reply that ends a stage, Postfix's reply text, and whether
    the text is the milter's own (SMFIR_REPLYCODE)."""
    simple = _SIMPLE_REPLIES.get(cmd)
    if simple is not None:
        expect_empty(cmd, data, stage)
        action, reply = simple
        return action, reply, False
    if cmd == SMFIR_REPLYCODE:
        raw = text(data.rstrip(b"\0"))
        if not _REPLYCODE.match(raw):
            raise ProtocolError(f"malformed REPLYCODE {raw[:80]!r} in reply to {stage}")
        return ("tempfail" if raw[0] == "4" else "reject"), postfix_reply_text(raw), True
    if cmd in REPLY_NAMES:
        raise ProtocolError(f"unexpected reply {reply_name(cmd)} to {stage}")
    raise ProtocolError(f"unknown reply code {cmd!r} in reply to {stage}")


def postfix_reply_text(raw: str) -> str:
    # milter8.c: Sendmail uses the reply as a format string, so milters double
    # '%'; Postfix turns '%%' into '%' and drops a lone '%'.
    if "%" not in raw:
        return raw
    return re.sub(r"%(.?)", lambda m: m.group(1), raw, flags=re.DOTALL)


def parse_modification(cmd: bytes, data: bytes) -> Modification:
    """One of MOD_REPLIES but SMFIR_REPLBODY, decoded."""
    name = reply_name(cmd)
    index = 0
    if cmd in (SMFIR_INSHEADER, SMFIR_CHGHEADER):
        if len(data) < 4:
            raise ProtocolError(f"{name} packet too short for its index")
        (index,) = PACKET_LENGTH.unpack_from(data)
        data = data[4:]
    if not data.endswith(b"\0"):
        raise ProtocolError(f"{name} packet does not end with a NUL")
    parts = [text(p) for p in data[:-1].split(b"\0")]
    if cmd in (SMFIR_ADDHEADER, SMFIR_INSHEADER, SMFIR_CHGHEADER):
        if len(parts) != 2 or not parts[0]:
            raise ProtocolError(f"{name} packet needs a header name and a value")
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
            raise ProtocolError(f"{name} packet needs exactly one address")
        return RecipientChange("add" if cmd == SMFIR_ADDRCPT else "delete", parts[0])
    # CHGFROM and ADDRCPT_PAR: an address and optional ESMTP parameters.
    if not 1 <= len(parts) <= 2:
        raise ProtocolError(f"{name} packet needs an address and optional parameters")
    params = parts[1] if len(parts) == 2 else ""
    if cmd == SMFIR_CHGFROM:
        return SenderChange(parts[0], params)
    return RecipientChange("add", parts[0], params)
