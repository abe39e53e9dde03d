"""SPF benchmark: the spf filter over the milter protocol, 1 and 4 connections.

Starts `milters run spf` on a free loopback port with [global.dns] pointed at
the loopback DNS server, which publishes SPF records for the benchmark envelope
(client 198.51.100.7, HELO mail.sender.example, MAIL FROM sender@sender.example):
the MAIL FROM domain's record passes through `include:` and `mx` (four lookups),
the HELO name's through `a`. Both identities are checked for every message and
the result written in Authentication-Results. The resolver's cache is warm after
the first message (records have a 60 s TTL), as a site's caching resolver would be.

The SPF work happens at MAIL FROM, so `txn` latency (MAIL to end-of-message
reply, on one connection per message) is the figure to read; `data` (first
header to end of message) shows only the header pass-through and the AR write.

    python -m bench.spf_bench                 # ~10 s
    python -m bench.spf_bench --workers 2 --count 2000

Writes bench/results/spf-TIMESTAMP.json and prints a table.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/spf_bench.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from bench.corpus import corpus
from bench.milter_bench import Load, Prepared, prepare, run_load
from tests.support.dns import LoopbackDNS, dns_server
from tests.support.processes import ManagedProcess, ProcessFactory, free_port


def publish(dns: LoopbackDNS) -> None:
    """Records for bench/milter_bench.py's envelope: both identities pass."""
    dns.txt("sender.example", "v=spf1 include:_spf.sender.example mx -all")
    dns.txt("_spf.sender.example", "v=spf1 ip4:203.0.113.0/24 ip6:2001:db8::/32 ~all")
    dns.mx("sender.example", 10, "mx1.sender.example")
    dns.a("mx1.sender.example", "198.51.100.7")
    dns.txt("mail.sender.example", "v=spf1 a -all")
    dns.a("mail.sender.example", "198.51.100.7")


def _start(factory: ProcessFactory, d: Path, dns_toml: str, workers: int
           ) -> tuple[str, ManagedProcess]:
    port = free_port()
    spec = common.spec_for(port)
    config = d / "milters.toml"
    config.write_text(f'[global]\nauthserv_id = "mx.bench.example"\n{dns_toml}\n'
                      f'[spf]\nsocket = "{spec}"\nworkers = {workers}\n')
    return spec, common.start_milters(factory, "spf", config, port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1000, help="messages per case")
    ap.add_argument("--corpus", default="small", choices=("small", "attachment"))
    ap.add_argument("--workers", type=int, default=1, help="[spf] workers")
    args = ap.parse_args(argv)

    d = Path(tempfile.mkdtemp(prefix="spf-bench-"))
    msgs: list[Prepared] = [prepare(m.raw) for m in corpus(args.corpus, 100)]
    rows: list[list[Any]] = []
    out: dict[str, Any] = {"host": common.host_info(), "corpus": args.corpus,
                           "workers": args.workers, "cases": []}
    factory = ProcessFactory()
    try:
        with dns_server() as dns:
            publish(dns)
            spec, proc = _start(factory, d, dns.toml(), args.workers)
            pids = common.process_tree(proc.pid)
            for conns in (1, 4):
                load = Load(spec, args.corpus, conns, 1, False, None, args.count, judge=False)
                res = run_load(load, msgs, pids)
                out["cases"].append(res)
                rows.append([conns, res["msgs_per_s"], res["txn_ms"].get("p50"),
                             res["txn_ms"].get("p99"), res["data_ms"].get("p50"),
                             res["filter_cpu_pct"], res["error_count"], res["outcomes"]])
            out["dns_queries"] = len(dns.resolver.queries)
    finally:
        factory.close()
        shutil.rmtree(d, ignore_errors=True)
    print(common.format_table(
        ["conns", "msgs/s", "txn p50 ms", "txn p99 ms", "data p50 ms", "cpu %", "errors",
         "outcomes"], rows))
    path = common.write_results("spf", out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
