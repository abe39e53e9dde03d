"""Postfix table regular expressions (POSIX regexp:, PCRE pcre:) translated to Python `re`.

Postfix hands `regexp:` patterns to the C library's regcomp(3) (POSIX extended
syntax, or basic syntax when the `x` flag turns extended off) and `pcre:` patterns
to PCRE. Python's `re` is close to PCRE and far from POSIX in small but nasty ways
(a backslash is literal inside a POSIX bracket, `\\d` is the letter d, `$` does not
match before a final newline). Each translator walks the pattern once and either
emits a Python pattern that accepts the same strings, or raises PatternError naming
the construct: a pattern is never silently read differently (regexp_table(5),
pcre_table(5), regex(7), pcre2pattern(3)).

regexp: tables match with glibc itself (posix.py); their translation here only
gives the literals a match must contain (needles, prefixes) to rule lines out
before glibc is called. POSIX matching is leftmost-longest and Python's
leftmost-first, which changes what a group captures, never whether a pattern
matches: the literals hold for both. A pattern the translator refuses (`\\d`) is
simply matched by glibc without those tests.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

# POSIX character classes (regex(7)) as Python class contents, C locale.
POSIX_CLASSES: Mapping[str, str] = MappingProxyType({
    "alpha": "a-zA-Z",
    "digit": "0-9",
    "alnum": "a-zA-Z0-9",
    "upper": "A-Z",
    "lower": "a-z",
    "space": r" \t\n\r\f\v",
    "blank": r" \t",
    "punct": re.escape("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),
    "print": r"\x20-\x7e",
    "graph": r"\x21-\x7e",
    "cntrl": r"\x00-\x1f\x7f",
    "xdigit": "0-9A-Fa-f",
    "word": "a-zA-Z0-9_",  # PCRE extension
    "ascii": r"\x00-\x7f",  # PCRE extension
})
# Negated POSIX classes PCRE allows inside brackets ([[:^digit:]]) that Python can say.
NEGATED_POSIX: Mapping[str, str] = MappingProxyType({"digit": r"\D", "space": r"\S", "word": r"\W"})

# PCRE's \h and \v (pcre2pattern(3) "Generic character types"), 8-bit mode.
PCRE_HSPACE = r"\t \xa0"
PCRE_VSPACE = r"\n\x0b\f\r\x85"

_INTERVAL = re.compile(r"\{(\d*)(,(\d*))?\}")


class PatternError(ValueError):
    """a pattern Python cannot express the way Postfix reads it"""


@dataclass(frozen=True)
class Translated:
    """A Python pattern and whether it must be anchored (PCRE `A` flag)."""

    pattern: str
    anchored: bool = False


def _char(c: str) -> str:
    """One literal character, safe anywhere in a Python pattern (inside a set too)."""
    if c.isalnum() and c.isascii():
        return c
    o = ord(c)
    if 0x20 < o < 0x7F:
        return "\\" + c
    if o <= 0xFF:
        return f"\\x{o:02x}"
    if o <= 0xFFFF:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


class _Reader:
    """A cursor over the pattern text with the few look-ahead helpers both dialects need."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.text)

    def peek(self, n: int = 0) -> str:
        i = self.pos + n
        return self.text[i] if i < len(self.text) else ""

    def take(self) -> str:
        c = self.text[self.pos]
        self.pos += 1
        return c

    def startswith(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)


# --- POSIX (regexp: tables) ------------------------------------------------------

# \B, "not a word boundary": Python's \B (re and regex alike, before 3.14) never
# matches an empty subject, where glibc and PCRE do (an empty body line).
NOT_BOUNDARY = r"(?:\B|\A\Z)"

# GNU regcomp escapes outside brackets (glibc regcomp.c peek_token); any other
# letter after a backslash is that letter, which nobody means: refuse it.
_POSIX_ESCAPES = MappingProxyType({
    "w": r"\w", "W": r"\W", "s": r"\s", "S": r"\S", "b": r"\b", "B": NOT_BOUNDARY,
    "<": r"\b(?=\w)", ">": r"\b(?<=\w)", "`": r"\A", "'": r"\Z"})


