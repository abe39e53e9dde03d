"""No delayed-ACK stall behind real Postfix, under both ways the Python core serves
(shared/notes/milter-latency.md, README "The milter core").

Postfix sets no TCP_NODELAY on its milter sockets: a small write it leaves
unanswered holds its next write until our ACK, and a delayed ACK takes 40 ms. The
Python core ACKs every read at once (TCP_QUICKACK) and so takes DATA and end of
header without a reply. A stall shows as 40 ms or more on every message; a
transaction through this private Postfix takes a few milliseconds, so the bound
below leaves a slow machine ten times the room.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import pytest

from tests.e2e.filters import StartFilter
from tests.e2e.postfix import PostfixInstance
from tests.support.dns import LoopbackDNS, dns_server

RCPT = "user@test.example"
OUTSIDE = {"ADDR": "198.51.100.7", "NAME": "mx.sender.example", "HELO": "mx.sender.example"}
STALL_MS = 40.0


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        server.txt("_dmarc.sender.example", "v=DMARC1; p=none")
        server.txt("sender.example", "v=spf1 ip4:198.51.100.0/24 -all")
        yield server


def message(n: int, body_kb: int) -> bytes:
    line = b"0123456789" * 7 + b"\r\n"  # 72 bytes
    body = line * (body_kb * 1024 // len(line)) if body_kb else b"hello\r\n"
    return (f"From: <alice@sender.example>\r\nTo: {RCPT}\r\nSubject: m{n}\r\n"
            f"Message-ID: <m{n}.{body_kb}@sender.example>\r\n\r\n").encode() + body


# dmarc: the event loop; spf: a thread per connection (core/eventloop.py).
@pytest.mark.parametrize("name", ["dmarc", "spf"])
def test_no_message_waits_for_a_delayed_ack(postfix: PostfixInstance, start_filter: StartFilter,
                                             dns: LoopbackDNS, name: str) -> None:
    flt = start_filter(name, f'[global]\nauthserv_id = "mx.test.example"\n{dns.toml()}'
                             f'[{name}]\n' + ('history = ""\n' if name == "dmarc" else ""))
    postfix.set_milters([flt.socket])
    for body_kb in (0, 60):  # one write per step, and a message over many writes
        took = []
        for n in range(8):
            started = time.perf_counter()
            result = postfix.send("alice@sender.example", [RCPT], message(n, body_kb),
                                  xclient=OUTSIDE)
            took.append((time.perf_counter() - started) * 1000)
            assert result.accepted, result
        assert statistics.median(took) < STALL_MS / 2, (name, body_kb, took)
    assert f"filter={name} stage=eom" in flt.process.output()
