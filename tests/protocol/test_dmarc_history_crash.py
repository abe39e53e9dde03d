"""The DMARC history survives SIGKILL: `milters run dmarc` (two worker processes) is
killed, supervisor and workers at once, in the middle of a run of more than 1,000
messages sent over the milter protocol by four client threads. After a restart
(and a graceful stop), every message that got an end-of-message answer has its
history row exactly once: the rows the half-second batch had not yet committed come
back from the crash journal (history.py), none twice."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from milters.client.errors import MilterClientError
from milters.client.probe import probe
from milters.core.envelope import Envelope
from milters.dmarc.history import Journal, SqliteHistory
from tests.support.dns import LoopbackDNS, dns_server
from tests.support.processes import ManagedProcess, ProcessFactory, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
AUTHSERV = "mx.test.example"
BEFORE_KILL = 700  # answered messages before the kill
AFTER_RESTART = 400


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        server.txt("_dmarc.example.com", "v=DMARC1; p=none; rua=mailto:rua@example.com")
        yield server


def start(factory: ProcessFactory, config: Path, port: int) -> ManagedProcess:
    argv = [sys.executable, "-m", "milters", "run", "dmarc", "--config", str(config)]
    return factory.start(argv, port, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)


def message(n: int) -> tuple[bytes, Envelope]:
    # The envelope domain names the message: it is a column of its history row.
    msg = ("From: Alice <alice@example.com>\r\nTo: u@test.example\r\n"
           f"Subject: {n}\r\n\r\nhello\r\n").encode()
    env = Envelope(client_ip="192.0.2.10", client_name="mail.example.net",
                   helo="mail.example.net", mail_from=f"b@m{n}.example.org",
                   rcpt_to=["u@test.example"])
    return msg, env


class Load:
    """Client threads sending numbered messages until told to stop or refused."""

    def __init__(self, spec: str, first: int) -> None:
        self.spec = spec
        self.next = first
        self.answered: list[int] = []
        self.failed: list[int] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def run(self, threads: int, limit: int | None = None) -> list[threading.Thread]:
        def work() -> None:
            while not self.stop.is_set():
                with self.lock:
                    n = self.next
                    self.next += 1
                    if limit is not None and n >= limit:
                        return
                msg, env = message(n)
                try:
                    r = probe(self.spec, msg, env, timeout=15)
                except MilterClientError:
                    with self.lock:
                        self.failed.append(n)
                    return  # the filter is gone
                with self.lock:
                    (self.answered if r.verdict in ("accept", "continue")
                     else self.failed).append(n)

        started = [threading.Thread(target=work) for _ in range(threads)]
        for t in started:
            t.start()
        return started


def test_sigkill_under_load_loses_no_answered_row(dns: LoopbackDNS, tmp_path: Path) -> None:
    history = tmp_path / "history.sqlite"
    port = free_port()
    config = tmp_path / "milters.toml"
    config.write_text(
        f'[global]\nauthserv_id = "{AUTHSERV}"\ninternal_networks = []\n{dns.toml()}'
        "[dkim]\nenabled = false\n[spf]\nenabled = false\n"
        f'[dmarc]\nsocket = "inet:{port}@127.0.0.1"\nworkers = 2\n'
        f'history = "{history}"\n')
    spec = f"inet:{port}@127.0.0.1"
    with ProcessFactory() as factory:
        proc = start(factory, config, port)
        load = Load(spec, 0)
        threads = load.run(4)
        assert wait_until(lambda: len(load.answered) >= BEFORE_KILL, 240), proc.output()
        proc.kill()  # SIGKILL to the supervisor and its workers at once
        assert proc.proc.wait(30) == -signal.SIGKILL
        load.stop.set()
        for t in threads:
            t.join(30)
        answered_before = set(load.answered)
        sent_before = load.next

        # What the store has now (a reader without the journal: no replay) and what
        # the dead workers' journal segments hold.
        in_db = len(SqliteHistory(str(history), journal="").entries(0, 2**62))
        journal = Journal(str(history) + ".journal")
        orphans = journal.orphans()
        in_journal = sum(len(rows) for _, _, rows in orphans)
        for fd, _, _ in orphans:
            os.close(fd)  # unlocked again, for the restarted filter
        print(f"answered before the kill: {len(answered_before)}, rows committed: "
              f"{in_db}, rows only in the journal: {in_journal}")
        assert in_db + in_journal >= len(answered_before)

        # Restart: the new workers replay the journal on their first flush.
        proc = start(factory, config, port)
        load = Load(spec, sent_before)
        for t in load.run(4, limit=sent_before + AFTER_RESTART):
            t.join(240)
        assert not load.failed, proc.output()
        proc.proc.send_signal(signal.SIGTERM)  # graceful: the last batch is written
        assert wait_until(lambda: proc.proc.poll() is not None, 60), proc.output()

    rows = SqliteHistory(str(history), journal="").entries(0, 2**62)
    seen = Counter(int(e.envelope_from.split(".")[0][1:]) for e in rows)
    answered = answered_before | set(load.answered)
    assert len(answered) >= 1000
    missing = sorted(answered - set(seen))
    assert not missing, f"{len(missing)} answered messages without a row: {missing[:20]}"
    twice = {n: c for n, c in seen.items() if c > 1}
    assert not twice, f"rows written twice: {twice}"
    assert not list((history.parent / "history.sqlite.journal").glob("*.jnl"))
