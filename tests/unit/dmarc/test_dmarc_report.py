"""Aggregate reports (RFC 9990) from the history: grouping, the DKIM selector,
validation against the RFC 9990 schema (dmarc-2.0.xsd from the PyPI `dmarc`
package), external destination authorization, SMTP sending, `milters dmarc
report --dry-run` and `milters dmarc stats`."""

from __future__ import annotations

import gzip
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import dmarc as dmarc_package
import pytest
import xmlschema
from aiosmtpd.controller import Controller

from milters import cli
from milters.core.resolver import Resolver
from milters.dmarc.history import HistoryEntry, SqliteHistory
from milters.dmarc.report import (
    Relay,
    authorized_destinations,
    build_reports,
    report_message,
    send_report,
    stats,
)
from tests.support.dns import LoopbackDNS
from tests.support.processes import free_port

XSD = Path(dmarc_package.__file__).parent / "report" / "schemas" / "dmarc-2.0.xsd"
NS = "{urn:ietf:params:xml:ns:dmarc-2.0}"
BEGIN, END = 1_790_000_000, 1_790_086_400

BASE = HistoryEntry(
    time=BEGIN + 10, source_ip="192.0.2.10", header_from="example.com",
    envelope_from="example.com", envelope_to="test.example",
    dkim=(("example.com", "sel", "pass"),), spf_domain="example.com", spf_result="pass",
    policy_domain="example.com", p="reject", sp="", np="", adkim="r", aspf="r",
    testing=False, discovery="treewalk", fo="0",
    rua=("mailto:rua@example.com", "mailto:dmarc@reports.example.net"),
    result="pass", dkim_aligned=True, spf_aligned=True, policy="reject", disposition="none",
)
FAILED = replace(BASE, source_ip="198.51.100.7", dkim=(), spf_domain="bad.example",
                 spf_result="fail", result="fail", dkim_aligned=False, spf_aligned=False,
                 disposition="none", override="local_policy")


def entries() -> list[HistoryEntry]:
    other = replace(BASE, header_from="other.example", policy_domain="other.example",
                    rua=(), p="none", policy="none")
    return [BASE, BASE, replace(BASE, time=BEGIN + 20), FAILED, other]


def test_report_grouped_and_schema_valid() -> None:
    (rep,) = build_reports(entries(), BEGIN, END, "mx.test.example", "dmarc@test.example")
    assert rep.policy_domain == "example.com" and rep.messages == 4 and rep.rows == 2
    schema = xmlschema.XMLSchema(str(XSD))
    schema.validate(rep.xml)  # raises with the reason when invalid
    doc = schema.to_dict(rep.xml)
    assert doc["policy_published"]["discovery_method"] == "treewalk"
    root = __import__("xml.etree.ElementTree", fromlist=["x"]).fromstring(rep.xml)
    rows = root.findall(f"{NS}record")
    counts = sorted(int(r.findtext(f"{NS}row/{NS}count") or 0) for r in rows)
    assert counts == [1, 3]
    assert root.findtext(f"{NS}record/{NS}auth_results/{NS}dkim/{NS}selector") == "sel"
    assert rep.filename == f"test.example!example.com!{BEGIN}!{END}!{rep.report_id}.xml.gz"
    assert gzip.decompress(rep.gzipped()) == rep.xml


def test_report_override_reason_and_pass_disposition() -> None:
    (rep,) = build_reports(entries(), BEGIN, END, "mx.test.example", "dmarc@test.example")
    text = rep.xml.decode()
    assert "<disposition>pass</disposition>" in text
    assert "<type>local_policy</type>" in text


def test_external_destination_authorization(dns: LoopbackDNS, resolver: Resolver) -> None:
    (rep,) = build_reports(entries(), BEGIN, END, "mx.test.example", "dmarc@test.example")
    auth = authorized_destinations(rep, resolver)
    assert auth.allowed == ["rua@example.com"]
    assert auth.refused[0][0] == "dmarc@reports.example.net"
    dns.txt("example.com._report._dmarc.reports.example.net", "v=DMARC1")
    auth = authorized_destinations(rep, env_resolver(dns))
    assert auth.allowed == ["rua@example.com", "dmarc@reports.example.net"]


def env_resolver(dns: LoopbackDNS) -> Resolver:
    from tests.support.dkim import env_for
    return env_for(dns).resolver


class Sink:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                                  bytes(envelope.content)))
        return "250 OK"


def test_send_by_smtp() -> None:
    sink = Sink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        (rep,) = build_reports(entries(), BEGIN, END, "mx.test.example", "dmarc@test.example")
        send_report(report_message(rep, "dmarc@test.example", ["rua@example.com"]),
                    Relay("127.0.0.1", port))
    finally:
        controller.stop()
    ((sender, rcpts, content),) = sink.messages
    assert sender == "dmarc@test.example" and rcpts == ["rua@example.com"]
    assert b"Report Domain: example.com Submitter: test.example" in content
    assert b"application/gzip" in content


def test_cli_dry_run_and_stats(dns: LoopbackDNS, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "h.sqlite"
    store = SqliteHistory(str(db))
    for e in entries():
        store.record(e)
    store.close()
    config = tmp_path / "milters.toml"
    config.write_text(f'[global]\nauthserv_id = "mx.test.example"\n{dns.toml(1.0)}'
                      f'[dmarc]\nhistory = "{db}"\n')
    out = tmp_path / "out"
    rc = cli.main(["dmarc", "report", "--config", str(config), "--begin", str(BEGIN),
                   "--end", str(END), "--dry-run", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    (path,) = out.iterdir()
    xmlschema.XMLSchema(str(XSD)).validate(gzip.decompress(path.read_bytes()))
    assert "not sending to dmarc@reports.example.net" in text
    lines = stats(SqliteHistory(str(db)).entries(0, 2**40))
    assert [(x.domain, x.source_ip, x.passed, x.failed) for x in lines] == [
        ("example.com", "192.0.2.10", 3, 0), ("example.com", "198.51.100.7", 0, 1),
        ("other.example", "192.0.2.10", 1, 0)]
    assert cli.main(["dmarc", "stats", "--config", str(config), "--hours", "1e9"]) == 0
    assert "198.51.100.7" in capsys.readouterr().out
