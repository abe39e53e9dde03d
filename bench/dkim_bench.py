"""DKIM benchmark: signing and verification over the milter protocol, 1 and 4 connections.

Starts `milters run dkim` on a free loopback port with an RSA-2048 key (and
optionally an Ed25519 one beside it) for every corpus domain (a KeyTable with
`%`, a SigningTable of `*`), the keys served by the loopback DNS server, then
drives it with bench/milter_bench.py's client processes: signing (every session
SASL-authenticated) and verifying (the corpus signed beforehand, sessions from
outside). With --opendkim, OpenDKIM runs on the same messages and keys (its
TestDNSData instead of DNS: it cannot query another port than 53). With
--dkimpy-milter, Debian's dkimpy-milter (pure Python: dkimpy and pymilter, one
threaded process) runs too, RSA key only, one instance per mode (`Mode s` for
signing, `Mode v` for verifying: it picks the mode per connection from the client
address or macros known at CONNECT, before SMTP AUTH), each in a private mount
namespace whose /etc/resolv.conf points at the loopback DNS server, also bound to
127.0.0.153:53 (dnspython cannot query another port; needs root). Each peer gets
one probe message per mode first (a DKIM-Signature added? Authentication-Results
dkim=pass?), and the table is followed by our msgs/s as a multiple of each peer's.

    python -m bench.dkim_bench                    # ~30 s
    python -m bench.dkim_bench --ed25519 --workers 2 --opendkim
    python -m bench.dkim_bench --workers 2 --opendkim --dkimpy-milter --nodelay

Writes bench/results/dkim-TIMESTAMP.json and prints a table.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/dkim_bench.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from bench.corpus import corpus
from bench.milter_bench import Load, Prepared, envelope, prepare, run_load
from milters.client.probe import probe
from milters.core.config import GlobalSettings
from milters.core.filter import Env
from milters.dkim import DkimFilter, DkimSettings
from milters.dkim.keys import load_private_key
from milters.dkim.keytools import genkey
from tests.support.dkim import outgoing, transaction
from tests.support.dns import dns_server, serving
from tests.support.namespace import DNS53, private_resolver_argv, private_resolver_usable
from tests.support.processes import ManagedProcess, ProcessFactory, free_port

DOMAINS = ("example.org", "example.net", "corp.example.com", "mail.example.co.jp",
           "lists.example.edu", "sender.example")
MODES = ("sign", "verify")


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


def _start_ours(factory: ProcessFactory, d: Path, dns_toml: str, workers: int,
                arc: bool = True) -> tuple[str, ManagedProcess]:
    port = free_port()
    spec = common.spec_for(port)
    config = d / f"milters{'' if arc else '-noarc'}.toml"
    config.write_text(f'[global]\nauthserv_id = "mx.bench.example"\n{dns_toml}\n'
                      f'[dkim]\nsocket = "{spec}"\nworkers = {workers}\n'
                      f"arc_verify = {str(arc).lower()}\n"
                      f'key_table = "{d}/KeyTable"\nsigning_table = "{d}/SigningTable"\n'
                      # dkim alone: it signs in its own socket (no dkim-sign step).
                      + "".join(f"[{n}]\nenabled = false\n"
                                for n in ("spf", "dmarc", "clamav", "checks")))
    return spec, common.start_milters(factory, "dkim", config, port)


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
    return common.spec_for(port), proc


def _start_dkimpy(factory: ProcessFactory, d: Path, mode: str) -> tuple[str, ManagedProcess]:
    """dkimpy-milter in `Mode s` or `Mode v`, resolving through DNS53 (private resolv.conf)."""
    port = free_port()
    (d / "dp-KeyTable").write_text(f"rsakey %:bench:{d}/bench.private\n")
    (d / "dp-SigningTable").write_text("% rsakey\n")  # `*` matches nothing in 1.2.3
    conf = d / f"dkimpy-milter-{mode}.conf"
    conf.write_text(
        f"Syslog no\nMode {mode}\nSocket inet:{port}@127.0.0.1\n"
        f"Canonicalization relaxed/relaxed\nKeyTable {d}/dp-KeyTable\n"
        f"SigningTable {d}/dp-SigningTable\nInternalHosts 127.0.0.1\n"
        "AuthservID mx.bench.example\n")
    proc = factory.start(private_resolver_argv(d, DNS53, f"dkimpy-milter {conf}"), port)
    return common.spec_for(port), proc


def _probe(spec: str, mode: str, raw: bytes, auth: str) -> dict[str, Any]:
    """One message through the milter: did it sign (sign) or say dkim=pass (verify)?"""
    try:
        res = probe(spec, raw, envelope(auth), timeout=30.0)
    except Exception as exc:  # a peer that breaks is a finding, not a crash
        return {"ok": False, "error": repr(exc)}
    added = [(e.name, e.value) for e in res.header_edits]
    signed = any(n.lower() == "dkim-signature" for n, _ in added)
    ar = [v for n, v in added if n.lower() == "authentication-results"]
    passed = any("dkim=pass" in v for v in ar)
    ok = signed if mode == "sign" else passed
    return {"ok": ok, "verdict": res.verdict, "dkim_signature": signed,
            "authentication_results": ar}


def _dkimpy_usable() -> bool:
    if not private_resolver_usable("dkimpy-milter"):
        print("dkimpy-milter, unshare or root missing: dkimpy-milter skipped", file=sys.stderr)
        return False
    return True


def _ratios(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our msgs/s over each peer's, per mode and connection count."""
    ours = {(c["mode"], c["connections"]): c["msgs_per_s"]
            for c in cases if c["peer"] == "milters"}
    out = []
    for c in cases:
        mine = ours.get((c["mode"], c["connections"]))
        if c["peer"] == "milters" or mine is None:
            continue
        theirs = c["msgs_per_s"]
        ratio = round(mine / theirs, 2) if theirs else None
        c["milters_ratio"] = ratio
        out.append({"mode": c["mode"], "connections": c["connections"], "peer": c["peer"],
                    "milters_msgs_per_s": mine, "peer_msgs_per_s": theirs,
                    "milters_over_peer": ratio})
    return out


