"""Helpers for the dkim tests of every tier: transactions as the adapter builds
them, and the message as Postfix sends it after the filter's edits."""

from __future__ import annotations

from milters.core.config import DnsSettings, GlobalSettings
from milters.core.filter import Env
from milters.core.model import Connection, Header, Transaction, parse_message
from milters.core.verdict import AuthResult, EditKind, HeaderEdit, Verdict
from tests.support.dns import LoopbackDNS


def env_for(dns: LoopbackDNS, timeout: float = 1.0) -> Env:
    return Env(GlobalSettings(authserv_id="mx.test.example", dns=DnsSettings(
        nameservers=("127.0.0.1",), port=dns.port, timeout=timeout)))


MESSAGE = (
    b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\n"
    b"Subject: hello   there\r\n\tfolded subject\r\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n"
    b"\r\nHello  world \r\n\r\nsecond line\r\n\r\n\r\n"
)


def transaction(raw: bytes = MESSAGE, client: str = "198.51.100.7", auth: str = "",
                daemon: str = "mx.test.example") -> Transaction:
    """A transaction as the adapter builds it from what Postfix sends."""
    macros = {"{daemon_name}": daemon}
    if auth:
        macros["{auth_authen}"] = auth
    tx = Transaction(Connection(client_addr=client, client_name="mail.example.net",
                                macros=macros))
    headers, body = parse_message(raw)
    tx.headers = headers
    tx.body.write(body)
    return tx


def outgoing(raw: bytes, verdict: Verdict | list[HeaderEdit]) -> bytes:
    """The message as Postfix sends it after the filter's edits: signatures on top,
    changed fields replaced (enough for what the dkim filter does)."""
    headers, body = parse_message(raw)
    edits = verdict.header_edits if isinstance(verdict, Verdict) else tuple(verdict)
    out = []
    for e in edits:
        if e.kind is EditKind.CHANGE:
            seen = 0
            for i, h in enumerate(headers):
                if h.name.lower() == e.name.lower():
                    seen += 1
                    if seen == e.index:
                        headers[i] = Header(h.name, e.value.encode())
    for e in edits:
        if e.kind is EditKind.INSERT:
            out.append(f"{e.name}: {e.value}".replace("\n", "\r\n").encode() + b"\r\n")
    for h in headers:
        out.append(h.name.encode() + b":" + h.value.replace(b"\n", b"\r\n") + b"\r\n")
    if isinstance(verdict, Verdict) and verdict.replace_body is not None:
        body = verdict.replace_body
    return b"".join(out) + b"\r\n" + body


def dkim_results(verdict: Verdict) -> list[AuthResult]:
    """The dkim= results of a verdict, without the arc= result beside them."""
    return [r for r in verdict.results if r.method == "dkim"]
