"""What the MTA knows of one message before its content: the SMTP client, HELO, SASL
login, MAIL FROM, RCPT TO and the queue id.

One Envelope describes a message for both ways the suite plays the MTA:
`milters test` (offline.py) turns it into a Connection and a Transaction, and
the milter client (milters/client/, behind `milters probe`, the protocol tests
and the benchmarks) sends it over the wire as Postfix would.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from milters.core.addresses import parse_address_list
from milters.core.model import parse_message


def new_queue_id() -> str:
    """A Postfix-looking short queue id (10 upper-case hex digits)."""
    return secrets.token_hex(5).upper()


@dataclass
class Envelope:
    """What the MTA knows about the SMTP client and the message envelope.

    `macros` adds or overrides macro values by name (`"{tls_version}"`, `"j"`);
    a stage sends the macros of its list that have a value, as Postfix does.
    """

    client_ip: str = "192.0.2.1"  # "" for a local submission (no client address)
    client_port: int = 40000
    client_name: str = "unknown"  # verified name; Postfix says "unknown" without one
    helo: str = "client.example"
    mail_from: str = "sender@example.com"  # without angle brackets; "" = null sender
    mail_params: tuple[str, ...] = ()
    rcpt_to: list[str] = field(default_factory=lambda: ["recipient@example.com"])
    auth_user: str = ""  # SASL login -> {auth_authen}
    auth_type: str = "PLAIN"  # -> {auth_type}, sent only with auth_user
    daemon_name: str = "mta.localhost"  # Postfix: $myhostname, for `j` and {daemon_name}
    daemon_addr: str = "127.0.0.1"
    daemon_port: int = 25
    queue_id: str = field(default_factory=new_queue_id)
    macros: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_message(cls, message: bytes, **overrides: Any) -> Envelope:
        """An envelope whose sender and recipients come from the message's header.

        MAIL FROM from Return-Path (else From), RCPT TO from To and Cc, unless given.
        """
        headers, _ = parse_message(message)

        def addresses(*names: str) -> list[str]:
            values = [
                h.value.decode("utf-8", "replace").replace("\n", " ")
                for h in headers
                if h.name.lower() in names
            ]
            # The bounded reader: a From with deeply nested comments is a defined
            # "no address here", not a RecursionError (email.utils.getaddresses).
            return [m.address for v in values for m in parse_address_list(v).mailboxes]

        if "mail_from" not in overrides:
            found = addresses("return-path") or addresses("from")
            if found:
                overrides["mail_from"] = found[0]
        if "rcpt_to" not in overrides:
            found = addresses("to", "cc")
            if found:
                overrides["rcpt_to"] = found
        return cls(**overrides)
