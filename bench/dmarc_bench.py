"""DMARC benchmark: the dmarc filter and OpenDMARC side by side, same messages, same DNS.

Policy records for the corpus's From domains (p=reject, quarantine, none with
sp=reject, one domain without a record) are served by the loopback DNS server
of the tests, bound to 127.0.0.153:53 so that OpenDMARC (which only reads
/etc/resolv.conf) can use it from a private mount namespace (`unshare -m`, a
resolv.conf bind-mounted over the real one; needs root). Every message carries
an Authentication-Results field from a trusted upstream (`mx.test.example`):
half an aligned dkim=pass, half a dkim=fail, and spf=none for the MAIL FROM
domain, so both milters evaluate policy and alignment and neither verifies
signatures nor evaluates SPF itself; both write their history. Driven by bench/milter_bench.py's
client processes at 1 and 4 connections, client socket without and with
TCP_NODELAY.

    python -m bench.dmarc_bench                  # ~1 min
    python -m bench.dmarc_bench --no-peer --duration 3

Writes bench/results/dmarc-TIMESTAMP.json and prints a table per milter.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/dmarc_bench.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from bench.corpus import corpus
from bench.milter_bench import NODELAYS, Prepared, _brief, prepare, run_cases, table
from tests.support.dns import LoopbackDNS, dns_server
from tests.support.namespace import DNS53, private_resolver_argv, private_resolver_usable
from tests.support.processes import ManagedProcess, ProcessFactory, free_port

AUTHSERV = "mx.test.example"
DNS_ADDRESS = DNS53
RECORDS = {
    "_dmarc.example.org": "v=DMARC1; p=reject; rua=mailto:dmarc@example.org",
    "_dmarc.example.net": "v=DMARC1; p=quarantine",
    "_dmarc.example.com": "v=DMARC1; p=none; sp=reject",
    "_dmarc.example.co.jp": "v=DMARC1; p=reject; adkim=s",
}


@contextmanager
def dns_on_53() -> Iterator[LoopbackDNS]:
    with dns_server(DNS_ADDRESS, 53) as server:
        for name, value in RECORDS.items():
            server.txt(name, value)
        yield server


def messages(size: int) -> list[Prepared]:
    """The small corpus, each message with a trusted dkim result for its From domain."""
    out = []
    for m in corpus("small", size):
        found = re.search(rb"^From:.*@([A-Za-z0-9.-]+)>", m.raw, re.M)
        domain = found.group(1).decode() if found else "example.org"
        result = "pass" if m.index % 2 == 0 else "fail"
        ar = (f"Authentication-Results: {AUTHSERV}; dkim={result} header.d={domain} "
              "header.s=sel; spf=none smtp.mailfrom=sender.example\r\n").encode()
        out.append(prepare(ar + m.raw))
    return out


def start_ours(factory: ProcessFactory, d: Path, workers: int, log_level: str,
               discovery: str, keep_history: bool = True,
               fsync: bool = False) -> tuple[ManagedProcess, str]:
    port = free_port()
    history = f"{d}/history-{port}.sqlite" if keep_history else ""
    cfg = d / f"dmarc-{port}.toml"
    cfg.write_text(
        f'[global]\nauthserv_id = "{AUTHSERV}"\nlog_level = "{log_level}"\n'
        f'[global.dns]\nnameservers = ["{DNS_ADDRESS}"]\nport = 53\n'
        f'[dmarc]\nsocket = "inet:{port}@127.0.0.1"\nworkers = {workers}\n'
        f'discovery = "{discovery}"\nhistory = "{history}"\n'
        f"history_fsync = {'true' if fsync else 'false'}\n")
    return common.start_milters(factory, "dmarc", cfg, port, workers), common.spec_for(port)


def start_opendmarc(factory: ProcessFactory, d: Path) -> tuple[ManagedProcess, str] | None:
    if not private_resolver_usable("opendmarc"):
        print("opendmarc, unshare or root missing: OpenDMARC skipped", file=sys.stderr)
        return None
    import publicsuffixlist

    port = free_port()
    (d / "ignore").write_text("")
    psl = Path(publicsuffixlist.__file__).parent / "public_suffix_list.dat"
    (d / "opendmarc.conf").write_text(
        f"Socket inet:{port}@127.0.0.1\nAuthservID {AUTHSERV}\n"
        f"TrustedAuthservIDs {AUTHSERV}\nPublicSuffixList {psl}\nSPFSelfValidate false\n"
        f"IgnoreHosts {d}/ignore\nRejectFailures false\nSyslog false\nBackground false\n"
        f"HistoryFile {d}/opendmarc.dat\n")
    proc = factory.start(
        private_resolver_argv(d, DNS_ADDRESS, f"opendmarc -f -c {d}/opendmarc.conf"), port)
    return proc, common.spec_for(port)


def measure(label: str, proc: ManagedProcess, spec: str, prepared: Sequence[Prepared],
            args: argparse.Namespace, workers: int | None) -> dict[str, Any]:
    result: dict[str, Any] = {
        "filter": label, "socket": spec, "cases": [],
        "settings": {"workers": workers, "per_connection": 1},
        "memory_idle_start": _brief(common.tree_memory(proc.pid)),
    }
    result["cases"] = run_cases(label, spec, proc.pid, {"small": prepared},
                                args.connections or [1, 4], NODELAYS[args.nodelay],
                                args.duration)
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = common.arg_parser("bench.dmarc_bench", __doc__)
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4),
                   help="pre-forked worker processes of the dmarc filter")
    p.add_argument("--no-peer", action="store_true", help="skip OpenDMARC")
    p.add_argument("--no-history", action="store_true",
                   help="run our filter without its history (what the store costs)")
    p.add_argument("--history-fsync", action="store_true",
                   help="history_fsync = true (fdatasync of the crash journal per message)")
    p.add_argument("--discovery", choices=("treewalk", "psl"), action="append",
                   help="our discovery method(s) (default: treewalk)")
    p.add_argument("--connections", type=int, action="append",
                   help="concurrent connections (repeat; default: 1 and 4)")
    p.add_argument("--nodelay", choices=("off", "on", "both"), default="both",
                   help="TCP_NODELAY on the client socket (Postfix: off)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per case")
    p.add_argument("--corpus-size", type=int, default=200, help="distinct messages")
    p.add_argument("--log-level", default="warning", help="the filter's log level")
    p.add_argument("--out", type=Path, help="JSON file (default: bench/results/...)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = common.new_result("dmarc", milters=[])
    prepared = messages(args.corpus_size)
    with dns_on_53(), tempfile.TemporaryDirectory(prefix="milters-bench-") as tmp:
        os.chmod(tmp, 0o755)
        factory = ProcessFactory()
        try:
            for discovery in args.discovery or ["treewalk"]:
                proc, spec = start_ours(factory, Path(tmp), args.workers, args.log_level,
                                        discovery, not args.no_history,
                                        args.history_fsync)
                result["milters"].append(measure(f"dmarc ({discovery})", proc, spec, prepared,
                                                 args, args.workers))
                proc.cleanup()
            peer = None if args.no_peer else start_opendmarc(factory, Path(tmp))
            if peer is not None:
                result["milters"].append(measure("opendmarc", *peer, prepared, args, None))
        finally:
            factory.close()
    common.report("dmarc", result, map(table, result["milters"]), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
