"""decode = true: encoded words, text parts in their charset, file names, re-encoding."""

from __future__ import annotations

import base64
import email
import email.policy
from collections.abc import Callable

from milters.checks import ChecksFilter
from milters.core.model import Transaction
from milters.core.verdict import Action, EditKind, Reply

Table = Callable[..., str]
Checks = Callable[..., ChecksFilter]
Message = Callable[..., Transaction]


def b64_word(text: str, charset: str) -> str:
    return f"=?{charset}?B?{base64.b64encode(text.encode(charset)).decode()}?="


def part(ctype: str, cte: str, payload: bytes, extra: str = "") -> bytes:
    head = f"Content-Type: {ctype}\r\nContent-Transfer-Encoding: {cte}\r\n{extra}\r\n"
    return b"--XX\r\n" + head.encode() + payload + b"\r\n"


def multipart(*parts: bytes) -> bytes:
    return (b"Subject: t\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n"
            b"\r\n" + b"".join(parts) + b"--XX--\r\n")


def b64_lines(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n").rstrip(b"\r\n")


def test_iso_2022_jp_subject_matches_utf8_rule(table: Table, checks: Checks,
                                               message: Message) -> None:
    f = checks(header_checks=(table("/^Subject: .*未承諾広告/ REJECT ad\n"),))
    subject = b64_word("※未承諾広告※ お得な情報", "iso-2022-jp")
    v = f.check(message(raw=f"Subject: {subject}\r\n\r\nx\r\n".encode()))
    assert v.reply == Reply("550", "5.7.1", "ad")
    raw = checks(header_checks=f.checks.header_checks, decode=False)
    assert raw.check(message(raw=f"Subject: {subject}\r\n\r\nx\r\n".encode())).action \
        is Action.ACCEPT


def test_split_encoded_words_are_joined(table: Table, checks: Checks, message: Message) -> None:
    f = checks(header_checks=(table("/^Subject: 日本語テスト$/ REJECT\n"),))
    data = "日本語テスト".encode()
    w1 = f"=?UTF-8?B?{base64.b64encode(data[:4]).decode()}?="  # splits a character
    w2 = f"=?UTF-8?B?{base64.b64encode(data[4:]).decode()}?="
    tx = message(headers=[("Subject", f" {w1}\n {w2}".encode())])
    assert f.check(tx).action is Action.REJECT


def test_base64_shift_jis_body_matches(table: Table, checks: Checks, message: Message) -> None:
    f = checks(body_checks=(table("/出会い系サイト/ REJECT body\n", "pcre"),))
    text = "こんにちは。\r\n出会い系サイトのご案内です。\r\n".encode("shift_jis")
    raw = multipart(part("text/plain; charset=Shift_JIS", "base64", b64_lines(text)))
    assert f.check(message(raw=raw)).reply == Reply("550", "5.7.1", "body")


def test_quoted_printable_iso_8859_1(table: Table, checks: Checks, message: Message) -> None:
    f = checks(body_checks=(table("/très cher/ REJECT\n"),))
    qp = b"c'est tr=E8s cher, vraiment tr=\r\n=E8s"
    raw = (b"Content-Type: text/plain; charset=ISO-8859-1\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + qp + b"\r\n")
    assert f.check(message(raw=raw)).action is Action.REJECT


def test_latin1_encoded_word_header(table: Table, checks: Checks, message: Message) -> None:
    f = checks(header_checks=(table("/^From: José/ REJECT\n"),))
    tx = message(headers=[("From", b" =?iso-8859-1?q?Jos=E9?= <j@x>")])
    assert f.check(tx).action is Action.REJECT


def test_euc_jp_eight_bit_part(table: Table, checks: Checks, message: Message) -> None:
    f = checks(body_checks=(table("/振り込み/ REJECT\n"),))
    raw = multipart(part("text/plain; charset=EUC-JP", "8bit", "至急振り込みを".encode("euc_jp")))
    assert f.check(message(raw=raw)).action is Action.REJECT


def test_attachments_are_not_decoded(table: Table, checks: Checks, message: Message) -> None:
    f = checks(body_checks=(table("/secret phrase/ REJECT\n"),))
    raw = multipart(part("application/octet-stream", "base64", b64_lines(b"secret phrase")))
    assert f.check(message(raw=raw)).action is Action.ACCEPT


def test_unknown_charset_falls_back_to_raw_and_is_noted(
    table: Table, checks: Checks, message: Message
) -> None:
    f = checks(body_checks=(table("/plain words/ WARN seen\n"),))
    raw = multipart(part("text/plain; charset=x-klingon", "8bit", b"plain words \xff\xfe"))
    v = f.check(message(raw=raw))
    assert v.action is Action.ACCEPT
    assert any("x-klingon" in n for n in v.log_notes) and any("seen" in n for n in v.log_notes)


def test_non_charset_codec_label_is_not_used(table: Table, checks: Checks,
                                             message: Message) -> None:
    """charset=zlib must not reach Python's zlib_codec (a decompression bomb)."""
    f = checks(body_checks=(table("/^x/ WARN raw\n"),))
    raw = multipart(part("text/plain; charset=zlib", "8bit", b"x\x9c\x03\x00"))
    v = f.check(message(raw=raw))
    assert any("unknown charset 'zlib'" in n for n in v.log_notes)


def test_filename_rfc2231_and_rfc2047(table: Table, checks: Checks, message: Message) -> None:
    f = checks(filename_checks=(table("/\\.(exe|scr)$/ REJECT 5.7.1 executable\n"
                                      "/^請求書/ HOLD invoice\n", "pcre"),))
    rfc2231 = "attachment; filename*0*=UTF-8''%E8%AB%8B%E6%B1%82; filename*1*=%E6%9B%B8.pdf"
    raw = multipart(part("application/pdf", "base64", b"AAAA",
                         f"Content-Disposition: {rfc2231}\r\n"))
    v = f.check(message(raw=raw))
    assert v.action is Action.ACCEPT and v.quarantine == "invoice"
    word = b64_word("virus.exe", "iso-2022-jp")
    raw = multipart(part(f'application/octet-stream; name="{word}"', "base64", b"AAAA"))
    assert f.check(message(raw=raw)).reply == Reply("550", "5.7.1", "executable")
    sjis = "=?Shift_JIS?B?" + base64.b64encode("請求書.zip".encode("shift_jis")).decode() + "?="
    raw = multipart(part("application/zip", "base64", b"AAAA",
                         f'Content-Disposition: attachment; filename="{sjis}"\r\n'))
    assert f.check(message(raw=raw)).quarantine == "invoice"


def test_filename_of_single_part_message(table: Table, checks: Checks, message: Message) -> None:
    f = checks(filename_checks=(table("/\\.js$/ REJECT\n"),))
    raw = (b"Content-Type: application/javascript\r\n"
           b"Content-Disposition: attachment; filename=\"x.js\"\r\n\r\nAAAA\r\n")
    assert f.check(message(raw=raw)).action is Action.REJECT


def test_decoded_body_edit_is_reencoded_in_its_charset(
    table: Table, checks: Checks, message: Message
) -> None:
    f = checks(body_checks=(table("/^秘密 (.*)/ REPLACE 公開 $1\n", "pcre"),))
    text = "一行目\r\n秘密 情報\r\n".encode("iso-2022-jp")
    raw = multipart(part("text/plain; charset=ISO-2022-JP", "base64", b64_lines(text)))
    v = f.check(message(raw=raw))
    assert v.replace_body is not None
    msg = email.message_from_bytes(b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n"
                                   + v.replace_body, policy=email.policy.default)
    inner = next(p for p in msg.iter_parts())
    assert inner.get_content_charset() == "iso-2022-jp"
    assert inner.get_content() == "一行目\r\n公開 情報\r\n"


def test_decoded_edit_falls_back_to_utf8(table: Table, checks: Checks, message: Message) -> None:
    f = checks(body_checks=(table("/^price: (.*)/ REPLACE 価格: $1\n", "pcre"),))
    raw = multipart(part("text/plain; charset=iso-8859-1", "quoted-printable",
                         b"price: 10=E2=82=AC? no: 10 caf=E9"))
    v = f.check(message(raw=raw))
    assert v.replace_body is not None
    assert b"charset=utf-8" in v.replace_body
    msg = email.message_from_bytes(b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n"
                                   + v.replace_body, policy=email.policy.default)
    inner = next(p for p in msg.iter_parts())
    assert "価格:" in inner.get_content()


def test_top_level_text_edit_changes_content_type(
    table: Table, checks: Checks, message: Message
) -> None:
    f = checks(body_checks=(table("/^hello/ REPLACE こんにちは\n"),))
    raw = (b"Content-Type: text/plain; charset=us-ascii\r\n\r\nhello\r\nworld\r\n")
    v = f.check(message(raw=raw))
    assert v.replace_body == "こんにちは\r\nworld\r\n".encode()
    assert [(e.kind, e.name, e.value) for e in v.header_edits] == [
        (EditKind.CHANGE, "Content-Type", "text/plain; charset=utf-8")]


def test_unknown_charset_still_undoes_base64(table: Table, checks: Checks,
                                             message: Message) -> None:
    f = checks(body_checks=(table("/cheap pills/ REJECT\n"),))
    raw = multipart(part("text/plain; charset=x-mystery", "base64", b64_lines(b"cheap pills\r\n")))
    v = f.check(message(raw=raw))
    assert v.action is Action.REJECT and any("x-mystery" in n for n in v.log_notes)


def test_decode_false_matches_encoded_words_raw(table: Table, checks: Checks,
                                                message: Message) -> None:
    word = b64_word("hello", "utf-8")
    f = checks(header_checks=(table(f"/^Subject: {word.replace('?', '[?]')}$/ REJECT\n"),),
               decode=False)
    assert f.check(message(headers=[("Subject", f" {word}".encode())])).action is Action.REJECT


def test_utf8_fallback_rewrites_a_folded_content_type(
    table: Table, checks: Checks, message: Message
) -> None:
    f = checks(body_checks=(table("/^old/ REPLACE 新しい\n"),))
    raw = (b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
           b"Content-Type: text/plain;\r\n\tformat=flowed;\r\n\tcharset=\"us-ascii\"\r\n\r\n"
           b"old line\r\n--XX--\r\n")
    v = f.check(message(raw=raw))
    assert v.replace_body is not None
    assert b"\tcharset=utf-8\r\n" in v.replace_body and b"us-ascii" not in v.replace_body
    assert "新しい\r\n".encode() in v.replace_body


def test_utf8_fallback_adds_a_missing_content_type(
    table: Table, checks: Checks, message: Message
) -> None:
    f = checks(body_checks=(table("/^old/ REPLACE 新しい\n"),))
    raw = (b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\nX-Note: 1\r\n\r\n"
           b"old line\r\n--XX--\r\n")
    v = f.check(message(raw=raw))
    assert v.replace_body is not None
    assert b"X-Note: 1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" in v.replace_body
    v = f.check(message(raw=b"Subject: s\r\n\r\nold\r\n"))
    assert [(e.kind, e.name, e.value) for e in v.header_edits] == [
        (EditKind.ADD, "Content-Type", "text/plain; charset=utf-8")]
