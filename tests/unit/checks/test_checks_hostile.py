"""Runaway work on one message: the match budget, linear body splitting and decoding,
bounded MIME parsing. Every case ends in a defined verdict within seconds."""

from __future__ import annotations

import base64
import quopri
import re
import time
from collections.abc import Callable

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milters.checks import ChecksFilter
from milters.checks.cost import FREE_STEPS, anchored_prefixes, free_length
from milters.checks.message import MessageWalker, body_lines, line_cap
from milters.checks.mime import (
    TextDecoder,
    collapse_params,
    decode_words,
    filename_of,
    parse_content_type,
    split_params,
)
from milters.checks.patterns import translate_pcre, translate_posix
from milters.checks.tables import Budget, TextMode
from milters.core.config import GlobalSettings
from milters.core.filter import Env
from milters.core.model import Body, Connection, Transaction, parse_message
from milters.core.verdict import Action

Table = Callable[..., str]
Checks = Callable[..., ChecksFilter]
Message = Callable[..., Transaction]

CATASTROPHIC = "/^Subject: (a+)+$/ REJECT nested quantifier\n/^Subject: a/ REJECT plain\n"
LONG_SUBJECT = b" " + b"a" * 100_000 + b"b"


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# --- the match budget ---------------------------------------------------------------


def test_catastrophic_header_rule_gets_on_error_naming_the_rule(
    table: Table, checks: Checks, message: Message
) -> None:
    spec = table(CATASTROPHIC, "pcre")
    f = checks(header_checks=(spec,), match_timeout=0.3)
    tx = message(headers=[("Subject", LONG_SUBJECT)])
    started = time.perf_counter()
    v = f.check(tx)
    assert time.perf_counter() - started < 5
    # Not "no match, go on": the later /^Subject: a/ rule would then decide.
    assert v.action is Action.TEMPFAIL
    assert v.reply is not None and v.reply.code == "451"
    path = spec.partition(":")[2]
    assert any(f"header_checks table {path}:1 ran over match_timeout (0.3 s)" in n
               for n in v.log_notes), v.log_notes


def test_overrun_with_on_error_accept_accepts(
    table: Table, checks: Checks, message: Message
) -> None:
    f = checks(header_checks=(table(CATASTROPHIC, "pcre"),), match_timeout=0.2,
               on_error="accept")
    v = f.check(message(headers=[("Subject", LONG_SUBJECT)]))
    assert v.action is Action.ACCEPT
    assert any("ran over match_timeout" in n and "on_error=accept" in n for n in v.log_notes)


def test_global_on_error_applies_when_the_filter_sets_none(
    table: Table, message: Message
) -> None:
    from milters.checks import ChecksSettings

    f = ChecksFilter(ChecksSettings(header_checks=(table(CATASTROPHIC, "pcre"),),
                                    match_timeout=0.2),
                     Env(GlobalSettings(on_error="accept")))
    assert f.check(message(headers=[("Subject", LONG_SUBJECT)])).action is Action.ACCEPT


def test_catastrophic_regexp_rule_is_answered_by_glibc_at_once(
    table: Table, checks: Checks, message: Message
) -> None:
    """regexp: tables match with glibc, which does not backtrack: no overrun, and the
    next rule decides, as in Postfix."""
    f = checks(header_checks=(table(CATASTROPHIC),), match_timeout=0.3)
    tx = message(headers=[("Subject", LONG_SUBJECT)])
    assert _timed(lambda: f.check(tx)) < 0.3
    v = f.check(tx)
    assert v.action is Action.REJECT and v.reply is not None and "plain" in v.reply.text
    body = checks(body_checks=(table("/^(a|a)+$/ REJECT alternation\n"),), match_timeout=0.3)
    lines = message(headers=[("Subject", b" x")], body=(b"a" * 60 + b"!\n") * 20 + b"a" * 60)
    assert _timed(lambda: body.check(lines)) < 0.3
    assert body.check(lines).action is Action.REJECT


def test_the_same_subject_is_fast_without_the_bad_rule(
    table: Table, checks: Checks, message: Message
) -> None:
    f = checks(header_checks=(table("/^Subject: a+$/ REJECT plain\n/^Subject: a/ WARN w\n"),),
               match_timeout=0.3)
    v = f.check(message(headers=[("Subject", LONG_SUBJECT)]))
    assert v.action is Action.ACCEPT
    assert any(n.startswith("warning: header Subject: aaa") for n in v.log_notes)


def test_screening_pass_runs_over_and_names_the_rule(
    table: Table, checks: Checks, message: Message
) -> None:
    # Enough body lines for the one-pass screening (screen.py), which then runs the
    # pattern over all lines joined.
    spec = table("/^(a|a)+$/ REJECT alternation\n", "pcre")
    f = checks(body_checks=(spec,), match_timeout=0.3)
    v = f.check(message(headers=[("Subject", b" x")], body=(b"a" * 60 + b"!\n") * 20))
    assert v.action is Action.TEMPFAIL
    assert any(f"body_checks table {spec.partition(':')[2]}:1 ran over" in n
               for n in v.log_notes), v.log_notes


