"""Table files: every syntax element of regexp_table(5)/pcre_table(5), and refusals."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from milters.checks.actions import Context, Kind
from milters.checks.tables import Maps, Table, TextMode, load_maps, parse_table
from milters.core.errors import ConfigError


def load(spec: str, mode: TextMode = TextMode.BYTES) -> Maps:
    return load_maps("header_checks", [spec], mode)


def kind_of(maps: Maps, subject: str) -> Kind | None:
    hit = maps.lookup(subject)
    return hit.kind if hit else None


def parse(text: str, kind: str = "regexp", context: Context = Context.ACCESS) -> Table:
    return parse_table(text.encode(), f"{kind}:t", "t", kind, TextMode.BYTES,
                       context=context)


def warnings_of(text: str, kind: str = "regexp", context: Context = Context.ACCESS) -> str:
    """The load warnings of a table that loads (as Postfix's would)."""
    return "\n".join(parse(text, kind, context).warnings)


def error_of(text: str, kind: str = "regexp") -> str:
    with pytest.raises(ConfigError) as exc:
        parse(text, kind)
    return str(exc.value)


# --- file structure -------------------------------------------------------------


def test_comments_blank_lines_and_first_match_wins(table: Callable[..., str]) -> None:
    maps = load(table("# comment\n\n   # indented comment\n/^Subject: a/ REJECT\n"
                      "/^Subject:/ DISCARD\n"))
    assert kind_of(maps, "Subject: abc") is Kind.REJECT
    assert kind_of(maps, "Subject: xyz") is Kind.DISCARD
    assert kind_of(maps, "From: x") is None


def test_continuation_line_joins_and_comments_do_not_break_it() -> None:
    t = parse("/^Subject: x/ REJECT first\n# a comment in between\n  second part\n/^To:/ WARN\n")
    hit = t.lookup("Subject: x")
    assert hit is not None and hit.text == "first  second part"
    assert t.lookup("To: y") is not None


def test_continuation_with_nothing_to_continue_is_skipped_with_a_warning() -> None:
    # readlline.c: "logical line must not start with whitespace", and the line is skipped.
    t = parse("  /x/ REJECT\n   more\n/y/ WARN\n")
    assert "t:1: logical line must not start with whitespace" in "\n".join(t.warnings)
    assert t.lookup("x") is None and t.lookup("y") is not None


def test_any_delimiter_and_escaped_delimiter() -> None:
    t = parse("#^X-A: a/b# REJECT\n|^X-B: a\\|b| DISCARD\n/^X-C: a\\/b/ WARN\n")
    # "#" at the start of a line is a comment, so the first rule is not a rule.
    assert t.lookup("X-A: a/b") is None
    assert [h.kind for h in (t.lookup("X-B: a|b"), t.lookup("X-C: a/b")) if h] == [
        Kind.DISCARD, Kind.WARN]


def test_negation_and_double_negation() -> None:
    t = parse("!/^Subject:/ WARN not a subject\n!!/^To:/ INFO to\n")
    assert (hit := t.lookup("From: x")) is not None and hit.kind is Kind.WARN
    assert (hit := t.lookup("Subject: x")) is None
    t2 = parse("!!/^To:/ INFO to\n")
    assert t2.lookup("To: x") is not None and t2.lookup("From: x") is None


def test_if_endif_nesting_and_negated_if() -> None:
    t = parse(
        "if /^Subject:/\n"
        "  # indented comment inside the block\n"
        "/free/ REJECT free\n"
        "if !/ok/\n"
        "/money/ DISCARD money\n"
        "endif\n"
        "ENDIF\n"
        "/money/ WARN elsewhere\n"
    )
    assert (h := t.lookup("Subject: free stuff")) and h.kind is Kind.REJECT
    assert (h := t.lookup("Subject: money")) and h.kind is Kind.DISCARD
    # Inside the IF nothing matches, so the rule after ENDIF gets its turn.
    assert (h := t.lookup("Subject: money ok")) and h.kind is Kind.WARN
    assert (h := t.lookup("X-Note: money")) and h.kind is Kind.WARN


def test_unbalanced_if_and_endif_load_with_warnings() -> None:
    # dict_regexp.c: an IF without ENDIF runs to the end of the file.
    t = parse("/c/ WARN\nif /a/\n/b/ REJECT\n")
    assert "t:2: IF has no matching ENDIF" in "\n".join(t.warnings)
    assert (h := t.lookup("ab")) is not None and h.kind is Kind.REJECT
    assert t.lookup("b") is None and t.lookup("c") is not None
    t = parse("endif\n/a/ WARN\n")
    assert "t:1: ignoring ENDIF without matching IF" in "\n".join(t.warnings)
    assert t.lookup("a") is not None
    t = parse("if /a/ REJECT\n/b/ WARN\nendif junk\n")
    assert "t:1: ignoring extra text after IF statement" in "\n".join(t.warnings)
    assert "t:3: ignoring extra text after ENDIF" in "\n".join(t.warnings)
    assert t.lookup("ab") is not None and t.lookup("b") is None  # the IF still applies


def test_missing_file_names_key_and_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_maps("body_checks", [f"regexp:{tmp_path}/nope"], TextMode.BYTES)
    assert "body_checks" in str(exc.value) and f"{tmp_path}/nope" in str(exc.value)


def test_unsupported_table_type_is_an_error() -> None:
    with pytest.raises(ConfigError, match="hash:"):
        load_maps("header_checks", ["hash:/etc/postfix/x"], TextMode.BYTES)


def test_several_tables_first_table_with_a_match_answers(table: Callable[..., str]) -> None:
    first = table("/^Subject: hello/ DUNNO\n")
    second = table("/^Subject:/ REJECT\n", kind="pcre")
    maps = load_maps("header_checks", [first, second], TextMode.BYTES)
    assert kind_of(maps, "Subject: hello") is Kind.DUNNO  # shields it from table two
    assert kind_of(maps, "Subject: other") is Kind.REJECT


def test_all_problems_reported_together() -> None:
    text = "/a/ FROBNICATE\n/b/ REJECT $1\n/c/ FILTER smtp:x\n"
    msg = error_of(text)
    assert "t:1:" in msg and "t:3:" in msg  # access-style: refused
    assert "t:1:" in warnings_of("/b/ REJECT $1\n")
    found = warnings_of(text, context=Context.CONTENT)
    assert "t:1:" in found and "t:2:" in found and "t:3:" in found


# --- flags ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["regexp", "pcre"])
def test_case_insensitive_by_default_and_i_toggles(kind: str) -> None:
    t = parse("/^subject: ABC/ REJECT\n/^x-case: ABC/i WARN\n/^x-twice: ABC/ii INFO\n", kind)
    assert t.lookup("SUBJECT: abc") is not None
    assert t.lookup("x-case: ABC") is not None and t.lookup("x-case: abc") is None
    assert t.lookup("X-TWICE: abc") is not None


def test_regexp_m_flag_and_dotall_default() -> None:
    folded = "Subject: a\n b"
    t = parse("/^Subject: a$/ REJECT\n")
    assert t.lookup(folded) is None  # without m, $ is the very end
    t = parse("/^Subject: a$/m REJECT\n")
    assert t.lookup(folded) is not None
    t = parse("/^Subject: a.b/ REJECT\n")
    assert t.lookup("Subject: a\nb") is not None  # POSIX . matches newline
    t = parse("/^Subject: a.b/m REJECT\n/a[^x]b/m WARN\n")
    assert t.lookup("Subject: a\nb") is None and t.lookup("X: a\nb") is None


def test_regexp_x_flag_selects_basic_syntax() -> None:
    t = parse("/^X-A: \\(ab\\)\\{2\\}+$/x REJECT\n")
    assert t.lookup("X-A: abab+") is not None and t.lookup("X-A: ababab") is None


def test_pcre_flags_s_m_x_A_E_U_X() -> None:
    assert parse("/a.b/ R\n".replace("R", "REJECT"), "pcre").lookup("a\nb") is not None
    assert parse("/a.b/s REJECT\n", "pcre").lookup("a\nb") is None
    assert parse("/^b$/m REJECT\n", "pcre").lookup("a\nb\nc") is not None
    assert parse("/a b # comment/x REJECT\n", "pcre").lookup("xaby") is not None
    t = parse("/b/A REJECT\n", "pcre")
    assert t.lookup("ab") is None and t.lookup("ba") is not None
    assert parse("/a$/ REJECT\n", "pcre").lookup("a\n") is not None
    assert parse("/a$/E REJECT\n", "pcre").lookup("a\n") is None
    t = parse("/^X: (a+)/U REPLACE X: $1\n", "pcre")
    assert (hit := t.lookup("X: aaa")) is not None and hit.text == "X: a"
    # PCRE2 (Postfix 3.7 on Debian 12) refuses unknown escapes, so Postfix skips
    # the rule; it ignores the X flag with a warning.
    t = parse("/\\y/ REJECT\n/z/X WARN\n", "pcre")
    assert t.lookup("y") is None and "t:1:" in t.warnings[0]
    assert "t:2: ignoring obsolete regexp option" in t.warnings[1]
    assert (h := t.lookup("z")) is not None and h.kind is Kind.WARN


def test_unknown_flag_skips_the_rule_with_a_warning() -> None:
    t = parse("/a/s REJECT\n/a/ WARN\n")
    assert "t:1: unknown regexp option \"s\"" in t.warnings[0]
    assert (h := t.lookup("a")) is not None and h.kind is Kind.WARN
    assert "unknown regexp option \"q\"" in warnings_of("/a/q REJECT\n", "pcre")


# --- patterns ------------------------------------------------------------------


def test_broken_regex_names_file_line_and_error() -> None:
    msg = warnings_of("/ok/ REJECT\n\n/^Subject: (unclosed/ REJECT\n", "pcre")
    assert msg.startswith("t:3:") and "missing )" in msg and "skipping this rule" in msg


def test_missing_closing_delimiter_and_missing_action() -> None:
    assert "no closing regexp delimiter \"/\"" in warnings_of("/abc REJECT\n")
    assert "missing action" in error_of("/abc/\n")  # access-style table
    t = parse("/abc/\n", context=Context.CONTENT)
    assert "no replacement text: using empty string" in t.warnings[0]
    # maps.c: an empty result is a lookup error; cleanup defers the message.
    assert (h := t.lookup("abc")) is not None and h.kind is Kind.CODE
    assert (h.rule.action.code, h.text) == ("451", "4.3.0 Error: queue file write error")


def test_posix_classes_are_translated() -> None:
    t = parse("/^X: [[:digit:]]+[[:space:]][[:alpha:]]$/ REJECT\n")
    assert t.lookup("X: 123 a") is not None and t.lookup("X: 12a a") is None
    t = parse("/^X: [[:upper:]]$/i WARN\n")  # case-sensitive
    assert t.lookup("X: A") is not None and t.lookup("X: a") is None
    assert parse("/[[:^digit:]]/ REJECT\n", "pcre").lookup("1a") is not None


def test_posix_bracket_backslash_is_literal() -> None:
    t = parse("/^X: [\\n]$/ REJECT\n")
    assert t.lookup("X: n") is not None and t.lookup("X: \\") is not None
    assert t.lookup("X: \n") is None


def test_posix_word_boundaries_and_backreferences() -> None:
    t = parse("/\\<money\\>/ REJECT\n/^X: (a+)-\\1$/ WARN\n")
    assert t.lookup("Subject: money now") is not None
    assert t.lookup("Subject: moneyless") is None
    assert t.lookup("X: aa-aa") is not None and t.lookup("X: aa-a") is None


@pytest.mark.parametrize(("pattern", "why"), [
    ("/(?:a)/", "Invalid preceding regular expression"),
    ("/[[:foo:]]/", "Invalid character class name"),
    ("/a(/", "Unmatched ( or \\("),
    ("/a{2,1}/", "Invalid content of \\{\\}"),
    ("/[z-a]/", "Invalid range end"),
])
def test_posix_patterns_glibc_refuses_are_skipped_with_its_text(pattern: str, why: str) -> None:
    # dict_regexp.c: "regexp map F, line N: <regerror() text>", and the rule is skipped.
    assert warnings_of(f"{pattern} REJECT\n") == f"t:1: {why}"


def test_posix_patterns_are_read_as_glibc_reads_them() -> None:
    # \d is no digit class; a** is accepted; leftmost-longest alternation.
    t = parse("/^X: a\\d/i REJECT\n/^Y: b**$/ REJECT\n/^Z: (a|ab)/ REPLACE [$1]\n",
              context=Context.CONTENT)
    assert not t.warnings
    assert t.lookup("X: ad") is not None and t.lookup("X: a1") is None
    assert t.lookup("Y: bbb") is not None
    hit = t.lookup("Z: abc")
    assert hit is not None and hit.text == "[ab]"


@pytest.mark.parametrize(("pattern", "why"), [
    ("/(?R)/", "recursion"),
    ("/a(?1)/", "recursion"),
    ("/\\p{Han}/", "Unicode property"),
    ("/(?|a)/", "branch reset"),
    ("/(*UTF8)a/", "verbs"),
    ("/\\K/", "\\K"),
])
def test_untranslatable_pcre_constructs_are_skipped(pattern: str, why: str) -> None:
    msg = warnings_of(f"{pattern} REJECT\n", "pcre")
    assert msg.startswith("t:1:") and why in msg


def test_pcre_extras_translated() -> None:
    t = parse("/\\Qa.b\\E/ REJECT\n/(?<w>x)\\k<w>/ WARN\n/\\h\\d\\z/ INFO\n/x{,2}/ HOLD\n",
              "pcre")
    assert t.lookup("a.b") is not None and t.lookup("axb") is None
    assert (h := t.lookup("xx")) is not None and h.kind is Kind.WARN
    assert (h := t.lookup("a\t1")) is not None and h.kind is Kind.INFO
    assert (h := t.lookup("x{,2}")) is not None and h.kind is Kind.HOLD  # literal in PCRE2 10.42
    assert parse("/a++b/ REJECT\n", "pcre").lookup("aab") is not None  # possessive


def test_bytes_mode_matches_bytes_and_text_mode_matches_text() -> None:
    rule = "/^Subject: 日本/ REJECT\n".encode()
    raw = "Subject: 日本語".encode()
    b = parse_table(rule, "regexp:t", "t", "regexp", TextMode.BYTES)
    assert b.lookup(TextMode.BYTES.subject(raw)) is not None
    assert parse_table(b"/^X: .$/ REJECT\n", "regexp:t", "t", "regexp", TextMode.BYTES).lookup(
        TextMode.BYTES.subject("X: é".encode())) is None  # one byte per '.', as in Postfix
    t = parse_table(rule, "regexp:t", "t", "regexp", TextMode.TEXT)
    assert t.lookup("Subject: 日本語") is not None


# --- actions -----------------------------------------------------------------


def test_every_action_word_parses_case_insensitively() -> None:
    words = ["REJECT", "reject text", "DEFER", "450 later", "550 5.7.0 no", "DISCARD",
             "HOLD", "WARN", "INFO", "IGNORE", "PREPEND X-A: b", "REPLACE X-A: b",
             "REDIRECT a@b", "BCC a@b", "DUNNO", "OK", "PASS"]
    text = "".join(f"/^x{i}:/ {w}\n" for i, w in enumerate(words))
    t = parse(text)
    assert len(list(t.all_rules())) == len(words)
    assert t.lookup("x1: y") is not None and t.lookup("x1: y").kind is Kind.REJECT  # type: ignore[union-attr]


@pytest.mark.parametrize(("rule", "why"), [
    ("/a/ FROBNICATE", "unknown action 'FROBNICATE'"),
    ("/a/ FILTER smtp:[10.0.0.1]", "FILTER"),
    ("/a/ costs 5 only", "unknown action"),
    ("/a/ REDIRECT", "needs text"),
    ("/a/ 250 fine", "unknown action"),
    ("/a/ 450 5.7.1 mixed", "disagree"),
    ("/a/ STRIP", "access table"),
])
def test_bad_actions_in_access_style_tables_are_config_errors(rule: str, why: str) -> None:
    msg = error_of(rule + "\n")
    assert msg.startswith("t:1:") and why in msg


@pytest.mark.parametrize(("rule", "why"), [
    ("/a/ REJECT costs 5 $ only", "bad replacement syntax"),
    ("/a/ costs 5 $ only", "bad replacement syntax"),
    ("/a/ REJECT ${1", "bad replacement syntax"),
    ("/a/ REJECT $foo", "non-numeric replacement index \"foo\""),
    ("/(a)/ REJECT $1x", "non-numeric replacement index \"1x\""),
    ("/(a)/ REJECT $0", "out-of-range replacement index \"0\""),
    ("/(a)/ REJECT $2", "out of range replacement index \"2\""),
    ("!/(a)/ REJECT $1", "$number found in negative match"),
])
@pytest.mark.parametrize("context", list(Context))
def test_bad_replacement_text_skips_the_rule_in_every_table(
    rule: str, why: str, context: Context
) -> None:
    t = parse(rule + "\n/a/ WARN\n", context=context)
    assert t.warnings[0].startswith("t:1:") and why in t.warnings[0]
    assert "skipping this rule" in t.warnings[0]
    assert (h := t.lookup("a")) is not None and h.kind is Kind.WARN


def test_substitutions_dollar_forms() -> None:
    t = parse("/^X: (a+)(b*)(c?)/ REPLACE X: $1-${2}-$(3)-$$\n", "pcre")
    assert (h := t.lookup("X: aabbc")) is not None and h.text == "X: aa-bb-c-$"
    t = parse("/^Y: (a)|(b)/ WARN [$1][$2]\n")  # a group that did not take part is empty
    assert (h := t.lookup("Y: b")) is not None and h.text == "[][b]"
