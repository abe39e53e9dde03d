"""A bounded reader for RFC 5322 address lists (From, Sender, Reply-To, Return-Path).

email.utils.getaddresses recurses once per nested comment: a From field with about
a thousand nested comments raised RecursionError, which ended every delivery try
in on_error. This reader never recurses and never raises. It scans the text once:
comments are skipped with a depth counter (RFC 5322 §3.2.2), quoted strings and
domain literals are read to their closing quote, and the tokens left are parsed
as an RFC 5322 §3.4 address-list, groups (§3.4) and the obsolete forms of §4.4
(route addresses `<@a,@b:x@y>`, empty list elements, CFWS between the dots of a
local part or domain) included. Encoded words (RFC 2047) are atoms and stay as
they are; non-ASCII text (RFC 6532, or bytes that were not UTF-8 and arrive
surrogate-escaped) is taken as atom text and judged by whoever uses the domain.

A field that is too long, too deeply nested, holds too many addresses or breaks
the grammar gives an AddressList with `error` set and no mailboxes: a defined
"unparseable" answer that the caller maps onto its RFC result (DMARC: RFC 9989
§5.3.1, no single Author Domain).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Bounds. Postfix's header_size_limit (102400 bytes) caps a field anyway; these
# keep a field read here linear and small whatever the source.
MAX_CHARS = 131_072
MAX_COMMENT_DEPTH = 256  # RFC 5322 sets none; real mail nests one or two
MAX_ADDRESSES = 100
# RFC 5321 §4.5.3.1: a local part is at most 64 octets and a domain 255; with
# quoting and obsolete forms allowed, twice that is still a sane limit.
MAX_LOCAL = 128
MAX_DOMAIN = 512

# RFC 5322 §3.2.3 atext, plus any non-ASCII character (RFC 6532 §3.2 UTF-8 atext;
# surrogate escapes of 8-bit junk land here too and fail domain checks later).
_SPECIALS = frozenset('()<>[]:;@\\,."')
_WSP = frozenset(" \t\r\n")

# Token kinds
_ATOM, _QUOTED, _LITERAL, _SPECIAL = "atom", "quoted", "literal", "special"


@dataclass(frozen=True)
class Mailbox:
    """One RFC 5322 mailbox: the display name (decoded quoted strings, encoded words
    left as they are), the local part as written (quotes kept) and the domain."""

    display_name: str
    local_part: str
    domain: str

    @property
    def address(self) -> str:
        return f"{self.local_part}@{self.domain}"


@dataclass(frozen=True)
class AddressList:
    """The mailboxes of a field; when `error` is set the field was unparseable and
    `mailboxes` is empty."""

    mailboxes: tuple[Mailbox, ...] = ()
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def domains(self) -> tuple[str, ...]:
        """The distinct domains (lower-case, no trailing dot), in order of appearance."""
        seen: dict[str, None] = {}
        for m in self.mailboxes:
            seen.setdefault(m.domain.rstrip(".").lower(), None)
        return tuple(seen)


class _Unparseable(Exception):
    """Internal: the field breaks the grammar or a bound; never leaves this module."""


Token = tuple[str, str]


def _tokens(text: str) -> list[Token]:
    """The lexical tokens of a structured field body, CFWS dropped (RFC 5322 §3.2)."""
    out: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _WSP:
            i += 1
        elif c == "(":
            # RFC 5322 §3.2.2: comments nest; a counter, not recursion.
            depth = 0
            while i < n:
                c = text[i]
                if c == "\\":
                    i += 2
                    continue
                if c == "(":
                    depth += 1
                    if depth > MAX_COMMENT_DEPTH:
                        raise _Unparseable(f"comments nested deeper than {MAX_COMMENT_DEPTH}")
                elif c == ")":
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
            if depth:
                raise _Unparseable("unterminated comment")
            i += 1
        elif c == ")":
            raise _Unparseable("unbalanced ')'")
        elif c == '"':
            # RFC 5322 §3.2.4: quoted-string with quoted-pairs; FWS inside is kept
            # unfolded (CRLF removed, §3.2.2).
            j = i + 1
            chars: list[str] = []
            while j < n and text[j] != '"':
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                if text[j] not in "\r\n":
                    chars.append(text[j])
                j += 1
            if j >= n:
                raise _Unparseable("unterminated quoted string")
            out.append((_QUOTED, "".join(chars)))
            i = j + 1
        elif c == "[":
            # RFC 5322 §3.4.1 domain-literal (obs-dtext allows quoted-pairs)
            j = text.find("]", i + 1)
            if j < 0:
                raise _Unparseable("unterminated domain literal")
            body = "".join(ch for ch in text[i:j + 1] if ch not in _WSP)
            if "[" in body[1:] or "\\" in body:
                raise _Unparseable("malformed domain literal")
            out.append((_LITERAL, body))
            i = j + 1
        elif c in _SPECIALS:
            if c in "]\\":
                raise _Unparseable(f"stray {c!r}")
            out.append((_SPECIAL, c))
            i += 1
        elif c.isascii() and not c.isprintable():
            raise _Unparseable("control character")
        else:
            j = i + 1
            while j < n:
                d = text[j]
                if d in _SPECIALS or d in _WSP or (d.isascii() and not d.isprintable()):
                    break
                j += 1
            out.append((_ATOM, text[i:j]))
            i = j
    return out


class _Parser:
    """RFC 5322 §3.4 address-list over the token list, one pass, no recursion."""

    def __init__(self, tokens: list[Token]) -> None:
        self.t = tokens
        self.i = 0
        self.out: list[Mailbox] = []

    def peek(self) -> Token | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def at(self, special: str) -> bool:
        tok = self.peek()
        return tok is not None and tok == (_SPECIAL, special)

    def expect(self, special: str) -> None:
        if not self.at(special):
            raise _Unparseable(f"expected {special!r}")
        self.i += 1

    def parse(self) -> list[Mailbox]:
        in_group = False
        while self.peek() is not None:
            # obs-addr-list / obs-mbox-list (RFC 5322 §4.4): empty elements
            if self.at(","):
                self.i += 1
                continue
            if in_group and self.at(";"):
                self.i += 1
                in_group = False
                continue
            words = self.phrase()
            if self.at(":") and not in_group:
                # group = display-name ":" [group-list] ";" (§3.4)
                if not words:
                    raise _Unparseable("group without a display name")
                self.i += 1
                in_group = True
                continue
            if self.at("<"):
                self.mailbox(" ".join(w for k, w in words if k != _SPECIAL), self.angle())
            elif self.at("@"):
                self.mailbox("", self.addr_spec_after(words))
            else:
                raise _Unparseable("a list element is not an address")
            if len(self.out) > MAX_ADDRESSES:
                raise _Unparseable(f"more than {MAX_ADDRESSES} addresses")
            tok = self.peek()
            if tok is None:
                break
            if self.at(","):
                self.i += 1
            elif not (in_group and self.at(";")):
                raise _Unparseable("text after an address")
        if in_group:
            raise _Unparseable("group without ';'")
        return self.out

    def mailbox(self, display: str, spec: tuple[str, str]) -> None:
        self.out.append(Mailbox(display, spec[0], spec[1]))

    def phrase(self) -> list[Token]:
        """Words (and obs-phrase dots) up to a special that ends them."""
        words: list[Token] = []
        while (tok := self.peek()) is not None:
            if tok[0] in (_ATOM, _QUOTED) or tok == (_SPECIAL, "."):
                words.append(tok)
                self.i += 1
            else:
                break
        return words

    def angle(self) -> tuple[str, str]:
        """angle-addr / obs-angle-addr: '<' [obs-route] addr-spec '>'."""
        self.expect("<")
        if self.at("@") or self.at(","):
            # obs-route = obs-domain-list ":" (§4.4): routes are ignored
            while not self.at(":"):
                if self.peek() is None or self.at(">"):
                    raise _Unparseable("malformed route")
                self.i += 1
            self.i += 1
        if self.at(">"):
            raise _Unparseable("empty angle address")
        spec = self.addr_spec_after(self.phrase())
        self.expect(">")
        return spec

    def addr_spec_after(self, local_tokens: list[Token]) -> tuple[str, str]:
        """local-part (already read as words and dots) '@' domain."""
        local = _dotted(local_tokens, quoted_ok=True)
        if not local:
            raise _Unparseable("address without a local part")
        self.expect("@")
        tok = self.peek()
        if tok is not None and tok[0] == _LITERAL:
            self.i += 1
            domain = tok[1]
        else:
            parts: list[Token] = []
            while (tok := self.peek()) is not None and (
                    tok[0] == _ATOM or tok == (_SPECIAL, ".")):
                parts.append(tok)
                self.i += 1
            domain = _dotted(parts, quoted_ok=False)
            if not domain:
                raise _Unparseable("address without a domain")
        if len(local) > MAX_LOCAL or len(domain) > MAX_DOMAIN:
            raise _Unparseable("address too long")
        return local, domain


def _dotted(tokens: list[Token], quoted_ok: bool) -> str:
    """word *("." word), the words re-joined with dots; "" when the shape is wrong."""
    if not tokens or len(tokens) % 2 == 0:
        return ""
    parts: list[str] = []
    for k, (kind, value) in enumerate(tokens):
        if k % 2:
            if (kind, value) != (_SPECIAL, "."):
                return ""
            continue
        if kind == _ATOM:
            parts.append(value)
        elif kind == _QUOTED and quoted_ok:
            parts.append('"' + re.sub(r'(["\\])', r"\\\1", value) + '"')
        else:
            return ""
    return ".".join(parts)


# The two shapes nearly every From field has, ASCII only: `local@domain` and
# `Display Name <local@domain>` with atoms for words and dot-atoms for the address.
# Read by one regular expression each (the general reader was a twentieth of
# dmarc's work per message); anything else, even a trailing comment, goes to the
# reader. The patterns cannot backtrack badly: words are separated by mandatory
# white space, and a dot-atom's parts by mandatory dots.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_FWS = r"[ \t\r\n]*"
_BARE = re.compile(rf"{_FWS}({_DOT_ATOM})@({_DOT_ATOM}){_FWS}")
_NAMED = re.compile(
    rf"{_FWS}((?:{_ATEXT}(?:[ \t\r\n]+{_ATEXT})*)?){_FWS}<({_DOT_ATOM})@({_DOT_ATOM})>{_FWS}")


def _simple(text: str) -> AddressList | None:
    """The field read by the fast path, or None for the general reader."""
    if (m := _BARE.fullmatch(text)) is not None:
        display, local, domain = "", m[1], m[2]
    elif (m := _NAMED.fullmatch(text)) is not None:
        display, local, domain = " ".join(m[1].split()), m[2], m[3]
    else:
        return None
    if len(local) > MAX_LOCAL or len(domain) > MAX_DOMAIN:
        return None  # the reader says why
    return AddressList((Mailbox(display, local, domain),))


def _read(text: str) -> AddressList:
    """The general reader (raises _Unparseable); the fast path must agree with it."""
    return AddressList(tuple(_Parser(_tokens(text)).parse()))


def parse_address_list(text: str) -> AddressList:
    """The mailboxes of an RFC 5322 address-list (or mailbox-list) field body.

    Never raises: a field that is over a bound or breaks the grammar gives an
    AddressList whose `error` says why.
    """
    if len(text) <= 998 and (simple := _simple(text)) is not None:  # one line's worth
        return simple
    if len(text) > MAX_CHARS:
        return AddressList(error=f"field longer than {MAX_CHARS} characters")
    try:
        return _read(text)
    except _Unparseable as exc:
        return AddressList(error=str(exc))
    except RecursionError:  # pragma: no cover - nothing here recurses; belt and braces
        return AddressList(error="too deeply nested")


# What looks like the domain of an address anywhere in a text: for fields the
# grammar refuses, so that a domain a reader's program may still show is not lost.
_DOMAIN_AFTER_AT = re.compile(r"@[ \t]*([A-Za-z0-9](?:[A-Za-z0-9-]{0,62}\.){1,126}"
                              r"[A-Za-z0-9-]{1,63})")


def salvage_domains(text: str, limit: int) -> tuple[str, ...]:
    """The distinct `@domain` names found anywhere in `text` (first `limit`), lower-case.

    Not a parse: a field that parse_address_list refused may still show an
    address to the reader (RFC 9989 §11.5, Denial of DMARC Processing Attacks), so
    its candidate domains can be evaluated and the strictest failing policy applied.
    """
    seen: dict[str, None] = {}
    for m in _DOMAIN_AFTER_AT.finditer(text[:MAX_CHARS]):
        seen.setdefault(m.group(1).lower(), None)
        if len(seen) >= limit:
            break
    return tuple(seen)
