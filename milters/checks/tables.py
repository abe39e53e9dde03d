"""Postfix `regexp:` and `pcre:` table files, parsed and compiled once at load.

File format (regexp_table(5), pcre_table(5)): a logical line starts with non-space
text and continues on lines that start with whitespace; blank lines and lines whose
first non-space character is `#` are skipped (they do not end a logical line, as in
Postfix's readlline()). A rule is `[!]/pattern/flags result`, any delimiter
character allowed; `if [!]/pattern/flags` ... `endif` nests. Every problem Postfix
would only warn about (and then skip the rule) is a ConfigError naming file:line.

A key such as `header_checks` lists several tables; as Postfix's maps_find() does,
the first table with a matching rule answers for a line and later tables are not
consulted (so DUNNO/OK in an early table shields the line from later ones).

Text: with `decode = false` patterns and subjects are both read byte for byte
(Latin-1 code points standing for bytes, ASCII-only case folding and `\\w`), which is
exactly how Postfix matches. With decoding on, the table file is read as UTF-8 and
subjects are Unicode text, so a rule written in Japanese matches decoded mail.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from milters.checks import shadow
from milters.checks.actions import ActionError, Kind, RuleAction, parse_action
from milters.checks.patterns import PatternError, translate_pcre, translate_posix
from milters.checks.screen import Screener, screen_regex
from milters.core.errors import ConfigError

TABLE_TYPES = ("regexp", "pcre")
REGEXP_FLAGS = "imx"
PCRE_FLAGS = "imsxAEUX"


class TextMode(enum.Enum):
    """How bytes become the strings rules see (see the module docstring)."""

    BYTES = "bytes"  # decode = false: byte-exact, like Postfix
    TEXT = "text"  # decode = true: Unicode text

    def subject(self, raw: bytes) -> str:
        if self is TextMode.BYTES:
            return raw.decode("latin-1")
        return raw.decode("utf-8", "surrogateescape")

    def from_str(self, text: str) -> str:
        """A str from outside (hostname, address, decoded text) in this mode's space."""
        if self is TextMode.BYTES:
            return text.encode("utf-8", "surrogateescape").decode("latin-1")
        return text

    def to_str(self, text: str) -> str:
        """A matched or expanded string back to ordinary text for edits and logs."""
        if self is TextMode.BYTES:
            return text.encode("latin-1").decode("utf-8", "surrogateescape")
        return text

    def to_bytes(self, text: str) -> bytes:
        if self is TextMode.BYTES:
            return text.encode("latin-1")
        return text.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Pattern:
    """A compiled table pattern, negated or not, anchored (PCRE `A`) or not."""

    regex: re.Pattern[str]
    negated: bool = False
    anchored: bool = False
    # The bound search (or match, for PCRE's A flag): one lookup per line per rule.
    match: Callable[[str], re.Match[str] | None] = field(init=False, repr=False, compare=False)
    # The same pattern with ^ and $ at every line: one search over all the lines
    # of a message tells whether it can match any of them (see screen.py).
    screen: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "match", self.regex.match if self.anchored else self.regex.search)
        object.__setattr__(self, "screen", screen_regex(self.regex, self.negated, self.anchored))


@dataclass(frozen=True)
class Rule:
    pattern: Pattern
    action: RuleAction
    source: str  # "file:line" for logs and errors
    shadow: bool = False  # `# milters: shadow`: logged and counted only (shadow.py)


@dataclass(frozen=True)
class IfBlock:
    pattern: Pattern
    body: tuple[Rule | IfBlock, ...]
    source: str


@dataclass(frozen=True)
class Hit:
    """A rule that matched a subject, with its action text expanded."""

    rule: Rule
    text: str

    @property
    def kind(self) -> Kind:
        return self.rule.action.kind


@dataclass(frozen=True)
class Table:
    spec: str
    rules: tuple[Rule | IfBlock, ...]

    def lookup(self, subject: str) -> Hit | None:
        return _lookup(self.rules, subject)

    def all_patterns(self) -> Iterator[Pattern]:
        stack: list[Rule | IfBlock] = list(reversed(self.rules))
        while stack:
            item = stack.pop()
            yield item.pattern
            if isinstance(item, IfBlock):
                stack.extend(reversed(item.body))

    def all_rules(self) -> Iterator[Rule]:
        stack = list(reversed(self.rules))
        while stack:
            item = stack.pop()
            if isinstance(item, Rule):
                yield item
            else:
                stack.extend(reversed(item.body))


# Ids of the patterns that may match some subject of this message; None: all may.
Possible = frozenset[int] | None


