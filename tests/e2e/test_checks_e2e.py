"""The `checks` filter behind real Postfix: each header_checks / body_checks / access
action as the SMTP client and the mailbox see it.

Every test starts `milters run checks` with its own tables (files in tmp_path) on a
free port and attaches it as the only smtpd milter.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import pytest

from milters import registry
from tests.e2e.filters import RunningFilter, StartFilter
from tests.e2e.postfix import PostfixInstance, Reply

SENDER = "sender@sender.example"
RCPT = "user@test.example"

ChecksFactory = Callable[..., RunningFilter]


def message(subject: str, extra_headers: str = "", body: str = "hello\r\n") -> bytes:
    return (
        f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: {subject}\r\n{extra_headers}"
        "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
        "Message-ID: <checks@sender.example>\r\n\r\n" + body
    ).encode()


@pytest.fixture
def checks(postfix: PostfixInstance, start_filter: StartFilter, tmp_path: Path) -> ChecksFactory:
    """checks(header_checks="rules", body_checks=..., recipient_checks=..., extra="")
    writes each table as a regexp: file, starts the filter and attaches it to Postfix."""

    def start(extra: str = "", **tables: str) -> RunningFilter:
        lines = ["[checks]"]
        for key, rules in tables.items():
            path = tmp_path / key
            path.write_text(rules.strip() + "\n")
            lines.append(f'{key} = ["regexp:{path}"]')
        flt = start_filter("checks", "\n".join(lines) + "\n" + extra)
        postfix.set_milters([flt.socket])
        return flt

    return start


def test_header_reject_with_custom_text_at_end_of_data(
    postfix: PostfixInstance, checks: ChecksFactory
) -> None:
    checks(header_checks="/^Subject:.*win a prize/ REJECT 5.7.1 no prizes here")
    result = postfix.send(SENDER, [RCPT], message("you win a prize"))
    assert result.rcpts[RCPT].code == 250
    assert result.data is not None
    assert (result.data.code, result.data.text) == (550, "5.7.1 no prizes here")
    assert postfix.queue_ids() == []
    # Mail that does not match still goes through the same filter.
    assert postfix.send(SENDER, [RCPT], message("a plain note")).accepted
    postfix.wait_delivered(1)


def test_header_discard_accepts_but_does_not_deliver(
    postfix: PostfixInstance, checks: ChecksFactory
) -> None:
    checks(header_checks="/^Subject:.*drop me/ DISCARD")
    result = postfix.send(SENDER, [RCPT], message("please drop me"))
    assert result.accepted, result  # the client is told it was delivered
    postfix.wait_log(rf"{result.queue_id}: milter-discard: END-OF-MESSAGE")
    # A message sent afterwards is delivered; by then the first would have been too.
    assert postfix.send(SENDER, [RCPT], message("keep me")).accepted
    delivered = postfix.wait_delivered(1)
    assert [m.get("Subject") for m in delivered] == ["keep me"]
    assert postfix.queue_ids() == []


def test_header_hold_lands_in_the_hold_queue(
    postfix: PostfixInstance, checks: ChecksFactory
) -> None:
    checks(header_checks="/^Subject:.*hold me/ HOLD")
    result = postfix.send(SENDER, [RCPT], message("please hold me"))
    assert result.accepted, result
    assert postfix.wait_held(1) == [result.queue_id]
    assert postfix.delivered() == []


def test_prepend_replace_ignore_show_in_the_delivered_file(
    postfix: PostfixInstance, checks: ChecksFactory
) -> None:
    checks(
        header_checks="""
