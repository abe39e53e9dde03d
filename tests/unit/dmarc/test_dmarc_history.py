"""The history store contract, for both back ends: SQLite (a file) and PostgreSQL
(a private server this test starts: initdb into a temporary directory as the
`postgres` user, its own port and socket directory; skipped without root or the
Debian `postgresql` binaries). Rows round-trip, time and domain selection, many
threads at once, two stores (two MX hosts) sharing one history; the crash journal
(a process killed before its batch is written, a segment replayed after its rows
were committed, a line cut short, a live process's segment left alone, a history
from before the journal) and the sent-report log."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from milters.core.errors import ConfigError
from milters.dmarc.history import (
    BatchedHistory,
    HistoryEntry,
    HistoryStore,
    PostgresHistory,
    ReportSend,
    SqliteHistory,
    open_history,
)
from tests.support.processes import free_port

ENTRY = HistoryEntry(
    time=1000, source_ip="192.0.2.10", header_from="example.com", envelope_from="example.com",
    envelope_to="test.example", dkim=(("example.com", "sel", "pass"), ("x.example", "s", "fail")),
    spf_domain="example.com", spf_result="pass", policy_domain="example.com", p="reject",
    sp="quarantine", np="", adkim="r", aspf="s", testing=True, discovery="treewalk", fo="1:d",
    rua=("mailto:a@example.com", "mailto:b@example.net"), result="pass", dkim_aligned=True,
    spf_aligned=False, policy="reject", disposition="none", override="",
)


def _pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return str(Path(found[-1]).parent) if found else None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    bindir = _pg_bin()
    if bindir is None or os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root and Debian's postgresql binaries")
    d = Path(tempfile.mkdtemp(prefix="milters-pg-"))
    os.chmod(d, 0o755)
    shutil.chown(d, "postgres", "postgres")
    port = free_port()

    def as_postgres(*argv: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True,
                       capture_output=True, timeout=60)

    as_postgres(f"{bindir}/initdb", "-D", str(d / "data"), "-A", "trust", "-U", "milters")
    as_postgres(f"{bindir}/pg_ctl", "-D", str(d / "data"), "-l", str(d / "log"), "-w",
                "-o", f"-p {port} -k {d} -c listen_addresses=127.0.0.1", "start")
    try:
        yield f"postgresql://milters@127.0.0.1:{port}/postgres"
    finally:
        as_postgres(f"{bindir}/pg_ctl", "-D", str(d / "data"), "-m", "immediate", "stop")
        shutil.rmtree(d, ignore_errors=True)


Opener = Callable[[], HistoryStore]


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    if request.param == "sqlite":
        spec = str(tmp_path / "h.sqlite")
    else:
        url = request.getfixturevalue("postgres_url")
        store = PostgresHistory(url)
        with store._write_lock:  # a clean table for each test
            conn = store._connection()
            conn.execute("TRUNCATE dmarc_history")
            conn.execute("TRUNCATE dmarc_report_log")
            conn.commit()
        store.close()
        spec = url
    opened: list[HistoryStore] = []

    def open_() -> HistoryStore:
        store = open_history(spec, journal=str(tmp_path / "journal"))
        assert store is not None
        opened.append(store)
        return store

    yield open_
    for s in opened:
        s.close()


def test_round_trip_and_selection(opener: Opener) -> None:
    store = opener()
    store.record(ENTRY)
    store.record(replace(ENTRY, time=2000, policy_domain="other.example"))
    store.record(replace(ENTRY, time=3000))
    assert store.entries(0, 10_000) == [
        ENTRY, replace(ENTRY, time=2000, policy_domain="other.example"),
        replace(ENTRY, time=3000)]
    assert [e.time for e in store.entries(1000, 3000)] == [1000, 2000]
    assert [e.time for e in store.entries(0, 10_000, ["EXAMPLE.com"])] == [1000, 3000]


def test_threads_and_two_hosts(opener: Opener) -> None:
    one, two = opener(), opener()

    def work(store: HistoryStore, n: int) -> None:
        for i in range(50):
            store.record(replace(ENTRY, time=n * 1000 + i))

    threads = [threading.Thread(target=work, args=(s, n))
               for n, s in enumerate([one, two, one, two])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    one.close()
    assert len(two.entries(0, 10**9)) == 200


def test_missing_driver_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real = builtins.__import__

    def no_psycopg(name: str, *args: object, **kwargs: object) -> object:
        if name == "psycopg":
            raise ImportError(name)
        return real(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_psycopg)
    with pytest.raises(ConfigError, match="psycopg"):
        open_history("postgresql://x@127.0.0.1/db")


KILLED_WRITER = """
import os, signal, sys
from dataclasses import replace
from milters.dmarc.history import open_history
from tests.unit.dmarc.test_dmarc_history import ENTRY
store = open_history(sys.argv[1], journal=sys.argv[2])
store.flush_interval = 3600  # the batch is never written: only the journal has the rows
for i in range(int(sys.argv[3])):
    store.record(replace(ENTRY, time=5000 + i))
