"""Aggregate reports (RFC 9990) from the history, and `milters dmarc stats`.

One report per policy domain and period: evaluations grouped into rows (same
source IP, identifiers, authentication results and policy outcome), the DKIM
selector kept, XML in the urn:ietf:params:xml:ns:dmarc-2.0 namespace, gzipped.
Destinations outside the policy domain's Organizational Domain must authorize
us (RFC 9990 (report delivery) / RFC 7489 §7.1: a v=DMARC1 TXT record at
POLICYDOMAIN._report._dmarc.DESTINATION) before a report goes there.
"""

from __future__ import annotations

import gzip
import hashlib
import smtplib
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

from milters import __version__
from milters.core.errors import PermError, TempError
from milters.dmarc.evaluate import Discovery, DnsLookup, Lookups, normalize_domain
from milters.dmarc.history import HistoryEntry
from milters.dmarc.record import is_dmarc

NAMESPACE = "urn:ietf:params:xml:ns:dmarc-2.0"


@dataclass(frozen=True)
class AggregateReport:
    """One report: its XML and where it should go."""

    policy_domain: str
    begin: int
    end: int
    report_id: str
    org_name: str
    xml: bytes
    rua: tuple[str, ...]
    rows: int
    messages: int

    @property
    def filename(self) -> str:
        """RFC 9990 (report delivery): receiver!policy-domain!begin!end!unique-id.xml.gz."""
        return (f"{self.org_name}!{self.policy_domain}!{self.begin}!{self.end}!"
                f"{self.report_id}.xml.gz")

    def gzipped(self) -> bytes:
        return gzip.compress(self.xml, mtime=0)


def _sub(parent: ET.Element, tag: str, text: str | int | None = None) -> ET.Element:
    el = ET.SubElement(parent, tag)
    if text is not None:
        el.text = str(text)
    return el


def _row_key(e: HistoryEntry) -> tuple[object, ...]:
    return (e.source_ip, e.header_from, e.envelope_from, e.dkim, e.spf_domain, e.spf_result,
            e.result, e.dkim_aligned, e.spf_aligned, e.disposition, e.policy, e.override)


def _evaluated_disposition(e: HistoryEntry) -> str:
    """RFC 9990 ActionDispositionType: "pass" is a DMARC pass under an enforcing policy."""
    if e.result == "pass" and e.policy in ("quarantine", "reject"):
        return "pass"
    return e.disposition


def build_report(domain: str, entries: Sequence[HistoryEntry], begin: int, end: int,
                 org_name: str, email: str) -> AggregateReport:
    """The aggregate report for one policy domain from its evaluations in [begin, end)."""
    last = entries[-1]
    digest = hashlib.sha256(f"{org_name}|{domain}|{begin}|{end}".encode()).hexdigest()[:16]
    report_id = f"{begin}.{digest}"
    ET.register_namespace("", NAMESPACE)
    root = ET.Element(f"{{{NAMESPACE}}}feedback")
    q = f"{{{NAMESPACE}}}"
    _sub(root, q + "version", "1.0")
    meta = _sub(root, q + "report_metadata")
    _sub(meta, q + "org_name", org_name)
    _sub(meta, q + "email", email)
    _sub(meta, q + "report_id", report_id)
    dr = _sub(meta, q + "date_range")
    _sub(dr, q + "begin", begin)
    _sub(dr, q + "end", end)
    _sub(meta, q + "generator", f"milters {__version__}")
    pp = _sub(root, q + "policy_published")
    _sub(pp, q + "domain", domain)
    _sub(pp, q + "p", last.p)
    for tag, value in (("sp", last.sp), ("np", last.np)):
        if value:
            _sub(pp, q + tag, value)
    _sub(pp, q + "adkim", last.adkim)
    _sub(pp, q + "aspf", last.aspf)
    _sub(pp, q + "discovery_method", last.discovery)
    _sub(pp, q + "fo", last.fo)
    _sub(pp, q + "testing", "y" if last.testing else "n")
    groups: Counter[tuple[object, ...]] = Counter()
    sample: dict[tuple[object, ...], HistoryEntry] = {}
    for e in entries:
        key = _row_key(e)
        groups[key] += 1
        sample.setdefault(key, e)
    for key, count in groups.items():
        e = sample[key]
        rec = _sub(root, q + "record")
        row = _sub(rec, q + "row")
        _sub(row, q + "source_ip", e.source_ip or "0.0.0.0")
        _sub(row, q + "count", count)
        pe = _sub(row, q + "policy_evaluated")
        _sub(pe, q + "disposition", _evaluated_disposition(e))
        _sub(pe, q + "dkim", "pass" if e.dkim_aligned else "fail")
        _sub(pe, q + "spf", "pass" if e.spf_aligned else "fail")
        if e.override:
            reason = _sub(pe, q + "reason")
            _sub(reason, q + "type", e.override)
        ids = _sub(rec, q + "identifiers")
        _sub(ids, q + "header_from", e.header_from)
        if e.envelope_from:
            _sub(ids, q + "envelope_from", e.envelope_from)
        auth = _sub(rec, q + "auth_results")
        for d, selector, result in e.dkim:
            dk = _sub(auth, q + "dkim")
            _sub(dk, q + "domain", d)
            _sub(dk, q + "selector", selector)
            _sub(dk, q + "result", result)
        if e.spf_domain:
            sp = _sub(auth, q + "spf")
            _sub(sp, q + "domain", e.spf_domain)
            _sub(sp, q + "scope", "mfrom")
            _sub(sp, q + "result", e.spf_result)
    ET.indent(root)
    xml = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return AggregateReport(domain, begin, end, report_id, org_name, xml, last.rua,
                           len(groups), len(entries))


