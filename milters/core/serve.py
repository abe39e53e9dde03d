"""`milters serve`: one `milters run` process per unit of the config (each
enabled filter, or the chain's one socket), kept alive by the supervisor
(core/supervisor.py), and a reload on SIGHUP that starts, stops or signals
children as the new config asks.

A reload whose config or tables do not build is refused and the running
children keep serving. A unit whose socket changed is restarted (its process
cannot move its listener); one that stays where it is gets SIGHUP and reloads
itself (core/runner.py).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Callable, Sequence

from milters.core.config import Config
from milters.core.errors import ConfigError
from milters.core.supervisor import Supervisor, block_signals, die_with_parent

log = logging.getLogger(__name__)

# How long children get to drain when serve stops.
GRACE_SECONDS = 60.0


def serve_units(cfg: Config, units: Callable[[Config], Sequence[str]],
                build: Callable[[Config, str], object], reload_config: Callable[[], Config],
                child_argv: Callable[[str], list[str]]) -> int:
    """Run `child_argv(unit)` for every unit of `cfg` until SIGTERM; `build` checks
    a unit (tables compiled, keys loaded) before its process is started. Returns
    the process exit status."""
    for name in units(cfg):
        build(cfg, name)  # refuse to start on a bad table or key
    state: dict[str, Config] = {"cfg": cfg}

    def spawn(name: str) -> int:
        # The child must not inherit our blocked signal mask.
        parent = os.getpid()

        def prepare() -> None:
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            die_with_parent(signal.SIGTERM, parent)

        proc = subprocess.Popen(child_argv(name), restore_signals=True, preexec_fn=prepare)
        return proc.pid

    block_signals()
    sup = Supervisor("serve", spawn)
    enabled = list(units(cfg))
    if not enabled:
        log.error("serve: no filter is enabled in %s", cfg.source)
        return os.EX_CONFIG
    for name in enabled:
        sup.start(name)
    log.info("serve: started %s from %s", ", ".join(enabled), cfg.source)

    def on_reload() -> None:
        try:
            new = reload_config()
            for name in units(new):
                build(new, name)
        except ConfigError as exc:
            log.error("serve: reload refused, keeping the running configuration:\n%s", exc)
            return
        old = state["cfg"]
        state["cfg"] = new
        for pid, child in list(sup.children.items()):
            if child.retiring:
                continue
            fs = new.filters[child.slot]
            if child.slot not in units(new):
                sup.retire([pid])
            elif fs.socket != old.filters[child.slot].socket:
                sup.retire([pid])
                sup.start(child.slot)
            else:
                os.kill(pid, signal.SIGHUP)
        running = set(sup.slots())
        for name in units(new):
            if name not in running:
                sup.start(name)
        log.info("serve: configuration reloaded from %s", new.source)

    return sup.loop(on_reload, grace=GRACE_SECONDS)
