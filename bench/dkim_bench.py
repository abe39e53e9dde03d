"""DKIM benchmark: signing and verification over the milter protocol, 1 and 4 connections.

Starts `milters run dkim` on a free loopback port with an RSA-2048 key (and
optionally an Ed25519 one beside it) for every corpus domain (a KeyTable with
`%`, a SigningTable of `*`), the keys served by the loopback DNS server, then
drives it with bench/milter_bench.py's client processes: signing (every session
SASL-authenticated) and verifying (the corpus signed beforehand, sessions from
outside). With --opendkim, OpenDKIM runs on the same messages and keys (its
TestDNSData instead of DNS: it cannot query another port than 53).

    python -m bench.dkim_bench                    # ~30 s
    python -m bench.dkim_bench --ed25519 --workers 2 --opendkim

Writes bench/results/dkim-TIMESTAMP.json and prints a table.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/dkim_bench.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from bench.corpus import corpus
from bench.milter_bench import Load, Prepared, prepare, run_load
from milters.core.config import GlobalSettings
from milters.core.filter import Env
from milters.dkim import DkimFilter, DkimSettings
from milters.dkim.keys import load_private_key
from milters.dkim.keytools import genkey
from tests.support.dkim import outgoing, transaction
from tests.support.dns import dns_server
from tests.support.processes import ManagedProcess, ProcessFactory, free_port

DOMAINS = ("example.org", "example.net", "corp.example.com", "mail.example.co.jp",
           "lists.example.edu", "sender.example")


def _tables(d: Path, ed25519: bool) -> None:
    keys = [f"rsakey %:bench:{d}/bench.private"]
    names = "rsakey"
    if ed25519:
        keys.append(f"edkey %:benched:{d}/benched.private")
        names += " edkey"
    (d / "KeyTable").write_text("\n".join(keys) + "\n")
    (d / "SigningTable").write_text(f"* {names}\n")


def _signed_corpus(d: Path, messages: list[bytes], ed25519: bool) -> list[bytes]:
    settings = DkimSettings(key_table=str(d / "KeyTable"), signing_table=str(d / "SigningTable"))
    flt = DkimFilter(settings, Env(GlobalSettings()))
    return [outgoing(raw, flt.check(transaction(raw, client="127.0.0.1"))) for raw in messages]


def _start_ours(factory: ProcessFactory, d: Path, dns_toml: str, workers: int
                ) -> tuple[str, ManagedProcess]:
    port = free_port()
    spec = f"inet:{port}@127.0.0.1"
    config = d / "milters.toml"
    config.write_text(f'[global]\nauthserv_id = "mx.bench.example"\n{dns_toml}\n'
                      f'[dkim]\nsocket = "{spec}"\nworkers = {workers}\n'
                      f'key_table = "{d}/KeyTable"\nsigning_table = "{d}/SigningTable"\n')
    argv = [sys.executable, "-m", "milters", "run", "dkim", "--config", str(config)]
    proc = factory.start(argv, port, env={"PYTHONPATH": str(common.REPO_ROOT)},
                         cwd=common.REPO_ROOT)
    return spec, proc


def _start_opendkim(factory: ProcessFactory, d: Path, records: dict[str, str]
                    ) -> tuple[str, ManagedProcess]:
    port = free_port()
    (d / "dnsdata").write_text("".join(f"{n} {v}\n" for n, v in records.items()))
    (d / "od-KeyTable").write_text(f"rsakey %:bench:{d}/bench.private\n")
    (d / "od-SigningTable").write_text("* rsakey\n")
    conf = d / "opendkim.conf"
    conf.write_text(
        f"Syslog no\nBackground no\nSocket inet:{port}@127.0.0.1\nMode sv\n"
        f"Canonicalization relaxed/relaxed\nKeyTable file:{d}/od-KeyTable\n"
        f"SigningTable refile:{d}/od-SigningTable\nTestDNSData file:{d}/dnsdata\n"
        "RequireSafeKeys false\nInternalHosts 127.0.0.1\nMTA ORIGINATING\n"
        "AuthservID mx.bench.example\n")
    proc = factory.start(["opendkim", "-f", "-x", str(conf)], port)
    return f"inet:{port}@127.0.0.1", proc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=400, help="messages per case")
    ap.add_argument("--corpus", default="small", choices=("small", "attachment"))
    ap.add_argument("--workers", type=int, default=1, help="[dkim] workers")
    ap.add_argument("--ed25519", action="store_true", help="sign with Ed25519 too")
    ap.add_argument("--opendkim", action="store_true", help="run OpenDKIM side by side")
    ap.add_argument("--nodelay", action="store_true",
                    help="client socket with TCP_NODELAY (avoids the client-side stall "
                         "that C milters pay, for a like-for-like comparison with them)")
    args = ap.parse_args(argv)

    d = Path(tempfile.mkdtemp(prefix="dkim-bench-"))
    records: dict[str, str] = {}
    genkey("bench", "bench", "rsa", 2048, str(d))
    if args.ed25519:
        genkey("bench", "benched", "ed25519", 0, str(d))
    for sel in ("bench", "benched") if args.ed25519 else ("bench",):
        record = load_private_key(str(d / f"{sel}.private"), False).dns_record()
        records.update({f"{sel}._domainkey.{dom}": record for dom in DOMAINS})
    _tables(d, args.ed25519)
    raw = [m.raw for m in corpus(args.corpus, 100)]
    signed = _signed_corpus(d, raw, args.ed25519)
    plain_msgs: list[Prepared] = [prepare(r) for r in raw]
    signed_msgs: list[Prepared] = [prepare(r) for r in signed]

    rows: list[list[Any]] = []
    out: dict[str, Any] = {"host": common.host_info(), "corpus": args.corpus,
                           "workers": args.workers, "ed25519": args.ed25519, "cases": []}
    factory = ProcessFactory()
    try:
        with dns_server() as dns:
            for name, value in records.items():
                dns.txt(name, value)
            peers = [("milters", *_start_ours(factory, d, dns.toml(), args.workers))]
            if args.opendkim and shutil.which("opendkim"):
                peers.append(("opendkim", *_start_opendkim(factory, d, records)))
            for label, spec, proc in peers:
                pids = common.process_tree(proc.pid)
                for mode, msgs, auth in (("sign", plain_msgs, "alice"),
                                         ("verify", signed_msgs, "")):
                    for conns in (1, 4):
                        load = Load(spec, args.corpus, conns, 1, args.nodelay, None, args.count,
                                    judge=False, auth_user=auth)
                        res = run_load(load, msgs, pids)
                        res.update({"peer": label, "mode": mode})
                        out["cases"].append(res)
                        rows.append([label, mode, conns, res["msgs_per_s"],
                                     res["data_ms"].get("p50"), res["data_ms"].get("p99"),
                                     res["filter_cpu_pct"], res["error_count"],
                                     res["outcomes"]])
    finally:
        factory.close()
        shutil.rmtree(d, ignore_errors=True)
    print(common.format_table(
        ["peer", "mode", "conns", "msgs/s", "p50 ms", "p99 ms", "cpu %", "errors", "outcomes"],
        rows))
    path = common.write_results("dkim", out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
