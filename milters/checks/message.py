"""Walking a message the way Postfix's cleanup(8) MIME parser does, one line at a time.

What each piece is checked against (header_checks(5), postconf(5)):
- primary headers: header_checks; Content-* and MIME-Version (Postfix's HDR_OPT_MIME
  set) go to mime_header_checks;
- MIME part headers: mime_header_checks;
- headers of an attached message/rfc822: nested_header_checks, its MIME headers to
  mime_header_checks;
- everything else, MIME boundary lines and the blank line after part headers
  included: body_checks, in 2048-byte pieces (line_length_limit), only the first
  body_checks_size_limit bytes of each MIME part.
Folded headers are matched as `Name: a\\n b`, line break kept.

With decoding on, the walker also decodes RFC 2047 words in headers, gives the
lines of text/* parts after base64/quoted-printable and charset decoding, and
emits attachment file names for filename_checks. The body is streamed from
Body.chunks(); only one MIME part's pending line and decoder state are held.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from dataclasses import dataclass

from milters.checks.mime import (
    ContentType,
    TextDecoder,
    decode_words,
    filename_of,
    lookup_charset,
    parse_content_type,
)
from milters.checks.tables import UNLIMITED, Budget, MatchOverrun, TextMode
from milters.core.model import Body, Transaction

LINE_PIECE = 2048  # Postfix line_length_limit: longer lines are matched in pieces
HEADER_LIMIT = 102400  # Postfix header_size_limit: the rest of a longer header is dropped
NESTING_LIMIT = 100  # Postfix mime_nesting_limit
# header_opts.c: the primary headers Postfix flags HDR_OPT_MIME.
MIME_HEADERS = frozenset({"content-description", "content-disposition", "content-id",
                          "content-transfer-encoding", "content-type", "mime-version"})
IDENTITY_CTE = frozenset({"7bit", "8bit", "binary", ""})
_HEADER_LINE = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")


class Where(enum.Enum):
    """Which key's tables a piece of the message goes to."""

    HEADER = "header_checks"
    MIME_HEADER = "mime_header_checks"
    NESTED_HEADER = "nested_header_checks"
    BODY = "body_checks"
    FILENAME = "filename_checks"


@dataclass(frozen=True)
class TopHeader:
    """A primary header: its position in Transaction.headers and its n-th-of-name."""

    index: int
    name: str
    occurrence: int


@dataclass(frozen=True)
class RawLines:
    """Body lines [start, end); `piece` is the 2048-byte piece of a body line, -1 for
    a whole header field."""

    start: int
    end: int
    piece: int = -1


@dataclass(frozen=True)
class DecodedLine:
    """Line `line` (and its piece) of the decoded text of part `part`."""

    part: int
    line: int
    piece: int


Loc = TopHeader | RawLines | DecodedLine | None


@dataclass(frozen=True)
class Item:
    """One thing to match: the subject string (in the tables' text mode) and where it is."""

    where: Where
    text: str
    loc: Loc


@dataclass
class PartSpan:
    """A decoded text part, as much as a rewrite needs to re-encode it."""

    body_start: int
    cte: str
    charset: str
    codec: str | None
    top: bool
    ctype_lines: tuple[int, int] | None  # raw lines of its Content-Type field
    header_end: int  # raw line of the blank line ending its header, -1 at top level
    body_end: int = -1


@dataclass
class _Fields:
    """The MIME fields of a header block being read."""

    ctype: str | None = None
    ctype_lines: tuple[int, int] | None = None
    cte: str | None = None
    disposition: str | None = None

    def note(self, name: str, value: str, lines: tuple[int, int] | None) -> None:
        lname = name.lower()
        if lname == "content-type" and self.ctype is None:
            self.ctype, self.ctype_lines = value, lines
        elif lname == "content-transfer-encoding" and self.cte is None:
            self.cte = value
        elif lname == "content-disposition" and self.disposition is None:
            self.disposition = value


