"""The process-wide state of one filter process: settings, the built filter, policy.

Built once per (re)load, immutable, shared by every libmilter thread. A reload
builds a new one and new workers serve it (see runner.py); the old one is
never mutated.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from milters.core.config import Config
from milters.core.filter import Env, Filter, Stage
from milters.core.policy import SitePolicy


@dataclass(frozen=True)
class Runtime:
    config: Config
    filter: Filter
    policy: SitePolicy
    # The SMTP stages this filter needs, worked out once (a checks filter walks its
    # tables for it), not at every connection.
    needed: Stage = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "needed", self.filter.needed_stages())

    @property
    def env(self) -> Env:
        return self.filter.env

    @property
    def strip_all_forged(self) -> bool:
        """RFC 8601 §5: this filter removes every incoming field with our authserv-id,
        because no filter of ours runs before it (core/authresults.py, Env.upstream)."""
        return not self.env.upstream

    @property
    def accepts_early(self) -> bool:
        """Answer ACCEPT at CONNECT for an internal client (Filter.skips_internal).

        Nothing is lost: RFC 8601 §5 asks for the removal of fields with our
        authserv-id only from mail arriving from outside the trust boundary, and
        internal clients are inside it. Not for the filter that applies the holds
        handed on by the others (core/hold.py): it must see every message.
        """
        return self.filter.skips_internal() and not self.applies_holds

    @property
    def applies_holds(self) -> bool:
        """Last of ours in the chain, after others: it asks for the holds they
        handed on (core/hold.py), so it reads the header and may quarantine."""
        return bool(self.env.upstream) and not self.env.downstream


class SessionCounter:
    """Open SMTP sessions of this process, so that a stop can drain them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._open = 0
        self._refused = 0  # refusals not yet logged
        self._logged_at = -1e9

    def opened(self) -> None:
        with self._lock:
            self._open += 1

    def closed(self) -> None:
        with self._lock:
            self._open = max(0, self._open - 1)
            if self._open == 0:
                self._idle.notify_all()

    def refused(self, interval: float) -> int:
        """Count a refused connection; the number to log now (0: stay quiet, a
        line went out less than `interval` seconds ago)."""
        with self._lock:
            self._refused += 1
            now = time.monotonic()
            if now - self._logged_at < interval:
                return 0
            count, self._refused, self._logged_at = self._refused, 0, now
            return count

    @property
    def open(self) -> int:
        with self._lock:
            return self._open

    def wait_idle(self, timeout: float) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: self._open == 0, timeout)
