"""[dmarc] settings: policy discovery, where results come from, what a failure gives,
the history store and aggregate reports.

The names are ours; README.md maps each opendmarc.conf option onto them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from milters.core.config import FilterSettings, check_range, setting

DiscoveryMethod = Literal["treewalk", "psl"]
OnQuarantine = Literal["hold", "tag", "accept"]
OnBadFrom = Literal["permerror", "reject"]
OnTempError = Literal["accept", "tempfail"]
ReportTls = Literal["none", "starttls", "tls"]


def check_absolute_or_empty(value: str) -> str | None:
    if value and not value.startswith("/"):
        return 'an absolute path, or ""'
    return None


def check_history(value: str) -> str | None:
    if value and not value.startswith(("/", "postgresql://", "postgres://")):
        return 'an absolute SQLite file path, a postgresql:// URL, or "" (no history)'
    return None


def check_reply_text(value: str) -> str | None:
    if not value.strip() or not value.isprintable() or not value.isascii():
        return "a non-empty line of printable ASCII"
    return None


@dataclass(frozen=True)
class DmarcSettings(FilterSettings):
    """[dmarc]: DMARC evaluation (RFC 9989), history and aggregate reports (replaces
    OpenDMARC)."""

    discovery: DiscoveryMethod = setting(
        "treewalk",
        'policy discovery: "treewalk" (RFC 9989 DNS Tree Walk) or "psl" (RFC 7489 '
        "Public Suffix List, from the publicsuffixlist package)",
    )
    trusted_authserv_ids: tuple[str, ...] = setting(
        (),
        "authserv-ids of upstream hosts whose Authentication-Results dkim/spf results "
        "are also used; our own [global] authserv_id is always trusted (only our "
        "upstream filters can write it)",
    )
    trusted_arc_sealers: tuple[str, ...] = setting(
        (),
        "ARC sealers (ARC-Seal d=; domain, or .domain for its sub-domains) trusted to "
        "report DMARC: a failure whose ARC chain passes, sealed by these only, with "
        "dmarc=pass for the From domain in the oldest ARC-Authentication-Results, gets "
        "disposition none, recorded as trusted_forwarder (needs [dkim] arc_verify, or "
        "self_validate)",
    )
    self_validate: bool = setting(
        True, "verify DKIM, evaluate SPF (and validate ARC, for trusted_arc_sealers) here "
        "when no trusted result is present"
    )
    reject_failures: bool = setting(
        False, "refuse mail whose DMARC policy says reject (OpenDMARC's RejectFailures)"
    )
    on_quarantine: OnQuarantine = setting(
        "hold",
        'p=quarantine failures: "hold" (Postfix hold queue), "tag" (X-Milters-DMARC '
        'header) or "accept"',
    )
    reject_reply: str = setting(
        "rejected by the DMARC policy of %d",
        "text of the 550 5.7.1 reply; %d is the From domain",
        check_reply_text,
    )
    on_bad_from: OnBadFrom = setting(
        "permerror",
        'a From that is not one field with one domain: "permerror" (each domain is '
        "evaluated and the strictest failure applies; a From with no usable domain "
        'gives dmarc=permerror) or "reject" (550 5.7.1 before DMARC)',
    )
    on_temperror: OnTempError = setting(
        "accept", "a DNS failure during policy discovery: accept (and say so) or tempfail"
    )
    never_reject_domains: tuple[str, ...] = setting(
        (), "From domains never refused nor held (domain, or .domain for its sub-domains)"
    )
    always_check_domains: tuple[str, ...] = setting(
        (),
        "From domains checked even from internal or authenticated clients "
        "(domain or .domain)",
    )
    skip_ours: bool = setting(
        True, "skip internal and SASL-authenticated clients (mail we send)"
    )
    max_signatures: int = setting(
        5, "DKIM signatures verified in self-validation", check_range(1, 50)
    )
    min_key_bits: int = setting(
        1024, "smallest RSA key a self-validated DKIM signature may use", check_range(512, 8192)
    )
    history: str = setting(
        "/var/lib/milters/dmarc-history.sqlite",
        "where every evaluation is recorded: an SQLite file, a PostgreSQL URL "
        '(postgresql://user:password@host/db, shared by several MX hosts), or "" for none',
        check_history,
    )
    report_org_name: str = setting("", "org_name in aggregate reports (default: authserv_id)")
    report_email: str = setting(
        "", "the From address of aggregate reports (default: dmarc-noreply@authserv_id)"
    )
    report_smtp_host: str = setting("127.0.0.1", "SMTP server reports are sent through")
    report_smtp_port: int = setting(25, "its port", check_range(1, 65535))
    history_journal: str = setting(
        "",
        "directory of the crash journal: each evaluation is appended there before the "
        "filter answers, and replayed into the history after a crash (default: the SQLite "
        "file's name + .journal, or /var/lib/milters/dmarc-history.journal for PostgreSQL)",
        check_absolute_or_empty,
    )
    history_fsync: bool = setting(
        False,
        "fdatasync(2) the journal after every evaluation: survives an operating system "
        "crash or power loss too, not only a crash of the filter (costs a disk flush "
        "per message)",
    )
    report_smtp_tls: ReportTls = setting(
        "none",
        'TLS to the report relay: "none", "starttls" (required, RFC 3207) or "tls" '
        "(implicit TLS, port 465); the certificate is verified against report_smtp_host",
    )
    report_smtp_cafile: str = setting(
        "", "CA certificates (PEM file) for the relay's certificate; default: the system's",
        check_absolute_or_empty,
    )
    report_smtp_user: str = setting(
        "", "SMTP AUTH user name at the report relay (RFC 4954); needs report_smtp_tls"
    )
    report_smtp_password_file: str = setting(
        "", "file holding the SMTP AUTH password (its first line), readable by the report "
        "job only", check_absolute_or_empty,
    )
    failure_reports: bool = setting(
        False,
        "send RFC 9991 failure reports to the ruf= addresses of policies that ask (fo=): "
        "the header only, never the body; spooled by the filter, sent by `milters dmarc "
        "failures` (milters-dmarc-failures.timer)",
    )
    failure_spool: str = setting(
        "/var/lib/milters/dmarc-failures", "directory of failure reports waiting to be sent",
        check_absolute_or_empty,
    )
    failure_redact: bool = setting(
        True,
        "in failure reports, replace the local parts of recipient addresses and the "
        "Subject, and leave out the envelope recipients (RFC 6590)",
    )
    failure_max_per_domain: int = setting(
        5, "failure reports sent per policy domain per run; the rest are dropped",
        check_range(1, 1000),
    )