def translate_posix(pattern: str, *, extended: bool = True, newline: bool = False) -> Translated:
    """A regcomp(3) pattern as Python. `newline` is REG_NEWLINE (the table's `m` flag).

    Without REG_NEWLINE `.` and `[^x]` match a newline and `$` matches only at the
    very end; the caller compiles with DOTALL in that case, and we turn `$` into `\\Z`.
    """
    r = _Reader(pattern)
    out: list[str] = []
    # Where a quantifier may not follow (start, after `(` or `|`), and whether the
    # last token was itself a quantifier (a** is ambiguous between dialects).
    can_repeat = False
    last_quant = False
    while r.more():
        c = r.take()
        quant = False
        if c == "\\":
            if not r.more():
                raise PatternError("trailing backslash")
            e = r.take()
            if not extended and e in "(){}|+?":
                # Basic syntax: \( \) \{ \} are the operators, \| \+ \? GNU extensions.
                if e == "(":
                    out.append("(")
                    can_repeat = False
                elif e == ")":
                    out.append(")")
                    can_repeat = True
                elif e == "{":
                    out.append(_posix_interval(r, basic=True))
                    quant = True
                elif e == "}":
                    raise PatternError("unmatched \\}")
                elif e == "|":
                    out.append("|")
                    can_repeat = False
                else:
                    out.append(e)
                    quant = True
            elif e in _POSIX_ESCAPES:
                out.append(_POSIX_ESCAPES[e])
                can_repeat = e in "wWsS"
            elif e.isdigit() and e != "0":
                out.append(f"(?:\\{e})")
                can_repeat = True
            elif e.isalnum():
                raise PatternError(
                    f"\\{e} means the letter {e!r} in a POSIX regexp: table, not what it "
                    "means in PCRE or Python; write the character or class you mean "
                    "(e.g. [0-9] for \\d) or use a pcre: table"
                )
            else:
                out.append(_char(e))
                can_repeat = True
        elif c == "[":
            out.append(_posix_bracket(r, newline))
            can_repeat = True
        elif extended and c in "*+?":
            if not can_repeat:
                raise PatternError(f"{c!r} with nothing to repeat")
            out.append(c)
            quant = True
        elif extended and c == "{":
            if not can_repeat:
                raise PatternError("'{' with nothing to repeat")
            out.append(_posix_interval(r, basic=False))
            quant = True
        elif not extended and c == "*":
            if can_repeat:
                out.append("*")
                quant = True
            else:  # BRE: a leading * is literal
                out.append(r"\*")
                can_repeat = True
        elif extended and c == "(":
            if r.peek() == "?":
                raise PatternError(
                    "'(?' is not POSIX syntax (a Python/PCRE extension); use a pcre: table"
                )
            out.append("(")
            can_repeat = False
        elif extended and c == ")":
            out.append(")")
            can_repeat = True
        elif extended and c == "|":
            out.append("|")
            can_repeat = False
        elif c == "^":
            if extended or _anchor_position(out):
                out.append("^")
                can_repeat = False
            else:
                out.append(r"\^")
                can_repeat = True
        elif c == "$":
            at_end = extended or not r.more() or r.startswith("\\)") or r.startswith("\\|")
            if at_end:
                out.append("$" if newline else r"\Z")
                can_repeat = False
            else:
                out.append(r"\$")
                can_repeat = True
        elif c == ".":
            out.append(".")
            can_repeat = True
        else:
            out.append(_char(c))
            can_repeat = True
        if quant:
            if last_quant:
                raise PatternError(
                    "two repetition operators in a row are read differently by POSIX and "
                    "Python; group the first one: (a*)?"
                )
            can_repeat = True
        last_quant = quant
    return Translated("".join(out))


