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
from milters.core.verdict import EditKind, HeaderEdit

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
