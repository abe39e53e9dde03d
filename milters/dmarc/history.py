"""The DMARC history: one row per evaluation, read back by `milters dmarc report/stats`.

`HistoryStore` is the interface; `SqliteHistory` is the default back end (one
file, WAL mode so several worker processes can write) and `PostgresHistory` the
one for several MX hosts sharing one history. Both write in batches from a
thread (`BatchedHistory`); libmilter calls from many threads, so everything
shared takes a lock. Connections open lazily, in the process that uses them.

Crash safety: before `record` returns (so before the filter answers
end-of-message), the row is appended to a local journal segment of this process
(`Journal`). A killed process leaves its segment behind; the next process that
flushes (a restarted worker, or `milters dmarc report`) replays it. Every row
carries a unique id (`uid`, a UNIQUE column), and rows go in with "insert or
ignore", so a segment replayed after its batch was already committed adds nothing
twice. The store also keeps the sent-report log of `milters dmarc report`.
"""

from __future__ import annotations

import abc
import atexit
import fcntl
import itertools
import json
import logging
import operator
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
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
    # Its comment in the report: for trusted_forwarder, the ARC chain that earned it
    # ("arc=pass as[2].d=lists.example as[1].d=fwd.example", as OpenDMARC writes it).
    override_comment: str = ""


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
    override TEXT NOT NULL, override_comment TEXT NOT NULL DEFAULT '', uid TEXT
);
CREATE INDEX IF NOT EXISTS dmarc_history_time ON dmarc_history (time, policy_domain);
CREATE TABLE IF NOT EXISTS dmarc_report_log (
    report_id TEXT NOT NULL, destination TEXT NOT NULL, policy_domain TEXT NOT NULL,
    begin_time BIGINT NOT NULL, end_time BIGINT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL, last_attempt BIGINT NOT NULL, next_attempt BIGINT NOT NULL,
    error TEXT NOT NULL, PRIMARY KEY (report_id, destination)
);
"""
# After the table is known to have the uid column (a history from before it is
# migrated first): NULLs (old rows) are distinct, so they do not collide.
_UID_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS dmarc_history_uid ON dmarc_history (uid)"
_INSERT_COLUMNS = (*_COLUMNS, "uid")


@dataclass(frozen=True)
class ReportSend:
    """One report to one destination in the sent-report log (`milters dmarc report`)."""

    report_id: str
    destination: str
    policy_domain: str
    begin: int
    end: int
    state: str  # "sent", "failed" (retried when next_attempt is due), "gave_up"
    attempts: int
    last_attempt: int
    next_attempt: int
    error: str = ""


_SEND_COLUMNS = ("report_id, destination, policy_domain, begin_time, end_time, state, "
                 "attempts, last_attempt, next_attempt, error")


class HistoryStore(abc.ABC):
    """Where evaluations are kept, and which reports were sent."""

    @abc.abstractmethod
    def record(self, entry: HistoryEntry) -> None:
        """Keep one evaluation (durable against a crash of this process on return)."""

    @abc.abstractmethod
    def entries(self, since: int, until: int,
                domains: Sequence[str] = ()) -> list[HistoryEntry]:
        """Evaluations with since <= time < until, for these policy domains (all if empty)."""

    @abc.abstractmethod
    def sends(self, report_id: str = "") -> list[ReportSend]:
        """The sent-report log: of one report, or all of it."""

    @abc.abstractmethod
    def log_send(self, send: ReportSend) -> None:
        """Record (replace) the state of one report to one destination."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""


# Every field in column order, read in one call: dataclasses.asdict deep-copies every
# nested tuple (a tenth of dmarc's work per message), a dict per row cost half of this.
_FIELDS = operator.attrgetter(*_COLUMNS)
# The fields stored in another form than they are held, by column position.
_STORED_AS = (
    (_COLUMNS.index("dkim"), lambda v: json.dumps([list(x) for x in v])),
    (_COLUMNS.index("rua"), ",".join),
    (_COLUMNS.index("testing"), int),
    (_COLUMNS.index("dkim_aligned"), int),
    (_COLUMNS.index("spf_aligned"), int),
)


def _to_row(e: HistoryEntry) -> tuple[object, ...]:
    row = list(_FIELDS(e))
    for i, store in _STORED_AS:
        row[i] = store(row[i])
    return tuple(row)


