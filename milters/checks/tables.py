"""Postfix `regexp:` and `pcre:` table files, parsed and compiled once at load.

File format (regexp_table(5), pcre_table(5)): a logical line starts with non-space
text and continues on lines that start with whitespace; blank lines and lines whose
first non-space character is `#` are skipped (they do not end a logical line, as in
Postfix's readlline()). A rule is `[!]/pattern/flags result`, any delimiter
character allowed (regexp: also `/pat1/!/pat2/ result`, pat1 matching and pat2
not); `if [!]/pattern/flags` ... `endif` nests.

Every line Postfix 3.7's dict_regexp.c / dict_pcre.c skip with a warning is skipped
here with a warning of the same meaning naming file:line (Table.warnings, logged at
load and shown by `milters check-config`; `--strict` makes them errors). Only what
Postfix cannot open at all (a missing file, a table type other than regexp:/pcre:)
refuses the configuration.

A key such as `header_checks` lists several tables; as Postfix's maps_find() does,
the first table with a matching rule answers for a line and later tables are not
consulted (so DUNNO/OK in an early table shields the line from later ones).

Text: with `decode = false` patterns and subjects are both read byte for byte
(Latin-1 code points standing for bytes, ASCII-only case folding and `\\w`), which is
exactly how Postfix matches. With decoding on, the table file is read as UTF-8 and
subjects are Unicode text, so a rule written in Japanese matches decoded mail.

Engine: regexp: patterns are compiled and matched by glibc's regcomp/regexec, as
Postfix does (posix.py); their translation to Python (patterns.py) only rules lines
out in front of glibc (its literals; the translation itself by `re` where that
reads the text as glibc does and its work is bounded, cost.py): every match and
every `$N` is glibc's. pcre: patterns are translated to Python's
`re` syntax (patterns.py) and compiled with the `regex` module in its
re-compatible VERSION0, for two things `re` lacks.
A backtracking pattern such as `/^Subject: (a+)+$/` can run for minutes on a long
subject (glibc's regexec does not backtrack, PCRE2 stops at its match limit):
`regex` takes a timeout, so every lookup of one message shares a Budget
(`match_timeout`) and running over raises MatchOverrun naming the rule's file:line
(a timeout costs a system call, so searches whose work is bounded go without one:
cost.py).
And `regex` releases the GIL while it matches a str, so a long match on one
connection does not stop libmilter's other threads in the same worker.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import regex as rx

from milters.checks import shadow
from milters.checks.actions import (
    ActionError,
    Context,
    Kind,
    RuleAction,
    SkipRule,
    parse_action,
)
from milters.checks.cost import Prefixes, anchored_prefixes, as_re, free_length
from milters.checks.patterns import PatternError, translate_pcre, translate_posix
from milters.checks.posix import (
    REG_EXTENDED,
    REG_ICASE,
    REG_NEWLINE,
    REG_NOSUB,
    PosixError,
    PosixMatch,
    PosixRegex,
)
from milters.checks.screen import (
    Needles,
    Screen,
    Screener,
    ScreenTimeout,
    fold,
    needles,
    regex_screen,
    screen_regex,
)
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


class MatchOverrun(Exception):
    """Matching one message ran over its match_timeout."""

    def __init__(self, source: str, seconds: float) -> None:
        # The rule's file:line; "" when many short searches used the budget up.
        self.source = source
        self.seconds = seconds
        super().__init__(f"{source}: matching ran over match_timeout ({seconds:g} s)")


class Budget:
    """The matching time one message (or one SMTP stage) may spend, in all its lookups.

    Made per message, so it is never shared between threads. seconds=None: no limit.
    """

    __slots__ = ("_deadline", "seconds")

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._deadline = None if seconds is None else time.monotonic() + seconds

    def spent(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def left(self) -> float | None:
        """Seconds left for the next match (0 when spent: regex then times out at once)."""
        if self._deadline is None:
            return None
        return max(self._deadline - time.monotonic(), 0.0)


UNLIMITED = Budget(None)  # immutable: no deadline to move


Matcher = Callable[..., "Found | None"]
Found = rx.Match[str] | re.Match[str] | PosixMatch

# Seconds the screen of a regexp: rule tries the translation before glibc takes over.
SCREEN_TRY = 0.01

# GNU's buffer anchors \` and \' pin the whole subject: in the joined lines they
# would match at the first line's start and the last line's end only.
_BUFFER_ANCHOR = re.compile(rb"\\[`']")


@dataclass(frozen=True)
class Pattern:
    """A compiled table pattern, negated or not, anchored (PCRE `A`) or not.

    pcre: tables match with `regex`. regexp: tables match with glibc (`posix`, as
    Postfix does); their translation to Python (patterns.py), when there is one,
    only supplies cheap tests in front that rule lines out (prefixes, needles, and
    where it reads the text exactly as glibc does, the translation itself); every
    match, and each `$N`, comes from glibc.
    """

    regex: rx.Pattern[str] | None
    negated: bool = False
    anchored: bool = False
    posix: PosixRegex | None = None
    # regexp: the translation reads every subject as glibc does (decode = false:
    # bytes, the C locale); otherwise only ASCII subjects (decoded text, C.UTF-8).
    byte_exact: bool = False
    # The bound search (or match, for PCRE's A flag): one lookup per line per rule;
    # called with timeout= (seconds or None) for pcre:.
    match: Matcher = field(init=False, repr=False, compare=False)
    # The rule's test against all the lines of a message at once: tells whether it
    # can match any of them (see screen.py).
    screen: Screen | None = field(init=False, repr=False, compare=False)
    # Subjects up to this long are searched without a timeout (see cost.py)...
    free_length: int = field(init=False, repr=False, compare=False)
    # ...by re's faster engine when it compiles the pattern (cost.as_re).
    fast: Matcher = field(init=False, repr=False, compare=False)
    # For a pattern anchored at the start: the literal texts a match starts with.
    prefixes: Prefixes | None = field(init=False, repr=False, compare=False)
    # Literals one of which every match contains (screen.py), tested per line too.
    needles: Needles | None = field(init=False, repr=False, compare=False)
    # regexp: the prefixes and needles as one `re` test in front of glibc (None: no
    # literal known); it says "no" only where glibc cannot match either.
    guard: Matcher | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = self.regex
        setattr_ = partial(object.__setattr__, self)
        setattr_("prefixes", None if regex is None else anchored_prefixes(regex))
        setattr_("needles", None if regex is None else needles(regex))
        if self.posix is not None:
            setattr_("match", self.posix.search)
            fast = None if regex is None else as_re(regex)
            if fast is None:
                setattr_("free_length", -1)
                setattr_("fast", self.posix.search)
            else:
                setattr_("free_length", free_length(regex))  # type: ignore[arg-type]
                setattr_("fast", fast.search)
            setattr_("screen", self._posix_screen(self.posix))
            setattr_("guard", _literal_guard(self.prefixes, self.needles))
            return
        setattr_("guard", None)
        assert regex is not None, "a pcre: pattern is a regex"
        setattr_("match", regex.match if self.anchored else regex.search)
        setattr_("free_length", free_length(regex))
        fast = as_re(regex)
        if fast is None:
            setattr_("fast", partial(self.match, concurrent=False))
        else:
            setattr_("fast", fast.match if self.anchored else fast.search)
        joined = screen_regex(regex, self.negated, self.anchored)
        setattr_("screen", None if joined is None else regex_screen(joined))

    def _posix_screen(self, posix: PosixRegex) -> Screen | None:
        """Needles, or glibc with REG_NEWLINE over the joined lines: a pattern that
        matches a line (which holds no newline) matches the same bytes there, with
        ^ and $ at each line's ends and `.` kept inside its line."""
        if self.negated or _BUFFER_ANCHOR.search(posix.source):
            return None
        if self.needles is not None:
            return Screen(self.needles, _unused_search)
        joined = posix.with_flags(posix.flags | REG_NEWLINE)
        exact = self.regex and screen_regex(self.regex, self.negated, self.anchored)
        if not exact:
            return Screen(None, lambda text, _timeout: joined.search(text))
        # On a long text the translation runs several times faster than glibc, and
        # re faster still where its work is bounded (cost.py). A search that needs
        # more than SCREEN_TRY (a backtracking blow-up) is left to glibc, which
        # does not backtrack: the screen of a regexp: rule never runs over the
        # budget. The translation reads bytes as glibc does in the C locale, and
        # decoded text as in C.UTF-8 where the text is ASCII; other text goes to
        # glibc.
        fast = as_re(exact)
        free = free_length(exact) if fast is not None else 0
        ascii_only = not self.byte_exact

        def screen_search(text: str, timeout: float | None) -> object:
            if ascii_only and not text.isascii():
                return joined.search(text)
            if fast is not None and len(text) <= free:
                return fast.search(text)
            try:
                return exact.search(text, timeout=SCREEN_TRY if timeout is None
                                    else min(timeout, SCREEN_TRY))
            except TimeoutError:
                return joined.search(text)

        return Screen(None, screen_search)

    def search(self, subject: str, budget: Budget) -> Found | None:
        """One lookup: a timeout only where the search could run long (cost.py)."""
        posix = self.posix
        if posix is not None:
            # One call into re rules most lines out (a header rule's field name,
            # a body rule's words); glibc, a foreign call, decides the rest. It
            # does not backtrack: no timeout (the budget is still checked between
            # lookups).
            if len(subject) <= self.free_length and (
                    self.byte_exact or subject.isascii()):
                # The translation, by re (bounded work here, cost.py), says "no"
                # to most lines much faster than glibc; glibc answers the rest.
                if self.fast(subject) is None:
                    return None
                return posix.search(subject)
            guard = self.guard
            if guard is not None and guard(subject) is None:
                return None
            return posix.search(subject)
        if len(subject) <= self.free_length:
            # Bounded work: no timeout to pay for, and the GIL kept (released for
            # every short search, two busy threads would hand it back and forth).
            # re's engine fails an anchored `^Subject:` on another line faster
            # than any test in Python could rule it out.
            return self.fast(subject)
        # A cheap test before the engine: most header rules are anchored at a
        # field name, and this rules their other lines out without the engine.
        if self.prefixes is not None and self.prefixes.rule_out(subject):
            return None
        # A timed search costs a system call (cost.py): first the literals that
        # every match contains.
        if self.needles is not None and not self.needles.found_in(
                subject, fold(subject) if self.needles.caseless else subject):
            return None
        return self.match(subject, timeout=budget.left())