def _anchor_position(out: list[str]) -> bool:
    """In basic syntax `^` is an anchor only at the start or after \\( or \\|."""
    return not out or out[-1] in ("(", "|")


def _posix_interval(r: _Reader, *, basic: bool) -> str:
    close = "\\}" if basic else "}"
    end = r.text.find(close, r.pos)
    if end < 0:
        raise PatternError("unterminated interval {")
    body = r.text[r.pos:end]
    r.pos = end + len(close)
    m = re.fullmatch(r"(\d*)(,(\d*))?", body)
    if not m or (not m.group(1) and not m.group(2)):
        raise PatternError(f"bad interval {{{body}}}")
    low = m.group(1) or "0"
    if m.group(2) is None:
        return f"{{{low}}}"
    high = m.group(3) or ""
    if high and int(high) < int(low):
        raise PatternError(f"bad interval {{{body}}}")
    return f"{{{low},{high}}}"


def _posix_bracket(r: _Reader, newline: bool) -> str:
    """A POSIX bracket expression: backslash is literal, `]` first is literal."""
    negate = False
    if r.peek() == "^":
        negate = True
        r.take()
    items: list[str] = []
    first = True
    while True:
        if not r.more():
            raise PatternError("unterminated [ bracket expression")
        c = r.take()
        if c == "]" and not first:
            break
        first = False
        if c == "[" and r.peek() in ":=.":
            kind = r.take()
            end = r.text.find(kind + "]", r.pos)
            if end < 0:
                raise PatternError(f"unterminated [{kind} in bracket expression")
            name = r.text[r.pos:end]
            r.pos = end + 2
            if kind == ":":
                if name not in POSIX_CLASSES or name in ("word", "ascii"):
                    raise PatternError(f"unknown character class [:{name}:]")
                items.append(POSIX_CLASSES[name])
            elif len(name) == 1:  # [=a=] or [.a.]: one character in the C locale
                items.append(_char(name))
            else:
                raise PatternError(f"collating element [{kind}{name}{kind}] not supported")
            continue
        # A range a-z (the '-' is literal first or last).
        if r.peek() == "-" and r.peek(1) not in ("]", ""):
            r.take()
            hi = r.take()
            if hi == "[" and r.peek() in ".=":
                raise PatternError("collating element as range end not supported")
            if ord(hi) < ord(c):
                raise PatternError(f"invalid range {c}-{hi}")
            items.append(f"{_char(c)}-{_char(hi)}")
            continue
        items.append(_char(c))
    if negate and newline:
        items.append(r"\n")  # REG_NEWLINE: a non-matching list never matches newline
    return "[" + ("^" if negate else "") + "".join(items) + "]"


# --- PCRE (pcre: tables) ---------------------------------------------------------

_PCRE_UNSUPPORTED = MappingProxyType({
    "p": "Unicode property \\p", "P": "Unicode property \\P", "X": "\\X (grapheme)",
    "C": "\\C (one code unit)", "G": "\\G (start of match)", "K": "\\K (reset match start)",
    "L": "\\L", "l": "\\l", "U": "\\U", "u": "\\u",
})
_PCRE_SIMPLE = frozenset({"d", "D", "w", "W", "s", "S", "b", "B", "A", "n", "r", "t", "f", "a"})