def _from_row(row: Sequence[object]) -> HistoryEntry:
    d = dict(zip(_COLUMNS, row, strict=True))
    d["dkim"] = tuple(tuple(x) for x in json.loads(str(d["dkim"])))
    d["rua"] = tuple(x for x in str(d["rua"]).split(",") if x)
    for key in ("testing", "dkim_aligned", "spf_aligned"):
        d[key] = bool(d[key])
    return HistoryEntry(**d)  # type: ignore[arg-type]


class Journal:
    """This process's crash journal: rows appended, one JSON line each, to a segment
    file DIR/PID.N.jnl that the process holds an exclusive flock(2) on. A segment is
    handed over (`take`) when its rows go into the store and unlinked once they are
    committed. A segment nobody holds a lock on belongs to a dead process (the kernel
    drops the lock of a killed one) and is replayed by `orphans`.

    write(2) puts the line in the kernel's page cache before `append` returns, which
    is what survives SIGKILL or a crash of the filter; fsync=True adds fdatasync(2)
    per row so that an operating system crash or power loss does not lose it either.
    Callers hold their own lock (one writer at a time per journal).
    """

    def __init__(self, directory: str, fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self._fd = -1
        self._path: Path | None = None
        self._pid = 0
        self._seq = 0

    def append(self, line: bytes) -> None:
        if self._fd < 0 or self._pid != os.getpid():
            self._open()
        os.write(self._fd, line)
        if self.fsync:
            os.fdatasync(self._fd)

    def _open(self) -> None:
        if self._pid != os.getpid():
            # A descriptor inherited over fork() shares the parent's lock: leave it alone
            # (close only ours; never LOCK_UN, which would drop the parent's lock).
            self._fd, self._path, self._seq = -1, None, 0
            self._pid = os.getpid()
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._seq += 1
        # The time in the name: a later process may get the same pid.
        path = self.directory / f"{self._pid}.{self._seq}.{time.time_ns()}.jnl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd, self._path = fd, path

    def take(self) -> tuple[int, Path] | None:
        """Hand over the current segment (its rows are about to be written); the next
        `append` starts a new one."""
        if self._fd < 0 or self._pid != os.getpid() or self._path is None:
            return None
        out = (self._fd, self._path)
        self._fd, self._path = -1, None
        return out

    @staticmethod
    def done(segment: tuple[int, Path], committed: bool) -> None:
        """Its rows are in the store (unlink it), or not (keep it for a replay)."""
        fd, path = segment
        if committed:
            path.unlink(missing_ok=True)
        os.close(fd)  # drops our lock: an uncommitted segment is now an orphan

    def orphans(self) -> list[tuple[int, Path, list[tuple[object, ...]]]]:
        """Segments of dead processes, locked by us now, with their rows."""
        out: list[tuple[int, Path, list[tuple[object, ...]]]] = []
        try:
            paths = sorted(self.directory.glob("*.jnl"))
        except OSError:
            return out
        for path in paths:
            if path == self._path:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # replayed by another process meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # a live process's segment
                continue
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
            out.append((fd, path, _parse_journal(data)))
        return out


def _parse_journal(data: bytes) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for line in data.split(b"\n"):
        # A line cut short by the crash is not valid JSON (or has the wrong length): it
        # belongs to a message whose end-of-message was not answered yet.
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, list) and len(row) == len(_INSERT_COLUMNS) - 1:
            # Journaled before override_comment existed: it goes before the uid.
            row = [*row[:-1], "", row[-1]]
        if isinstance(row, list) and len(row) == len(_INSERT_COLUMNS):
            rows.append(tuple(row))
    return rows


