"""Run one filter: libmilter on its socket, pre-forked workers, reload and drain.

The parent opens the listening socket once, sets TCP_NODELAY on it (Linux copies
it to every accepted socket: no 40 ms Nagle stall on our replies, see
shared/notes/milter-latency.md) and O_NONBLOCK (several workers accept on it),
then forks `workers` processes that each run libmilter's accept loop with their
own GIL. libmilter handles SIGHUP in a worker as "stop", so reloads are done by
the parent: it builds the new runtime, and only if that succeeds starts fresh
workers on the same socket and retires the old ones, which drain their open
sessions first. A bad new config is logged and the old workers keep serving.
SIGTERM to the parent drains every worker the same way, then exits.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable

from milters.core import metrics
from milters.core.adapter import LibmilterError, open_socket, serve_forever
from milters.core.config import Config
from milters.core.errors import ConfigError, MiltersError
from milters.core.runtime import Runtime, SessionCounter
from milters.core.sockets import SocketSpec, parse_socket
from milters.core.supervisor import Supervisor, block_signals, child_signals, die_with_parent

log = logging.getLogger(__name__)

# How long a stopping worker waits for its open sessions to finish.
DRAIN_SECONDS = 30.0
# What the parent sends a worker to make it drain and exit.
DRAIN_SIGNAL = signal.SIGUSR1


def find_listening_fd(spec: SocketSpec) -> int:
    """The fd of the socket libmilter opened (it does not hand it out)."""
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                continue
            name = sock.getsockname()
            if spec.family == "unix":
                if name == spec.path:
                    return fd
            elif isinstance(name, tuple) and name[1] == spec.port:
                return fd
        except OSError:
            continue
        finally:
            sock.close()
    raise MiltersError(f"cannot find the listening socket for {spec}")


def tune_listener(fd: int, spec: SocketSpec) -> None:
    if spec.family != "unix":
        sock = socket.socket(fileno=os.dup(fd))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        finally:
            sock.close()
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


def _worker(runtime: Runtime, listen_fd: int) -> None:
    """Body of a forked worker: libmilter's loop, and a thread that waits for a drain."""
    child_signals()
    # Blocked before libmilter starts its threads, so they all inherit the block
    # and only the drain thread's sigwait receives it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {DRAIN_SIGNAL})
    sessions = SessionCounter()
    threading.Thread(
        target=_drain_on_request, args=(runtime, sessions, listen_fd),
        name="drain", daemon=True,
    ).start()
    status = 0
    try:
        serve_forever(runtime, sessions)
    except LibmilterError as exc:
        log.error("filter %s: libmilter stopped: %s", runtime.filter.name, exc)
        status = 1
    _shutdown(runtime)
    logging.shutdown()
    os._exit(status)


def _drain_on_request(runtime: Runtime, sessions: SessionCounter, listen_fd: int) -> None:
    """Stop taking connections, let the open sessions finish, then exit.

    libmilter's own stop (SIGTERM) also stops serving the sessions in progress
    (Debian builds it with the worker pool), so we never ask it to stop: this
    worker's listening fd is replaced by a pipe that never becomes readable, its
    accept loop idles, and the other workers (or the parent, for new workers)
    keep the real socket. Postfix keeps a milter connection for a whole SMTP
    session, so the wait is bounded by DRAIN_SECONDS.
    """
    # libmilter's signal thread must be the one that gets these, not us.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGHUP, signal.SIGINT})
    signal.sigwait({DRAIN_SIGNAL})
    name = runtime.filter.name
    never_readable, _keep_open = os.pipe()
    os.dup2(never_readable, listen_fd)
    open_now = sessions.open
    if open_now:
        log.info("filter %s: draining %d open session(s)", name, open_now)
    if not sessions.wait_idle(DRAIN_SECONDS):
        log.warning("filter %s: %d session(s) still open after %.0f s; exiting",
                    name, sessions.open, DRAIN_SECONDS)
    _shutdown(runtime)
    logging.shutdown()
    os._exit(0)


def _shutdown(runtime: Runtime) -> None:
    try:
        runtime.filter.shutdown()
    except Exception:  # exiting anyway: say what was lost
        log.exception("filter %s: shutdown failed", runtime.filter.name)


def _forker(get_runtime: Callable[[], Runtime], listen_fd: int) -> Callable[[str], int]:
    def spawn(slot: str) -> int:
        runtime = get_runtime()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            die_with_parent(DRAIN_SIGNAL, parent)
            _worker(runtime, listen_fd)
        return pid

    return spawn


def run_filter(name: str, cfg: Config, build: Callable[[Config, str], Runtime],
               reload_config: Callable[[], Config]) -> int:
    """Serve filter `name` until SIGTERM. Returns the process exit status."""
    exporter = metrics.start_exporter(cfg, name)  # before build: see core/metrics.py
    runtime = build(cfg, name)
    settings = cfg.filters[name]
    spec = parse_socket(settings.socket)
    if not spec.is_loopback:
        log.warning("filter %s listens on %s, which is not loopback: make sure only "
                    "your MTA can reach it", name, spec)
    try:
        open_socket(name, runtime, spec.libmilter, int(settings.timeout))
    except LibmilterError as exc:
        raise MiltersError(f"filter {name}: cannot listen on {spec}: {exc}") from None
    fd = find_listening_fd(spec)
    tune_listener(fd, spec)
    for line in runtime.filter.describe():
        log.info("filter %s: %s", name, line)
    log.info("filter %s: listening on %s (Postfix: %s) with %d worker(s), mode=%s",
             name, spec.libmilter, spec.postfix, settings.workers, runtime.policy.mode)

    current = [runtime]
    block_signals()
    sup = Supervisor(f"filter {name}", _forker(lambda: current[0], fd), stop_signal=DRAIN_SIGNAL)
    sup.on_exit = exporter.worker_exited
    for i in range(settings.workers):
        sup.start(f"worker {i + 1}")

    def on_reload() -> None:
        try:
            new_cfg = reload_config()
            new_rt = build(new_cfg, name)
        except ConfigError as exc:
            log.error("filter %s: reload refused, keeping the running configuration:\n%s",
                      name, exc)
            return
        new_spec = parse_socket(new_cfg.filters[name].socket)
        if new_spec != spec:
            log.error("filter %s: reload refused: the socket changed (%s -> %s); "
                      "restart the filter to move it", name, spec, new_spec)
            return
        current[0] = new_rt
        old = [pid for pid, c in sup.children.items() if not c.retiring]
        for i in range(new_cfg.filters[name].workers):
            sup.start(f"worker {i + 1}")
        sup.retire(old)
        log.info("filter %s: configuration reloaded from %s", name, new_cfg.source)

    return sup.loop(on_reload, grace=DRAIN_SECONDS + 10)
