"""Which rules of a table key can match any line of a message, found in one pass.

Postfix tries every rule on every line: the 40 body rules of a realistic table on
the 700 lines of a 50 KB attachment are 28,000 regex searches, about 30 ms of
Python. Most rules need some literal text to match (`/viagra/`, `(casino|slots)
bonus`). If none of a rule's required literals occurs anywhere in the message's
lines, the rule cannot match any of them; a substring test over the joined lines
runs at memory speed. Rules without such a literal are screened with one regex
search of the joined lines instead: a pattern without lookaround that matches a
line also matches the lines joined by "\\n" with ^ and $ at every line. The
per-line pass then tries only the rules left: same result, a fraction of the work.
A regexp: rule without needles is screened by glibc (REG_NEWLINE) the same way.

(A multi-pattern engine such as Hyperscan would do this in C, but its Python
binding calls back through PyGILState_Ensure, which crashes in the threads
libmilter's worker pool shares between connections: pymilter binds a thread
state to the thread that first served a connection.)
"""

from __future__ import annotations

import re
import re._constants as sre  # type: ignore[import-not-found]
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import regex as rx

from milters.checks.cost import as_re, free_length, parse

# Constructs that look past the end of a line, and those that never give back
# what they took (possessive quantifiers, atomic groups: `[^a]{2,}+ ?$` takes the
# next lines too and fails where the line alone matches): with them, "matches a
# line" no longer implies "matches the lines joined by \n". (A literal `\*+`
# looks possessive too: such a rule is only searched line by line.)
_UNSCREENABLE = re.compile(r"\(\?<?[=!>]|\\G|[*+?}]\+")
# \A and \Z (what a POSIX `$` becomes) pin the subject's start and end, which in
# the joined text are a line's start and end: ^ and $ with MULTILINE.
_ABSOLUTE_ANCHOR = re.compile(r"(?<!\\)((?:\\\\)*)\\([AZ])")
# Characters that re.IGNORECASE treats as ASCII letters but str.lower() keeps.
_FOLD_EXTRA = str.maketrans({"ı": "i", "ſ": "s"})


# Fewer subjects than this: just try the rules on each.
MIN_SUBJECTS = 8
# A required literal shorter than this is too common to rule anything out.
MIN_NEEDLE = 3


# Seconds a timed search of the joined lines may take before the rule is left to
# the per-line lookups.
SEARCH_TRY = 0.01


class ScreenTimeout(Exception):
    """A screening search ran over the message's match budget."""

    def __init__(self, index: int) -> None:
        self.index = index  # of the pattern in the Screener
        super().__init__(f"screening pattern {index} ran over its time")


def screen_regex(
    regex: rx.Pattern[str], negated: bool, anchored: bool
) -> rx.Pattern[str] | None:
    """The joined-text form of a rule's pattern, or None if it cannot be screened.

    DOTALL is dropped (regexp: tables have it on by default): the joined subjects
    hold no newline of their own, and a `.*` free to run over every line of a
    50 KB part backtracks quadratically.
    """
    if negated or anchored or _UNSCREENABLE.search(regex.pattern):
        return None
    pattern = _ABSOLUTE_ANCHOR.sub(lambda m: m.group(1) + ("^" if m.group(2) == "A" else "$"),
                                   regex.pattern)
    return rx.compile(pattern, (regex.flags | rx.MULTILINE) & ~rx.DOTALL)


def fold(text: str) -> str:
    """Case-folded text for caseless needles: a superset of what re.IGNORECASE equates."""
    lowered = text.lower()
    if "ı" in lowered or "ſ" in lowered:  # str.translate is slow: only when needed
        return lowered.translate(_FOLD_EXTRA)
    return lowered


@dataclass(frozen=True)
class Needles:
    """A rule can match only where one of these literals occurs."""

    any_of: tuple[str, ...]
    caseless: bool

    def found_in(self, text: str, folded: str) -> bool:
        haystack = folded if self.caseless else text
        return any(n in haystack for n in self.any_of)


