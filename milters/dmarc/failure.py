"""Failure reports (RFC 9991), opt-in with [dmarc] failure_reports = true.

Two halves, so that no message waits on SMTP: the filter decides at end of message
whether the policy domain asked for a report of this message (`ruf=` and `fo=`,
RFC 9991 / RFC 9989 (policy record)) and, if so, writes the report's data, already
redacted, to a spool directory (`FailureSpool`); `milters dmarc failures` (run by
milters-dmarc-failures.timer every five minutes) sends the spool through the
report relay, in the AFRF format (RFC 6591: multipart/report; a
message/feedback-report part with Feedback-Type: auth-failure).

fo= (colon-separated): "0" a report when no mechanism gave an aligned pass (DMARC
fail); "1" when any of DKIM and SPF did not give an aligned pass; "d" when a DKIM
signature failed to verify, aligned or not; "s" when SPF failed, aligned or not.

Privacy (RFC 9991 (privacy considerations)): a failure report carries data about
one message and its people, so
- the body is never sent, only the header (text/rfc822-headers), whatever the
  settings;
- with failure_redact = true (the default) the local parts of recipient addresses
  (To, Cc, Bcc, Delivered-To, X-Original-To, Resent-To/-Cc, the "for" clause of
  Received) become "redacted" (RFC 6590 (redaction of local-parts)), the Subject is
  replaced, and the envelope recipients are not reported; the Author and envelope
  sender, which are what the Domain Owner investigates, are kept;
- a destination outside the policy domain must authorize us, as for aggregate
  reports (POLICYDOMAIN._report._dmarc.DEST, RFC 9991 (verifying external
  destinations));
- at most failure_max_per_domain reports per policy domain per run (the rest are
  dropped and counted), so that a flood of forged mail does not become a flood of
  reports.
"""

from __future__ import annotations

import json
import logging
import os
import re
import smtplib
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

from milters import __version__
from milters.core.model import Header
from milters.dmarc.evaluate import Discovery, DkimInput, DnsLookup, Evaluation, SpfInput
from milters.dmarc.report import Relay, SendFunction, authorize, receiver_domain, send_report

log = logging.getLogger(__name__)

RECIPIENT_FIELDS = frozenset({"to", "cc", "bcc", "delivered-to", "x-original-to",
                              "resent-to", "resent-cc", "resent-bcc"})
REDACTED = "redacted"
SPOOL_VERSION = 1
MAX_AGE = 86400  # a report the relay would not take for a day is dropped


def auth_failures(fo: str, dkim: Sequence[DkimInput], spf: SpfInput | None,
                  dkim_aligned: bool, spf_aligned: bool) -> list[str]:
    """The RFC 6591 Auth-Failure types fo= asks a report for ([] for none)."""
    opts = set(fo.split(":")) if fo else {"0"}
    out = []
    if ("0" in opts and not (dkim_aligned or spf_aligned)) or (
            "1" in opts and not (dkim_aligned and spf_aligned)):
        out.append("dmarc")
    if "d" in opts and any(d.result not in ("pass", "none") for d in dkim):
        out.append("dkim")
    if "s" in opts and spf is not None and spf.result in (
            "fail", "softfail", "permerror", "temperror"):
        out.append("spf")
    return out


_ADDRESS = re.compile(r"([A-Za-z0-9.!#$%&'*+/=?^_`{|}~\"-]+)@([A-Za-z0-9.-]+)")
_RECEIVED_FOR = re.compile(r"(?i)(\bfor\s+<?)([^@\s<>;]+)(@)")


def redact_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Recipient local parts and the Subject out (RFC 6590: the local-part replaced)."""
    out = []
    for name, value in headers:
        low = name.lower()
        if low in RECIPIENT_FIELDS:
            value = _ADDRESS.sub(lambda m: f"{REDACTED}@{m.group(2)}", value)
        elif low == "received":
            value = _RECEIVED_FOR.sub(lambda m: f"{m.group(1)}{REDACTED}{m.group(3)}", value)
        elif low == "subject":
            value = f"[{REDACTED}]"
        out.append((name, value))
    return out


@dataclass(frozen=True)
class FailureSpool:
    """Where the filter leaves failure reports for `milters dmarc failures`."""

    directory: str
    redact: bool = True

    def consider(self, ev: Evaluation, dkim: Sequence[DkimInput], spf: SpfInput | None,
                 headers: Sequence[tuple[str, str]], source_ip: str, mail_from: str,
                 rcpt_to: Sequence[str], disposition: str, authserv_id: str) -> Path | None:
        """Spool a report when the record asks for one (ruf= and fo=); the path or None.
        Called from the filter: errors are the caller's to log, never fatal."""
        record = ev.record
        if record is None or not record.ruf or ev.result not in ("pass", "fail"):
            return None
        kinds = auth_failures(record.fo, dkim, spf, ev.dkim_aligned, ev.spf_aligned)
        if not kinds:
            return None
        aligned = [n for n, ok in (("dkim", ev.dkim_aligned), ("spf", ev.spf_aligned)) if ok]
        # What we found, as an RFC 8601 field (RFC 6591 wants one in the report).
        results = [f"dmarc={ev.result} header.from={ev.header_from_domain}",
                   *(f"dkim={d.result} header.d={d.domain} header.s={d.selector}"
                     for d in dkim)]
        if spf is not None:
            results.append(f"spf={spf.result} smtp.mailfrom={spf.domain}")
        data = {
            "version": SPOOL_VERSION,
            "time": int(time.time()),
            "policy_domain": ev.policy_domain,
            "header_from": ev.header_from_domain,
            "ruf": list(record.ruf),
            "auth_failure": kinds,
            "identity_alignment": ", ".join(aligned) or "none",
            "source_ip": source_ip,
            "mail_from": mail_from,
            "rcpt_to": [] if self.redact else list(rcpt_to),
            "dkim": [[d.domain, d.selector, d.result] for d in dkim],
            "delivery_result": {"reject": "reject", "quarantine": "policy"}.get(
                disposition, "delivered"),
            "authentication_results": f"{authserv_id}; " + "; ".join(results),
            "headers": [list(h) for h in
                        (redact_headers(headers) if self.redact else headers)],
            "sent_to": [],
        }
        d = Path(self.directory)
        d.mkdir(parents=True, exist_ok=True, mode=0o750)
        name = f"{time.time_ns()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.json"
        tmp = d / f".{name}.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, d / name)  # a reader never sees half a report
        return d / name


