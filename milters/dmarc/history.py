"""The DMARC history: one row per evaluation, read back by `milters dmarc report/stats`.

`HistoryStore` is the interface; `SqliteHistory` is the default back end (one
file, WAL mode so several worker processes can write, a lock per process since
libmilter calls from many threads). The connection opens lazily, in the process
and after any fork that uses it. A PostgreSQL back end for several MX hosts
sharing one history would implement the same three methods.
"""

from __future__ import annotations

import abc
import atexit
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HistoryEntry:
    """What an aggregate report needs of one evaluated message (RFC 9990 (report contents))."""

    time: int  # Unix seconds
    source_ip: str
    header_from: str  # the Author Domain
    envelope_from: str  # RFC5321.MailFrom domain ("" for the null sender)
    envelope_to: str  # the first recipient's domain
    dkim: tuple[tuple[str, str, str], ...]  # (domain, selector, result) per signature
    spf_domain: str
    spf_result: str
    policy_domain: str
    p: str
    sp: str
    np: str
    adkim: str
    aspf: str
    testing: bool
    discovery: str
    fo: str
    rua: tuple[str, ...]
    result: str  # dmarc result: pass fail none temperror permerror
    dkim_aligned: bool
    spf_aligned: bool
    policy: str  # what the record asks (p/sp/np as it applies)
    disposition: str  # what was done: none, quarantine, reject
    override: str = ""  # RFC 9990 PolicyOverrideType when disposition != policy


_COLUMNS = [f.name for f in fields(HistoryEntry)]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS dmarc_history (
    id INTEGER PRIMARY KEY,
    time INTEGER NOT NULL, source_ip TEXT NOT NULL, header_from TEXT NOT NULL,
    envelope_from TEXT NOT NULL, envelope_to TEXT NOT NULL, dkim TEXT NOT NULL,
    spf_domain TEXT NOT NULL, spf_result TEXT NOT NULL, policy_domain TEXT NOT NULL,
    p TEXT NOT NULL, sp TEXT NOT NULL, np TEXT NOT NULL, adkim TEXT NOT NULL,
    aspf TEXT NOT NULL, testing INTEGER NOT NULL, discovery TEXT NOT NULL, fo TEXT NOT NULL,
    rua TEXT NOT NULL, result TEXT NOT NULL, dkim_aligned INTEGER NOT NULL,
    spf_aligned INTEGER NOT NULL, policy TEXT NOT NULL, disposition TEXT NOT NULL,
    override TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dmarc_history_time ON dmarc_history (time, policy_domain);
"""


class HistoryStore(abc.ABC):
    """Where evaluations are kept."""

    @abc.abstractmethod
    def record(self, entry: HistoryEntry) -> None:
        """Keep one evaluation."""

    @abc.abstractmethod
    def entries(self, since: int, until: int,
                domains: Sequence[str] = ()) -> list[HistoryEntry]:
        """Evaluations with since <= time < until, for these policy domains (all if empty)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""


def _to_row(e: HistoryEntry) -> tuple[object, ...]:
    d = asdict(e)
    d["dkim"] = json.dumps([list(x) for x in e.dkim])
    d["rua"] = ",".join(e.rua)
    d["testing"] = int(e.testing)
    d["dkim_aligned"] = int(e.dkim_aligned)
    d["spf_aligned"] = int(e.spf_aligned)
    return tuple(d[c] for c in _COLUMNS)


def _from_row(row: Sequence[object]) -> HistoryEntry:
    d = dict(zip(_COLUMNS, row, strict=True))
    d["dkim"] = tuple(tuple(x) for x in json.loads(str(d["dkim"])))
    d["rua"] = tuple(x for x in str(d["rua"]).split(",") if x)
    for key in ("testing", "dkim_aligned", "spf_aligned"):
        d[key] = bool(d[key])
    return HistoryEntry(**d)  # type: ignore[arg-type]


class SqliteHistory(HistoryStore):
    """The history in one SQLite file; thread-safe, shared by worker processes.

    `record` only queues the row: a writer thread of this process inserts what
    has queued in one transaction every `flush_interval` seconds, so that a
    message never waits on the file (one INSERT and commit per message cost 20 %
    of the filter's rate). `entries` and `close` write what is queued first; a
    crash loses at most the rows of the last interval. The connection and the
    thread belong to the process that opened them: a forked worker opens its own.
    """

    def __init__(self, path: str, flush_interval: float = 0.5) -> None:
        self.path = path
        self.flush_interval = flush_interval
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._write_lock = threading.Lock()  # one writer of the connection at a time
        self._pending: list[tuple[object, ...]] = []
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._writer: threading.Thread | None = None
        self._writer_pid = 0
        self._closing = False

    def _connection(self) -> sqlite3.Connection:
        """This process's connection (call with _write_lock held)."""
        if self._conn is None or self._pid != os.getpid():
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=10, check_same_thread=False,
                                   isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._conn = conn
            self._pid = os.getpid()
        return self._conn

    def record(self, entry: HistoryEntry) -> None:
        row = _to_row(entry)
        with self._lock:
            if (self._writer is None or not self._writer.is_alive()
                    or self._writer_pid != os.getpid()):
                self._pending = []  # rows queued by the parent before a fork are its own
                self._closing = False
                self._writer = threading.Thread(target=self._write_loop,
                                                name="dmarc-history", daemon=True)
                self._writer.start()
                self._writer_pid = os.getpid()
                atexit.register(self.close)  # what is queued is written at exit
            self._pending.append(row)
            self._wake.notify()

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending and self._closing:
                    return
            time.sleep(self.flush_interval)  # let a batch gather
            try:
                self.flush()
            except sqlite3.Error as exc:
                log.warning("DMARC history %s: %d rows not written: %s", self.path,
                            len(self._pending), exc)

    def flush(self) -> None:
        """Write every queued row now, in one transaction."""
        with self._write_lock:
            with self._lock:
                rows, self._pending = self._pending, []
            if not rows:
                return
            marks = ", ".join("?" for _ in _COLUMNS)
            conn = self._connection()
            with conn:  # BEGIN ... COMMIT
                conn.execute("BEGIN")
                conn.executemany(
                    f"INSERT INTO dmarc_history ({', '.join(_COLUMNS)}) VALUES ({marks})", rows)

    def entries(self, since: int, until: int,
                domains: Sequence[str] = ()) -> list[HistoryEntry]:
        self.flush()
        sql = f"SELECT {', '.join(_COLUMNS)} FROM dmarc_history WHERE time >= ? AND time < ?"
        args: list[object] = [since, until]
        if domains:
            sql += f" AND policy_domain IN ({', '.join('?' for _ in domains)})"
            args += [d.lower() for d in domains]
        with self._write_lock:
            rows = self._connection().execute(sql + " ORDER BY id", args).fetchall()
        return [_from_row(r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._wake.notify_all()
        self.flush()
        with self._write_lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


def open_history(spec: str) -> HistoryStore | None:
    """The store named by the `history` setting; None for "" (no history)."""
    if not spec:
        return None
    return SqliteHistory(spec)
