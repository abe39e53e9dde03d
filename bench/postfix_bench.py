"""End-to-end benchmark through a real, private Postfix: what a milter costs at the MTA.

Uses tests/e2e/postfix.py's PostfixInstance (its own directory under /tmp, its
own ports, never the system instance; needs root) and sends the bench/corpus.py
corpora over SMTP from 1 and 4 concurrent sessions (separate processes), one
message per SMTP session as most senders do, so every message also opens a new
milter connection. Measured per case:

- acceptance rate: messages/s answered 250 after DATA (550 rejects by the rules
  count as answered; they are listed apart);
- `accept` latency: from the last byte of the message (".") to Postfix's reply,
  i.e. cleanup writing the queue file plus the whole milter dialogue;
- `session` latency: from TCP connect to that reply;
- CPU of Postfix's processes and of the filter.

Set-ups: (a) Postfix with no milter, (b) with the `checks` filter and the rule
tables in bench/tables/, optionally (c) with the core-only `scripted` test
filter. The headline is (b)/(a) msgs/s at 4 sessions (target >= 90 %) and the
p50 accept latency (b) adds to (a) (target < 5 ms). Delivery goes to Postfix's
discard(8) transport (or --deliver maildir), so local delivery is cheap but real:
qmgr still schedules every message. A cross-check with Postfix's own
smtp-source(1) gives msgs/s for the small-message sizes.

    python -m bench.postfix_bench              # ~1 minute, as root
    python -m bench.postfix_bench --scripted   # also the core-only filter

Writes bench/results/postfix-TIMESTAMP.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import queue
import re
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/postfix_bench.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from bench.corpus import CORPORA, corpus, small_message
from bench.milter_bench import start_filter
from tests.e2e.postfix import PostfixInstance, unavailable_reason
from tests.support.processes import LOOPBACK, ManagedProcess

SMTP_SOURCE = Path("/usr/sbin/smtp-source")
MAIL_FROM = "sender@sender.example"
RCPT_TO = "user@test.example"
HELO = "client.sender.example"
SMTP_TIMEOUT = 120.0

_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)


@dataclass(frozen=True)
class Wire:
    """A message ready for the DATA phase: dot-stuffed, CRLF, ending with CRLF.CRLF."""

    payload: bytes
    expect_reject: bool


def to_wire(raw: bytes, expect_reject: bool) -> Wire:
    # RFC 5321 §4.5.2: a line starting with "." gets another one.
    data = _LEADING_DOT.sub(b"..", raw)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return Wire(data + b".\r\n", expect_reject)


@dataclass
class SenderResult:
    accept_ms: list[float] = field(default_factory=list)
    session_ms: list[float] = field(default_factory=list)
    codes: dict[str, int] = field(default_factory=dict)
    unexpected: int = 0
    errors: list[str] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0


def send_one(port: int, wire: Wire) -> tuple[int, float, float]:
    """One SMTP session, one message. Returns (code after DATA, accept ms, session ms)."""
    started = time.perf_counter()
    smtp = smtplib.SMTP(timeout=SMTP_TIMEOUT)
    try:
        code, text = smtp.connect(LOOPBACK, port)
        if code != 220:
            raise smtplib.SMTPResponseException(code, text)
        for reply in (smtp.ehlo(HELO), smtp.mail(MAIL_FROM), smtp.rcpt(RCPT_TO)):
            if reply[0] not in (250, 251):
                return reply[0], float("nan"), float("nan")
        code, text = smtp.docmd("DATA")
        if code != 354:
            return code, float("nan"), float("nan")
        # smtplib's data() would re-scan the message; it is stuffed already.
        assert smtp.sock is not None
        smtp.sock.sendall(wire.payload)
        sent = time.perf_counter()
        code, text = smtp.getreply()
        done = time.perf_counter()
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()
        return code, (done - sent) * 1000.0, (done - started) * 1000.0
    finally:
        smtp.close()


def _sender(index: int, port: int, wires: Sequence[Wire], count: int, sessions: int,
            rejects: bool, barrier: Barrier, results: mp.Queue[SenderResult]) -> None:
    """Body of one sender process: `count` messages, one SMTP session each."""
    res = SenderResult()
    barrier.wait()
    started = time.monotonic()
    cpu0 = common.own_cpu_seconds()
    for n in range(count):
        wire = wires[(index + n * sessions) % len(wires)]
        try:
            code, accept_ms, session_ms = send_one(port, wire)
        except (smtplib.SMTPException, OSError) as exc:
            res.errors.append(f"{type(exc).__name__}: {exc}")
            continue
        res.codes[str(code)] = res.codes.get(str(code), 0) + 1
        # With the rule tables exactly the planted 2 % are rejected, else none.
        res.unexpected += (code == 550) != (rejects and wire.expect_reject)
        if code in (250, 550):
            res.accept_ms.append(accept_ms)
            res.session_ms.append(session_ms)
    res.wall_s = time.monotonic() - started
    res.cpu_s = common.own_cpu_seconds() - cpu0
    results.put(res)


def run_case(port: int, wires: Sequence[Wire], count: int, sessions: int,
             watch: dict[str, Sequence[int]], rejects: bool) -> dict[str, Any]:
    """`count` messages from `sessions` concurrent senders; CPU of the `watch` groups."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(sessions + 1)
    results: mp.Queue[SenderResult] = ctx.Queue()
    share = [count // sessions + (i < count % sessions) for i in range(sessions)]
    procs = [ctx.Process(target=_sender, args=(i, port, wires, share[i], sessions, rejects,
                                                barrier, results)) for i in range(sessions)]
    for p in procs:
        p.start()
    barrier.wait()
    cpu0 = {k: common.cpu_seconds(v) for k, v in watch.items()}
    system0 = common.system_cpu_seconds()
    started = time.monotonic()
    collected: list[SenderResult] = []
    while len(collected) < sessions:
        try:
            collected.append(results.get(timeout=600))
        except queue.Empty:
            break
    wall = time.monotonic() - started
    cpu = {k: common.cpu_seconds(v) - cpu0[k] for k, v in watch.items()}
    cpu["machine"] = common.system_cpu_seconds() - system0
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    if len(collected) < sessions:
        raise RuntimeError(f"{sessions - len(collected)} sender process(es) did not report")
    busy = max(r.wall_s for r in collected) or wall
    accept = [v for r in collected for v in r.accept_ms]
    codes: dict[str, int] = {}
    for r in collected:
        for k, v in r.codes.items():
            codes[k] = codes.get(k, 0) + v
    answered = len(accept)
    sender_cpu = sum(r.cpu_s for r in collected)
    # Postfix's processes come and go (smtpd, cleanup, discard): count them as
    # what the machine did beyond the filter and our senders.
    cpu["postfix"] = max(0.0, cpu["machine"] - cpu.get("filter", 0.0) - sender_cpu)
    return {
        "sessions": sessions,
        "messages": answered,
        "seconds": round(busy, 3),
        "msgs_per_s": round(answered / busy, 2) if busy else 0.0,
        "accepted_per_s": round(codes.get("250", 0) / busy, 2) if busy else 0.0,
        "accept_ms": common.latency_summary(accept),
        "session_ms": common.latency_summary(v for r in collected for v in r.session_ms),
        "stall_fraction": common.stall_fraction(accept),
        "codes": codes,
        "unexpected_outcomes": sum(r.unexpected for r in collected),
        "errors": [e for r in collected for e in r.errors][:10],
        "error_count": sum(len(r.errors) for r in collected),
        "cpu_pct": {k: round(100.0 * v / busy, 1) for k, v in cpu.items()},
        "cpu_ms_per_msg": {k: round(1000.0 * v / answered, 3) if answered else None
                           for k, v in cpu.items()},
        "sender_cpu_pct": round(100.0 * sender_cpu / busy, 1),
        "cpus": os.cpu_count(),
    }


def smtp_source(port: int, sessions: int, messages: int, message_file: Path) -> dict[str, Any]:
    """Postfix's own load generator as a cross-check: msgs/s only (no latencies).

    It sends `message_file` (-F), a corpus message: its built-in filler lines are
    all capitals and rightly trip the "Shouting" body rule.
    """
    argv = [str(SMTP_SOURCE), "-s", str(sessions), "-m", str(messages), "-F", str(message_file),
            "-f", MAIL_FROM, "-t", RCPT_TO, "-M", HELO, f"{LOOPBACK}:{port}"]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - started
    return {
        "sessions": sessions,
        "messages": messages,
        "message_bytes": message_file.stat().st_size,
        "seconds": round(wall, 3),
        "msgs_per_s": round(messages / wall, 2),
        "exit_status": proc.returncode,
        "stderr": proc.stderr.strip()[-500:],
    }


def wait_queue_drained(instance: PostfixInstance, timeout: float = 120.0) -> bool:
    """Poll until Postfix has delivered everything, so one case's deliveries do not
    compete with the next case's acceptance for CPU."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_files_in(instance, q) for q in ("maildrop", "incoming", "active",
                                                     "deferred")):
            return True
        time.sleep(0.1)
    return False


def _files_in(instance: PostfixInstance, name: str) -> bool:
    d = instance.queue_dir / name
    return d.is_dir() and any(p.is_file() for p in d.rglob("*"))


# --- the run --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = common.arg_parser("bench.postfix_bench", __doc__)
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4),
                   help="pre-forked workers of each filter")
    p.add_argument("--scripted", action="store_true",
                   help="also measure the core-only scripted filter")
    p.add_argument("--setup", action="append", choices=("none", "checks", "scripted"),
                   help="set-ups to measure (repeat; default: none, checks [, scripted])")
    p.add_argument("--milter", action="append", default=[], metavar="LABEL=SPEC",
                   help="also measure an already running milter, e.g. "
                        "opendkim=inet:127.0.0.1:8891 (repeat)")
    p.add_argument("--corpus", choices=CORPORA, action="append",
                   help="corpus to send (repeat; default: all)")
    p.add_argument("--sessions", type=int, action="append",
                   help="concurrent SMTP sessions (repeat; default: 1 and 4)")
    p.add_argument("--count", type=int, default=400, help="small messages per case")
    p.add_argument("--attachment-count", type=int, default=120,
                   help="attachment messages per case")
    p.add_argument("--warmup", type=int, default=20, help="untimed messages before each case")
    p.add_argument("--deliver", choices=("discard", "maildir"), default="discard",
                   help="where accepted mail goes")
    p.add_argument("--no-smtp-source", action="store_true", help="skip the smtp-source check")
    p.add_argument("--log-level", default="info", help="the filters' log level")
    p.add_argument("--keep", action="store_true", help="keep the Postfix directory")
    p.add_argument("--out", type=Path, help="JSON file (default: bench/results/...)")
    p.add_argument("--quiet", action="store_true", help="no table on stdout")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    corpora = args.corpus or list(CORPORA)
    sessions_list = args.sessions or [1, 4]
    counts = {"small": args.count, "attachment": args.attachment_count}
    wires = {name: [to_wire(m.raw, m.expect_reject) for m in corpus(name, 200)]
             for name in corpora}
    result = common.new_result(
        "postfix",
        settings={"workers": args.workers, "counts": counts, "deliver": args.deliver,
                  "warmup": args.warmup, "one_message_per_smtp_session": True},
        cases=[])
    reason = unavailable_reason()
    if reason:
        result["skipped"] = reason
        return result

    instance = PostfixInstance()
    filters: dict[str, ManagedProcess] = {}
    with tempfile.TemporaryDirectory(prefix="milters-bench-") as tmp:
        try:
            instance.setup()
            extra: dict[str, str] = {}
            if args.deliver == "discard":
                extra["virtual_transport"] = "discard"
            wanted = args.setup or ["none", "checks"] + (["scripted"] if args.scripted else [])
            setups: dict[str, str | None] = {"none": None} if "none" in wanted else {}
            sample = Path(tmp) / "sample.eml"  # smtp-source sends it line by line
            sample.write_bytes(small_message(0).raw.replace(b"\r\n", b"\n"))
            for name in (n for n in ("checks", "scripted") if n in wanted):
                proc, spec = start_filter(name, args.workers, args.log_level, Path(tmp))
                filters[name] = proc
                port = spec.split(":")[1].split("@")[0]
                setups[name] = f"inet:{LOOPBACK}:{port}"  # Postfix's spelling
            for item in args.milter:
                label, sep, spec = item.partition("=")
                if not sep:
                    raise SystemExit(f"--milter {item!r}: expected LABEL=inet:HOST:PORT")
                setups[label] = spec
            for setup, milter in setups.items():
                instance.set_milters([milter] if milter else [], **extra)
                # Only the checks filter has rules; the planted 2 % pass the others.
                rejects = setup == "checks"
                watch: dict[str, Sequence[int]] = {}
                if setup in filters:
                    watch["filter"] = common.process_tree(filters[setup].pid)
                for name in corpora:
                    for n in sessions_list:
                        run_case(instance.port, wires[name], args.warmup, n, {}, rejects)
                        wait_queue_drained(instance)
                        case = run_case(instance.port, wires[name], counts[name], n, watch,
                                        rejects)
                        case.update({"setup": setup, "corpus": name})
                        case["queue_drained"] = wait_queue_drained(instance)
                        result["cases"].append(case)
                        if not args.quiet:
                            print(f"  {setup:<8} {name:<10} sessions={n}: "
                                  f"{case['msgs_per_s']:.1f} msg/s, accept p50 "
                                  f"{case['accept_ms'].get('p50', float('nan')):.2f} ms",
                                  file=sys.stderr, flush=True)
                if not args.no_smtp_source and SMTP_SOURCE.exists() and "small" in corpora:
                    for n in sessions_list:
                        check = smtp_source(instance.port, n, args.count, sample)
                        check["setup"] = setup
                        result.setdefault("smtp_source", []).append(check)
                        wait_queue_drained(instance)
            result["headline"] = headline(result["cases"])
        finally:
            for name, proc in filters.items():
                log = proc.output()
                first = log.find("Traceback")
                result.setdefault("filter_logs", {})[name] = {
                    "lines": log.count("\n"), "tracebacks": log.count("Traceback"),
                    "first_traceback": log[max(0, first - 300):first + 2500] if first >= 0 else ""}
                proc.cleanup()
            result["postfix_dir"] = str(instance.root) if args.keep else None
            instance.destroy(keep=args.keep)
    return result


def headline(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """(filter)/(no milter) msgs/s and the p50 accept latency a filter adds."""
    base = {(c["corpus"], c["sessions"]): c for c in cases if c["setup"] == "none"}
    out: dict[str, Any] = {}
    for c in cases:
        ref = base.get((c["corpus"], c["sessions"]))
        if c["setup"] == "none" or ref is None or not ref["msgs_per_s"]:
            continue
        key = f"{c['setup']}/{c['corpus']}/{c['sessions']}"
        out[key] = {
            "throughput_ratio": round(c["msgs_per_s"] / ref["msgs_per_s"], 3),
            "p50_added_ms": round(c["accept_ms"]["p50"] - ref["accept_ms"]["p50"], 3),
            "p99_added_ms": round(c["accept_ms"]["p99"] - ref["accept_ms"]["p99"], 3),
        }
    return out


def table(result: dict[str, Any]) -> str:
    if result.get("skipped"):
        return f"postfix benchmark skipped: {result['skipped']}"
    rows = []
    for c in result["cases"]:
        a = c["accept_ms"]
        h = result.get("headline", {}).get(f"{c['setup']}/{c['corpus']}/{c['sessions']}")
        rows.append([
            c["setup"], c["corpus"], c["sessions"], c["messages"], c["msgs_per_s"],
            f"{100 * h['throughput_ratio']:.0f}%" if h else "-",
            a.get("p50"), a.get("p95"), a.get("p99"),
            f"{h['p50_added_ms']:+.2f}" if h else "-",
            c["session_ms"].get("p50"),
            f"{c['cpu_pct']['machine']:.0f}%", f"{c['cpu_pct']['postfix']:.0f}%",
            f"{c['cpu_pct']['filter']:.0f}%" if "filter" in c["cpu_pct"] else "-",
            c["codes"].get("550", 0), c["error_count"] + c["unexpected_outcomes"],
        ])
    head = ["milter", "corpus", "sess", "msgs", "msg/s", "vs none", "accept p50", "p95", "p99",
            "p50 added", "session p50", "cpu all", "postfix", "filter", "550", "errors"]
    lines = [f"postfix benchmark: one message per SMTP session, filter workers="
             f"{result['settings']['workers']}, delivery={result['settings']['deliver']} "
             "(accept = '.' to Postfix's reply, ms; cpu: 100% = one core, "
             f"{os.cpu_count()} cores)", common.format_table(head, rows)]
    checks = result.get("smtp_source")
    if checks:
        lines += ["", "smtp-source cross-check (small message 0 of the corpus): " + ", ".join(
            f"{c['setup']} s={c['sessions']}: {c['msgs_per_s']:.0f} msg/s"
            + ("" if c["exit_status"] == 0 else " (FAILED)") for c in checks)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    path = common.write_results("postfix", result, args.out)
    if not args.quiet:
        print(table(result))
        print(f"\nresults: {path}")
    return 2 if result.get("skipped") else 0


if __name__ == "__main__":
    raise SystemExit(main())