def test_stage_table_runs_over_at_its_stage(table: Table, checks: Checks,
                                            message: Message) -> None:
    spec = table("/^(a|a)+@example$/ REJECT\n", "pcre")
    f = checks(sender_checks=(spec,), match_timeout=0.2)
    tx = message(mail_from="a" * 40 + "!@example")
    v = f.on_mail(tx)
    assert v is not None and v.action is Action.TEMPFAIL
    assert "sender_checks table" in v.log_notes[0] and ":1 ran over" in v.log_notes[0]


def test_budget_spent_makes_every_match_run_over() -> None:
    budget = Budget(0.0)
    assert budget.left() == 0
    with pytest.raises(TimeoutError):
        regex.compile("x").search("x", timeout=budget.left())
    assert Budget(None).left() is None


def test_zero_match_timeout_means_no_limit(table: Table, checks: Checks,
                                           message: Message) -> None:
    f = checks(header_checks=(table("/^Subject: (a+)+$/ REJECT\n"),), match_timeout=0)
    assert f.budget().left() is None
    # regex handles this form itself on a short subject: matched, not timed out.
    v = f.check(message(headers=[("Subject", b" " + b"a" * 200)]))
    assert v.action is Action.REJECT


def test_millions_of_short_lines_run_over_while_reading(
    table: Table, checks: Checks, message: Message
) -> None:
    f = checks(body_checks=(table("/money/ REJECT\n"),), match_timeout=0.05)
    body = b"a=\n" * 2_000_000  # one quoted-printable line of 2 million soft breaks
    tx = message(headers=[("Content-Type", b" text/plain"),
                          ("Content-Transfer-Encoding", b" quoted-printable")], body=body)
    started = time.perf_counter()
    v = f.check(tx)
    assert time.perf_counter() - started < 5
    assert v.action is Action.TEMPFAIL
    assert any("reading the body (line" in n for n in v.log_notes), v.log_notes


# --- regex behaves as re did for the translated patterns ----------------------------

PATTERNS = [r"^Subject:.*viagra", r"^(From|To):\s*[[:alpha:]]+@", r"\bfoo\b",
            r"[^[:space:]]{5,}", r"a{2,3}b?", r"(casino|slots) bonus", r"\.(exe|scr)$",
            r"[[:digit:]]+%", r"\w+\W+\w+", r"^$", r"(a|b)*c", r"[a-z]K", r"x\|y"]
SUBJECT_CHARS = "abcxyzSKk \t-:.%@5\n_" + "".join(chr(c) for c in range(0x80, 0x100))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=SUBJECT_CHARS, max_size=30))
def test_regex_agrees_with_re_in_bytes_mode(subject: str) -> None:
    """decode = false (Postfix's byte matching): both engines give the same match."""
    for p in PATTERNS:
        for translated in (translate_posix(p, extended=True, newline=False).pattern,
                           translate_pcre(p, extended=False, ungreedy=False,
                                          dollar_endonly=False, multiline=False, extra=False)):
            for flags in (re.I | re.S, re.S, re.M):
                ours = regex.compile(translated, (int(flags) & ~re.ASCII) | regex.ASCII
                                     | regex.VERSION0).search(subject)
                theirs = re.compile(translated, flags | re.ASCII).search(subject)
                assert (ours and ours.span()) == (theirs and theirs.span()), (p, subject)
                assert (ours and ours.groups()) == (theirs and theirs.groups())


# --- body lines ---------------------------------------------------------------------


def _body(data: bytes, cuts: list[int]) -> Body:
    body = Body()
    last = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        body.write(data[last:cut])
        last = cut
    body.write(data[last:])
    return body


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200).map(lambda b: b.replace(b"x", b"\r").replace(b"y", b"\n")),
       st.lists(st.integers(min_value=0, max_value=400), max_size=10),
       st.one_of(st.none(), st.integers(min_value=1, max_value=20)))
