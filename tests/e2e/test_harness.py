"""Self-tests of the end-to-end harness: the private Postfix and the recording probe.

Each checks one thing the filter tests rely on: that mail is delivered, that milter
actions reach the delivered file, the SMTP client, or the hold queue, and that
XCLIENT and sendmail(1) reach the milters as a real client would.
"""

from __future__ import annotations

from tests.e2e.filters import ProbeFactory
from tests.e2e.postfix import PostfixInstance
from tests.support.processes import free_port

SENDER = "sender@sender.example"
RCPT = "user@test.example"


def message(subject: str = "hello", extra: str = "") -> bytes:
    """A small message with Date and Message-ID, so Postfix adds no headers of its own."""
    return (
        f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: {subject}\r\n{extra}"
        "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@sender.example>\r\n\r\nbody\r\n"
    ).encode()


def test_delivery_without_milters(postfix: PostfixInstance) -> None:
    result = postfix.send(SENDER, [RCPT], message())
    assert result.accepted, result
    [msg] = postfix.wait_delivered(1)
    assert msg.get("Subject") == "hello"
    assert msg.delivered_to == RCPT
    # virtual(8) adds the envelope headers on top, then comes Postfix's Received.
    assert msg.header_names[:4] == ["Return-Path", "X-Original-To", "Delivered-To", "Received"]
    assert result.queue_id is not None
    assert f"id {result.queue_id}" in (msg.get("Received") or "")


def test_milter_header_reaches_the_delivered_file(
    postfix: PostfixInstance, probe_milter: ProbeFactory
) -> None:
    probe = probe_milter(actions=[{"op": "addheader", "name": "X-Probe", "value": "added"}])
    postfix.set_milters([probe.socket])
    result = postfix.send(SENDER, [RCPT], message())
    assert result.accepted, result
    [msg] = postfix.wait_delivered(1)
    assert msg.get_all("X-Probe") == ["added"]
    # addheader (no index) appends after the last header.
    assert msg.header_names[-1] == "X-Probe"


def test_milter_reject_reaches_the_client_at_end_of_data(
    postfix: PostfixInstance, probe_milter: ProbeFactory
) -> None:
    probe = probe_milter(
        actions=[
            {"op": "reply", "code": "550", "xcode": "5.7.1", "text": "probe says no"},
            {"op": "result", "value": "reject"},
        ]
    )
    postfix.set_milters([probe.socket])
    result = postfix.send(SENDER, [RCPT], message())
    assert result.rcpts[RCPT].code == 250
    assert result.data is not None
    assert (result.data.code, result.data.text) == (550, "5.7.1 probe says no")
    assert postfix.delivered() == []
    assert postfix.queue_ids() == []


def test_plain_milter_reject_gives_postfix_default_text(
    postfix: PostfixInstance, probe_milter: ProbeFactory
) -> None:
    probe = probe_milter(actions=[{"op": "result", "value": "reject"}])
    postfix.set_milters([probe.socket])
    result = postfix.send(SENDER, [RCPT], message())
    assert result.data is not None
    assert result.data.code == 550
    assert result.data.enhanced == "5.7.1"


def test_milter_down_tempfails(postfix: PostfixInstance) -> None:
    # Nothing listens there: with milter_default_action = tempfail the client gets 451.
    postfix.set_milters([f"inet:127.0.0.1:{free_port()}"])
    result = postfix.send(SENDER, [RCPT], message())
    assert not result.accepted
    refused = [r for r in (result.mail, *result.rcpts.values(), result.data) if r and r.code != 250]
    assert refused, result
    assert (refused[0].code, refused[0].enhanced) == (451, "4.7.1"), result
    assert postfix.queue_ids() == []


def test_sendmail_goes_through_non_smtpd_milters(
    postfix: PostfixInstance, probe_milter: ProbeFactory
) -> None:
    smtpd_probe = probe_milter(
        "smtpd", actions=[{"op": "addheader", "name": "X-Via", "value": "smtpd"}]
    )
    local_probe = probe_milter(
        "local", actions=[{"op": "addheader", "name": "X-Via", "value": "local"}]
    )
    postfix.set_milters([smtpd_probe.socket], [local_probe.socket])
    postfix.sendmail(SENDER, [RCPT], message("local").replace(b"\r\n", b"\n"))
    [msg] = postfix.wait_delivered(1)
    assert msg.get_all("X-Via") == ["local"]
    assert local_probe.events("eom")
    assert smtpd_probe.events() == []


def test_milter_chaining_second_sees_first_ones_headers(
    postfix: PostfixInstance, probe_milter: ProbeFactory
) -> None:
    first = probe_milter(
        "first",
        actions=[
            {"op": "addheader", "name": "X-First-Top", "value": "top", "idx": 0},
            {"op": "addheader", "name": "X-First-End", "value": "end"},
        ],
    )
    second = probe_milter("second")
    postfix.set_milters([first.socket, second.socket])
    assert postfix.send(SENDER, [RCPT], message()).accepted
    postfix.wait_delivered(1)
    seen = [name for name, _ in second.headers()]
    assert seen[0] == "X-First-Top"
    assert seen[-1] == "X-First-End"
    assert [name for name, _ in first.headers()] == seen[1:-1]


def test_quarantine_puts_the_message_on_hold(
    postfix: PostfixInstance, probe_milter: ProbeFactory
) -> None:
    probe = probe_milter(actions=[{"op": "quarantine", "reason": "suspicious"}])
    postfix.set_milters([probe.socket])
    result = postfix.send(SENDER, [RCPT], message())
    assert result.accepted, result  # the client cannot tell a held message apart
    assert postfix.wait_held(1) == [result.queue_id]
    assert postfix.delivered() == []
    # Postfix logs the hold but not the reason the milter gave.
    postfix.wait_log(rf"{result.queue_id}: milter-hold: END-OF-MESSAGE .*milter triggers HOLD")


def test_xclient_sets_the_client_the_milter_sees(
    postfix: PostfixInstance, probe_milter: ProbeFactory
) -> None:
    probe = probe_milter()
    postfix.set_milters([probe.socket])
    result = postfix.send(
        SENDER,
        [RCPT],
        message(),
        xclient={"ADDR": "192.0.2.5", "NAME": "mail.sender.example", "HELO": "mail.sender.example"},
    )
    assert result.xclient is not None and result.xclient.code == 220, result
    assert result.accepted, result
    # Postfix drops the milter session it opened for the real client (connect, helo,
    # close) and opens a new one with the XCLIENT attributes.
    first, second = probe.events("connect")
    assert (first["hostname"], first["hostaddr"][0]) == ("[127.0.0.1]", "127.0.0.1")
    assert (second["hostname"], second["hostaddr"][0]) == ("mail.sender.example", "192.0.2.5")
    helos = [e["helo"] for e in probe.events("helo")]
    assert helos == ["client.test.example", "mail.sender.example"]
    [envfrom] = probe.events("envfrom")
    assert envfrom["conn"] == second["conn"]
    [msg] = postfix.wait_delivered(1)
    assert "from mail.sender.example (mail.sender.example [192.0.2.5])" in (
        msg.get("Received") or ""
    )


def test_submission_port_has_its_own_daemon_name(
    postfix: PostfixInstance, probe_milter: ProbeFactory
) -> None:
    probe = probe_milter()
    postfix.set_milters([probe.socket])
    assert postfix.send(SENDER, [RCPT], message(), port=postfix.submission_port).accepted
    assert postfix.send(SENDER, [RCPT], message()).accepted
    names = [e["macros"].get("{daemon_name}") for e in probe.events("connect")]
    assert names == ["ORIGINATING", "mx.test.example"]
