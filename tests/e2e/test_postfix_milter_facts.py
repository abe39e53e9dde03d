"""What real Postfix (3.7, Debian 12) does with milter header edits, header values and
macros: facts the adapter relies on, pinned as tests so an upgrade that changes them
fails here, not in production.

Header positions are read from the delivered file, where virtual(8) puts
Return-Path, X-Original-To and Delivered-To on top, then Postfix's own Received
header (which milters never see), then the message's headers.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.filters import ProbeFactory, ProbeMilter
from tests.e2e.postfix import MYHOSTNAME, DeliveredMessage, PostfixInstance

SENDER = "sender@sender.example"
RCPT = "user@test.example"
DELIVERY = ["Return-Path", "X-Original-To", "Delivered-To"]

# What the milter sees, in order (it never sees Postfix's Received header).
SEEN = ["From", "To", "Received", "Subject", "X-Dup", "X-Dup", "X-Dup", "Date", "Message-ID"]
MESSAGE = (
    b"From: sender@sender.example\r\n"
    b"To: user@test.example\r\n"
    b"Received: from upstream.example by relay.example; Mon, 23 Nov 2026 09:00:00 +0000\r\n"
    b"Subject: first\r\n second line\r\n\tthird\r\n"
    b"X-Dup: one\r\n"
    b"X-Dup: two\r\n"
    b"X-Dup: three\r\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <facts@sender.example>\r\n"
    b"\r\n"
    b"body\r\n"
)


def deliver_with(
    postfix: PostfixInstance, probe: ProbeMilter, actions: list[dict[str, Any]]
) -> DeliveredMessage:
    probe.set_actions(actions)
    postfix.clear_mailbox()
    result = postfix.send(SENDER, [RCPT], MESSAGE)
    assert result.accepted, result
    [msg] = postfix.wait_delivered(1)
    return msg


def message_headers(msg: DeliveredMessage) -> list[str]:
    """Header names after virtual(8)'s three delivery headers."""
    assert msg.header_names[:3] == DELIVERY
    return msg.header_names[3:]


@pytest.fixture
def probe(postfix: PostfixInstance, probe_milter: ProbeFactory) -> ProbeMilter:
    p = probe_milter()
    postfix.set_milters([p.socket])
    return p


# --- (a) smfi_insheader positions ------------------------------------------------


def test_insheader_index_0_lands_above_postfix_received(
    postfix: PostfixInstance, probe: ProbeMilter
) -> None:
    msg = deliver_with(
        postfix, probe, [{"op": "addheader", "name": "X-Ins", "value": "v", "idx": 0}]
    )
    assert message_headers(msg) == ["X-Ins", "Received", *SEEN]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_insheader_index_counts_postfix_hidden_received(
    postfix: PostfixInstance, probe: ProbeMilter, k: int
) -> None:
    """Index k puts the header right before the k-th header the milter saw (1-based):
    Postfix's own Received header is index 0, though the milter never saw it."""
    msg = deliver_with(
        postfix, probe, [{"op": "addheader", "name": "X-Ins", "value": "v", "idx": k}]
    )
    assert message_headers(msg) == ["Received", *SEEN[: k - 1], "X-Ins", *SEEN[k - 1 :]]


def test_insheader_index_past_the_end_appends(postfix: PostfixInstance, probe: ProbeMilter) -> None:
    msg = deliver_with(
        postfix, probe, [{"op": "addheader", "name": "X-Ins", "value": "v", "idx": 100}]
    )
    assert message_headers(msg) == ["Received", *SEEN, "X-Ins"]


