"""MIME pieces the walker needs: header parameters, encoded words, charsets, decoders.

Written for hostile input: nothing here raises on malformed mail. Undecodable text
falls back to UTF-8 with surrogate escapes (the raw bytes stay matchable), an
unknown charset is reported to the caller instead of guessed, and only real text
codecs are used (Python also has `zlib_codec` and friends, which a charset label
must never reach).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import unquote_to_bytes

# Labels mail uses that Python spells differently; Shift_JIS mail is in practice
# Microsoft's superset (NEC and IBM extensions), so decode it as cp932.
CHARSET_ALIASES = MappingProxyType({
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "windows-31j": "cp932",
    "ms_kanji": "cp932",
    "iso-2022-jp": "iso2022_jp_ext",
    "iso-2022-jp-ms": "iso2022_jp_ext",
    "cp50220": "iso2022_jp_ext",
    "euc-jp": "euc_jis_2004",
    "x-euc-jp": "euc_jis_2004",
    "ks_c_5601-1987": "cp949",
    "x-unknown": "",
    "unknown-8bit": "",
})
# Text codecs that are not charsets and must not be reachable from a mail label.
_NOT_CHARSETS = frozenset({"undefined", "unicode_escape", "raw_unicode_escape", "idna", "punycode",
                 "rot_13", "mbcs", "oem", "charmap"})

_ENCODED_WORD = re.compile(rb"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")


def lookup_charset(label: str) -> str | None:
    """The Python codec for a MIME charset label, or None if we do not know it."""
    name = label.strip().strip('"').lower()
    if not name:
        return None
    name = CHARSET_ALIASES.get(name, name)
    if not name:
        return None
    try:
        info = codecs.lookup(name)
    except LookupError:
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in _NOT_CHARSETS:
        return None
    return info.name


def decode_bytes(data: bytes, codec: str | None) -> str:
    """Decode text that claims `codec`; undecodable bytes become surrogate escapes."""
    if codec is None:
        return data.decode("utf-8", "surrogateescape")
    try:
        return data.decode(codec)
    except (UnicodeDecodeError, UnicodeError):
        return data.decode(codec, "replace")


# --- RFC 2047 encoded words ------------------------------------------------------


def decode_words(raw: bytes) -> tuple[str, list[str]]:
    """A header value with RFC 2047 encoded words decoded; also the unknown charsets.

    RFC 2047 §6.2: whitespace between two adjacent encoded words is dropped. Adjacent
    words in one charset are decoded together, since senders split multibyte
    characters across words.
    """
    unknown: list[str] = []
    out: list[str] = []
    pending: list[bytes] = []
    pending_charset = ""

    def flush() -> None:
        nonlocal pending_charset
        if pending:
            codec = lookup_charset(pending_charset)
            out.append(decode_bytes(b"".join(pending), codec))
            pending.clear()
        pending_charset = ""

    pos = 0
    last_word_end = -1
    for m in _ENCODED_WORD.finditer(raw):
        between = raw[pos:m.start()]
        if not (last_word_end == pos and between.strip() == b""):
            flush()
            out.append(between.decode("utf-8", "surrogateescape"))
        charset = m.group(1).decode("ascii", "replace")
        if lookup_charset(charset) is None:
            flush()
            unknown.append(charset)
            out.append(m.group(0).decode("ascii", "replace"))
        else:
            if pending and charset.lower() != pending_charset.lower():
                flush()
            pending_charset = charset
            pending.append(_word_bytes(m.group(2), m.group(3)))
        pos = last_word_end = m.end()
    flush()
    out.append(raw[pos:].decode("utf-8", "surrogateescape"))
    return "".join(out), unknown


def _word_bytes(encoding: bytes, text: bytes) -> bytes:
    if encoding in (b"b", b"B"):
        text = re.sub(rb"[^A-Za-z0-9+/]", b"", text)
        text += b"=" * (-len(text) % 4)
        try:
            return base64.b64decode(text)
        except binascii.Error:
            return b""
    # RFC 2047 §4.2: "_" is a space in the Q encoding.
    return binascii.a2b_qp(text.replace(b"_", b" "))


# --- parameters (RFC 2045 §5.1, RFC 2231) --------------------------------------


@dataclass(frozen=True)
class ContentType:
    maintype: str = "text"
    subtype: str = "plain"
    params: dict[str, str] = field(default_factory=dict)

    @property
    def value(self) -> str:
        return f"{self.maintype}/{self.subtype}"


def split_params(value: str) -> tuple[str, list[tuple[str, str]]]:
    """`type; a=b; c="d;e"` -> ("type", [("a", "b"), ("c", "d;e")]); never raises."""
    parts: list[str] = []
    buf: list[str] = []
    quoted = False
    depth = 0
    i = 0
    while i < len(value):
        c = value[i]
        if quoted:
            if c == "\\" and i + 1 < len(value):
                buf.append(value[i + 1])
                i += 2
                continue
            if c == '"':
                quoted = False
            else:
                buf.append(c)
        elif depth:
            depth += {"(": 1, ")": -1}.get(c, 0)
        elif c == '"':
            quoted = True
        elif c == "(":
            depth = 1
        elif c == ";":
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(c)
        i += 1
    parts.append("".join(buf))
    head = parts[0].strip()
    params = []
    for p in parts[1:]:
        name, eq, val = p.partition("=")
        if eq:
            params.append((name.strip().lower(), val.strip()))
    return head, params


def collapse_params(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Join RFC 2231 continuations (`name*0*=`, `name*1=`) and decode `charset''%XX`."""
    plain: dict[str, str] = {}
    sections: dict[str, list[tuple[int, bool, str]]] = {}
    for name, val in pairs:
        # A section number of more than 4 digits is no real continuation (and int()
        # refuses over 4300 digits): such a name is kept as a plain parameter.
        m = re.fullmatch(r"([^*]+)\*(?:(\d{1,4})(\*)?)?", name)
        if not m:
            plain.setdefault(name, val)
            continue
        base, index, star = m.group(1), m.group(2), m.group(3)
        if index is None:
            sections.setdefault(base, []).append((0, True, val))
        else:
            sections.setdefault(base, []).append((int(index), bool(star), val))
    for base, secs in sections.items():
        secs.sort(key=lambda s: s[0])
        charset = ""
        data = bytearray()
        for n, (_, encoded, val) in enumerate(secs):
            if encoded:
                if n == 0 and val.count("'") >= 2:
                    charset, _language, val = val.split("'", 2)
                data += unquote_to_bytes(val)
            else:
                data += val.encode("utf-8", "surrogateescape")
        plain[base] = decode_bytes(bytes(data), lookup_charset(charset) if charset else None)
    return plain