def _literal_guard(prefixes: Prefixes | None, needles: Needles | None) -> Matcher | None:
    """An `re` test that fails where no match can be: the subject starts with none of
    the prefixes, or contains none of the needles.

    Caseless literals are ASCII (cost.py, screen.py) and re's Unicode IGNORECASE
    equates more with them than glibc's REG_ICASE does in the C or C.UTF-8 locale
    (ı and ſ too, which glibc folds to I and S): never a "no" glibc would not say.
    """
    if prefixes is None and needles is None:
        return None
    caseless = (prefixes is not None and prefixes.caseless) or \
        (needles is not None and needles.caseless)
    flags = re.IGNORECASE if caseless else 0
    if prefixes is not None and prefixes.caseless != caseless:
        return None if needles is None else _literal_guard(None, needles)
    if needles is not None and needles.caseless != caseless:
        return _literal_guard(prefixes, None)
    head = "" if prefixes is None else "(?=" + "|".join(map(re.escape, prefixes.texts)) + ")"
    if needles is None:
        return re.compile(head, flags).match
    words = "(?:" + "|".join(map(re.escape, needles.any_of)) + ")"
    if prefixes is None:
        return re.compile(words, flags).search
    return re.compile(head + "(?s:.*?)" + words, flags).match


def _unused_search(_text: str, _timeout: float | None) -> object:
    """A screen with needles is never searched (Screener.possible)."""
    raise AssertionError("a screen with needles is not searched")


