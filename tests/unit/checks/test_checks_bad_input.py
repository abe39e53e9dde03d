"""Hostile and broken mail: every case gives a defined verdict, never an exception."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from milters.checks import ChecksFilter
from milters.core.model import Transaction
from milters.core.verdict import Action

Table = Callable[..., str]
Checks = Callable[..., ChecksFilter]
Message = Callable[..., Transaction]

HEADER_RULES = "/^Subject: .*money/ REJECT\n/^X-Junk: (.*)/ WARN $1\n/^X-Rep:/ REPLACE X-Rep: r\n"
BODY_RULES = "/money/ REJECT\n/^--/ INFO boundary\n"


@pytest.fixture(params=[True, False], ids=["decode", "raw"])
def both(request: pytest.FixtureRequest, table: Table, checks: Checks) -> ChecksFilter:
    return checks(header_checks=(table(HEADER_RULES, "pcre"),),
                  body_checks=(table(BODY_RULES, "pcre"),), decode=request.param)


def test_eight_bit_junk_in_headers(both: ChecksFilter, message: Message) -> None:
    tx = message(headers=[("X-Junk", b" \xff\xfe\x80 =?bogus?Q?=ZZ?= =?utf-8?B?!!!?="),
                          ("Subject", b" \x93money\x94")])
    v = both.check(tx)
    assert v.action is Action.REJECT
    assert any(n.startswith("warning: header X-Junk:") for n in v.log_notes)


def test_nul_bytes(both: ChecksFilter, message: Message) -> None:
    tx = message(headers=[("X-Junk", b" a\x00b"), ("X-Rep", b" \x00")],
                 body=b"line\x00with nul\r\n\x00\r\n")
    v = both.check(tx)
    assert v.action is Action.ACCEPT
    assert any("a?b" in n for n in v.log_notes)


def test_one_megabyte_header_line(both: ChecksFilter, message: Message) -> None:
    tx = message(headers=[("Subject", b" " + b"x" * 1_000_000 + b" money")])
    started = time.perf_counter()
    v = both.check(tx)
    # Matched up to Postfix's header_size_limit (102400 bytes); the tail is not seen.
    assert v.action is Action.ACCEPT
    assert time.perf_counter() - started < 5


def test_ten_thousand_header_fields(both: ChecksFilter, message: Message) -> None:
    headers = [(f"X-Field-{i}", b" value") for i in range(10_000)] + [("X-Rep", b" last")]
    v = both.check(message(headers=headers))
    assert v.action is Action.ACCEPT
    assert [e.index for e in v.header_edits] == [1]


def test_multipart_without_boundary(both: ChecksFilter, message: Message) -> None:
    raw = (b"Content-Type: multipart/mixed\r\n\r\n--\r\nContent-Type: text/plain\r\n\r\n"
           b"money\r\n")
    assert both.check(message(raw=raw)).action is Action.REJECT  # plain body text


def test_boundary_never_closed_and_empty_parts(both: ChecksFilter, message: Message) -> None:
    raw = (b"Content-Type: multipart/mixed; boundary=Q\r\n\r\n--Q\r\n--Q\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n"
           b"\r\n!!!not base64 at all***\r\n--Q\r\nContent-Type: text/plain\r\n")
    assert both.check(message(raw=raw)).action is Action.ACCEPT


def test_deep_nesting(both: ChecksFilter, message: Message) -> None:
    raw = b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for i in range(1, 150):
        raw += f"--b{i - 1}\r\nContent-Type: multipart/mixed; boundary=b{i}\r\n\r\n".encode()
    raw += b"--b149\r\nContent-Type: text/plain\r\n\r\nmoney\r\n"
    assert both.check(message(raw=raw)).action is Action.REJECT


def test_unknown_charset(both: ChecksFilter, message: Message) -> None:
    raw = (b"Subject: =?x-unknown-cs?B?bW9uZXk=?=\r\nContent-Type: text/plain; charset=foo-9\r\n"
           b"\r\nmoney\r\n")
    assert both.check(message(raw=raw)).action is Action.REJECT


def test_empty_body_and_no_headers(both: ChecksFilter, message: Message) -> None:
    assert both.check(message()).action is Action.ACCEPT
    assert both.check(message(raw=b"Subject: hi\r\n\r\n")).action is Action.ACCEPT


def test_body_without_final_newline_and_bare_lf(both: ChecksFilter, message: Message) -> None:
    assert both.check(message(raw=b"S: x\n\nno newline money")).action is Action.REJECT


def test_huge_single_line_body(table: Table, checks: Checks, message: Message) -> None:
    f = checks(body_checks=(table("/^marker/ REPLACE changed\n"),), decode=False,
               body_checks_size_limit=0)
    body = (b"a" * 2048 * 500 + b"marker" + b"b" * 100)
    v = f.check(message(headers=[("Subject", b" x")], body=body))
    assert v.replace_body == b"a" * 2048 * 500 + b"changed"


def test_raw_body_edits_keep_other_bytes(table: Table, checks: Checks, message: Message) -> None:
    f = checks(body_checks=(table("/^drop/ IGNORE\n"),), decode=False)
    body = b"keep \xff\x00\r\ndrop me\r\nend\r\n"
    v = f.check(message(headers=[("Subject", b" x")], body=body))
    assert v.replace_body == b"keep \xff\x00\r\nend\r\n"


def test_table_with_eight_bit_bytes(table: Table, checks: Checks, message: Message) -> None:
    # A Shift_JIS table, as old Postfix set-ups have: matched byte for byte with decode = false.
    spec = table("/^Subject: .*未承諾/ REJECT\n".encode("shift_jis"))
    f = checks(header_checks=(spec,), decode=False)
    tx = message(headers=[("Subject", " ※未承諾広告※".encode("shift_jis"))])
    assert f.check(tx).action is Action.REJECT
    g = checks(header_checks=(spec,), decode=True)  # loads; raw bytes still match raw bytes
    assert g.check(tx).action is Action.REJECT
