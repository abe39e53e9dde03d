"""The one Authentication-Results writer (RFC 8601), its reader and the forged-field remover.

One reader decides, for the remover and for every consumer alike, which
authserv-id a field claims and what it reports (read_field, authserv_id_of): a
field the remover keeps as foreign can never be read as ours downstream. The
remover also removes what a careless reader could take for ours.

Who removes forged fields: each of our filters is its own milter, and in Postfix
every milter sees the header as changed by the milters before it, so a filter
cannot tell a sibling's fresh field from a forged one by position alone. The rule:

* a filter with no filter of ours before it in chain order (Env.upstream empty:
  the first enabled one, as `milters postfix-config` orders `smtpd_milters`)
  removes every incoming field that carries our authserv-id, before any of our
  fields exist;
* every filter also removes incoming fields with our authserv-id that report a
  method it owns itself (a dkim result is only ever written by our dkim filter),
  so a misordered chain still never keeps a forged result for that method.

Our own fields are inserted at index 0, the very top of the header, above
Postfix's Received field (RFC 8601 §5: the field goes above the Received field
of the MTA that did the work, so that it can be told from older ones).
authserv-ids compare without case and without a trailing root dot (normalize_id).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import authres

from milters.core.model import Header
from milters.core.verdict import AuthResult

FIELD_NAME = "Authentication-Results"

# RFC 2045 token: what may stand unquoted as an RFC 8601 `value`.
_TOKEN = re.compile(r'^[^\x00-\x20\x7f()<>@,;:\\"/\[\]?=]+$')
_METHOD_LIKE = re.compile(r"\s*([A-Za-z0-9_-]+)\s*(?:/\s*\d+\s*)?=")


def quote_value(value: str) -> str:
    """An RFC 8601 `value`: a token as it is, anything else as a quoted-string."""
    if _TOKEN.match(value):
        return value
    return '"' + re.sub(r'(["\\])', r"\\\1", value) + '"'


def format_value(authserv_id: str, results: Sequence[AuthResult]) -> str:
    """The field value (after `Authentication-Results:`), built with authres."""
    objs = []
    for r in results:
        props = [authres.AuthenticationResultProperty(t, n, v) for t, n, v in r.properties]
        objs.append(
            authres.AuthenticationResult(
                method=r.method,
                version=r.version or None,
                result=r.result,
                result_comment=r.comment or None,
                reason=r.reason or None,
                properties=props,
            )
        )
    header = authres.core.AuthenticationResultsHeader(
        authres.core_features(), authserv_id="x", results=objs
    )
    # authres lower-cases and never quotes the authserv-id; RFC 8601 §2.2 allows any
    # `value`, so we quote it ourselves and keep the administrator's spelling.
    tail: str = header.header_value()[1:]
    return quote_value(authserv_id) + tail


def fold(value: str, name: str = FIELD_NAME, width: int = 78) -> str:
    """Fold a long value at `; ` and spaces so lines stay under `width` (RFC 5322 §2.2.3)."""
    first_room = width - len(name) - 2
    out: list[str] = []
    line = ""
    room = first_room
    for token in re.split(r"(?<=;) ", value):
        for word in token.split(" "):
            candidate = f"{line} {word}" if line else word
            if len(candidate) > room and line:
                out.append(line)
                line = word
                room = width - 1
            else:
                line = candidate
    out.append(line)
    return "\n\t".join(out)


def methods_of(value: str | bytes) -> set[str]:
    """Method names a field reports (dkim, spf...): what the grammar reads, and on a
    broken field whatever looks like `method=` after a ';' (removal errs on the wide side)."""
    text = _text(value)
    field = read_field(text)
    found = {r.method for r in field.results} if field and field.results is not None else set()
    for part in text.split(";")[1:]:
        m = _METHOD_LIKE.match(part)
        if m:
            found.add(m.group(1).lower())
    return found


def is_ours(value: str | bytes, authserv_id: str) -> bool:
    """Does this field claim our authserv-id, to the grammar or to a careless reader?"""
    ours = normalize_id(authserv_id)
    text = _text(value)
    return authserv_id_of(text) == ours or _claimed_id(text) == ours


def forged_fields(
    headers: Iterable[Header],
    authserv_id: str,
    remove_all: bool,
    owned_methods: frozenset[str] = frozenset(),
) -> list[int]:
    """1-based occurrence numbers of AR fields to delete (RFC 8601 §5).

    `remove_all`: this filter is first in the chain and removes every field with our
    authserv-id; otherwise only those reporting a method in `owned_methods`.
    """
    if not (remove_all or owned_methods):
        return []  # a filter that writes no results owns no field (checks, dkim-sign)
    occurrence = 0
    doomed = []
    for h in headers:
        if h.name.lower() != FIELD_NAME.lower():
            continue
        occurrence += 1
        if not remove_all:
            # Every method methods_of can find is spelt in the text: a field that
            # does not even contain an owned name is not read (a chain step meets
            # the fields of every step before it; the full read costs ~80 us).
            text = _text(h.value).lower()
            if not any(m in text for m in owned_methods):
                continue
        if not is_ours(h.value, authserv_id):
            continue
        if remove_all or methods_of(h.value) & owned_methods:
            doomed.append(occurrence)
    return doomed


# ---------------------------------------------------------------------------
# The one reader of incoming fields (RFC 8601 §2.2). The remover and every
# consumer decide "whose field is this" with the same function, so no field can
# be kept as foreign by one and trusted as ours by the other.
#
# It is a linear scanner: comments nest (RFC 5322 §3.2.2) but are skipped with a
# depth counter, never by recursion, and a field longer than MAX_FIELD is not
# read for results at all (Postfix's header_size_limit is 100 KiB by default).

MAX_FIELD = 64 * 1024
# Trusted fields read in full per message: our own filters write one each, an
# upstream host of trust a few; thousands are an attack, not mail.
MAX_TRUSTED_FIELDS = 16

_WSP = r"[ \t\r\n]"  # what folding white space is made of
_FWS = re.compile(_WSP + "*")
_CTEXT = re.compile(r"[^()\\]+")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.S)
_ID_TOKEN = re.compile(r'[^\x00-\x20\x7f()<>@,;:\\"/\[\]?=]+')
_DIGITS = re.compile(r"[0-9]+")
_KEYWORD = re.compile(r"[A-Za-z0-9_-]+")
_PVALUE = re.compile(r'[^\s;()"]+')
_UNQUOTE = re.compile(r"\\(.)", re.S)
_CARELESS_ID = re.compile(r'[\s"]*([^\s;"(]+)')


class _Malformed(Exception):
    """The field does not follow RFC 8601's grammar at this point."""


