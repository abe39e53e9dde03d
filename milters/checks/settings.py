"""[checks] settings: Postfix's parameter names and defaults, plus our extensions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from milters.checks.tables import TABLE_TYPES
from milters.core.config import FilterSettings, check_range, setting


def check_specs(value: Any) -> str | None:
    """Each entry must be regexp:/path or pcre:/path, as in main.cf."""
    if value is None:
        return None
    for spec in value:
        kind, sep, path = str(spec).partition(":")
        if not sep or kind not in TABLE_TYPES or not path:
            return (f"table specs such as regexp:/etc/postfix/header_checks or pcre:/path "
                    f"({spec!r} is not one; only regexp: and pcre: tables are supported)")
    return None


@dataclass(frozen=True)
class ChecksSettings(FilterSettings):
    """[checks]: Postfix header/body checks and access tables, run as a milter."""

    header_checks: tuple[str, ...] = setting(
        (), "tables for the message's own headers, as Postfix header_checks", check_specs
    )
    mime_header_checks: tuple[str, ...] | None = setting(
        None,
        "tables for MIME headers (Content-*, MIME-Version) at any level; unset: the "
        "header_checks tables, as Postfix's default $header_checks; [] turns them off",
        check_specs,
    )
    nested_header_checks: tuple[str, ...] | None = setting(
        None,
        "tables for the headers of attached messages (message/rfc822); unset: the "
        "header_checks tables, as Postfix's default $header_checks; [] turns them off",
        check_specs,
    )
    body_checks: tuple[str, ...] = setting(
        (), "tables for body lines, MIME boundaries included, as Postfix body_checks",
        check_specs,
    )
    body_checks_size_limit: int = setting(
        51200,
        "bytes of each MIME part that body_checks see (0: no limit), as in Postfix",
        check_range(0, 2**31 - 1),
    )
    filename_checks: tuple[str, ...] = setting(
        (), "tables matched against decoded attachment file names (extension)", check_specs
    )
    client_checks: tuple[str, ...] = setting(
        (),
        "tables matched against the client hostname then its IP address, each like a "
        "check_client_access regexp:/pcre: restriction (OK in one ends the list)",
        check_specs,
    )
    helo_checks: tuple[str, ...] = setting(
        (), "tables matched against the HELO/EHLO name, like check_helo_access", check_specs
    )
    sender_checks: tuple[str, ...] = setting(
        (), "tables matched against the MAIL FROM address, like check_sender_access",
        check_specs,
    )
    recipient_checks: tuple[str, ...] = setting(
        (), "tables matched against each RCPT TO address, like check_recipient_access",
        check_specs,
    )
    access_style_actions: bool = setting(
        False,
        "also accept access(5) actions in header/body checks: DEFER (450 4.7.1) and "
        "'4NN/5NN text' refuse the message; false (as Postfix 3.7): they are logged as "
        "'unknown command' and the message goes on",
    )
    match_timeout: float = setting(
        3.0,
        "seconds one message may take here: reading its MIME structure and matching "
        "all its header and body lines (each SMTP stage gets as much again); a rule "
        "still running then, such as a backtracking /(a+)+$/ on a long line, ends the "
        "check: the message gets on_error (tempfail by default) and the log names the "
        "table file:line (a running search is timed by the worker's CPU clock, so a "
        "machine short of CPU stretches it); 0: no limit",
        check_range(0, 3600),
    )
    decode: bool = setting(
        True,
        "match decoded text: RFC 2047 headers, base64/quoted-printable text parts in "
        "their charset, as UTF-8; false matches raw bytes exactly like Postfix",
    )