def translate_pcre(
    pattern: str,
    *,
    extended: bool = False,
    ungreedy: bool = False,
    dollar_endonly: bool = False,
    multiline: bool = False,
    extra: bool = False,
) -> str:
    """A PCRE pattern as Python. The flag arguments are PCRE's x, U, E, m and X."""
    r = _Reader(pattern)
    out: list[str] = []
    groups = 0
    # PCRE scopes an option setting such as (?-i) to the rest of its group, branches
    # after a `|` included; Python takes global flags only at the very start. So a
    # setting elsewhere opens a scoped group, (?-i:, closed at each `|` of the same
    # group (and opened again after it) and at the group's end. One frame per open
    # group: the settings made in it so far.
    frames: list[list[str]] = [[]]
    while r.more():
        c = r.take()
        if extended and c == "#":
            end = r.text.find("\n", r.pos)
            r.pos = len(r.text) if end < 0 else end
            continue
        if extended and c in " \t\n\r\f\v":
            continue
        if c == "\\":
            out.append(_pcre_escape(r, extra, groups))
            continue
        if c == "[":
            out.append(_pcre_class(r, extra))
            continue
        if c == "(":
            text, capturing = _pcre_group(r)
            groups += capturing
            if text == "(?x)":
                # We drop extended-mode whitespace and comments ourselves, so Python
                # never needs VERBOSE (whitespace we escaped stays literal).
                extended = True
                continue
            if text.endswith(")") and text.startswith("(?") and len(text) > 3:
                # An option setting, (?i) or (?s-m): global only at the very start.
                if not out and len(frames) == 1:
                    out.append(text)
                else:
                    opener = text[:-1] + ":"
                    frames[-1].append(opener)
                    out.append(opener)
                continue
            out.append(text)
            if text:
                frames.append([])
            continue
        if c == "|":
            settings = frames[-1]
            out.append(")" * len(settings) + "|" + "".join(settings))
            continue
        if c == ")":
            if len(frames) > 1:
                out.append(")" * len(frames.pop()))
            out.append(")")
            continue
        if c in "*+?":
            out.append(c + _quant_suffix(r, ungreedy))
            continue
        if c == "{":
            m = _INTERVAL.match(r.text, r.pos - 1)
            if m and m.group(1):
                r.pos = m.end()
                out.append(m.group(0) + _quant_suffix(r, ungreedy))
            else:  # PCRE2 10.42 (Debian 12) reads {,n} and other stray braces literally
                out.append(r"\{")
            continue
        if c == "$":
            out.append(r"\Z" if dollar_endonly and not multiline else "$")
            continue
        if c in ".^":
            out.append(c)
            continue
        out.append(_char(c))
    out.append(")" * len(frames[0]))
    return "".join(out)


def _quant_suffix(r: _Reader, ungreedy: bool) -> str:
    """PCRE_UNGREEDY swaps the meaning of a following '?'; '+' (possessive) stays."""
    nxt = r.peek()
    if nxt == "+":
        r.take()
        return "+"
    if nxt == "?":
        r.take()
        return "" if ungreedy else "?"
    return "?" if ungreedy else ""


def _pcre_group(r: _Reader) -> tuple[str, int]:
    """The opening of a group; returns its Python text and 1 if it captures."""
    if r.peek() == "*":
        raise PatternError("PCRE verbs such as (*UTF) are not supported")
    if r.peek() != "?":
        return "(", 1
    r.take()
    n = r.peek()
    if n == "#":
        end = r.text.find(")", r.pos)
        if end < 0:
            raise PatternError("unterminated (?# comment")
        r.pos = end + 1
        return "", 0
    if n in ":=!>":
        r.take()
        return "(?" + n, 0
    if n == "<" and r.peek(1) in "=!":
        r.take()
        return "(?<" + r.take(), 0
    if n in "<'" or (n == "P" and r.peek(1) == "<"):
        if n == "P":
            r.take()
        opener = r.take()
        close = ">" if opener == "<" else "'"
        end = r.text.find(close, r.pos)
        if end < 0:
            raise PatternError("unterminated group name")
        name = r.text[r.pos:end]
        r.pos = end + 1
        return f"(?P<{name}>", 1
    if n == "P" and r.peek(1) == "=":
        return "(?P", 0
    if n == "(":
        m = re.compile(r"\((\d+|[A-Za-z_]\w*)\)").match(r.text, r.pos)
        if not m:
            raise PatternError("this PCRE condition (?(...) is not supported")
        r.pos = m.end()
        return f"(?({m.group(1)})", 0
    if n in "|":
        raise PatternError("branch reset groups (?| are not supported")
    recursion = n in "R&+0123456789" or (n == "-" and r.peek(1).isdigit())
    if recursion or (n == "P" and r.peek(1) == ">"):
        raise PatternError("recursion and subroutine calls are not supported")
    if n == "C":
        raise PatternError("callouts (?C are not supported")
    m = re.compile(r"([a-zA-Z]*)(-([a-zA-Z]*))?([:)])").match(r.text, r.pos)
    if not m:
        raise PatternError(f"unknown group syntax (?{n}")
    letters = (m.group(1) or "") + (m.group(3) or "")
    bad = set(letters) - set("imsx")
    if bad:
        raise PatternError(f"inline option {''.join(sorted(bad))} not supported")
    if "x" in letters and m.group(0) != "x)":
        raise PatternError("the x option is supported only as (?x) or the table flag")
    r.pos = m.end()
    if m.group(0) == "x)":
        return "(?x)", 0
    return "(?" + m.group(0), 0