def body_lines(body: Body, cap: int | None = None) -> Iterator[bytes]:
    """The body's lines, each with its line end (the last one may lack it).

    Linear in the body size: a line that spans many chunks is joined once, not
    copied again at every chunk. With `cap`, a longer line keeps only its first
    `cap` bytes and its line end, so a 50 MB one-line body never sits in memory
    whole; the walker sets a cap past everything it could match (see line_cap()).
    """
    pending: list[bytes] = []  # the start of a line that spans chunks
    kept = 0  # bytes in pending
    over = False  # bytes of this line were dropped (past the cap)
    cr = False  # the last byte of the previous chunk was "\r"
    for chunk in body.chunks():
        start = 0
        while (nl := chunk.find(b"\n", start)) >= 0:
            if cap is None or (not over and kept + nl - start <= cap):
                pending.append(chunk[start:nl + 1])
                line = pending[0] if len(pending) == 1 else b"".join(pending)
            else:
                # Capped: the kept bytes (without a dangling "\r"), then the line end.
                pending.append(chunk[start:start + cap - kept])
                crlf = chunk[nl - 1:nl] == b"\r" if nl > start else cr
                line = b"".join(pending).rstrip(b"\r") + (b"\r\n" if crlf else b"\n")
            yield line
            pending, kept, over = [], 0, False
            start = nl + 1
        if start < len(chunk):
            rest = len(chunk) - start
            room = rest if cap is None else min(cap - kept, rest)
            if room:
                pending.append(chunk[start:start + room])
                kept += room
            over = over or room < rest
            cr = chunk.endswith(b"\r")
    if pending:
        yield b"".join(pending)


def line_cap(size_limit: int) -> int | None:
    """How much of one body line the walker can ever need (None: all of it).

    Matching sees at most body_checks_size_limit characters of a part, and a part
    header at most header_size_limit bytes. A decoded character can take several
    raw bytes (base64 4:3, then UTF-32 4 bytes a character): 8 bytes a character
    is more than enough.
    """
    if not size_limit:
        return None
    return max(HEADER_LIMIT, 8 * size_limit) + LINE_PIECE


def printable(text: str, limit: int = 200) -> str:
    """A matched line as Postfix logs it: control characters as '?', cut at 200."""
    out = "".join("?" if ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) < 0xE000 else c
                  for c in text[:limit])
    return out


