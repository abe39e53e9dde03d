"""Access tables at SMTP stages: client (S25R), HELO, MAIL FROM, RCPT TO."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from milters.checks import ChecksFilter
from milters.core.errors import ConfigError
from milters.core.filter import Stage
from milters.core.model import Connection, Transaction
from milters.core.verdict import Action, EditKind, HeaderEdit, Reply

Table = Callable[..., str]
Checks = Callable[..., ChecksFilter]
Message = Callable[..., Transaction]

SAMPLES = Path(__file__).resolve().parents[3] / "conf" / "checks"
S25R = f"regexp:{SAMPLES / 's25r'}"
WHITELIST = f"regexp:{SAMPLES / 's25r_whitelist'}"


@pytest.mark.parametrize(("name", "refused"), [
    ("p1234-ipad56.tokyo.ocn.ne.jp", True),  # rule 1
    ("softbank220012345678.bbtec.net", True),  # rule 2
    ("45.67.89.202.static.example.ne.jp", True),  # rule 3
    ("ntt2-ppp123.tokyo.example.jp", True),  # rule 1 again (digits around non-digits)
    ("dhcp9.example.com", True),  # rule 6
    ("unknown", True),  # rule 0: no reverse DNS
    ("mail.example.co.jp", False),
    ("mx01.example.jp", False),
    ("mail-12-34.example.ne.jp", True),  # looks dynamic (rule 1)...
])
def test_s25r_sample(name: str, refused: bool, checks: Checks) -> None:
    f = checks(client_checks=(S25R,))
    v = f.on_connect(Connection(client_addr="192.0.2.1", client_name=name))
    assert (v is not None) == refused
    if v is not None:
        assert v.action is Action.TEMPFAIL and v.reply is not None
        assert (v.reply.code, v.reply.xcode) == ("450", "4.7.1")
        assert v.reply.text.startswith(f"<{name}[192.0.2.1]>: Client host rejected: S25R check")


def test_s25r_whitelist_ok_stops_the_list(checks: Checks, table: Table) -> None:
    f = checks(client_checks=(WHITELIST, S25R))
    listed = Connection(client_addr="192.0.2.9", client_name="mail-12-34.example.ne.jp")
    assert f.on_connect(listed) is None  # ...unless whitelisted
    by_addr = Connection(client_addr="192.0.2.25", client_name="p1-a2.example.jp")
    assert f.on_connect(by_addr) is None  # whitelisted by address, looked up after the name
    other = Connection(client_addr="192.0.2.26", client_name="p1-a2.example.jp")
    assert f.on_connect(other) is not None
    dunno = checks(client_checks=(table("/example/ DUNNO\n"), S25R))
    assert dunno.on_connect(other) is not None  # DUNNO only skips its own table


def test_client_reject_reply_wording(checks: Checks, table: Table) -> None:
    f = checks(client_checks=(table("/^192\\.0\\.2\\.66$/ REJECT\n/^bad\\./ REJECT 5.7.2 go\n"),))
    v = f.on_connect(Connection(client_addr="192.0.2.66", client_name="host.example"))
    assert v is not None and v.action is Action.REJECT
    assert v.reply == Reply("554", "5.7.1",
                            "<host.example[192.0.2.66]>: Client host rejected: Access denied")
    v = f.on_connect(Connection(client_addr="192.0.2.7", client_name="bad.example"))
    assert v is not None and v.reply == Reply(
        "554", "5.7.2", "<bad.example[192.0.2.7]>: Client host rejected: go")


def test_local_submission_skips_client_checks(checks: Checks, table: Table) -> None:
    f = checks(client_checks=(table("/.*/ REJECT\n"),))
    assert f.on_connect(Connection()) is None


def test_helo_sender_recipient_stages(checks: Checks, table: Table, message: Message) -> None:
    f = checks(
        helo_checks=(table("/^localhost$/ REJECT you are not me\n"),),
        sender_checks=(table("/^<>$/ DEFER no bounces now\n/@spam\\.example$/ REJECT\n"),),
        recipient_checks=(table("/^abuse@/ OK\n/^nobody@/ 550 5.1.1 no such user\n"),),
    )
    v = f.on_helo(Connection(client_addr="192.0.2.1", helo="localhost"))
    assert v is not None and v.reply == Reply(
        "554", "5.7.1", "<localhost>: Helo command rejected: you are not me")
    tx = message(mail_from="")
    v = f.on_mail(tx)
    assert v is not None and v.action is Action.TEMPFAIL
    assert v.reply == Reply("450", "4.7.1", "<>: Sender address rejected: no bounces now")
    v = f.on_mail(message(mail_from="x@spam.example"))
    assert v is not None and v.reply == Reply(
        "554", "5.7.1", "<x@spam.example>: Sender address rejected: Access denied")
    tx = message()
    assert f.on_rcpt(tx, "<abuse@example.jp>") is None
    v = f.on_rcpt(tx, "<nobody@example.jp>")
    assert v is not None and v.reply == Reply(
        "550", "5.1.1", "<nobody@example.jp>: Recipient address rejected: no such user")


def test_stage_effects_apply_to_the_message(checks: Checks, table: Table,
                                            message: Message) -> None:
    f = checks(
        client_checks=(table("/^mail\\.example\\.org$/ HOLD from that host\n"),),
        sender_checks=(table("/^sender@/ BCC audit@example.jp\n"),),
        recipient_checks=(table("/^rcpt@/ PREPEND X-Checked: yes\n/^gone@/ REJECT\n"),),
    )
    v = f.check(message(rcpt_to=("rcpt@example.jp",)))
    assert v.action is Action.ACCEPT and v.quarantine == "from that host"
    assert v.add_rcpts == ("audit@example.jp",)
    assert v.header_edits == (HeaderEdit(EditKind.INSERT, "X-Checked", "yes", 0),)
    # Offline (no RCPT stage): a refused recipient is removed; all refused -> reject.
    v = f.check(message(rcpt_to=("rcpt@example.jp", "gone@example.jp")))
    assert v.action is Action.ACCEPT and v.del_rcpts == ("gone@example.jp",)
    v = f.check(message(rcpt_to=("gone@example.jp",)))
    assert v.action is Action.REJECT


def test_stage_discard_and_redirect(checks: Checks, table: Table, message: Message) -> None:
    f = checks(helo_checks=(table("/^spammer/ DISCARD\n/^trap/ REDIRECT trap@example.jp\n"),))
    assert f.on_helo(Connection(helo="spammer.example")) is None  # takes effect at the end
    assert f.check(message(helo="spammer.example")).action is Action.DISCARD
    v = f.check(message(helo="trap.example"))
    assert v.add_rcpts == ("trap@example.jp",) and v.del_rcpts == ("rcpt@example.jp",)


@pytest.mark.parametrize("action", ["IGNORE", "REPLACE X-A: b", "PASS", "PREPEND not a header"])
def test_header_only_actions_refused_at_stages(action: str, checks: Checks,
                                               table: Table) -> None:
    spec = table(f"/x/ {action}\n")
    with pytest.raises(ConfigError, match=":1: "):
        checks(recipient_checks=(spec,))


def test_needed_stages_follow_the_tables(checks: Checks, table: Table) -> None:
    assert checks().needed_stages() == Stage.NONE
    assert checks(client_checks=(S25R,)).needed_stages() == Stage.CONNECT
    assert checks(helo_checks=(table("/x/ REJECT\n"),)).needed_stages() == Stage.HELO
    assert checks(sender_checks=(table("/x/ REJECT\n"),)).needed_stages() == Stage.MAIL
    hdr = table("/x/ REJECT\n")
    assert checks(header_checks=(hdr,)).needed_stages() == Stage.HEADER | Stage.BODY
    assert checks(header_checks=(hdr,), mime_header_checks=(), nested_header_checks=()
                  ).needed_stages() == Stage.HEADER
    assert checks(body_checks=(table("/x/ REDIRECT a@b\n"),)).needed_stages() == (
        Stage.HEADER | Stage.BODY | Stage.RCPT)
    assert checks(recipient_checks=(hdr,)).needed_stages() == Stage.RCPT
    assert ChecksFilter.stages == (Stage.CONNECT | Stage.HELO | Stage.MAIL | Stage.RCPT
                                   | Stage.HEADER | Stage.BODY)
