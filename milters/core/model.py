"""Plain data that a filter decides on: the SMTP connection and one message transaction.

Header fields are kept as raw bytes exactly as the MTA sent them (DKIM needs
them byte-exact); decoding is the business of whoever reads them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

# Bodies above this size leave memory for a temporary file, so that memory per
# connection stays bounded whatever the message size.
BODY_SPOOL_THRESHOLD = 256 * 1024


@dataclass(frozen=True)
class Header:
    """One header field: name as sent, raw value bytes as sent (folding kept)."""

    name: str
    value: bytes

    @property
    def text(self) -> str:
        """The value as text; undecodable bytes are kept as surrogate escapes."""
        return self.value.decode("utf-8", errors="surrogateescape")


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass
class Connection:
    """What is known about the SMTP client; lives as long as the SMTP session."""

    client_addr: str = ""  # IP address as text, "" for a local (non-SMTP) submission
    client_port: int = 0
    client_name: str = ""  # verified hostname, or "unknown" as Postfix says it
    helo: str = ""
    macros: dict[str, str] = field(default_factory=dict)
    # client_addr parsed, with the text it was parsed from: every filter of a
    # chain asks for it several times per message.
    _ip: tuple[str, IPAddress | None] | None = field(default=None, init=False, repr=False,
                                                    compare=False)

    @property
    def client_ip(self) -> IPAddress | None:
        cached = self._ip
        if cached is not None and cached[0] == self.client_addr:
            return cached[1]
        try:
            ip: IPAddress | None = ipaddress.ip_address(
                self.client_addr.strip("[]").removeprefix("IPv6:"))
        except ValueError:
            ip = None
        self._ip = (self.client_addr, ip)
        return ip

    @property
    def sasl_user(self) -> str:
        return self.macros.get("{auth_authen}", "")

    @property
    def daemon_name(self) -> str:
        return self.macros.get("{daemon_name}", "")


class Body:
    """A message body that spools to a temporary file past a size threshold."""

    def __init__(self, threshold: int = BODY_SPOOL_THRESHOLD) -> None:
        self._threshold = threshold
        self._chunks: list[bytes] = []
        self._size = 0
        self._file: BinaryIO | None = None

    @property
    def size(self) -> int:
        return self._size

    @property
    def spooled(self) -> bool:
        return self._file is not None

    def write(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._file is not None:
            self._file.write(chunk)
            return
        self._chunks.append(chunk)
        if self._size > self._threshold:
            self._file = tempfile.TemporaryFile(prefix="milters-body-")  # noqa: SIM115
            for piece in self._chunks:
                self._file.write(piece)
            self._chunks = []

    def chunks(self, size: int = 65536) -> Iterator[bytes]:
        """The body in pieces, without holding a spooled body in memory."""
        if self._file is None:
            yield from self._chunks
            return
        self._file.flush()
        self._file.seek(0)
        while piece := self._file.read(size):
            yield piece
        self._file.seek(0, os.SEEK_END)

    def getvalue(self) -> bytes:
        return b"".join(self.chunks())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._chunks = []


@dataclass
class Transaction:
    """One message: made at MAIL FROM, dropped at end of message or abort."""

    connection: Connection
    mail_from: str = ""  # without angle brackets; "" is the null sender
    mail_from_params: tuple[str, ...] = ()
    rcpt_to: list[str] = field(default_factory=list)
    headers: list[Header] = field(default_factory=list)
    body: Body = field(default_factory=Body)
    macros: dict[str, str] = field(default_factory=dict)
    # A filter's own per-message state between its stage hooks (e.g. the SPF
    # outcome found at MAIL FROM, acted on at RCPT, reported at end of message),
    # keyed by the filter's name.
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def queue_id(self) -> str:
        return self.macros.get("i") or self.connection.macros.get("i", "")

    def macro(self, name: str) -> str:
        """A macro from this message, else from the connection."""
        return self.macros.get(name) or self.connection.macros.get(name, "")

    def header_values(self, name: str) -> list[bytes]:
        lname = name.lower()
        return [h.value for h in self.headers if h.name.lower() == lname]

    def raw_header_block(self) -> bytes:
        """The header as it would be on the wire, CRLF line ends."""
        out = []
        for h in self.headers:
            value = h.value
            if b"\n" in value:  # folded: its line ends as CRLF (most fields are not)
                value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            sep = b":" if value[:1] in (b" ", b"\t") else b": "
            out.append(h.name.encode("utf-8", "surrogateescape") + sep + value + b"\r\n")
        return b"".join(out)

    def close(self) -> None:
        self.body.close()


def unbracket(address: str) -> str:
    """`<a@b>` -> `a@b`; MAIL FROM/RCPT TO arrive with their angle brackets."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address


# A header field's name: printable ASCII but the colon, then optional white space
# before the colon (RFC 5322 §3.6.8; obsolete WSP before the colon, §4.5.3).
_HEADER_LINE = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def parse_message(raw: bytes) -> tuple[list[Header], bytes]:
    """Split an RFC 5322 message (CRLF or LF line ends) into header fields and body,
    as Postfix hands them to a milter.

    A field's value is every byte after the colon (leading space kept, as with
    SMFIP_HDR_LEADSPC), folded lines joined by "\n" (Postfix keeps header lines
    without CR). A line that is neither a field nor a continuation ends the header,
    as Postfix's cleanup treats it (it becomes the first body line). The body has
    CRLF line ends; a last line without one gets one, as Postfix stores it.
    """
    headers: list[Header] = []
    pos = 0
    n = len(raw)
    while pos < n:
        eol = raw.find(b"\n", pos)
        nxt = n if eol < 0 else eol + 1
        line = raw[pos:(n if eol < 0 else eol)]
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            pos = nxt  # the empty line between header and body is not body
            break
        if line[:1] in (b" ", b"\t"):
            if not headers:
                break
            last = headers[-1]
            headers[-1] = Header(last.name, last.value + b"\n" + line)
        else:
            m = _HEADER_LINE.match(line)
            if m is None:
                break  # not a header line: the body starts here
            headers.append(Header(m.group(1).decode("ascii"), line[m.end():]))
        pos = nxt
    body = raw[pos:]
    if body:
        body = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
    return headers, body