def test_body_lines_split_like_bytes_split(data: bytes, cuts: list[int], cap: int | None) -> None:
    parts = data.split(b"\n")
    expected = [p + b"\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    got = list(body_lines(_body(data, cuts), cap))
    assert len(got) == len(expected)
    for line, want in zip(got, expected, strict=True):
        if cap is None or len(want.rstrip(b"\n")) <= cap:
            assert line == want
        elif want.endswith(b"\n"):  # the first `cap` bytes, then the line's own end
            content = want[:-1]
            end = b"\r\n" if content.endswith(b"\r") else b"\n"
            assert line == content[:cap].rstrip(b"\r") + end
        else:
            assert line == want[:cap]


def test_fifty_megabyte_one_line_body_is_linear(table: Table, checks: Checks,
                                                message: Message) -> None:
    f = checks(body_checks=(table("/^start/ WARN start seen\n/tail end/ REJECT\n"),))
    tx = message(headers=[("Subject", b" x")])
    line = b"start" + b"a" * 50_000_000 + b"tail end\n"
    for i in range(0, len(line), 65536):
        tx.body.write(line[i:i + 65536])
    started = time.perf_counter()
    v = f.check(tx)
    assert time.perf_counter() - started < 5
    # Past body_checks_size_limit (51200 bytes): the tail is not matched, as in Postfix.
    assert v.action is Action.ACCEPT
    assert any("start seen" in n for n in v.log_notes)


def test_line_cap_covers_what_matching_can_see() -> None:
    assert line_cap(0) is None
    cap = line_cap(51200)
    assert cap is not None and cap >= 8 * 51200 and cap >= 102400


def test_long_base64_line_is_decoded_up_to_the_limit(table: Table, checks: Checks,
                                                     message: Message) -> None:
    text = ("word " * 2000 + "needle " + "x" * 4_000_000).encode()
    f = checks(body_checks=(table("/needle/ REJECT found\n"),))
    tx = message(headers=[("Content-Type", b" text/plain; charset=utf-8"),
                          ("Content-Transfer-Encoding", b" base64")],
                 body=base64.b64encode(text) + b"\n")
    assert _timed(lambda: f.check(tx)) < 5
    assert f.check(tx).action is Action.REJECT


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_qp_early_join_decodes_the_same(text: str) -> None:
    """Decoding long soft-broken runs early (QP_JOIN) gives the same lines."""
    encoded = quopri.encodestring(text.encode("utf-8", "surrogatepass"))
    whole, early = TextDecoder("quoted-printable", "utf-8"), TextDecoder("quoted-printable",
                                                                         "utf-8")
    early.QP_JOIN = 5
    got: tuple[list[str], list[str]] = ([], [])
    for line in encoded.splitlines(keepends=True):
        got[0].extend(whole.feed(line))
        got[1].extend(early.feed(line))
    got[0].extend(whole.finish())
    got[1].extend(early.finish())
    assert got[0] == got[1]


def test_decoder_keeps_a_bounded_open_line() -> None:
    d = TextDecoder("quoted-printable", "utf-8", keep=1000)
    for _ in range(100_000):
        assert d.feed(b"abcdefghij=\n") == []
    assert d.full
    assert d._text_size <= 1000 + 2048
    lines = d.finish()
    assert len(lines) == 1 and lines[0].startswith("abcdefghij")


# --- MIME bombs -----------------------------------------------------------------------


def _walk(raw: bytes, decode: bool = True) -> list[object]:
    headers, body = parse_message(raw)
    tx = Transaction(Connection(client_addr="192.0.2.1"), rcpt_to=["r@example.org"])
    tx.headers = headers
    tx.body.write(body)
    mode = TextMode.TEXT if decode else TextMode.BYTES
    return list(MessageWalker(tx, mode, decode, 51200, Budget(10)).items())


def test_ten_thousand_nested_multiparts() -> None:
    raw = b"Content-Type: multipart/mixed; boundary=b0\n\n"
    for i in range(1, 10_000):
        raw += f"--b{i - 1}\nContent-Type: multipart/mixed; boundary=b{i}\n\n".encode()
    raw += b"--b9999\n\ntext\n"
    assert _timed(lambda: _walk(raw)) < 5


def test_thirty_thousand_parts() -> None:
    raw = (b"Content-Type: multipart/mixed; boundary=b\n\n"
           + b"--b\nContent-Type: text/plain\n\nx\n" * 30_000 + b"--b--\n")
    items = []
    assert _timed(lambda: items.extend(_walk(raw))) < 5
    assert len(items) > 30_000


def test_huge_boundary_and_parameters() -> None:
    boundary = b"B" * 200_000
    raw = (b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"\n\n--" + boundary
           + b"\nContent-Type: text/plain; " + b"; ".join(
               f"name*{i}*=utf-8''%E3%81%82".encode() for i in range(20_000))
           + b"; x*" + b"9" * 5000 + b"=1\n\nbody\n")
    assert _timed(lambda: _walk(raw)) < 5


def test_rfc2231_section_numbers_of_any_length() -> None:
    params = collapse_params([("name*" + "9" * 5000, "a"), ("title*0*", "us-ascii'en'%41"),
                              ("title*1", "B")])
    assert params["title"] == "AB"
    assert params["name*" + "9" * 5000] == "a"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400))
