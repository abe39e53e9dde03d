"""The sample tables in conf/checks load and do what their comments say."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

from milters.checks import ChecksFilter
from milters.core.model import Transaction
from milters.core.verdict import Action

Checks = Callable[..., ChecksFilter]
Message = Callable[..., Transaction]

SAMPLES = Path(__file__).resolve().parents[3] / "conf" / "checks"


def sample(checks: Checks, decode: bool = True) -> ChecksFilter:
    return checks(
        header_checks=(f"pcre:{SAMPLES / 'header_checks'}",),
        body_checks=(f"pcre:{SAMPLES / 'body_checks'}",),
        client_checks=(f"regexp:{SAMPLES / 's25r_whitelist'}", f"regexp:{SAMPLES / 's25r'}"),
        decode=decode,
    )


def test_samples_load_in_both_modes(checks: Checks) -> None:
    for decode in (True, False):
        lines = sample(checks, decode).describe()
        assert any("header_checks" in line for line in lines)


def test_seed_examples(checks: Checks, message: Message) -> None:
    f = sample(checks)
    v = f.check(message(raw=b"X-Mailer: GOTO Sarbacane 4.2\r\n\r\n"))
    assert v.action is Action.REJECT and v.reply is not None
    assert v.reply.text == "I fight spam (GOTO Sarbacane)"
    v = f.check(message(raw=b"Subject: Your email contains VIRUSES\r\n\r\n"))
    assert v.action is Action.DISCARD
    v = f.check(message(raw=b"Message-ID: <123@mail.xxxxx.jp>\r\n\r\n"))
    assert v.action is Action.REJECT
    assert f.check(message(raw=b"Subject: make money fast\r\n\r\n")).action is Action.REJECT
    assert f.check(message(raw=b"Subject: a moneyless life\r\n\r\n")).action is Action.ACCEPT
    word = "=?ISO-2022-JP?B?" + base64.b64encode("※未承諾広告※".encode("iso-2022-jp")).decode()
    assert f.check(message(raw=f"Subject: {word}?=\r\n\r\n".encode())).action is Action.REJECT


def test_body_sample_sees_base64_japanese(checks: Checks, message: Message) -> None:
    f = sample(checks)
    body = base64.encodebytes("出会い系サイトです\r\n".encode("shift_jis"))
    raw = (b"Content-Type: text/plain; charset=Shift_JIS\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + body.replace(b"\n", b"\r\n"))
    assert f.check(message(raw=raw)).action is Action.REJECT


def test_samples_load_as_regexp_tables_too(checks: Checks) -> None:
    """The README wires them as regexp: tables; they must load that way as well."""
    f = checks(
        header_checks=(f"regexp:{SAMPLES / 'header_checks'}",),
        body_checks=(f"regexp:{SAMPLES / 'body_checks'}",),
        client_checks=(f"regexp:{SAMPLES / 's25r_whitelist'}", f"regexp:{SAMPLES / 's25r'}"),
    )
    assert len(f.describe()) >= 3
