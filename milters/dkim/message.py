"""A transaction's header as DKIM sees it, and the folding Postfix would do on the way out.

dkimpy works on (name, value) byte pairs where the value is everything after
the colon with CRLF line ends, as on the wire. Our Transaction keeps values
byte-exact with folds joined by "\\n" (SMFIP_HDR_LEADSPC), so the wire form is
name + ":" + value, folds as CRLF.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from milters.core.model import Header

# RFC 5322 §2.1.1: a line MUST be no more than 998 characters without its CRLF.
# Postfix's smtp client breaks longer lines on the way out (smtp_line_length_limit),
# which would break a signature made over the long line.
MAX_LINE = 998

@dataclass(frozen=True)
class FoldedField:
    """A field whose value we fold before signing: the n-th (1-based) of its name."""

    name: str
    occurrence: int
    value: bytes  # the new value, folds joined by "\n" as in Transaction


def fold_value(name: str, value: bytes, limit: int = MAX_LINE) -> bytes | None:
    """`value` with every line of the field kept within `limit` bytes; None if it already is.

    Folds at the last space or tab before the limit (RFC 5322 §2.2.3: folding is
    inserting CRLF before white space), which relaxed canonicalization ignores;
    a run without white space is broken with "\\n " as Postfix does.
    """
    lines = value.replace(b"\r\n", b"\n").split(b"\n")
    prefix = len(name) + 1  # "Name:" on the first line
    if all(len(line) + (prefix if i == 0 else 0) <= limit for i, line in enumerate(lines)):
        return None
    out: list[bytes] = []
    for i, line in enumerate(lines):
        # Walk the line with an offset; the rest is never copied (linear in its length).
        # A piece after a cut starts at `start` (its first byte is the fold's white
        # space, or the " " we insert) and may hold `limit` bytes.
        # A name longer than the limit (hostile) still leaves one byte per piece.
        room = max(1, limit - (prefix if i == 0 else 0))
        start, lead = 0, b""
        while len(lead) + len(line) - start > room:
            # Never fold at position 0 of a continuation line (that white space is the fold).
            first = start if lead else start + 1
            end = start + room - len(lead)
            cut = max(line.rfind(b" ", first, end), line.rfind(b"\t", first, end))
            if cut < 0:  # no white space to fold at
                out.append(lead + line[start:end])
                start, lead = end, b" "
            else:
                out.append(lead + line[start:cut])
                start, lead = cut, b""
            room = limit
        out.append(lead + line[start:])
    return b"\n".join(out)


def fold_long_fields(headers: Sequence[Header]) -> list[FoldedField]:
    """The fields that have a line longer than 998 bytes, folded."""
    seen: dict[str, int] = {}
    folded = []
    for h in headers:
        key = h.name.lower()
        seen[key] = seen.get(key, 0) + 1
        new = fold_value(h.name, h.value)
        if new is not None:
            folded.append(FoldedField(h.name, seen[key], new))
    return folded


def break_long_body_lines(body: bytes, limit: int = MAX_LINE) -> bytes | None:
    """The body with lines over `limit` bytes broken as Postfix's smtp client would
    break them (smtp_line_length_limit: "<CR><LF><SPACE>" inserted), or None if no
    line is that long. Signing this form, and handing it to Postfix as the new
    body, keeps the body hash valid on the way out (RFC 6376 §5.3: sign what is sent).
    """
    lines = body.split(b"\r\n")
    if all(len(line) <= limit for line in lines):
        return None
    out: list[bytes] = []
    for line in lines:
        if len(line) <= limit:
            out.append(line)
            continue
        # The first piece is `limit` bytes, each further one " " + limit-1 bytes;
        # sliced at offsets, never copying the rest (linear, issue 9: was quadratic).
        out.append(line[:limit])
        out += [b" " + line[i:i + limit - 1] for i in range(limit, len(line), limit - 1)]
    return b"\r\n".join(out)