def _pcre_escape(r: _Reader, extra: bool, groups: int) -> str:
    if not r.more():
        raise PatternError("trailing backslash")
    e = r.take()
    if e == "Q":
        end = r.text.find("\\E", r.pos)
        literal = r.text[r.pos:] if end < 0 else r.text[r.pos:end]
        r.pos = len(r.text) if end < 0 else end + 2
        return "".join(_char(ch) for ch in literal)
    if e == "E":
        return ""  # a stray \E is ignored by PCRE
    if e == "B":
        return NOT_BOUNDARY
    if e in _PCRE_SIMPLE:
        return "\\" + e
    if e.isdigit():
        digits = e
        while r.peek().isdigit() and len(digits) < 3:
            digits += r.take()
        octal = all(d in "01234567" for d in digits)
        if e == "0" or (len(digits) > 1 and int(digits) > groups and octal):
            # PCRE: octal, unless a group of that number exists or it is below 10
            return _char(chr(int(digits, 8)))
        return f"(?:\\{int(digits)})"
    if e == "z":
        return r"\Z"
    if e == "Z":
        return r"(?=\n?\Z)"
    if e == "h":
        return f"[{PCRE_HSPACE}]"
    if e == "H":
        return f"[^{PCRE_HSPACE}]"
    if e == "v":
        return f"[{PCRE_VSPACE}]"
    if e == "V":
        return f"[^{PCRE_VSPACE}]"
    if e == "R":
        return f"(?:\\r\\n|[{PCRE_VSPACE}])"
    if e == "N":
        if r.peek() == "{":
            raise PatternError("\\N{...} is not supported")
        return r"[^\n]"
    if e == "e":
        return r"\x1b"
    if e in "xoc":
        return _char(_pcre_code(r, e))
    if e == "g" or e == "k":
        return _pcre_backref(r, e, groups)
    if e in _PCRE_UNSUPPORTED:
        raise PatternError(f"{_PCRE_UNSUPPORTED[e]} is not supported")
    if e.isalpha():
        if extra:
            raise PatternError(f"unknown escape \\{e} (X flag)")
        return _char(e)  # PCRE without X: an unknown letter escape is the letter
    return _char(e)


def _pcre_code(r: _Reader, e: str) -> str:
    """The character named by \\xHH, \\x{H..}, \\o{O..} or \\cX."""
    if e == "c":
        if not r.more():
            raise PatternError("\\c at end of pattern")
        return chr(ord(r.take().upper()) ^ 0x40)
    base = 16 if e == "x" else 8
    if r.peek() == "{":
        end = r.text.find("}", r.pos)
        if end < 0:
            raise PatternError(f"unterminated \\{e}{{")
        digits = r.text[r.pos + 1:end]
        r.pos = end + 1
    elif e == "o":
        raise PatternError("\\o must be followed by {")
    else:
        digits = ""
        while len(digits) < 2 and r.peek() and r.peek() in "0123456789abcdefABCDEF":
            digits += r.take()
        digits = digits or "0"
    try:
        return chr(int(digits, base))
    except ValueError:
        raise PatternError(f"bad character code \\{e}{{{digits}}}") from None


