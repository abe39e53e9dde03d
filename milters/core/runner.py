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
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable

from milters.core import eventloop, metrics, pyserver
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


# File descriptors a worker keeps beside its MTA connections: the listener,
# logging, DNS and clamd sockets, spooled message bodies, the DMARC database.
FD_RESERVE = 64
# Descriptors one connection may hold at once: its socket and a spooled body.
FDS_PER_CONNECTION = 2


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit.

    systemd starts services with a soft limit of 1,024; held connections would
    use it up, and libmilter's accept() then fails with EMFILE in a busy loop.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return int(hard if soft == resource.RLIM_INFINITY else soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
        return int(soft)
    return int(hard)


def connection_limit(name: str, configured: int, open_files: int, warn: bool = False) -> int:
    """max_connections, lowered so that a worker never runs out of descriptors."""
    fits = max(1, (open_files - FD_RESERVE) // FDS_PER_CONNECTION)
    if configured > fits and warn:
        log.warning("filter %s: max_connections = %d does not fit the open-file limit "
                    "%d; using %d (raise LimitNOFILE)", name, configured, open_files, fits)
    return min(configured, fits)


# How often a worker counts its open descriptors (see ListenerGate).
FD_CHECK_SECONDS = 0.5


class ListenerGate:
    """This worker's hold on the shared listening socket.

    Taking a connection away from libmilter is done by putting, on its listening
    fd number, a pipe that never becomes readable: its accept loop then idles
    (other workers keep the real socket). Used for good by a drain, and for a
    while when the worker runs short of descriptors: libmilter's listener, on
    EMFILE, polls and fails accept() in a busy loop at 100 % CPU, answering no
    one; held connections (accepted, never negotiated: the connection limit at
    negotiation cannot see them) could drive it there.
    """

    def __init__(self, listen_fd: int) -> None:
        self._fd = listen_fd
        self._socket = os.dup(listen_fd)
        self._never_readable, self._keep_open = os.pipe()
        self._lock = threading.Lock()
        self.paused = False
        self._retired = False

    def pause(self) -> bool:
        with self._lock:
            if self.paused or self._retired:
                return False
            os.dup2(self._never_readable, self._fd)
            self.paused = True
            return True

    def resume(self) -> bool:
        with self._lock:
            if not self.paused or self._retired:
                return False
            os.dup2(self._socket, self._fd)
            self.paused = False
            return True

    @property
    def retired(self) -> bool:
        return self._retired

    def retire(self) -> None:
        with self._lock:
            os.dup2(self._never_readable, self._fd)
            if not self._retired:
                # For good: this worker's last hold on the socket goes too, so that a
                # worker left draining (its runner killed) does not keep the port open.
                os.close(self._socket)
            self._retired = True


def _watch_descriptors(name: str, gate: ListenerGate, open_files: int) -> None:
    """Pause accepting before descriptors run out, resume when they are back."""
    high = open_files - FD_RESERVE // 2
    low = open_files - FD_RESERVE
    while True:
        time.sleep(FD_CHECK_SECONDS)
        try:
            in_use = sum(1 for _ in os.scandir("/proc/self/fd"))
        except OSError:  # EMFILE itself: we are at the limit
            in_use = open_files
        if in_use >= high and gate.pause():
            log.warning("filter %s: %d of %d open files in use; not accepting connections "
                        "until some close (raise LimitNOFILE, or look for held connections)",
                        name, in_use, open_files)
        elif in_use < low and gate.resume():
            log.info("filter %s: %d of %d open files in use; accepting connections again",
                     name, in_use, open_files)


def _worker(runtime: Runtime, listen_fd: int, max_connections: int, open_files: int) -> None:
    """Body of a forked worker: libmilter's loop, a thread that waits for a drain
    and one that watches the descriptors."""
    child_signals()
    # Blocked before libmilter starts its threads, so they all inherit the block
    # and only the drain thread's sigwait receives it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {DRAIN_SIGNAL})
    sessions = SessionCounter()
    gate = ListenerGate(listen_fd)
    threading.Thread(
        target=_drain_on_request, args=(runtime, sessions, gate),
        name="drain", daemon=True,
    ).start()
    threading.Thread(
        target=_watch_descriptors, args=(runtime.filter.name, gate, open_files),
        name="descriptors", daemon=True,
    ).start()
    status = 0
    try:
        serving = _serving(runtime)
        if serving == "event loop":
            eventloop.serve_forever(runtime, sessions, max_connections, listen_fd, gate)
        elif serving == "thread per connection":
            pyserver.serve_forever(runtime, sessions, max_connections, listen_fd)
        else:
            serve_forever(runtime, sessions, max_connections)
    except LibmilterError as exc:
        log.error("filter %s: libmilter stopped: %s", runtime.filter.name, exc)
        status = 1
    _shutdown(runtime)
    logging.shutdown()
    os._exit(status)


def _serving(runtime: Runtime) -> str:
    """How a worker serves its connections: libmilter, or the Python core from an
    event loop (a filter that waits only on DNS) or with a thread per connection."""
    if runtime.config.global_.milter_core != "python":
        return "libmilter"
    return "event loop" if runtime.filter.waits_only_on_dns else "thread per connection"


def _core_text(runtime: Runtime) -> str:
    """The milter core as the start-up line names it."""
    serving = _serving(runtime)
    if serving == "libmilter":
        return serving
    if serving == "event loop":
        return "python (event loop, a thread for a DNS lookup not cached)"
    return "python (a thread per connection)"


def _drain_on_request(runtime: Runtime, sessions: SessionCounter, gate: ListenerGate) -> None:
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
    gate.retire()
    if runtime.config.global_.milter_core == "python":
        # Its threads may sit in an accept() begun before the pipe went on the fd;
        # they wake within ACCEPT_WAKE_SECONDS, and a connection one of them took
        # is a session (negotiated at once) by the time it is counted below.
        time.sleep(pyserver.ACCEPT_WAKE_SECONDS + 0.05)
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


def _forker(get_runtime: Callable[[], Runtime], listen_fd: int,
            open_files: int) -> Callable[[str], int]:
    def spawn(slot: str) -> int:
        runtime = get_runtime()
        name = runtime.filter.name
        limit = connection_limit(name, runtime.config.filters[name].max_connections, open_files)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            die_with_parent(DRAIN_SIGNAL, parent)
            _worker(runtime, listen_fd, limit, open_files)
        return pid

    return spawn


def run_filter(name: str, cfg: Config, build: Callable[[Config, str], Runtime],
               reload_config: Callable[[], Config]) -> int:
    """Serve filter `name` until SIGTERM. Returns the process exit status."""
    open_files = raise_open_file_limit()
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
    log.info("filter %s: listening on %s (Postfix: %s) with %d worker(s), mode=%s, "
             "milter core %s, max_connections=%d per worker, open-file limit %d", name,
             spec.libmilter, spec.postfix, cfg.workers_of(name), runtime.policy.mode,
             _core_text(runtime),
             connection_limit(name, settings.max_connections, open_files, warn=True), open_files)

    current = [runtime]
    block_signals()
    sup = Supervisor(f"filter {name}", _forker(lambda: current[0], fd, open_files),
                     stop_signal=DRAIN_SIGNAL)
    sup.on_exit = exporter.worker_exited
    for i in range(cfg.workers_of(name)):
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
        for i in range(new_cfg.workers_of(name)):
            sup.start(f"worker {i + 1}")
        sup.retire(old)
        log.info("filter %s: configuration reloaded from %s", name, new_cfg.source)

    return sup.loop(on_reload, grace=DRAIN_SECONDS + 10)