class BatchedHistory(HistoryStore):
    """A store whose `record` appends the row to this process's journal and queues it:
    a writer thread of this process inserts what has queued in one transaction every
    `flush_interval` seconds, so that a message never waits on the database (one
    INSERT and commit per message cost 20 % of the filter's rate). The journal keeps
    what a crash would otherwise lose (see `Journal`); `entries` and `close` write what
    is queued first, and any process's first flush replays dead processes' segments.
    The connection and the thread belong to the process that opened them: a forked
    worker opens its own. Subclasses say how to connect, insert and select.
    """

    placeholder = "?"
    db_errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    insert_sql = "INSERT OR IGNORE INTO"
    insert_tail = ""
    upsert_sql = "INSERT OR REPLACE INTO"
    upsert_tail = ""

    def __init__(self, flush_interval: float = 0.5, journal: str = "",
                 fsync: bool = False) -> None:
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
        self.journal = Journal(journal, fsync) if journal else None
        self._replayed_pid = 0  # the process that last replayed orphan segments
        self._uid_prefix = ""  # each row's uid: this prefix and a count (record)
        self._uid_count = itertools.count()

    @abc.abstractmethod
    def _connect(self) -> Any:
        """A new DB-API connection with the tables in place."""

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
        with self._lock:
            if (self._writer is None or not self._writer.is_alive()
                    or self._writer_pid != os.getpid()):
                # Unique across processes and restarts without a random draw per
                # row: a random prefix per process (and per fork), then a count.
                self._uid_prefix = uuid.uuid4().hex[:20]
                self._uid_count = itertools.count()
                self._pending = []  # rows queued by the parent before a fork are its own
                self._closing = False
                self._writer = threading.Thread(target=self._write_loop,
                                                name="dmarc-history", daemon=True)
                self._writer.start()
                self._writer_pid = os.getpid()
                atexit.register(self.close)  # what is queued is written at exit
            row = (*_to_row(entry), f"{self._uid_prefix}{next(self._uid_count):012x}")
            line = json.dumps(row, separators=(",", ":")).encode() + b"\n"
            self._pending.append(row)
            if len(self._pending) == 1:
                self._wake.notify()  # the writer waits only while nothing is queued
            if self.journal is not None:
                try:
                    self.journal.append(line)
                except OSError as exc:  # the row is still queued; only crash safety is lost
                    log.warning("DMARC history journal %s: row not journaled: %s",
                                self.journal.directory, exc)

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
                log.warning("DMARC history %s: rows not written now (kept in the journal "
                            "for a retry): %s: %s", self.where(), type(exc).__name__, exc)

    def _insert(self, conn: Any, rows: Sequence[tuple[object, ...]]) -> None:
        marks = ", ".join(self.placeholder for _ in _INSERT_COLUMNS)
        cur = conn.cursor()
        cur.executemany(f"{self.insert_sql} dmarc_history ({', '.join(_INSERT_COLUMNS)}) "
                        f"VALUES ({marks}){self.insert_tail}", rows)

    def flush(self) -> None:
        """Write every queued row now, in one transaction; then replay what dead
        processes left in the journal (once per process, and after a failure)."""
        with self._write_lock:
            with self._lock:
                rows, self._pending = self._pending, []
                segment = self.journal.take() if self.journal is not None else None
            committed = False
            try:
                if rows:
                    self._commit(rows)
                committed = True
            finally:
                if segment is not None:
                    Journal.done(segment, committed)
                if not committed:
                    self._replayed_pid = 0  # the segment left behind: replay it next time
            if self.journal is not None and self._replayed_pid != os.getpid():
                self._replay()
                self._replayed_pid = os.getpid()

    def _commit(self, rows: Sequence[tuple[object, ...]]) -> None:
        """Insert `rows` in one transaction (call with _write_lock held)."""
        conn = self._connection()
        try:
            self._insert(conn, rows)
            conn.commit()
        except Exception:  # any driver error: undo, and let the caller keep the rows
            conn.rollback()
            raise

    def _replay(self) -> None:
        """Insert the rows of dead processes' segments (call with _write_lock held)."""
        assert self.journal is not None
        for fd, path, rows in self.journal.orphans():
            try:
                if rows:
                    self._commit(rows)
                    log.info("DMARC history %s: %d rows replayed from %s", self.where(),
                             len(rows), path)
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)

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
        return [_from_row(r) for r in self._query(sql + " ORDER BY id", args)]

    def _query(self, sql: str, args: Sequence[object]) -> list[Any]:
        with self._write_lock:
            conn = self._connection()
            cur = conn.cursor()
            cur.execute(sql, args)
            rows = cur.fetchall()
            conn.commit()  # end the read transaction (PostgreSQL)
        return list(rows)

    def sends(self, report_id: str = "") -> list[ReportSend]:
        sql = f"SELECT {_SEND_COLUMNS} FROM dmarc_report_log"
        args: list[object] = []
        if report_id:
            sql += f" WHERE report_id = {self.placeholder}"
            args.append(report_id)
        rows = self._query(sql + " ORDER BY begin_time, report_id, destination", args)
        return [ReportSend(*r) for r in rows]

    def log_send(self, send: ReportSend) -> None:
        marks = ", ".join(self.placeholder for _ in range(10))
        with self._write_lock:
            conn = self._connection()
            try:
                conn.cursor().execute(
                        f"{self.upsert_sql} dmarc_report_log ({_SEND_COLUMNS}) VALUES ({marks})"
                    f"{self.upsert_tail}", astuple_send(send))
                conn.commit()
            except Exception:
                conn.rollback()
                raise

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._wake.notify_all()
        self.flush()
        with self._write_lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