def needles(regex: rx.Pattern[str]) -> Needles | None:
    """The literals one of which every match of `regex` contains, if it has such."""
    caseless = bool(regex.flags & re.IGNORECASE)
    try:
        parsed = parse(regex)
    except (re.error, RecursionError):
        return None
    factor = _factor(list(parsed))
    if factor is None:
        return None
    if caseless:
        if not all(n.isascii() for n in factor):
            return None  # full Unicode case folding is not what re.IGNORECASE does
        factor = tuple(fold(n) for n in factor)
    return Needles(factor, caseless)


def _factor(items: list[tuple[Any, Any]]) -> tuple[str, ...] | None:
    """The best set of alternative literals that a match of this sequence contains."""
    candidates: list[tuple[str, ...]] = []
    run: list[str] = []

    def flush() -> None:
        if len(run) >= MIN_NEEDLE:
            candidates.append(("".join(run),))
        run.clear()

    for op, av in items:
        if op is sre.LITERAL:
            run.append(chr(av))
            continue
        flush()
        sub: tuple[str, ...] | None = None
        if op is sre.SUBPATTERN:
            _group, add_flags, del_flags, pattern = av
            if not (add_flags or del_flags):  # a local flag changes how literals match
                sub = _factor(list(pattern))
        elif op is sre.BRANCH:
            alternatives = [_factor(list(p)) for p in av[1]]
            if alternatives and all(alternatives):
                sub = tuple(n for alt in alternatives if alt for n in alt)
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT) and av[0] >= 1:
            sub = _factor(list(av[2]))
        elif op is sre.ATOMIC_GROUP:
            sub = _factor(list(av))
        if sub:
            candidates.append(sub)
    flush()
    if not candidates:
        return None
    return max(candidates, key=lambda c: min(len(n) for n in c))


@dataclass(frozen=True)
class Screen:
    """One rule's test against the joined lines: its needles if it has some, else a
    search of the joined text (`fast` for texts up to `free` long, untimed; `search`
    with a timeout in seconds otherwise, raising TimeoutError when it runs over)."""

    needles: Needles | None
    search: Callable[[str, float | None], object]
    fast: Callable[[str], object] | None = None
    free: int = 0


def regex_screen(regex: rx.Pattern[str]) -> Screen:
    """The Screen of a joined-text `regex` pattern (screen_regex)."""
    fast = as_re(regex)
    return Screen(needles(regex), lambda text, timeout: regex.search(text, timeout=timeout),
                  None if fast is None else fast.search, free_length(regex))


class Screener:
    """Built once per table key at load; immutable, so threads can share it."""

    def __init__(self, screens: Iterable[Screen]) -> None:
        self.screens = tuple(screens)
        self.needles = tuple(s.needles for s in self.screens)

    def possible(
        self, subjects: Sequence[str], time_left: Callable[[], float | None] = lambda: None
    ) -> frozenset[int] | None:
        """Indexes of the screens that may match one of `subjects`; None: try them all.

        Each timed search gets SEARCH_TRY seconds (a rule whose search runs over
        stays in), or what `time_left()` says if less: running over that raises
        ScreenTimeout.
        """
        if len(subjects) < MIN_SUBJECTS:
            return None
        # Folded headers: `.` must cross the fold, so the joined-text regex no longer
        # stands for the per-line one. The needle test still holds (a needle inside
        # a subject is inside the joined text), so only rules without needles stay.
        multiline = any("\n" in s for s in subjects)
        joined = "\n".join(subjects)
        folded = fold(joined) if any(n and n.caseless for n in self.needles) else joined
        found = set()
        for i, screen in enumerate(self.screens):
            needle = screen.needles
            if needle is not None:
                if needle.found_in(joined, folded):
                    found.add(i)
            elif multiline:
                found.add(i)
            elif screen.fast is not None and len(joined) <= screen.free:
                if screen.fast(joined):
                    found.add(i)
            else:
                # A search of the joined text may backtrack far longer than the
                # same search line by line: after a short try the rule stays in
                # and the per-line lookups decide (screening must not turn a line
                # Postfix answers into a match_timeout).
                left = time_left()
                try:
                    if screen.search(joined, SEARCH_TRY if left is None
                                     else min(left, SEARCH_TRY)):
                        found.add(i)
                except TimeoutError:
                    if left is not None and left <= SEARCH_TRY:
                        raise ScreenTimeout(i) from None
                    found.add(i)
        return frozenset(found)
