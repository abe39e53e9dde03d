"""Access tables at the SMTP stages: client, HELO, MAIL FROM, RCPT TO (access(5)).

Each table of a key acts like one `check_*_access regexp:/pcre:` restriction in
Postfix's smtpd_*_restrictions: the first match in a table decides for that table;
DUNNO goes on to the next table; OK stops the key's tables (permit), which is how an
S25R whitelist placed before the S25R rules works. A client is looked up by its
hostname and then by its address (smtpd_check.c check_namadr_access), and a match
on the name, DUNNO included, ends that table. Replies use Postfix's wording:
`554 5.7.1 <name[addr]>: Client host rejected: Access denied`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from milters.checks.actions import Kind, split_dsn
from milters.checks.tables import UNLIMITED, Budget, Hit, Maps, TextMode
from milters.core.model import Connection
from milters.core.verdict import Reply

ACCESS_REJECT_CODE = "554"  # Postfix access_map_reject_code
ACCESS_DEFER_CODE = "450"  # Postfix access_map_defer_code
DEFAULT_TEXT = "Access denied"
NULL_SENDER_KEY = "<>"  # Postfix smtpd_null_access_lookup_key


class SmtpStage(enum.Enum):
    """A stage key with the reply class Postfix names it by."""

    CLIENT = ("client_checks", "Client host")
    HELO = ("helo_checks", "Helo command")
    SENDER = ("sender_checks", "Sender address")
    RECIPIENT = ("recipient_checks", "Recipient address")

    @property
    def key(self) -> str:
        return self.value[0]

    @property
    def reply_class(self) -> str:
        return self.value[1]


@dataclass(frozen=True)
class StageLookup:
    """What a stage key's tables said for one client, name or address."""

    stage: SmtpStage
    reply_name: str  # what Postfix puts in <...> in the reply
    subject: str  # what was matched, for logs
    hits: tuple[Hit, ...]  # in order; the last one decides when it is final

    @property
    def refusal(self) -> Hit | None:
        """The REJECT/DEFER/NNN hit, if the tables refused."""
        for hit in self.hits:
            if hit.kind in (Kind.REJECT, Kind.DEFER, Kind.CODE):
                return hit
        return None


def lookup_stage(
    stage: SmtpStage, maps: Maps, subjects: Sequence[str], reply_name: str, mode: TextMode,
    budget: Budget = UNLIMITED,
) -> StageLookup:
    """Run the tables of one stage key over the subjects (name, then address)."""
    hits: list[Hit] = []
    for table in maps.tables:
        hit = None
        for subject in subjects:
            hit = table.lookup(mode.from_str(subject), budget)
            if hit is not None:
                break
        if hit is None or hit.kind is Kind.DUNNO:
            continue
        hits.append(hit)
        # OK permits; REJECT, DEFER, NNN and DISCARD end the restriction list.
        if hit.kind in (Kind.OK, Kind.REJECT, Kind.DEFER, Kind.CODE, Kind.DISCARD):
            break
    return StageLookup(stage, reply_name, subjects[0] if subjects else "", tuple(hits))


def stage_reply(stage: SmtpStage, hit: Hit, reply_name: str, mode: TextMode) -> Reply:
    """Postfix's access-map reply: `554 5.7.1 <x>: Recipient address rejected: text`."""
    dsn, text = split_dsn(mode.to_str(hit.text))
    action = hit.rule.action
    if action.kind is Kind.REJECT:
        code = ACCESS_REJECT_CODE
    elif action.kind is Kind.DEFER:
        code = ACCESS_DEFER_CODE
    else:
        code = action.code
    if not dsn or dsn[0] != code[0]:
        dsn = f"{code[0]}.7.1"
    return Reply(code, dsn, f"<{reply_name}>: {stage.reply_class} rejected: {text or DEFAULT_TEXT}")


def client_subjects(conn: Connection) -> tuple[list[str], str]:
    """(name then address, Postfix's reply name `name[addr]`); empty for local mail."""
    addr = str(conn.client_ip) if conn.client_ip is not None else conn.client_addr
    if not addr and not conn.client_name:
        return [], ""  # a local submission: Postfix runs no smtpd restrictions
    name = conn.client_name or "unknown"
    return [name, addr] if addr else [name], f"{name}[{addr}]"


def sender_subject(mail_from: str) -> str:
    return mail_from or NULL_SENDER_KEY
