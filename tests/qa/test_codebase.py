"""Project rules that code review would otherwise have to remember."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from milters import registry
from milters.core import verdict
from milters.core.config import build_config

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "milters"


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_adapter_imports_pymilter() -> None:
    offenders = [
        str(p.relative_to(ROOT)) for p in modules()
        if {"Milter", "milter"} & imported(p) and p.name != "adapter.py"
    ]
    assert offenders == []


def test_only_the_cli_uses_the_milter_client() -> None:
    """The client (milters/client/) plays the MTA on the wire; what it shares with
    the rest (the envelope, the macro lists) lives in core, which it imports."""
    client = PACKAGE / "client"
    offenders = [
        str(p.relative_to(ROOT)) for p in modules()
        if client not in p.parents and p.name != "cli.py"
        and re.search(r"^\s*(from milters\.client\b|from milters import .*\bclient\b)",
                      p.read_text(), re.M)
    ]
    assert offenders == []


def test_no_filter_imports_another_filter() -> None:
    filters = set(registry.FILTERS)
    for p in modules():
        rel = p.relative_to(PACKAGE).parts
        own = rel[0].removesuffix(".py")
        if own not in filters:
            continue
        text = p.read_text()
        for other in filters - {own}:
            assert f"milters.{other}" not in text, f"{p} imports filter {other}"


def test_no_module_level_mutable_state() -> None:
    """libmilter calls back from many threads: no `global`, no module-level lists/dicts."""
    for p in modules():
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            assert not isinstance(node, ast.Global), f"`global` in {p}"
        for node in tree.body:
            if isinstance(node, ast.Assign | ast.AnnAssign):
                value = node.value
                if isinstance(value, ast.List | ast.Dict | ast.Set) and not _is_dunder(node):
                    pytest.fail(f"module-level mutable {ast.unparse(node)[:60]} in {p}")


def _is_dunder(node: ast.Assign | ast.AnnAssign) -> bool:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return all(isinstance(t, ast.Name) and t.id.startswith("__") for t in targets)


def test_no_bare_except_or_silent_pass() -> None:
    for p in modules():
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler):
                assert node.type is not None, f"bare except in {p}:{node.lineno}"
                silent = len(node.body) == 1 and isinstance(node.body[0], ast.Pass)
                broad = isinstance(node.type, ast.Name) and node.type.id in (
                    "Exception", "BaseException")
                assert not (silent and broad), f"except Exception: pass in {p}:{node.lineno}"


def test_every_module_has_a_docstring() -> None:
    missing = [str(p.relative_to(ROOT)) for p in modules()
               if p.stat().st_size and ast.get_docstring(ast.parse(p.read_text())) is None]
    assert missing == []


def test_named_replies_are_consistent() -> None:
    for name in dir(verdict):
        value = getattr(verdict, name)
        if isinstance(value, verdict.Reply):
            assert value.code[0] == value.xcode[0], name
            assert value.text and "%" not in value.text, name
    with pytest.raises(ValueError):
        verdict.Reply("550", "4.7.1", "disagree")
    with pytest.raises(ValueError):
        verdict.Reply("250", "2.0.0", "not a refusal code")


def test_sample_config_is_current() -> None:
    """conf/milters.toml documents every key, with its default (regenerate with
    `milters check-config --sample > conf/milters.toml`)."""
    assert (ROOT / "conf" / "milters.toml").read_text() == registry.sample_config()


def test_sample_config_uncommented_gives_the_defaults() -> None:
    import tomllib

    text = (ROOT / "conf" / "milters.toml").read_text()
    active = re.sub(r"(?m)^#(?=[a-z_]+ = )", "", text)
    data = tomllib.loads(active)
    sample = registry.load_from_mapping(data)
    defaults = registry.load_from_mapping({})
    assert sample.filters == defaults.filters
    assert sample.global_.mode == defaults.global_.mode
    assert sample.global_.dns == defaults.global_.dns


def test_build_config_rejects_unknown_filter_table() -> None:
    from milters.core.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown table 'dkmi'"):
        build_config({"dkmi": {}}, "(t)", {"dkim": registry.FILTERS["checks"].settings_class},
                     {"dkim": "inet:1@127.0.0.1"})
