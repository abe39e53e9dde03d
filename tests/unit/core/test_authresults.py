"""The Authentication-Results writer and the forged-field remover (RFC 8601)."""

from __future__ import annotations

import time

import authres
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milters.core.authresults import (
    MAX_TRUSTED_FIELDS,
    ArResult,
    authserv_id_of,
    fold,
    forged_fields,
    format_value,
    is_ours,
    methods_of,
    quote_value,
    read_field,
    trusted_results,
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


# -- the one reader (RFC 8601 §2.2) ---------------------------------------------

OURS = "mx.test.example"

# Every way of writing our authserv-id that a reader could accept (issue 9's
# forged forms among them): each must be removed by the first filter.
FORGED_FORMS = [
    "mx.test.example; dkim=pass header.d=bank.example",
    "MX.TEST.EXAMPLE; dkim=pass header.d=bank.example",
    '"mx.test.example"; dkim=pass header.d=bank.example',
    '"mx.test.example" 1; dkim=pass header.d=bank.example',
    '"mx.test.example" (relay; checked); dkim=pass header.d=bank.example',
    '(a;b) "MX.TEST.EXAMPLE"; dkim=pass header.d=bank.example',
    "(a (nested; x) b) mx.test.example; dkim=pass header.d=bank.example",
    "mx.test.example.; dkim=pass header.d=bank.example",
    '"MX.Test.Example."; dkim=pass header.d=bank.example',
    "\r\n\tmx.test.example\r\n\t1\r\n\t;\r\n\tdkim=pass\r\n\theader.d=bank.example",
    "mx.test.example(c);dkim=pass header.d=bank.example",
    'mx.test.example; dkim/1 = pass (ok; fine) header.d="bank.example"',
    '"mx.test.example; dkim=pass header.d=bank.example',  # quote never closes
    "mx.test.example; dkim=pass header.d=bank.example; ???",  # broken after the id
    "mx.test.example\\; dkim=pass header.d=bank.example",
]


@pytest.mark.parametrize("value", FORGED_FORMS)
def test_forged_forms_are_removed(value: str) -> None:
    headers = [Header("Authentication-Results", value.encode())]
    assert forged_fields(headers, OURS, remove_all=True) == [1]
    assert forged_fields(headers, OURS.upper() + ".", remove_all=True) == [1]


@pytest.mark.parametrize("value", FORGED_FORMS)
def test_dkim_filter_removes_forged_dkim_results_in_any_form(value: str) -> None:
    headers = [Header("Authentication-Results", value.encode())]
    assert forged_fields(headers, OURS, False, frozenset({"dkim"})) == [1]


@pytest.mark.parametrize("value", [
    '"mx.test.example" 1; dkim=pass header.d=bank.example',
    '"mx.test.example" (relay; checked); dkim=pass header.d=bank.example',
    '(a;b) "MX.TEST.EXAMPLE"; dkim=pass header.d=bank.example',
])
def test_quoted_ids_read_the_same_everywhere(value: str) -> None:
    field = read_field(value)
    assert field is not None and field.authserv_id == OURS
    assert field.results == (ArResult("dkim", "pass", {"header.d": "bank.example"}),)
    assert authserv_id_of(value) == OURS


def test_foreign_ids_are_kept() -> None:
    for value in ["other.example; dkim=pass", '"mx.test.example.evil"; dkim=pass',
                  "(mx.test.example) other.example; dkim=pass",
                  'x "mx.test.example"; dkim=pass']:
        assert forged_fields([Header("Authentication-Results", value.encode())], OURS,
                             remove_all=True) == [], value


@pytest.mark.parametrize("value", [
    "mx.test.example; dkim=pass (good sig) header.d=example.com header.s=sel; "
    "spf=pass smtp.mailfrom=a@example.com",
    'mx; dkim=fail reason="bad body hash" header.d=x.example header.s=s; spf=none',
    "mx (c (nested)); dkim=pass header.d=a.example",
    "mx; dkim = pass header.d=b.example",
    "mx 1; spf/1=pass smtp.mailfrom=c.example",
    "mx; none",
    "mx; dkim=pass header.i=@example.com header.b=\"abc/def\"; dmarc=fail header.from=x.example",
])
def test_reader_agrees_with_authres(value: str) -> None:
    """authres's full parser is the reference for well-formed fields (it reads no
    quoted authserv-id, which RFC 8601 allows: those are tested above)."""
    ref = authres.parse_value(value)
    field = read_field(value)
    assert field is not None and field.results is not None
    assert field.authserv_id == str(ref.authserv_id).lower()
    assert [(r.method, r.result, r.props) for r in field.results] == [
        (str(r.method).lower(), str(r.result).lower(),
         {f"{str(p.type).lower()}.{str(p.name).lower()}": str(p.value) for p in r.properties})
        for r in ref.results]


@pytest.mark.parametrize("value", [
    "mx; dkim=pass header.d=a; ???",
    "mx; dkim",
    "mx; dkim=",
    "mx; dkim=pass header.d",
    "mx; dkim=pass (unterminated",
    "mx dkim=pass",
    "mx; none; dkim=pass",
])
def test_malformed_results_are_believed_by_no_one(value: str) -> None:
    field = read_field(value)
    assert field is not None and field.authserv_id == "mx" and field.results is None
    assert list(trusted_results([value.encode()], {"mx"})) == []


def test_deep_comments_are_linear_and_defined() -> None:
    deep = "(" * 5000 + "x" + ")" * 5000
    value = f"{deep} mx.test.example {deep}; dkim=pass {deep} header.d=bank.example {deep}"
    started = time.process_time()
    field = read_field(value)
    assert field is not None and field.authserv_id == OURS
    assert field.results == (ArResult("dkim", "pass", {"header.d": "bank.example"}),)
    assert read_field("(" * 100_000 + " mx; dkim=pass") is None
    assert forged_fields([Header("Authentication-Results", value.encode())], OURS, True) == [1]
    assert time.process_time() - started < 5  # linear: milliseconds in practice


def test_many_foreign_fields_cost_a_prefix_scan_and_trusted_fields_are_capped() -> None:
    foreign = [b"(" + b"c" * 200 + b") other.example; dkim=pass header.d=x"] * 5000
    ours = [b"mx.test.example; dkim=pass header.d=a.example"] * 100
    started = time.process_time()
    got = list(trusted_results(ours[:1] + foreign + ours, {OURS}))
    assert forged_fields([Header("Authentication-Results", v) for v in foreign], OURS,
                         True) == []
    assert time.process_time() - started < 5
    assert len(got) == MAX_TRUSTED_FIELDS


def test_unreadable_bytes_are_not_an_exception() -> None:
    for raw in [b"\xff\xfe; x", b"", b";", b"\x00mx; dkim=pass", b'"', b"\\", b"(" * 10]:
        read_field(raw)
        methods_of(raw)
        forged_fields([Header("Authentication-Results", raw)], OURS, True)


# -- the property: whatever the remover keeps, no consumer reads as ours -------------

_ID_FORMS = st.sampled_from([
    "mx.test.example", "MX.TEST.EXAMPLE", "mx.test.example.", '"mx.test.example"',
    '"Mx.Test.Example."', "other.example", '"mx.test.example x"', "mx.test.example\\",
    '"mx.test.\\example"', "mx.test.examplee",
])
_CFWS = st.lists(st.sampled_from([" ", "\r\n\t", "(c)", "(a;b)", "(x (y) z)", "(\\))", "\t",
                                  "(", ")", ""]), max_size=3).map("".join)
_PIECES = st.sampled_from([";", "dkim", "spf", "=", "pass", "fail", "/", "1", "header", ".",
                           "d", "bank.example", '"', "reason", "none", "@", " ", "\\"])


@st.composite
def ar_values(draw: st.DrawFn) -> str:
    head = draw(_CFWS) + draw(_ID_FORMS) + draw(_CFWS)
    if draw(st.booleans()):
        head += draw(st.sampled_from(["1", "1 ", " 1"])) + draw(_CFWS)
    body = draw(st.lists(st.one_of(_PIECES, _CFWS, st.text(max_size=3)), max_size=14))
    if draw(st.booleans()):
        body = [";", "dkim", "=", "pass", " ", "header", ".", "d", "=", "bank.example", *body]
    return head + "".join(body)


@given(ar_values())
@settings(max_examples=600, deadline=None)
def test_remover_keeps_nothing_a_consumer_reads_as_ours(value: str) -> None:
    header = [Header("Authentication-Results", value.encode("utf-8", "surrogateescape"))]
    field = read_field(value)
    believed = [f for f in trusted_results([header[0].value], {OURS})]
    if field is not None and field.authserv_id == OURS:
        # The first filter removes it whatever it reports...
        assert forged_fields(header, OURS, remove_all=True) == [1]
        # ...and a filter that owns a method it reports removes it too.
        for r in field.results or ():
            assert forged_fields(header, OURS, False, frozenset({r.method})) == [1]
    if believed:
        assert forged_fields(header, OURS, remove_all=True) == [1]
    if forged_fields(header, OURS, remove_all=True) == []:
        assert believed == []
        assert field is None or field.authserv_id != OURS


@given(st.text(max_size=200))
@settings(max_examples=400, deadline=None)
def test_any_text_reads_without_exception(value: str) -> None:
    field = read_field(value)
    if field is not None and field.authserv_id == OURS:
        assert forged_fields([Header("Authentication-Results", value.encode())], OURS,
                             True) == [1]


@given(ar_values(), st.sampled_from(["dkim", "spf", "dmarc", "DKIM", "arc"]))
@settings(max_examples=600, deadline=None)
def test_the_owned_method_screen_never_keeps_an_owned_field(value: str, method: str) -> None:
    """forged_fields skips the full read of a field that does not spell an owned
    method: the same answer as reading every field."""
    header = [Header("Authentication-Results", value.encode("utf-8", "surrogateescape"))]
    owned = frozenset({method.lower()})
    full = [1] if is_ours(header[0].value, OURS) and methods_of(header[0].value) & owned else []
    assert forged_fields(header, OURS, False, owned) == full


# -- the plain-value reader is the scanner, only faster --------------------------------

_PLAIN_PIECES = st.sampled_from([
    ";", "dkim", "spf", "=", "pass", "fail", "/", "1", "header", ".", "d", "bank.example",
    "reason", "REASON", "Reason=why", "none", "NONE", "@", " ", "\t", "\r\n ", ")", "x=y",
    "smtp.mailfrom=a@b.example", "; spf=pass smtp.mailfrom=x.example", "; arc=none",
    "\x0b", "\u00e9", "\u2003", "policy.dmarc=reject", "-", "_",
])


@st.composite
def plain_values(draw: st.DrawFn) -> str:
    head = draw(st.sampled_from(["mx.test.example", " mx.test.example", "MX.Example.", "",
                                 "\t a", "@x", "mx 1", "mx 12 "]))
    body = draw(st.lists(st.one_of(_PLAIN_PIECES, st.text(max_size=3)), max_size=18))
    if draw(st.booleans()):
        body = [";", " dkim", "=", "pass", " header.d=bank.example", *body]
    value = head + "".join(body)
    return "".join(c for c in value if c not in '("\\')


@given(plain_values())
@settings(max_examples=1500, deadline=None)
def test_plain_values_read_as_the_scanner_reads_them(value: str) -> None:
    from milters.core.authresults import _read_plain, _read_scanned

    assert _read_plain(value) == _read_scanned(value)


@pytest.mark.parametrize("value", [
    "mx.example; none", "mx.example;none ", "mx.example; NONE;", "mx.example; none dkim=pass",
    "mx.example 1; dkim/1 = pass header . d = a.example ; spf=fail smtp.mailfrom=x@y;",
    "mx.example; dkim=pass reason=ok header.d=a", "mx.example; dkim=pass reason.x=y",
    "mx.example; dkim=pass reasonx=y", "mx.example; dkim=pass header.d=a\x0bheader.s=b",
    "mx.example; dkim=pass header.d=a header.d=b", "mx.example", "mx.example;", ";",
    "mx.example; dkim=pass.x", "mx.example; dkim=pass )", "x" * 70000 + "; dkim=pass",
])
def test_plain_values_edge_cases(value: str) -> None:
    from milters.core.authresults import _read_plain, _read_scanned

    assert _read_plain(value) == _read_scanned(value)