def build_reports(entries: Iterable[HistoryEntry], begin: int, end: int, org_name: str,
                  email: str) -> list[AggregateReport]:
    """One report per policy domain that asked for reports (rua=) in the period."""
    by_domain: dict[str, list[HistoryEntry]] = defaultdict(list)
    for e in entries:
        if e.policy_domain:
            by_domain[e.policy_domain].append(e)
    return [build_report(d, es, begin, end, org_name, email)
            for d, es in sorted(by_domain.items()) if es[-1].rua]


@dataclass
class Authorization:
    """Which rua destinations of a report may receive it."""

    allowed: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (address, why)


def authorized_destinations(report: AggregateReport, dns: DnsLookup,
                            discovery: Discovery = "treewalk") -> Authorization:
    """RFC 9990 (report delivery) (RFC 7489 §7.1): a destination outside the policy domain's
    Organizational Domain must publish POLICYDOMAIN._report._dmarc.DEST with v=DMARC1."""
    out = Authorization()
    lk = Lookups(dns, discovery)
    for uri in report.rua:
        address = uri.removeprefix("mailto:")
        try:
            dest = normalize_domain(address.rpartition("@")[2])
            if lk.org_domain(dest) == lk.org_domain(report.policy_domain):
                out.allowed.append(address)
                continue
            name = f"{report.policy_domain}._report._dmarc.{dest}"
            if any(is_dmarc(t) for t in dns.txt(name)):
                out.allowed.append(address)
            else:
                out.refused.append((address, f"no v=DMARC1 record at {name}"))
        except PermError as exc:
            out.refused.append((address, str(exc)))
        except TempError as exc:
            out.refused.append((address, f"try again later: {exc}"))
    return out


def report_message(report: AggregateReport, sender: str, to: Sequence[str]) -> EmailMessage:
    """The report mail (RFC 9990, report delivery): gzipped XML attached, its subject."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    msg["Subject"] = (f"Report Domain: {report.policy_domain} Submitter: {report.org_name} "
                      f"Report-ID: <{report.report_id}>")
    msg.set_content(f"DMARC aggregate report for {report.policy_domain} from "
                    f"{report.org_name}: {report.messages} messages in {report.rows} rows.\n")
    msg.add_attachment(report.gzipped(), maintype="application", subtype="gzip",
                       filename=report.filename)
    return msg


def send_report(msg: EmailMessage, host: str, port: int, timeout: float = 30.0) -> None:
    """Hand one report to the SMTP server; smtplib errors propagate to the caller."""
    with smtplib.SMTP(host, port, timeout=timeout) as smtp:
        smtp.send_message(msg)


def write_report(report: AggregateReport, directory: str | Path) -> Path:
    """--dry-run: the gzipped report in DIRECTORY under its RFC 9990 file name."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / report.filename
    path.write_bytes(report.gzipped())
    return path


@dataclass(frozen=True)
class StatsLine:
    domain: str
    source_ip: str
    passed: int
    failed: int
    other: int


def stats(entries: Iterable[HistoryEntry]) -> list[StatsLine]:
    """pass/fail counts per From domain and source IP."""
    counts: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for e in entries:
        bucket = e.result if e.result in ("pass", "fail") else "other"
        counts[(e.header_from, e.source_ip)][bucket] += 1
    return [StatsLine(d, ip, c["pass"], c["fail"], c["other"])
            for (d, ip), c in sorted(counts.items())]
