"""A caching UDP front for the loopback DNS server, as a site's local resolver would be.

OpenDMARC asks DNS for every message (libresolv keeps no cache: a site runs a
caching resolver such as unbound next to it). The tests' DNS server (dnslib, one
thread per query) spends about 1 ms of Python per answer in the bench process, CPU
that the machine then lacks for the milter being measured. This front answers each
distinct question from memory after the first time (the reply's bytes with the
query's id), a few tens of microseconds a query, and counts the queries. The
records do not change during a run, so nothing expires. TCP is served by the
dnslib server itself on the same address (answers here are small: nothing truncates).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dnslib.server import DNSLogger, DNSServer

from tests.support.dns import LoopbackDNS, dns_server

HEADER = 12


class _Front(threading.Thread):
    def __init__(self, sock: socket.socket, upstream: tuple[str, int]) -> None:
        super().__init__(name="dns-front", daemon=True)
        self.sock = sock
        self.upstream = upstream
        self.cache: dict[bytes, bytes] = {}
        self.queries = 0
        self.misses = 0
        self.stopping = False

    def run(self) -> None:
        ask = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ask.settimeout(5.0)
        with ask:
            while not self.stopping:
                try:
                    query, client = self.sock.recvfrom(4096)
                except TimeoutError:
                    continue  # look at `stopping` again
                except OSError:
                    return
                if len(query) <= HEADER:
                    continue
                self.queries += 1
                # The question (and any EDNS record) after the header is the key; the
                # header's flags are the same from one client's queries to the next.
                key = query[2:]
                reply = self.cache.get(key)
                if reply is None:
                    self.misses += 1
                    with contextlib.suppress(OSError):
                        ask.sendto(query, self.upstream)
                        reply = ask.recv(65535)[2:]
                        self.cache[key] = reply
                if reply is not None:
                    with contextlib.suppress(OSError):
                        self.sock.sendto(query[:2] + reply, client)


@contextmanager
def cached_dns(address: str, port: int) -> Iterator[tuple[LoopbackDNS, _Front]]:
    """A LoopbackDNS (add records to it) reachable at address:port: UDP through the
    caching front, TCP straight to the dnslib server. Add every record before the
    first query: a cached answer (NXDOMAIN too) is never asked again."""
    with dns_server() as dns:  # on 127.0.0.1, a free port
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, port))
        sock.settimeout(0.2)
        tcp = DNSServer(dns.resolver, port=port, address=address, tcp=True,
                        logger=DNSLogger(logf=lambda _: None))
        tcp.start_thread()
        front = _Front(sock, (dns.address, dns.port))
        front.start()
        try:
            yield dns, front
        finally:
            front.stopping = True
            front.join(timeout=2)
            sock.close()
            tcp.stop()