def test_next_milter_sees_inserted_headers_at_the_top(
    postfix: PostfixInstance, probe_milter: ProbeFactory
) -> None:
    first = probe_milter(
        "first",
        actions=[
            {"op": "addheader", "name": "X-Ins0", "value": "v", "idx": 0},
            {"op": "addheader", "name": "X-Ins1", "value": "v", "idx": 1},
        ],
    )
    second = probe_milter("second")
    postfix.set_milters([first.socket, second.socket])
    assert postfix.send(SENDER, [RCPT], MESSAGE).accepted
    msg = postfix.wait_delivered(1)[0]
    # Each insert applies to the header list as already edited: after X-Ins0 went in
    # above Postfix's Received, index 1 is the slot between X-Ins0 and Received ...
    assert message_headers(msg)[:3] == ["X-Ins0", "X-Ins1", "Received"]
    # ... and the next milter sees both at the top, with the Received hidden between.
    assert [name for name, _ in second.headers()] == ["X-Ins0", "X-Ins1", *SEEN]


# --- (b) smfi_chgheader ----------------------------------------------------------------


def delete_dup(*indexes: int) -> list[dict[str, Any]]:
    """chgheader actions deleting X-Dup #index (an empty value), in this order."""
    return [{"op": "chgheader", "name": "X-Dup", "idx": i, "value": ""} for i in indexes]


@pytest.mark.parametrize(
    ("idx", "left"), [(1, ["two", "three"]), (2, ["one", "three"]), (3, ["one", "two"])]
)
def test_chgheader_empty_value_deletes_the_nth_occurrence(
    postfix: PostfixInstance, probe: ProbeMilter, idx: int, left: list[str]
) -> None:
    msg = deliver_with(postfix, probe, delete_dup(idx))
    assert msg.get_all("X-Dup") == left


def test_chgheader_indexes_apply_to_the_headers_as_already_edited(
    postfix: PostfixInstance, probe: ProbeMilter
) -> None:
    """Deleting #1 then #2 leaves "two": after the first delete, #2 is "three".
    To delete several occurrences, go from the highest index down."""
    msg = deliver_with(postfix, probe, delete_dup(1, 2))
    assert msg.get_all("X-Dup") == ["two"]
    msg = deliver_with(postfix, probe, delete_dup(3, 1))
    assert msg.get_all("X-Dup") == ["two"]


def test_chgheader_does_not_count_postfix_hidden_received(
    postfix: PostfixInstance, probe: ProbeMilter
) -> None:
    """Unlike insheader, chgheader's index counts only headers the milter saw:
    Received #1 is the upstream one, Postfix's own stays."""
    msg = deliver_with(
        postfix, probe, [{"op": "chgheader", "name": "Received", "idx": 1, "value": ""}]
    )
    [received] = msg.get_all("Received")
    assert f"by {MYHOSTNAME} (Postfix)" in received


def test_chgheader_changes_in_place(postfix: PostfixInstance, probe: ProbeMilter) -> None:
    msg = deliver_with(
        postfix, probe, [{"op": "chgheader", "name": "X-Dup", "idx": 2, "value": "new"}]
    )
    assert msg.get_all("X-Dup") == ["one", "new", "three"]
    assert message_headers(msg) == ["Received", *SEEN]


def test_chgheader_index_past_the_count_adds_the_header(
    postfix: PostfixInstance, probe: ProbeMilter
) -> None:
    msg = deliver_with(
        postfix, probe, [{"op": "chgheader", "name": "X-Dup", "idx": 5, "value": "five"}]
    )
    assert msg.get_all("X-Dup") == ["one", "two", "three", "five"]
    assert message_headers(msg)[-1] == "X-Dup"


# --- (c) header value bytes, with and without SMFIP_HDR_LEADSPC ------------------------

ODD_HEADERS = (
    b"Subject: first\r\n second line\r\n\tthird\r\n"
    b"X-NoSpace:value\r\n"
    b"X-Two:  two\r\n"
    b"X-Tab:\tvalue\r\n"
    b"X-Empty:\r\n"
    b"X-Trail: v \r\n"
)
ODD_MESSAGE = (
    b"From: sender@sender.example\r\nTo: user@test.example\r\n"
    + ODD_HEADERS
    + b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <odd@sender.example>\r\n\r\nbody\r\n"
)


