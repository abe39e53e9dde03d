"""Load and action parity with Postfix 3.7 (issue 11), decided directly.

What Postfix's table loader (dict_regexp.c, dict_pcre.c, mac_parse.c) skips with
a warning we skip with a warning; what its cleanup_act() (cleanup_message.c) does
not know in header/body checks matches and changes nothing. The e2e differential
test holds the same against a real Postfix; these pin each rule of it down.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from milters.checks import ChecksFilter
from milters.checks.actions import Context, Kind, parse_action
from milters.checks.tables import TextMode, parse_table
from milters.core.model import Transaction
from milters.core.verdict import Action, EditKind, Reply

Table = Callable[..., str]
Checks = Callable[..., ChecksFilter]
Message = Callable[..., Transaction]


def content(result: str, groups: int = 1, access_style: bool = False) -> tuple[Kind, str]:
    action = parse_action(result, groups, False, Context.CONTENT, "header_checks",
                          access_style)
    return action.kind, action.warning


@pytest.mark.parametrize("word", ["REJECT", "reject", "Warn", "info", "PASS", "DISCARD",
                                  "hold", "IGNORE", "DUNNO", "ok", "BCC a@b", "REDIRECT a@b",
                                  "PREPEND X: y", "replace X: y"])
def test_words_cleanup_knows_load_without_warning(word: str) -> None:
    kind, warning = content(word)
    assert kind.value == word.split()[0].upper() and warning == ""


@pytest.mark.parametrize("result", ["DEFER later", "defer", "554 5.7.1 no", "451 4.7.1 later",
                                    "FROBNICATE", "TEMPFAIL x", "UNKNOWN", "CODE 1"])
def test_words_cleanup_does_not_know_are_unknown_commands(result: str) -> None:
    kind, warning = content(result)
    assert kind is Kind.UNKNOWN
    assert warning.startswith(f"unknown command in header_checks map: {result}")


@pytest.mark.parametrize(("result", "kind"), [("DEFER later", Kind.DEFER),
                                               ("554 5.7.1 no", Kind.CODE)])
def test_access_style_actions_opt_in(result: str, kind: Kind) -> None:
    assert content(result, access_style=True) == (kind, "")


def test_strip_is_ignore_as_in_postfix_3_7() -> None:
    assert content("STRIP") == (Kind.IGNORE, "")
    assert content("strip some text") == (Kind.IGNORE, "")


def test_filter_loads_with_a_warning_that_it_must_stay_in_postfix() -> None:
    kind, warning = content("FILTER smtp:[127.0.0.1]:10025")
    assert kind is Kind.FILTER and "keep this rule in Postfix" in warning


@pytest.mark.parametrize(("result", "why"), [
    ("PREPEND", "PREPEND action without text in header_checks map"),
    ("REPLACE", "REPLACE action without text in header_checks map"),
    ("REDIRECT nobody", 'bad REDIRECT target "nobody" in header_checks map'),
    ("BCC nobody", 'bad BCC address "nobody" in header_checks map'),
    ("$1 text", "from a $ substitution"),
])
def test_malformed_actions_do_nothing_with_cleanups_warning(result: str, why: str) -> None:
    kind, warning = content(result)
    assert kind is Kind.UNKNOWN and why in warning


def test_tab_ends_the_action_word_as_strcspn_does() -> None:
    action = parse_action("REJECT\tgo away", 0, False, Context.CONTENT)
    assert action.kind is Kind.REJECT and action.text.expand(lambda _: "") == "go away"


# --- the table loader -----------------------------------------------------------


def load(text: str, kind: str = "regexp") -> tuple[list[str], Callable[[str], Kind | None]]:
    table = parse_table(text.encode(), f"{kind}:t", "t", kind, TextMode.BYTES,
                        context=Context.CONTENT)

    def kind_of(subject: str) -> Kind | None:
        hit = table.lookup(subject)
        return hit.kind if hit else None

    return list(table.warnings), kind_of


@pytest.mark.parametrize("kind", ["regexp", "pcre"])
def test_negation_and_spaces_before_the_delimiter(kind: str) -> None:
    warnings, kind_of = load("! /^a/ REJECT\n", kind)
    assert warnings == [] and kind_of("b") is Kind.REJECT and kind_of("a") is None
    warnings, kind_of = load("! ! /^a/ WARN\n", kind)
    assert kind_of("a") is Kind.WARN


def test_any_delimiter_even_a_letter_after_a_bang() -> None:
    _, kind_of = load("!xaxi REJECT\n")  # the delimiter is "x", the flag "i"
    assert kind_of("b") is Kind.REJECT and kind_of("a") is None


def test_regexp_second_pattern_must_not_match() -> None:
    warnings, kind_of = load("/^Subject:/!/spam/ REJECT\n/^Subject:/ WARN\n")
    assert warnings == []
    assert kind_of("Subject: ham") is Kind.REJECT and kind_of("Subject: spam") is Kind.WARN


def test_pcre_has_no_second_pattern() -> None:
    warnings, kind_of = load("/^Subject:/!/spam/ REJECT\n", "pcre")
    assert warnings and "unknown regexp option \"!\"" in warnings[0]
    assert kind_of("Subject: ham") is None


def test_a_line_that_starts_with_a_letter_is_not_a_rule() -> None:
    warnings, kind_of = load("REJECT /a/\nifx /a/\nendiffy\n/a/ WARN\n")
    assert [w.split(": ", 1)[1] for w in warnings] == ["ignoring unrecognized request"] * 3
    assert kind_of("a") is Kind.WARN


def test_non_ascii_letter_starts_a_rule_as_in_the_c_locale() -> None:
    # isalnum() in the C locale is ASCII only: the byte 0xE9 (Latin-1 "é") is a
    # delimiter there, not a letter that would make the line an unknown request.
    table = parse_table(b"\xe9a\xe9 REJECT\n", "regexp:t", "t", "regexp", TextMode.BYTES,
                        context=Context.CONTENT)
    assert table.warnings == () and (h := table.lookup("a")) is not None
    assert h.kind is Kind.REJECT


def test_no_action_text_loads_with_a_warning_and_defers_as_postfix() -> None:
    warnings, kind_of = load("/a/\n/a/ REJECT\n")
    assert warnings[0] == "t:1: no replacement text: using empty string"
    assert kind_of("a") is Kind.CODE


# --- the filter -----------------------------------------------------------------


def test_unknown_command_matches_changes_nothing_and_shields_later_rules(
    table: Table, checks: Checks, message: Message
) -> None:
    f = checks(header_checks=(table("/^Subject: x/ DEFER later\n/^Subject:/ REJECT\n"),))
    assert any("unknown command in header_checks map: DEFER later" in w
               for w in f.load_warnings())
    v = f.check(message(raw=b"Subject: x\r\n\r\nbody\r\n"))
    assert v.action is Action.ACCEPT and v.reply is None
    assert any("unknown command in header_checks map: DEFER later" in n for n in v.log_notes)
    # A line the unknown command does not match still meets the REJECT.
    assert f.check(message(raw=b"Subject: y\r\n\r\nbody\r\n")).action is Action.REJECT


def test_filter_rule_is_logged_and_does_nothing(table: Table, checks: Checks,
                                                message: Message) -> None:
    f = checks(body_checks=(table("/scan me/ FILTER smtp:[127.0.0.1]:10025\n"),))
    v = f.check(message(raw=b"Subject: x\r\n\r\nplease scan me\r\n"))
    assert v.action is Action.ACCEPT and not v.add_rcpts and v.replace_body is None
    assert any("keep this rule in Postfix" in n for n in v.log_notes)


def test_strip_removes_the_field(table: Table, checks: Checks, message: Message) -> None:
    f = checks(header_checks=(table("/^X-Secret:/ STRIP\n"),))
    v = f.check(message(raw=b"X-Secret: 1\r\nSubject: x\r\n\r\nbody\r\n"))
    assert [(e.kind, e.name) for e in v.header_edits] == [(EditKind.DELETE, "X-Secret")]


def test_reject_with_a_success_code_defers_as_postfix(table: Table, checks: Checks,
                                                      message: Message) -> None:
    f = checks(header_checks=(table("/^Subject:/ REJECT 2.0.0 fine\n"),))
    assert any("bad DSN action" in w for w in f.load_warnings())
    v = f.check(message(raw=b"Subject: x\r\n\r\nbody\r\n"))
    assert (v.action, v.reply) == (Action.TEMPFAIL, Reply("451", "4.0.0", "fine"))


def test_redirect_target_from_a_group_without_at_is_only_logged(
    table: Table, checks: Checks, message: Message
) -> None:
    f = checks(header_checks=(table("/^X-To: (\\S+)/ REDIRECT $1\n", "pcre"),))
    v = f.check(message(raw=b"X-To: nobody\r\n\r\nbody\r\n"))
    assert v.action is Action.ACCEPT and not v.add_rcpts and not v.del_rcpts
    assert any('bad REDIRECT address "nobody"' in n for n in v.log_notes)
    v = f.check(message(raw=b"X-To: trap@example.jp\r\n\r\nbody\r\n"))
    assert v.add_rcpts == ("trap@example.jp",)


def test_skipped_lines_are_in_describe(table: Table, checks: Checks) -> None:
    spec = table("/a/ REJECT costs 5 $ only\n/b/ WARN\n")
    lines = checks(header_checks=(spec,)).describe()
    assert f"header_checks: {spec} (1 rules)" in lines
    assert any(line.startswith("warning: ") and ":1: bad replacement syntax" in line
               for line in lines)


def test_access_tables_still_refuse_unknown_actions(table: Table, checks: Checks) -> None:
    from milters.core.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown action 'FROB'"):
        checks(sender_checks=(table("/a/ FROB\n"),))


@pytest.mark.parametrize(("pattern", "caseless", "matches", "misses"), [
    # PCRE: an option setting lasts to the end of its group, later branches included.
    (r"^X: (?-i)EXACT$", True, ["x: EXACT", "X: EXACT"], ["X: exact"]),
    (r"(a(?i)b|c)d", False, ["abd", "aBd", "Cd"], ["ABd", "abD"]),
    (r"a(?i)b|C", False, ["aB", "c", "C"], ["Ab"]),
    (r"(?:x(?-i)Y|z)|W", True, ["XY", "xY", "w", "W"], ["xy", "Z"]),
])
def test_pcre_option_settings_are_scoped_as_in_pcre(pattern: str, caseless: bool,
                                                    matches: list[str],
                                                    misses: list[str]) -> None:
    import re as std_re

    from milters.checks.patterns import translate_pcre
    rx = std_re.compile(translate_pcre(pattern), std_re.IGNORECASE if caseless else 0)
    assert [m for m in matches if not rx.fullmatch(m)] == []
    assert [m for m in misses if rx.fullmatch(m)] == []
