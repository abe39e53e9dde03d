"""Our filters against their C peers through a real, private Postfix, in one run.

dmarc vs OpenDMARC, dkim signing vs OpenDKIM, clamav vs clamav-milter (both against
one test clamd), each alone behind the Postfix of tests/e2e/postfix.py, and Postfix
without any milter, at 1, 4, 16 and 64 concurrent SMTP sessions. Before measuring,
one probe per milter through Postfix proves it really evaluates (dmarc=pass and
dmarc=fail in its Authentication-Results, a DKIM-Signature that verifies, X-Virus-Status
Clean and EICAR refused); a milter that does not is an error, not a number.

Senders are separate processes, one message (bench/corpus.py's small corpus, ~2.3 KB)
per SMTP session, each session starting with XCLIENT so the milters see an outside
client (dmarc, clamav: 198.51.100.7 on the smtp port) or a submitter on the submission
service, whose daemon name ORIGINATING makes both dkim filters sign (203.0.113.10).
At each session count every set-up runs once, in turn (Postfix restarted between: a
fraction of a second), so a change in the machine's other load hits both sides alike.
bench/peers_setup.py says how each pair is configured to do the same work.

Per set-up and session count: msgs/s (answered after DATA, over the senders' busy
time), `accept` latency (the message's last byte to Postfix's reply) and its p50 added
versus Postfix alone, and CPU ms per message (common.tree_cpu_seconds, reaped children
included) of the milter's process tree, of Postfix's (the master's tree: smtpd,
cleanup, qmgr, discard), of clamd, and of the bench process (whose threads are the
DNS server OpenDMARC queries).

    python -m bench.peers_bench                           # root; ~3 minutes
    python -m bench.peers_bench --count 100 --sessions 1 4 --pair dmarc

Writes bench/results/peers-TIMESTAMP.json and prints the table; exits 1 when a
probe fails or a message gets an unexpected reply.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import queue
import smtplib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/peers_bench.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from bench.corpus import corpus
from bench.dns_front import cached_dns
from bench.peers_setup import (
    OUTSIDE,
    SUBMITTER,
    ProbeFailed,
    Side,
    Workspace,
    make_workspace,
    missing_peers,
    postfix_params,
    probe,
    remove_workspace,
    start_clamav_milter,
    start_opendkim,
    start_opendmarc,
    start_ours_clamav,
    start_ours_dkim,
    start_ours_dmarc,
    upstream_ar,
)
from bench.postfix_bench import Wire, to_wire, wait_queue_drained
from tests.e2e.postfix import PostfixInstance, unavailable_reason
from tests.support.clamd import running_clamd
from tests.support.namespace import DNS53
from tests.support.processes import LOOPBACK, ProcessFactory

PAIRS = ("dmarc", "dkim", "clamav")
RCPT_TO = "user@test.example"
SMTP_TIMEOUT = 120.0
CORPUS_SIZE = 200


@dataclass(frozen=True)
class Route:
    """How a set-up's mail reaches Postfix: port, XCLIENT attributes, envelope sender."""

    name: str            # smtp or submission
    submission: bool
    xclient: str
    helo: str
    mail_from: str


SMTP_ROUTE = Route("smtp", False, " ".join(f"{k}={v}" for k, v in OUTSIDE.items()),
                   OUTSIDE["HELO"], "sender@sender.example")
SUBMISSION_ROUTE = Route("submission", True,
                         " ".join(f"{k}={v}" for k, v in SUBMITTER.items()),
                         SUBMITTER["HELO"], "alice@example.org")
ROUTES = {"dmarc": SMTP_ROUTE, "dkim": SUBMISSION_ROUTE, "clamav": SMTP_ROUTE}


# --- senders ---------------------------------------------------------------------------


@dataclass
class SenderResult:
    accept_ms: list[float] = field(default_factory=list)
    codes: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0


def send_one(port: int, route: Route, wire: Wire) -> tuple[int, float]:
    """One SMTP session with XCLIENT, one message: (code after DATA, accept ms)."""
    smtp = smtplib.SMTP(timeout=SMTP_TIMEOUT)
    try:
        code, text = smtp.connect(LOOPBACK, port)
        if code != 220:
            raise smtplib.SMTPResponseException(code, text)
        # The milters see only the XCLIENT client (peers_setup.postfix_params).
        for reply in (smtp.docmd("XCLIENT", route.xclient), smtp.ehlo(route.helo)):
            if reply[0] not in (220, 250):
                return reply[0], math.nan
        for reply in (smtp.mail(route.mail_from), smtp.rcpt(RCPT_TO)):
            if reply[0] not in (250, 251):
                return reply[0], math.nan
        code, text = smtp.docmd("DATA")
        if code != 354:
            return code, math.nan
        assert smtp.sock is not None
        smtp.sock.sendall(wire.payload)  # stuffed and terminated already
        sent = time.perf_counter()
        code, text = smtp.getreply()
        done = time.perf_counter()
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()
        return code, (done - sent) * 1000.0
    finally:
        smtp.close()


