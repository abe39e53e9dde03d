"""Holds handed on to the last filter of the chain (core/hold.py)."""

from __future__ import annotations

from milters.core.hold import FIELD_NAME, hand_on
from milters.core.model import Header
from milters.core.verdict import Action, EditKind, HeaderEdit, Verdict, reject

ID = "mx.test.example"
HELD = Verdict(quarantine="dmarc p=quarantine")


def mark(value: str) -> Header:
    return Header(FIELD_NAME, f" {value}".encode())


def test_a_filter_before_others_marks_instead_of_holding() -> None:
    v = hand_on(HELD, [], "dmarc", ID, first=False, last=False)
    assert v.quarantine == ""
    assert v.header_edits == (
        HeaderEdit(EditKind.ADD, FIELD_NAME, f"{ID}; dmarc: dmarc p=quarantine"),)


def test_the_last_filter_holds_with_every_reason_and_removes_the_marks() -> None:
    headers = [mark(f"{ID}; dmarc: p=quarantine"), Header("Subject", b" x"),
               mark(f"{ID.upper()}.; clamav: virus X")]
    v = hand_on(Verdict(quarantine="checks HOLD"), headers, "checks", ID, False, True)
    assert v.quarantine == "dmarc: p=quarantine; clamav: virus X; checks HOLD"
    assert {(e.kind, e.index) for e in v.header_edits} == {(EditKind.DELETE, 1),
                                                           (EditKind.DELETE, 2)}
    v = hand_on(Verdict(), headers[:1], "checks", ID, False, True)
    assert v.quarantine == "dmarc: p=quarantine"


def test_a_refusal_beats_a_hold() -> None:
    v = hand_on(reject(), [mark(f"{ID}; dmarc: p=quarantine")], "checks", ID, False, True)
    assert v.action is Action.REJECT and v.quarantine == ""


def test_marks_from_outside_are_removed_by_the_first_filter_and_never_hold() -> None:
    forged = [mark(f"{ID}; dmarc: forged"), mark("other.example; x: y")]
    v = hand_on(Verdict(), forged, "dkim", ID, first=True, last=False)
    assert [(e.kind, e.index) for e in v.header_edits] == [(EditKind.DELETE, 1),
                                                           (EditKind.DELETE, 2)]
    assert v.quarantine == ""
    # Alone (first and last): removed, and only our own hold applies.
    v = hand_on(HELD, forged, "dmarc", ID, first=True, last=True)
    assert v.quarantine == "dmarc p=quarantine" and len(v.header_edits) == 2


def test_a_foreign_id_is_not_a_reason_to_hold() -> None:
    v = hand_on(Verdict(), [mark("other.example; dmarc: x")], "checks", ID, False, True)
    assert v.quarantine == "" and [e.kind for e in v.header_edits] == [EditKind.DELETE]