@dataclass(frozen=True)
class Rule:
    pattern: Pattern
    action: RuleAction
    source: str  # "file:line" for logs and errors
    # regexp: `/pat1/!/pat2/`: a second pattern that must also agree (dict_regexp.c).
    also: Pattern | None = None
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
    # The rule's whole right-hand side after substitution: what Postfix's dict
    # lookup (postmap -q) answers for the subject.
    result: str = ""

    @property
    def kind(self) -> Kind:
        return self.rule.action.kind


@dataclass(frozen=True)
class Table:
    spec: str
    rules: tuple[Rule | IfBlock, ...]
    warnings: tuple[str, ...] = ()  # lines skipped or read leniently, as Postfix warns

    def lookup(self, subject: str, budget: Budget = UNLIMITED) -> Hit | None:
        return _lookup(self.rules, subject, budget)

    def all_patterns(self) -> Iterator[Pattern]:
        return (item.pattern for item in self.all_items())

    def all_items(self) -> Iterator[Rule | IfBlock]:
        """Every rule and IF, in file order."""
        stack: list[Rule | IfBlock] = list(reversed(self.rules))
        while stack:
            item = stack.pop()
            yield item
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


def _search(pattern: Pattern, subject: str, budget: Budget, source: str
            ) -> Found | None:
    try:
        return pattern.search(subject, budget)
    except TimeoutError:
        raise MatchOverrun(source, budget.seconds or 0.0) from None


