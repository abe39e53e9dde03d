"""Screening (Maps.screen) must never change which rule answers for a line."""

from __future__ import annotations

import itertools

import pytest

from milters.checks.screen import Screener
from milters.checks.tables import Maps, TextMode, parse_table

TABLE = r"""
/^Subject: .*money/             REJECT money
/free\s+offer$/                 REJECT offer at end of line
/^begin [0-7]{3} .*\.exe$/      REJECT uuencoded exe
!/^X-/                          WARN not an X- line
/(?<=pre)fix/                   REJECT lookbehind
/foo(?!bar)/                    REJECT lookahead
/\bword\b/                      REJECT whole word
/^$/                            DUNNO empty
/(ab)\1/                        REJECT backreference
/a.b/                           REJECT dot
if /^Content-/
/name=.*\.scr/                  REJECT screensaver
endif
/[^x]{3}end/                    REJECT negated class
/^marker/                       REJECT marker at line start
"""

LINES = [
    "Subject: make money fast", "Subject: no", "a free  offer", "a free offer here",
    "begin 644 evil.exe", "X-Header: yes", "prefix", "fix", "foobar", "foo",
    "a word here", "words", "", "abab", "a\nb", "axb", "Content-Type: x; name=a.scr",
    "name=a.scr", "xxend", "abcend", "\nmarker", "marker", "x" * 2048, "marker" * 3,
]


@pytest.mark.parametrize(("kind", "mode"), [("pcre", TextMode.TEXT), ("regexp", TextMode.TEXT),
                                           ("regexp", TextMode.BYTES)])
def test_screened_lookup_equals_plain_lookup(kind: str, mode: TextMode) -> None:
    text = TABLE if kind == "pcre" else "\n".join(
        line for line in TABLE.splitlines() if "(?" not in line)  # lookaround is PCRE only
    table = parse_table(text.encode(), f"{kind}:t", "t", kind, mode,
                        frozenset(), "body_checks")
    maps = Maps("body_checks", (table,))
    for n in range(1, 5):
        for subjects in itertools.combinations(LINES, n):
            padded = list(subjects) + ["filler line"] * 8
            pruned = maps.for_message(padded)
            for s in padded:
                plain = maps.lookup(s)
                cut = pruned.lookup(s)
                assert (plain and plain.rule) == (cut and cut.rule), (s, subjects)
                assert (plain and plain.text) == (cut and cut.text), (s, subjects)


def test_screening_skips_rules_that_cannot_match() -> None:
    table = parse_table(TABLE.encode(), "pcre:t", "t", "pcre", TextMode.TEXT,
                        frozenset(), "body_checks")
    possible = Maps("body_checks", (table,)).screen(["nothing to see"] * 10)
    assert possible is not None
    assert len(possible) < 4  # only the few that match "nothing to see" lines


@pytest.mark.parametrize("mode", [TextMode.TEXT, TextMode.BYTES])
def test_screening_never_misses_a_line_match(mode: TextMode) -> None:
    """Needles and joined-text searches may over-report, never miss."""
    table = parse_table(TABLE.encode(), "pcre:t", "t", "pcre", mode, frozenset(), "body_checks")
    patterns = [p for p in table.all_patterns() if p.screen is not None]
    screener = Screener([p.screen for p in patterns if p.screen])
    lines = [*LINES[:12], "Ünïcödé wörd MONEY", "ABAB", "FREE OFFER", "Sub\u0131ect: ſ",
             "\u212aasino", "PREFıX", "ſubject: money"] + ["pad"] * 8
    lines = [mode.from_str(line) for line in lines if "\n" not in line]
    possible = screener.possible(lines)
    assert possible is not None
    for i, p in enumerate(patterns):
        if any(p.match(line) for line in lines):
            assert i in possible, p.regex.pattern