def test_header_values_without_leadspc(
    postfix: PostfixInstance, probe_milter: ProbeFactory
) -> None:
    """One leading space is removed (a tab or a second space stays); folds arrive as
    bare LF plus the original continuation whitespace."""
    probe = probe_milter()
    postfix.set_milters([probe.socket])
    assert postfix.send(SENDER, [RCPT], ODD_MESSAGE).accepted
    seen = dict(probe.headers())
    assert seen["Subject"] == b"first\n second line\n\tthird"
    assert seen["X-NoSpace"] == b"value"
    assert seen["X-Two"] == b" two"
    assert seen["X-Tab"] == b"\tvalue"
    assert seen["X-Empty"] == b""
    assert seen["X-Trail"] == b"v "


def test_header_values_with_leadspc(postfix: PostfixInstance, probe_milter: ProbeFactory) -> None:
    """With SMFIP_HDR_LEADSPC the value is every byte after the colon; folds are still
    bare LF (CRLF is never sent)."""
    probe = probe_milter(leadspc=True)
    postfix.set_milters([probe.socket])
    assert postfix.send(SENDER, [RCPT], ODD_MESSAGE).accepted
    seen = dict(probe.headers())
    assert seen["Subject"] == b" first\n second line\n\tthird"
    assert seen["X-NoSpace"] == b"value"
    assert seen["X-Two"] == b"  two"
    assert seen["X-Tab"] == b"\tvalue"
    assert seen["X-Empty"] == b""
    assert seen["X-Trail"] == b" v "
    assert all(b"\r" not in value for _, value in probe.headers())


def test_body_chunks_keep_crlf(postfix: PostfixInstance, probe_milter: ProbeFactory) -> None:
    probe = probe_milter()
    postfix.set_milters([probe.socket])
    assert postfix.send(SENDER, [RCPT], ODD_MESSAGE).accepted
    assert "".join(e["chunk"] for e in probe.events("body")) == "body\r\n"


ADDED: list[dict[str, Any]] = [
    {"op": "addheader", "name": "X-Plain", "value": "v"},
    {"op": "addheader", "name": "X-Space", "value": " v"},
    {"op": "addheader", "name": "X-Fold", "value": "a\n\tb"},
    {"op": "chgheader", "name": "X-Dup", "idx": 1, "value": "changed"},
]


def test_added_values_without_leadspc_get_one_space(
    postfix: PostfixInstance, probe_milter: ProbeFactory
) -> None:
    """Postfix writes "Name: " + value; a fold given as LF + whitespace stays a fold."""
    probe = probe_milter()
    postfix.set_milters([probe.socket])
    msg = deliver_with(postfix, probe, ADDED)
    raw = dict(msg.raw_headers)
    assert raw["X-Plain"] == b" v"
    assert raw["X-Space"] == b"  v"
    assert raw["X-Fold"] == b" a\n\tb"
    assert msg.get_all("X-Dup")[0] == "changed"
    assert msg.raw_headers[[n for n, _ in msg.raw_headers].index("X-Dup")][1] == b" changed"


def test_added_values_with_leadspc_are_written_verbatim(
    postfix: PostfixInstance, probe_milter: ProbeFactory
) -> None:
    """A milter that negotiated SMFIP_HDR_LEADSPC must supply the leading space."""
    probe = probe_milter(leadspc=True)
    postfix.set_milters([probe.socket])
    msg = deliver_with(postfix, probe, ADDED)
    raw = dict(msg.raw_headers)
    assert raw["X-Plain"] == b"v"
    assert raw["X-Space"] == b" v"
    assert raw["X-Fold"] == b"a\n\tb"
    assert msg.raw_headers[[n for n, _ in msg.raw_headers].index("X-Dup")][1] == b"changed"


