"""Hostile input against every filter at once (issue 9): each case goes to each of
the five filters (`milters run NAME`, real sockets, loopback DNS, a real clamd) and
must get a defined answer within 5 s while a normal message sent on another
connection at the same time is answered too; afterwards no worker has died, no
traceback was written, and the workers' memory is back near its level.

The per-area batteries (test_hostile_dkim.py, test_hostile_checks.py,
test_hostile_dmarc.py, test_hostile_protocol.py) go deeper into each filter; this
one checks that no filter chokes on what another one is built to handle.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from milters.client.errors import MilterClientError
from milters.client.probe import ProbeResult, probe
from milters.core.envelope import Envelope
from tests.support.clamd import Clamd
from tests.support.dns import LoopbackDNS, dns_server
from tests.support.processes import ManagedProcess, ProcessFactory, free_port

pytest_plugins = ("tests.support.clamd_plugin",)

ROOT = Path(__file__).resolve().parents[2]
AUTHSERV = "mx.test.example"
FILTERS = ("dkim", "spf", "dmarc", "clamav", "checks")
ANSWER_WITHIN = 5.0  # seconds, the bound; the client waits longer to see a hang
OUTSIDE = Envelope(client_ip="198.51.100.7", client_name="mail.outside.example",
                   helo="mail.outside.example", mail_from="bounce@bank.example",
                   rcpt_to=["user@test.example"])


def _msg(headers: str | bytes, body: bytes = b"hello\r\n") -> bytes:
    head = headers.encode("utf-8", "surrogateescape") if isinstance(headers, str) else headers
    return head + b"\r\n" + body


BASE = "From: Alice <alice@bank.example>\r\nTo: user@test.example\r\nSubject: hi\r\n"
NESTED = "(" * 1000 + "x" + ")" * 1000


def _many_signatures() -> bytes:
    names = ":".join(["From"] + [f"X-H{i}" for i in range(999)])
    sigs = "".join(
        f"DKIM-Signature: v=1; a=rsa-sha256; d=bank.example; s=s{i}; c=relaxed/relaxed; "
        f"h={names}; bh=AAAA; b=AAAA\r\n" for i in range(10))
    fields = "".join(f"X-H{i % 1000}: v\r\n" for i in range(5000))
    return _msg(sigs + fields + BASE)


# name -> (message, envelope changes)
CASES: dict[str, tuple[bytes, dict[str, object]]] = {
    "nested-comments-in-from": (_msg(f"From: {NESTED} <alice@bank.example>\r\n"
                                     "To: user@test.example\r\nSubject: hi\r\n"), {}),
    "nested-comments-in-ar": (_msg(f"Authentication-Results: {NESTED} {AUTHSERV}; "
                                   f"dkim=pass {NESTED} header.d=bank.example\r\n" + BASE), {}),
    "forged-quoted-ar": (_msg(f'Authentication-Results: "{AUTHSERV}" 1; dkim=pass '
                              "header.d=bank.example\r\n" + BASE), {}),
    "dkim-empty-l": (_msg("DKIM-Signature: v=1; a=rsa-sha256; d=bank.example; s=s; l=; "
                          "h=from; bh=AAAA; b=AAAA\r\n" + BASE), {}),
    "dkim-i-without-at": (_msg("DKIM-Signature: v=1; a=rsa-sha256; d=bank.example; s=s; "
                               "i=bank.example; h=from; bh=AAAA; b=AAAA\r\n" + BASE), {}),
    "dkim-garbage-tags": (_msg("DKIM-Signature: ;;==;v=;\x00;d=..;s=-;x=z;t=-1;"
                               "h=;b=!!!\r\n" + BASE), {}),
    "eight-bit-header-name": (_msg(b"X-\xff\xfeName: value\r\n" + BASE.encode()), {}),
    "nul-in-header-value": (_msg(b"X-Nul: a\x00b\r\n" + BASE.encode()), {}),
    "invalid-utf8-envelope": (_msg(BASE), {"mail_from": "b\udcffounce@bank.example",
                                           "helo": "h\udcfe.example"}),
    "many-signatures-long-h": (_many_signatures(), {}),
    "many-ar-fields": (_msg("".join(f"Authentication-Results: (relay {i} (hop; x)) "
                                    f"other{i}.example; dkim=pass header.d=x\r\n"
                                    for i in range(5000)) + BASE), {}),
    "huge-header": (_msg(BASE + "X-Big: " + "a" * 100_000 + "\r\n"), {}),
    "two-froms": (_msg("From: a@bank.example\r\n" + BASE), {}),
    "multi-from-mixed-domains": (_msg("From: support@bank.example, x@attacker.example\r\n"
                                      "To: user@test.example\r\nSubject: hi\r\n"), {}),
    "nested-mime": (_msg(BASE + "MIME-Version: 1.0\r\n"
                         "Content-Type: multipart/mixed; boundary=b0\r\n",
                         b"".join(f"--b{i}\r\nContent-Type: multipart/mixed; "
                                  f"boundary=b{i + 1}\r\n\r\n".encode() for i in range(300))
                         + b"deep\r\n"), {}),
    "broken-mime-params": (_msg(BASE + "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; "
                                + "; ".join(f"b*{i}*=x%zz" for i in range(2000)) + "\r\n",
                                b"--\r\n--\r\n"), {}),
    "long-line-body": (_msg(BASE, b"x" * (8 * 1024 * 1024) + b"\r\n"), {}),
    "bare-cr-lf": (_msg(BASE, b"a\rb\nc\r\n\r\r\n\n.\r\n"), {}),
    "no-header-at-all": (b"\r\njust a body\r\n", {}),
}


@dataclass
class Running:
    name: str
    proc: ManagedProcess
    spec: str


@pytest.fixture(scope="module")
def dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        server.txt("_dmarc.bank.example", "v=DMARC1; p=reject")
        server.txt("bank.example", "v=spf1 ip4:192.0.2.0/24 -all")
        yield server


@pytest.fixture(scope="module")
def filters(dns: LoopbackDNS, clamd: Clamd,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Running]]:
    d = tmp_path_factory.mktemp("hostile")
    table = d / "header_checks"
    table.write_text("/^Subject: never-matches-this$/ REJECT no\n")
    running: dict[str, Running] = {}
    with ProcessFactory() as factory:
        for name in FILTERS:
            port = free_port()
            config = d / f"{name}.toml"
            # Each filter alone (the others disabled): each one is first in its chain
            # and must stand on its own.
            others = "".join(f"[{o}]\nenabled = false\n" for o in FILTERS if o != name)
            extra = {
                "dmarc": "reject_failures = true\n",
                "clamav": f'clamd_sockets = ["{clamd.tcp}"]\nscan_timeout = 5.0\n',
                "checks": f'header_checks = ["regexp:{table}"]\n',
            }.get(name, "")
            config.write_text(
                f'[global]\nauthserv_id = "{AUTHSERV}"\ninternal_networks = []\n'
                f"{dns.toml()}{others}[{name}]\nsocket = \"inet:{port}@127.0.0.1\"\n{extra}")
            argv = [sys.executable, "-m", "milters", "run", name, "--config", str(config)]
            proc = factory.start(argv, port, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
            running[name] = Running(name, proc, f"inet:{port}@127.0.0.1")
        yield running


def _workers(pid: int) -> list[int]:
    """The filter's process and its pre-forked workers."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        found += [int(c) for c in children]
    return found


