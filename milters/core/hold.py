"""A hold (Postfix quarantine) is asked for by the last filter of ours in the chain.

Postfix sends the end of a message to no later milter once one has asked for
quarantine (pinned in tests/e2e/test_postfix_milter_facts.py). If dmarc held a
p=quarantine message itself, clamav and checks would never scan it, and
`postsuper -H` would release it unscanned. So a filter that wants a hold while
filters of ours follow it (Env.downstream) leaves a mark instead, an
`X-Milters-Hold: <authserv-id>; <filter>: <reason>` field, and goes on; the last
filter removes every mark and asks for the hold with their reasons (its own
included), unless a refusal decided the message first: a virus or a checks
REJECT still rejects a message dmarc wanted held.

Marks cannot be forged: the first filter of ours removes every incoming field of
that name (as it removes forged Authentication-Results fields), and the last one
removes the marks before delivery.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from milters.core.authresults import normalize_id
from milters.core.model import Header
from milters.core.verdict import Action, EditKind, HeaderEdit, Verdict

FIELD_NAME = "X-Milters-Hold"


def _marks(headers: Sequence[Header], authserv_id: str) -> tuple[list[int], list[str]]:
    """(1-based occurrences of every mark field, reasons of those that are ours)."""
    ours = normalize_id(authserv_id)
    occurrences: list[int] = []
    reasons: list[str] = []
    for h in headers:
        if h.name.lower() != FIELD_NAME.lower():
            continue
        occurrences.append(len(occurrences) + 1)
        text = " ".join(h.value.decode("utf-8", "replace").split())
        ident, _, reason = text.partition(";")
        if normalize_id(ident) == ours and reason.strip():
            reasons.append(reason.strip())
    return occurrences, reasons


def hand_on(verdict: Verdict, headers: Sequence[Header], filter_name: str,
            authserv_id: str, first: bool, last: bool) -> Verdict:
    """The verdict with holds handed on down the chain (see the module docstring).

    `first`: no filter of ours runs before this one, so every incoming mark is
    forged. `last`: none runs after it, so this one applies the holds.
    """
    if first or last:
        occurrences, reasons = _marks(headers, authserv_id)
        if first:
            reasons = []  # nothing of ours ran before: every mark came from outside
        if occurrences:
            verdict = _deleting(verdict, occurrences)
        if last:
            if reasons and verdict.action is Action.ACCEPT:  # a refusal beats a hold
                held = "; ".join([*reasons, *filter(None, [verdict.quarantine])])
                verdict = replace(verdict, quarantine=held[:200])
            return verdict
    if verdict.quarantine and verdict.action is Action.ACCEPT:
        mark = HeaderEdit(EditKind.ADD, FIELD_NAME,
                          f"{authserv_id}; {filter_name}: {verdict.quarantine}")
        return replace(verdict, quarantine="",
                       header_edits=(*verdict.header_edits, mark),
                       log_notes=(*verdict.log_notes,
                                  f"hold handed on to the last filter ({verdict.quarantine})"))
    return verdict


def _deleting(verdict: Verdict, occurrences: list[int]) -> Verdict:
    deletes = tuple(HeaderEdit(EditKind.DELETE, FIELD_NAME, index=i) for i in occurrences)
    return replace(verdict, header_edits=(*verdict.header_edits, *deletes))
