"""The whole suite under load: all five filters behind a private Postfix.

The set-up of tests/e2e/test_suite_e2e.py (tests/e2e/suite.py: one config, `milters
run NAME` per filter in chain order dkim, spf, dmarc, clamav, checks, for
smtpd_milters and non_smtpd_milters), a test clamd and the loopback DNS server.
Senders in separate processes, one message per SMTP session with XCLIENT as an
outside MTA whose address the sender domain's SPF lists (the milters are disabled
for the loopback connection before XCLIENT with smtpd_milter_maps, so each message
has one dialogue per socket, as at a real MX); every message is DKIM
signed by that domain (dkimpy, beforehand), so each filter does its full work:
dkim verifies, spf passes, dmarc passes on both, clamav scans, checks runs its rule.
One message in 40 is refused on purpose (header_checks REJECT), counted apart.

Measured: msgs/s accepted and msgs/s end to end (first connection to the last
delivery in the Maildir), p50/p99 per filter from each filter's `ms=` log lines,
peak RSS and PSS of each filter's process tree (polled every 0.1 s), and a scan of
every filter's output and Postfix's log for errors and tracebacks.

    python -m bench.suite_bench [--count 3000] [--sessions 4] [--workers 2]
        [--deployment sockets|chain|none|compare]   # root only

`--deployment chain` serves the filters on the one chain socket (`[chain]`, one
milter dialogue per message); `none` is Postfix without milters; `compare` runs
the three one after the other in the same run, at each `--sessions` value given
(e.g. `--sessions 4 16`), and prints msgs/s side by side with the ratios.

Writes bench/results/suite-TIMESTAMP.json and prints a table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import re
import smtplib
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/suite_bench.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from tests.e2e.postfix import PostfixInstance, unavailable_reason
from tests.e2e.suite import (
    ALIGNED,
    ALIGNED_HELO,
    ALIGNED_IP,
    CHAIN,
    RCPT,
    dkim_sign,
    make_keys,
    publish,
    start_suite,
)
from tests.support.clamd import running_clamd
from tests.support.dns import dns_server
from tests.support.processes import LOOPBACK, ProcessFactory

VARIANTS = 40  # the last variant matches the header_checks REJECT rule: 1 in 40
_MS = re.compile(r"\bfilter=([\w-]+) stage=\w+ .* ms=([\d.]+)$", re.MULTILINE)
_BAD = re.compile(r"Traceback|\b(ERROR|CRITICAL)\b|\berror\b", re.IGNORECASE)
_POSTFIX_BAD = re.compile(r"\b(warning|error|fatal|panic):")


def messages(keydir: Path) -> list[tuple[bytes, bool]]:
    """(signed message, expect reject) variants, about 2 KB each."""
    out = []
    para = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod "
            "tempor incididunt ut labore et dolore magna aliqua.\r\n")
    for i in range(VARIANTS):
        reject = i == VARIANTS - 1
        subject = "you win a prize" if reject else f"quarterly numbers {i}"
        raw = (f"From: Alice <alice@{ALIGNED}>\r\nTo: {RCPT}\r\nSubject: {subject}\r\n"
               f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <bench-{i}@{ALIGNED}>\r\n"
               "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
               + para * 16).encode()
        out.append((dkim_sign(raw, ALIGNED, "sel", keydir / ALIGNED / "sel.private"), reject))
    return out


def _sender(port: int, wires: Sequence[tuple[bytes, bool]], start: int,
            count: int, step: int, results: mp.Queue[dict[str, Any]],
            filtered: bool) -> None:
    codes: dict[str, int] = {}
    unexpected = 0
    errors: list[str] = []
    for n in range(count):
        raw, reject = wires[(start + n * step) % len(wires)]
        reject = reject and filtered  # Postfix alone refuses nothing
        try:
            smtp = smtplib.SMTP(LOOPBACK, port, timeout=120)
            try:
                smtp.ehlo("bench")
                smtp.docmd("XCLIENT", f"ADDR={ALIGNED_IP} NAME={ALIGNED_HELO} "
                                      f"HELO={ALIGNED_HELO}")
                smtp.ehlo(ALIGNED_HELO)
                smtp.mail(f"alice@{ALIGNED}")
                smtp.rcpt(RCPT)
                code = smtp.data(raw)[0]
            except smtplib.SMTPDataError as exc:
                code = exc.smtp_code
            finally:
                smtp.close()
        except (smtplib.SMTPException, OSError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        codes[str(code)] = codes.get(str(code), 0) + 1
        unexpected += (code == 550) != reject or code not in (250, 550)
    results.put({"codes": codes, "unexpected": unexpected, "errors": errors})


class MemoryWatch(threading.Thread):
    """Peak RSS and PSS (MiB) of each filter's process tree, polled."""

    def __init__(self, roots: dict[str, int], interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.roots = roots
        self.interval = interval
        self.peak: dict[str, dict[str, float]] = {n: {"rss_mib": 0.0, "pss_mib": 0.0}
                                                 for n in roots}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(self.interval)

    def sample(self) -> None:
        for name, pid in self.roots.items():
            m = common.tree_memory(pid)
            peak = self.peak[name]
            peak["rss_mib"] = max(peak["rss_mib"], m["rss_mib"])
            peak["pss_mib"] = max(peak["pss_mib"], m["pss_mib"])
            peak["processes"] = max(peak.get("processes", 0), m["processes"])


def filter_latencies(output: str) -> dict[str, dict[str, float | int]]:
    """p50/p99 of each filter's `ms=` log lines (the chain logs one per step)."""
    values: dict[str, list[float]] = {}
    for m in _MS.finditer(output):
        values.setdefault(m.group(1), []).append(float(m.group(2)))
    return {name: common.latency_summary(v) for name, v in values.items()}


def run(args: argparse.Namespace, deployment: str = "sockets",
        sessions: int | None = None) -> dict[str, Any]:
    sessions = sessions or args.sessions[0]
    factory = ProcessFactory()
    instance = PostfixInstance()
    work = Path(tempfile.mkdtemp(prefix="milters-suite-bench-"))
    try:
        instance.setup()
        keys = make_keys(work / "keys")
        with dns_server() as dns, running_clamd() as clamd:
            publish(dns, keys)
            filtered = deployment != "none"
            if filtered:
                suite = start_suite(factory, work, keys, dns, clamd.unix, workers=args.workers,
                                    dns_timeout=2.0, clamd_timeout=5.0,
                                    chain=deployment == "chain", core=args.milter_core)
                # Postfix opens a milter dialogue for the loopback connection and
                # another after XCLIENT; a real MX has one per session, for the
                # outside client: disable the milters for loopback clients.
                maps = work / "milter_maps"
                maps.write_text("127.0.0.0/8 DISABLE\n")
                instance.set_milters(suite.sockets, suite.sockets,
                                     smtpd_milter_maps=f"cidr:{maps}")
                processes = suite.processes
            else:
                instance.set_milters([], [])
                processes = {}
            instance.reset()
            wires = messages(work / "keys")
            expected_rejects = sum(
                wires[i % len(wires)][1] for i in range(args.count)) if filtered else 0
            expected_delivered = args.count - expected_rejects
            watch = MemoryWatch({n: p.pid for n, p in processes.items()})
            watch.start()
            # CPU per message of each side: our filters, clamd, Postfix itself.
            cpu_roots = {**{n: p.pid for n, p in processes.items()},
                         "clamd": clamd.process.pid, "postfix": instance.master_pid() or 0}
            cpu_before = {n: common.tree_cpu_seconds(pid) for n, pid in cpu_roots.items()}
            ctx = mp.get_context("fork")
            results: mp.Queue[dict[str, Any]] = ctx.Queue()
            share = [args.count // sessions + (i < args.count % sessions)
                     for i in range(sessions)]
            started = time.monotonic()
            procs = [ctx.Process(target=_sender, args=(instance.port, wires, i, share[i],
                                                        sessions, results, filtered))
                     for i in range(sessions)]
            for p in procs:
                p.start()
            collected: list[dict[str, Any]] = []
            while len(collected) < sessions:
                try:
                    collected.append(results.get(timeout=900))
                except queue.Empty:
                    break
            accepted_s = time.monotonic() - started
            for p in procs:
                p.join(timeout=30)
            delivered = instance.wait_delivered(expected_delivered, timeout=300)
            end_to_end_s = time.monotonic() - started
            cpu_ms = {n: round((common.tree_cpu_seconds(pid) - cpu_before[n]) * 1000
                               / args.count, 2) for n, pid in cpu_roots.items()}
            watch.done.set()
            watch.join()
            codes: dict[str, int] = {}
            for r in collected:
                for k, v in r["codes"].items():
                    codes[k] = codes.get(k, 0) + v
            outputs = {n: p.output() for n, p in processes.items()}
            bad_lines = {n: [ln for ln in out.splitlines() if _BAD.search(ln)][:5]
                         for n, out in outputs.items()}
            postfix_bad = [ln for ln in instance.log_text().splitlines()
                           if _POSTFIX_BAD.search(ln)][:5]
            return {
                "deployment": deployment,
                "messages": args.count,
                "sessions": sessions,
                "workers": args.workers,
                "milter_core": args.milter_core,
                "codes": codes,
                "unexpected_outcomes": sum(r["unexpected"] for r in collected),
                "sender_errors": [e for r in collected for e in r["errors"]][:10],
                "delivered": len(delivered),
                "expected_delivered": expected_delivered,
                "accepted_seconds": round(accepted_s, 2),
                "accepted_msgs_per_s": round(args.count / accepted_s, 1),
                "end_to_end_seconds": round(end_to_end_s, 2),
                "end_to_end_msgs_per_s": round(len(delivered) / end_to_end_s, 1),
                "filter_ms": filter_latencies("\n".join(outputs.values())),
                "peak_memory": watch.peak,
                "cpu_ms_per_message": cpu_ms,
                "filter_error_lines": bad_lines,
                "postfix_problem_lines": postfix_bad,
                "host": common.host_info(),
            }
    finally:
        factory.close()
        instance.destroy()


def table(result: dict[str, Any]) -> str:
    rows = []
    for name in CHAIN:
        lat = result["filter_ms"].get(name, {})
        unit = "chain" if result["deployment"] == "chain" else name
        mem = result["peak_memory"].get(unit, {})
        rows.append([name, lat.get("count"), lat.get("p50"), lat.get("p99"),
                     mem.get("rss_mib"), mem.get("pss_mib"), mem.get("processes"),
                     len(result["filter_error_lines"].get(unit, []))])
    head = (f"{result['deployment']}: {result['messages']} messages, "
            f"{result['sessions']} sessions, "
            f"{result['workers']} workers per process: accepted {result['accepted_msgs_per_s']} "
            f"msgs/s, end to end {result['end_to_end_msgs_per_s']} msgs/s "
            f"({result['delivered']}/{result['expected_delivered']} delivered in "
            f"{result['end_to_end_seconds']} s); SMTP codes {result['codes']}, "
            f"unexpected {result['unexpected_outcomes']}, sender errors "
            f"{len(result['sender_errors'])}, Postfix warnings/errors "
            f"{len(result['postfix_problem_lines'])}\n"
            "CPU ms per message: " + ", ".join(
                f"{n} {v}" for n, v in result["cpu_ms_per_message"].items()) + "\n")
    if result["deployment"] == "none":
        return head
    return head + common.format_table(
        ["filter", "msgs logged", "p50 ms", "p99 ms", "peak RSS MiB", "peak PSS MiB",
         "processes", "error lines"], rows)


def comparison(results: list[dict[str, Any]]) -> str:
    """msgs/s end to end per deployment and session count, with the ratios the
    issue asks about (chain / five sockets, chain / Postfix alone)."""
    by = {(r["deployment"], r["sessions"]): r["end_to_end_msgs_per_s"] for r in results}
    rows = []
    for n in sorted({r["sessions"] for r in results}):
        sockets, chain, none = (by.get((d, n)) for d in ("sockets", "chain", "none"))
        rows.append([n, sockets, chain, none,
                     round(chain / sockets, 2) if chain and sockets else None,
                     round(chain / none, 2) if chain and none else None])
    return common.format_table(["sessions", "sockets msgs/s", "chain msgs/s",
                                "Postfix alone msgs/s", "chain/sockets", "chain/alone"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--sessions", type=int, nargs="+", default=[4])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--deployment", choices=("sockets", "chain", "none", "compare"),
                        default="sockets")
    parser.add_argument("--milter-core", choices=("libmilter", "python"), default="libmilter",
                        help="[global] milter_core of every filter")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"suite_bench: {reason}", file=sys.stderr)
        return 2
    deployments = (("sockets", "chain", "none") if args.deployment == "compare"
                   else (args.deployment,))
    results = [run(args, d, n) for n in args.sessions for d in deployments]
    path = common.write_results("suite", {"runs": results}, args.out)
    for result in results:
        print(table(result))
    if len(results) > 1:
        print(comparison(results))
    print(f"results: {path}")
    clean = all(not r["unexpected_outcomes"] and not r["sender_errors"]
                and r["delivered"] == r["expected_delivered"]
                and not any(r["filter_error_lines"].values())
                and not r["postfix_problem_lines"] for r in results)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