def _run_peers(peers: list[tuple[str, dict[str, tuple[str, ManagedProcess]]]],
               args: argparse.Namespace, raw: list[bytes], signed: list[bytes],
               plain_msgs: list[Prepared], signed_msgs: list[Prepared],
               rows: list[list[Any]], out: dict[str, Any]) -> None:
    out["probes"] = {}
    for label, by_mode in peers:
        for mode, msgs, originals, auth in (("sign", plain_msgs, raw, "alice"),
                                            ("verify", signed_msgs, signed, "")):
            spec, proc = by_mode[mode]
            found = _probe(spec, mode, originals[0], auth)
            out["probes"].setdefault(label, {})[mode] = found
            verdict = ("signed" if mode == "sign" else "dkim=pass") if found["ok"] else "FAILED"
            pids = common.process_tree(proc.pid)
            for conns in (1, 4):
                load = Load(spec, args.corpus, conns, 1, args.nodelay, None, args.count,
                            judge=False, auth_user=auth)
                res = run_load(load, msgs, pids)
                res.update({"peer": label, "mode": mode, "probe_ok": found["ok"]})
                out["cases"].append(res)
                rows.append([label, mode, conns, res["msgs_per_s"],
                             res["data_ms"].get("p50"), res["data_ms"].get("p99"),
                             res["filter_cpu_pct"], res["error_count"], verdict,
                             res["outcomes"]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=400, help="messages per case")
    ap.add_argument("--corpus", default="small", choices=("small", "attachment"))
    ap.add_argument("--workers", type=int, default=1, help="[dkim] workers")
    ap.add_argument("--ed25519", action="store_true", help="sign with Ed25519 too")
    ap.add_argument("--opendkim", action="store_true", help="run OpenDKIM side by side")
    ap.add_argument("--dkimpy-milter", action="store_true",
                    help="run Debian's dkimpy-milter side by side (RSA only; root)")
    ap.add_argument("--nodelay", action="store_true",
                    help="client socket with TCP_NODELAY (avoids the client-side stall "
                         "that C milters pay, for a like-for-like comparison with them)")
    ap.add_argument("--arc-compare", action="store_true",
                    help="also run ours with arc_verify = false (ARC verification's cost)")
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
            ours = _start_ours(factory, d, dns.toml(), args.workers)
            peers: list[tuple[str, dict[str, tuple[str, ManagedProcess]]]] = [
                ("milters", {"sign": ours, "verify": ours})]
            if args.arc_compare:
                noarc = _start_ours(factory, d, dns.toml(), args.workers, arc=False)
                peers.append(("milters-noarc", {"sign": noarc, "verify": noarc}))
            if args.opendkim and shutil.which("opendkim"):
                od = _start_opendkim(factory, d, records)
                peers.append(("opendkim", {"sign": od, "verify": od}))
            use_dkimpy = args.dkimpy_milter and _dkimpy_usable()
            # The same records on DNS53:53 too, for dkimpy-milter (UDP and TCP).
            dns53: AbstractContextManager[None] = serving(dns.resolver, DNS53, 53) \
                if use_dkimpy else nullcontext()
            with dns53:
                if use_dkimpy:
                    peers.append(("dkimpy-milter", {m: _start_dkimpy(factory, d, m[0])
                                                    for m in MODES}))
                _run_peers(peers, args, raw, signed, plain_msgs, signed_msgs, rows, out)
    finally:
        factory.close()
        shutil.rmtree(d, ignore_errors=True)
    out["ratios"] = _ratios(out["cases"])
    for row, case in zip(rows, out["cases"], strict=True):
        ratio = case.get("milters_ratio")
        row.append(f"{ratio:.1f}x" if ratio else "")
    print(common.format_table(
        ["peer", "mode", "conns", "msgs/s", "p50 ms", "p99 ms", "cpu %", "errors", "probe",
         "outcomes", "milters/peer"], rows))
    by_case: dict[tuple[str, int], list[str]] = {}
    for r in out["ratios"]:
        ratio = r["milters_over_peer"]
        by_case.setdefault((r["mode"], r["connections"]), []).append(
            f"milters/{r['peer']} {ratio:.1f}x" if ratio else f"milters/{r['peer']} -")
    for (mode, conns), parts in by_case.items():
        print(f"{mode} {conns} conn: " + ", ".join(parts))
    path = common.write_results("dkim", out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
