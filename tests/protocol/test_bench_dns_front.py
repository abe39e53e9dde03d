"""bench/dns_front.py: the caching UDP front answers as the server behind it does,
with each query's own id, and asks that server once per distinct question."""

from __future__ import annotations

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from bench.dns_front import cached_dns
from tests.support.processes import free_port


def test_second_query_is_answered_from_memory_with_its_own_id() -> None:
    port = free_port()
    with cached_dns("127.0.0.1", port) as (server, front):
        server.txt("_dmarc.example.org", "v=DMARC1; p=reject")
        answers = []
        for _ in range(3):
            query = dns.message.make_query("_dmarc.example.org", dns.rdatatype.TXT)
            reply = dns.query.udp(query, "127.0.0.1", port=port, timeout=2.0)
            assert reply.id == query.id
            answers.append([r.to_text() for r in reply.answer[0]])
        missing = dns.query.udp(dns.message.make_query("nothing.example", "TXT"),
                                "127.0.0.1", port=port, timeout=2.0)
        tcp = dns.query.tcp(dns.message.make_query("_dmarc.example.org", "TXT"),
                            "127.0.0.1", port=port, timeout=2.0)
    assert answers == [['"v=DMARC1; p=reject"']] * 3
    assert missing.rcode() == dns.rcode.NXDOMAIN
    assert [r.to_text() for r in tcp.answer[0]] == ['"v=DMARC1; p=reject"']
    assert (front.queries, front.misses) == (4, 2)
