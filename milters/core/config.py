"""The one TOML config file -> frozen, typed settings.

Every default lives in the settings classes here and in each filter's module, so
an empty file (or none) gives a working suite. Unknown keys and bad values are
errors that name the file, the table, the key and what is allowed, with a
suggestion for a misspelling: Postfix silently ignores a misspelt parameter,
we don't. All problems in a file are reported at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import socket
import textwrap
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from milters.core.errors import ConfigError
from milters.core.metrics import check_listen
from milters.core.sockets import parse_socket

DEFAULT_CONFIG_PATH = "/etc/milters/milters.toml"
CONFIG_ENV = "MILTERS_CONFIG"

Mode = Literal["enforce", "report"]
MilterCore = Literal["libmilter", "python"]
OnError = Literal["tempfail", "accept"]
LogLevel = Literal["debug", "info", "warning", "error"]

Check = Callable[[Any], str | None]


def setting(default: Any, doc: str, check: Check | None = None) -> Any:
    """A settings field with its documentation and an optional value check.

    `check` returns None when the value is fine, else what is allowed.
    """
    meta = {"doc": doc, "check": check}
    if isinstance(default, list | dict | set):
        raise TypeError("use tuples for defaults")
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def check_networks(values: tuple[str, ...]) -> str | None:
    for v in values:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            return f"CIDR networks such as 192.0.2.0/24 or 2001:db8::/32 ({v!r} is not one)"
    return None


def check_range(low: float, high: float) -> Check:
    def check(value: Any) -> str | None:
        if not low <= value <= high:
            return f"a number from {low:g} to {high:g}"
        return None

    return check


def check_socket(value: str) -> str | None:
    try:
        parse_socket(value)
    except ValueError as exc:
        return str(exc)
    return None


def check_optional_socket(value: str) -> str | None:
    """A socket, or empty for none."""
    return check_socket(value) if value else None


def auto_workers() -> int:
    """workers = 0: at least 2 (one busy message never blocks the filter), one
    per CPU, at most 8."""
    return min(max(2, os.cpu_count() or 1), 8)


def default_authserv_id() -> str:
    return socket.getfqdn() or "localhost"


@dataclass(frozen=True)
class DnsSettings:
    """[global.dns]: the one resolver every filter's DNS lookups go through."""

    nameservers: tuple[str, ...] = setting(
        (), "resolver addresses; empty: the system resolver (/etc/resolv.conf)"
    )
    port: int = setting(53, "port of those resolvers", check_range(1, 65535))
    timeout: float = setting(5.0, "seconds before a lookup is a temperror", check_range(0.1, 60))

    def __post_init__(self) -> None:
        for ns in self.nameservers:
            try:
                ipaddress.ip_address(ns)
            except ValueError:
                raise ConfigError(f"nameservers: {ns!r} is not an IP address") from None


@dataclass(frozen=True)
class GlobalSettings:
    """[global]: what every filter shares."""

    authserv_id: str = setting(
        default_authserv_id,
        "the name in our Authentication-Results fields (default: this host's FQDN)",
    )
    internal_networks: tuple[str, ...] = setting(
        ("127.0.0.0/8", "::1/128"),
        "clients in these networks are ours: signed, not checked",
        check_networks,
    )
    mode: Mode = setting("enforce", '"enforce" acts; "report" only logs and tags')
    milter_core: MilterCore = setting(
        "python",
        'what speaks the milter protocol: "python" (our own loop driving the adapter; '
        'about half the CPU per dialogue, bench/core_eval.py) or "libmilter" (pymilter)',
    )
    soft_bounce: bool = setting(False, "turn 5xx rejections into 4xx, as Postfix soft_bounce")
    on_error: OnError = setting(
        "tempfail", "what an internal error or timeout gives: tempfail (4xx) or accept"
    )
    bypass_recipients: tuple[str, ...] = setting(
        (),
        "recipients never refused: user@domain, user@ (any domain), domain or .domain",
    )
    log_level: LogLevel = setting("info", "debug, info, warning or error")
    metrics_listen: str = setting(
        "",
        "Prometheus metrics on loopback HOST:PORT, e.g. 127.0.0.1:9891; each filter adds "
        "its position (dkim +0 ... checks +4, dkim-sign +5, chain +6); empty: off",
        check_listen,
    )
    dns: DnsSettings = setting(DnsSettings, "the [global.dns] table")