def _lookup(items: Sequence[Rule | IfBlock], subject: str, budget: Budget) -> Hit | None:
    for item in items:
        m = _search(item.pattern, subject, budget, item.source)
        if (m is not None) == item.pattern.negated:
            continue
        if isinstance(item, IfBlock):
            hit = _lookup(item.body, subject, budget)
            if hit is not None:
                return hit
            continue
        # regexp: `/pat1/!/pat2/`: the second pattern too, within the same budget.
        also = item.also
        if also is not None and (
                _search(also, subject, budget, item.source) is not None) == also.negated:
            continue
        if item.shadow:  # watched only: noted, and lookup goes on (checks/shadow.py)
            shadow.saw(item, item.action.text.expand(m.group if m else lambda _: ""), subject)
            continue
        group = m.group if m is not None else _no_group  # negated rule: no groups
        action = item.action
        return Hit(item, action.text.expand(group), action.result.expand(group))
    return None


def _no_group(_index: int) -> str:
    return ""


@dataclass(frozen=True)
class Maps:
    """The tables of one key, searched in order; the first table that matches answers."""

    key: str
    tables: tuple[Table, ...] = ()
    screener: Screener = field(init=False, repr=False, compare=False)
    _screened_ids: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _screened_sources: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        screened = [p for t in self.tables for p in t.all_items() if p.pattern.screen is not None]
        object.__setattr__(self, "screener", Screener(
            p.pattern.screen for p in screened if p.pattern.screen))
        object.__setattr__(self, "_screened_ids", tuple(id(p.pattern) for p in screened))
        object.__setattr__(self, "_screened_sources", tuple(p.source for p in screened))

    def __bool__(self) -> bool:
        return bool(self.tables)

    def lookup(self, subject: str, budget: Budget = UNLIMITED) -> Hit | None:
        return _first_hit((t.rules for t in self.tables), subject, budget)

    def screen(self, subjects: Sequence[str], budget: Budget = UNLIMITED) -> Possible:
        """Ids of the patterns that can match one of `subjects` (see screen.py)."""
        try:
            found = self.screener.possible(subjects, budget.left)
        except ScreenTimeout as exc:
            raise MatchOverrun(self._screened_sources[exc.index], budget.seconds or 0.0) from None
        if found is None:
            return None
        return frozenset(self._screened_ids[i] for i in found)

    def for_message(self, subjects: Sequence[str], budget: Budget = UNLIMITED) -> Pruned:
        """These tables without the rules that cannot match any of `subjects`."""
        possible = self.screen(subjects, budget)
        if possible is None:
            return Pruned(tuple(t.rules for t in self.tables))
        return Pruned(tuple(_prune(t.rules, possible) for t in self.tables))

    def kinds(self) -> set[Kind]:
        return {r.action.kind for t in self.tables for r in t.all_rules()}

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(w for t in self.tables for w in t.warnings)


