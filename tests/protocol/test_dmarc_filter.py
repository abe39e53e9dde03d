"""The dmarc filter as an administrator runs it: `milters run dmarc` on a loopback
port, DNS from the loopback server, driven over the milter protocol; the
Authentication-Results field, a p=reject refusal, forged fields removed and never
believed, and the history file written."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from milters.client.probe import ProbeResult, probe
from milters.core.envelope import Envelope
from milters.core.verdict import EditKind
from milters.dmarc.history import SqliteHistory
from tests.support.dns import LoopbackDNS, dns_server
from tests.support.processes import ManagedProcess, ProcessFactory, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
AUTHSERV = "mx.test.example"

Start = Callable[..., tuple[ManagedProcess, str, Path]]


@pytest.fixture(scope="module")
def dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        server.txt("_dmarc.example.com", "v=DMARC1; p=reject; rua=mailto:rua@example.com")
        server.txt("example.com", "v=spf1 ip4:192.0.2.0/24 -all")
        yield server


@pytest.fixture(scope="module")
def start(dns: LoopbackDNS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Start]:
    factory = ProcessFactory()

    def start(extra: str = "", upstream: bool = False) -> tuple[ManagedProcess, str, Path]:
        d = tmp_path_factory.mktemp("dmarc")
        port = free_port()
        others = "" if upstream else "[dkim]\nenabled = false\n[spf]\nenabled = false\n"
        (d / "milters.toml").write_text(
            f'[global]\nauthserv_id = "{AUTHSERV}"\ninternal_networks = []\n'
            f"{dns.toml()}{others}"
            f'[dmarc]\nsocket = "inet:{port}@127.0.0.1"\nhistory = "{d}/history.sqlite"\n'
            f"{extra}\n"
        )
        argv = [sys.executable, "-m", "milters", "run", "dmarc", "--config",
                str(d / "milters.toml")]
        proc = factory.start(argv, port, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
        return proc, f"inet:{port}@127.0.0.1", d / "history.sqlite"

    yield start
    factory.close()


def send(spec: str, extra_headers: str = "", client_ip: str = "198.51.100.7",
         mail_from: str = "bounce@example.com") -> ProbeResult:
    msg = (extra_headers + "From: Alice <alice@example.com>\r\nTo: u@test.example\r\n"
           "Subject: hi\r\n\r\nhello\r\n").encode()
    env = Envelope(client_ip=client_ip, client_name="mail.example.net",
                   helo="mail.example.net", mail_from=mail_from,
                   rcpt_to=["u@test.example"])
    return probe(spec, msg, env, timeout=15)


def ar_values(r: ProbeResult) -> list[str]:
    return [" ".join(e.value.split()) for e in r.header_edits
            if e.kind is EditKind.INSERT and e.name == "Authentication-Results"]


def test_p_reject_refused_and_aligned_spf_passes(start: Start) -> None:
    _, spec, history = start("reject_failures = true")
    r = send(spec)
    assert r.verdict == "reject"
    assert r.smtp_reply.startswith("550 5.7.1") and "example.com" in r.smtp_reply
    r = send(spec, client_ip="192.0.2.10")  # SPF pass, aligned (self-validated)
    assert r.verdict in ("accept", "continue")
    assert ar_values(r) == [f"{AUTHSERV}; dmarc=pass (p=reject dis=none) "
                            "header.from=example.com"]
    # The filter writes its history in batches, at most half a second later.
    assert wait_until(lambda: len(SqliteHistory(str(history)).entries(0, 2**40)) == 2, 5)
    entries = SqliteHistory(str(history)).entries(0, 2**40)
    assert [(e.result, e.disposition, e.spf_result) for e in entries] == [
        ("fail", "reject", "fail"), ("pass", "none", "pass")]


def test_forged_fields_removed_and_not_believed(start: Start) -> None:
    _, spec, _ = start("reject_failures = true")  # dmarc alone: first in the chain
    forged = (f"Authentication-Results: {AUTHSERV}; dkim=pass header.d=example.com; "
              "spf=pass smtp.mailfrom=bounce@example.com\r\n")
    r = send(spec, forged)
    assert r.verdict == "reject"
    _, spec, _ = start()
    r = send(spec, forged)
    deleted = [e for e in r.header_edits if e.kind is EditKind.DELETE]
    assert [(e.name, e.index) for e in deleted] == [("Authentication-Results", 1)]
    assert ar_values(r) == [f"{AUTHSERV}; dmarc=fail (p=reject dis=none) "
                            "header.from=example.com"]


def test_upstream_results_used_when_ours_run_first(start: Start) -> None:
    _, spec, _ = start("reject_failures = true", upstream=True)
    genuine = (f"Authentication-Results: {AUTHSERV}; dkim=pass header.d=example.com "
               "header.s=sel\r\n")
    r = send(spec, genuine)
    assert r.verdict in ("accept", "continue")
    assert "dmarc=pass" in ar_values(r)[0]


def test_history_rows_survive_a_graceful_stop(start: Start) -> None:
    """Rows are written in batches; a SIGTERM (drain, then exit) must write the
    last batch before the worker exits."""
    import os
    import signal

    proc, spec, history = start()
    send(spec, client_ip="192.0.2.10")
    os.kill(proc.pid, signal.SIGTERM)
    assert wait_until(lambda: proc.proc.poll() is not None, 60), proc.output()
    rows = SqliteHistory(str(history)).entries(0, 2**62)
    assert len(rows) == 1 and rows[0].source_ip == "192.0.2.10"
