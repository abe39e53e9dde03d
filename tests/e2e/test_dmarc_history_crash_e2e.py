"""The DMARC history behind real Postfix survives SIGKILL: four SMTP clients send
through Postfix to the dmarc filter (two workers); after 700 messages were accepted
the filter is killed (supervisor and workers at once), Postfix tempfails while it
is gone (milter_default_action = tempfail), a new filter takes over and 400 more
messages go through. Every message Postfix accepted was answered by the filter at
end-of-message, so each must have its history row exactly once."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from milters.dmarc.history import Journal, SqliteHistory
from tests.e2e.filters import StartFilter
from tests.e2e.postfix import PostfixInstance
from tests.support.dns import LoopbackDNS, dns_server
from tests.support.processes import wait_until

RCPT = "user@test.example"
INBOUND = {"ADDR": "198.51.100.7", "NAME": "mx.sender.example", "HELO": "mx.sender.example"}
BEFORE_KILL = 700
AFTER_RESTART = 400


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        server.txt("_dmarc.sender.example", "v=DMARC1; p=none; rua=mailto:d@sender.example")
        yield server


def message(n: int) -> tuple[str, bytes]:
    # The envelope domain names the message: it is a column of its history row.
    return f"b@m{n}.sender.example", (
        f"From: Alice <alice@sender.example>\r\nTo: {RCPT}\r\nSubject: {n}\r\n"
        f"Message-ID: <{n}@sender.example>\r\n\r\nhello\r\n").encode()


class Load:
    """SMTP clients sending numbered messages through Postfix."""

    def __init__(self, postfix: PostfixInstance, first: int, limit: int | None = None) -> None:
        self.postfix = postfix
        self.next, self.limit = first, limit
        self.accepted: list[int] = []
        self.refused: Counter[int] = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def work(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                n = self.next
                self.next += 1
            if self.limit is not None and n >= self.limit:
                return
            sender, msg = message(n)
            result = self.postfix.send(sender, [RCPT], msg, xclient=INBOUND)
            with self.lock:
                if result.accepted:
                    self.accepted.append(n)
                else:  # the reply that refused it: at MAIL, RCPT or end of DATA
                    replies = [result.mail, *result.rcpts.values(), result.data]
                    self.refused[[r.code for r in replies if r is not None][-1]] += 1

    def start(self, threads: int = 4) -> list[threading.Thread]:
        out = [threading.Thread(target=self.work) for _ in range(threads)]
        for t in out:
            t.start()
        return out


def test_sigkill_behind_postfix_loses_no_accepted_row(
        postfix: PostfixInstance, start_filter: StartFilter, dns: LoopbackDNS,
        tmp_path: Path) -> None:
    history = tmp_path / "history.sqlite"
    config = (f'[global]\nauthserv_id = "mx.test.example"\ninternal_networks = []\n'
              f"{dns.toml()}\n[dmarc]\nworkers = 2\nhistory = \"{history}\"\n")
    dmarc = start_filter("dmarc", config)
    postfix.set_milters([dmarc.socket])
    load = Load(postfix, 0)
    threads = load.start()
    assert wait_until(lambda: len(load.accepted) >= BEFORE_KILL, 300), dmarc.output()
    dmarc.process.kill()  # SIGKILL to the supervisor and its workers
    assert dmarc.process.proc.wait(30) == -signal.SIGKILL
    # Postfix tempfails (4xx) without its milter: those messages were never answered.
    assert wait_until(lambda: sum(load.refused.values()) >= 4, 60)
    load.stop.set()
    for t in threads:
        t.join(120)
    before = set(load.accepted)
    # Rows only the journal has now (the kill caught an uncommitted batch): what the
    # history lost before the journal existed. Counted without replaying them.
    in_db = len(SqliteHistory(str(history), journal="").entries(0, 2**62))
    orphans = Journal(f"{history}.journal").orphans()
    in_journal = sum(len(rows) for _, _, rows in orphans)
    for fd, _, _ in orphans:
        os.close(fd)
    print(f"accepted before the kill: {len(before)}, rows committed: {in_db}, "
          f"only in the journal: {in_journal}")
    assert in_db + in_journal >= len(before)
    assert all(400 <= code < 500 for code in load.refused), load.refused

    dmarc = start_filter("dmarc", config)  # the same history: the journal is replayed
    postfix.set_milters([dmarc.socket])
    after = Load(postfix, load.next, load.next + AFTER_RESTART)
    for t in after.start():
        t.join(300)
    assert not after.refused and len(after.accepted) == AFTER_RESTART
    dmarc.process.proc.send_signal(signal.SIGTERM)  # graceful: the last batch is written
    assert wait_until(lambda: dmarc.process.proc.poll() is not None, 60), dmarc.output()

    rows = SqliteHistory(str(history), journal="").entries(0, 2**62)
    seen = Counter(int(e.envelope_from.split(".")[0][1:]) for e in rows)
    accepted = before | set(after.accepted)
    assert len(accepted) >= 1000
    missing = sorted(accepted - set(seen))
    assert not missing, f"{len(missing)} accepted messages without a row: {missing[:20]}"
    assert not {n: c for n, c in seen.items() if c > 1}
    assert not list(Path(f"{history}.journal").glob("*.jnl"))