@dataclass(frozen=True)
class Pruned:
    """The rules of one key that can match some line of one message, in order."""

    tables: tuple[tuple[Rule | IfBlock, ...], ...]

    def lookup(self, subject: str, budget: Budget = UNLIMITED) -> Hit | None:
        return _first_hit(self.tables, subject, budget)


def _first_hit(
    tables: Iterable[Sequence[Rule | IfBlock]], subject: str, budget: Budget
) -> Hit | None:
    """As Postfix's maps_find(): the first table with a matching rule answers."""
    if budget.spent():
        # Untimed searches (cost.py) used up the budget: checked once a line.
        raise MatchOverrun("", budget.seconds or 0.0)
    for rules in tables:
        hit = _lookup(rules, subject, budget)
        if hit is not None:
            return hit
    return None


def _prune(items: Sequence[Rule | IfBlock], possible: frozenset[int]) -> tuple[Rule | IfBlock, ...]:
    kept: list[Rule | IfBlock] = []
    for item in items:
        if item.pattern.screen is not None and id(item.pattern) not in possible:
            continue  # matches no line of this message (an IF block: none of its body runs)
        if isinstance(item, IfBlock):
            item = replace(item, body=_prune(item.body, possible))
        kept.append(item)
    return tuple(kept)


# --- loading -------------------------------------------------------------------


def load_maps(
    key: str,
    specs: Sequence[str],
    mode: TextMode,
    forbidden: frozenset[Kind] = frozenset(),
    context: Context = Context.ACCESS,
    access_style: bool = False,
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
            # Postfix opens a "surrogate" table that fails every lookup, so every
            # message is deferred: refusing to start says so sooner.
            problems.append(f"{key}: table file {path} does not exist")
            continue
        except OSError as exc:
            problems.append(f"{key}: cannot read table file {path}: {exc.strerror}")
            continue
        try:
            tables.append(parse_table(data, spec, path, kind, mode, forbidden, key,
                                      context, access_style))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems=problems)
    return Maps(key, tuple(tables))


_SPACE = " \t\n\v\f\r"  # C isspace() in the C locale


def _isalnum(c: str) -> bool:
    """C isalnum() in the C locale: ASCII letters and digits only."""
    return c.isascii() and c.isalnum()


def logical_lines(text: str, path: str, warnings: list[str] | None = None
                  ) -> Iterator[tuple[int, str]]:
    """(first line number, logical line) pairs, as Postfix's readllines() joins them.

    A logical line that starts with whitespace (a continuation with nothing to
    continue) is skipped with readllines()'s warning, as Postfix does.
    """
    current: list[str] = []
    start = 0
    for number, line in enumerate(text.split("\n"), start=1):
        stripped = line.strip(_SPACE)
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in _SPACE and current:
            current.append(line)
            continue
        if current:
            yield from _finish(start, current, path, warnings)
        current = [line]
        start = number
    if current:
        yield from _finish(start, current, path, warnings)


def _finish(start: int, parts: list[str], path: str, warnings: list[str] | None
            ) -> Iterator[tuple[int, str]]:
    line = "".join(parts).rstrip(_SPACE)  # trimblanks()
    if line[0] in _SPACE:
        if warnings is not None:
            warnings.append(f"{path}:{start}: logical line must not start with whitespace: "
                            f"\"{line[:30]}{'...' if len(line) > 30 else ''}\": skipped")
        return
    yield start, line


