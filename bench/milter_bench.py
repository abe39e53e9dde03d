"""Milter-protocol benchmark: one filter driven the way Postfix drives it.

Starts a filter on a free loopback port (`python -m milters run checks` with the
50-rule tables in bench/tables/, or the core-only `scripted` test filter as a
baseline, or attaches to any running milter with --socket), then sends the
bench/corpus.py corpora through milters.client.session.MilterSession exactly as
Postfix's milter8.c would: OPTNEG, CONNECT, HELO, then per message MAIL, RCPT,
DATA, the header fields, EOH, body chunks, EOM and ABORT; QUIT after
--per-connection messages (Postfix keeps one milter connection per SMTP
session, so the default is one message per connection).

Load comes from separate client processes (not threads: each has its own GIL,
and its CPU time is measured so a saturated client shows in the report). The
client socket has no TCP_NODELAY, as Postfix's has none: that is what exposes
the 40 ms delayed-ACK stalls of shared/notes/milter-latency.md.

Reported per case: messages/s; latency in ms from the first header to the
end-of-message reply (`data`, what Postfix's client waits for after the end of
DATA) and for the whole transaction (`txn`, from MAIL, or from opening the
connection for the first message of a connection, to the EOM reply); filter
and client CPU. Then memory of the filter processes (parent and workers, from
/proc): idle, with N connections open in the middle of a small message, and
with connections in the middle of a 5 MB message.

    python -m bench.milter_bench                     # checks, 2 workers, ~40 s
    python -m bench.milter_bench --filter scripted   # core-only baseline
    python -m bench.milter_bench --nodelay both      # also with TCP_NODELAY on
    python -m bench.milter_bench --socket inet:8891@127.0.0.1 --pid 1234  # a peer

Writes bench/results/milter-FILTER-TIMESTAMP.json and prints a table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/milter_bench.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from bench.corpus import CORPORA, corpus, large_message
from milters.client.edits import parse_message
from milters.client.errors import MilterClientError
from milters.client.replies import StageReply
from milters.client.session import MilterSession
from milters.client.wire import SMFIC_ABORT
from milters.core.envelope import Envelope
from tests.support.processes import ManagedProcess, free_port

SCRIPTED = common.REPO_ROOT / "tests" / "protocol" / "filters" / "scripted.py"
FILTERS = ("checks", "scripted")
CLIENT_TIMEOUT = 60.0  # a 5 MB body under load can take a while; a hang must not


class PostfixSession(MilterSession):
    """A MilterSession whose ABORT leaves with the next write, as Postfix's does.

    Postfix's milter8_abort() only buffers SMFIC_ABORT (milter8_write_cmd() does not
    flush); it goes out with the next event's packets, or with QUIT. Flushing it
    alone, as MilterSession.abort() does, makes the next MAIL wait under Nagle for
    the filter's delayed ACK of that small packet: a 40 ms stall per message on a
    reused connection that Postfix does not have (measured: 25 msg/s instead of
    ~650 with --per-connection 10, client without TCP_NODELAY).
    """

    def abort(self) -> None:
        self._queue(SMFIC_ABORT, b"")
        self._in_transaction = False
        self._queue_id_known = False
        self._sender = self._rcpt = ""


# --- messages as the client sends them ---------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """A corpus message split once into what goes on the wire (no parsing per send)."""

    headers: tuple[tuple[str, bytes], ...]
    body: bytes
    size: int
    expect_reject: bool


def prepare(raw: bytes, expect_reject: bool = False) -> Prepared:
    headers, body = parse_message(raw)
    return Prepared(tuple(headers), body, len(raw), expect_reject)


def envelope(auth_user: str = "") -> Envelope:
    """The SMTP session every benchmark message claims to come from (`auth_user`:
    a SASL login, which makes a signing filter sign)."""
    return Envelope(
        auth_user=auth_user,
        client_ip="198.51.100.7",
        client_name="mail.sender.example",
        helo="mail.sender.example",
        mail_from="sender@sender.example",
        rcpt_to=["user@test.example"],
    )


def send_message(session: MilterSession, msg: Prepared) -> tuple[str, float]:
    """One transaction on an open, greeted session, ending with ABORT as Postfix does.

    Returns the outcome (the action that decided it, "continue" when none did) and
    the time of the first header write (perf_counter), for the `data` latency.
    """
    env = session.envelope
    first_header = time.perf_counter()
    outcome = "continue"
    steps: tuple[Callable[[], StageReply], ...] = (
        session.mail, lambda: session.rcpt(env.rcpt_to[0]), session.data)
    for step in steps:
        reply = step()
        if reply.final:
            session.abort()
            return reply.action, first_header
    first_header = time.perf_counter()
    decided = False
    for name, value in msg.headers:
        reply = session.header(name, value)
        if reply.final:
            outcome, decided = reply.action, True
            break
        if not reply.sent or reply.action == "skip":
            break  # negotiated away or SKIP: no further header goes out
    if not decided:
        content: tuple[Callable[[], StageReply], ...] = (
            session.eoh, lambda: session.body(msg.body), session.eom)
        for step in content:
            reply = step()
            if reply.final or reply.stage == "eom":
                outcome = reply.action
                break
    session.abort()
    return outcome, first_header


# --- load from client processes -------------------------------------------------------


NODELAYS = {"off": [False], "on": [True], "both": [False, True]}  # --nodelay choices


@dataclass(frozen=True)
class Load:
    """One measured run: where, what, how many connections, for how long."""

    socket: str
    corpus: str
    connections: int
    per_connection: int
    nodelay: bool
    duration: float | None  # seconds; or
    count: int | None  # messages in all
    judge: bool = True  # the filter has the bench tables: the planted 2 % must be rejected
    auth_user: str = ""  # a SASL login for every session (dkim signing)


@dataclass
class ClientResult:
    data_ms: list[float] = field(default_factory=list)
    txn_ms: list[float] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    unexpected: int = 0  # a reject we did not expect, or no reject where we did
    errors: list[str] = field(default_factory=list)
    sent_bytes: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0


def _client(index: int, load: Load, messages: Sequence[Prepared], barrier: Barrier,
            results: mp.Queue[ClientResult]) -> None:
    """Body of one client process: sessions back to back until the count or deadline."""
    res = ClientResult()
    mine = load.count // load.connections + (index < load.count % load.connections) \
        if load.count is not None else None
    barrier.wait()
    started = time.monotonic()
    cpu0 = common.own_cpu_seconds()
    deadline = started + load.duration if load.duration is not None else None
    done = 0
    cursor = index  # client i sends messages i, i+N, i+2N, ... of the corpus

    def more() -> bool:
        if mine is not None:
            return done < mine
        return deadline is not None and time.monotonic() < deadline

    while more():
        opened = time.perf_counter()
        try:
            session = PostfixSession(load.socket, timeout=CLIENT_TIMEOUT, tcp_nodelay=load.nodelay)
            session.envelope = envelope(load.auth_user)
            with session:
                for step in (session.connect, session.helo):
                    if step().final:
                        raise MilterClientError("the milter refused the connection")
                for n in range(load.per_connection):
                    if not more():
                        break
                    msg = messages[cursor % len(messages)]
                    cursor += load.connections
                    began = opened if n == 0 else time.perf_counter()
                    outcome, first_header = send_message(session, msg)
                    end = time.perf_counter()
                    res.data_ms.append((end - first_header) * 1000.0)
                    res.txn_ms.append((end - began) * 1000.0)
                    res.outcomes[outcome] = res.outcomes.get(outcome, 0) + 1
                    if load.judge:
                        res.unexpected += (outcome == "reject") != msg.expect_reject
                    res.sent_bytes += msg.size
                    done += 1
        except MilterClientError as exc:
            res.errors.append(str(exc))
            if len(res.errors) > 20:
                break  # the filter is gone; say so rather than spin
    res.wall_s = time.monotonic() - started
    res.cpu_s = common.own_cpu_seconds() - cpu0
    results.put(res)


def run_load(load: Load, messages: Sequence[Prepared], filter_pids: Sequence[int]
             ) -> dict[str, Any]:
    """Run `load` from `load.connections` client processes; summarise it."""
    ctx = mp.get_context("fork")  # the corpus is inherited, not pickled
    barrier = ctx.Barrier(load.connections + 1)
    results: mp.Queue[ClientResult] = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(i, load, messages, barrier, results))
             for i in range(load.connections)]
    for p in procs:
        p.start()
    barrier.wait()
    started = time.monotonic()
    fcpu0 = common.cpu_seconds(filter_pids)
    system0 = common.system_cpu_seconds()
    collected: list[ClientResult] = []
    limit = (load.duration or 0) + 300
    while len(collected) < len(procs):
        try:
            collected.append(results.get(timeout=limit))
        except queue.Empty:
            break
    wall = time.monotonic() - started
    fcpu = common.cpu_seconds(filter_pids) - fcpu0
    machine = common.system_cpu_seconds() - system0
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    if len(collected) < len(procs):
        raise RuntimeError(f"{len(procs) - len(collected)} client process(es) did not report")
    return summarise(load, collected, wall, fcpu, machine)


def summarise(load: Load, results: Sequence[ClientResult], wall: float,
              filter_cpu: float, machine_cpu: float) -> dict[str, Any]:
    data = [v for r in results for v in r.data_ms]
    txn = [v for r in results for v in r.txn_ms]
    outcomes: dict[str, int] = {}
    for r in results:
        for k, v in r.outcomes.items():
            outcomes[k] = outcomes.get(k, 0) + v
    # Throughput over the span the clients were busy (the last one to finish).
    busy = max((r.wall_s for r in results), default=wall) or wall
    client_cpu = sum(r.cpu_s for r in results)
    data_summary = common.latency_summary(data)
    cpu_per_msg = 1000.0 * filter_cpu / len(data) if data and filter_cpu else None
    return {
        "corpus": load.corpus,
        "connections": load.connections,
        "per_connection": load.per_connection,
        "client_nodelay": load.nodelay,
        "messages": len(data),
        "seconds": round(busy, 3),
        "msgs_per_s": round(len(data) / busy, 2) if busy else 0.0,
        "mbytes_per_s": round(sum(r.sent_bytes for r in results) / busy / 1e6, 3),
        "data_ms": data_summary,
        "txn_ms": common.latency_summary(txn),
        "stall_fraction": common.stall_fraction(data),
        "stall_suspected": common.stall_suspected(
            data_summary.get("p50"), cpu_per_msg, load.connections),
        "outcomes": outcomes,
        "unexpected_outcomes": sum(r.unexpected for r in results),
        "errors": [e for r in results for e in r.errors][:10],
        "error_count": sum(len(r.errors) for r in results),
        "filter_cpu_s": round(filter_cpu, 3),
        # 100 % = one core busy; compare with the number of CPUs and workers.
        "filter_cpu_pct": round(100.0 * filter_cpu / busy, 1) if busy else 0.0,
        "filter_cpu_ms_per_msg": None if cpu_per_msg is None else round(cpu_per_msg, 3),
        "client_cpu_pct": round(100.0 * client_cpu / busy, 1) if busy else 0.0,
        "client_cpu_pct_max_per_process": round(
            max((100.0 * r.cpu_s / r.wall_s for r in results if r.wall_s), default=0.0), 1),
        # The whole machine (100 % = one core): near cpus x 100 % means saturated.
        "machine_cpu_pct": round(100.0 * machine_cpu / busy, 1) if busy else 0.0,
        "cpus": os.cpu_count(),
    }


# --- memory -------------------------------------------------------------------------


def open_mid_message(socket_spec: str, msg: Prepared, n: int, nodelay: bool
                     ) -> list[PostfixSession]:
    """`n` sessions, each stopped after the whole body of `msg` went out, before EOM."""
    sessions = []
    for _ in range(n):
        s = PostfixSession(socket_spec, timeout=CLIENT_TIMEOUT, tcp_nodelay=nodelay)
        s.envelope = envelope()
        s.open()
        for step in (s.connect, s.helo, s.mail, lambda s=s: s.rcpt("user@test.example"),
                     s.data):
            step()
        for name, value in msg.headers:
            s.header(name, value)
        s.eoh()
        s.body(msg.body)
        # Body chunks need no reply, so the client holds them until EOM; push them
        # out now so the filter has the whole body while we look at its memory.
        s._flush("body")
        sessions.append(s)
    return sessions


def finish(sessions: Sequence[MilterSession]) -> list[float]:
    """EOM on each open session (ms each), then ABORT and QUIT."""
    times = []
    for s in sessions:
        t0 = time.perf_counter()
        s.eom()
        times.append((time.perf_counter() - t0) * 1000.0)
        s.abort()
        s.quit()
    return times


def measure_memory(socket_spec: str, root_pid: int, small: Prepared, large: Prepared,
                   small_n: int, large_n: int, nodelay: bool) -> dict[str, Any]:
    """Filter memory idle, with connections mid-message (small and 5 MB), per connection."""
    pids = common.process_tree(root_pid)
    out: dict[str, Any] = {}
    for label, msg, n in (("small", small, small_n), ("large", large, large_n)):
        common.wait_cpu_idle(pids)
        before = common.tree_memory(root_pid)
        sessions = open_mid_message(socket_spec, msg, n, nodelay)
        common.wait_cpu_idle(common.process_tree(root_pid))
        peak = common.tree_memory(root_pid)
        eom_ms = finish(sessions)
        common.wait_cpu_idle(common.process_tree(root_pid))
        after = common.tree_memory(root_pid)
        out[label] = {
            "message_bytes": msg.size,
            "connections": n,
            "before": _brief(before),
            "open_mid_message": _brief(peak),
            "after": _brief(after),
            "per_connection_pss_kib": round((peak["pss_mib"] - before["pss_mib"]) * 1024 / n, 1),
            "per_connection_rss_kib": round((peak["rss_mib"] - before["rss_mib"]) * 1024 / n, 1),
            # The peak RSS (high-water mark) rose by this much over the whole phase,
            # EOM processing included: what scanning the message cost at most.
            "hwm_growth_mib": round(after["hwm_mib"] - before["hwm_mib"], 2),
            "eom_ms": common.latency_summary(eom_ms),
        }
    return out


def _brief(mem: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mem.items() if k != "each"}


# --- the filter under test ---------------------------------------------------------------


def checks_config(port: int, workers: int, log_level: str, metrics_port: int = 0,
                  core: str = "libmilter") -> str:
    tables = common.TABLES_DIR
    # checks is 5th in chain order: its metrics port is metrics_listen + 4.
    metrics = f'metrics_listen = "127.0.0.1:{metrics_port - 4}"\n' if metrics_port else ""
    return (
        "[global]\n"
        f'log_level = "{log_level}"\nmilter_core = "{core}"\n{metrics}\n'
        "[checks]\n"
        f'socket = "inet:{port}@127.0.0.1"\n'
        f"workers = {workers}\n"
        f'header_checks = ["regexp:{tables / "header_checks"}"]\n'
        f'body_checks = ["regexp:{tables / "body_checks"}"]\n'
    )


def start_filter(name: str, workers: int, log_level: str, workdir: Path, metrics: bool = False,
                 core: str = "libmilter") -> tuple[ManagedProcess, str]:
    """Start filter `name` on a free port; return it, listening, and its socket spec.

    With `metrics`, checks exports Prometheus metrics (one more process: the exporter).
    """
    port = free_port()
    env = {"PYTHONPATH": str(common.REPO_ROOT), "SCRIPTED_MILTER_CORE": core}
    if name == "checks":
        cfg = workdir / "checks.toml"
        metrics_port = 0
        while metrics and metrics_port <= 1028:
            metrics_port = free_port()
        cfg.write_text(checks_config(port, workers, log_level, metrics_port, core))
        argv = [sys.executable, "-m", "milters", "run", "checks", "--config", str(cfg)]
    elif name == "scripted":
        argv = [sys.executable, str(SCRIPTED), str(port), "enforce", "tempfail", str(workers)]
    else:
        raise ValueError(f"unknown filter {name!r}; choose from {', '.join(FILTERS)}")
    proc = ManagedProcess(argv, port, env=env, cwd=common.REPO_ROOT)
    proc.wait_ready()
    common.wait_workers(proc.pid, workers + (1 if metrics and name == "checks" else 0))
    return proc, common.spec_for(port)


# --- the run --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = common.arg_parser("bench.milter_bench", __doc__)
    p.add_argument("--filter", choices=FILTERS, default="checks",
                   help="filter to start (checks: bench/tables rules; scripted: core only)")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4),
                   help="pre-forked worker processes of the filter")
    p.add_argument("--socket", help="benchmark an already running milter at this socket "
                   "(inet:PORT@HOST) instead of starting one")
    p.add_argument("--pid", type=int, help="with --socket: its main pid, for memory and CPU")
    p.add_argument("--corpus", choices=CORPORA, action="append",
                   help="corpus to send (repeat; default: all)")
    p.add_argument("--connections", type=int, action="append",
                   help="concurrent connections (repeat; default: 1 and 4)")
    p.add_argument("--per-connection", type=int, default=1,
                   help="messages per milter connection (Postfix: one connection per "
                        "SMTP session)")
    p.add_argument("--nodelay", choices=("off", "on", "both"), default="off",
                   help="TCP_NODELAY on the client socket (Postfix: off)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per case")
    p.add_argument("--count", type=int, help="messages per case instead of --duration")
    p.add_argument("--corpus-size", type=int, default=200, help="distinct messages per corpus")
    p.add_argument("--mem-connections", type=int, default=16,
                   help="connections held open mid-message (small message)")
    p.add_argument("--large-connections", type=int, default=4,
                   help="connections held open mid-message (5 MB message)")
    p.add_argument("--large-mb", type=float, default=5.0, help="size of the large message")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--log-level", default="info", help="the filter's log level ([global])")
    p.add_argument("--metrics", action="store_true",
                   help="checks with Prometheus metrics on ([global] metrics_listen)")
    p.add_argument("--milter-core", choices=("libmilter", "python"), default="libmilter",
                   help="[global] milter_core of the filter started")
    p.add_argument("--out", type=Path, help="JSON file (default: bench/results/...)")
    p.add_argument("--quiet", action="store_true", help="no table on stdout")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    corpora = args.corpus or list(CORPORA)
    conns = args.connections or [1, 4]
    nodelays = NODELAYS[args.nodelay]
    prepared = {name: [prepare(m.raw, m.expect_reject) for m in corpus(name, args.corpus_size)]
                for name in corpora}
    large = prepare(large_message(int(args.large_mb * 1024 * 1024)))
    small = prepared.get("small", [prepare(corpus("small", 1)[0].raw)])[0]

    label = "peer" if args.socket else args.filter
    result: dict[str, Any] = {
        "benchmark": "milter",
        "filter": label,
        "started": common.timestamp(),
        "host": common.host_info(),
        "settings": {
            "workers": None if args.socket else args.workers,
            "metrics": args.metrics,
            "per_connection": args.per_connection,
            "duration_s": None if args.count else args.duration,
            "count": args.count,
            "corpus_size": args.corpus_size,
            "corpus_mean_bytes": {k: round(sum(m.size for m in v) / len(v))
                                  for k, v in prepared.items()},
            "tables": {"header_checks": str(common.TABLES_DIR / "header_checks"),
                       "body_checks": str(common.TABLES_DIR / "body_checks")}
            if label == "checks" else None,
        },
        "cases": [],
    }
    with tempfile.TemporaryDirectory(prefix="milters-bench-") as tmp:
        proc: ManagedProcess | None = None
        try:
            if args.socket:
                socket_spec, root = args.socket, args.pid
            else:
                proc, socket_spec = start_filter(args.filter, args.workers, args.log_level,
                                                 Path(tmp), metrics=args.metrics,
                                                 core=args.milter_core)
                root = proc.pid
            result["socket"] = socket_spec

            if root:
                result["memory_idle_start"] = _brief(common.tree_memory(root))
            for name in corpora:
                for n in conns:
                    for nodelay in nodelays:
                        case = run_case(socket_spec, name, n, nodelay, prepared[name], root,
                                        per_connection=args.per_connection,
                                        duration=None if args.count else args.duration,
                                        count=args.count, judge=label == "checks")
                        result["cases"].append(case)
                        if not args.quiet:
                            print(_progress(case), file=sys.stderr, flush=True)
            if root and not args.no_memory:
                result["memory"] = measure_memory(
                    socket_spec, root, small, large, args.mem_connections,
                    args.large_connections, nodelays[0])
                result["memory_idle_end"] = _brief(common.tree_memory(root))
        finally:
            if proc is not None:
                log = proc.output()
                result["filter_log"] = {
                    "lines": log.count("\n"),
                    "tracebacks": log.count("Traceback"),
                    "errors": [line for line in log.splitlines() if " ERROR " in line][:10],
                }
                proc.cleanup()
    return result


def run_case(spec: str, corpus_name: str, connections: int, nodelay: bool,
             messages: Sequence[Prepared], root: int | None, *, per_connection: int = 1,
             duration: float | None = None, count: int | None = None,
             judge: bool = False) -> dict[str, Any]:
    """An untimed warm-up (caches, threads), then the measured Load; its summary.

    `root` is the filter's main pid (its process tree's CPU is measured), if known.
    """
    def pids() -> list[int]:
        return common.process_tree(root) if root else []

    warm = Load(spec, corpus_name, connections, per_connection, nodelay, None,
                max(8, 4 * connections))
    run_load(warm, messages, pids())
    load = Load(spec, corpus_name, connections, per_connection, nodelay, duration, count,
                judge=judge)
    return run_load(load, messages, pids())


def run_cases(label: str, spec: str, root: int, prepared: Mapping[str, Sequence[Prepared]],
              connections: Sequence[int], nodelays: Sequence[bool],
              duration: float) -> list[dict[str, Any]]:
    """run_case for every corpus x connections x nodelay, each reported on stderr."""
    cases = []
    for name, messages in prepared.items():
        for n in connections:
            for nodelay in nodelays:
                case = run_case(spec, name, n, nodelay, messages, root, duration=duration)
                cases.append(case)
                print(f"  {label:<16}{_progress(case)}", file=sys.stderr, flush=True)
    return cases


def _progress(case: dict[str, Any]) -> str:
    d = case["data_ms"]
    return (f"  {case['corpus']:<10} conns={case['connections']} "
            f"nodelay={'on' if case['client_nodelay'] else 'off'}: "
            f"{case['msgs_per_s']:.1f} msg/s, data p50 {d.get('p50', float('nan')):.2f} ms")


def table(result: dict[str, Any]) -> str:
    rows = []
    for c in result["cases"]:
        d, t = c["data_ms"], c["txn_ms"]
        rows.append([
            c["corpus"], c["connections"], "on" if c["client_nodelay"] else "off",
            c["messages"], c["msgs_per_s"], d.get("p50"), d.get("p95"), d.get("p99"),
            t.get("p50"), t.get("p99"), f"{c['filter_cpu_pct']:.0f}%",
            f"{c['client_cpu_pct']:.0f}%", f"{c['machine_cpu_pct']:.0f}%",
            c["outcomes"].get("reject", 0),
            c["error_count"], "STALL" if c["stall_suspected"] else "no",
        ])
    head = ["corpus", "conns", "nodelay", "msgs", "msg/s", "data p50", "p95", "p99",
            "txn p50", "p99", "filter cpu", "client cpu", "cpu all", "rejects", "errors",
            "stall"]
    workers = result["settings"]["workers"]
    lines = [f"milter benchmark: filter={result['filter']} workers={workers} "
             f"per_connection={result['settings']['per_connection']} "
             f"(latency in ms; data = first header to EOM reply)",
             common.format_table(head, rows)]
    mem = result.get("memory")
    if mem:
        lines.append("")
        idle = result.get("memory_idle_start", {})
        lines.append(f"memory: idle at start {idle.get('pss_mib')} MiB PSS "
                     f"({idle.get('rss_mib')} MiB RSS summed) in {idle.get('processes')} "
                     "processes")
        for key, m in mem.items():
            lines.append(
                f"  {m['connections']} connections mid-message ({key}, {m['message_bytes']} "
                f"bytes): {m['open_mid_message']['pss_mib']} MiB PSS, "
                f"{m['per_connection_pss_kib']} KiB PSS / {m['per_connection_rss_kib']} KiB "
                f"RSS per connection; peak RSS grew {m['hwm_growth_mib']} MiB; "
                f"EOM p50 {m['eom_ms'].get('p50')} ms")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    path = common.write_results(f"milter-{result['filter']}", result, args.out)
    if not args.quiet:
        print(table(result))
        print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