def _lookup(items: Sequence[Rule | IfBlock], subject: str) -> Hit | None:
    for item in items:
        m = item.pattern.match(subject)
        if (m is not None) == item.pattern.negated:
            continue
        if isinstance(item, IfBlock):
            hit = _lookup(item.body, subject)
            if hit is not None:
                return hit
            continue
        if item.shadow:  # watched only: noted, and lookup goes on (checks/shadow.py)
            shadow.saw(item, item.action.text.expand(m.group if m else lambda _: ""), subject)
            continue
        if m is None:  # negated rule: no groups to substitute
            return Hit(item, item.action.text.expand(lambda _: ""))
        return Hit(item, item.action.text.expand(m.group))
    return None


@dataclass(frozen=True)
class Maps:
    """The tables of one key, searched in order; the first table that matches answers."""

    key: str
    tables: tuple[Table, ...] = ()
    screener: Screener = field(init=False, repr=False, compare=False)
    _screened_ids: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        screened = [p for t in self.tables for p in t.all_patterns() if p.screen is not None]
        object.__setattr__(self, "screener", Screener(p.screen for p in screened if p.screen))
        object.__setattr__(self, "_screened_ids", tuple(id(p) for p in screened))

    def __bool__(self) -> bool:
        return bool(self.tables)

    def lookup(self, subject: str) -> Hit | None:
        return _first_hit((t.rules for t in self.tables), subject)

    def screen(self, subjects: Sequence[str]) -> Possible:
        """Ids of the patterns that can match one of `subjects` (see screen.py)."""
        found = self.screener.possible(subjects)
        if found is None:
            return None
        return frozenset(self._screened_ids[i] for i in found)

    def for_message(self, subjects: Sequence[str]) -> Pruned:
        """These tables without the rules that cannot match any of `subjects`."""
        possible = self.screen(subjects)
        if possible is None:
            return Pruned(tuple(t.rules for t in self.tables))
        return Pruned(tuple(_prune(t.rules, possible) for t in self.tables))

    def kinds(self) -> set[Kind]:
        return {r.action.kind for t in self.tables for r in t.all_rules()}


@dataclass(frozen=True)
class Pruned:
    """The rules of one key that can match some line of one message, in order."""

    tables: tuple[tuple[Rule | IfBlock, ...], ...]

    def lookup(self, subject: str) -> Hit | None:
        return _first_hit(self.tables, subject)


def _first_hit(tables: Iterable[Sequence[Rule | IfBlock]], subject: str) -> Hit | None:
    """As Postfix's maps_find(): the first table with a matching rule answers."""
    for rules in tables:
        hit = _lookup(rules, subject)
        if hit is not None:
            return hit
    return None


def _prune(items: Sequence[Rule | IfBlock], possible: frozenset[int]) -> tuple[Rule | IfBlock, ...]:
    kept: list[Rule | IfBlock] = []
    for item in items:
        if item.pattern.screen is not None and id(item.pattern) not in possible:
            continue  # matches no line of this message (an IF block: none of its body runs)
        if isinstance(item, IfBlock):
            item = IfBlock(item.pattern, _prune(item.body, possible), item.source)
        kept.append(item)
    return tuple(kept)


# --- loading -------------------------------------------------------------------


def load_maps(
    key: str, specs: Sequence[str], mode: TextMode, forbidden: frozenset[Kind] = frozenset()
) -> Maps:
    """Load and compile the tables named by `specs` (e.g. `pcre:/etc/postfix/x`)."""
    tables = []
    problems: list[str] = []
    for spec in specs:
        kind, sep, path = spec.partition(":")
        if not sep or kind not in TABLE_TYPES:
            problems.append(
                f"{key}: {spec!r} is not a regexp: or pcre: table "
                "(hash:, cdb: and other lookup tables are not supported here)"
            )
            continue
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            problems.append(f"{key}: table file {path} does not exist")
            continue
        except OSError as exc:
            problems.append(f"{key}: cannot read table file {path}: {exc.strerror}")
            continue
        try:
            tables.append(parse_table(data, spec, path, kind, mode, forbidden, key))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems=problems)
    return Maps(key, tuple(tables))


def logical_lines(text: str, path: str) -> Iterator[tuple[int, str]]:
    """(first line number, logical line) pairs, as Postfix's readlline() joins them."""
    current: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if not current:
                raise ConfigError(f"{path}:{number}: continuation line with nothing to continue")
            current.append(line)
            continue
        if current:
            yield start, "".join(current)
        current = [line.rstrip("\r")]
        start = number
    if current:
        yield start, "".join(current)


