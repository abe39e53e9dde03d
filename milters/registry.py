"""The explicit list of filters, in chain order, and how to build a filter's runtime.

Chain order is the order `smtpd_milters` should list them in: verifiers before
DMARC (which reads their results), content checks last. The first enabled one
removes forged Authentication-Results fields (core/authresults.py).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from milters.checks import ChecksFilter
from milters.clamav import ClamavFilter
from milters.core import metrics
from milters.core.chain import ChainFilter, ChainSettings, chain_filter
from milters.core.config import (
    Config,
    FilterSettings,
    build_config,
    config_path,
    load_config,
    render_sample,
)
from milters.core.errors import ConfigError
from milters.core.filter import Env, Filter
from milters.core.policy import SitePolicy
from milters.core.runtime import Runtime
from milters.core.sockets import parse_socket
from milters.dkim import DkimFilter, DkimSettings, DkimSignFilter
from milters.dmarc import DmarcFilter
from milters.spf import SpfFilter

FILTERS: Mapping[str, type[Filter]] = types.MappingProxyType(
    {cls.name: cls for cls in (DkimFilter, SpfFilter, DmarcFilter, ClamavFilter, ChecksFilter)}
)
# What else `milters run NAME` serves: dkim's signing step (the last of the
# chain, [dkim] sign_socket) and the whole chain in one dialogue ([chain]).
SIGN_STEP = DkimSignFilter.name
CHAIN = ChainFilter.name
RUNNABLE: tuple[str, ...] = (*FILTERS, SIGN_STEP, CHAIN)


def _tables() -> dict[str, type[FilterSettings]]:
    """The config's filter tables, in chain order, then [chain]."""
    return {**{name: cls.settings_class for name, cls in FILTERS.items()},
            CHAIN: ChainSettings}


def _sockets() -> dict[str, str]:
    return {**{name: cls.default_socket() for name, cls in FILTERS.items()},
            CHAIN: ChainFilter.default_socket()}


def load(path: str | None) -> Config:
    """The config named by --config, $MILTERS_CONFIG or the default path."""
    p, must_exist = config_path(path)
    return with_sign_step(load_config(p, _tables(), _sockets(), must_exist=must_exist))


def load_from_mapping(data: Mapping[str, Any], source: str = "(mapping)") -> Config:
    """A config from already-parsed TOML data (tests, tools)."""
    return with_sign_step(build_config(data, source, _tables(), _sockets()))


def with_sign_step(cfg: Config) -> Config:
    """The config with dkim's signing step as an entry of its own (`dkim-sign`),
    enabled when it is separate: dkim signs or ARC-seals (keys configured) and
    other filters follow it. Its settings are [dkim]'s, on [dkim] sign_socket."""
    dkim = cfg.filters["dkim"]
    assert isinstance(dkim, DkimSettings)
    others = [n for n in FILTERS if n != "dkim" and cfg.filters[n].enabled]
    separate = (dkim.enabled and (dkim.sign or dkim.arc_seal != "off")
                and bool(dkim.sign_socket) and bool(others)
                and bool(dkim.key_file or dkim.key_table))
    step = replace(dkim, enabled=separate, socket=dkim.sign_socket or dkim.socket)
    if separate:
        spec = parse_socket(step.socket).libmilter
        for name, fs in cfg.filters.items():
            if fs.enabled and parse_socket(fs.socket).libmilter == spec:
                raise ConfigError(f"[dkim] sign_socket {dkim.sign_socket!r} in {cfg.source} "
                                  f"is also the socket of [{name}]; each needs its own")
    # In RUNNABLE order (the metrics port offsets follow it): the filters, then
    # the signing step, then the chain.
    filters = {name: cfg.filters[name] for name in FILTERS}
    filters[SIGN_STEP] = step
    filters[CHAIN] = cfg.filters[CHAIN]
    return replace(cfg, filters=types.MappingProxyType(filters),
                   derived=cfg.derived | {SIGN_STEP})


def chain_steps(cfg: Config) -> tuple[str, ...]:
    """The enabled steps in chain order: the filters, then the signing step."""
    steps = [n for n in FILTERS if cfg.filters[n].enabled]
    if cfg.filters[SIGN_STEP].enabled:
        steps.append(SIGN_STEP)
    return tuple(steps)


def chain_mode(cfg: Config) -> bool:
    return cfg.filters[CHAIN].enabled


def units(cfg: Config) -> tuple[str, ...]:
    """What `serve` starts and `smtpd_milters` lists: the chain's one socket in
    chain mode, else each step's socket in chain order."""
    return (CHAIN,) if chain_mode(cfg) else chain_steps(cfg)


def filter_class(name: str) -> type[Filter]:
    if name in FILTERS:
        return FILTERS[name]
    if name == SIGN_STEP:
        return DkimSignFilter
    if name == CHAIN:
        return ChainFilter
    raise ConfigError(
        f"unknown filter {name!r}; the filters are: {', '.join(RUNNABLE)}"
    )


def build_runtime(cfg: Config, name: str) -> Runtime:
    """Build the filter (tables compiled, keys loaded). Raises ConfigError."""
    if name == CHAIN:
        return build_chain(cfg)
    cls = filter_class(name)
    settings = cfg.filters[name]
    steps = list(chain_steps(cfg))
    # Filters of ours that run before this one (see Env.upstream).
    upstream = tuple(steps[: steps.index(name)]) if name in steps else ()
    downstream = tuple(steps[steps.index(name) + 1 :]) if name in steps else ()
    env = Env(cfg.global_, upstream=upstream, downstream=downstream,
              metrics=metrics.for_process(cfg, name))
    env.resolver  # noqa: B018 - built now, before any fork or thread, not lazily in one
    flt = cls(settings, env)
    return Runtime(cfg, flt, _policy(cfg, name))


def build_chain(cfg: Config) -> Runtime:
    """Every enabled step in one runtime (chain mode, and `milters test`)."""
    steps = tuple(build_runtime(cfg, name) for name in chain_steps(cfg))
    if not steps:
        raise ConfigError(f"[chain] is enabled in {cfg.source} but no filter is")
    flt = chain_filter(cfg.filters[CHAIN], steps)
    return Runtime(cfg, flt, _policy(cfg, CHAIN))


def _policy(cfg: Config, name: str) -> SitePolicy:
    return SitePolicy(
        filter_name=name,
        mode=cfg.mode_of(name),
        soft_bounce=cfg.global_.soft_bounce,
        on_error=cfg.on_error_of(name),
        bypass_recipients=cfg.global_.bypass_recipients,
    )


def sample_config() -> str:
    """The commented sample config (conf/milters.toml is this text; a test checks it)."""
    intros = {
        name: "\n".join(line.strip() for line in (cls.__doc__ or "").strip().splitlines())
        for name, cls in (*FILTERS.items(), (CHAIN, ChainFilter))
    }
    return render_sample(_tables(), _sockets(), intros)