def test_added_value_with_crlf_fold_keeps_a_stray_cr(
    postfix: PostfixInstance, probe: ProbeMilter
) -> None:
    """Fold with LF only: a CR in the value is stored as a literal byte."""
    msg = deliver_with(postfix, probe, [{"op": "addheader", "name": "X-Fold", "value": "a\r\n\tb"}])
    assert dict(msg.raw_headers)["X-Fold"] == b" a\r\n\tb"


# --- (d) macros at each stage, with Postfix's default milter_*_macros ------------------

CONNECT_MACROS = {"j", "_", "v", "{daemon_name}", "{daemon_addr}"}


def macros_by_stage(probe: ProbeMilter) -> dict[str, dict[str, str]]:
    """Macros getsymval() returned at each stage of the last milter session.

    libmilter keeps earlier stages' macros, so each stage shows its own and all before.
    """
    sessions: list[dict[str, dict[str, str]]] = []
    for e in probe.events():
        if e["event"] == "connect":
            sessions.append({})
        sessions[-1].setdefault(e["event"], e["macros"])
    return sessions[-1]


def test_macros_smtpd(postfix: PostfixInstance, probe: ProbeMilter) -> None:
    assert postfix.send(SENDER, [RCPT], MESSAGE).accepted
    m = macros_by_stage(probe)
    assert set(m["connect"]) == CONNECT_MACROS
    assert m["connect"]["j"] == MYHOSTNAME
    assert m["connect"]["{daemon_name}"] == MYHOSTNAME  # milter_macro_daemon_name default
    assert m["connect"]["{daemon_addr}"] == "127.0.0.1"
    assert m["connect"]["v"].startswith("Postfix 3.")
    # No reverse lookup here: the client name is "unknown" in "_", "[ADDR]" in connect().
    assert m["connect"]["_"] == "unknown [127.0.0.1]"
    assert probe.events("connect")[-1]["hostname"] == "[127.0.0.1]"
    # No TLS, so no HELO-stage macros at all.
    assert set(m["helo"]) == CONNECT_MACROS
    # MAIL FROM: no queue id yet (smtpd_delay_open_until_valid_rcpt), no {auth_*}
    # without SASL: getsymval() gives None for them.
    mail = set(m["envfrom"]) - CONNECT_MACROS
    assert mail == {"{mail_addr}", "{mail_host}", "{mail_mailer}"}
    assert (m["envfrom"]["{mail_addr}"], m["envfrom"]["{mail_host}"]) == (SENDER, "sender.example")
    assert m["envfrom"]["{mail_mailer}"] == "smtp"
    rcpt = set(m["envrcpt"]) - CONNECT_MACROS - mail
    assert rcpt == {"{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"}
    assert m["envrcpt"]["{rcpt_mailer}"] == "virtual"
    assert "i" not in m["envrcpt"]
    # The queue id arrives with DATA and stays to the end of the message.
    for stage in ("data", "header", "eoh", "body", "eom"):
        assert m[stage]["i"] == probe.events("eom")[-1]["macros"]["i"]
    # Never sent by default: the client's name and address come from connect()'s
    # arguments (or "_"), not {client_*} macros.
    every = set().union(*(set(v) for v in m.values()))
    for absent in ("{client_name}", "{client_addr}", "{client_port}", "{daemon_port}",
                   "{auth_authen}", "{auth_type}", "{tls_version}"):  # fmt: skip
        assert absent not in every


def test_macros_submission_daemon_name(postfix: PostfixInstance, probe: ProbeMilter) -> None:
    assert postfix.send(SENDER, [RCPT], MESSAGE, port=postfix.submission_port).accepted
    m = macros_by_stage(probe)
    assert m["connect"]["{daemon_name}"] == "ORIGINATING"
    assert m["eom"]["{daemon_name}"] == "ORIGINATING"