def parse_content_type(value: str | None) -> ContentType | None:
    """None when absent or unusable (the caller applies the RFC 2045 default)."""
    if value is None:
        return None
    head, pairs = split_params(value)
    maintype, slash, subtype = head.partition("/")
    if not slash or not maintype.strip() or not subtype.strip():
        return None
    return ContentType(maintype.strip().lower(), subtype.strip().lower(), collapse_params(pairs))


def filename_of(disposition: str | None, ctype: ContentType | None) -> str | None:
    """The attachment's file name: Content-Disposition filename, else Content-Type name.

    Both may use RFC 2231 and, against the rules but common, RFC 2047 encoded words.
    """
    name = None
    if disposition is not None:
        name = collapse_params(split_params(disposition)[1]).get("filename")
    if name is None and ctype is not None:
        name = ctype.params.get("name")
    if name is None:
        return None
    if "=?" in name:
        name = decode_words(name.encode("utf-8", "surrogateescape"))[0]
    return name


# --- body text decoding ----------------------------------------------------------


class TextDecoder:
    """Content-Transfer-Encoding then charset, fed raw lines, giving decoded lines.

    Streaming: base64 is decoded in whole 4-character groups, quoted-printable soft
    line breaks (RFC 2045 §6.7 rule 5) are joined, the charset decoder is
    incremental (ISO-2022-JP keeps shift state across lines). Linear in the input:
    pending pieces are kept in lists and joined once. With `keep`, a decoded line
    keeps only its first `keep` + LINE_PIECE characters (the walker matches no
    more than body_checks_size_limit of a part), so memory stays bounded.
    """

    # Soft-broken quoted-printable lines are joined up to this size, then decoded
    # early; an =XX escape never spans a soft line break (RFC 2045 §6.7), so the
    # result is the same.
    QP_JOIN = 65536

    def __init__(self, cte: str, codec: str | None, keep: int | None = None) -> None:
        self.cte = cte
        self.codec = codec
        self.keep = None if keep is None else keep + 2048
        name = codec or "utf-8"
        errors = "surrogateescape" if codec in (None, "utf-8", "ascii") else "replace"
        if name == "ascii":
            name = "utf-8"
        self._decoder = codecs.getincrementaldecoder(name)(errors)
        self._b64 = b""
        self._qp: list[bytes] = []
        self._qp_size = 0
        self._text: list[str] = []  # the decoded line still open
        self._text_size = 0
        self.ended_with_newline = True

    @property
    def full(self) -> bool:
        """The open line holds `keep` characters: nothing fed from now on can be seen."""
        return self.keep is not None and self._text_size >= self.keep

    def feed(self, raw_line: bytes) -> list[str]:
        return self._lines(self._transfer(raw_line), final=False)

    def finish(self) -> list[str]:
        """The last lines; afterwards `ended_with_newline` tells how the text ended."""
        data = b""
        if self.cte == "base64" and self._b64:
            data = _b64(self._b64 + b"=" * (-len(self._b64) % 4))
        elif self.cte == "quoted-printable" and self._qp:
            data = binascii.a2b_qp(b"".join(self._qp))
            self._qp, self._qp_size = [], 0
        lines = self._lines(data, final=True)
        self.ended_with_newline = not self._text
        if self._text:
            lines.append("".join(self._text))
            self._text, self._text_size = [], 0
        return lines

    def _transfer(self, raw_line: bytes) -> bytes:
        if self.cte == "base64":
            # The residue kept between lines is under 4 bytes: += stays linear.
            self._b64 += re.sub(rb"[^A-Za-z0-9+/]", b"", raw_line)
            cut = len(self._b64) - len(self._b64) % 4
            chunk, self._b64 = self._b64[:cut], self._b64[cut:]
            return _b64(chunk)
        if self.cte == "quoted-printable":
            line = raw_line.rstrip(b"\r\n").rstrip(b" \t")
            if line.endswith(b"="):
                self._qp.append(line[:-1])
                self._qp_size += len(line) - 1
                if self._qp_size < self.QP_JOIN:
                    return b""
                data = binascii.a2b_qp(b"".join(self._qp))
                self._qp, self._qp_size = [], 0
                return data
            self._qp.append(line)
            data = binascii.a2b_qp(b"".join(self._qp)) + b"\n"
            self._qp, self._qp_size = [], 0
            return data
        return raw_line.replace(b"\r\n", b"\n")

    def _lines(self, data: bytes, final: bool) -> list[str]:
        try:
            text = self._decoder.decode(data, final)
        except UnicodeError:  # a codec that fails even with errors="replace"
            text = data.decode("utf-8", "surrogateescape")
        if "\n" not in text:
            self._hold(text)
            return []
        first, *lines, rest = text.split("\n")
        self._hold(first)
        lines.insert(0, "".join(self._text))
        self._text, self._text_size = [], 0
        self._hold(rest)
        return [line[:-1] if line.endswith("\r") else line for line in lines]

    def _hold(self, text: str) -> None:
        """Add to the open line, past `keep` characters only its length matters."""
        if not text:
            return
        if self.keep is not None:
            room = self.keep - self._text_size
            if room <= 0:
                return
            text = text[:room]
        self._text.append(text)
        self._text_size += len(text)


def _b64(data: bytes) -> bytes:
    try:
        return base64.b64decode(data)
    except binascii.Error:
        return b""