def astuple_send(send: ReportSend) -> tuple[object, ...]:
    return (send.report_id, send.destination, send.policy_domain, send.begin, send.end,
            send.state, send.attempts, send.last_attempt, send.next_attempt, send.error)


class SqliteHistory(BatchedHistory):
    """The history in one SQLite file (WAL mode: several worker processes write to it).
    The journal is the directory FILE.journal next to it unless told otherwise."""

    def __init__(self, path: str, flush_interval: float = 0.5, journal: str | None = None,
                 fsync: bool = False) -> None:
        super().__init__(flush_interval, path + ".journal" if journal is None else journal,
                         fsync)
        self.path = path

    def where(self) -> str:
        return self.path

    def _connect(self) -> sqlite3.Connection:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        columns = {r[1] for r in conn.execute("PRAGMA table_info(dmarc_history)")}
        if "uid" not in columns:  # a history written before the journal existed
            conn.execute("ALTER TABLE dmarc_history ADD COLUMN uid TEXT")
        if "override_comment" not in columns:  # ... or before ARC overrides
            conn.execute("ALTER TABLE dmarc_history ADD COLUMN override_comment TEXT "
                         "NOT NULL DEFAULT ''")
        conn.execute(_UID_INDEX)
        conn.commit()
        return conn


_PG_SCHEMA = _SCHEMA.replace("id INTEGER PRIMARY KEY", "id BIGSERIAL PRIMARY KEY").replace(
    "time INTEGER", "time BIGINT")
DEFAULT_PG_JOURNAL = "/var/lib/milters/dmarc-history.journal"


class PostgresHistory(BatchedHistory):
    """The history in a PostgreSQL database, so that several MX hosts share one
    (`history = "postgresql://user@host/db"`, libpq's URL form). The journal is a
    local directory (each host has its own)."""

    placeholder = "%s"
    insert_sql = "INSERT INTO"
    insert_tail = " ON CONFLICT (uid) DO NOTHING"
    upsert_sql = "INSERT INTO"
    upsert_tail = (" ON CONFLICT (report_id, destination) DO UPDATE SET "
                   "state = EXCLUDED.state, attempts = EXCLUDED.attempts, "
                   "last_attempt = EXCLUDED.last_attempt, "
                   "next_attempt = EXCLUDED.next_attempt, error = EXCLUDED.error")

    def __init__(self, url: str, flush_interval: float = 0.5, journal: str | None = None,
                 fsync: bool = False) -> None:
        import psycopg

        super().__init__(flush_interval, DEFAULT_PG_JOURNAL if journal is None else journal,
                         fsync)
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
            cur.execute("ALTER TABLE dmarc_history ADD COLUMN IF NOT EXISTS uid TEXT")
            cur.execute("ALTER TABLE dmarc_history ADD COLUMN IF NOT EXISTS override_comment "
                        "TEXT NOT NULL DEFAULT ''")
            cur.execute(_UID_INDEX)
        conn.commit()
        return conn


def open_history(spec: str, journal: str | None = None,
                 fsync: bool = False) -> HistoryStore | None:
    """The store named by the `history` setting; None for "" (no history). `journal`:
    the crash journal's directory (None: the default for the back end)."""
    if not spec:
        return None
    if spec.startswith(("postgresql://", "postgres://")):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ConfigError("[dmarc] history: a PostgreSQL history needs the psycopg "
                              "package (pip install 'milters[postgresql]')") from None
        return PostgresHistory(spec, journal=journal, fsync=fsync)
    return SqliteHistory(spec, journal=journal, fsync=fsync)
