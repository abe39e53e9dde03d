"""The explicit list of filters, in chain order, and how to build a filter's runtime.

Chain order is the order `smtpd_milters` should list them in: verifiers before
DMARC (which reads their results), content checks last. The first enabled one
removes forged Authentication-Results fields (core/authresults.py).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

from milters.checks import ChecksFilter
from milters.clamav import ClamavFilter
from milters.core import metrics
from milters.core.config import (
    Config,
    build_config,
    config_path,
    load_config,
    render_sample,
)
from milters.core.errors import ConfigError
from milters.core.filter import Env, Filter
from milters.core.policy import SitePolicy
from milters.core.runtime import Runtime
from milters.dkim import DkimFilter
from milters.dmarc import DmarcFilter
from milters.spf import SpfFilter

FILTERS: Mapping[str, type[Filter]] = types.MappingProxyType(
    {cls.name: cls for cls in (DkimFilter, SpfFilter, DmarcFilter, ClamavFilter, ChecksFilter)}
)


def load(path: str | None) -> Config:
    """The config named by --config, $MILTERS_CONFIG or the default path."""
    p, must_exist = config_path(path)
    return load_config(
        p,
        {name: cls.settings_class for name, cls in FILTERS.items()},
        {name: cls.default_socket() for name, cls in FILTERS.items()},
        must_exist=must_exist,
    )


def load_from_mapping(data: Mapping[str, Any], source: str = "(mapping)") -> Config:
    """A config from already-parsed TOML data (tests, tools)."""
    return build_config(
        data,
        source,
        {name: cls.settings_class for name, cls in FILTERS.items()},
        {name: cls.default_socket() for name, cls in FILTERS.items()},
    )


def filter_class(name: str) -> type[Filter]:
    try:
        return FILTERS[name]
    except KeyError:
        raise ConfigError(
            f"unknown filter {name!r}; the filters are: {', '.join(FILTERS)}"
        ) from None


def build_runtime(cfg: Config, name: str) -> Runtime:
    """Build the filter (tables compiled, keys loaded). Raises ConfigError."""
    cls = filter_class(name)
    settings = cfg.filters[name]
    enabled = [n for n in FILTERS if cfg.filters[n].enabled]
    # Filters of ours that run before this one (see Env.upstream).
    upstream = tuple(enabled[: enabled.index(name)]) if name in enabled else ()
    downstream = tuple(enabled[enabled.index(name) + 1 :]) if name in enabled else ()
    env = Env(cfg.global_, upstream=upstream, downstream=downstream,
              metrics=metrics.for_process(cfg, name))
    env.resolver  # noqa: B018 - built now, before any fork or thread, not lazily in one
    flt = cls(settings, env)
    policy = SitePolicy(
        filter_name=name,
        mode=cfg.mode_of(name),
        soft_bounce=cfg.global_.soft_bounce,
        on_error=cfg.on_error_of(name),
        bypass_recipients=cfg.global_.bypass_recipients,
    )
    return Runtime(cfg, flt, policy)


def sample_config() -> str:
    """The commented sample config (conf/milters.toml is this text; a test checks it)."""
    intros = {
        name: "\n".join(line.strip() for line in (cls.__doc__ or "").strip().splitlines())
        for name, cls in FILTERS.items()
    }
    return render_sample(
        {name: cls.settings_class for name, cls in FILTERS.items()},
        {name: cls.default_socket() for name, cls in FILTERS.items()},
        intros,
    )
