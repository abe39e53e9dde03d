"""The Python core's event loop: one thread reads every connection of a worker.

With a thread per MTA connection (core/pyserver.py Acceptors), each of the
nine or so writes Postfix makes per message wakes a thread, which must then
take the GIL from whichever thread holds it: at 4 to 64 concurrent sessions a
worker spent 12-20 % more CPU per message on those hand-offs than one thread
reading every socket from epoll (bench/README.md). So a filter whose decisions
wait on nothing but DNS (Filter.waits_only_on_dns) is served here: the loop
runs the same Connection packet code (protocol, adapter, pipeline, filter) for
every socket that is readable.

Nothing in the loop may wait on the network. The one thing a filter of that
kind waits on is a DNS answer its cache does not have: the resolver raises
NeedsThread in this thread (core/resolver.py cache_only_thread), the step is
left at the head of the connection's buffer (Connection.feed), and a thread
takes the connection over and serves it to its end, running the step again,
now with the network. Steps are safe to run again up to their first lookup.

The listening socket is a dup of the worker's inherited fd, registered with
EPOLLEXCLUSIVE (one worker woken per connection); the runner's ListenerGate
(pause when descriptors run short, retire for a drain) is read at every wake-up,
at least every POLL_SECONDS. A connection silent for the filter's timeout is
closed, as SO_RCVTIMEO closes it in a thread.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import threading
import time
from typing import Protocol

from milters.core.adapter import Session, adapter_class
from milters.core.errors import NeedsThread
from milters.core.pyserver import (
    ACCEPT_WAKE_SECONDS,
    SPARE_THREADS,
    ConnectionClosed,
    ContextMacros,
)
from milters.core.pyserver import Connection as MtaConnection
from milters.core.runtime import Runtime, SessionCounter
from milters.core.sockets import kernel_timeval, set_timeouts

log = logging.getLogger(__name__)

# The longest the loop sleeps without looking at the gate (the drain waits
# ACCEPT_WAKE_SECONDS + 0.05 s after retiring it) and at silent connections.
POLL_SECONDS = ACCEPT_WAKE_SECONDS
# After accept() fails for want of descriptors, the listener rests this long
# (it stays readable: without a rest the loop would spin).
ACCEPT_REST_SECONDS = 0.1
# How long a reply may wait for room in the socket's send buffer before the
# connection is dropped. A reply is a few bytes and an MTA reads them; only a
# peer that sends and never reads fills the buffers (megabytes), and it must not
# hold every other connection of the worker for the filter's whole timeout.
SEND_SECONDS = 1.0


_SEND_TIMEVAL = kernel_timeval(SEND_SECONDS)


class Gate(Protocol):
    """What the loop reads of the runner's ListenerGate."""

    @property
    def paused(self) -> bool: ...

    @property
    def retired(self) -> bool: ...


class Handoff:
    """Threads that take connections over from the loop and serve them to their end.

    Started on demand up to `limit`, SPARE_THREADS of them kept idle. Past the
    limit a connection waits in the queue (logged once, as the thread core does).
    """

    def __init__(self, limit: int, name: str) -> None:
        self.limit = limit
        self.name = name
        self._jobs: queue.SimpleQueue[MtaConnection] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._threads = 0
        self._saturated = False

    def submit(self, conn: MtaConnection) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
            elif self._threads < self.limit:
                self._threads += 1
                threading.Thread(target=self._run, name="milter", daemon=True).start()
            elif not self._saturated:
                self._saturated = True
                log.warning("filter %s: all %d connection threads busy; connections wait "
                            "for one (see max_connections)", self.name, self._threads)
        self._jobs.put(conn)

    def _run(self) -> None:
        while True:
            self._jobs.get().serve()  # logs its own errors, never raises
            with self._lock:
                self._saturated = False
                if self._idle >= SPARE_THREADS:
                    self._threads -= 1
                    return
                self._idle += 1