def _sender(index: int, port: int, route: Route, wires: Sequence[Wire], count: int,
            step: int, max_seconds: float, barrier: Barrier,
            results: mp.Queue[SenderResult]) -> None:
    """One sender process: up to `count` messages, one session each, for at most
    `max_seconds` from the moment all senders are released together."""
    res = SenderResult()
    barrier.wait()
    started = time.monotonic()
    deadline = started + max_seconds
    cpu0 = common.own_cpu_seconds()
    for n in range(count):
        if time.monotonic() >= deadline:
            break
        try:
            code, accept_ms = send_one(port, route, wires[(index + n * step) % len(wires)])
        except (smtplib.SMTPException, OSError) as exc:
            res.errors.append(f"{type(exc).__name__}: {exc}")
            continue
        res.codes[str(code)] = res.codes.get(str(code), 0) + 1
        if code == 250:
            res.accept_ms.append(accept_ms)
    res.wall_s = time.monotonic() - started
    res.cpu_s = common.own_cpu_seconds() - cpu0
    results.put(res)


def send_load(port: int, route: Route, wires: Sequence[Wire], count: int, sessions: int,
              max_seconds: float, on_start: Any = None) -> list[SenderResult]:
    """`count` messages (at most `max_seconds`) from `sessions` sender processes;
    `on_start()` runs once they are all ready, just before they start."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(sessions + 1)
    results: mp.Queue[SenderResult] = ctx.Queue()
    share = [count // sessions + (i < count % sessions) for i in range(sessions)]
    procs = [ctx.Process(target=_sender, args=(i, port, route, wires, share[i], sessions,
                                                max_seconds, barrier, results))
             for i in range(sessions)]
    for p in procs:
        p.start()
    if on_start is not None:
        on_start()
    barrier.wait()
    collected: list[SenderResult] = []
    while len(collected) < sessions:
        try:
            collected.append(results.get(timeout=max_seconds + 600))
        except queue.Empty:
            break
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    if len(collected) < sessions:
        raise RuntimeError(f"{sessions - len(collected)} sender process(es) did not report")
    return collected


# --- one case ----------------------------------------------------------------------------


@dataclass
class SetUp:
    """What Postfix runs for a case: one milter (a Side) or none, and the route."""

    name: str                    # e.g. dmarc/ours, dmarc/opendmarc, none/smtp
    route: Route
    side: Side | None
    wires: list[Wire]


def cpu_roots(instance: PostfixInstance, setup: SetUp, clamd_pid: int) -> dict[str, int]:
    roots = {"postfix": instance.master_pid() or 0, "clamd": clamd_pid}
    if setup.side is not None:
        roots["filter"] = setup.side.process.pid
    return roots


def run_case(instance: PostfixInstance, setup: SetUp, sessions: int, count: int,
             max_seconds: float, warmup: int, clamd_pid: int,
             dns_queries: Callable[[], int]) -> dict[str, Any]:
    # Delivery to discard(8): delivering is not what we measure.
    instance.set_milters([setup.side.postfix_spec] if setup.side else [],
                         **postfix_params(instance, discard=True))
    port = instance.submission_port if setup.route.submission else instance.port
    # Warm up: smtpd processes forked, the milter's workers and caches in use.
    send_load(port, setup.route, setup.wires, max(warmup, 2 * sessions), sessions,
              max_seconds)
    wait_queue_drained(instance)
    roots = cpu_roots(instance, setup, clamd_pid)
    before: dict[str, float] = {}

    def start_clock() -> None:
        before.update({k: common.tree_cpu_seconds(pid) for k, pid in roots.items()})
        before["bench"] = common.own_cpu_seconds()  # the DNS server's threads
        before["dns"] = dns_queries()

    collected = send_load(port, setup.route, setup.wires, count, sessions, max_seconds,
                          start_clock)
    drained = wait_queue_drained(instance)
    # After the queue drained: Postfix's CPU includes delivering what was accepted.
    cpu = {k: common.tree_cpu_seconds(pid) - before[k] for k, pid in roots.items()}
    cpu["bench"] = common.own_cpu_seconds() - before["bench"]
    queries = dns_queries() - before["dns"]
    cpu["senders"] = sum(r.cpu_s for r in collected)
    busy = max(r.wall_s for r in collected)
    accept = [v for r in collected for v in r.accept_ms]
    codes: dict[str, int] = {}
    for r in collected:
        for k, v in r.codes.items():
            codes[k] = codes.get(k, 0) + v
    answered = sum(codes.values())
    return {
        "setup": setup.name,
        "pair": setup.side.pair if setup.side else None,
        "side": setup.side.label if setup.side else "none",
        "route": setup.route.name,
        "sessions": sessions,
        "messages": answered,
        "seconds": round(busy, 3),
        "msgs_per_s": round(len(accept) / busy, 2) if busy else 0.0,
        "accept_ms": common.latency_summary(accept),
        "stall_fraction": common.stall_fraction(accept),
        "codes": codes,
        "unexpected": answered - codes.get("250", 0),
        "errors": [e for r in collected for e in r.errors][:10],
        "error_count": sum(len(r.errors) for r in collected),
        "cpu_ms_per_msg": {k: round(1000.0 * v / answered, 3) if answered else None
                           for k, v in cpu.items()},
        "dns_queries_per_msg": round(queries / answered, 2) if answered else None,
        "queue_drained": drained,
    }


# --- the run -----------------------------------------------------------------------------


def dmarc_wires() -> list[Wire]:
    """The small corpus, each message with the border MTA's AR for its From domain:
    dkim=pass on even messages, dkim=fail on odd ones (policy applies to half)."""
    out = []
    for m in corpus("small", CORPUS_SIZE):
        domain = m.raw.split(b"\nFrom:", 1)[1].split(b"\n", 1)[0].rsplit(b"@", 1)[1]
        domain = domain.strip().rstrip(b">").decode()
        ar = upstream_ar(domain, "pass" if m.index % 2 == 0 else "fail")
        out.append(to_wire(ar + m.raw, False))
    return out


def plain_wires() -> list[Wire]:
    return [to_wire(m.raw, False) for m in corpus("small", CORPUS_SIZE)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = common.arg_parser("bench.peers_bench", __doc__)
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16, 64],
                   help="concurrent SMTP sessions")
    # CPU is read from /proc in clock ticks (10 ms per process and reading): a case
    # must run a couple of seconds of CPU to be read to a few percent; 600 messages
    # (0.5 s of our CPU) left runs 10 % apart.
    p.add_argument("--count", type=int, default=2000, help="messages per case (at most)")
    p.add_argument("--min-per-session", type=int, default=16,
                   help="at least this many messages per session in a case (64 sessions: "
                        "1024), so that the start and end of the senders weigh little")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="a case stops sending after this long (the stalling peers manage "
                        "about 11 msgs/s at 1 session)")
    p.add_argument("--warmup", type=int, default=10, help="untimed messages before a case")
    p.add_argument("--pair", choices=PAIRS, nargs="+", default=list(PAIRS),
                   help="which pairs to measure")
    p.add_argument("--workers", type=int, default=0,
                   help="workers of each of our filters (0: the filter's default)")
    p.add_argument("--log-level", default="info",
                   help="our filters' log level (info, the default, logs a line a message)")
    p.add_argument("--discovery", choices=("treewalk", "psl"), default="treewalk",
                   help="our dmarc's policy discovery (OpenDMARC uses the PSL)")
    p.add_argument("--milter-core", choices=("libmilter", "python"), default="python",
                   help="[global] milter_core of our filters")
    p.add_argument("--clamd-socket", choices=("unix", "tcp"), default="unix",
                   help="how both clamav milters reach clamd: its unix socket (the "
                        "Debian default; both then pass clamd a descriptor, FILDES) or TCP "
                        "(both stream, INSTREAM)")
    p.add_argument("--out", type=Path, help="JSON file (default: bench/results/...)")
    return p.parse_args(argv)


def start_sides(factory: ProcessFactory, ws: Workspace, args: argparse.Namespace,
                clamd: Any) -> list[Side]:
    sides: list[Side] = []
    if "dmarc" in args.pair:
        sides += [start_ours_dmarc(factory, ws, args.workers, args.log_level, args.discovery,
                                   args.milter_core),
                  start_opendmarc(factory, ws)]
    if "dkim" in args.pair:
        sides += [start_ours_dkim(factory, ws, args.workers, args.log_level, args.milter_core),
                  start_opendkim(factory, ws)]
    if "clamav" in args.pair:
        socket = clamd.unix if args.clamd_socket == "unix" else clamd.tcp
        sides += [start_ours_clamav(factory, ws, args.workers, args.log_level, socket,
                                    args.milter_core),
                  start_clamav_milter(factory, ws, socket)]
    return sides


def run(args: argparse.Namespace) -> dict[str, Any]:
    result = common.new_result("peers", settings={
        "sessions": args.sessions, "count": args.count, "max_seconds": args.max_seconds,
        "min_per_session": args.min_per_session,
        "warmup": args.warmup, "workers": args.workers or "default",
        "log_level": args.log_level, "discovery": args.discovery,
        "milter_core": args.milter_core, "delivery": "discard",
        "one_message_per_smtp_session": True}, probes={}, cases=[])
    wires = {"dmarc": dmarc_wires(), "plain": plain_wires()}
    ws = make_workspace()
    instance = PostfixInstance()
    factory = ProcessFactory()
    try:
        with cached_dns(DNS53, 53) as (dns, front), running_clamd() as clamd:
            for name, value in ws.records.items():
                dns.txt(name, value)
            instance.setup()
            sides = start_sides(factory, ws, args, clamd)
            for side in sides:  # Maildir delivery: the probes look at what arrived
                result["probes"][f"{side.pair}/{side.label}"] = probe(side, instance, ws)
                print(f"  probe {side.pair}/{side.label}: ok", file=sys.stderr, flush=True)
            routes = {ROUTES[p].name: ROUTES[p] for p in args.pair}
            setups = [SetUp(f"none/{r.name}", r, None, wires["plain"])
                      for r in routes.values()]
            setups += [SetUp(f"{s.pair}/{s.label}", ROUTES[s.pair], s,
                             wires["dmarc" if s.pair == "dmarc" else "plain"]) for s in sides]
            for n in args.sessions:
                for setup in setups:
                    count = max(args.count, args.min_per_session * n)
                    case = run_case(instance, setup, n, count, args.max_seconds,
                                    args.warmup, clamd.process.pid, lambda: front.queries)
                    result["cases"].append(case)
                    print(f"  {setup.name:<22} sessions={n:<3} {case['msgs_per_s']:7.1f} "
                          f"msgs/s  p50 {case['accept_ms'].get('p50', math.nan):7.2f} ms  "
                          f"cpu ms/msg {case['cpu_ms_per_msg']}", file=sys.stderr, flush=True)
            result["filter_logs"] = {f"{s.pair}/{s.label}": _log_summary(s) for s in sides}
    finally:
        factory.close()
        instance.destroy()
        remove_workspace(ws)
    result["comparison"] = comparison(result["cases"])
    return result


def _log_summary(side: Side) -> dict[str, Any]:
    log = side.process.output()
    first = log.find("Traceback")
    return {"lines": log.count("\n"), "tracebacks": log.count("Traceback"),
            "first_traceback": log[max(0, first - 300):first + 2000] if first >= 0 else ""}


def comparison(cases: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per pair and session count: ours against the peer, each against Postfix alone."""
    alone = {(c["route"], c["sessions"]): c for c in cases if c["side"] == "none"}
    ours = {(c["pair"], c["sessions"]): c for c in cases if c["side"] == "ours"}
    peers = {(c["pair"], c["sessions"]): c for c in cases
             if c["pair"] and c["side"] != "ours"}
    out = []
    for pair, n in sorted(ours.keys() & peers.keys(), key=lambda k: (PAIRS.index(k[0]), k[1])):
        mine, theirs = ours[(pair, n)], peers[(pair, n)]
        base = alone.get((mine["route"], n))
        row: dict[str, Any] = {
            "pair": pair, "peer": theirs["side"], "sessions": n,
            "msgs_ratio": _ratio(mine["msgs_per_s"], theirs["msgs_per_s"]),
            "cpu_ratio": _ratio(_cpu(mine, "filter"), _cpu(theirs, "filter")),
            "alone_msgs_per_s": base["msgs_per_s"] if base else None,
            "alone_postfix_cpu_ms": _cpu(base, "postfix"),
        }
        for side, c in (("ours", mine), ("peer", theirs)):
            row.update({
                f"{side}_messages": c["messages"], f"{side}_msgs_per_s": c["msgs_per_s"],
                f"{side}_p50_added_ms": _p50_added(c, base),
                f"{side}_filter_cpu_ms": _cpu(c, "filter"),
                f"{side}_postfix_cpu_ms": _cpu(c, "postfix"),
                f"{side}_clamd_cpu_ms": _cpu(c, "clamd"),
                f"{side}_bench_cpu_ms": _cpu(c, "bench"),
                f"{side}_dns_queries": c["dns_queries_per_msg"],
            })
        out.append(row)
    return out