def _pcre_backref(r: _Reader, e: str, groups: int) -> str:
    m = re.compile(r"\{(-?\d+|[A-Za-z_]\w*)\}|<([A-Za-z_]\w*)>|'([A-Za-z_]\w*)'|(-?\d+)").match(
        r.text, r.pos
    )
    if not m:
        raise PatternError(f"bad back reference \\{e}")
    ref = next(g for g in m.groups() if g is not None)
    if e == "g" and m.group(2) is not None:
        raise PatternError("subroutine calls \\g<...> are not supported")
    r.pos = m.end()
    if ref.lstrip("-").isdigit():
        n = int(ref)
        if n < 0:
            n = groups + 1 + n
            if n < 1:
                raise PatternError(f"relative back reference {ref} before any group")
        return f"(?:\\{n})"
    return f"(?P={ref})"


def _pcre_class(r: _Reader, extra: bool) -> str:
    """A PCRE character class, rebuilt item by item so Python reads it the same."""
    negate = False
    if r.peek() == "^":
        negate = True
        r.take()
    items: list[str] = []
    first = True
    while True:
        if not r.more():
            raise PatternError("missing terminating ] for character class")
        c = r.take()
        if c == "]" and not first:
            break
        first = False
        if c == "[" and r.peek() == ":" and (end := r.text.find(":]", r.pos)) >= 0:
            name = r.text[r.pos + 1:end]
            r.pos = end + 2
            if name.startswith("^"):
                if name[1:] not in NEGATED_POSIX:
                    raise PatternError(f"negated class [:{name}:] inside a set not supported")
                items.append(NEGATED_POSIX[name[1:]])
            elif name in POSIX_CLASSES:
                items.append(POSIX_CLASSES[name])
            else:
                raise PatternError(f"unknown POSIX class name [:{name}:]")
            continue
        atom, single = _class_atom(r, c, extra)
        if not atom:
            continue
        if single and r.peek() == "-" and r.peek(1) not in ("]", ""):
            save = r.pos
            r.take()
            hc = r.take()
            if not (hc == "[" and r.peek() == ":"):
                hi, hi_single = _class_atom(r, hc, extra)
                if hi and hi_single:
                    items.append(f"{atom}-{hi}")
                    continue
            r.pos = save  # '-' before a class such as \d is a literal '-'
        items.append(atom)
    return "[" + ("^" if negate else "") + "".join(items) + "]"


def _class_atom(r: _Reader, c: str, extra: bool) -> tuple[str, bool]:
    """One item of a class as Python text, and whether it is a single character."""
    if c != "\\":
        return _char(c), True
    if not r.more():
        raise PatternError("trailing backslash")
    e = r.take()
    if e in "dDwWsS":
        return "\\" + e, False
    if e == "h":
        return PCRE_HSPACE, False
    if e == "v":
        return PCRE_VSPACE, False
    if e == "E":
        return "", False
    simple = {"b": "\x08", "n": "\n", "t": "\t", "r": "\r", "f": "\f", "a": "\x07", "e": "\x1b"}
    if e in simple:
        return _char(simple[e]), True
    if e in "xoc":
        return _char(_pcre_code(r, e)), True
    if e.isdigit():
        digits = e
        while r.peek() and r.peek() in "01234567" and len(digits) < 3:
            digits += r.take()
        return _char(chr(int(digits, 8))), True
    if e.isalpha() and (e in "HVNRQ" or e in _PCRE_UNSUPPORTED or extra):
        raise PatternError(f"\\{e} inside a character class is not supported")
    return _char(e), True