class EventLoop:
    """One worker's connections, read from one epoll in one thread."""

    def __init__(self, listen_fd: int, gate: Gate | None, klass: type[Session],
                 timeout: float, handoff: Handoff) -> None:
        self.klass = klass
        self.timeout = timeout
        self.timeval = kernel_timeval(timeout)
        self.gate = gate
        self.handoff = handoff
        self.epoll = select.epoll()
        # Our own descriptor of the listening socket: the gate swaps a pipe onto
        # the inherited fd number, and epoll must never hold a registration for a
        # file that fd no longer names. O_NONBLOCK is the socket's (shared by the
        # workers, all of which run this loop): a connection another worker took
        # is EAGAIN here, never a wait.
        self.listener: socket.socket | None = socket.socket(fileno=os.dup(listen_fd))
        self.listener.setblocking(False)
        self._kind = (self.listener.family, socket.SOCK_STREAM, self.listener.proto)
        self._tcp = self.listener.family in (socket.AF_INET, socket.AF_INET6)
        self._listening = False
        self._rest_until = 0.0
        self.conns: dict[int, MtaConnection] = {}
        self.last_read: dict[int, float] = {}
        self._next_sweep = 0.0

    def run(self) -> None:
        while True:
            self.step()

    def step(self) -> None:
        """Wait for readable sockets (at most POLL_SECONDS) and serve them."""
        self._follow_gate()
        events = self.epoll.poll(POLL_SECONDS)
        now = time.monotonic()
        listener = self.listener
        for fd, _ in events:
            if listener is not None and fd == listener.fileno():
                self._accept(now)
            else:
                self._read(fd, now)
        if now >= self._next_sweep:
            self._next_sweep = now + 1.0
            self._sweep(now)

    # -- the listening socket ----------------------------------------------------

    def _follow_gate(self) -> None:
        listener = self.listener
        if listener is None:
            return
        gate = self.gate
        if gate is not None and gate.retired:
            # A drain: no new connection, and this worker's hold on the port goes.
            if self._listening:
                self.epoll.unregister(listener.fileno())
            listener.close()
            self.listener = None
            self._listening = False
            return
        want = (gate is None or not gate.paused) and time.monotonic() >= self._rest_until
        if want and not self._listening:
            self.epoll.register(listener.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
            self._listening = True
        elif not want and self._listening:
            self.epoll.unregister(listener.fileno())
            self._listening = False

    def _accept(self, now: float) -> None:
        assert self.listener is not None
        while True:
            try:
                fd, _ = self.listener._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of descriptors (EMFILE/ENFILE) or memory: rest, do not spin
                # (the runner's gate pauses us before long when descriptors run out).
                log.debug("filter %s: accept failed: %s", self.handoff.name, exc)
                self._rest_until = now + ACCEPT_REST_SECONDS
                return
            sock = socket.socket(*self._kind, fileno=fd)
            try:
                if self._tcp:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # Our writes block, briefly (SEND_SECONDS; a thread that takes
                # the connection over sets the filter's timeout).
                set_timeouts(sock, _SEND_TIMEVAL, receive=False)
                self.epoll.register(fd, select.EPOLLIN)
            except OSError:
                sock.close()
                continue
            self.conns[fd] = MtaConnection(sock, self.klass, self.timeval, self._tcp)
            self.last_read[fd] = now

    # -- connections ---------------------------------------------------------------

    def _read(self, fd: int, now: float) -> None:
        conn = self.conns.get(fd)
        if conn is None:
            return
        self.last_read[fd] = now
        try:
            chunk = conn.sock.recv(65536, socket.MSG_DONTWAIT)
            if chunk and conn.take(chunk):
                return
            if not chunk:
                raise ConnectionClosed("closed by the MTA")
        except BlockingIOError:
            return  # woken for nothing
        except NeedsThread as exc:
            # The step needs the network: a thread serves the rest (feed left
            # the step in the buffer).
            log.debug("filter %s: %s not cached: a thread takes the connection over",
                      self.handoff.name, exc)
            self._forget(fd)
            self.handoff.submit(conn)
            return
        except (ConnectionClosed, OSError):
            pass  # the MTA closed, or sent what no MTA sends: as in a thread
        except Exception:  # a bug here must not pass silently, nor stop the loop
            log.exception("milter connection ended by an error in the protocol loop")
        self._forget(fd)
        conn.close()

    def _forget(self, fd: int) -> None:
        del self.conns[fd]
        del self.last_read[fd]
        self.epoll.unregister(fd)

    def _sweep(self, now: float) -> None:
        """Close the connections silent for the filter's timeout."""
        late = [fd for fd, t in self.last_read.items() if now - t > self.timeout]
        for fd in late:
            conn = self.conns[fd]
            log.info("filter %s: milter connection closed after %g s without a packet",
                     self.handoff.name, self.timeout)
            self._forget(fd)
            conn.close()


def serve_forever(runtime: Runtime, sessions: SessionCounter, max_connections: int,
                  listen_fd: int, gate: Gate | None) -> None:
    """Serve this worker's connections from the event loop, until the process ends."""
    name = runtime.filter.name
    timeout = float(runtime.config.filters[name].timeout)
    klass = adapter_class(runtime, sessions, ContextMacros(), max_connections,
                          quick_ack=True)
    # This thread must never wait on the network (see the module docstring).
    runtime.env.resolver.cache_only_thread = threading.get_ident()
    # Room beyond max_connections so that a session over the limit is answered
    # 451 by the adapter (in the loop), not left waiting for a thread.
    loop = EventLoop(listen_fd, gate, klass, timeout, Handoff(max_connections + 16, name))
    loop.run()
