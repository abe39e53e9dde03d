"""Does Postfix's smtpd_milters list the filters the config enables, in chain order?

The config's list of enabled filters is what each filter believes about its
neighbours (core/filter.py Env.upstream and Env.downstream): the first one
removes every forged Authentication-Results field, dmarc believes results of our
id only from the filters enabled before it, and holds are asked for by the last
one (core/hold.py). A chain in Postfix that differs from it is a silent security
and safety problem: dmarc run alone under the default config (all five enabled)
would trust forged dkim results, and a clamav run alone would hand its holds on
to a checks filter that never sees the message. So `milters check-config` and
`milters run` compare the two when Postfix's `postconf` is on this host.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from milters import registry
from milters.core.config import Config
from milters.core.sockets import SocketSpec, parse_socket

POSTCONF = "postconf"
# smtpd_milters: sockets separated by white space or commas; `{ socket, options }`
# groups (Postfix 3.0 per-milter settings) name their socket first.
_SPLIT = re.compile(r"[\s,]+")
_GROUP = re.compile(r"\{\s*([^,}\s]+)[^}]*\}")


def postfix_milters(postconf: str | None = None) -> list[str] | None:
    """Postfix's smtpd_milters, or None if postconf is not here or fails."""
    exe = postconf or shutil.which(POSTCONF)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-h", "smtpd_milters"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    text = _GROUP.sub(lambda m: m.group(1), out.stdout)
    return [s for s in _SPLIT.split(text) if s]


def _same(a: SocketSpec, b: SocketSpec) -> bool:
    if a.family == "unix" or b.family == "unix":
        return a.family == b.family and a.path.rstrip("/") == b.path.rstrip("/")
    hosts = {a.host, b.host}
    loopback = hosts <= {"127.0.0.1", "localhost"} or hosts <= {"::1", "localhost"}
    return a.port == b.port and (a.host == b.host or loopback)


def disagreements(cfg: Config, milters: list[str]) -> list[str]:
    """What differs between the enabled filters (chain order) and smtpd_milters."""
    enabled = [(name, parse_socket(cfg.filters[name].socket)) for name in registry.units(cfg)]
    listed: list[SocketSpec] = []
    for entry in milters:
        try:
            listed.append(parse_socket(entry))
        except ValueError:
            continue  # not ours to judge (a macro, another milter's odd spelling)
    seen: list[str] = []
    problems: list[str] = []
    for name, spec in enabled:
        positions = [i for i, s in enumerate(listed) if _same(s, spec)]
        if not positions:
            off = {registry.SIGN_STEP: '[dkim] sign_socket = "" (sign at the dkim socket)',
                   registry.CHAIN: "[chain] enabled = false"}.get(name, f"[{name}] enabled = false")
            problems.append(
                f"filter {name} is enabled but its socket {spec.postfix} is not in Postfix's "
                f"smtpd_milters: disable it in the config ({off}) or "
                "add it (`milters postfix-config`)")
            continue
        seen.append(name)
    order = sorted(seen, key=lambda n: min(
        i for i, s in enumerate(listed) if _same(s, parse_socket(cfg.filters[n].socket))))
    if order != seen:
        problems.append(
            f"Postfix's smtpd_milters calls our filters in the order {', '.join(order)}; "
            f"the chain order is {', '.join(seen)} (`milters postfix-config` prints it)")
    return problems