@dataclass(frozen=True)
class FilterSettings:
    """Keys every filter table has; filters subclass this with their own."""

    enabled: bool = setting(True, "run this filter under `milters serve`")
    socket: str = setting("", "listening socket: inet:PORT@HOST or inet:HOST:PORT", check_socket)
    mode: Mode | None = setting(None, "overrides [global] mode for this filter")
    on_error: OnError | None = setting(None, "overrides [global] on_error for this filter")
    workers: int = setting(
        0,
        "processes serving this filter's socket; 0: sized to the machine, "
        "min(max(2, CPUs), 8), so that one stuck message never stops the filter",
        check_range(0, 64),
    )
    max_connections: int = setting(
        256,
        "open MTA connections one worker serves; a connection over it gets a tempfail "
        "at connect (Postfix defers) and a log line; lowered to fit the open-file limit",
        check_range(1, 100000),
    )
    timeout: float = setting(
        60.0, "seconds libmilter waits on a silent MTA before dropping it", check_range(1, 3600)
    )


@dataclass(frozen=True)
class Config:
    """The whole effective configuration."""

    source: str  # the file it came from, or "(built-in defaults)"
    global_: GlobalSettings
    filters: Mapping[str, FilterSettings]
    # Entries of `filters` made from another table, not tables of their own
    # (dkim's signing step, registry.with_sign_step).
    derived: frozenset[str] = frozenset()

    def filter(self, name: str) -> FilterSettings:
        return self.filters[name]

    def workers_of(self, name: str) -> int:
        """The number of worker processes: `workers`, or sized to the machine."""
        return self.filters[name].workers or auto_workers()

    def mode_of(self, name: str) -> str:
        return self.filters[name].mode or self.global_.mode

    def on_error_of(self, name: str) -> str:
        return self.filters[name].on_error or self.global_.on_error


# --- loading ---------------------------------------------------------------


def config_path(explicit: str | None) -> tuple[Path, bool]:
    """Which file to read, and whether it must exist (named by the user)."""
    if explicit:
        return Path(explicit), True
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env), True
    return Path(DEFAULT_CONFIG_PATH), False


def load_config(
    path: str | os.PathLike[str] | None,
    filter_classes: Mapping[str, type[FilterSettings]],
    default_sockets: Mapping[str, str],
    must_exist: bool = True,
) -> Config:
    """Read and validate a config file. Raises ConfigError with every problem."""
    if path is None:
        return build_config({}, "(built-in defaults)", filter_classes, default_sockets)
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        if must_exist:
            raise ConfigError(f"{p}: no such config file") from None
        return build_config({}, "(built-in defaults)", filter_classes, default_sockets)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: TOML syntax error: {exc}") from None
    return build_config(data, str(p), filter_classes, default_sockets)


def build_config(
    data: Mapping[str, Any],
    source: str,
    filter_classes: Mapping[str, type[FilterSettings]],
    default_sockets: Mapping[str, str],
) -> Config:
    problems: list[str] = []
    tables = ["global", *filter_classes]
    for key in data:
        if key not in tables:
            problems.append(_unknown(key, "the top level", source, tables, table=True))
    global_data = _table(data, "global", source, problems)
    global_ = _build(GlobalSettings, global_data, "global", source, problems)
    filters: dict[str, FilterSettings] = {}
    for name, cls in filter_classes.items():
        raw = dict(_table(data, name, source, problems))
        raw.setdefault("socket", default_sockets[name])
        filters[name] = _build(cls, raw, name, source, problems)
    if problems or global_ is None or any(v is None for v in filters.values()):
        raise ConfigError(problems=problems)
    sockets: dict[str, str] = {}
    for name, fs in filters.items():
        if not fs.enabled:
            continue
        spec = parse_socket(fs.socket)
        if spec.libmilter in sockets:
            problems.append(
                f"socket {fs.socket!r} in [{name}] of {source} is also the socket of "
                f"[{sockets[spec.libmilter]}]; each filter needs its own"
            )
        sockets[spec.libmilter] = name
    if problems:
        raise ConfigError(problems=problems)
    return Config(source, global_, types.MappingProxyType(filters))


