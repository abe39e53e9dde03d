"""Aggregate reports (RFC 9990) from the history, and `milters dmarc stats`.

One report per policy domain and period: evaluations grouped into rows (same
source IP, identifiers, authentication results and policy outcome), the DKIM
selector kept, XML in the urn:ietf:params:xml:ns:dmarc-2.0 namespace, gzipped.
Destinations outside the policy domain's Organizational Domain must authorize
us (RFC 9990 (report delivery) / RFC 7489 §7.1: a v=DMARC1 TXT record at
POLICYDOMAIN._report._dmarc.DESTINATION) before a report goes there.

File name and Subject name the receiver by its domain (RFC 9990 (report delivery):
`receiver "!" policy-domain "!" begin "!" end [ "!" unique-id ] "." extension`,
receiver = domain; "Submitter:" domain-name), which is the domain of the report's
From address, not org_name (free text, may contain spaces). Sending goes through
one relay (STARTTLS or implicit TLS, SMTP AUTH), one message per destination, and
every attempt is kept in the store's sent-report log: a report sent to a
destination is not sent there again, a failed one is retried by a later run once
its back-off has passed.
"""

from __future__ import annotations

import gzip
import hashlib
import smtplib
import ssl
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from email.utils import formatdate, make_msgid
from pathlib import Path

from milters import __version__
from milters.core.errors import MiltersError, PermError, TempError
from milters.dmarc.evaluate import Discovery, DnsLookup, Lookups, normalize_domain
from milters.dmarc.history import HistoryEntry, HistoryStore, ReportSend
from milters.dmarc.record import is_dmarc
from milters.dmarc.settings import DmarcSettings

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
    receiver: str = ""  # the reporting domain (RFC 9990: receiver = domain)

    @property
    def filename(self) -> str:
        """RFC 9990 (report delivery): receiver!policy-domain!begin!end!unique-id.xml.gz,
        receiver being a domain; the unique-id is a MIME token (no "!" nor spaces)."""
        return (f"{self.receiver}!{self.policy_domain}!{self.begin}!{self.end}!"
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
            e.result, e.dkim_aligned, e.spf_aligned, e.disposition, e.policy, e.override,
            e.override_comment)


def _evaluated_disposition(e: HistoryEntry) -> str:
    """RFC 9990 ActionDispositionType: "pass" is a DMARC pass under an enforcing policy."""
    if e.result == "pass" and e.policy in ("quarantine", "reject"):
        return "pass"
    return e.disposition


def receiver_domain(email: str) -> str:
    """The reporting domain: that of the report's From address."""
    return email.rpartition("@")[2].strip().strip(">").rstrip(".").lower()


def build_report(domain: str, entries: Sequence[HistoryEntry], begin: int, end: int,
                 org_name: str, email: str) -> AggregateReport:
    """The aggregate report for one policy domain from its evaluations in [begin, end).
    The report id depends on the receiver, domain and period only, so that a rebuilt
    report (a retry) has the id of the first attempt (RFC 9990: the Report-ID lets
    the Domain Owner ignore duplicates)."""
    last = entries[-1]
    receiver = receiver_domain(email)
    digest = hashlib.sha256(f"{receiver}|{domain}|{begin}|{end}".encode()).hexdigest()[:16]
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
            if e.override_comment:
                _sub(reason, q + "comment", e.override_comment)
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
                           len(groups), len(entries), receiver)


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
    """The rua destinations of an aggregate report that may receive it (`authorize`)."""
    return authorize(report.policy_domain, report.rua, dns, discovery)


