"""A DNS server on loopback serving test zones (dnslib), UDP and TCP, in a thread.

Records are set and changed by the test while the server runs; names with no
records answer NXDOMAIN; `delay` makes every answer slow (timeout tests);
`fail` makes it answer SERVFAIL; a name marked with `timeout` gets no answer at
all for types it has no records of. A CNAME is followed within the zones, as a
recursive resolver would, its records added to the answer. Long TXT values are
split into 255-byte strings as a real zone would hold them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dnslib import AAAA, CNAME, MX, PTR, QTYPE, RCODE, RR, TXT, A, DNSLabel, DNSRecord
from dnslib.dns import DNSError
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from tests.support.processes import free_port


def _key(name: str) -> str:
    """A name as the server sees it in a query: dnslib's presentation form (a
    space in a label is \\032), lower case, no final dot."""
    return str(DNSLabel(name)).rstrip(".").lower()


class ZoneResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[Any]] = {}
        self.lock = threading.Lock()
        self.delay = 0.0
        self.fail = False
        self.queries: list[tuple[str, str]] = []
        self.timeouts: set[str] = set()

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries.append((qname, qtype))
            delay, fail = self.delay, self.fail
            answers = [(qname, qtype, r) for r in self.records.get((qname, qtype), [])]
            if not answers and qtype != "CNAME":
                answers = self._chase(qname, qtype)
            exists = any(name == qname for name, _ in self.records)
            silent = not answers and qname in self.timeouts
        if silent:
            raise DNSError("no answer: a timeout for the client")  # dnslib sends nothing
        if delay:
            time.sleep(delay)
        if fail:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        for name, rtype, rdata in answers:
            rname = request.q.qname if name == qname else name
            reply.add_answer(RR(rname, getattr(QTYPE, rtype), rdata=rdata, ttl=60))
        if not answers and not exists:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


    def _chase(self, qname: str, qtype: str) -> list[tuple[str, str, Any]]:
        """CNAME records from `qname` on, then the target's `qtype` records (lock held)."""
        out: list[tuple[str, str, Any]] = []
        seen = {qname}
        name = qname
        for _ in range(8):
            cnames = self.records.get((name, "CNAME"), [])
            if not cnames:
                break
            out.append((name, "CNAME", cnames[0]))
            name = str(cnames[0].label).rstrip(".").lower()
            if name in seen:
                break  # a loop: the client sees it
            seen.add(name)
            found = self.records.get((name, qtype), [])
            if found:
                return out + [(name, qtype, r) for r in found]
        return out


class LoopbackDNS:
    """The running server: add records with `txt`, `a`, `aaaa`; `clear` empties it."""

    def __init__(self, resolver: ZoneResolver, port: int) -> None:
        self.resolver = resolver
        self.port = port
        self.address = "127.0.0.1"

    def _add(self, name: str, qtype: str, rdata: Any) -> None:
        with self.resolver.lock:
            self.resolver.records.setdefault((_key(name), qtype), []).append(rdata)

    def txt(self, name: str, value: str | bytes) -> None:
        data = value.encode() if isinstance(value, str) else value
        chunks = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
        self._add(name, "TXT", TXT(chunks))

    def a(self, name: str, address: str) -> None:
        self._add(name, "A", A(address))

    def aaaa(self, name: str, address: str) -> None:
        self._add(name, "AAAA", AAAA(address))

    def spf(self, name: str, value: str | bytes) -> None:
        """A record of the old SPF type (99), RFC 4408; RFC 7208 §3.1 ignores it."""
        data = value.encode() if isinstance(value, str) else value
        self._add(name, "SPF", TXT([data[i:i + 255] for i in range(0, len(data), 255)] or [b""]))

    def txt_strings(self, name: str, strings: list[bytes]) -> None:
        """A TXT record made of exactly these strings (RFC 7208 §3.3 joins them)."""
        self._add(name, "TXT", TXT(strings))

    def mx(self, name: str, preference: int, exchange: str) -> None:
        self._add(name, "MX", MX(exchange, preference))

    def ptr(self, name: str, target: str) -> None:
        self._add(name, "PTR", PTR(target))

    def cname(self, name: str, target: str) -> None:
        self._add(name, "CNAME", CNAME(target))

    def timeout(self, name: str) -> None:
        """Queries for `name` (of types it has no records of) get no answer."""
        with self.resolver.lock:
            self.resolver.timeouts.add(_key(name))

    def clear(self) -> None:
        with self.resolver.lock:
            self.resolver.records.clear()
            self.resolver.timeouts.clear()
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
def serving(resolver: ZoneResolver, address: str, port: int) -> Iterator[None]:
    """Answer from `resolver` on address:port, UDP and TCP, for the `with` block."""
    quiet = DNSLogger(logf=lambda _: None)  # dnslib prints every query otherwise
    servers = [DNSServer(resolver, port=port, address=address, tcp=tcp, logger=quiet)
               for tcp in (False, True)]
    for s in servers:
        s.start_thread()
    try:
        yield
    finally:
        for s in servers:
            s.stop()


@contextmanager
def dns_server(address: str = "127.0.0.1", port: int | None = None) -> Iterator[LoopbackDNS]:
    """A loopback DNS server on a free port (or `port`, e.g. 53 on 127.0.0.153 for
    programs that only read /etc/resolv.conf: see tests/support/namespace.py)."""
    resolver = ZoneResolver()
    port = free_port() if port is None else port
    with serving(resolver, address, port):
        server = LoopbackDNS(resolver, port)
        server.address = address
        yield server
