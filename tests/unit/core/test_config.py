"""Config loading: defaults, types, and errors that name file, table and key."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from milters.core.config import (
    FilterSettings,
    auto_workers,
    build_config,
    load_config,
    render_config,
    setting,
)
from milters.core.errors import ConfigError


@dataclass(frozen=True)
class DemoSettings(FilterSettings):
    tables: tuple[str, ...] = setting((), "demo tables")
    limit: int = setting(10, "demo limit")


FILTERS = {"demo": DemoSettings, "other": FilterSettings}
SOCKETS = {"demo": "inet:8895@127.0.0.1", "other": "inet:8896@127.0.0.1"}


def load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "milters.toml"
    path.write_text(text)
    return load_config(path, FILTERS, SOCKETS)


def errors_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    cfg = load_config(tmp_path / "x.toml", FILTERS, SOCKETS, must_exist=False)
    assert cfg.global_.mode == "enforce"
    assert cfg.global_.on_error == "tempfail"
    assert cfg.filters["demo"].socket == "inet:8895@127.0.0.1"
    assert cfg.mode_of("demo") == "enforce"
    assert cfg.global_.authserv_id


def test_named_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml", FILTERS, SOCKETS)


def test_misspelt_key_names_file_table_and_suggestion(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, '[global]\nmod = "report"\n')
    assert "unknown key 'mod' in [global] of" in msg
    assert str(tmp_path / "milters.toml") in msg
    assert "did you mean 'mode'?" in msg


def test_unknown_table_is_an_error(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, "[dmeo]\nenabled = true\n")
    assert "unknown table 'dmeo'" in msg and "did you mean 'demo'?" in msg


def test_wrong_type_and_choice_name_the_key(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, '[global]\nmode = "enforced"\nsoft_bounce = "yes"\n')
    assert "'mode' in [global]" in msg and "'enforce', 'report'" in msg
    assert "'soft_bounce' in [global]" in msg and "true or false" in msg


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, '[global]\nmod = 1\n[demo]\nlimit = "x"\nworkers = -1\n')
    assert len(info.value.problems) == 3


def test_out_of_range_and_bad_network(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, '[global]\ninternal_networks = ["10.0.0.0/33"]\n'
                    '[global.dns]\nport = 70000\n')
    assert "internal_networks" in msg and "10.0.0.0/33" in msg
    assert "'port' in [global.dns]" in msg and "1 to 65535" in msg


def test_bad_nameserver(tmp_path: Path) -> None:
    assert "not an IP address" in errors_of(tmp_path, '[global.dns]\nnameservers = ["dns.x"]\n')


def test_socket_forms(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[demo]\nsocket = "inet:127.0.0.1:9000"\n'
               '[other]\nsocket = "inet:9001@127.0.0.1"\n')
    assert cfg.filters["demo"].socket == "inet:127.0.0.1:9000"  # type: ignore[attr-defined]
    msg = errors_of(tmp_path, '[demo]\nsocket = "tcp:9000"\n')
    assert "'socket' in [demo]" in msg and "unknown family" in msg


def test_two_filters_on_one_socket(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, '[demo]\nsocket = "inet:127.0.0.1:9000"\n'
                    '[other]\nsocket = "inet:9000@127.0.0.1"\n')
    assert "each filter needs its own" in msg


def test_string_accepted_for_list(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[demo]\ntables = "regexp:/a, pcre:/b"\n')
    assert cfg.filters["demo"].tables == ("regexp:/a", "pcre:/b")  # type: ignore[attr-defined]


def test_toml_syntax_error_names_file(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, "[global\n")
    assert "TOML syntax error" in msg and "milters.toml" in msg


def test_render_round_trips(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[global]\nmode = "report"\n[global.dns]\nnameservers = ["127.0.0.1"]\n')
    text = render_config(cfg)  # type: ignore[arg-type]
    (tmp_path / "again.toml").write_text(text.replace("# mode = (not set)", ""))
    again = load_config(tmp_path / "again.toml", FILTERS, SOCKETS)
    assert again.global_ == cfg.global_  # type: ignore[attr-defined]
    assert dict(again.filters) == dict(cfg.filters)  # type: ignore[attr-defined]


def test_build_config_from_mapping() -> None:
    cfg = build_config({"global": {"soft_bounce": True}}, "(test)", FILTERS, SOCKETS)
    assert cfg.global_.soft_bounce


def test_workers_zero_is_sized_to_the_machine(tmp_path: Path) -> None:
    path = tmp_path / "milters.toml"
    path.write_text("[demo]\nworkers = 0\n")
    cfg = load_config(path, FILTERS, SOCKETS)
    assert cfg.workers_of("demo") == auto_workers() == min(max(2, os.cpu_count() or 1), 8)
    assert auto_workers() >= 2
    assert load_config(None, FILTERS, SOCKETS).workers_of("demo") == auto_workers()
    path.write_text("[demo]\nworkers = 3\n")
    assert load_config(path, FILTERS, SOCKETS).workers_of("demo") == 3
