"""The Authentication-Results writer and the forged-field remover (RFC 8601)."""

from __future__ import annotations

from milters.core.authresults import (
    authserv_id_of,
    fold,
    forged_fields,
    format_value,
    methods_of,
    quote_value,
)
from milters.core.model import Header
from milters.core.verdict import AuthResult


def test_format_with_properties() -> None:
    r = AuthResult("dkim", "pass", properties=(("header", "d", "example.com"),
                                               ("header", "s", "sel1")))
    assert format_value("mx.example.com", [r]) == (
        "mx.example.com; dkim=pass header.d=example.com header.s=sel1"
    )


def test_no_results_is_none() -> None:
    assert format_value("mx.example.com", []) == "mx.example.com; none"


def test_authserv_id_quoted_when_needed() -> None:
    assert quote_value("mx.example.com") == "mx.example.com"
    assert quote_value("my host") == '"my host"'
    assert format_value('a"b c', []).startswith('"a\\"b c";')


def test_reason_is_quoted() -> None:
    r = AuthResult("spf", "fail", reason="not permitted by policy")
    assert 'reason="not permitted by policy"' in format_value("mx", [r])


def test_fold_keeps_lines_short() -> None:
    results = [AuthResult("dkim", "pass", properties=(("header", "d", f"d{i}.example.com"),))
               for i in range(6)]
    folded = fold(format_value("mx.example.com", results))
    assert all(len(line) <= 78 for line in folded.split("\n"))
    assert " ".join(folded.split()) == " ".join(format_value("mx.example.com", results).split())


def test_parse_authserv_id() -> None:
    assert authserv_id_of(b" MX.Example.COM; dkim=pass") == "mx.example.com"
    assert authserv_id_of(' "mx.example.com" (comment); spf=pass') == "mx.example.com"
    # Broken results must not hide the claimed authserv-id.
    assert authserv_id_of(" mx.example.com; dkim=;;;==") == "mx.example.com"
    assert authserv_id_of(b"\xff\xfe; x") is not None


def test_methods() -> None:
    assert methods_of("mx; dkim=pass (ok) header.d=a; spf=fail; dmarc/1=pass") == {
        "dkim", "spf", "dmarc"}


def test_forged_fields_first_filter_removes_all_ours() -> None:
    headers = [
        Header("Authentication-Results", b" other.example; dkim=pass"),
        Header("Received", b" from x"),
        Header("Authentication-Results", b" MX.example.com; dmarc=pass"),
        Header("authentication-results", b" mx.example.com;\n\tspf=pass"),
    ]
    assert forged_fields(headers, "mx.example.com", remove_all=True) == [2, 3]
    assert forged_fields(headers, "mx.example.com", False, frozenset({"spf"})) == [3]
    assert forged_fields(headers, "mx.example.com", False) == []