def test_macros_xclient_login_sets_auth_authen(
    postfix: PostfixInstance, probe: ProbeMilter
) -> None:
    """XCLIENT LOGIN=name makes Postfix send {auth_authen}=name and {auth_type}=XCLIENT
    from MAIL FROM on, without SASL being set up: a way to test "authenticated" paths."""
    result = postfix.send(
        SENDER,
        [RCPT],
        MESSAGE,
        xclient={"ADDR": "192.0.2.5", "NAME": "mail.sender.example", "LOGIN": "alice"},
    )
    assert result.accepted, result
    m = macros_by_stage(probe)
    assert m["connect"]["_"] == "mail.sender.example [192.0.2.5]"
    assert "{auth_authen}" not in m["helo"]
    assert (m["envfrom"]["{auth_authen}"], m["envfrom"]["{auth_type}"]) == ("alice", "XCLIENT")
    assert m["eom"]["{auth_authen}"] == "alice"
    assert "{auth_author}" not in m["eom"]


def test_macros_and_arguments_on_the_sendmail_path(
    postfix: PostfixInstance, probe_milter: ProbeFactory
) -> None:
    """non_smtpd_milters (pickup -> cleanup) see a fake localhost client, the queue id
    from MAIL FROM on, and a sender without angle brackets."""
    probe = probe_milter()
    postfix.set_milters([], [probe.socket])
    postfix.sendmail(SENDER, [RCPT], MESSAGE.replace(b"\r\n", b"\n"))
    postfix.wait_delivered(1)
    m = macros_by_stage(probe)
    [connect] = probe.events("connect")
    assert (connect["hostname"], connect["hostaddr"]) == ("localhost", ["127.0.0.1", 0])
    assert [e["helo"] for e in probe.events("helo")] == ["localhost"]
    assert [e["mail_from"] for e in probe.events("envfrom")] == [SENDER]  # no <>
    assert [e["rcpt"] for e in probe.events("envrcpt")] == [RCPT]
    assert m["connect"]["_"] == "localhost [127.0.0.1]"
    assert m["connect"]["{daemon_name}"] == MYHOSTNAME
    assert m["envfrom"]["i"] == m["eom"]["i"]
    assert set(m["envfrom"]) - CONNECT_MACROS == {"i", "{mail_addr}"}
    assert set(m["envrcpt"]) - CONNECT_MACROS == {"i", "{mail_addr}", "{rcpt_addr}"}


def test_smtpd_sender_and_recipient_have_angle_brackets(
    postfix: PostfixInstance, probe: ProbeMilter
) -> None:
    assert postfix.send(SENDER, [RCPT], MESSAGE).accepted
    assert [e["mail_from"] for e in probe.events("envfrom")] == [f"<{SENDER}>"]
    assert [e["rcpt"] for e in probe.events("envrcpt")] == [f"<{RCPT}>"]


def test_postfix_adds_missing_headers_before_milters_see_them(
    postfix: PostfixInstance, probe: ProbeMilter
) -> None:
    """For clients in mynetworks Postfix adds Message-Id, Date and From when missing,
    after the message's own headers, and the milter sees them."""
    assert postfix.send(SENDER, [RCPT], b"Subject: bare\r\n\r\nbody\r\n").accepted
    assert [name for name, _ in probe.headers()] == ["Subject", "Message-Id", "Date", "From"]


# --- (e) quarantine ends the chain -------------------------------------------------


def test_after_a_quarantine_no_later_milter_sees_the_message(
    postfix: PostfixInstance, probe_milter: ProbeFactory
) -> None:
    """milter8.c: once a milter asks for quarantine (HOLD), Postfix sends the end of
    the message to no later milter. So a filter of ours that wants a hold must not
    ask for it itself unless it is last (core/hold.py): the later ones would never
    scan the message."""
    first = probe_milter("first", actions=[{"op": "quarantine", "reason": "held here"}])
    second = probe_milter("second")
    postfix.set_milters([first.socket, second.socket])
    result = postfix.send(SENDER, [RCPT], MESSAGE)
    assert result.accepted, result
    assert postfix.wait_held(1) == [result.queue_id]
    assert first.events("eom")
    assert second.events("eom") == []