def parse_table(
    data: bytes,
    spec: str,
    path: str,
    kind: str,
    mode: TextMode,
    forbidden: frozenset[Kind] = frozenset(),
    key: str = "",
    context: Context = Context.ACCESS,
    access_style: bool = False,
) -> Table:
    """Parse one table file as dict_regexp_open()/dict_pcre_open() do.

    Lines Postfix skips become warnings; a ConfigError only for actions we refuse in
    access-style tables (Context.ACCESS) and actions `forbidden` for this key.
    """
    text = mode.subject(data)
    marks = shadow.marked_lines(text, path)  # `# milters: shadow` comments
    problems: list[str] = []
    warnings: list[str] = []
    stack: list[tuple[Pattern, list[Rule | IfBlock], str]] = []
    top: list[Rule | IfBlock] = []
    for number, line in logical_lines(text, path, warnings):
        where = f"{path}:{number}"
        body = stack[-1][1] if stack else top
        try:
            if not _isalnum(line[0]):
                rule = _rule(line, kind, mode, where, warnings, context, key, access_style)
                if rule.action.kind in forbidden:
                    raise ConfigError(f"{where}: {rule.action.kind.value} cannot be used "
                                      f"in {key}")
                if shadow.is_marked(marks, where):
                    rule = replace(rule, shadow=True)
                body.append(rule)
            elif line[:2].lower() == "if" and not (len(line) > 2 and _isalnum(line[2])):
                pattern, _, after = _pattern(line[2:].lstrip(_SPACE), kind, mode, where,
                                             warnings)
                if after.strip(_SPACE):
                    warnings.append(f"{where}: ignoring extra text after IF statement: "
                                    f"\"{after.strip(_SPACE)}\"")
                stack.append((pattern, [], where))
            elif line[:5].lower() == "endif" and not (len(line) > 5 and _isalnum(line[5])):
                if not stack:
                    warnings.append(f"{where}: ignoring ENDIF without matching IF")
                    continue
                if line[5:].strip(_SPACE):
                    warnings.append(f"{where}: ignoring extra text after ENDIF")
                _close(stack, top)
            else:
                warnings.append(f"{where}: ignoring unrecognized request")
        except SkipRule as exc:
            warnings.append(f"{where}: {exc}")
        except ConfigError as exc:
            problems.extend(exc.problems)
    while stack:
        # dict_*_open(): "IF has no matching ENDIF"; the block runs to the end of the
        # file (a non-matching IF ends the lookup there, as Postfix's does).
        warnings.append(f"{stack[-1][2]}: IF has no matching ENDIF")
        _close(stack, top)
    if problems:
        raise ConfigError(problems=problems)
    return Table(spec, tuple(top), tuple(warnings))


def _close(stack: list[tuple[Pattern, list[Rule | IfBlock], str]],
           top: list[Rule | IfBlock]) -> None:
    pattern, children, source = stack.pop()
    (stack[-1][1] if stack else top).append(IfBlock(pattern, tuple(children), source))


def _rule(line: str, kind: str, mode: TextMode, where: str, warnings: list[str],
          context: Context, key: str, access_style: bool) -> Rule:
    pattern, groups, after = _pattern(line, kind, mode, where, warnings)
    also = None
    if kind == "regexp" and after.startswith("!"):
        # dict_regexp_get_pats(): `/pat1/!/pat2/`; pat2 gives no $N (REG_NOSUB).
        also, _, after = _pattern(after, kind, mode, where, warnings)
    result = after.strip(_SPACE)
    if not result:
        warnings.append(f"{where}: no replacement text: using empty string")
        if context is Context.ACCESS:
            raise ConfigError(f"{where}: missing action after the pattern")
    try:
        action = parse_action(result, groups, pattern.negated, context, key or "header_checks",
                              access_style)
    except ActionError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if action.warning:
        warnings.append(f"{where}: {action.warning}")
    if kind == "regexp":
        pattern, also = _as_dict_regexp(pattern, also, action)
    return Rule(pattern, action, where, also)


