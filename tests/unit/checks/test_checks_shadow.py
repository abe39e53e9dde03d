"""`# milters: shadow` markers: which rules they mark, what a marked rule does in lookup."""

from __future__ import annotations

import pytest

from milters.checks import shadow
from milters.checks.tables import Table, TextMode, parse_table
from milters.core.errors import ConfigError


def table(text: str) -> Table:
    return parse_table(text.encode(), "regexp:t", "t", "regexp", TextMode.BYTES)


def test_marker_marks_the_next_rule_only() -> None:
    t = table("/^a/ REJECT a\n# milters: shadow\n\n# why: trying it\n/^b/ REJECT b\n/^c/ WARN c\n")
    assert [(r.source, r.shadow) for r in t.all_rules()] == \
        [("t:1", False), ("t:5", True), ("t:6", False)]


def test_table_marker_marks_every_rule() -> None:
    t = table("# milters: shadow table\n/^a/ REJECT a\nif /^b/\n/^bc/ REJECT bc\nendif\n")
    assert [r.shadow for r in t.all_rules()] == [True, True]


@pytest.mark.parametrize("text, where", [
    ("/^a/ REJECT a\n# milters: shadow\n", "t:2"),
    ("# milters: shadow\nif /^b/\n/^bc/ REJECT bc\nendif\n", "t:1"),
])
def test_misplaced_marker_is_a_config_error(text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=where):
        table(text)


def test_shadow_match_is_collected_and_lookup_goes_on() -> None:
    t = table("# milters: shadow\n/^Subject: (.*)/ REJECT would $1\n/^Subject: x/ WARN real\n")
    with shadow.watch() as seen:
        hit = t.lookup("Subject: x")
    assert hit is not None and hit.rule.source == "t:3"
    assert [(s.rule.source, s.text) for s in seen] == [("t:2", "would x")]
    # Outside a check nothing is collected (early-stage lookups are repeated at eom).
    assert t.lookup("Subject: y") is None
