"""core/plan.py: verdicts become the milter operations Postfix needs, and
PostfixHeader applies them as Postfix does (the facts pinned in
tests/e2e/test_postfix_milter_facts.py, replayed here without Postfix)."""

from __future__ import annotations

from milters.core.model import Header
from milters.core.plan import HeaderOp, OpKind, Plan, PostfixHeader, make_plan
from milters.core.verdict import ABOVE_RECEIVED, AuthResult, EditKind, HeaderEdit, Verdict

SEEN = ["From", "To", "Received", "Subject", "X-Dup", "X-Dup", "X-Dup", "Date"]


def headers(names: list[str] = SEEN) -> list[Header]:
    values = {"X-Dup": iter([b" one", b" two", b" three"])}
    return [Header(n, next(values[n]) if n in values else b" v") for n in names]


def names(h: PostfixHeader) -> list[str]:
    return [f.name for f in h.visible()]


def test_insert_zero_is_above_postfix_received_and_one_below_it() -> None:
    h = PostfixHeader(headers())
    h.apply([HeaderOp(OpKind.INSERT, "X-Below", "b", 1), HeaderOp(OpKind.INSERT, "X-Top", "t", 0)])
    assert names(h)[:2] == ["X-Top", "X-Below"]
    # Position 1 now is between X-Top and Postfix's hidden Received.
    h.apply([HeaderOp(OpKind.INSERT, "X-Mid", "m", 1)])
    assert names(h)[:3] == ["X-Top", "X-Mid", "X-Below"]


def test_insert_past_the_end_appends() -> None:
    h = PostfixHeader(headers())
    h.apply([HeaderOp(OpKind.INSERT, "X-Ins", "x", 99)])
    assert names(h) == [*SEEN, "X-Ins"]


def test_change_counts_the_header_as_edited_and_past_the_count_adds() -> None:
    h = PostfixHeader(headers())
    h.apply([HeaderOp(OpKind.DELETE, "X-Dup", index=1),
             HeaderOp(OpKind.CHANGE, "x-dup", "new", 1),
             HeaderOp(OpKind.CHANGE, "X-Dup", "five", 5)])
    dups = [f.value for f in h.visible() if f.name.lower() == "x-dup"]
    assert dups == [b" new", b" three", b" five"]
    h.apply([HeaderOp(OpKind.DELETE, "X-Nothing", index=1)])  # nothing to delete: no-op
    assert len(h.visible()) == len(SEEN)


def test_plan_shifts_occurrences_below_inserted_fields_of_the_same_name() -> None:
    verdict = Verdict(header_edits=(
        HeaderEdit(EditKind.INSERT, "X-Dup", "inserted", 0),
        HeaderEdit(EditKind.CHANGE, "X-Dup", "changed", 2),
    ))
    plan = make_plan(verdict, headers(), "mx.test.example")
    h = PostfixHeader(headers())
    h.apply(plan.header_ops)
    assert [f.value for f in h.visible() if f.name == "X-Dup"] == [
        b" inserted", b" one", b" changed", b" three"]


def test_plan_removes_forged_fields_before_putting_ours_on_top() -> None:
    names_ = ["Authentication-Results", "From", "Authentication-Results", "Subject"]
    seen = [Header(n, b" forged" if n.startswith("Auth") else b" v") for n in names_]
    verdict = Verdict(results=(AuthResult("dkim", "pass"),))
    plan = make_plan(verdict, seen, "mx.test.example", forged=[1, 2])
    h = PostfixHeader(seen)
    h.apply(plan.header_ops)
    assert names(h) == ["Authentication-Results", "From", "Subject"]
    assert h.visible()[0].value == b" mx.test.example; dkim=pass"
    assert plan.header_ops[-1].index == ABOVE_RECEIVED + 1


def test_then_keeps_order_and_the_last_body() -> None:
    a = Plan((HeaderOp(OpKind.APPEND, "A", "1"),), add_rcpts=("x@a",), replace_body=b"1")
    b = Plan((HeaderOp(OpKind.APPEND, "B", "2"),), quarantine="held")
    both = a.then(b)
    assert [op.name for op in both.header_ops] == ["A", "B"]
    assert both.replace_body == b"1" and both.quarantine == "held"
    assert a.then(Plan(replace_body=b"2")).replace_body == b"2"
    assert Plan().empty and not both.empty
