"""Shadow rules: watch what a new table rule would do on live mail before it acts.

A comment line `# milters: shadow` right before a rule (blank lines and other
comments may sit between) marks that rule; `# milters: shadow table` anywhere in a
file marks every rule of that file. Postfix reads both as comments, so the table
stays valid for Postfix unchanged. A marker that is followed by IF, ENDIF or
nothing is a configuration error: mark the rules inside an IF block one by one.

A shadow rule that matches changes nothing: lookup goes on as if it had not
matched (tables.py `_lookup`), so the line still meets the rules after it. Each
match is logged with the table's file:line and what the rule would have done, and
counted (`milters_checks_rule_hits{shadow="yes"}`).

Matching happens deep inside table lookups that know nothing of the message, so
the matches of one end-of-message check are collected through a context
variable: each libmilter thread has its own context, so concurrent messages never
see each other's list. Lookups outside `watch()` (the early SMTP-stage calls,
which are repeated at end of message for their effects) are not collected, so a
match is counted once per message.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from milters.core.errors import ConfigError

if TYPE_CHECKING:
    from milters.checks.tables import Rule
    from milters.core.metrics import NullMetrics
    from milters.core.verdict import Verdict

_MARKER = re.compile(r"^\s*#\s*milters:\s*shadow(?:\s+(table))?\s*$", re.IGNORECASE)
_FIRST_WORD = re.compile(r"^(\S+)")


@dataclass(frozen=True)
class Seen:
    """A shadow rule that matched: what it would have done, on what."""

    rule: Rule
    text: str  # the action's text, expanded
    subject: str


# Per-thread (per-context) list of the current check's shadow matches; None
# outside a check. A ContextVar, not module state: see the module docstring.
_current: contextvars.ContextVar[list[Seen] | None] = contextvars.ContextVar(
    "milters_checks_shadow", default=None
)


def marked_lines(text: str, path: str) -> frozenset[int] | bool:
    """Line numbers of the rules marked shadow in a table's text; True: all of them."""
    marked: set[int] = set()
    pending = 0
    for number, line in enumerate(text.splitlines(), start=1):
        m = _MARKER.match(line)
        if m:
            if m.group(1):
                return True
            pending = number
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or line[0] in " \t":
            continue  # comments, blanks and continuation lines
        if pending:
            word = _FIRST_WORD.match(stripped)
            first = word.group(1).lower() if word else ""
            if first in ("endif",) or (first.startswith("if") and not first[2:3].isalnum()):
                raise ConfigError(f"{path}:{pending}: '# milters: shadow' must come right "
                                  f"before a rule, not before {first.upper()}")
            marked.add(number)
            pending = 0
    if pending:
        raise ConfigError(f"{path}:{pending}: '# milters: shadow' with no rule after it")
    return frozenset(marked)


def is_marked(marks: frozenset[int] | bool, where: str) -> bool:
    """Is the rule at `where` (file:line) marked?"""
    if isinstance(marks, bool):
        return marks
    return int(where.rpartition(":")[2]) in marks


def saw(rule: Rule, text: str, subject: str) -> None:
    """A shadow rule matched (called from the table lookup)."""
    seen = _current.get()
    if seen is not None:
        seen.append(Seen(rule, text, subject))


@contextlib.contextmanager
def watch() -> Iterator[list[Seen]]:
    """Collect the shadow matches of the lookups in this block (one check)."""
    seen: list[Seen] = []
    token = _current.set(seen)
    try:
        yield seen
    finally:
        _current.reset(token)


def report(verdict: Verdict, seen: list[Seen], metrics: NullMetrics) -> Verdict:
    """Count the matches and add one log note each to the (unchanged) verdict."""
    if not seen:
        return verdict
    notes = []
    for s in seen:
        action = s.rule.action.kind.value
        metrics.rule_hit(_table(s.rule.source), s.rule.source, action, shadow=True)
        what = f"{action} {s.text}".strip()
        notes.append(f"shadow rule {s.rule.source} would {what}: matched "
                     f"{_shown(s.subject)}")
    return replace(verdict, log_notes=(*verdict.log_notes, *notes))


def _table(source: str) -> str:
    """The table file of a rule's file:line."""
    return source.rpartition(":")[0]


def _shown(subject: str) -> str:
    # As Postfix shows matched content: control characters as '?', 200 at most.
    return "".join("?" if ord(c) < 32 or ord(c) == 127 else c for c in subject[:200])