def _rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def _timed(spec: str, message: bytes, env: Envelope) -> tuple[float, object]:
    started = time.monotonic()
    try:
        outcome: object = probe(spec, message, env, timeout=30)
    except MilterClientError as exc:
        outcome = exc
    return time.monotonic() - started, outcome


def _normal_meanwhile(spec: str, hostile: Callable[[], tuple[float, object]]
                      ) -> tuple[tuple[float, object], tuple[float, object]]:
    """Run the hostile case and, on another connection at the same time, a normal one."""
    normal: list[tuple[float, object]] = []
    t = threading.Thread(target=lambda: normal.append(_timed(spec, _msg(BASE), OUTSIDE)))
    got = [(0.0, None)]

    def run_hostile() -> None:
        got[0] = hostile()

    h = threading.Thread(target=run_hostile)
    h.start()
    time.sleep(0.05)  # the hostile message is on its way first
    t.start()
    h.join()
    t.join()
    return got[0], normal[0]


@pytest.mark.parametrize("name", FILTERS)
def test_every_hostile_case_gets_a_defined_answer(filters: dict[str, Running],
                                                   name: str) -> None:
    f = filters[name]
    # Warm up (imports, caches) before taking the memory level.
    for _ in range(3):
        _timed(f.spec, _msg(BASE), OUTSIDE)
    before_pids = sorted(_workers(f.proc.pid))
    level = _rss_kib(before_pids)
    failures = []
    for case, (message, changes) in CASES.items():
        env = Envelope(**{**OUTSIDE.__dict__, **changes})  # type: ignore[arg-type]
        seen = len(f.proc.output())
        (took, outcome), (normal_took, normal) = _normal_meanwhile(
            f.spec, lambda m=message, e=env: _timed(f.spec, m, e))
        if not isinstance(outcome, ProbeResult) or took > ANSWER_WITHIN:
            failures.append(f"{case}: {outcome!r} after {took:.1f} s")
        # A defined answer is the filter's own, not the backstop's on_error.
        written = f.proc.output()[seen:]
        if "Traceback" in written or "untrapped" in written:
            failures.append(f"{case}: an exception reached the backstop:\n{written[-1500:]}")
        if not isinstance(normal, ProbeResult) or normal_took > ANSWER_WITHIN:
            failures.append(f"{case}: the normal message meanwhile got {normal!r} "
                            f"after {normal_took:.1f} s")
    assert not failures, "\n".join(failures)
    assert f.proc.proc.poll() is None, f.proc.output()
    # No worker died (a restarted worker has a new pid) and nothing was untrapped.
    assert sorted(_workers(f.proc.pid)) == before_pids, f.proc.output()[-3000:]
    output = f.proc.output()
    assert "Traceback" not in output and "untrapped" not in output, output[-3000:]
    # Memory back near its level: what a message costs is freed with it. The
    # allocator keeps some arenas, so allow a margin, not a leak per case.
    assert _rss_kib(before_pids) - level < 64 * 1024 * (len(before_pids)), (level,
                                                                            os.getpid())
