"""All five filters behind one private Postfix: the shared set-up of the suite-wide
end-to-end tests (tests/e2e/test_suite_e2e.py, test_suite_faults.py) and of
bench/suite_bench.py.

One TOML config serves every filter: [global] authserv_id and [global.dns] pointing
at the loopback DNS, dkim keys (RSA and Ed25519) for the local domain OURS, clamav
pointing at a test clamd, checks with a header_checks REJECT rule. The filters run
either as five `milters run NAME` processes or as one `milters serve`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dkim
import pytest

from milters.dkim.keytools import genkey
from tests.e2e.postfix import DISCONNECTED, PostfixInstance, SendResult
from tests.support.dns import LoopbackDNS, dns_server
from tests.support.processes import (
    READY_TIMEOUT,
    ManagedProcess,
    ProcessFactory,
    free_port,
    port_accepts,
    wait_until,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
AUTHSERV_ID = "mx.test.example"
RCPT = "user@test.example"
# Chain order: DMARC sees the DKIM and SPF results (README "Authentication-Results").
# The steps in chain order: dkim verifies first, dkim-sign signs after every edit.
CHAIN = ("dkim", "spf", "dmarc", "clamav", "checks", "dkim-sign")

OURS = "ours.example"              # our own domain: signed on submission
ALIGNED = "aligned.example"        # SPF pass from ALIGNED_IP, DKIM key, p=reject
REJECTING = "reject.example"       # p=reject, nothing aligned ever passes
QUARANTINING = "quarantine.example"  # p=quarantine, nothing aligned ever passes
FORGED = "forged.example"          # SPF -all that never includes the test clients
ALIGNED_IP = "192.0.2.5"
ALIGNED_HELO = "mail.aligned.example"
OUTSIDE_IP = "198.51.100.7"
HEADER_REJECT = "5.7.1 no prizes here"
# A checks REPLACE of a field our signature covers: signing must come after it.
TAG_SUBJECT = "please tag"
TAGGED = "[tagged] "
# A sender the checks filter's sender_checks refuse (report mode: one report field).
REFUSED_SENDER = "refused@sender.example"
DEPLOYMENTS = ("sockets", "chain")  # one socket per step, or one `milters run chain`


@dataclass
class Keys:
    """Key files and TXT records made for one module."""

    directory: Path
    records: dict[str, str] = field(default_factory=dict)

    def make(self, domain: str, selector: str, algorithm: str) -> Path:
        d = self.directory / domain
        d.mkdir(parents=True, exist_ok=True)
        made = genkey(domain, selector, algorithm, 2048, str(d))
        self.records[f"{selector}._domainkey.{domain}"] = made.key.dns_record()
        return d / f"{selector}.private"


def make_keys(directory: Path) -> Keys:
    keys = Keys(directory)
    keys.make(OURS, "rsa", "rsa")
    keys.make(OURS, "ed", "ed25519")
    keys.make(ALIGNED, "sel", "rsa")
    return keys


def publish(dns: LoopbackDNS, keys: Keys) -> None:
    """The zones every scenario relies on."""
    for name, value in keys.records.items():
        dns.txt(name, value)
    dns.txt(ALIGNED, f"v=spf1 ip4:{ALIGNED_IP} -all")
    dns.txt(ALIGNED_HELO, "v=spf1 a -all")
    dns.a(ALIGNED_HELO, ALIGNED_IP)
    dns.txt(f"_dmarc.{ALIGNED}", "v=DMARC1; p=reject")
    dns.txt(f"_dmarc.{REJECTING}", "v=DMARC1; p=reject")
    dns.txt(f"_dmarc.{QUARANTINING}", "v=DMARC1; p=quarantine")
    dns.txt(FORGED, "v=spf1 ip4:203.0.113.0/24 -all")


def config_text(directory: Path, keydir: Path, dns: LoopbackDNS, clamd_socket: str,
                ports: dict[str, int],
                mode: str = "enforce", dns_timeout: float = 1.0, workers: int = 1,
                clamd_timeout: float = 2.0, chain: bool = False, core: str = "libmilter") -> str:
    """The one TOML file for all five filters (and the chain's socket, used when
    `chain`: then one `milters run chain` serves them all in one dialogue)."""
    rules = directory / "header_checks"
    rules.write_text("/^Subject:.*win a prize/ REJECT 5.7.1 no prizes here\n"
                     f"/^Subject: (.*) {TAG_SUBJECT}$/ REPLACE Subject: {TAGGED}${{1}}\n")
    senders = directory / "sender_checks"
    senders.write_text(f"/^{re.escape(REFUSED_SENDER)}$/ REJECT 5.7.1 not you\n")
    sockets = {name: f'socket = "inet:{port}@127.0.0.1"\nworkers = {workers}\n'
               for name, port in ports.items()}
    return (
        f'[global]\nauthserv_id = "{AUTHSERV_ID}"\nmode = "{mode}"\nmilter_core = "{core}"\n'
        f"{dns.toml(timeout=dns_timeout)}\n"
        f'[dkim]\n{sockets["dkim"]}domain = ["{OURS}"]\nselector = "rsa"\n'
        f'sign_socket = "inet:{ports["dkim-sign"]}@127.0.0.1"\n'
        f'key_file = "{keydir}/rsa.private"\n'
        f'ed25519_selector = "ed"\ned25519_key_file = "{keydir}/ed.private"\n\n'
        f'[spf]\n{sockets["spf"]}\n'
        f'[dmarc]\n{sockets["dmarc"]}reject_failures = true\n'
        f'history = "{directory}/history-{mode}.sqlite"\n\n'
        f'[clamav]\n{sockets["clamav"]}clamd_sockets = ["{clamd_socket}"]\n'
        f"connect_timeout = {clamd_timeout}\nscan_timeout = {clamd_timeout * 2}\n"
        f"retry_after = 0.0\n\n"
        f'[checks]\n{sockets["checks"]}header_checks = ["regexp:{rules}"]\n'
        f'sender_checks = ["regexp:{senders}"]\n\n'
        f'[chain]\n{sockets["chain"]}enabled = {str(chain).lower()}\n'
    )


@dataclass
class Suite:
    """Five filters (as `milters run` processes or one `milters serve`) on their ports."""

    ports: dict[str, int]
    config_path: Path
    processes: dict[str, ManagedProcess]
    chain: bool = False  # one `milters run chain` socket instead of one per step

    @property
    def sockets(self) -> list[str]:
        names = ["chain"] if self.chain else CHAIN
        return [f"inet:127.0.0.1:{self.ports[name]}" for name in names]

    def attach(self, postfix: PostfixInstance) -> None:
        postfix.set_milters(self.sockets, self.sockets)

    def output(self) -> str:
        return "\n".join(p.output() for p in self.processes.values())


# --- module fixtures of the suite tests (tests/e2e/conftest.py imports them) ---


@pytest.fixture(scope="module")
def workdir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory for the module's keys and config, named after the module."""
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def keys(workdir: Path) -> Keys:
    return make_keys(workdir)


