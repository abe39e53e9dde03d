"""Site policy: report mode, soft_bounce, bypass recipients, on_error."""

from __future__ import annotations

from milters.core.policy import (
    REPORT_HEADER,
    SitePolicy,
    error_verdict,
    finalize,
    finalize_stage,
    is_bypassed,
    split_reply,
)
from milters.core.verdict import (
    Action,
    EditKind,
    HeaderEdit,
    Reply,
    Verdict,
    merge,
    reject,
)


def policy(**kw: object) -> SitePolicy:
    base: dict[str, object] = {"filter_name": "checks", "mode": "enforce", "soft_bounce": False,
                               "on_error": "tempfail", "bypass_recipients": ()}
    base.update(kw)
    return SitePolicy(**base)  # type: ignore[arg-type]


def test_enforce_keeps_reject() -> None:
    v = finalize(reject(Reply("550", "5.7.1", "no")), policy(), ["a@b"])
    assert v.action is Action.REJECT and str(v.reply) == "550 5.7.1 no"


def test_reject_without_reply_gets_default() -> None:
    v = finalize(Verdict(Action.REJECT), policy())
    assert str(v.reply) == "550 5.7.1 message content rejected"


def test_soft_bounce_turns_5xx_into_4xx() -> None:
    v = finalize(reject(Reply("554", "5.7.1", "no")), policy(soft_bounce=True))
    assert v.action is Action.TEMPFAIL and str(v.reply) == "454 4.7.1 no"


def test_report_mode_changes_nothing_but_tags() -> None:
    verdict = Verdict(
        Action.REJECT, reply=Reply("550", "5.7.1", "spam"), quarantine="held",
        header_edits=(HeaderEdit(EditKind.DELETE, "X-Spam", index=1),), add_rcpts=("x@y",),
    )
    v = finalize(verdict, policy(mode="report"))
    assert v.action is Action.ACCEPT and not v.quarantine and not v.add_rcpts
    assert len(v.header_edits) == 1
    edit = v.header_edits[0]
    assert edit.name == REPORT_HEADER and "checks would reject 550 5.7.1 spam" in edit.value
    assert "delete header X-Spam[1]" in edit.value


def test_report_mode_plain_accept_untouched() -> None:
    assert finalize(Verdict(), policy(mode="report")) == Verdict()


def test_bypass_patterns() -> None:
    pats = ("postmaster@", "abuse@example.com", "example.org", ".example.net")
    assert is_bypassed("<Postmaster@any.example>", pats)
    assert is_bypassed("abuse@example.com", pats)
    assert not is_bypassed("abuse@example.org.evil", pats)
    assert is_bypassed("x@example.org", pats)
    assert is_bypassed("x@mx.example.net", pats)
    assert not is_bypassed("x@example.net", pats)


def test_all_bypassed_recipients_are_delivered_with_note() -> None:
    v = finalize(reject(), policy(bypass_recipients=("postmaster@",)), ["postmaster@a.example"])
    assert v.action is Action.ACCEPT
    assert "bypass recipient" in v.header_edits[0].value


def test_split_transaction_for_mixed_classes() -> None:
    p = policy(bypass_recipients=("postmaster@",))
    assert split_reply([], "postmaster@a", p) is None
    assert split_reply(["postmaster@a"], "user@a", p) is not None
    assert split_reply(["user@a"], "other@a", p) is None
    assert str(split_reply(["user@a"], "postmaster@a", p)).startswith("452 4.5.3")


def test_stage_report_and_bypass() -> None:
    assert finalize_stage(reject(), policy(mode="report")).action is Action.ACCEPT
    p = policy(bypass_recipients=("abuse@",))
    assert finalize_stage(reject(), p, rcpt="abuse@x").action is Action.ACCEPT
    assert finalize_stage(reject(), p, rcpt="user@x").action is Action.REJECT


def test_on_error() -> None:
    assert error_verdict(policy(), "boom").action is Action.TEMPFAIL
    assert str(error_verdict(policy(), "boom").reply).startswith("451 4.3.0")
    assert error_verdict(policy(on_error="accept"), "boom").action is Action.ACCEPT


def test_merge_early_hold_into_final() -> None:
    early = [Verdict(quarantine="client hold", reason="client"), Verdict(add_rcpts=("b@x",))]
    v = merge(early, Verdict(header_edits=(HeaderEdit(EditKind.ADD, "X", "1"),)))
    assert v.quarantine == "client hold" and v.add_rcpts == ("b@x",)
    assert v.reason == "client"


def test_report_mode_keeps_added_fields_and_holds_back_alterations() -> None:
    verdict = Verdict(header_edits=(
        HeaderEdit(EditKind.ADD, "X-Virus-Status", "Clean"),
        HeaderEdit(EditKind.INSERT, "DKIM-Signature", "v=1", index=0),
        HeaderEdit(EditKind.CHANGE, "Subject", "rewritten", index=1),
    ))
    v = finalize(verdict, policy(mode="report"))
    kinds = [(e.kind, e.name) for e in v.header_edits]
    assert (EditKind.ADD, "X-Virus-Status") in kinds
    assert (EditKind.INSERT, "DKIM-Signature") in kinds
    assert (EditKind.CHANGE, "Subject") not in kinds
    assert "change header Subject[1] to: rewritten" in v.header_edits[-1].value
    tags_only = Verdict(header_edits=(HeaderEdit(EditKind.ADD, "X-Virus-Status", "Clean"),))
    assert finalize(tags_only, policy(mode="report")) == tags_only