def _cpu(case: dict[str, Any] | None, key: str) -> float | None:
    value = case["cpu_ms_per_msg"].get(key) if case else None
    return None if value is None else float(value)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def _p50_added(case: dict[str, Any], base: dict[str, Any] | None) -> float | None:
    if base is None or "p50" not in case["accept_ms"] or "p50" not in base["accept_ms"]:
        return None
    return round(case["accept_ms"]["p50"] - base["accept_ms"]["p50"], 3)


def table(result: dict[str, Any]) -> str:
    rows = []
    for c in result["comparison"]:
        rows.append([
            c["pair"], c["peer"], c["sessions"], c["ours_msgs_per_s"], c["peer_msgs_per_s"],
            f"{c['msgs_ratio']:.2f}x" if c["msgs_ratio"] is not None else "-",
            _num(c["ours_p50_added_ms"]), _num(c["peer_p50_added_ms"]),
            _num(c["ours_filter_cpu_ms"]), _num(c["peer_filter_cpu_ms"]),
            f"{c['cpu_ratio']:.2f}x" if c["cpu_ratio"] is not None else "-",
            f"{_num(c['ours_postfix_cpu_ms'])} / {_num(c['peer_postfix_cpu_ms'])}"
            f" / {_num(c['alone_postfix_cpu_ms'])}",
        ])
    head = ["filter", "peer", "sess", "ours msg/s", "peer msg/s", "ours/peer",
            "p50 added ours", "peer", "filter cpu ms ours", "peer", "ours/peer",
            "postfix cpu ms ours / peer / alone"]
    alone = [[c["route"], c["sessions"], c["messages"], c["msgs_per_s"],
              c["accept_ms"].get("p50"), c["cpu_ms_per_msg"].get("postfix"),
              c["cpu_ms_per_msg"].get("senders")]
             for c in result["cases"] if c["side"] == "none"]
    extra = []
    for c in result["comparison"]:
        if c["pair"] == "clamav":
            extra.append(f"clamav s={c['sessions']}: clamd cpu ms/msg ours "
                         f"{_num(c['ours_clamd_cpu_ms'])}, peer {_num(c['peer_clamd_cpu_ms'])}")
        if c["pair"] == "dmarc":
            extra.append(f"dmarc s={c['sessions']}: DNS queries per message ours "
                         f"{_num(c['ours_dns_queries'])}, peer {_num(c['peer_dns_queries'])}; "
                         f"bench process (DNS server) cpu ms/msg ours "
                         f"{_num(c['ours_bench_cpu_ms'])}, peer {_num(c['peer_bench_cpu_ms'])}")
    bad = [f"{c['setup']} s={c['sessions']}: codes {c['codes']}, errors {c['errors'][:2]}"
           for c in result["cases"] if c["unexpected"] or c["error_count"]]
    bad += [f"{name}: {log['tracebacks']} traceback(s) in its output"
            for name, log in result.get("filter_logs", {}).items() if log["tracebacks"]]
    return "\n".join([
        "peers through a private Postfix: one ~2.3 KB message per SMTP session (XCLIENT), "
        "delivery to discard; p50 added = accept p50 minus Postfix alone's; CPU ms per "
        "message of each process tree (reaped children included)",
        common.format_table(head, rows), "",
        "Postfix alone:",
        common.format_table(["route", "sess", "msgs", "msg/s", "accept p50 ms",
                             "postfix cpu ms", "senders cpu ms"], alone),
        *(["", *extra] if extra else []),
        *(["", "UNEXPECTED:", *bad] if bad else []),
    ])


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reason = unavailable_reason()
    missing = missing_peers()
    if reason or missing:
        print(f"peers_bench: {reason or 'not installed: ' + ', '.join(missing)}",
              file=sys.stderr)
        return 2
    try:
        result = run(args)
    except ProbeFailed as exc:
        print(f"peers_bench: a milter does not really evaluate: {exc}", file=sys.stderr)
        return 1
    path = common.write_results("peers", result, args.out)
    print(table(result))
    print(f"\nresults: {path}")
    clean = not any(c["unexpected"] or c["error_count"] for c in result["cases"]) and not any(
        log["tracebacks"] for log in result["filter_logs"].values())
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
