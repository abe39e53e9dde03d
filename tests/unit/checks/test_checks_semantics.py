"""Postfix 3.7 header/body checks semantics, one test (or more) per item of
shared/notes/postfix-checks-semantics.md, numbered as there."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest

from milters.checks import ChecksFilter
from milters.core.model import Transaction
from milters.core.verdict import Action, EditKind, HeaderEdit, Reply

Table = Callable[..., str]
Checks = Callable[..., ChecksFilter]
Message = Callable[..., Transaction]

MULTIPART = (
    b"Subject: test\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"BB\"\r\n\r\n"
    b"preamble\r\n"
    b"--BB\r\nContent-Type: text/plain; charset=us-ascii\r\nX-Part: one\r\n\r\nhello part\r\n"
    b"--BB\r\nContent-Type: message/rfc822\r\n\r\n"
    b"Subject: inner subject\r\nFrom: inner@example.net\r\nContent-Type: text/plain\r\n\r\n"
    b"inner body\r\n"
    b"--BB--\r\nepilogue\r\n"
)


# 1. Case-insensitive by default, `i` toggles.
def test_1_case_insensitive_default_and_i_flag(table: Table, checks: Checks,
                                               message: Message) -> None:
    f = checks(header_checks=(table("/^subject: BUY NOW/ REJECT\n/^x-sens: ABC/i DISCARD\n"),))
    assert f.check(message(raw=b"Subject: buy now\r\n\r\n")).action is Action.REJECT
    assert f.check(message(raw=b"x-sens: abc\r\n\r\n")).action is Action.ACCEPT
    assert f.check(message(raw=b"x-sens: ABC\r\n\r\n")).action is Action.DISCARD


# 2. REJECT reply codes.
@pytest.mark.parametrize(("rule", "reply"), [
    ("REJECT", Reply("550", "5.7.1", "message content rejected")),
    ("REJECT go away", Reply("550", "5.7.1", "go away")),
    ("REJECT 5.7.0 text", Reply("550", "5.7.0", "text")),
    ("REJECT 4.7.1 text", Reply("451", "4.7.1", "text")),
])
def test_2_reject_replies(rule: str, reply: Reply, table: Table, checks: Checks,
                          message: Message) -> None:
    f = checks(header_checks=(table(f"/^Subject:/ {rule}\n"),))
    v = f.check(message(raw=b"Subject: x\r\n\r\n"))
    assert v.reply == reply
    assert v.action is (Action.TEMPFAIL if reply.temporary else Action.REJECT)


# 3. DEFER and NNN are our extension in content checks.
@pytest.mark.parametrize(("rule", "action", "reply"), [
    ("DEFER", Action.TEMPFAIL, Reply("450", "4.7.1", "message content deferred")),
    ("DEFER try later", Action.TEMPFAIL, Reply("450", "4.7.1", "try later")),
    ("421 4.3.2 closing", Action.TEMPFAIL, Reply("421", "4.3.2", "closing")),
    ("554 no thanks", Action.REJECT, Reply("554", "5.7.1", "no thanks")),
])
def test_3_defer_and_numeric_replies(rule: str, action: Action, reply: Reply, table: Table,
                                     checks: Checks, message: Message) -> None:
    # Postfix 3.7 ignores these in body_checks ("unknown command"); ours is opt-in.
    f = checks(body_checks=(table(f"/bad/ {rule}\n", "pcre"),), access_style_actions=True)
    v = f.check(message(raw=b"Subject: x\r\n\r\nsome bad line\r\n"))
    assert (v.action, v.reply) == (action, reply)
    f = checks(body_checks=(table(f"/bad/ {rule}\n", "pcre"),))
    v = f.check(message(raw=b"Subject: x\r\n\r\nsome bad line\r\n"))
    assert (v.action, v.reply) == (Action.ACCEPT, None)
    assert any("unknown command in body_checks map" in n for n in v.log_notes)


# 4. A lone $: Postfix skips the rule with "bad replacement syntax"; so do we.
def test_4_lone_dollar_skipped_with_file_and_line(table: Table, checks: Checks,
                                                  message: Message) -> None:
    spec = table("/^Subject: ok/ WARN\n/^Subject: price/ REJECT costs 5 $ only\n", "pcre")
    f = checks(header_checks=(spec,))
    (warning,) = f.load_warnings()
    assert f"{spec.split(':', 1)[1]}:2:" in warning and "bad replacement syntax" in warning
    assert f.check(message(raw=b"Subject: price\r\n\r\n")).action is Action.ACCEPT


def test_4_pcre_substitution_in_reply(table: Table, checks: Checks, message: Message) -> None:
    f = checks(header_checks=(table("/^X-Mailer: (\\w+)/ REJECT mailer $1 refused\n", "pcre"),))
    v = f.check(message(raw=b"X-Mailer: Spamtool 2.0\r\n\r\n"))
    assert v.reply == Reply("550", "5.7.1", "mailer Spamtool refused")


# 5. Which actions end checking.
def test_5_redirect_stops_all_later_checks(table: Table, checks: Checks, message: Message) -> None:
    f = checks(header_checks=(table("/^Subject:/ REDIRECT trap@example.jp\n/^From:/ REJECT\n"),),
               body_checks=(table("/body/ REJECT\n"),))
    v = f.check(message(raw=b"Subject: x\r\nFrom: a@b\r\n\r\nbody\r\n", rcpt_to=("u@x", "v@y")))
    assert v.action is Action.ACCEPT
    assert v.add_rcpts == ("trap@example.jp",) and v.del_rcpts == ("u@x", "v@y")


def test_5_bcc_then_redirect_drops_bcc(table: Table, checks: Checks, message: Message) -> None:
    f = checks(header_checks=(table("/^From:/ BCC copy@example.jp\n/^Subject:/ REDIRECT t@x\n"),))
    v = f.check(message(raw=b"From: a@b\r\nSubject: s\r\n\r\n"))
    assert v.add_rcpts == ("t@x",)
    only_bcc = f.check(message(raw=b"From: a@b\r\n\r\n"))
    assert only_bcc.add_rcpts == ("copy@example.jp",) and only_bcc.del_rcpts == ()


def test_5_hold_does_not_stop_checking(table: Table, checks: Checks, message: Message) -> None:
    f = checks(header_checks=(table("/^X-Hold:/ HOLD look at it\n/^X-Rej:/ REJECT\n"
                                    "/^X-Dis:/ DISCARD\n"),))
    held = f.check(message(raw=b"X-Hold: 1\r\n\r\n"))
    assert held.action is Action.ACCEPT and held.quarantine == "look at it"
    assert f.check(message(raw=b"X-Hold: 1\r\nX-Rej: 1\r\n\r\n")).action is Action.REJECT
    assert f.check(message(raw=b"X-Hold: 1\r\nX-Dis: 1\r\n\r\n")).action is Action.DISCARD


def test_5_first_terminal_action_wins(table: Table, checks: Checks, message: Message) -> None:
    f = checks(header_checks=(table("/^X-Dis:/ DISCARD\n/^X-Rej:/ REJECT\n"),))
    assert f.check(message(raw=b"X-Dis: 1\r\nX-Rej: 1\r\n\r\n")).action is Action.DISCARD
    assert f.check(message(raw=b"X-Rej: 1\r\nX-Dis: 1\r\n\r\n")).action is Action.REJECT


def test_5_each_line_checked_on_its_own(table: Table, checks: Checks, message: Message) -> None:
    f = checks(header_checks=(table("/^X-Warn:/ WARN w\n/^X-Bcc: (.*)/ BCC $1\n"),))
    v = f.check(message(raw=b"X-Warn: 1\r\nX-Bcc: a@x\r\nX-Warn: 2\r\nX-Bcc: b@x\r\n\r\n"))
    assert v.add_rcpts == ("a@x", "b@x") and sum("warning:" in n for n in v.log_notes) == 2


# 6. Folded headers keep their line break.
def test_6_folded_header_matching(table: Table, checks: Checks, message: Message) -> None:
    f = checks(header_checks=(table(
        "/^Subject: a b/ REJECT space\n/^Subject: a\\s+b/ DISCARD ws\n"), ))
    tx = message(headers=[("Subject", b" a\n b")])
    assert f.check(tx).action is Action.DISCARD
    g = checks(header_checks=(table("/^Subject: a.*b/ REJECT\n"),))
    assert g.check(message(headers=[("Subject", b" a\n\tb")])).action is Action.REJECT
    m = checks(header_checks=(table("/^Subject: a$/m REJECT\n/^Subject: a$/ DISCARD\n"),))
    assert m.check(message(headers=[("Subject", b" a\n b")])).action is Action.REJECT


# 7. Spacing exactly as sent.
def test_7_spacing_as_sent(table: Table, checks: Checks, message: Message) -> None:
    f = checks(header_checks=(table("/^Subject: x/ REJECT\n"),))
    assert f.check(message(headers=[("Subject", b"x")])).action is Action.ACCEPT
    assert f.check(message(headers=[("Subject", b"  x")])).action is Action.ACCEPT
    assert f.check(message(headers=[("Subject", b" x")])).action is Action.REJECT


# 8. Routing of MIME, part and nested headers.
def test_8_mime_headers_go_to_mime_header_checks_when_set(
    table: Table, checks: Checks, message: Message
) -> None:
    header = table("/^Content-Type:/ REJECT via header_checks\n")
    f = checks(header_checks=(header,))  # default: $header_checks
    assert f.check(message(raw=b"Content-Type: text/plain\r\n\r\nx\r\n")).action is Action.REJECT
    g = checks(header_checks=(header,), mime_header_checks=(table("/^X-Nothing:/ WARN\n"),))
    assert g.check(message(raw=b"Content-Type: text/plain\r\n\r\nx\r\n")).action is Action.ACCEPT
    h = checks(header_checks=(header,), mime_header_checks=(table("/^Content-Type:/ DISCARD\n"),))
    assert h.check(message(raw=b"Content-Type: text/plain\r\n\r\nx\r\n")).action is Action.DISCARD


def test_8_part_and_nested_headers(table: Table, checks: Checks, message: Message) -> None:
    primary_only = checks(header_checks=(table("/^Subject: inner/ REJECT\n"),),
                          nested_header_checks=())
    assert primary_only.check(message(raw=MULTIPART)).action is Action.ACCEPT
    nested = checks(nested_header_checks=(table("/^Subject: inner/ REJECT nested\n"),))
    assert nested.check(message(raw=MULTIPART)).reply == Reply("550", "5.7.1", "nested")
    # The attached message's MIME headers go to mime_header_checks, not nested.
    n2 = checks(nested_header_checks=(table("/^Content-Type: text\\/plain$/ REJECT\n"),))
    assert n2.check(message(raw=MULTIPART)).action is Action.ACCEPT
    mime = checks(mime_header_checks=(table("/^X-Part: one/ REJECT part\n"),))
    assert mime.check(message(raw=MULTIPART)).reply == Reply("550", "5.7.1", "part")
    default = checks(header_checks=(table("/^X-Part: one/ REJECT\n"),))  # $header_checks
    assert default.check(message(raw=MULTIPART)).action is Action.REJECT


# 9. Edits: headers by milter header actions, body and part headers by body replacement.
def test_9_primary_header_edits(table: Table, checks: Checks, message: Message) -> None:
    f = checks(header_checks=(table(
        "/^X-Drop:/ IGNORE\n/^X-Old: (.*)/ REPLACE X-New: $1\n"
        "/^X-Same: (.*)/ REPLACE X-Same: <$1>\n/^Subject:/ PREPEND X-Seen: yes\n"
        "/^X-Bad:/ PREPEND not a header\n", "pcre"),))
    tx = message(raw=b"X-Drop: a\r\nX-Drop: b\r\nX-Old: v\r\nX-Same: s\r\nSubject: t\r\n"
                     b"X-Bad: 1\r\n\r\n")
    v = f.check(tx)
    assert v.header_edits == (
        HeaderEdit(EditKind.DELETE, "X-Drop", "", 1),
        HeaderEdit(EditKind.DELETE, "X-Drop", "", 2),
        HeaderEdit(EditKind.INSERT, "X-New", "v", 2),
        HeaderEdit(EditKind.DELETE, "X-Old", "", 1),
        HeaderEdit(EditKind.CHANGE, "X-Same", "<s>", 1),
        HeaderEdit(EditKind.INSERT, "X-Seen", "yes", 4),
    )
    assert any("not a header line" in n for n in v.log_notes)


def test_9_part_header_and_body_edits_replace_the_body(
    table: Table, checks: Checks, message: Message
) -> None:
    f = checks(mime_header_checks=(table("/^X-Part:/ REPLACE X-Part: two\n"),),
               nested_header_checks=(table("/^From:/ IGNORE\n"),),
               body_checks=(table("/^hello (.*)/ REPLACE bye $1\n/^epilogue/ PREPEND before\n"
                                  "/^preamble/ IGNORE\n", "pcre"),),
               decode=False)
    v = f.check(message(raw=MULTIPART))
    assert v.replace_body is not None
    body = v.replace_body
    assert b"X-Part: two\r\n" in body and b"X-Part: one" not in body
    assert b"From: inner@example.net" not in body and b"Subject: inner subject" in body
    assert b"bye part\r\n" in body and b"before\r\nepilogue\r\n" in body
    assert not body.startswith(b"preamble")


# 10. Raw matching (decode = false): encoded text, boundaries as body lines.
def test_10_raw_body_sees_encoded_text_and_boundaries(
    table: Table, checks: Checks, message: Message
) -> None:
    spam = base64.b64encode(b"buy viagra now").decode()
    rules = table(f"/viagra/ REJECT decoded\n/^{spam}$/ DISCARD encoded\n/^--BB$/ WARN boundary\n")
    raw = (b"Content-Type: multipart/mixed; boundary=BB\r\n\r\n--BB\r\n"
           b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + spam.encode() + b"\r\n--BB--\r\n")
    v = checks(body_checks=(rules,), decode=False).check(message(raw=raw))
    assert v.action is Action.DISCARD and any("boundary" in n for n in v.log_notes)
    assert checks(body_checks=(rules,)).check(message(raw=raw)).action is Action.REJECT


def test_10_qp_soft_break_splits_a_word_only_raw(
    table: Table, checks: Checks, message: Message
) -> None:
    raw = (b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
           b"cheap via=\r\ngra here\r\n")
    rules = (table("/viagra/ REJECT\n"),)
    assert checks(body_checks=rules, decode=False).check(message(raw=raw)).action is Action.ACCEPT
    assert checks(body_checks=rules).check(message(raw=raw)).action is Action.REJECT


# 11. body_checks_size_limit per MIME part.
def test_11_size_limit_applies_per_part(table: Table, checks: Checks, message: Message) -> None:
    filler = b"x" * 99 + b"\r\n"
    part = b"--B\r\nContent-Type: application/octet-stream\r\n\r\n" + filler * 3
    raw = (b"Content-Type: multipart/mixed; boundary=B\r\n\r\n" + part + part
           + b"--B\r\nContent-Type: application/octet-stream\r\n\r\n" + filler * 3
           + b"marker late\r\n--B--\r\n")
    rules = (table("/^marker/ REJECT\n"),)
    assert checks(body_checks=rules, body_checks_size_limit=250).check(
        message(raw=raw)).action is Action.ACCEPT
    assert checks(body_checks=rules, body_checks_size_limit=350).check(
        message(raw=raw)).action is Action.REJECT  # 300 bytes into its part, not the message
    assert checks(body_checks=rules, body_checks_size_limit=0).check(
        message(raw=raw)).action is Action.REJECT


# 12. Long lines in 2048-byte pieces.
def test_12_long_line_pieces(table: Table, checks: Checks, message: Message) -> None:
    f = checks(body_checks=(table("/^marker/ REJECT\n"),), decode=False)
    assert f.check(message(raw=b"S: x\r\n\r\n" + b"a" * 2048 + b"marker\r\n")).action \
        is Action.REJECT
    assert f.check(message(raw=b"S: x\r\n\r\n" + b"a" * 2047 + b"marker\r\n")).action \
        is Action.ACCEPT


# 13. Return-Path in the message is checked.
def test_13_return_path_checked(table: Table, checks: Checks, message: Message) -> None:
    f = checks(header_checks=(table("/^Return-Path: <spam@/ REJECT\n"),))
    assert f.check(message(raw=b"Return-Path: <spam@x>\r\n\r\n")).action is Action.REJECT


# 14. WARN and INFO log, change nothing.
def test_14_warn_info_log_like_postfix(table: Table, checks: Checks, message: Message) -> None:
    f = checks(header_checks=(table("/^Subject:/ WARN look\n/^X-Info:/ INFO\n"),))
    long_value = b" a\n\tb" + b"c" * 300
    v = f.check(message(headers=[("Subject", long_value), ("X-Info", b" 1")]))
    assert v.action is Action.ACCEPT and v.header_edits == () and v.replace_body is None
    warn = next(n for n in v.log_notes if n.startswith("warning:"))
    assert "header Subject: a??bccc" in warn and warn.endswith(": look")
    shown = warn.split("header ", 1)[1].split(" from ", 1)[0]
    assert len(shown) == 200
    assert any(n.startswith("info: header X-Info: 1 from mail.example.org[192.0.2.1]")
               for n in v.log_notes)


def test_ok_and_dunno_stop_the_line_only(table: Table, checks: Checks, message: Message) -> None:
    f = checks(header_checks=(table("/^Subject: fine/ OK\n/^Subject:/ REJECT\n"),))
    assert f.check(message(raw=b"Subject: fine\r\n\r\n")).action is Action.ACCEPT
    assert f.check(message(raw=b"Subject: fine\r\nSubject: bad\r\n\r\n")).action is Action.REJECT


def test_pass_skips_the_rest_of_the_message(table: Table, checks: Checks,
                                            message: Message) -> None:
    f = checks(header_checks=(table("/^X-Trusted:/ PASS\n/^Subject:/ REJECT\n"),))
    assert f.check(message(raw=b"X-Trusted: 1\r\nSubject: x\r\n\r\n")).action is Action.ACCEPT