def _as_dict_regexp(pattern: Pattern, also: Pattern | None, action: RuleAction
                    ) -> tuple[Pattern, Pattern | None]:
    """A regexp: rule's patterns compiled and searched as dict_regexp.c does.

    The first pattern gets REG_NOSUB when the result has no $N, else regexec()
    gets 1 + its largest N slots; the second (`/pat1/!/pat2/`) always REG_NOSUB.
    glibc's answer with back references can depend on both (posix.py).
    """
    max_sub = max((p for p in action.result.parts if isinstance(p, int)), default=0)
    first = pattern.posix
    assert first is not None, "a regexp: pattern is matched by glibc"
    posix = PosixRegex(first.source, first.flags | (0 if max_sub else REG_NOSUB),
                       utf8=first.utf8, nmatch=max_sub + 1 if max_sub else 0)
    pattern = replace(pattern, posix=posix)
    if also is not None and also.posix is not None:
        second = also.posix
        also = replace(also, posix=PosixRegex(second.source, second.flags | REG_NOSUB,
                                              utf8=second.utf8))
    return pattern, also


def _pattern(text: str, kind: str, mode: TextMode, where: str, warnings: list[str]
             ) -> tuple[Pattern, int, str]:
    """Parse `[!]<d>pattern<d>flags` at the start of `text`; return it and the rest.

    As dict_regexp_get_pat()/dict_pcre_get_pattern(): `!` and spaces may precede
    the delimiter (each `!` toggles), the delimiter is any character, a backslash
    escapes the next one, and flags run to the next space (or `!` in regexp:).
    Raises SkipRule with Postfix's warning for a rule it would skip.
    """
    negated = False
    pos = 0
    while pos < len(text) and (text[pos] == "!" or text[pos] in _SPACE):
        if text[pos] == "!":
            negated = not negated
        pos += 1
    if pos >= len(text):
        raise SkipRule("no regexp: skipping this rule")
    delim = text[pos]
    pos += 1
    start = pos
    while pos < len(text):
        # A backslash escapes the next character, the delimiter too (even a
        # backslash delimiter: `\\a\\ x` has no closing one). A backslash that ends
        # the line ends a regexp: pattern (dict_regexp_get_pat() stops at it and
        # overwrites it: `/abc\\` is /abc/ with no result text); in pcre: there is
        # no closing delimiter.
        if text[pos] == "\\":
            if pos + 1 == len(text):
                if kind != "regexp":
                    pos += 1
                break
            pos += 1
        elif text[pos] == delim:
            break
        pos += 1
    if pos >= len(text):
        raise SkipRule(f"no closing regexp delimiter \"{delim}\": skipping this rule")
    source = text[start:pos]
    pos += 1
    flag_end = pos
    while flag_end < len(text) and text[flag_end] not in _SPACE and \
            not (kind == "regexp" and text[flag_end] == "!"):
        flag_end += 1
    flags = text[pos:flag_end]
    allowed = REGEXP_FLAGS if kind == "regexp" else PCRE_FLAGS
    for f in flags:
        if f not in allowed:
            raise SkipRule(f"unknown regexp option \"{f}\": skipping this rule")
    if "X" in flags and kind == "pcre":
        # Postfix built with PCRE2 (Debian 12): dict_pcre.c ignores X with a warning.
        warnings.append(f"{where}: ignoring obsolete regexp option \"X\"")
        flags = flags.replace("X", "")
    on = {f: flags.count(f) % 2 == 1 for f in allowed}  # each flag toggles its default
    if kind == "regexp":
        pattern, groups = _posix_pattern(source, on, negated, mode)
        return pattern, groups, text[flag_end:]
    re_flags = 0
    try:
        # pcre_table(5): i (default on), s (DOTALL, default on), m, x, A, E, U.
        translated = translate_pcre(
            source, extended=on["x"], ungreedy=on["U"], dollar_endonly=on["E"],
            # PCRE2 (Postfix 3.7 on Debian 12) rejects unknown escapes such as
            # \\y whatever the X flag says, so the rule is skipped, as there.
            multiline=on["m"], extra=True,
        )
        if on["m"]:
            re_flags |= rx.MULTILINE
        if not on["s"]:
            re_flags |= rx.DOTALL
        if not on["i"]:
            re_flags |= rx.IGNORECASE
        if mode is TextMode.BYTES:
            re_flags |= rx.ASCII
        compiled = _compile_pcre(translated, re_flags)
    except (PatternError, re.error, rx.error) as exc:
        # dict_pcre.c: "error in regex at offset N".
        raise SkipRule(f"{kind} pattern /{source}/: {exc}: skipping this rule") from None
    return Pattern(compiled, negated, on["A"]), compiled.groups, text[flag_end:]