class _Scanner:
    """A position in a field value, with the CFWS rules of RFC 5322 §3.2.2."""

    __slots__ = ("pos", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def cfws(self) -> bool:
        """Skip folding white space and (nested) comments; True if anything was skipped."""
        start = self.pos
        text = self.text
        while True:
            self.pos = _FWS.match(text, self.pos).end()  # type: ignore[union-attr]
            if self.pos >= len(text) or text[self.pos] != "(":
                return self.pos > start
            depth = 0
            while True:  # a comment: ctext, quoted-pairs, nested comments
                if self.pos >= len(text):
                    raise _Malformed("unterminated comment")
                c = text[self.pos]
                if c == "(":
                    depth += 1
                    self.pos += 1
                elif c == ")":
                    depth -= 1
                    self.pos += 1
                    if depth == 0:
                        break
                elif c == "\\":
                    self.pos += 2
                else:
                    self.pos = _CTEXT.match(text, self.pos).end()  # type: ignore[union-attr]

    def take(self, pattern: re.Pattern[str]) -> str | None:
        m = pattern.match(self.text, self.pos)
        if m is None or m.end() == self.pos:
            return None
        self.pos = m.end()
        return m.group(0)

    def char(self, c: str) -> bool:
        if self.text.startswith(c, self.pos):
            self.pos += 1
            return True
        return False

    def value(self) -> str | None:
        """RFC 2045 `value`: a token, or a quoted-string (returned unquoted)."""
        m = _QUOTED.match(self.text, self.pos)
        if m is not None:
            self.pos = m.end()
            return _UNQUOTE.sub(r"\1", m.group(1))
        return self.take(_ID_TOKEN)

    def keyword(self) -> str:
        word = self.take(_KEYWORD)
        if word is None:
            raise _Malformed("keyword expected")
        return word.lower()

    def at_end(self) -> bool:
        return self.pos >= len(self.text)


def normalize_id(authserv_id: str) -> str:
    """How authserv-ids compare: without case, and a trailing root dot is the same name."""
    ident = authserv_id.strip().lower()
    return ident[:-1] if ident.endswith(".") and len(ident) > 1 else ident


class ArResult(NamedTuple):
    """One resinfo: `method=result` and its `ptype.property` values (lower-case keys)."""

    method: str
    result: str
    props: dict[str, str]


@dataclass(frozen=True)
class ArField:
    """An incoming field as read: its authserv-id and, if the rest is well formed, results."""

    authserv_id: str  # normalized (normalize_id)
    results: tuple[ArResult, ...] | None  # None: malformed, to be believed by no one


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _read_id(s: _Scanner) -> str | None:
    try:
        s.cfws()
    except _Malformed:
        return None
    ident = s.value()
    return normalize_id(ident) if ident else None


def _claimed_id(text: str) -> str | None:
    """What a careless reader could take for the authserv-id: the first word, quotes
    set aside. The grammar reads nothing in `"mx.example.com; dkim=pass` (the quote
    never closes), but a lenient reader downstream might: removal looks at both."""
    m = _CARELESS_ID.match(text)
    return normalize_id(m.group(1)) if m else None


def authserv_id_of(value: str | bytes) -> str | None:
    """The authserv-id a field claims (normalize_id), as the grammar reads it; None if none."""
    return _read_id(_Scanner(_text(value)))


def read_field(value: str | bytes) -> ArField | None:
    """Read a field value in full (RFC 8601 §2.2); None if not even its authserv-id reads."""
    text = _text(value)
    if _NOT_PLAIN.search(text) is None:
        return _read_plain(text)
    return _read_scanned(text)


def _read_scanned(text: str) -> ArField | None:
    """read_field by the scanner: any value, comments and quoted strings included."""
    s = _Scanner(text)
    ident = _read_id(s)
    if ident is None:
        return None
    if len(text) > MAX_FIELD:
        return ArField(ident, None)
    try:
        return ArField(ident, _read_results(s))
    except _Malformed:
        return ArField(ident, None)


# The plain form: no comment, quoted-string or quoted-pair anywhere, so CFWS is
# only folding white space and every token is what the scanner's patterns take.
# Nearly every field is plain; the same grammar then runs as one match per
# resinfo and per property instead of a scanner call per token (a fifth of
# dmarc's work per message went to reading one upstream field).
_NOT_PLAIN = re.compile(r'[("\\]')
# The scanner's own patterns, put together: FWS, then the token the scanner takes.
_W = _FWS.pattern
_PLAIN_ID = re.compile(f"{_W}({_ID_TOKEN.pattern})")
_PLAIN_HEAD = re.compile(f"(?:{_WSP}+(?:{_DIGITS.pattern}{_W})?)?;")  # [authres-version] ;
_PLAIN_NONE = re.compile(f"{_W}(?i:none){_W}\\Z")
_PLAIN_RESINFO = re.compile(
    f"{_W}({_KEYWORD.pattern}){_W}(?:/{_W}{_DIGITS.pattern}{_W})?={_W}({_KEYWORD.pattern})")
_PLAIN_PROP = re.compile(
    f"{_W}(?:(?i:reason){_W}={_W}{_ID_TOKEN.pattern}"  # reasonspec
    f"|({_KEYWORD.pattern}){_W}\\.{_W}({_KEYWORD.pattern}){_W}={_W}({_PVALUE.pattern}))")


def _read_plain(text: str) -> ArField | None:
    """read_field for a plain value (see _NOT_PLAIN): the same answer, faster."""
    m = _PLAIN_ID.match(text)
    if m is None:
        return None
    ident = normalize_id(m.group(1))
    if len(text) > MAX_FIELD:
        return ArField(ident, None)
    m = _PLAIN_HEAD.match(text, m.end())
    if m is None:
        return ArField(ident, None)
    pos = m.end()
    end = len(text)
    if _PLAIN_NONE.match(text, pos):
        return ArField(ident, ())
    results: list[ArResult] = []
    while True:
        pos = _FWS.match(text, pos).end()  # type: ignore[union-attr]
        if pos >= end:
            break  # a trailing ';'
        m = _PLAIN_RESINFO.match(text, pos)
        if m is None:
            return ArField(ident, None)
        props: dict[str, str] = {}
        pos = m.end()
        while True:
            pos = _FWS.match(text, pos).end()  # type: ignore[union-attr]
            if pos >= end or text[pos] == ";":
                break
            p = _PLAIN_PROP.match(text, pos)
            if p is None:
                return ArField(ident, None)
            if p.group(1) is not None:
                props.setdefault(f"{p.group(1).lower()}.{p.group(2).lower()}", p.group(3))
            pos = p.end()
        results.append(ArResult(m.group(1).lower(), m.group(2).lower(), props))
        if pos >= end:
            break
        pos += 1  # the ';' between results
    return ArField(ident, tuple(results))


def _read_results(s: _Scanner) -> tuple[ArResult, ...]:
    # [CFWS authres-version] then no-result / 1*resinfo, then [CFWS] to the end.
    if s.cfws():
        s.take(_DIGITS)  # authres-version
        s.cfws()
    results: list[ArResult] = []
    if not s.char(";"):
        raise _Malformed("';' expected after the authserv-id")
    while True:
        s.cfws()
        if s.at_end():
            break  # a trailing ';' is common and harmless
        method = s.keyword()
        s.cfws()
        if method == "none" and not results and s.at_end():
            break  # no-result: "; none" and nothing else
        if s.char("/"):  # method-version
            s.cfws()
            if s.take(_DIGITS) is None:
                raise _Malformed("method version expected")
            s.cfws()
        if not s.char("="):
            raise _Malformed("'=' expected after the method")
        s.cfws()
        result = s.keyword()
        results.append(ArResult(method, result, _read_props(s)))
        if s.at_end():
            break
        if not s.char(";"):
            raise _Malformed("';' expected between results")
    return tuple(results)


def _read_props(s: _Scanner) -> dict[str, str]:
    props: dict[str, str] = {}
    while True:
        s.cfws()
        if s.at_end() or s.text.startswith(";", s.pos):
            return props
        ptype = s.keyword()
        s.cfws()
        if ptype == "reason" and s.char("="):  # reasonspec
            s.cfws()
            if s.value() is None:
                raise _Malformed("reason value expected")
            continue
        if not s.char("."):
            raise _Malformed("'.' expected in a property")
        s.cfws()
        prop = s.keyword()
        s.cfws()
        if not s.char("="):
            raise _Malformed("'=' expected in a property")
        s.cfws()
        m = _QUOTED.match(s.text, s.pos)
        if m is not None:
            s.pos = m.end()
            pvalue = _UNQUOTE.sub(r"\1", m.group(1))
        else:
            raw = s.take(_PVALUE)
            if raw is None:
                raise _Malformed("property value expected")
            pvalue = raw
        props.setdefault(f"{ptype}.{prop}", pvalue)


def trusted_results(values: Iterable[bytes], trusted_ids: Collection[str],
                    limit: int = MAX_TRUSTED_FIELDS) -> Iterator[ArField]:
    """The well-formed fields whose authserv-id is trusted, at most `limit` of them.

    Only the authserv-id of every field is read; the full grammar runs on trusted
    fields only, so thousands of foreign fields cost a prefix scan each.
    """
    trusted = {normalize_id(i) for i in trusted_ids}
    taken = 0
    for value in values:
        if taken >= limit:
            return
        if authserv_id_of(value) not in trusted:
            continue
        field = read_field(value)
        if field is not None and field.results is not None:
            taken += 1
            yield field
