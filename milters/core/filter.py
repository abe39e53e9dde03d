"""The small face every filter offers, and the environment it decides in.

A filter object is built once from its settings (tables compiled, keys loaded)
and is immutable afterwards: it is part of the runtime that SIGHUP replaces
whole, and libmilter calls it from many threads at once.
"""

from __future__ import annotations

import abc
import enum
import ipaddress
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

from milters.core.config import FilterSettings, GlobalSettings
from milters.core.metrics import NullMetrics
from milters.core.model import Connection, Transaction
from milters.core.resolver import Resolver
from milters.core.verdict import Verdict

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Stage(enum.Flag):
    """SMTP stages a filter needs to see; the adapter negotiates away the rest."""

    NONE = 0
    CONNECT = enum.auto()
    HELO = enum.auto()
    MAIL = enum.auto()
    RCPT = enum.auto()
    HEADER = enum.auto()
    BODY = enum.auto()


@dataclass(frozen=True)
class Env:
    """Process-wide context shared by the filters: global settings and services."""

    global_: GlobalSettings
    # Our filters enabled before this one in chain order (registry.FILTERS). Only
    # they can have written an incoming field with our authserv-id that survived
    # the first filter's removal of forged fields (core/authresults.py); empty
    # (first, alone, or unknown) means every such field is forged.
    upstream: tuple[str, ...] = ()
    # Our filters enabled after this one: while any follows, a hold is handed on
    # to the last one instead of asked for here (core/hold.py).
    downstream: tuple[str, ...] = ()
    # Prometheus counters (core/metrics.py); a no-op unless metrics_listen is set.
    metrics: NullMetrics = field(default_factory=NullMetrics, compare=False)

    @cached_property
    def resolver(self) -> Resolver:
        """The one resolver every lookup goes through ([global.dns])."""
        return Resolver(self.global_.dns)

    @cached_property
    def internal_networks(self) -> tuple[Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.global_.internal_networks)

    def is_internal(self, conn: Connection) -> bool:
        """Client in internal_networks, or a local submission (sendmail, no client address)."""
        ip = conn.client_ip
        if ip is None:
            return conn.client_addr == ""
        return any(ip in net for net in self.internal_networks)

    def is_ours(self, conn: Connection) -> bool:
        """Internal or SASL-authenticated: mail we send rather than receive."""
        return self.is_internal(conn) or bool(conn.sasl_user)


class Filter(abc.ABC):
    """Base of every filter. Subclasses set the class attributes and `check`."""

    name: ClassVar[str]
    default_port: ClassVar[int]
    settings_class: ClassVar[type[FilterSettings]]
    stages: ClassVar[Stage]
    # Header edits the filter may ask for (checks REPLACE/PREPEND, AR fields...):
    # the adapter declares only the milter actions a filter can use.
    may_change_headers: ClassVar[bool] = True
    may_change_recipients: ClassVar[bool] = False
    may_replace_body: ClassVar[bool] = False
    may_quarantine: ClassVar[bool] = False
    # Authentication-Results methods this filter writes; it removes incoming
    # fields with our authserv-id that report them (core/authresults.py).
    ar_methods: ClassVar[frozenset[str]] = frozenset()
    # The end-of-message check decides the early stages again (checks re-runs its
    # client/helo/sender/recipient tables for their HOLD, BCC, PREPEND...): what
    # an early stage let through is not carried to the end as well, or report
    # mode would report it twice (core/pipeline.py).
    decides_stages_again: ClassVar[bool] = False
    # Its decisions wait on nothing but DNS (env.resolver): the Python core then
    # serves it from an event loop, and a lookup the cache cannot answer moves the
    # connection to a thread (core/eventloop.py). A filter that talks to another
    # server (clamd) is served by a thread per connection.
    waits_only_on_dns: ClassVar[bool] = False

    def __init__(self, settings: FilterSettings, env: Env) -> None:
        self.settings = settings
        self.env = env

    @classmethod
    def default_socket(cls) -> str:
        return f"inet:{cls.default_port}@127.0.0.1"

    def needed_stages(self) -> Stage:
        """The stages this configured instance needs (a subset of `stages`)."""
        return self.stages

    def skips_internal(self) -> bool:
        """Configured to decide nothing for any message of an internal client
        (Env.is_internal: internal_networks or a local submission), whatever its
        MAIL FROM, SASL login or header say. Then the adapter answers ACCEPT at
        CONNECT and Postfix calls the filter no more for the session (runtime.py
        accepts_early), as OpenDMARC does for its IgnoreHosts."""
        return False

    # Early deciders override these; None means "no opinion yet".
    def on_connect(self, conn: Connection) -> Verdict | None:
        return None

    def on_helo(self, conn: Connection) -> Verdict | None:
        return None

    def on_mail(self, tx: Transaction) -> Verdict | None:
        return None

    def on_rcpt(self, tx: Transaction, rcpt: str) -> Verdict | None:
        return None

    @abc.abstractmethod
    def check(self, tx: Transaction) -> Verdict:
        """Decide about a whole message at end of data."""

    def describe(self) -> list[str]:
        """Lines for `milters check-config`: what was loaded (tables, keys)."""
        return []

    def load_warnings(self) -> list[str]:
        """What was loaded leniently (`check-config --strict` makes these errors)."""
        return []

    def shutdown(self) -> None:
        """The worker is about to exit: write out what is queued (a history, a log).

        Called once per worker process after its sessions are drained; a worker
        ends with os._exit, so atexit handlers do not run.
        """
        return None
