"""The DMARC history: one row per evaluation, read back by `milters dmarc report/stats`.

`HistoryStore` is the interface; `SqliteHistory` is the default back end (one
file, WAL mode so several worker processes can write) and `PostgresHistory` the
one for several MX hosts sharing one history. Both write in batches from a
thread (`BatchedHistory`); libmilter calls from many threads, so everything
shared takes a lock. Connections open lazily, in the process that uses them.
"""

from __future__ import annotations

import abc
import atexit
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from milters.core.errors import ConfigError

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


class BatchedHistory(HistoryStore):
    """A store whose `record` only queues the row: a writer thread of this process
    inserts what has queued in one transaction every `flush_interval` seconds, so
    that a message never waits on the database (one INSERT and commit per message
    cost 20 % of the filter's rate). `entries` and `close` write what is queued
    first; a crash loses at most the rows of the last interval. The connection and
    the thread belong to the process that opened them: a forked worker opens its
    own. Subclasses say how to connect, insert and select.
    """

    placeholder = "?"
    db_errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, flush_interval: float = 0.5) -> None:
        self.flush_interval = flush_interval
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._write_lock = threading.Lock()  # one user of the connection at a time
        self._pending: list[tuple[object, ...]] = []
        self._conn: Any = None
        self._pid = 0
        self._writer: threading.Thread | None = None
        self._writer_pid = 0
        self._closing = False

    @abc.abstractmethod
    def _connect(self) -> Any:
        """A new DB-API connection with the table in place."""

    def where(self) -> str:
        """The store as the log names it."""
        return type(self).__name__

    def _connection(self) -> Any:
        """This process's connection (call with _write_lock held)."""
        if self._conn is None or self._pid != os.getpid():
            self._conn = self._connect()
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
            errors: tuple[type[Exception], ...] = (*self.db_errors, OSError)
            try:
                self.flush()
            except errors as exc:  # log; the thread goes on
                log.warning("DMARC history %s: rows not written: %s: %s", self.where(),
                            type(exc).__name__, exc)

    def flush(self) -> None:
        """Write every queued row now, in one transaction."""
        with self._write_lock:
            with self._lock:
                rows, self._pending = self._pending, []
            if not rows:
                return
            marks = ", ".join(self.placeholder for _ in _COLUMNS)
            conn = self._connection()
            try:
                cur = conn.cursor()
                cur.executemany(f"INSERT INTO dmarc_history ({', '.join(_COLUMNS)}) "
                                f"VALUES ({marks})", rows)
                conn.commit()
            except Exception:
                conn.rollback()
                raise

    def entries(self, since: int, until: int,
                domains: Sequence[str] = ()) -> list[HistoryEntry]:
        self.flush()
        ph = self.placeholder
        sql = (f"SELECT {', '.join(_COLUMNS)} FROM dmarc_history "
               f"WHERE time >= {ph} AND time < {ph}")
        args: list[object] = [since, until]
        if domains:
            sql += f" AND policy_domain IN ({', '.join(ph for _ in domains)})"
            args += [d.lower() for d in domains]
        with self._write_lock:
            conn = self._connection()
            cur = conn.cursor()
            cur.execute(sql + " ORDER BY id", args)
            rows = cur.fetchall()
            conn.commit()  # end the read transaction (PostgreSQL)
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


class SqliteHistory(BatchedHistory):
    """The history in one SQLite file (WAL mode: several worker processes write to it)."""

    def __init__(self, path: str, flush_interval: float = 0.5) -> None:
        super().__init__(flush_interval)
        self.path = path

    def where(self) -> str:
        return self.path

    def _connect(self) -> sqlite3.Connection:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        return conn


_PG_SCHEMA = _SCHEMA.replace("id INTEGER PRIMARY KEY", "id BIGSERIAL PRIMARY KEY").replace(
    "time INTEGER", "time BIGINT")


class PostgresHistory(BatchedHistory):
    """The history in a PostgreSQL database, so that several MX hosts share one
    (`history = "postgresql://user@host/db"`, libpq's URL form)."""

    placeholder = "%s"

    def __init__(self, url: str, flush_interval: float = 0.5) -> None:
        import psycopg

        super().__init__(flush_interval)
        self.url = url
        self.db_errors = (psycopg.Error,)

    def where(self) -> str:
        return re.sub(r"//[^@/]*@", "//", self.url)  # no password in the log

    def _connect(self) -> Any:
        import psycopg

        conn = psycopg.connect(self.url, connect_timeout=10)
        with conn.cursor() as cur:
            # One creator at a time: two hosts starting together must not race.
            cur.execute("SELECT pg_advisory_xact_lock(4932)")
            for statement in _PG_SCHEMA.split(";"):
                if statement.strip():
                    cur.execute(statement)
        conn.commit()
        return conn


def open_history(spec: str) -> HistoryStore | None:
    """The store named by the `history` setting; None for "" (no history)."""
    if not spec:
        return None
    if spec.startswith(("postgresql://", "postgres://")):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ConfigError("[dmarc] history: a PostgreSQL history needs the psycopg "
                              "package (pip install 'milters[postgresql]')") from None
        return PostgresHistory(spec)
    return SqliteHistory(spec)