/^Subject:.*tag me/     PREPEND X-Tagged: yes
/^X-Old-Name: (.*)/     REPLACE X-New-Name: $1
/^X-Secret:/            IGNORE
"""
    )
    sent = message("tag me", "X-Old-Name: kept value\r\nX-Secret: hunter2\r\nX-Other: stays\r\n")
    assert postfix.send(SENDER, [RCPT], sent).accepted
    [msg] = postfix.wait_delivered(1)
    names = msg.header_names
    # PREPEND inserts right before the matched header, as Postfix does.
    assert names[names.index("Subject") - 1] == "X-Tagged"
    assert msg.get("X-Tagged") == "yes"
    # REPLACE keeps the position.
    assert msg.get_all("X-Old-Name") == []
    assert msg.get("X-New-Name") == "kept value"
    assert names.index("X-New-Name") == names.index("Subject") + 1
    assert msg.get_all("X-Secret") == []
    assert msg.get("X-Other") == "stays"


def test_redirect_changes_the_recipient(postfix: PostfixInstance, checks: ChecksFactory) -> None:
    checks(header_checks="/^Subject:.*redirect me/ REDIRECT other@test.example")
    assert postfix.send(SENDER, [RCPT], message("please redirect me")).accepted
    [msg] = postfix.wait_delivered(1)
    assert msg.delivered_to == "other@test.example"
    postfix.wait_queue_empty()
    assert len(postfix.delivered()) == 1


def test_recipient_reject_refuses_only_that_recipient(
    postfix: PostfixInstance, checks: ChecksFactory
) -> None:
    checks(recipient_checks=r"/^blocked@test\.example$/ REJECT no mail for blocked")
    result = postfix.send(SENDER, ["blocked@test.example", RCPT], message("two recipients"))
    # The reply Postfix's own check_recipient_access gives for the same rule.
    assert result.rcpts["blocked@test.example"] == Reply(
        554, "5.7.1 <blocked@test.example>: Recipient address rejected: no mail for blocked"
    )
    assert result.rcpts[RCPT].code == 250
    assert result.accepted, result
    [msg] = postfix.wait_delivered(1)
    assert msg.delivered_to == RCPT


def test_decoded_body_rule_matches_a_base64_body(
    postfix: PostfixInstance, checks: ChecksFactory
) -> None:
    checks(body_checks="/forbidden phrase/ REJECT 5.7.1 body rejected")
    text = "This line carries the forbidden phrase somewhere.\r\n"
    encoded = base64.encodebytes(text.encode()).decode().replace("\n", "\r\n")
    headers = (
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n"
        "Content-Transfer-Encoding: base64\r\n"
    )
    assert "forbidden" not in encoded  # Postfix's own body_checks would not see it
    result = postfix.send(SENDER, [RCPT], message("encoded", headers, encoded))
    assert result.data is not None
    assert (result.data.code, result.data.text) == (550, "5.7.1 body rejected")


def test_report_mode_delivers_with_report_header(
    postfix: PostfixInstance, checks: ChecksFactory
) -> None:
    checks(
        header_checks="/^Subject:.*win a prize/ REJECT 5.7.1 no prizes here",
        extra='mode = "report"\n',
    )
    result = postfix.send(SENDER, [RCPT], message("you win a prize"))
    assert result.accepted, result
    [msg] = postfix.wait_delivered(1)
    reports = msg.get_all("X-Milters-Report")
    assert reports, msg.raw.decode(errors="replace")
    assert "reject" in reports[0].lower()


def test_filter_down_tempfails(postfix: PostfixInstance, checks: ChecksFactory) -> None:
    flt = checks(header_checks="/^Subject:.*win a prize/ REJECT")
    assert postfix.send(SENDER, [RCPT], message("before")).accepted
    flt.process.kill()
    result = postfix.send(SENDER, [RCPT], message("after"))
    assert not result.accepted
    assert result.mail is not None
    assert (result.mail.code, result.mail.enhanced) == (451, "4.7.1"), result


def test_forged_authentication_results_with_our_id_are_removed(
    postfix: PostfixInstance, checks: ChecksFactory
) -> None:
    """RFC 8601 §5: the first of our filters removes incoming fields that claim our
    authserv-id (checks is the only enabled, hence first, filter here); others stay."""
    others = "".join(f"[{n}]\nenabled = false\n" for n in registry.FILTERS if n != "checks")
    checks(extra='[global]\nauthserv_id = "mx.test.example"\n' + others)
    forged = ("Authentication-Results: mx.test.example; dmarc=pass header.from=bank.example\r\n"
              "Authentication-Results: other.example; spf=pass smtp.mailfrom=x@other.example\r\n")
    assert postfix.send(SENDER, [RCPT], message("forged", forged)).accepted
    (delivered,) = postfix.wait_delivered(1)
    fields = delivered.get_all("Authentication-Results") or []
    assert [" ".join(f.split()) for f in fields] == [
        "other.example; spf=pass smtp.mailfrom=x@other.example"]
