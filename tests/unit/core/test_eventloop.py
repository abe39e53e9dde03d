"""The Python core's event loop (core/eventloop.py), driven step by step in this
thread over real sockets: the runner's gate, silent connections, and the hand-over
to a thread of a step that needs a DNS answer the cache does not have."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from milters import registry
from milters.client.session import MilterSession
from milters.core import protocol
from milters.core.adapter import Session, adapter_class
from milters.core.envelope import Envelope
from milters.core.errors import NeedsThread
from milters.core.eventloop import EventLoop, Handoff
from milters.core.pyserver import Connection, ContextMacros
from milters.core.runtime import Runtime, SessionCounter
from milters.core.sockets import kernel_timeval
from tests.support.dns import LoopbackDNS, dns_server


@dataclass
class FakeGate:
    paused: bool = False
    retired: bool = False


@pytest.fixture()
def dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        server.txt("_dmarc.example.org", "v=DMARC1; p=reject")
        yield server


@pytest.fixture()
def runtime(tmp_path: Path, dns: LoopbackDNS) -> Runtime:
    config = tmp_path / "dmarc.toml"
    config.write_text(f'[global]\nauthserv_id = "mx.test.example"\ninternal_networks = []\n'
                      f'{dns.toml()}[dmarc]\nhistory = ""\nreject_failures = true\n')
    return registry.build_runtime(registry.load(str(config)), "dmarc")


@pytest.fixture()
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


def make_loop(runtime: Runtime, listener: socket.socket, gate: FakeGate,
              timeout: float = 30.0) -> EventLoop:
    klass = adapter_class(runtime, SessionCounter(), ContextMacros(), 100)
    return EventLoop(listener.fileno(), gate, klass, timeout, Handoff(10, "dmarc"))


def steps_until(loop: EventLoop, done: object, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:  # type: ignore[operator]
        loop.step()
    assert done()  # type: ignore[operator]


def test_the_gate_stops_and_resumes_accepting(runtime: Runtime, listener: socket.socket) -> None:
    gate = FakeGate(paused=True)
    loop = make_loop(runtime, listener, gate)
    client = socket.create_connection(listener.getsockname())
    try:
        loop.step()
        assert loop.conns == {}  # paused: the connection waits in the backlog
        gate.paused = False
        steps_until(loop, lambda: len(loop.conns) == 1)
        gate.retired = True
        loop.step()
        assert loop.listener is None  # drained: this worker lets go of the port
        assert len(loop.conns) == 1  # ...and keeps serving what it has
    finally:
        client.close()


def test_a_silent_connection_is_closed_after_the_timeout(runtime: Runtime,
                                                         listener: socket.socket) -> None:
    loop = make_loop(runtime, listener, FakeGate(), timeout=0.3)
    client = socket.create_connection(listener.getsockname())
    try:
        steps_until(loop, lambda: len(loop.conns) == 1)
        steps_until(loop, lambda: not loop.conns)
        client.settimeout(5)
        assert client.recv(10) == b""  # the MTA side sees the close
    finally:
        client.close()


def test_a_lookup_not_cached_moves_the_connection_to_a_thread(
        runtime: Runtime, listener: socket.socket, dns: LoopbackDNS) -> None:
    """The first message of a domain needs DNS: a thread finishes it. The second is
    answered from the cache, in the loop. Both get the same, right, verdict."""
    runtime.env.resolver.cache_only_thread = threading.get_ident()
    loop = make_loop(runtime, listener, FakeGate())
    handed: list[Connection] = []
    submit = loop.handoff.submit
    loop.handoff.submit = lambda c: (handed.append(c), submit(c))  # type: ignore[method-assign]
    spec = f"inet:{listener.getsockname()[1]}@127.0.0.1"
    message = (b"From: <a@example.org>\r\nTo: <u@example.net>\r\nSubject: hi\r\n\r\nbody\r\n")
    verdicts: list[str] = []

    def send() -> None:
        with MilterSession(spec, timeout=10) as s:
            s.connect(Envelope(client_ip="192.0.2.9"))
            s.helo("mail.example.org")
            s.mail("a@example.org")
            s.rcpt("u@example.net")
            replies = s.message(message)
            verdicts.append(replies[-1].action)

    for _ in range(2):
        client = threading.Thread(target=send)
        client.start()
        deadline = time.monotonic() + 10
        while client.is_alive() and time.monotonic() < deadline:
            loop.step()
        client.join(1)
    assert verdicts == ["reject", "reject"]  # p=reject, no dkim or spf pass
    assert len(handed) == 1  # only the message that needed the network
    assert ("_dmarc.example.org", "TXT") in dns.resolver.queries


def test_a_step_run_again_does_not_take_its_body_twice() -> None:
    """End of body with a last chunk: the chunk is taken once; what runs again in
    the thread is the end of message alone."""

    class Once:
        def __init__(self) -> None:
            self.chunks: list[bytes] = []
            self.tries = 0

        def body(self, chunk: bytes) -> int:
            self.chunks.append(chunk)
            return int(protocol.SMFIR_CONTINUE[0])

        def eom(self) -> int:
            self.tries += 1
            if self.tries == 1:
                raise NeedsThread("DNS TXT _dmarc.example.org")
            from milters.core.adapter import CONTINUE
            return CONTINUE

    def packet(cmd: bytes, data: bytes = b"") -> bytes:
        return struct.pack(">I", len(data) + 1) + cmd + data

    a, b = socket.socketpair()
    try:
        conn = Connection(a, Session, kernel_timeval(5.0))
        session = Once()
        conn.session = session  # type: ignore[assignment]
        conn.in_transaction = True
        rest = packet(protocol.SMFIC_QUIT)
        with pytest.raises(NeedsThread):
            conn.feed(packet(protocol.SMFIC_BODYEOB, b"last chunk") + rest)
        assert conn.in_transaction  # unchanged: the step runs again
        assert conn.buf == packet(protocol.SMFIC_BODYEOB) + rest
        assert conn.feed(b"") is False  # end of message, then QUIT
        assert session.chunks == [b"last chunk"]
        assert session.tries == 2
        assert b.recv(100) == packet(protocol.SMFIR_CONTINUE)
    finally:
        a.close()
        b.close()


def test_the_resolver_refuses_the_network_only_in_the_loop_thread(runtime: Runtime) -> None:
    resolver = runtime.env.resolver
    resolver.cache_only_thread = threading.get_ident()
    with pytest.raises(NeedsThread):
        resolver.txt("_dmarc.example.org")
    found: list[list[bytes]] = []
    other = threading.Thread(target=lambda: found.append(resolver.txt("_dmarc.example.org")))
    other.start()
    other.join(10)
    assert found == [[b"v=DMARC1; p=reject"]]
    assert resolver.txt("_dmarc.example.org") == [b"v=DMARC1; p=reject"]  # cached now