def authorize(policy_domain: str, uris: Iterable[str], dns: DnsLookup,
              discovery: Discovery = "treewalk") -> Authorization:
    """RFC 9990 (report delivery), RFC 9991 (verifying external destinations), as RFC
    7489 §7.1: a destination outside the policy domain's Organizational Domain must
    publish POLICYDOMAIN._report._dmarc.DEST with v=DMARC1."""
    out = Authorization()
    lk = Lookups(dns, discovery)
    for uri in uris:
        address = uri.removeprefix("mailto:")
        try:
            dest = normalize_domain(address.rpartition("@")[2])
            if lk.org_domain(dest) == lk.org_domain(policy_domain):
                out.allowed.append(address)
                continue
            name = f"{policy_domain}._report._dmarc.{dest}"
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
    """The report mail (RFC 9990, report delivery): gzipped XML attached, its subject
    "Report Domain: POLICY-DOMAIN Submitter: RECEIVER-DOMAIN Report-ID: <ID>"."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain=report.receiver or None)
    msg["Subject"] = (f"Report Domain: {report.policy_domain} Submitter: {report.receiver} "
                      f"Report-ID: <{report.report_id}>")
    msg.set_content(f"DMARC aggregate report for {report.policy_domain} from "
                    f"{report.org_name} ({report.receiver}): {report.messages} messages in "
                    f"{report.rows} rows.\n")
    msg.add_attachment(report.gzipped(), maintype="application", subtype="gzip",
                       filename=report.filename)
    return msg


@dataclass(frozen=True)
class Relay:
    """The SMTP server reports go through ([dmarc] report_smtp_*)."""

    host: str = "127.0.0.1"
    port: int = 25
    tls: str = "none"  # "none", "starttls" (RFC 3207, required), "tls" (implicit)
    cafile: str = ""  # "" : the system's CA certificates
    user: str = ""  # SMTP AUTH (RFC 4954) when set
    password: str = ""
    timeout: float = 30.0

    def context(self) -> ssl.SSLContext:
        # Verified, against the host name we were given: AUTH must not go to a stranger.
        return ssl.create_default_context(cafile=self.cafile or None)


def send_report(msg: Message, relay: Relay) -> None:
    """Hand one report to the relay; smtplib, ssl and socket errors propagate."""
    smtp: smtplib.SMTP
    if relay.tls == "tls":
        smtp = smtplib.SMTP_SSL(relay.host, relay.port, timeout=relay.timeout,
                                context=relay.context())
    else:
        smtp = smtplib.SMTP(relay.host, relay.port, timeout=relay.timeout)
    with smtp:
        if relay.tls == "starttls":
            smtp.starttls(context=relay.context())  # SMTPNotSupportedError if not offered
        if relay.user:
            if relay.tls == "none":
                raise smtplib.SMTPException("SMTP AUTH without TLS refused: set "
                                            "report_smtp_tls")
            smtp.login(relay.user, relay.password)
        smtp.send_message(msg)


# A failed send is retried by a later run, after 1 h, 2 h, 4 h, ... at most a day
# apart; after MAX_ATTEMPTS the destination is given up (the log says so).
FIRST_RETRY = 3600
MAX_RETRY = 86400
MAX_ATTEMPTS = 8


def next_retry(now: int, attempts: int) -> int:
    """When a destination that failed `attempts` times is tried again."""
    delay: int = min(FIRST_RETRY << min(max(attempts - 1, 0), 20), MAX_RETRY)
    return now + delay


def due_retries(store: HistoryStore, now: int) -> list[tuple[str, int, int]]:
    """(policy domain, begin, end) of reports with a failed destination due again."""
    due = {(s.policy_domain, s.begin, s.end) for s in store.sends()
           if s.state == "failed" and s.next_attempt <= now}
    return sorted(due)


@dataclass
class Delivery:
    """What one run did, per report and destination (for the command's output)."""

    sent: list[tuple[str, str]] = field(default_factory=list)  # (report id, address)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (id, address, why)
    failed: list[tuple[str, str, str]] = field(default_factory=list)


SendFunction = Callable[[Message, Relay], None]


def deliver(report: AggregateReport, addresses: Sequence[str], store: HistoryStore,
            relay: Relay, sender: str, now: int, out: Delivery, resend: bool = False,
            send: SendFunction = send_report) -> None:
    """Send `report` to each address that has not had it yet (or is due a retry),
    one message each, and record every attempt in the sent-report log."""
    known = {s.destination: s for s in store.sends(report.report_id)}
    for address in addresses:
        before = known.get(address)
        if before is not None and not resend:
            if before.state == "sent":
                out.skipped.append((report.report_id, address, "already sent"))
                continue
            if before.state == "gave_up":
                out.skipped.append((report.report_id, address,
                                    f"given up after {before.attempts} attempts"))
                continue
            if before.next_attempt > now:
                out.skipped.append((report.report_id, address,
                                    f"next attempt at {before.next_attempt}"))
                continue
        attempts = (before.attempts if before is not None else 0) + 1
        try:
            send(report_message(report, sender, [address]), relay)
        except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
            state = "gave_up" if attempts >= MAX_ATTEMPTS else "failed"
            why = f"{type(exc).__name__}: {exc}"
            store.log_send(ReportSend(report.report_id, address, report.policy_domain,
                                      report.begin, report.end, state, attempts, now,
                                      next_retry(now, attempts), why[:500]))
            out.failed.append((report.report_id, address, why))
            continue
        store.log_send(ReportSend(report.report_id, address, report.policy_domain,
                                  report.begin, report.end, "sent", attempts, now, 0))
        out.sent.append((report.report_id, address))


@dataclass
class ReportRun:
    """What one `milters dmarc report` run did: each report built, with who may
    have it (and, with --dry-run, the file it went to), then the deliveries."""

    reports: list[tuple[AggregateReport, Authorization, Path | None]] = field(
        default_factory=list)
    delivery: Delivery = field(default_factory=Delivery)


def send_reports(store: HistoryStore, begin: int, end: int, domains: Sequence[str],
                 org_name: str, sender: str, now: int, dns: DnsLookup, discovery: Discovery,
                 relay: Relay, *, dry_run: str | Path | None = None, resend: bool = False,
                 send: SendFunction = send_report) -> ReportRun:
    """The reports of [begin, end) for `domains` (all if empty), and, unless this
    is a dry run, the reports of earlier periods whose failed sends are due again;
    each sent to its authorized destinations (`deliver`), or with `dry_run`
    written to that directory instead."""
    built = build_reports(store.entries(begin, end, domains), begin, end, org_name, sender)
    if not dry_run:
        # Reports of earlier periods whose send failed and whose back-off has passed.
        ids = {r.report_id for r in built}
        for domain, b, e in due_retries(store, now):
            for rep in build_reports(store.entries(b, e, [domain]), b, e, org_name, sender):
                if rep.report_id not in ids:
                    built.append(rep)
                    ids.add(rep.report_id)
    run = ReportRun()
    for rep in built:
        auth = authorized_destinations(rep, dns, discovery)
        if dry_run:
            run.reports.append((rep, auth, write_report(rep, dry_run)))
            continue
        run.reports.append((rep, auth, None))
        deliver(rep, auth.allowed, store, relay, sender, now, run.delivery, resend, send)
    return run


def relay_from_settings(settings: DmarcSettings) -> Relay:
    """The relay of [dmarc] report_smtp_*, with the password from its file."""
    return Relay(settings.report_smtp_host, settings.report_smtp_port,
                 settings.report_smtp_tls, settings.report_smtp_cafile,
                 settings.report_smtp_user, _read_secret(settings.report_smtp_password_file))


def _read_secret(path: str) -> str:
    """The first line of a password file ("" for no file)."""
    if not path:
        return ""
    try:
        lines = Path(path).read_text().splitlines()
        return lines[0] if lines else ""
    except OSError as exc:
        raise MiltersError(f"[dmarc] report_smtp_password_file: {exc}") from None


def report_sender(settings: DmarcSettings, authserv_id: str) -> str:
    """The From address of aggregate and failure reports ([dmarc] report_email)."""
    return settings.report_email or f"dmarc-noreply@{authserv_id}"


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
