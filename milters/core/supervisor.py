"""A small process supervisor: keeps named children alive, stops them cleanly.

Used twice: `milters run NAME` supervises the pre-forked workers of one filter
(they share its listening socket), and `milters serve` supervises one
`milters run` process per enabled filter. The parent waits for signals with
sigtimedwait (no Python handlers, no threads: it must be able to fork safely).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

WATCHED = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD})

# A child that dies this soon after its start counts toward a crash loop.
QUICK_DEATH = 5.0


@dataclass
class Child:
    slot: str
    pid: int
    started: float
    retiring: bool = False  # told to stop; not restarted when it exits


@dataclass
class Supervisor:
    """Children by slot name; `spawn(slot)` forks or execs one and returns its pid."""

    what: str
    spawn: Callable[[str], int]
    stop_signal: int = signal.SIGTERM
    children: dict[int, Child] = field(default_factory=dict)
    quick_deaths: dict[str, int] = field(default_factory=dict)
    stopping: bool = False
    # Called with the pid of every child reaped, ours or not (the metrics exporter
    # is forked outside `children`; core/metrics.py).
    on_exit: Callable[[int], None] | None = None

    def start(self, slot: str) -> None:
        pid = self.spawn(slot)
        self.children[pid] = Child(slot, pid, time.monotonic())
        log.debug("%s: started %s as pid %d", self.what, slot, pid)

    def slots(self) -> list[str]:
        return [c.slot for c in self.children.values() if not c.retiring]

    def retire(self, pids: list[int], sig: int | None = None) -> None:
        sig = self.stop_signal if sig is None else sig
        for pid in pids:
            child = self.children.get(pid)
            if child is None:
                continue
            child.retiring = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def reap(self) -> None:
        """Collect exited children; restart the ones that were not told to stop."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.on_exit is not None:
                self.on_exit(pid)
            child = self.children.pop(pid, None)
            if child is None:
                continue
            how = _status_text(status)
            if child.retiring or self.stopping:
                log.info("%s: %s (pid %d) stopped: %s", self.what, child.slot, pid, how)
                continue
            lived = time.monotonic() - child.started
            quick = self.quick_deaths.get(child.slot, 0) + 1 if lived < QUICK_DEATH else 0
            self.quick_deaths[child.slot] = quick
            delay = min(30.0, 0.5 * 2 ** max(0, quick - 1)) if quick else 0.0
            log.error(
                "%s: %s (pid %d) died: %s after %.1f s; restarting%s",
                self.what, child.slot, pid, how, lived,
                f" in {delay:.1f} s" if delay else "",
            )
            if delay:
                time.sleep(delay)
            self.start(child.slot)

    def stop_all(self, grace: float) -> None:
        """Signal every child to stop, wait up to `grace` seconds, then SIGKILL the rest."""
        self.stopping = True
        self.retire(list(self.children))
        deadline = time.monotonic() + grace
        while self.children and time.monotonic() < deadline:
            self.reap()
            if self.children:
                signal.sigtimedwait({signal.SIGCHLD}, 0.2)
        for pid, child in list(self.children.items()):
            log.warning("%s: %s (pid %d) did not stop in %.0f s; killing",
                        self.what, child.slot, pid, grace)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.children:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.children.pop(pid, None)

    def loop(self, on_reload: Callable[[], None], grace: float) -> int:
        """Wait for signals until SIGTERM/SIGINT; SIGHUP calls `on_reload`."""
        while True:
            info = signal.sigtimedwait(WATCHED, 1.0)
            self.reap()
            if info is None or info.si_signo == signal.SIGCHLD:
                continue
            if info.si_signo in (signal.SIGTERM, signal.SIGINT):
                log.info("%s: %s received, stopping", self.what,
                         signal.Signals(info.si_signo).name)
                self.stop_all(grace)
                return 0
            if info.si_signo == signal.SIGHUP:
                on_reload()


def block_signals() -> None:
    """Hold the signals we wait for, so sigtimedwait receives them (parent side)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)


def child_signals() -> None:
    """A forked child starts with default handlers and nothing blocked."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


def die_with_parent(sig: int, parent: int) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux).

    A supervisor killed with SIGKILL cannot pass a stop on; without this its
    workers would keep the listening socket and block the restarted filter.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, sig, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)
