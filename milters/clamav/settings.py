"""[clamav] settings: clamd back ends, limits, and what a virus, a failure or size gives.

The names are ours; README.md maps each clamav-milter.conf option onto them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from milters.clamav.clamd import parse_backend
from milters.core.config import FilterSettings, check_range, setting
from milters.core.verdict import Reply

OnVirus = Literal["reject", "quarantine", "discard", "tag"]
OnFail = Literal["tempfail", "accept"]
OnOversize = Literal["accept", "tempfail", "truncate"]
AddHeaders = Literal["replace", "add", "no"]

# What clamav-milter's default RejectMsg amounts to, with the virus named.
DEFAULT_REJECT_REPLY = "550 5.7.1 message rejected: virus %v found"


def check_backends(value: Any) -> str | None:
    if not value:
        return "at least one clamd socket"
    for spec in value:
        try:
            parse_backend(spec)
        except ValueError as exc:
            return str(exc)
    return None


def parse_reply_template(template: str) -> Reply:
    """`550 5.7.1 text with %v` -> Reply; ValueError says what is wrong."""
    code, _, rest = template.strip().partition(" ")
    xcode, _, text = rest.partition(" ")
    if not xcode[:1].isdigit():  # no enhanced status code: it is all text
        xcode, text = "", rest
    if not code.startswith("5"):
        raise ValueError(f"a 5xx reply such as {DEFAULT_REJECT_REPLY!r}")
    if template.count("%v") > 1:
        raise ValueError("a reply naming the virus (%v) at most once")
    if any(not c.isprintable() for c in template):
        raise ValueError("a reply of printable characters")
    return Reply(code, xcode, text.strip() or "virus found")


def check_reply(value: Any) -> str | None:
    try:
        parse_reply_template(value)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class ClamavSettings(FilterSettings):
    """[clamav]: virus scanning through clamd (replaces clamav-milter)."""

    clamd_sockets: tuple[str, ...] = setting(
        ("unix:/run/clamav/clamd.ctl",),
        "clamd back ends, tried in this order until one answers (failover): "
        "unix:/path or tcp:HOST:PORT, as clamav-milter's ClamdSocket",
        check_backends,
    )
    connect_timeout: float = setting(
        5.0, "seconds to connect to one clamd before trying the next", check_range(0.1, 300)
    )
    scan_timeout: float = setting(
        120.0,
        "seconds one clamd may take to receive and scan a message (clamav-milter's "
        "ReadTimeout); keep it under Postfix's milter_content_timeout",
        check_range(0.1, 3600),
    )
    retry_after: float = setting(
        30.0,
        "seconds a clamd that failed is tried after the others (0: always in order)",
        check_range(0, 86400),
    )
    max_scan_size: int = setting(
        25 * 1024 * 1024,
        "bytes of message (header and body) sent to clamd at most; keep it at or below "
        "clamd's StreamMaxLength (clamav-milter's MaxFileSize)",
        check_range(1, 2**32 - 1),
    )
    on_oversize: OnOversize = setting(
        "accept",
        "a larger message: accept (tagged X-Virus-Status: Not scanned), tempfail, or "
        "truncate (scan only the first max_scan_size bytes, as clamav-milter does)",
    )
    on_virus: OnVirus = setting(
        "reject",
        "a virus found: reject (reject_reply), quarantine (Postfix hold queue), discard, "
        "or tag (deliver with X-Virus-Status: Infected); clamav-milter's OnInfected",
    )
    reject_reply: str = setting(
        DEFAULT_REJECT_REPLY,
        "SMTP reply for on_virus = reject; %v is the virus name (clamav-milter's RejectMsg)",
        check_reply,
    )
    on_fail: OnFail = setting(
        "tempfail",
        "clamd down, timed out or answering nonsense: tempfail (4xx, the client retries) "
        "or accept tagged X-Virus-Status: Not scanned; never silently (clamav-milter's "
        "OnFail)",
    )
    add_headers: AddHeaders = setting(
        "replace",
        "X-Virus-Scanned and X-Virus-Status on scanned mail: replace (remove incoming "
        "ones first, so they cannot be forged), add, or no; tagged mail (on_virus = "
        "tag, on_fail/on_oversize = accept) always gets X-Virus-Status (AddHeader)",
    )
    report_hostname: str = setting(
        "",
        "host name in X-Virus-Scanned (empty: [global] authserv_id); ReportHostname",
    )
    skip_authenticated: bool = setting(
        False, "do not scan mail from SASL-authenticated clients (SkipAuthenticated)"
    )
    skip_internal: bool = setting(
        False,
        "do not scan mail from [global] internal_networks or local submission (LocalNet)",
    )