def parse_table(
    data: bytes,
    spec: str,
    path: str,
    kind: str,
    mode: TextMode,
    forbidden: frozenset[Kind] = frozenset(),
    key: str = "",
) -> Table:
    text = mode.subject(data)
    marks = shadow.marked_lines(text, path)  # `# milters: shadow` comments
    problems: list[str] = []
    stack: list[tuple[Pattern, list[Rule | IfBlock], str]] = []
    top: list[Rule | IfBlock] = []
    for number, line in logical_lines(text, path):
        where = f"{path}:{number}"
        body = stack[-1][1] if stack else top
        try:
            word = line.split(None, 1)[0]
            if word.lower() == "endif":
                if line.strip().lower() != "endif":
                    raise ConfigError(f"{where}: extra text after ENDIF")
                if not stack:
                    raise ConfigError(f"{where}: ENDIF without matching IF")
                pattern, children, source = stack.pop()
                (stack[-1][1] if stack else top).append(IfBlock(pattern, tuple(children), source))
                continue
            if line[:2].lower() == "if" and (len(line) == 2 or not line[2].isalnum()):
                rest = line[2:].lstrip()
                pattern, _, after = _pattern(rest, kind, mode, where)
                if after.strip():
                    raise ConfigError(f"{where}: extra text after IF pattern")
                stack.append((pattern, [], where))
                continue
            pattern, groups, after = _pattern(line, kind, mode, where)
            result = after.strip()
            if not result:
                raise ConfigError(f"{where}: missing action after the pattern")
            try:
                action = parse_action(result, groups, pattern.negated)
            except ActionError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            if action.kind in forbidden:
                raise ConfigError(f"{where}: {action.kind.value} cannot be used in {key}")
            body.append(Rule(pattern, action, where, shadow.is_marked(marks, where)))
        except ConfigError as exc:
            problems.extend(exc.problems)
    for _, _, source in stack:
        problems.append(f"{source}: IF without matching ENDIF")
    if problems:
        raise ConfigError(problems=problems)
    return Table(spec, tuple(top))



def _pattern(text: str, kind: str, mode: TextMode, where: str) -> tuple[Pattern, int, str]:
    """Parse `[!]<d>pattern<d>flags` at the start of `text`; return it and the rest."""
    negated = False
    pos = 0
    while pos < len(text) and text[pos] == "!":  # each '!' toggles, as in dict_regexp.c
        negated = not negated
        pos += 1
    if pos >= len(text) or text[pos].isspace() or text[pos].isalnum() or text[pos] == "\\":
        raise ConfigError(f"{where}: expected a /pattern/ here: {text[:40]!r}")
    delim = text[pos]
    pos += 1
    start = pos
    while pos < len(text) and text[pos] != delim:
        pos += 2 if text[pos] == "\\" else 1
    if pos >= len(text):
        raise ConfigError(f"{where}: missing closing {delim} of the pattern")
    source = text[start:pos]
    pos += 1
    flag_end = pos
    while flag_end < len(text) and not text[flag_end].isspace():
        flag_end += 1
    flags = text[pos:flag_end]
    allowed = REGEXP_FLAGS if kind == "regexp" else PCRE_FLAGS
    for f in flags:
        if f not in allowed:
            raise ConfigError(f"{where}: unknown {kind} flag {f!r} (allowed: {allowed})")
    on = {f: flags.count(f) % 2 == 1 for f in allowed}  # each flag toggles its default
    re_flags = re.RegexFlag(0)
    anchored = False
    try:
        if kind == "regexp":
            # regexp_table(5): i (case-insensitive, default on), x (extended, default
            # on), m (REG_NEWLINE, default off).
            newline = on["m"]
            translated = translate_posix(source, extended=not on["x"], newline=newline).pattern
            re_flags |= re.MULTILINE if newline else re.DOTALL
        else:
            # pcre_table(5): i (default on), s (DOTALL, default on), m, x, A, E, U, X.
            translated = translate_pcre(
                source, extended=on["x"], ungreedy=on["U"], dollar_endonly=on["E"],
                multiline=on["m"], extra=on["X"],
            )
            if on["m"]:
                re_flags |= re.MULTILINE
            if not on["s"]:
                re_flags |= re.DOTALL
            anchored = on["A"]
        if not on["i"]:
            re_flags |= re.IGNORECASE
        if mode is TextMode.BYTES:
            re_flags |= re.ASCII
        regex = re.compile(translated, re_flags)
    except PatternError as exc:
        raise ConfigError(f"{where}: {kind} pattern /{source}/: {exc}") from None
    except re.error as exc:
        raise ConfigError(f"{where}: {kind} pattern /{source}/: {exc}") from None
    return Pattern(regex, negated, anchored), regex.groups, text[flag_end:]
