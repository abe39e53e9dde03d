"""How long a subject a table pattern can search without a timeout.

The `regex` module's timeout costs about 1.8 µs a call (it reads the process CPU
clock, a system call, to start it), against 0.2-0.4 µs for a typical search
itself: with the ~500 searches a small message needs, timing every call would
halve the filter's throughput. So a call gets a timeout only when it could
really run long:

- Patterns whose backtracking can be exponential always get one: those that
  repeat anything but a single character class (`(a+)+`, `(\\w+\\s?)+`,
  `(a|ab)*`, to be safe also `(\\.[a-z]+)+`), back references, lookaround,
  conditionals.
- Other patterns backtrack at most polynomially: with k repetitions in a row,
  a search tries about n^(k+1) steps on n characters. A subject is searched
  without a timeout while n^(k+1) stays under FREE_STEPS (a few milliseconds
  of the engine's work); longer subjects get the timeout. Untimed searches keep
  the GIL (regex would release it at every call, and two busy threads then hand
  it back and forth: twice the CPU); timed ones release it, so a long search
  does not stop libmilter's other threads.

The message's budget is still checked between lookups (tables.Budget), so an
untimed call can overrun it by at most one such bounded search.
"""

from __future__ import annotations

import re
import re._constants as sre  # type: ignore[import-not-found]
import re._parser as sre_parse  # type: ignore[import-not-found]
from dataclasses import dataclass, field
from typing import Any

import regex as rx

# Backtracking steps an untimed search may take in the worst case (~10 ms, with
# the GIL held: such short searches do not release it).
FREE_STEPS = 10**6

# regex's flags that `re`'s parser knows, as re spells them (ASCII has another
# value; regex adds its own, such as VERSION0).
RE_FLAGS = ((rx.IGNORECASE, re.IGNORECASE), (rx.MULTILINE, re.MULTILINE),
            (rx.DOTALL, re.DOTALL), (rx.ASCII, re.ASCII), (rx.VERBOSE, re.VERBOSE),
            (rx.UNICODE, re.UNICODE))

_REPEATS = (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT)
# What one repetition step can match: a single character.
_ONE_CHAR = (sre.LITERAL, sre.NOT_LITERAL, sre.IN, sre.ANY)
_RISKY = (sre.GROUPREF, sre.GROUPREF_EXISTS, sre.GROUPREF_IGNORE, sre.GROUPREF_LOC_IGNORE,
          sre.GROUPREF_UNI_IGNORE, sre.ASSERT, sre.ASSERT_NOT)


class _Exponential(Exception):
    """The pattern can backtrack exponentially."""


def parse(regex: rx.Pattern[str]) -> Any:
    """The pattern parsed by re's parser (patterns.py writes re syntax)."""
    flags = sum(int(ours) for theirs, ours in RE_FLAGS if regex.flags & theirs)
    return sre_parse.parse(regex.pattern, flags)


def as_re(regex: rx.Pattern[str]) -> re.Pattern[str] | None:
    """The same pattern compiled by `re`, for the searches that need no timeout.

    The translations are written in re's syntax (patterns.py), and re's engine is
    two to three times faster than regex's on these patterns; regex stays for
    the searches that could run long (a timeout, the GIL released). None if re
    cannot compile it.
    """
    flags = sum(int(ours) for theirs, ours in RE_FLAGS if regex.flags & theirs)
    try:
        return re.compile(regex.pattern, flags)
    except (re.error, RecursionError, OverflowError):
        return None


def free_length(regex: rx.Pattern[str]) -> int:
    """The longest subject this pattern may search without a timeout (0: none)."""
    try:
        k, factor = _repeats(list(parse(regex)))
    except (_Exponential, re.error, RecursionError):
        return 0
    return int((FREE_STEPS / factor) ** (1 / (k + 1)))