os.kill(os.getpid(), signal.SIGKILL)
"""


def _spec(store: HistoryStore) -> str:
    return store.url if isinstance(store, PostgresHistory) else store.where()


def test_rows_of_a_killed_process_are_replayed_once(opener: Opener, tmp_path: Path) -> None:
    store = opener()
    root = Path(__file__).resolve().parents[3]
    run = subprocess.run([sys.executable, "-c", KILLED_WRITER, _spec(store),
                          str(tmp_path / "journal"), "40"], cwd=root, capture_output=True,
                         timeout=60)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert len(list((tmp_path / "journal").glob("*.jnl"))) == 1
    assert [e.time for e in store.entries(0, 10**9)] == list(range(5000, 5040))
    assert not list((tmp_path / "journal").glob("*.jnl"))
    assert len(opener().entries(0, 10**9)) == 40


def test_a_segment_replayed_after_its_commit_adds_nothing(opener: Opener,
                                                          tmp_path: Path) -> None:
    store = opener()
    assert isinstance(store, BatchedHistory) and store.journal is not None
    for i in range(5):
        store.record(replace(ENTRY, time=i))
    segment = store.journal._path
    assert segment is not None
    # A crash between the commit and the unlink leaves the segment behind.
    shutil.copy(segment, segment.with_name("999999.1.1.jnl"))
    store.flush()
    assert len(opener().entries(0, 10**9)) == 5
    assert not list((tmp_path / "journal").glob("*.jnl"))


def test_a_line_cut_short_is_skipped_and_a_live_segment_left_alone(tmp_path: Path) -> None:
    db, journal = str(tmp_path / "h.sqlite"), str(tmp_path / "j")
    live = SqliteHistory(db, flush_interval=3600, journal=journal)
    live.record(ENTRY)
    (Path(journal) / "1.1.1.jnl").write_bytes(b'["cut short", 1')  # killed mid-write
    reader = SqliteHistory(db, journal=journal)
    assert reader.entries(0, 10**9) == []  # the live process still holds its segment
    assert not (Path(journal) / "1.1.1.jnl").exists()
    live.close()
    assert reader.entries(0, 10**9) == [ENTRY]
    reader.close()


def test_a_history_from_before_the_journal_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    from milters.dmarc.history import _SCHEMA
    db = tmp_path / "old.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript(_SCHEMA.replace(", uid TEXT", ""))
    conn.close()
    store = SqliteHistory(str(db), journal=str(tmp_path / "j"))
    store.record(ENTRY)
    assert store.entries(0, 10**9) == [ENTRY]
    store.close()


def test_sent_report_log(opener: Opener) -> None:
    store = opener()
    first = ReportSend("r1", "a@example.com", "example.com", 0, 86400, "failed", 1, 10, 3610,
                       "421 try later")
    store.log_send(first)
    store.log_send(replace(first, destination="b@example.com", state="sent", error=""))
    store.log_send(replace(first, state="sent", attempts=2, error=""))  # replaces
    store.log_send(replace(first, report_id="r2"))
    assert [(s.report_id, s.destination, s.state, s.attempts) for s in opener().sends("r1")] \
        == [("r1", "a@example.com", "sent", 2), ("r1", "b@example.com", "sent", 1)]
    assert len(store.sends()) == 3


def test_an_unwritable_journal_still_records(tmp_path: Path) -> None:
    (tmp_path / "j").write_text("a file where the journal directory should be")
    store = SqliteHistory(str(tmp_path / "h.sqlite"), journal=str(tmp_path / "j"))
    store.record(ENTRY)
    assert store.entries(0, 10**9) == [ENTRY]
    store.close()


def test_a_history_from_before_arc_overrides_is_migrated(tmp_path: Path) -> None:
    """override_comment came with trusted ARC sealers: an older file gets the column,
    and an older journal line (one column fewer) is still replayed."""
    import json
    import sqlite3

    from milters.dmarc.history import _SCHEMA, _to_row
    db = tmp_path / "old.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript(_SCHEMA.replace(", override_comment TEXT NOT NULL DEFAULT ''", ""))
    conn.close()
    journal = tmp_path / "j"
    journal.mkdir()
    old_row = [*_to_row(replace(ENTRY, time=7))[:-1], "0123abcd"]  # no override_comment
    (journal / "1.1.1.jnl").write_bytes(json.dumps(old_row).encode() + b"\n")
    store = SqliteHistory(str(db), journal=str(journal))
    forwarded = replace(ENTRY, time=8, override="trusted_forwarder",
                        override_comment="arc=pass as[1].d=lists.example")
    store.record(forwarded)
    assert sorted(store.entries(0, 10**9), key=lambda e: e.time) == [
        replace(ENTRY, time=7), forwarded]
    store.close()