def _table(
    data: Mapping[str, Any], name: str, source: str, problems: list[str]
) -> Mapping[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        problems.append(f"[{name}] in {source} must be a table, not a {_tname(value)}")
        return {}
    return value


def _unknown(key: str, where: str, source: str, valid: list[str], table: bool = False) -> str:
    what = "table" if table else "key"
    msg = f"unknown {what} {key!r} in {where} of {source}"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"{msg}; did you mean {close[0]!r}?"
    return f"{msg}; valid: {', '.join(valid)}"


def _build(
    cls: type[Any], raw: Mapping[str, Any], table: str, source: str, problems: list[str]
) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    start = len(problems)
    for key, value in raw.items():
        if key not in fields:
            problems.append(_unknown(key, f"[{table}]", source, list(fields)))
            continue
        f = fields[key]
        where = f"{key!r} in [{table}] of {source}"
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                problems.append(f"{where} must be a table")
                continue
            kwargs[key] = _build(hints[key], value, f"{table}.{key}", source, problems)
            continue
        try:
            converted = _convert(value, hints[key])
        except TypeError as exc:
            problems.append(f"{where}: expected {exc}, got {_show(value)}")
            continue
        check = f.metadata.get("check")
        if check is not None and converted is not None:
            allowed = check(converted)
            if allowed:
                problems.append(f"{where}: expected {allowed}, got {_show(value)}")
                continue
        kwargs[key] = converted
    if len(problems) > start:
        return None
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        problems.extend(f"[{table}] of {source}: {p}" for p in exc.problems)
    except ValueError as exc:
        problems.append(f"[{table}] of {source}: {exc}")
    return None


def _convert(value: Any, hint: Any) -> Any:
    """Check `value` against a type hint; raise TypeError(what was expected)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise TypeError("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg)
            except TypeError as exc:
                errors.append(str(exc))
        raise TypeError(" or ".join(errors))
    if origin is tuple:
        item = args[0]
        if isinstance(value, str) and item is str:
            # Postfix lists may be written as one string: "a, b c"
            return tuple(v for v in value.replace(",", " ").split() if v)
        if not isinstance(value, list):
            raise TypeError(f"a list of {_hname(item)}")
        try:
            return tuple(_convert(v, item) for v in value)
        except TypeError:
            raise TypeError(f"a list of {_hname(item)}") from None
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError("a string")
        return value
    raise TypeError(_hname(hint))


def _hname(hint: Any) -> str:
    return {str: "strings", int: "integers", float: "numbers", bool: "booleans"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _tname(value: Any) -> str:
    return {dict: "table", list: "list", str: "string", int: "integer", float: "number",
            bool: "boolean"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return repr(value)
    return f"a {_tname(value)}"


# --- printing --------------------------------------------------------------


def render_config(cfg: Config) -> str:
    """The effective config as TOML, every key shown (for `milters check-config`)."""
    lines = [f"# effective configuration from {cfg.source}"]
    lines += _render_table("global", cfg.global_)
    for name, fs in cfg.filters.items():
        if name not in cfg.derived:
            lines += _render_table(name, fs)
    return "\n".join(lines) + "\n"


def _render_table(name: str, obj: Any) -> list[str]:
    lines = ["", f"[{name}]"]
    nested: list[tuple[str, Any]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            nested.append((f"{name}.{f.name}", value))
            continue
        if value is None:
            lines.append(f"# {f.name} = (not set)")
            continue
        lines.append(f"{f.name} = {toml_value(value)}")
    for sub, value in nested:
        lines += _render_table(sub, value)
    return lines


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r}")


SAMPLE_HEADER = """\
# milters.toml: the configuration of the milters suite (all filters read it).
#
# Every key is shown with its default value, commented out: an empty file (or
# none) gives a working suite. Uncomment and change what you need. A misspelt or
# unknown key is an error that `milters check-config` shows with a suggestion.
# Default path: /etc/milters/milters.toml (--config FILE or $MILTERS_CONFIG).
"""


def render_sample(
    filter_classes: Mapping[str, type[FilterSettings]],
    default_sockets: Mapping[str, str],
    intros: Mapping[str, str] | None = None,
) -> str:
    """The fully commented sample config: every key, its doc and its default."""
    out = [SAMPLE_HEADER]
    out += _sample_table("global", GlobalSettings(authserv_id="mx.example.com"),
                         "Settings every filter shares.")
    for name, cls in filter_classes.items():
        intro = (intros or {}).get(name, "")
        out += _sample_table(name, cls(socket=default_sockets[name]), intro)
    return "\n".join(out).rstrip() + "\n"


def _sample_table(name: str, obj: Any, intro: str) -> list[str]:
    lines = [f"[{name}]"]
    if intro:
        lines = [*(f"# {t}" for t in intro.splitlines()), *lines]
    nested: list[tuple[str, Any, str]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        doc = f.metadata.get("doc", "")
        if dataclasses.is_dataclass(value):
            nested.append((f"{name}.{f.name}", value, (type(value).__doc__ or "").strip()))
            continue
        lines += [f"# {line}" for line in textwrap.wrap(doc, 76)] or ["#"]
        if value is None:
            lines.append(f"# {f.name}: not set by default")
        else:
            lines.append(f"#{f.name} = {toml_value(value)}")
    lines.append("")
    for sub, value, doc in nested:
        lines += _sample_table(sub, value, doc.split(":", 1)[-1].strip())
    return lines