def test_parameter_parsers_never_raise(value: str) -> None:
    head, pairs = split_params(value)
    assert isinstance(head, str)
    collapse_params(pairs)
    parse_content_type(value)
    filename_of(value, parse_content_type(value))
    decode_words(value.encode("utf-8", "surrogatepass"))


MIME_WORDS = [b"Content-Type: ", b"multipart/mixed; boundary=", b"message/rfc822",
              b"text/plain; charset=", b"utf-16", b"iso-2022-jp", b"x-bogus", b"\"b\"", b"b",
              b"Content-Transfer-Encoding: ", b"base64", b"quoted-printable", b"--b", b"--b--",
              b"\n", b"\r\n", b"\n\n", b" ", b"=", b"=?utf-8?B?", b"?=", b"name*0*=", b"''%ff",
              b"Content-Disposition: attachment; filename=", b";", b"(", b")", b"\xff", b"\x00"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(MIME_WORDS), st.binary(max_size=20)), max_size=80),
       st.booleans())
def test_mime_walker_never_raises(pieces: list[bytes], decode: bool) -> None:
    """For any bytes the walker yields items, never an exception."""
    raw = b"Content-Type: multipart/mixed; boundary=b\n" + b"".join(pieces)
    for item in _walk(raw, decode):
        assert item is not None


@pytest.fixture(scope="module")
def every_key(tmp_path_factory: pytest.TempPathFactory) -> ChecksFilter:
    from milters.checks import ChecksSettings

    path = tmp_path_factory.mktemp("tables") / "all"
    path.write_text("/money/ REJECT\n/^Subject:/ WARN s\n/./ INFO any\n")
    spec = (f"regexp:{path}",)
    return ChecksFilter(ChecksSettings(header_checks=spec, body_checks=spec,
                                       filename_checks=spec), Env(GlobalSettings()))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600).map(lambda b: b.replace(b"m", b"\n")))
def test_whole_filter_answers_arbitrary_bytes(every_key: ChecksFilter, raw: bytes) -> None:
    f = every_key
    headers, body = parse_message(raw)
    tx = Transaction(Connection(client_addr="192.0.2.1"), rcpt_to=["r@example.org"])
    tx.headers = headers
    tx.body.write(body)
    assert f.check(tx).action in (Action.ACCEPT, Action.REJECT)


# --- which searches go without a timeout (cost.py) ----------------------------------


@pytest.mark.parametrize(("pattern", "timed_always"), [
    (r"(a+)+$", True), (r"(a|a)+$", True), (r"(\w+\s?)+$", True), (r"(?=a)b", True),
    (r"(a)\1", True), (r"(\.[a-z]+)+", True),
    (r"^Subject:.*viagra", False), (r"abc", False), (r"x.*y.*z", False), (r"(foo\s+)?bar", False),
])
def test_exponential_shapes_are_always_timed(pattern: str, timed_always: bool) -> None:
    assert (free_length(regex.compile(pattern, regex.VERSION0)) == 0) is timed_always


def test_free_length_shrinks_with_repetitions() -> None:
    one, two = (free_length(regex.compile(p, regex.VERSION0)) for p in (r"a.*b", r"a.*b.*c"))
    assert 0 < two < one <= 10**7
    # n^(k+1) steps stay under FREE_STEPS for every subject searched untimed.
    assert two ** 3 <= FREE_STEPS


PREFIX_PATTERNS = [r"^(To|Cc):", r"^Subject: ", r"\AX-Mailer:\s", r"^Content-(Type|Disposition):",
                   r"^k", r"^ſ", r"^i"]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ToCcSubjectX-Mailer:ContentypDisposK\u212aſıİi \n", max_size=25),
       st.booleans(), st.booleans())
def test_prefix_test_never_rules_out_a_match(subject: str, caseless: bool, ascii_: bool) -> None:
    """Ruling a subject out before the search never hides a match (Kelvin sign, ſ, İ...)."""
    flags = regex.VERSION0 | (regex.IGNORECASE if caseless else 0) | (regex.ASCII if ascii_
                                                                       else 0)
    for p in PREFIX_PATTERNS:
        compiled = regex.compile(p, flags)
        prefixes = anchored_prefixes(compiled)
        if prefixes is not None and prefixes.rule_out(subject):
            assert compiled.search(subject) is None, (p, subject)


def test_untimed_searches_still_stop_at_the_budget(table: Table, checks: Checks,
                                                   message: Message) -> None:
    # Each search is cheap and untimed; 200,000 header fields still run over 0.2 s.
    f = checks(header_checks=(table("/^X-Never: (a|b)/ REJECT\n/nothing here/ REJECT\n"),),
               match_timeout=0.2)
    v = f.check(message(headers=[(f"X-F{i}", b" v") for i in range(200_000)]))
    assert v.action is Action.TEMPFAIL
    assert any("header_checks matching, line after line, ran over" in n for n in v.log_notes)