@pytest.fixture(scope="module", name="dns")
def suite_dns(keys: Keys) -> Iterator[LoopbackDNS]:
    """The loopback DNS server with the suite's zones (`publish`); a module that
    needs other zones defines its own `dns` fixture, which takes precedence."""
    with dns_server() as server:
        publish(server, keys)
        yield server


@pytest.fixture(scope="module")
def factory() -> Iterator[ProcessFactory]:
    with ProcessFactory() as f:
        yield f


def chain_ports() -> dict[str, int]:
    """A distinct free loopback port for each step of the chain, and the chain's."""
    ports: dict[str, int] = {}
    for name in (*CHAIN, "chain"):
        port = free_port()
        while port in ports.values():
            port = free_port()
        ports[name] = port
    return ports


def start_suite(factory: ProcessFactory, directory: Path, keys: Keys, dns: LoopbackDNS,
                clamd_socket: str, mode: str = "enforce", serve: bool = False,
                chain: bool = False, core: str = "libmilter", **options: float) -> Suite:
    """Start the chain with one config, as one process per step (`milters run`),
    one `milters serve`, or (`chain`) the one-dialogue chain socket; return once
    every port accepts."""
    directory.mkdir(parents=True, exist_ok=True)
    ports = chain_ports()
    how = "serve" if serve else "run"
    config_path = directory / f"milters-{mode}-{how}{'-chain' if chain else ''}-{core}.toml"
    text = config_text(directory, keys.directory / OURS, dns, clamd_socket, ports, mode=mode,
                       chain=chain, core=core, **options)
    config_path.write_text(text)
    base = [sys.executable, "-m", "milters"]
    units = ("chain",) if chain else CHAIN
    if serve:
        proc = factory.start([*base, "serve", "--config", str(config_path)], None,
                             cwd=REPO_ROOT)
        for name in units:
            wait_ready(proc, ports[name])
        return Suite(ports, config_path, {"serve": proc}, chain)
    procs = {name: factory.start([*base, "run", name, "--config", str(config_path)],
                                 ports[name], cwd=REPO_ROOT) for name in units}
    return Suite(ports, config_path, procs, chain)


def wait_ready(proc: ManagedProcess, port: int, timeout: float = READY_TIMEOUT) -> None:
    if not wait_until(lambda: proc.proc.poll() is not None or port_accepts(port), timeout):
        raise AssertionError(f"port {port} not listening after {timeout:g} s:\n{proc.output()}")
    if proc.proc.poll() is not None:
        raise AssertionError(f"{proc.argv} exited {proc.proc.returncode}:\n{proc.output()}")


# --- processes ------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def filter_parent(serve_pid: int, name: str) -> int | None:
    """The pid of the `milters run NAME` child of a `milters serve`."""
    for pid in children(serve_pid):
        argv = cmdline(pid)
        if "run" in argv and name in argv:
            return pid
    return None


def kill_tree(pid: int) -> list[int]:
    """SIGKILL `pid` and its descendants (the filter's parent and its workers)."""
    pids = tree(pid)
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return pids


# --- messages -----------------------------------------------------------------------


def message(from_domain: str, subject: str, extra: str = "", body: str = "hello\r\n",
            msgid: str | None = None) -> bytes:
    mid = msgid or f"{re.sub(r'[^A-Za-z0-9]+', '.', subject)}@{from_domain}"
    return (f"{extra}From: Alice <alice@{from_domain}>\r\nTo: {RCPT}\r\n"
            f"Subject: {subject}\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{mid}>\r\n\r\n{body}").encode()


def dkim_sign(raw: bytes, domain: str, selector: str, key_file: Path) -> bytes:
    """`raw` with a DKIM-Signature by dkimpy, as another domain's MTA would add it."""
    sig = dkim.sign(raw, selector.encode(), domain.encode(), key_file.read_bytes(),
                    include_headers=[b"From", b"To", b"Subject", b"Date", b"Message-ID"])
    return sig + raw


def temporary(result: SendResult) -> bool:
    """Whether the server refused with a 4xx at some step (or hung up), so the message
    was not taken and an MTA would try again."""
    replies = [result.xclient, result.mail, *result.rcpts.values(), result.data]
    return any(r is not None and (400 <= r.code < 500 or r.code == DISCONNECTED)
               for r in replies)


def ar_text(values: list[str]) -> str:
    """Authentication-Results values joined, whitespace collapsed."""
    return " ".join(" ".join(values).split())