def _compile_pcre(translated: str, flags: int) -> rx.Pattern[str]:
    """The translation compiled by `regex` in its re-compatible VERSION0, the
    dialect patterns.py writes.

    VERSION0 (and `re`) refuse a back reference to a group that is still open,
    `(a\\1|b)+`, which PCRE reads as the text the group took in its previous
    iteration (failing while there is none): VERSION1 reads it so. It differs from
    VERSION0 otherwise only where the translations never go (nested sets and set
    operations in a class, where every `[`, `-`, `&`, `|` and `~` is escaped, and
    scoped inline flags, which they only write scoped or at the very start) and
    in its full case folding, turned off here (`(?-f)`).
    """
    try:
        return rx.compile(translated, flags | rx.VERSION0)
    except rx.error as exc:
        if "open group" not in str(exc):
            raise
    return rx.compile("(?-f)" + translated, flags | rx.VERSION1)


def _posix_pattern(source: str, on: dict[str, bool], negated: bool, mode: TextMode
                   ) -> tuple[Pattern, int]:
    """A regexp: pattern compiled by glibc as dict_regexp.c does, and its group count.

    regexp_table(5): REG_EXTENDED and REG_ICASE on by default, each toggled by its flag
    (x, i); m toggles REG_NEWLINE. A pattern regcomp() refuses is skipped with its
    regerror() text, as Postfix warns "regexp map F, line N: <text>".
    """
    flags = REG_EXTENDED | REG_ICASE
    flags ^= (REG_EXTENDED if on["x"] else 0) | (REG_ICASE if on["i"] else 0)
    flags |= REG_NEWLINE if on["m"] else 0
    try:
        # Decoded text is matched as UTF-8, except by a pattern that is not UTF-8
        # itself (a Shift_JIS table): that one still matches raw bytes byte for byte.
        utf8 = mode is TextMode.TEXT and _is_utf8(source)
        posix = PosixRegex(mode.to_bytes(source), flags, utf8=utf8)
    except PosixError as exc:
        raise SkipRule(str(exc)) from None
    return Pattern(_posix_translation(source, on, mode), negated, posix=posix,
                   byte_exact=mode is TextMode.BYTES), posix.groups


def _is_utf8(text: str) -> bool:
    """Whether a str read with surrogateescape was valid UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _posix_translation(source: str, on: dict[str, bool], mode: TextMode
                       ) -> rx.Pattern[str] | None:
    """The pattern in Python's syntax, for the literal tests in front of glibc (needles,
    prefixes); None where the translator cannot say it (glibc still matches it)."""
    newline = on["m"]
    re_flags = (rx.MULTILINE if newline else rx.DOTALL) | rx.VERSION0
    if not on["i"]:
        re_flags |= rx.IGNORECASE
    if mode is TextMode.BYTES:
        re_flags |= rx.ASCII
    try:
        return rx.compile(translate_posix(source, extended=not on["x"], newline=newline).pattern,
                          re_flags)
    except (PatternError, re.error, rx.error, RecursionError, OverflowError):
        return None
