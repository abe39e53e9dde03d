"""Which rules of a table key can match any line of a message, found in one pass.

Postfix tries every rule on every line: the 40 body rules of a realistic table on
the 700 lines of a 50 KB attachment are 28,000 regex searches, about 30 ms of
Python. A pattern without lookaround or absolute anchors that matches a line also
matches the lines joined by "\\n" with ^ and $ at every line, so a search of the
joined text rules a pattern out for the whole message, and the per-line pass then
tries only the rest: same result, a fraction of the work.

The joined-text search uses Hyperscan (all patterns at once, in its prefilter
mode, which may over-report but never misses a PCRE match) when the `hyperscan`
package is installed and the pattern compiles there, and Python's `re` otherwise.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

log = logging.getLogger(__name__)

hyperscan: Any
try:  # an accelerator, not a requirement: wheels exist for x86_64 Linux only
    import hyperscan
except ImportError:  # pragma: no cover - depends on the platform
    hyperscan = None

# Constructs that look past the end of a line: with them, "matches a line" no
# longer implies "matches the lines joined by \n".
_UNSCREENABLE = re.compile(r"\(\?<?[=!]|\\G")
# \A and \Z (what a POSIX `$` becomes) pin the subject's start and end, which in
# the joined text are a line's start and end: ^ and $ with MULTILINE.
_ABSOLUTE_ANCHOR = re.compile(r"(?<!\\)((?:\\\\)*)\\([AZ])")

# Fewer subjects than this: just try the rules on each.
MIN_SUBJECTS = 8


def screen_regex(regex: re.Pattern[str], negated: bool, anchored: bool) -> re.Pattern[str] | None:
    """The joined-text form of a rule's pattern, or None if it cannot be screened.

    DOTALL is dropped (regexp: tables have it on by default): the joined subjects
    hold no newline of their own, and a `.*` free to run over every line of a
    50 KB part backtracks quadratically.
    """
    if negated or anchored or _UNSCREENABLE.search(regex.pattern):
        return None
    pattern = _ABSOLUTE_ANCHOR.sub(lambda m: m.group(1) + ("^" if m.group(2) == "A" else "$"),
                                   regex.pattern)
    return re.compile(pattern, (regex.flags | re.MULTILINE) & ~re.DOTALL)


class Screener:
    """Built once per table key at load; thread-safe (scratch space per call)."""

    def __init__(self, patterns: Iterable[re.Pattern[str]], text_mode: bool,
                 accelerate: bool = True) -> None:
        self.patterns = tuple(patterns)
        self.text_mode = text_mode
        self._db: Any = None
        self._in_db: tuple[int, ...] = ()
        self._by_re: tuple[int, ...] = tuple(range(len(self.patterns)))
        if accelerate and hyperscan is not None and self.patterns:
            self._compile_hyperscan()

    def _compile_hyperscan(self) -> None:
        assert hyperscan is not None
        base = (hyperscan.HS_FLAG_MULTILINE | hyperscan.HS_FLAG_PREFILTER
                | hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_ALLOWEMPTY)
        if self.text_mode:
            base |= hyperscan.HS_FLAG_UTF8 | hyperscan.HS_FLAG_UCP
        accepted: list[int] = []
        exprs: list[bytes] = []
        flags: list[int] = []
        for i, p in enumerate(self.patterns):
            f = base
            if p.flags & re.IGNORECASE:
                f |= hyperscan.HS_FLAG_CASELESS
            expr = _expression(p, self.text_mode)
            if expr is None or not _compiles(expr, f):
                continue
            accepted.append(i)
            exprs.append(expr)
            flags.append(f)
        if not accepted:
            return
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        db.compile(expressions=exprs, ids=list(range(len(exprs))), elements=len(exprs),
                   flags=flags)
        self._db = db
        self._in_db = tuple(accepted)
        self._by_re = tuple(i for i in range(len(self.patterns)) if i not in set(accepted))

    def possible(self, subjects: Sequence[str]) -> frozenset[int] | None:
        """Indexes of the patterns that may match one of `subjects`; None: try them all."""
        if len(subjects) < MIN_SUBJECTS or any("\n" in s for s in subjects):
            # Few subjects, or folded headers (where `.` must cross the fold).
            return None
        joined = "\n".join(subjects)
        found: set[int] = set()
        by_re: Iterable[int] = self._by_re
        data = _data(joined, self.text_mode) if self._db is not None else None
        if data is None:
            by_re = range(len(self.patterns))
        else:
            assert hyperscan is not None
            hits: list[int] = []

            def on_match(i: int, start: int, end: int, flags: int, ctx: object) -> None:
                hits.append(i)

            self._db.scan(data, match_event_handler=on_match,
                          scratch=hyperscan.Scratch(self._db))
            found.update(self._in_db[i] for i in hits)
        found.update(i for i in by_re if self.patterns[i].search(joined))
        return frozenset(found)


def _expression(p: re.Pattern[str], text_mode: bool) -> bytes | None:
    pattern = p.pattern
    if p.flags & re.VERBOSE:
        pattern = "(?x)" + pattern
    try:
        return pattern.encode("utf-8" if text_mode else "latin-1")
    except UnicodeEncodeError:
        return None


def _data(joined: str, text_mode: bool) -> bytes | None:
    """The bytes Hyperscan scans; None when they would not be valid for it."""
    try:
        # Hyperscan's UTF-8 mode is undefined on invalid UTF-8 (surrogate escapes).
        return joined.encode("utf-8" if text_mode else "latin-1")
    except UnicodeEncodeError:
        return None


def _compiles(expr: bytes, flags: int) -> bool:
    assert hyperscan is not None
    try:
        hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK).compile(
            expressions=[expr], ids=[0], elements=1, flags=[flags])
    except hyperscan.error as exc:
        log.debug("pattern %r stays with re screening: %s", expr, exc)
        return False
    return True