class MessageWalker:
    """Yields Items in message order. Holds per-message state: make one per check."""

    def __init__(self, tx: Transaction, mode: TextMode, decode: bool, size_limit: int,
                 budget: Budget = UNLIMITED) -> None:
        self.tx = tx
        self.budget = budget
        self.mode = mode
        self.decode = decode
        self.size_limit = size_limit
        self.parts: list[PartSpan] = []
        self.notes: list[str] = []
        self.crlf = True
        # MIME state: boundaries (with "is digest") from outer to inner.
        self._boundaries: list[tuple[bytes, bool]] = []
        self._in_headers = False
        self._nested = False  # the header block being read is an attached message's
        self._default_type = ContentType()
        self._fields = _Fields()
        self._field: list[tuple[int, bytes]] = []
        self._field_size = 0
        self._offset = 0  # bytes of the current body segment seen (size limit)
        self._decoder: TextDecoder | None = None
        self._part = -1
        self._dline = 0
        self._doffset = 0

    # --- public -------------------------------------------------------------

    def items(self) -> Iterator[Item]:
        yield from self._top_headers()
        index = -1
        for index, line in enumerate(body_lines(self.tx.body, line_cap(self.size_limit))):
            if not index & 0xFFF and self.budget.left() == 0:
                # Millions of short lines cost Python seconds before any rule runs.
                raise MatchOverrun(f"reading the body (line {index})", self.budget.seconds or 0)
            if index == 0:
                self.crlf = line.endswith(b"\r\n")
            yield from self._line(index, line)
        yield from self._finish(index + 1)

    # --- headers ------------------------------------------------------------

    def _top_headers(self) -> Iterator[Item]:
        seen: dict[str, int] = {}
        fields = _Fields()
        for i, h in enumerate(self.tx.headers):
            lname = h.name.lower()
            seen[lname] = seen.get(lname, 0) + 1
            value = h.value.replace(b"\r\n", b"\n")
            where = Where.MIME_HEADER if lname in MIME_HEADERS else Where.HEADER
            name = h.name.encode("utf-8", "surrogateescape")
            yield Item(where, self._header_text(name, value), TopHeader(i, h.name, seen[lname]))
            fields.note(h.name, self._param_text(value), None)
        yield from self._begin_entity(fields, ContentType(), header_end=-1, top=True)

    def _header_text(self, name: bytes, value: bytes) -> str:
        value = value[: max(0, HEADER_LIMIT - len(name) - 1)]
        if not self.decode:
            return self.mode.subject(name + b":" + value)
        decoded, unknown = decode_words(value)
        for charset in unknown:
            self.notes.append(f"unknown charset {charset!r} in an encoded word; matched raw")
        return name.decode("utf-8", "surrogateescape") + ":" + decoded

    @staticmethod
    def _param_text(value: bytes) -> str:
        # header_size_limit bounds what the parameter parser reads, as for matching.
        return value[:HEADER_LIMIT].decode("utf-8", "surrogateescape").replace("\n", "")

    def _header_line(self, index: int, content: bytes) -> Iterator[Item]:
        if content[:1] in (b" ", b"\t") and self._field:
            if self._field_size < HEADER_LIMIT:
                self._field.append((index, content))
                self._field_size += len(content) + 1
            else:
                self._field.append((index, b""))
            return
        yield from self._flush_field()
        if content and _HEADER_LINE.match(content):
            self._field = [(index, content)]
            self._field_size = len(content)
            return
        # A blank line or garbage ends the header block; either is body text.
        yield from self._end_headers(index)
        yield from self._line(index, content + b"\n", raw_only=True)

    def _flush_field(self) -> Iterator[Item]:
        if not self._field:
            return
        start, end = self._field[0][0], self._field[-1][0] + 1
        # Lines past HEADER_LIMIT were kept as b"" only to know where the field ends.
        raw = b"\n".join(content for n, content in self._field if content or n == start)
        self._field = []
        name, _, value = raw.partition(b":")
        name = name.rstrip(b" \t")
        lname = name.decode("ascii", "replace").lower()
        if self._nested and lname not in MIME_HEADERS:
            where = Where.NESTED_HEADER
        else:
            where = Where.MIME_HEADER
        yield Item(where, self._header_text(name, value), RawLines(start, end))
        self._fields.note(lname, self._param_text(value), (start, end))

    def _end_headers(self, index: int) -> Iterator[Item]:
        self._in_headers = False
        fields, self._fields = self._fields, _Fields()
        yield from self._begin_entity(fields, self._default_type, header_end=index, top=False)

    # --- entities -----------------------------------------------------------

    def _begin_entity(
        self, fields: _Fields, default: ContentType, header_end: int, top: bool
    ) -> Iterator[Item]:
        """After a header block: decide what the following body lines are."""
        ctype = parse_content_type(fields.ctype) or default
        cte = (fields.cte or "").strip().lower()
        name = filename_of(fields.disposition, ctype if fields.ctype else None)
        if name is not None:
            yield Item(Where.FILENAME, self.mode.from_str(name), None)
        self._offset = 0
        boundary = ctype.params.get("boundary", "")
        if ctype.maintype == "multipart" and boundary and len(self._boundaries) < NESTING_LIMIT:
            self._boundaries.append((boundary.encode("utf-8", "surrogateescape"),
                                     ctype.subtype == "digest"))
            return
        nested = ctype.value in ("message/rfc822", "message/global") and cte in IDENTITY_CTE
        if nested and len(self._boundaries) < NESTING_LIMIT:
            self._start_headers(nested=True, default=ContentType())
            return
        if self.decode and ctype.maintype == "text":
            label = ctype.params.get("charset", "")
            codec = lookup_charset(label) if label else None
            if label and codec is None:
                # Still undo base64/quoted-printable; the bytes are then read as UTF-8
                # with undecodable bytes kept as they are (surrogate escapes).
                self.notes.append(f"unknown charset {label!r} in a text part; "
                                  "matched as UTF-8/raw bytes")
            self._decoder = TextDecoder(cte, codec, keep=self.size_limit or None)
            self._part = len(self.parts)
            self._dline = 0
            self._doffset = 0
            self.parts.append(PartSpan(
                body_start=header_end + 1, cte=cte, charset=label, codec=codec, top=top,
                ctype_lines=fields.ctype_lines, header_end=header_end,
            ))

    def _start_headers(self, nested: bool, default: ContentType) -> None:
        self._in_headers = True
        self._nested = nested
        self._default_type = default
        self._fields = _Fields()

    def _end_leaf(self, index: int) -> Iterator[Item]:
        if self._decoder is not None:
            for text in self._decoder.finish():
                yield from self._decoded(text)
            self.parts[self._part].body_end = index
            self._decoder = None

    # --- body ---------------------------------------------------------------

    def _line(self, index: int, line: bytes, raw_only: bool = False) -> Iterator[Item]:
        content = line[:-1] if line.endswith(b"\n") else line
        if content.endswith(b"\r"):
            content = content[:-1]
        if not raw_only and self._boundaries and content.startswith(b"--"):
            for depth in range(len(self._boundaries) - 1, -1, -1):
                boundary, digest = self._boundaries[depth]
                if content.startswith(boundary, 2):
                    yield from self._boundary(index, content, depth, boundary, digest)
                    return
        if self._in_headers and not raw_only:
            yield from self._header_line(index, content)
            return
        if self._decoder is not None and not raw_only:
            if self.size_limit and self._doffset >= self.size_limit:
                return  # past body_checks_size_limit: nothing more to match here
            if self._decoder.full:
                return  # the open decoded line is already past the size limit
            for text in self._decoder.feed(line):
                yield from self._decoded(text)
            return
        yield from self._raw(index, content)

    def _boundary(
        self, index: int, content: bytes, depth: int, boundary: bytes, digest: bool
    ) -> Iterator[Item]:
        if self._in_headers:
            yield from self._flush_field()
            self._in_headers = False
            self._fields = _Fields()
        yield from self._end_leaf(index)
        del self._boundaries[depth + 1:]
        self._offset = 0
        yield from self._raw(index, content)
        if content.startswith(b"--", 2 + len(boundary)):
            self._boundaries.pop()  # closing delimiter: the epilogue is plain body text
            return
        default = ContentType("message", "rfc822") if digest else ContentType()
        self._start_headers(nested=False, default=default)

    def _raw(self, index: int, content: bytes) -> Iterator[Item]:
        limit = self.size_limit
        if len(content) <= LINE_PIECE:  # the common case, without the piece loop
            if not (limit and self._offset >= limit):
                yield Item(Where.BODY, self.mode.subject(content), RawLines(index, index + 1, 0))
            self._offset += len(content) + 1
            return
        for piece, start in enumerate(range(0, max(len(content), 1), LINE_PIECE)):
            if limit and self._offset + start >= limit:
                break
            text = self.mode.subject(content[start:start + LINE_PIECE])
            yield Item(Where.BODY, text, RawLines(index, index + 1, piece))
        self._offset += len(content) + 1

    def _decoded(self, text: str) -> Iterator[Item]:
        line = self._dline
        self._dline += 1
        if self.size_limit and self._doffset >= self.size_limit:
            return
        for piece, start in enumerate(range(0, max(len(text), 1), LINE_PIECE)):
            if self.size_limit and self._doffset + start >= self.size_limit:
                break
            yield Item(Where.BODY, text[start:start + LINE_PIECE],
                       DecodedLine(self._part, line, piece))
        self._doffset += len(text) + 1

    def _finish(self, end: int) -> Iterator[Item]:
        if self._in_headers:
            yield from self._flush_field()
            self._in_headers = False
        yield from self._end_leaf(end)
        for part in self.parts:
            if part.body_end < 0:
                part.body_end = end

