"""ClamAV benchmark: the clamav filter and clamav-milter side by side, same clamd.

Starts a test clamd (tests/support/clamd.py: test signatures only, so the numbers
measure the milter and the INSTREAM transfer, not a 300 MB signature set), then
`milters run clamav` against it and, when installed, Debian's clamav-milter with
the equivalent configuration (AddHeader Replace, OnInfected Reject, OnFail Defer).
Both are driven with bench/milter_bench.py's client processes at 1 and 4
connections on both corpora, the client socket without TCP_NODELAY (as
Postfix's) and with it (which hides a milter's own end-of-message Nagle stall),
then memory per connection with connections held open mid-message, small and
5 MB (whole body sent, no EOM yet).

    python -m bench.clamav_bench                  # ~2.5 min
    python -m bench.clamav_bench --no-peer --duration 3

Writes bench/results/clamav-TIMESTAMP.json and prints a table per milter.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/clamav_bench.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from bench.corpus import CORPORA, corpus, large_message
from bench.milter_bench import NODELAYS, _brief, measure_memory, prepare, run_cases, table
from tests.support.clamd import Clamd, running_clamd
from tests.support.processes import ManagedProcess, ProcessFactory, free_port


def _start_ours(factory: ProcessFactory, d: Path, clamd: Clamd, workers: int,
                log_level: str) -> tuple[ManagedProcess, str]:
    port = free_port()
    cfg = d / "clamav.toml"
    cfg.write_text(
        f'[global]\nlog_level = "{log_level}"\n\n[clamav]\n'
        f'socket = "inet:{port}@127.0.0.1"\nworkers = {workers}\n'
        f'clamd_sockets = ["{clamd.tcp}"]\n'
    )
    return common.start_milters(factory, "clamav", cfg, port, workers), common.spec_for(port)


def _start_peer(factory: ProcessFactory, d: Path, clamd: Clamd
                ) -> tuple[ManagedProcess, str] | None:
    binary = shutil.which("clamav-milter") or "/usr/sbin/clamav-milter"
    if not os.access(binary, os.X_OK):
        return None
    port = free_port()
    cfg = d / "clamav-milter.conf"
    cfg.write_text(
        f"MilterSocket inet:{port}@127.0.0.1\nClamdSocket {clamd.tcp}\n"
        "Foreground yes\n"
        f"LogFile {d / 'clamav-milter.log'}\nTemporaryDirectory {d}\n"
        "AddHeader Replace\nOnInfected Reject\nOnFail Defer\n"
        "MaxFileSize 25M\nReadTimeout 120\n"
    )
    return factory.start([binary, "-c", str(cfg)], port), common.spec_for(port)


def measure(label: str, proc: ManagedProcess, spec: str, args: argparse.Namespace
            ) -> dict[str, Any]:
    """Every corpus x connection case, then memory, for one running milter."""
    prepared = {name: [prepare(m.raw) for m in corpus(name, args.corpus_size)]
                for name in args.corpus or CORPORA}
    result: dict[str, Any] = {
        "filter": label, "socket": spec, "cases": [],
        "settings": {"workers": args.workers if label == "clamav" else None,
                     "per_connection": 1},
        "memory_idle_start": _brief(common.tree_memory(proc.pid)),
    }
    result["cases"] = run_cases(label, spec, proc.pid, prepared, args.connections or [1, 4],
                                NODELAYS[args.nodelay], args.duration)
    if not args.no_memory:
        small = prepared.get("small", [prepare(corpus("small", 1)[0].raw)])[0]
        large = prepare(large_message(int(args.large_mb * 1024 * 1024)))
        result["memory"] = measure_memory(spec, proc.pid, small, large,
                                          args.mem_connections, args.large_connections, False)
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = common.arg_parser("bench.clamav_bench", __doc__)
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4),
                   help="pre-forked worker processes of the clamav filter")
    p.add_argument("--no-peer", action="store_true", help="skip clamav-milter")
    p.add_argument("--corpus", choices=CORPORA, action="append",
                   help="corpus to send (repeat; default: all)")
    p.add_argument("--connections", type=int, action="append",
                   help="concurrent connections (repeat; default: 1 and 4)")
    p.add_argument("--nodelay", choices=("off", "on", "both"), default="both",
                   help="TCP_NODELAY on the client socket (Postfix: off; on hides a "
                        "milter's own Nagle stall, as the issue's clamav-milter figures do)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per case")
    p.add_argument("--corpus-size", type=int, default=200, help="distinct messages per corpus")
    p.add_argument("--mem-connections", type=int, default=16,
                   help="connections held open mid-message (small message)")
    p.add_argument("--large-connections", type=int, default=4,
                   help="connections held open mid-message (5 MB message)")
    p.add_argument("--large-mb", type=float, default=5.0, help="size of the large message")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--log-level", default="warning", help="the filter's log level")
    p.add_argument("--out", type=Path, help="JSON file (default: bench/results/...)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = common.new_result("clamav", milters=[])
    # StreamMaxLength well above the large message: it must be scanned, not refused.
    stream_max = int((args.large_mb + 20) * 1024 * 1024)
    with running_clamd(stream_max) as clamd, \
            tempfile.TemporaryDirectory(prefix="milters-bench-") as tmp:
        factory = ProcessFactory()
        try:
            proc, spec = _start_ours(factory, Path(tmp), clamd, args.workers, args.log_level)
            result["milters"].append(measure("clamav", proc, spec, args))
            proc.cleanup()
            peer = None if args.no_peer else _start_peer(factory, Path(tmp), clamd)
            if peer is not None:
                result["milters"].append(measure("clamav-milter", *peer, args))
        finally:
            factory.close()
    common.report("clamav", result, map(table, result["milters"]), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
