"""Factories for the checks tests: table files in tmp_path, filters, transactions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from milters.checks import ChecksFilter, ChecksSettings
from milters.core.config import GlobalSettings
from milters.core.filter import Env
from milters.core.model import Connection, Header, Transaction, parse_message

TableFactory = Callable[..., str]
FilterFactory = Callable[..., ChecksFilter]
MessageFactory = Callable[..., Transaction]


@pytest.fixture
def table(tmp_path: Path) -> TableFactory:
    """table(text, kind="regexp") writes a table file and returns its spec string."""
    count = 0

    def make(text: str | bytes, kind: str = "regexp", name: str = "") -> str:
        nonlocal count
        count += 1
        path = tmp_path / (name or f"table{count}")
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return f"{kind}:{path}"

    return make


@pytest.fixture
def checks() -> FilterFactory:
    """checks(header_checks=(spec,), ...) builds a filter from settings keywords."""

    def make(**settings: Any) -> ChecksFilter:
        return ChecksFilter(ChecksSettings(**settings), Env(GlobalSettings()))

    return make


@pytest.fixture
def message() -> MessageFactory:
    """message(raw=b"...") or message(headers=[(name, value)], body=b"...").

    Header values are as Postfix sends them with SMFIP_HDR_LEADSPC: b" value".
    """

    def make(
        raw: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        body: bytes = b"",
        mail_from: str = "sender@example.org",
        rcpt_to: tuple[str, ...] = ("rcpt@example.jp",),
        client_addr: str = "192.0.2.1",
        client_name: str = "mail.example.org",
        helo: str = "mail.example.org",
    ) -> Transaction:
        conn = Connection(client_addr=client_addr, client_name=client_name, helo=helo)
        tx = Transaction(conn, mail_from=mail_from, rcpt_to=list(rcpt_to))
        if raw is not None:
            parsed, body = parse_message(raw)
            tx.headers = parsed
        else:
            tx.headers = [Header(n, v) for n, v in headers or []]
        tx.body.write(body)
        return tx

    return make
