"""The history store contract, for both back ends: SQLite (a file) and PostgreSQL
(a private server this test starts: initdb into a temporary directory as the
`postgres` user, its own port and socket directory; skipped without root or the
Debian `postgresql` binaries). Rows round-trip, time and domain selection, many
threads at once, and two stores (two MX hosts) sharing one history."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from milters.core.errors import ConfigError
from milters.dmarc.history import HistoryEntry, HistoryStore, PostgresHistory, open_history
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
            conn.commit()
        store.close()
        spec = url
    opened: list[HistoryStore] = []

    def open_() -> HistoryStore:
        store = open_history(spec)
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