def _repeats(items: list[tuple[Any, Any]]) -> tuple[int, int]:
    """Unbounded repetitions in a row and the product of the bounded ones' choices
    (their backtracking multiplies); raises _Exponential."""
    k, factor = 0, 1
    for op, av in items:
        if op in _RISKY:
            raise _Exponential
        sub = (0, 1)
        if op in _REPEATS:
            low, high, body = av
            body = list(body)
            if high > 1 and not (len(body) == 1 and body[0][0] in _ONE_CHAR):
                # A repetition of more than one character class: `(a+)+`, `(a|a)+`
                # (which re's parser folds into `[aa]+`, but the regex engine does
                # not), `(\w+\s?)+`. Even harmless `(\.[a-z]+)+` is timed.
                raise _Exponential
            inner_k, inner_factor = _repeats(body)
            if high == sre.MAXREPEAT:
                sub = (inner_k + 1, inner_factor)
            else:
                sub = (inner_k, inner_factor * (high - low + 1))
        elif op is sre.SUBPATTERN:
            sub = _repeats(list(av[3]))
        elif op is sre.ATOMIC_GROUP:
            sub = _repeats(list(av))
        elif op is sre.BRANCH:
            # Alternatives are tried one after the other: their costs add up, so
            # the dearest one counts (times their number).
            costs = [_repeats(list(alt)) for alt in av[1]]
            worst = max(costs, default=(0, 1))
            sub = (worst[0], worst[1] * len(costs))
        k, factor = k + sub[0], min(factor * sub[1], FREE_STEPS)
    return k, factor


# Prefixes of an anchored pattern: more than this many alternatives are not worth it.
MAX_PREFIXES = 16


@dataclass(frozen=True)
class Prefixes:
    """The literal texts one of which every match starts with (`^(To|Cc):` ...).

    A cheap test before the search: most header rules are anchored at a field
    name, and a line of another field is ruled out without calling the engine.
    """

    texts: tuple[str, ...]
    caseless: bool
    longest: int = field(init=False, repr=False, compare=False)

    def rule_out(self, subject: str) -> bool:
        """True if no match can start this subject (a few calls into C: this runs
        once per rule per line)."""
        if not self.caseless:
            return not subject.startswith(self.texts)
        head = subject[:self.longest]
        # Only ASCII compares safely without the engine: under Unicode case
        # folding "İ" or "K" (Kelvin) may match an ASCII letter.
        return head.isascii() and not head.lower().startswith(self.texts)

    def __post_init__(self) -> None:
        object.__setattr__(self, "longest", max(len(t) for t in self.texts))


def anchored_prefixes(regex: rx.Pattern[str]) -> Prefixes | None:
    """The Prefixes of a pattern anchored at the subject's start, or None."""
    if regex.flags & rx.MULTILINE:
        return None  # ^ also matches after every newline (folded headers)
    try:
        items = list(parse(regex))
    except (re.error, RecursionError):
        return None
    if not items or (items[0] != (sre.AT, sre.AT_BEGINNING) and \
            items[0] != (sre.AT, sre.AT_BEGINNING_STRING)):
        return None
    texts = _literal_heads(items[1:])
    if not texts or not all(texts):
        return None
    caseless = bool(regex.flags & rx.IGNORECASE)
    if caseless:
        if not all(t.isascii() for t in texts):
            return None
        texts = [t.lower() for t in texts]
    return Prefixes(tuple(texts), caseless)


def _literal_heads(items: list[tuple[Any, Any]]) -> list[str]:
    """The literal starts of this sequence (alternatives multiply), as far as known."""
    heads = [""]
    for op, av in items:
        if op is sre.LITERAL:
            heads = [h + chr(av) for h in heads]
            continue
        if op is sre.SUBPATTERN and not (av[1] or av[2]):  # no local flags
            inner = list(av[3])
            if len(inner) == 1 and inner[0][0] is sre.BRANCH:
                alternatives = [_whole_literal(list(alt)) for alt in inner[0][1][1]]
            else:
                alternatives = [_whole_literal(inner)]
            if any(a is None for a in alternatives) or \
                    len(heads) * len(alternatives) > MAX_PREFIXES:
                break
            heads = [h + a for h in heads for a in alternatives if a is not None]
            continue
        break
    return heads


def _whole_literal(items: list[tuple[Any, Any]]) -> str | None:
    if all(op is sre.LITERAL for op, _ in items):
        return "".join(chr(av) for _, av in items)
    return None
