"""[checks] settings through the config loader; filter construction errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from milters.checks import ChecksFilter, ChecksSettings
from milters.core.config import build_config
from milters.core.errors import ConfigError

Table = Callable[..., str]
Checks = Callable[..., ChecksFilter]


def build(data: dict[str, object]) -> ChecksSettings:
    cfg = build_config({"checks": data}, "(test)", {"checks": ChecksSettings},
                       {"checks": "inet:8895@127.0.0.1"})
    settings = cfg.filter("checks")
    assert isinstance(settings, ChecksSettings)
    return settings


def test_defaults_are_postfix_defaults() -> None:
    s = build({})
    assert s.body_checks_size_limit == 51200 and s.decode is True
    assert s.header_checks == () and s.mime_header_checks is None


def test_single_string_and_lists() -> None:
    s = build({"header_checks": "regexp:/etc/postfix/header_checks",
               "body_checks": ["pcre:/a", "regexp:/b"], "mime_header_checks": []})
    assert s.header_checks == ("regexp:/etc/postfix/header_checks",)
    assert s.body_checks == ("pcre:/a", "regexp:/b") and s.mime_header_checks == ()


def test_bad_spec_and_unknown_key() -> None:
    with pytest.raises(ConfigError) as exc:
        build({"header_checks": "hash:/etc/postfix/x", "body_check": []})
    text = str(exc.value)
    assert "'header_checks'" in text and "only regexp: and pcre:" in text
    assert "did you mean 'body_checks'" in text


def test_missing_table_file_names_key_and_path(checks: Checks, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        checks(header_checks=(f"pcre:{tmp_path}/missing",))
    assert "header_checks" in str(exc.value) and f"{tmp_path}/missing" in str(exc.value)


def test_errors_from_several_keys_reported_together(checks: Checks, table: Table) -> None:
    with pytest.raises(ConfigError) as exc:
        checks(sender_checks=(table("/a/ FROB\n"),), client_checks=(table("/b/ IGNORE\n"),))
    assert len(exc.value.problems) == 2


def test_filename_checks_refuse_line_edits(checks: Checks, table: Table) -> None:
    with pytest.raises(ConfigError, match="REPLACE cannot be used in filename_checks"):
        checks(filename_checks=(table("/x/ REPLACE y\n"),))


def test_describe_lists_tables(checks: Checks, table: Table) -> None:
    spec = table("/a/ REJECT\n/b/ WARN\n")
    lines = checks(header_checks=(spec,)).describe()
    assert f"header_checks: {spec} (2 rules)" in lines
    assert "mime_header_checks: same tables as header_checks" in lines


def test_filter_attributes() -> None:
    assert ChecksFilter.name == "checks" and ChecksFilter.default_port == 8895
    assert ChecksFilter.settings_class is ChecksSettings
    assert ChecksFilter.may_change_recipients and ChecksFilter.may_replace_body
    assert ChecksFilter.may_quarantine
