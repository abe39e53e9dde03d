"""Faults under the whole suite: all five filters under one `milters serve` (two
workers each) behind real Postfix, with their own clamd and DNS server that the
tests stop, slow down and bring back.

- A filter killed (its `milters run` parent and workers, SIGKILL) in the middle of
  a load run: Postfix answers 4xx (milter_default_action = tempfail) while it is
  down, `milters serve` restarts it, and every message is delivered exactly once
  after at most a few retries by the sender, as an MTA would retry.
- clamd stopped or hung: 451 4.3.0 within the configured timeouts; clean delivery
  once it is back.
- DNS stopped or slower than `[global.dns] timeout`: spf=temperror and
  dmarc=temperror, delivered (on_temperror = "accept", the default) within a few
  timeouts; pass again once DNS answers.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from dnslib.server import DNSLogger, DNSServer

from milters.clamav.clamd import parse_backend
from tests.e2e.postfix import PostfixInstance, SendResult
from tests.e2e.suite import (
    ALIGNED,
    ALIGNED_HELO,
    ALIGNED_IP,
    OUTSIDE_IP,
    RCPT,
    Keys,
    Suite,
    ar_text,
    children,
    filter_parent,
    kill_tree,
    message,
    publish,
    start_suite,
    temporary,
)
from tests.support.clamd import Clamd, clamd_binary, ping, running_clamd
from tests.support.dns import LoopbackDNS, ZoneResolver
from tests.support.processes import (
    ManagedProcess,
    ProcessFactory,
    free_port,
    port_accepts,
    wait_until,
)

ALIGNED_CLIENT = {"ADDR": ALIGNED_IP, "NAME": ALIGNED_HELO, "HELO": ALIGNED_HELO}
OUTSIDE = {"ADDR": OUTSIDE_IP, "NAME": "mx.outside.example", "HELO": "mx.outside.example"}

DNS_TIMEOUT = 1.0      # [global.dns] timeout
CLAMD_TIMEOUT = 1.0    # [clamav] connect_timeout (scan_timeout is twice that)
LOAD_MESSAGES = 200
LOAD_SESSIONS = 4
MAX_ATTEMPTS = 8


class StoppableDNS:
    """The loopback DNS server (tests/support/dns.py zones) that can be stopped and
    started again on the same port."""

    def __init__(self) -> None:
        self.resolver = ZoneResolver()
        self.port = free_port()
        self.zones = LoopbackDNS(self.resolver, self.port)
        self.servers: list[DNSServer] = []

    def start(self) -> None:
        quiet = DNSLogger(logf=lambda _: None)
        self.servers = [DNSServer(self.resolver, port=self.port, address="127.0.0.1",
                                  tcp=tcp, logger=quiet) for tcp in (False, True)]
        for s in self.servers:
            s.start_thread()

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
        # Let answers still being made (a slow one sleeps in its thread) go out before
        # the sockets close, or their threads print tracebacks.
        wait_until(lambda: not any("process_request_thread" in t.name
                                   for t in threading.enumerate()), 20)
        for s in self.servers:
            s.server.server_close()
        self.servers = []


class RestartableClamd:
    """The test clamd, which can be killed and started again with its config."""

    def __init__(self, clamd: Clamd, factory: ProcessFactory) -> None:
        self.clamd = clamd
        self.factory = factory
        self.current: ManagedProcess = clamd.process

    def stop(self) -> None:
        self.current.kill()

    def start(self) -> None:
        argv = [str(clamd_binary()), "-c", str(self.clamd.directory / "clamd.conf")]
        self.current = self.factory.start(argv, None)
        backend = parse_backend(self.clamd.tcp)
        assert wait_until(lambda: ping(backend, timeout=1.0), 20), self.current.output()


@pytest.fixture(scope="module")
def dns(keys: Keys) -> Iterator[StoppableDNS]:
    server = StoppableDNS()
    publish(server.zones, keys)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def own_clamd(factory: ProcessFactory) -> Iterator[RestartableClamd]:
    with running_clamd() as clamd:
        yield RestartableClamd(clamd, factory)


@pytest.fixture(scope="module")
def served(factory: ProcessFactory, workdir: Path, keys: Keys, dns: StoppableDNS,
           own_clamd: RestartableClamd) -> Suite:
    return start_suite(factory, workdir, keys, dns.zones, own_clamd.clamd.tcp, serve=True,
                       workers=2, dns_timeout=DNS_TIMEOUT, clamd_timeout=CLAMD_TIMEOUT)


@pytest.fixture
def suite(postfix: PostfixInstance, served: Suite) -> Suite:
    served.attach(postfix)
    return served


def delivered_ids(postfix: PostfixInstance) -> collections.Counter[str]:
    ids: collections.Counter[str] = collections.Counter()
    for m in postfix.delivered():
        mid = m.get("Message-ID")
        assert mid is not None, m.raw[:500]
        ids[mid.strip("<>")] += 1
    return ids


@pytest.mark.parametrize(("victim", "what"), [("dmarc", "filter"), ("dkim", "worker")])
def test_killed_filter_mid_load_loses_and_doubles_nothing(postfix: PostfixInstance,
                                                          suite: Suite, victim: str,
                                                          what: str) -> None:
    """`filter`: SIGKILL the `milters run` parent and its workers (`milters serve`
    restarts it); `worker`: SIGKILL one pre-forked worker (its `milters run` parent
    starts another)."""
    serve_pid = suite.processes["serve"].pid
    old_parent = filter_parent(serve_pid, victim)
    assert old_parent is not None, suite.output()
    assert wait_until(lambda: len(children(old_parent)) == 2, 20), suite.output()
    accepted: dict[str, int] = {}   # Message-ID -> attempts it took
    refusals: list[str] = []        # every 4xx seen, for the report
    failures: list[str] = []        # anything else: a 5xx, or retries exhausted
    lock = threading.Lock()

    def send(i: int) -> None:
        mid = f"load-{i}@{ALIGNED}"
        raw = message(ALIGNED, f"load {i}", msgid=mid)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            result: SendResult = postfix.send(f"alice@{ALIGNED}", [RCPT], raw,
                                              xclient=ALIGNED_CLIENT, timeout=30)
            if result.accepted:
                with lock:
                    accepted[mid] = attempt
                return
            if not temporary(result):
                with lock:
                    failures.append(f"{mid}: {result}")
                return
            with lock:
                refusals.append(f"{mid} attempt {attempt}: {result}")
            time.sleep(min(2.0, 0.1 * 2 ** attempt))
        with lock:
            failures.append(f"{mid}: still refused after {MAX_ATTEMPTS} attempts")

    killed: list[int] = []
    with ThreadPoolExecutor(LOAD_SESSIONS) as pool:
        futures = [pool.submit(send, i) for i in range(LOAD_MESSAGES)]
        assert wait_until(lambda: len(accepted) >= LOAD_MESSAGES // 4, 60), failures
        killed = kill_tree(old_parent if what == "filter" else children(old_parent)[0])
        for f in futures:
            f.result()
    assert failures == [], failures[:5]
    assert len(accepted) == LOAD_MESSAGES
    # The supervisor started a new one, which listens.
    parent = filter_parent(serve_pid, victim)
    assert parent is not None and parent not in killed
    assert wait_until(lambda: len(children(parent)) == 2, 20), suite.output()
    assert not set(children(parent)) & set(killed)
    assert port_accepts(suite.ports[victim])
    if what == "filter":
        assert parent != old_parent
        assert len(killed) >= 3, killed  # the parent and its two workers
        # Postfix refused messages with 4xx while the filter was down (a killed
        # worker's sessions can be between messages, so only here is it certain).
        assert refusals, "no message was refused while the filter was down"
    else:
        assert parent == old_parent and len(killed) == 1
    assert all(re.search(r"\b4\d\d\b", r) for r in refusals), refusals[:5]
    # ... and every message was delivered exactly once.
    postfix.wait_delivered(LOAD_MESSAGES, timeout=60)
    postfix.wait_queue_empty(timeout=30)
    ids = delivered_ids(postfix)
    assert set(ids) == set(accepted), set(accepted) ^ set(ids)
    assert [m for m, n in ids.items() if n != 1] == []
    assert len(postfix.delivered()) == LOAD_MESSAGES
    log = suite.output()
    died = rf"\(pid {killed[0]}\) died: .*restarting"
    assert re.search(died, log), log


def test_clamd_stopped_tempfails_then_recovers(postfix: PostfixInstance, suite: Suite,
                                               own_clamd: RestartableClamd) -> None:
    def send(subject: str) -> tuple[SendResult, float]:
        start = time.monotonic()
        result = postfix.send("sender@sender.example", [RCPT],
                              message("sender.example", subject), xclient=OUTSIDE)
        return result, time.monotonic() - start

    own_clamd.stop()
    try:
        result, took = send("clamd down")
        assert result.data is not None and result.data.code == 451, result
        assert result.data.text.startswith("4.3.0 "), result
        assert took < CLAMD_TIMEOUT + 5, took
    finally:
        own_clamd.start()
    # Hung (SIGSTOP: connections are accepted, nothing answers): scan_timeout.
    os.kill(own_clamd.current.pid, signal.SIGSTOP)
    try:
        result, took = send("clamd hung")
        assert result.data is not None and result.data.code == 451, result
        assert took < 2 * CLAMD_TIMEOUT + 5, took
    finally:
        os.kill(own_clamd.current.pid, signal.SIGCONT)
    result, _ = send("clamd back")
    assert result.accepted, result
    [msg] = postfix.wait_delivered(1)
    assert msg.get_all("X-Virus-Status") == ["Clean"]


def send_unknown_domain(postfix: PostfixInstance, domain: str) -> tuple[SendResult, float]:
    start = time.monotonic()
    result = postfix.send(f"bounce@{domain}", [RCPT], message(domain, domain), xclient=OUTSIDE)
    return result, time.monotonic() - start


def results_of(postfix: PostfixInstance, subject: str) -> str:
    [msg] = [m for m in postfix.delivered() if m.get("Subject") == subject]
    return ar_text(msg.get_all("Authentication-Results"))


@pytest.mark.parametrize("fault", ["stopped", "slow"])
def test_dns_fault_gives_temperror_then_recovers(postfix: PostfixInstance, suite: Suite,
                                                 dns: StoppableDNS, fault: str) -> None:
    # Fresh names each time: nothing is in any resolver cache.
    down, back = f"{fault}-down.example", f"{fault}-back.example"
    for name in (down, back):
        dns.zones.txt(name, "v=spf1 ip4:198.51.100.0/24 -all")
        dns.zones.txt(f"_dmarc.{name}", "v=DMARC1; p=reject")
    with contextlib.ExitStack() as undo:
        if fault == "stopped":
            dns.stop()
            undo.callback(dns.start)
        else:
            dns.zones.set_delay(DNS_TIMEOUT * 3)
            undo.callback(dns.zones.set_delay, 0.0)
        result, took = send_unknown_domain(postfix, down)
    assert result.accepted, result
    # A few lookups at most, each bounded by the timeout (generous for a slow machine).
    assert took < 6 * DNS_TIMEOUT + 5, took
    postfix.wait_delivered(1)
    text = results_of(postfix, down)
    assert "spf=temperror" in text and "dmarc=temperror" in text, text
    result, _ = send_unknown_domain(postfix, back)
    assert result.accepted, result
    postfix.wait_delivered(2)
    text = results_of(postfix, back)
    assert "spf=pass" in text and "dmarc=pass" in text, text
