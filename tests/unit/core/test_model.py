"""Message model: parsing as Postfix hands messages over, spooled bodies, sockets."""

from __future__ import annotations

import pytest

from milters.core.model import Body, Connection, Header, Transaction, parse_message, unbracket
from milters.core.sockets import parse_socket


def test_parse_keeps_folding_and_leading_space() -> None:
    headers, body = parse_message(b"Subject: a\r\n b\r\nX:y\r\n\r\nline\r\n")
    assert headers == [Header("Subject", b" a\n b"), Header("X", b"y")]
    assert body == b"line\r\n"


def test_parse_lf_and_no_body() -> None:
    headers, body = parse_message(b"From: a@b\nTo: c@d\n")
    assert [h.name for h in headers] == ["From", "To"] and body == b""


def test_non_header_line_starts_body() -> None:
    headers, body = parse_message(b"From: a@b\nthis is not a header\nmore\n")
    assert len(headers) == 1 and body.startswith(b"this is not")


def test_body_spools_past_threshold() -> None:
    body = Body(threshold=10)
    body.write(b"12345")
    assert not body.spooled
    body.write(b"678901234")
    assert body.spooled
    body.write(b"xyz")
    assert body.getvalue() == b"12345678901234xyz" and body.size == 17
    assert b"".join(body.chunks(4)) == b"12345678901234xyz"
    body.close()


def test_transaction_helpers() -> None:
    tx = Transaction(Connection(client_addr="192.0.2.1", macros={"i": "ABC"}))
    tx.headers = [Header("Subject", b" hi"), Header("subject", b"x")]
    assert tx.queue_id == "ABC"
    assert tx.header_values("SUBJECT") == [b" hi", b"x"]
    assert tx.raw_header_block() == b"Subject: hi\r\nsubject: x\r\n"
    assert unbracket("<a@b>") == "a@b" and unbracket("<>") == ""


@pytest.mark.parametrize(
    ("spec", "libmilter", "postfix"),
    [
        ("inet:8891@127.0.0.1", "inet:8891@127.0.0.1", "inet:127.0.0.1:8891"),
        ("inet:127.0.0.1:8891", "inet:8891@127.0.0.1", "inet:127.0.0.1:8891"),
        ("inet:localhost:10002", "inet:10002@localhost", "inet:localhost:10002"),
        ("inet6:8891@::1", "inet6:8891@::1", "inet6:[::1]:8891"),
        ("inet:[::1]:8891", "inet6:8891@::1", "inet6:[::1]:8891"),
        ("unix:/run/milters/dkim.sock", "unix:/run/milters/dkim.sock",
         "unix:/run/milters/dkim.sock"),
    ],
)
def test_socket_forms(spec: str, libmilter: str, postfix: str) -> None:
    s = parse_socket(spec)
    assert s.libmilter == libmilter and s.postfix == postfix and s.is_loopback


@pytest.mark.parametrize("spec", ["inet:", "inet:99999@127.0.0.1", "tcp:1@x", "unix:rel",
                                  "inet:8891@bad host"])
def test_bad_sockets(spec: str) -> None:
    with pytest.raises(ValueError, match="bad socket"):
        parse_socket(spec)


def test_non_loopback_detected() -> None:
    assert not parse_socket("inet:8891@0.0.0.0").is_loopback
