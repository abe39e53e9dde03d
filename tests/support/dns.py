"""A DNS server on loopback serving test zones (dnslib), UDP and TCP, in a thread.

Records are set and changed by the test while the server runs; names with no
records answer NXDOMAIN; `delay` makes every answer slow (timeout tests);
`fail` makes it answer SERVFAIL. Long TXT values are split into 255-byte strings
as a real zone would hold them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dnslib import AAAA, QTYPE, RCODE, RR, TXT, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from tests.support.processes import free_port


class ZoneResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[Any]] = {}
        self.lock = threading.Lock()
        self.delay = 0.0
        self.fail = False
        self.queries: list[tuple[str, str]] = []

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries.append((qname, qtype))
            delay, fail = self.delay, self.fail
            answers = list(self.records.get((qname, qtype), []))
            exists = any(name == qname for name, _ in self.records)
        if delay:
            time.sleep(delay)
        if fail:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        for rdata in answers:
            reply.add_answer(RR(request.q.qname, getattr(QTYPE, qtype), rdata=rdata, ttl=60))
        if not answers and not exists:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


class LoopbackDNS:
    """The running server: add records with `txt`, `a`, `aaaa`; `clear` empties it."""

    def __init__(self, resolver: ZoneResolver, port: int) -> None:
        self.resolver = resolver
        self.port = port
        self.address = "127.0.0.1"

    def _add(self, name: str, qtype: str, rdata: Any) -> None:
        with self.resolver.lock:
            self.resolver.records.setdefault((name.rstrip(".").lower(), qtype), []).append(rdata)

    def txt(self, name: str, value: str | bytes) -> None:
        data = value.encode() if isinstance(value, str) else value
        chunks = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
        self._add(name, "TXT", TXT(chunks))

    def a(self, name: str, address: str) -> None:
        self._add(name, "A", A(address))

    def aaaa(self, name: str, address: str) -> None:
        self._add(name, "AAAA", AAAA(address))

    def clear(self) -> None:
        with self.resolver.lock:
            self.resolver.records.clear()
            self.resolver.queries.clear()
            self.resolver.delay = 0.0
            self.resolver.fail = False

    def set_delay(self, seconds: float) -> None:
        with self.resolver.lock:
            self.resolver.delay = seconds

    def set_fail(self, fail: bool) -> None:
        with self.resolver.lock:
            self.resolver.fail = fail

    def toml(self, timeout: float = 2.0) -> str:
        """The [global.dns] table that points the suite at this server."""
        return (f'[global.dns]\nnameservers = ["{self.address}"]\nport = {self.port}\n'
                f"timeout = {timeout}\n")


@contextmanager
def dns_server() -> Iterator[LoopbackDNS]:
    resolver = ZoneResolver()
    port = free_port()
    quiet = DNSLogger(logf=lambda _: None)  # dnslib prints every query otherwise
    servers = [DNSServer(resolver, port=port, address="127.0.0.1", tcp=tcp, logger=quiet)
               for tcp in (False, True)]
    for s in servers:
        s.start_thread()
    try:
        yield LoopbackDNS(resolver, port)
    finally:
        for s in servers:
            s.stop()
