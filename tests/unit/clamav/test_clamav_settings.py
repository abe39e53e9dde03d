"""[clamav] settings: defaults, and bad values refused at load with what is allowed."""

from __future__ import annotations

import socket

import pytest

from milters import registry
from milters.clamav.clamd import ClamdError, _parse, parse_backend
from milters.clamav.settings import ClamavSettings, parse_reply_template
from milters.core.errors import ConfigError


def test_defaults() -> None:
    s = registry.load_from_mapping({}).filters["clamav"]
    assert isinstance(s, ClamavSettings)
    assert s.socket == "inet:8894@127.0.0.1"
    assert (s.on_virus, s.on_fail, s.on_oversize, s.add_headers) == (
        "reject", "tempfail", "accept", "replace")
    assert s.clamd_sockets == ("unix:/run/clamav/clamd.ctl",)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("clamd_sockets", ["localhost:3310"], "tcp:127.0.0.1:3310"),
    ("clamd_sockets", ["unix:relative/path"], "unix:/run/clamav/clamd.ctl"),
    ("clamd_sockets", [], "at least one clamd socket"),
    ("reject_reply", "250 2.0.0 fine", "a 5xx reply"),
    ("reject_reply", "550 4.7.1 disagree", "reply code 550 and status 4.7.1 disagree"),
    ("reject_reply", "550 5.7.1 %v and %v", "at most once"),
    ("on_virus", "bounce", "one of 'reject', 'quarantine', 'discard', 'tag'"),
    ("on_fail", "reject", "one of 'tempfail', 'accept'"),
    ("max_scan_size", 0, "a number from 1"),
    ("scan_timeout", 0, "a number from 0.1"),
])
def test_bad_values_named(key: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        registry.load_from_mapping({"clamav": {key: value}})
    assert key in str(err.value) and expected in str(err.value)


def test_misspelt_key_suggests() -> None:
    with pytest.raises(ConfigError, match="did you mean 'on_virus'"):
        registry.load_from_mapping({"clamav": {"on_virs": "tag"}})


def test_reply_template_without_enhanced_code() -> None:
    r = parse_reply_template("554 infected with %v")
    assert (r.code, r.xcode, r.text) == ("554", "", "infected with %v")


def test_backend_specs() -> None:
    assert parse_backend("tcp:[::1]:3310").family is socket.AF_INET6
    assert parse_backend("tcp:[::1]:3310").address == ("::1", 3310)
    assert parse_backend("unix:/run/clamav/clamd.ctl").address == "/run/clamav/clamd.ctl"
    with pytest.raises(ValueError):
        parse_backend("tcp:127.0.0.1:99999")


@pytest.mark.parametrize("raw", [b"", b"\0", b"stream: \0", b"stream: Can't open ERROR\0",
                                 b"garbage", b"stream: OK but more\0", b"\xff\xfe: x\0"])
def test_clamd_replies_we_cannot_read_are_failures(raw: bytes) -> None:
    with pytest.raises(ClamdError):
        _parse(raw, 0)


def test_virus_names_are_made_safe_for_headers_and_replies() -> None:
    assert _parse(b"stream: Bad\r\nName (x) FOUND\0", 1).virus == "Bad__Name__x"
    assert _parse(b"stream: Win.Test.EICAR_HDB-1 FOUND\0", 1).virus == "Win.Test.EICAR_HDB-1"
    assert _parse(b"stream:  FOUND\0", 1).virus == "unnamed"