def failure_message(data: dict[str, Any], sender: str, to: str) -> MIMEMultipart:
    """The AFRF report (RFC 6591, RFC 9991 (reporting format)): human-readable part,
    message/feedback-report, and the (redacted) header as text/rfc822-headers."""
    receiver = receiver_domain(sender)
    msg = MIMEMultipart("report", report_type="feedback-report")
    msg["From"] = sender
    msg["To"] = to
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain=receiver or None)
    msg["Subject"] = (f"DMARC failure report for {data['header_from']} from {receiver}")
    msg.attach(MIMEText(
        f"A message from {data['source_ip']} with From domain {data['header_from']} "
        f"did not authenticate as the DMARC policy of {data['policy_domain']} asks "
        f"({', '.join(data['auth_failure'])}). Only its header is attached"
        f"{', recipients and Subject redacted' if not data['rcpt_to'] else ''}.\n"))
    fields = [
        ("Feedback-Type", "auth-failure"),
        ("User-Agent", f"milters/{__version__}"),
        ("Version", "1"),
        *(("Auth-Failure", kind) for kind in data["auth_failure"]),
        ("Authentication-Results", data["authentication_results"]),
        ("Identity-Alignment", data["identity_alignment"]),
        ("Original-Mail-From", f"<{data['mail_from']}>"),
        *(("Original-Rcpt-To", f"<{r}>") for r in data["rcpt_to"]),
        ("Arrival-Date", formatdate(data["time"], localtime=False)),
        ("Source-IP", data["source_ip"]),
        ("Reported-Domain", data["header_from"]),
        ("Delivery-Result", data["delivery_result"]),
        *(x for d, s, r in data["dkim"] if r not in ("pass", "none")
          for x in (("DKIM-Domain", d), ("DKIM-Selector", s))),
    ]
    report = MIMEBase("message", "feedback-report")
    report.set_payload("".join(f"{k}: {v}\r\n" for k, v in fields))
    msg.attach(report)
    headers = "".join(f"{k}: {v}\r\n" for k, v in data["headers"])
    msg.attach(MIMEText(headers, "rfc822-headers", "utf-8"))
    return msg


@dataclass
class FailureRun:
    sent: list[tuple[str, str]] = field(default_factory=list)  # (spool file, address)
    refused: list[tuple[str, str, str]] = field(default_factory=list)  # not authorized
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)  # policy domain -> count


def send_spool(directory: str, dns: DnsLookup, discovery: Discovery, relay: Relay,
               sender: str, max_per_domain: int, now: int | None = None,
               send: SendFunction = send_report) -> FailureRun:
    """Send what the filter spooled; a file is removed once every authorized
    destination has it (progress kept in the file), or when it is too old."""
    out = FailureRun()
    now = int(time.time()) if now is None else now
    per_domain: Counter[str] = Counter()
    d = Path(directory)
    for path in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            data = json.loads(path.read_text())
            domain = str(data["policy_domain"])
        except (OSError, ValueError, KeyError) as exc:
            log.warning("failure report %s unreadable, removed: %s", path, exc)
            path.unlink(missing_ok=True)
            continue
        if now - int(data["time"]) > MAX_AGE:
            out.failed.append((path.name, ",".join(data["ruf"]), "too old, dropped"))
            path.unlink(missing_ok=True)
            continue
        per_domain[domain] += 1
        if per_domain[domain] > max_per_domain:
            out.dropped[domain] += 1
            path.unlink(missing_ok=True)
            continue
        auth = authorize(domain, data["ruf"], dns, discovery)
        out.refused += [(path.name, a, why) for a, why in auth.refused]
        pending = False
        for address in auth.allowed:
            if address in data["sent_to"]:
                continue
            try:
                send(failure_message(data, sender, address), relay)
            except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
                out.failed.append((path.name, address, f"{type(exc).__name__}: {exc}"))
                pending = True
                continue
            out.sent.append((path.name, address))
            data["sent_to"].append(address)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)  # a retry does not send it to this address again
        if not pending:
            path.unlink(missing_ok=True)
    return out


def header_pairs(headers: Sequence[Header]) -> list[tuple[str, str]]:
    """(name, value) pairs of a transaction's header, values unfolded to one line."""
    return [(h.name, " ".join(h.value.decode("utf-8", "replace").split())) for h in headers]


def spool_from_settings(failure_reports: bool, directory: str,
                        redact: bool) -> FailureSpool | None:
    """The filter's spool, or None when failure reports are off (the default)."""
    return FailureSpool(directory, redact) if failure_reports else None
