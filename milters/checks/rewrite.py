"""Body rewriting for IGNORE, REPLACE and PREPEND on body lines and part headers.

A milter cannot edit one body line; it replaces the whole body (smfi_replacebody),
so the edits found while walking are applied in a second pass over Body.chunks().
Lines matched raw are edited raw, as Postfix's cleanup does (header_checks(5):
REPLACE/IGNORE/PREPEND work on the line or the 2048-byte piece that matched).
Lines matched in decoded text are edited in the decoded text and the part is encoded
again with its own transfer encoding and charset; if that charset cannot hold the
new text, the part becomes UTF-8 and its Content-Type charset says so.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import AnyStr

from milters.checks.actions import Kind
from milters.checks.message import LINE_PIECE, DecodedLine, PartSpan, RawLines, body_lines
from milters.checks.mime import TextDecoder
from milters.core.model import Body

_CHARSET_PARAM = re.compile(rb"(;\s*charset\s*=\s*)(\"[^\"]*\"|[^\s;]*)", re.IGNORECASE)


@dataclass(frozen=True)
class LineEdit:
    """One edit: `text` is ordinary text (already converted from the match space)."""

    kind: Kind  # IGNORE, REPLACE or PREPEND
    text: str
    loc: RawLines | DecodedLine


@dataclass(frozen=True)
class Rewritten:
    body: bytes
    top_charset_utf8: bool  # the top-level text part is now UTF-8: fix its Content-Type
    notes: tuple[str, ...] = ()


def _eol_of(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return b"\r\n"
    return b"\n" if line.endswith(b"\n") else b""


def _edit_pieces(content: AnyStr, edits: Sequence[LineEdit], encode: bool) -> list[AnyStr]:
    """One line after its piece edits: PREPENDed lines, then the line unless IGNOREd away.

    `encode` says that `content` is bytes, so edit texts must be encoded to match it.
    """
    def conv(text: str) -> AnyStr:
        return text.encode("utf-8", "surrogateescape") if encode else text  # type: ignore[return-value]

    pieces = [content[i:i + LINE_PIECE] for i in range(0, max(len(content), 1), LINE_PIECE)]
    before: list[AnyStr] = []
    keep = [True] * len(pieces)
    for e in edits:
        piece = e.loc.piece
        if not 0 <= piece < len(pieces):
            continue
        if e.kind is Kind.PREPEND:
            before.append(conv(e.text))
        elif e.kind is Kind.REPLACE:
            pieces[piece] = conv(e.text)
        elif e.kind is Kind.IGNORE:
            keep[piece] = False
    kept = [p for p, k in zip(pieces, keep, strict=True) if k]
    if not kept:
        return before
    line = content[:0]
    for p in kept:
        line += p
    before.append(line)
    return before


def rewrite_body(body: Body, parts: Sequence[PartSpan], edits: Sequence[LineEdit]) -> Rewritten:
    raw_edits: dict[int, list[LineEdit]] = {}
    part_edits: dict[int, list[LineEdit]] = {}
    for e in edits:
        if isinstance(e.loc, RawLines):
            raw_edits.setdefault(e.loc.start, []).append(e)
        else:
            part_edits.setdefault(e.loc.part, []).append(e)
    starts = {parts[p].body_start: p for p in part_edits}
    # Where a part's Content-Type field (or the place for a missing one) sits in `out`.
    ctype_slot: dict[int, int] = {}
    slot_of_line = {lines[0]: p for p in part_edits
                    if (lines := parts[p].ctype_lines) is not None and not parts[p].top}
    missing_ctype = {parts[p].header_end: p for p in part_edits
                     if parts[p].ctype_lines is None and not parts[p].top}
    out: list[bytes] = []
    notes: list[str] = []
    utf8_parts: set[int] = set()
    eol = b"\r\n"
    collect: list[bytes] = []
    collect_end = -1
    collect_edits: list[LineEdit] = []
    collect_kind = ""
    collect_part = -1

    def finish_region() -> None:
        nonlocal collect_end
        if collect_kind == "header":
            out.extend(_edit_header(collect, collect_edits, eol))
        elif collect_kind == "ctype":  # one slot for the whole (maybe folded) field
            ctype_slot[collect_part] = len(out)
            out.append(b"".join(collect))
        else:
            data, utf8 = _reencode(parts[collect_part], collect, part_edits[collect_part], eol)
            if utf8:
                utf8_parts.add(collect_part)
            out.append(data)
        collect.clear()
        collect_end = -1

    def handle(index: int, line: bytes) -> None:
        nonlocal collect_end, collect_edits, collect_kind, collect_part
        if index in starts and parts[starts[index]].body_end > index:
            collect_part = starts[index]
            collect_kind, collect_end = "part", parts[collect_part].body_end
            collect.append(line)
            return
        if index in missing_ctype:
            ctype_slot[missing_ctype[index]] = len(out)
            out.append(b"")
        if index in slot_of_line and index not in raw_edits:
            collect_part = slot_of_line[index]
            lines = parts[collect_part].ctype_lines
            collect_kind, collect_end = "ctype", lines[1] if lines else index + 1
            collect.append(line)
            if collect_end <= index + 1:
                finish_region()
            return
        here = raw_edits.get(index, [])
        header_edits = [e for e in here if isinstance(e.loc, RawLines) and e.loc.piece < 0]
        if header_edits and isinstance(header_edits[0].loc, RawLines):
            collect_kind, collect_edits = "header", header_edits
            collect_end = header_edits[0].loc.end
            collect.append(line)
            if collect_end <= index + 1:
                finish_region()
            return
        if not here:
            out.append(line)
            return
        line_eol = _eol_of(line)
        content = line[: len(line) - len(line_eol)]
        if content.endswith(b"\r") and not line_eol:
            content = content[:-1]
        new = _edit_pieces(content, here, encode=True)
        for data in new:
            out.append(data + (line_eol or eol))
        if new and not line_eol:
            out[-1] = out[-1][: -len(eol)]

    index = -1
    for index, line in enumerate(body_lines(body)):
        if index == 0:
            eol = _eol_of(line) or b"\r\n"
        if collect_end >= 0:
            if index < collect_end:
                collect.append(line)
                continue
            finish_region()
        handle(index, line)
    if collect_end >= 0:
        finish_region()
    # Empty decoded parts (no body lines at all) have nothing to edit: ignore them.
    for p in utf8_parts:
        if parts[p].top:
            continue
        slot = ctype_slot.get(p)
        if slot is None:
            notes.append("a rewritten part became UTF-8 but its Content-Type was edited; "
                         "charset left as it was")
            continue
        if parts[p].ctype_lines is None:
            out[slot] = b"Content-Type: text/plain; charset=utf-8" + eol
        else:
            out[slot] = set_charset(out[slot], eol)
    top_utf8 = any(parts[p].top for p in utf8_parts)
    return Rewritten(b"".join(out), top_utf8, tuple(notes))


def _edit_header(lines: list[bytes], edits: Sequence[LineEdit], eol: bytes) -> list[bytes]:
    """IGNORE, REPLACE or PREPEND on a part or nested-message header field."""
    line_eol = _eol_of(lines[-1]) or eol
    out: list[bytes] = []
    keep = True
    for e in edits:
        text = e.text.encode("utf-8", "surrogateescape") + line_eol
        if e.kind is Kind.PREPEND:
            out.append(text)
        elif e.kind is Kind.REPLACE:
            out.append(text)
            keep = False
        elif e.kind is Kind.IGNORE:
            keep = False
    if keep:
        out.extend(lines)
    return out


def set_charset(field: bytes, eol: bytes) -> bytes:
    if _CHARSET_PARAM.search(field):
        return _CHARSET_PARAM.sub(rb"\1utf-8", field, count=1)
    stripped = field.rstrip(b"\r\n")
    return stripped + b"; charset=utf-8" + (field[len(stripped):] or eol)


def _reencode(
    part: PartSpan, raw: list[bytes], edits: Sequence[LineEdit], eol: bytes
) -> tuple[bytes, bool]:
    """Decode a text part, apply the edits to its lines, encode it the same way.

    Returns the new part body and whether it had to become UTF-8.
    """
    decoder = TextDecoder(part.cte, part.codec)
    lines: list[str] = []
    for line in raw:
        lines.extend(decoder.feed(line))
    lines.extend(decoder.finish())
    by_line: dict[int, list[LineEdit]] = {}
    for e in edits:
        if isinstance(e.loc, DecodedLine):
            by_line.setdefault(e.loc.line, []).append(e)
    new_lines: list[str] = []
    for n, text in enumerate(lines):
        if n not in by_line:
            new_lines.append(text)
            continue
        new_lines.extend(_edit_pieces(text, by_line[n], encode=False))
    # No charset parameter means us-ascii (RFC 2045 §5.2); a label we could not
    # decode was read as UTF-8, so it is written back that way, label untouched.
    codec = part.codec or ("utf-8" if part.charset else "ascii")
    try:
        return _encode_part(part.cte, new_lines, codec, decoder.ended_with_newline, raw, eol), False
    except UnicodeEncodeError:
        utf8 = _encode_part(part.cte, new_lines, "utf-8", decoder.ended_with_newline, raw, eol)
        return utf8, codec != "utf-8"


def _encode_part(
    cte: str, lines: list[str], codec: str, ended_with_newline: bool, raw: list[bytes], eol: bytes
) -> bytes:
    ends_eol = bool(_eol_of(raw[-1])) if raw else True
    if cte == "base64":
        # RFC 2045 §6.8: text is put in canonical CRLF form before base64.
        text = "\r\n".join(lines) + ("\r\n" if ended_with_newline and lines else "")
        encoded = base64.encodebytes(_encode(text, codec)).replace(b"\n", eol)
        return encoded if ends_eol or not encoded else encoded[: -len(eol)]
    chunks = []
    for text in lines:
        data = _encode(text, codec)
        if cte == "quoted-printable":
            data = binascii.b2a_qp(data).replace(b"\n", eol)
        chunks.append(data)
    result = eol.join(chunks)
    if chunks and ended_with_newline and ends_eol:
        result += eol
    return result


def _encode(text: str, codec: str) -> bytes:
    """Raises UnicodeEncodeError when `codec` cannot hold the text."""
    if codec in ("utf-8", "ascii"):  # surrogates give back the raw bytes they stand for
        return text.encode(codec, "surrogateescape")
    return text.encode(codec)
