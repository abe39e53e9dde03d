"""Lookups where the randomized differential test against `postmap -q`
(tests/e2e/test_checks_postmap_fuzz.py) found us answering otherwise than Postfix
3.7; each expected answer is what postmap printed."""

from __future__ import annotations

import time

import pytest

from milters.checks.actions import Context
from milters.checks.tables import Budget, Maps, Table, TextMode, parse_table


def parse(text: str, kind: str, mode: TextMode = TextMode.BYTES) -> Table:
    return parse_table(text.encode("latin-1"), f"{kind}:t", "t", kind, mode,
                       context=Context.CONTENT, key="header_checks")


def answer(table: Table, key: str) -> str | None:
    """What Postfix's dict lookup returns: the whole result after substitution."""
    hit = table.lookup(key)
    return None if hit is None else hit.result


KEY = "B#.b:B#abb#.b:b#ABA"


@pytest.mark.parametrize(("result", "expected"), [
    ("X <$1>", None),  # regexec() with 2 slots: glibc finds no match
    ("X", "X"),  # REG_NOSUB
    ("X <$2>", "X <b#>"),  # 3 slots: a match again
])
def test_regexp_regexec_gets_the_slots_postfix_gives_it(result: str, expected: str | None
                                                        ) -> None:
    # dict_regexp.c compiles with REG_NOSUB when the result has no $N, and else
    # hands regexec() 1 + the largest N slots; with back references glibc's answer
    # depends on both. The $N text comes from that same call.
    for mode in TextMode:
        table = parse(f"/((b\\>#)\\.b:\\2Ab)+a/ {result}\n", "regexp", mode)
        assert answer(table, KEY) == expected


def test_regexp_second_pattern_is_searched_without_slots() -> None:
    # `/pat1/!/pat2/`: pat2 always gets REG_NOSUB (its glibc answer here: a match,
    # so the rule does not apply).
    table = parse("/B#/!/((b\\>#)\\.b:\\2Ab)+a/ X\n/./ Y\n", "regexp")
    assert answer(table, KEY) == "Y"


@pytest.mark.parametrize(("key", "expected"), [
    ("bab", "X ab"), ("ba", "X b"), ("abab", "X ab"), ("a", None)])
def test_pcre_back_reference_inside_the_group_it_names(key: str, expected: str | None
                                                       ) -> None:
    # PCRE: the text of the group's previous iteration (failing in the first);
    # Python's re and regex's VERSION0 refused the pattern, so the rule was skipped.
    table = parse("/(a\\1|b)+/ X $1\n", "pcre")
    assert not [w for w in table.warnings if "skipping" in w]
    assert answer(table, key) == expected


@pytest.mark.parametrize("kind", ["regexp", "pcre"])
@pytest.mark.parametrize("mode", list(TextMode))
def test_not_a_word_boundary_matches_an_empty_subject(kind: str, mode: TextMode) -> None:
    # glibc and PCRE: \B matches the empty string (an empty body line); Python's
    # \B never did.
    table = parse("/\\B/ X\n/^$/ Y\n", kind, mode)
    assert answer(table, "") == "X"
    assert answer(table, "a") is None
    assert answer(table, "ab") == "X"
    assert answer(parse("/^a\\B/ Z\n", kind, mode), "a") is None


def test_regexp_pattern_ends_at_a_backslash_that_ends_the_line() -> None:
    # dict_regexp_get_pat(): a backslash with nothing after it stops the search for
    # the delimiter and is overwritten: `/abc\` is /abc/ without result text, and
    # `if /a\` opens an IF block.
    table = parse("/abc\\\n", "regexp")
    assert "t:1: no replacement text: using empty string" in table.warnings
    assert answer(table, "xabcx") == ""
    nested = parse("if /a\\\n/b/ X\nendif\n", "regexp")
    assert [answer(nested, k) for k in ("b", "ab")] == [None, "X"]


def test_pcre_pattern_with_a_backslash_at_the_end_has_no_closing_delimiter() -> None:
    table = parse("if /a\\\n/b/ X\nendif\n/abc\\\n/./ Y\n", "pcre")
    assert any("no closing regexp delimiter" in w for w in table.warnings)
    assert [answer(table, k) for k in ("b", "ab", "xacx")] == ["X", "X", "Y"]


@pytest.mark.parametrize("kind", ["regexp", "pcre"])
def test_backslash_delimiter_is_never_closed(kind: str) -> None:
    # A backslash escapes the next character before it is taken for the delimiter.
    table = parse("\\a\\ Y\n", kind)
    assert any("no closing regexp delimiter" in w for w in table.warnings)
    assert answer(table, "a Y") is None


def test_screening_a_slow_joined_search_leaves_the_rule_to_the_lines() -> None:
    # The joined lines make this search exponential; each line alone is quick. The
    # screen gives up on it after a short try instead of running the message over
    # its match_timeout (Postfix answers each line).
    table = parse("/(?:a|aa|\\n)*c/ X\n", "pcre")
    subjects = ["a" * 18] * 8 + ["b"]
    maps = Maps("header_checks", (table,))
    start = time.monotonic()
    pruned = maps.for_message(subjects, Budget(2.0))
    assert time.monotonic() - start < 1.0
    assert [pruned.lookup(s, Budget(2.0)) for s in subjects] == [None] * len(subjects)
    assert answer(table, "aac") == "X"
