"""The milter client (milters/client/) against real pymilter milters and scripted fakes.

The pymilter milters live in tests/protocol/milters/ and run as subprocesses,
one per module where they keep no state between tests. The fakes are tiny
socket servers on a thread, for what a well-behaved milter never sends.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from milters.client.edits import apply_header_edits, parse_message
from milters.client.errors import MilterClosed, MilterTimeout, MilterUnavailable, ProtocolError
from milters.client.probe import ProbeResult, probe, run_transaction
from milters.client.replies import RecipientChange, SenderChange
from milters.client.report import format_probe
from milters.client.session import MilterSession
from milters.client.wire import ActionFlag, ProtocolFlag
from milters.core.envelope import Envelope
from milters.core.verdict import EditKind, HeaderEdit
from tests.support.processes import free_port

MILTERS_DIR = Path(__file__).parent / "milters"

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: hello\r\n"
    b"  folded world\r\n"
    b"X-Remove: remove me\r\n"
    b"X-Tab:\ttabbed\r\n"
    b"X-Two:  two spaces\r\n"
    b"\r\n"
    b"first line\r\n"
    b"second line\n"
    b"last line without newline"
)
BODY_CRLF = b"first line\r\nsecond line\r\nlast line without newline\r\n"


@pytest.fixture(scope="module")
def milters(start_test_milter: Callable[..., str]) -> dict[str, str]:
    """The stateless test milters, started once for the module: name -> socket spec."""
    return {
        "recorder": start_test_milter("recorder.py"),
        "leadspc": start_test_milter("recorder.py", "--leadspc"),
        "symlist": start_test_milter("recorder.py", "--symlist"),
        "actions": start_test_milter("actions.py"),
        "noreply": start_test_milter("noreply.py"),
    }


def record_of(result: ProbeResult) -> dict[str, Any]:
    """What the recorder milter saw, from its X-Record header."""
    (edit,) = [e for e in result.header_edits if e.name == "X-Record"]
    data: dict[str, Any] = json.loads(base64.b64decode(edit.value))
    return data


def stage(result: ProbeResult, name: str) -> list[Any]:
    return [s for s in result.stages if s.stage == name]


# -- what goes on the wire ---------------------------------------------------


def test_accepting_milter_sees_what_postfix_sends(milters: dict[str, str]) -> None:
    env = Envelope(
        client_ip="192.0.2.7",
        client_port=41234,
        helo="mail.sender.example",
        mail_from="alice@example.com",
        rcpt_to=["bob@example.net", "carol@example.org"],
        auth_user="alice",
        daemon_name="mx.test.example",
        queue_id="4F2A3B1C0D",
        macros={"{tls_version}": "TLSv1.3"},
    )
    result = probe(milters["recorder"], MESSAGE, env, timeout=5)

    assert result.verdict == "accept"
    assert result.decided_at == "eom"
    assert ProtocolFlag.NOUNKNOWN in result.negotiated.protocol  # no unknown() callback
    assert result.negotiated.version == 6
    rec = record_of(result)
    conn, msg = rec["conn"], rec["msg"]
    # Postfix's "unknown" client name becomes "[addr]" (milter8.c).
    assert conn["hostname"] == "[192.0.2.7]"
    assert conn["hostaddr"] == ["192.0.2.7", 41234]
    assert conn["helo"] == "mail.sender.example"
    assert conn["macros"]["connect"] == {
        "j": "mx.test.example",
        "{daemon_name}": "mx.test.example",
        "{daemon_addr}": "127.0.0.1",
        "v": "Postfix 3.7.11",
        "_": "unknown [192.0.2.7]",
    }
    assert conn["macros"]["helo"] == {"{tls_version}": "TLSv1.3"}
    assert msg["mail"] == ["<alice@example.com>"]
    assert msg["rcpt"] == [["<bob@example.net>"], ["<carol@example.org>"]]
    # The queue id is not known at MAIL FROM (Postfix opens the queue file later).
    assert msg["macros"]["mail"] == {
        "{auth_type}": "PLAIN",
        "{auth_authen}": "alice",
        "{mail_addr}": "alice@example.com",
        "{mail_host}": "example.com",
        "{mail_mailer}": "smtp",
    }
    assert msg["macros"]["rcpt"][0]["{rcpt_addr}"] == "bob@example.net"
    assert msg["macros"]["rcpt"][1]["i"] == "4F2A3B1C0D"
    for name in ("data", "eoh", "eom"):
        assert msg["macros"][name] == {"i": "4F2A3B1C0D"}
    # One leading space eaten (not a tab), folded lines joined with "\n".
    assert msg["headers"] == [
        ["From", "Alice <alice@example.com>"],
        ["To", "bob@example.net"],
        ["Subject", "hello\n  folded world"],
        ["X-Remove", "remove me"],
        ["X-Tab", "\ttabbed"],
        ["X-Two", " two spaces"],
    ]
    assert msg["body"] == BODY_CRLF.decode()
    assert conn["aborts"] == 0


def test_leading_space_kept_when_negotiated(milters: dict[str, str]) -> None:
    result = probe(milters["leadspc"], MESSAGE, timeout=5)
    assert result.negotiated.leading_space
    headers = record_of(result)["msg"]["headers"]
    assert headers[0] == ["From", " Alice <alice@example.com>"]
    assert headers[2] == ["Subject", " hello\n  folded world"]
    assert headers[5] == ["X-Two", "  two spaces"]


def test_macro_lists_requested_by_the_milter_replace_the_defaults(
    milters: dict[str, str],
) -> None:
    result = probe(milters["symlist"], MESSAGE, Envelope(auth_user="alice"), timeout=5)
    assert dict(result.negotiated.macro_lists) == {
        "connect": ("j",),
        "mail": ("{mail_addr}",),
    }
    rec = record_of(result)
    assert rec["conn"]["macros"]["connect"] == {"j": "mta.localhost"}
    assert rec["msg"]["macros"]["mail"] == {"{mail_addr}": "sender@example.com"}
    # Stages the milter did not name keep Postfix's defaults.
    assert set(rec["msg"]["macros"]["rcpt"][0]) == {"{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"}


def test_body_goes_in_chunks_of_65535_bytes(milters: dict[str, str]) -> None:
    body = b"".join(b"line %06d of a long body\n" % i for i in range(6000))
    message = b"Subject: big\n\n" + body
    result = probe(milters["recorder"], message, timeout=5)
    msg = record_of(result)["msg"]
    wire_body = body.replace(b"\n", b"\r\n")
    assert msg["body_len"] == len(wire_body)
    assert msg["body_sha256"] == hashlib.sha256(wire_body).hexdigest()
    assert msg["chunks"][:-1] == [65535] * (len(msg["chunks"]) - 1)
    assert sum(msg["chunks"]) == len(wire_body)


def test_two_messages_on_one_connection_with_abort_between(milters: dict[str, str]) -> None:
    with MilterSession(milters["recorder"], timeout=5) as session:
        session.connect(Envelope())
        session.helo()
        first = run_transaction(session, MESSAGE, Envelope(queue_id="AAAAAAAAAA"))
        second = run_transaction(
            session,
            b"Subject: second\r\n\r\nbody\r\n",
            Envelope(mail_from="other@example.org", queue_id="BBBBBBBBBB"),
        )
    rec1, rec2 = record_of(first), record_of(second)
    assert rec1["conn"]["messages"] == 1
    # The SMFIC_ABORT sent after the first (finished) message does not reach
    # xxfi_abort: libmilter calls it only for a message in progress.
    assert rec2["conn"]["messages"] == 2 and rec2["conn"]["aborts"] == 0
    assert rec2["msg"]["mail"] == ["<other@example.org>"]
    assert rec2["msg"]["headers"] == [["Subject", "second"]]
    assert rec2["msg"]["macros"]["eom"] == {"i": "BBBBBBBBBB"}


def test_explicit_abort_then_new_transaction(milters: dict[str, str]) -> None:
    with MilterSession(milters["recorder"], timeout=5) as session:
        session.connect()
        session.helo()
        assert session.mail("first@example.com").action == "continue"
        assert session.rcpt("x@example.com").action == "continue"
        session.abort()
        result = run_transaction(session, MESSAGE)
    assert record_of(result)["conn"]["aborts"] == 1
    assert record_of(result)["conn"]["messages"] == 2


def test_abrupt_disconnect_mid_message_leaves_the_milter_serving(
    milters: dict[str, str],
) -> None:
    session = MilterSession(milters["recorder"], timeout=5)
    session.open()
    session.connect()
    session.mail()
    session.rcpt("x@example.com")
    session.data()
    session.header("Subject", b" cut short")
    session.disconnect()
    assert not session.is_open
    assert probe(milters["recorder"], MESSAGE, timeout=5).verdict == "accept"


# -- replies -------------------------------------------------------------------


def test_reject_at_rcpt_rejects_only_that_recipient(milters: dict[str, str]) -> None:
    env = Envelope(rcpt_to=["ok@example.com", "blocked@example.com", "fine@example.com"])
    result = probe(milters["actions"], MESSAGE, env, timeout=5)
    rcpts = stage(result, "rcpt")
    assert [r.action for r in rcpts] == ["continue", "reject", "continue"]
    assert rcpts[1].custom_reply
    assert result.rejected_recipients == {
        "blocked@example.com": "550 5.7.1 Recipient blocked by test policy"
    }
    # The other recipients carry on to the end of the message.
    assert result.verdict == "continue"
    assert result.decided_at == "eom"
    assert result.delivered


def test_all_recipients_rejected_ends_before_data(milters: dict[str, str]) -> None:
    env = Envelope(rcpt_to=["plainreject@example.com", "tempfail-rcpt@example.com"])
    result = probe(milters["actions"], MESSAGE, env, timeout=5)
    assert result.rejected_recipients == {
        "plainreject@example.com": "550 5.7.1 Command rejected",
        "tempfail-rcpt@example.com": "451 4.7.1 Service unavailable - try again later",
    }
    assert result.verdict == "tempfail"
    assert result.decided_at == "rcpt"
    assert not stage(result, "data") and not stage(result, "eom")


def test_reject_at_mail_ends_the_transaction(milters: dict[str, str]) -> None:
    env = Envelope(mail_from="reject-mail@example.com")
    result = probe(milters["actions"], MESSAGE, env, timeout=5)
    assert result.verdict == "reject"
    assert result.decided_at == "mail"
    assert result.smtp_reply == "550 5.7.1 Sender refused by test"
    assert not stage(result, "rcpt")


def test_accept_at_mail_stops_the_events_for_the_message(milters: dict[str, str]) -> None:
    result = probe(milters["actions"], MESSAGE, Envelope(mail_from="accept-mail@example.com"))
    assert (result.verdict, result.decided_at) == ("accept", "mail")
    assert [s.stage for s in result.stages] == ["connect", "helo", "mail"]


@pytest.mark.parametrize(
    ("rcpt", "verdict", "reply"),
    [
        ("tempfail", "tempfail", "451 4.7.1 Service unavailable - try again later"),
        ("greylist", "tempfail", "451 4.7.1 Greylisted, try again later"),
        ("discard", "discard", ""),
        ("percent", "reject", "550 5.7.1 100% spam"),
    ],
)
def test_end_of_message_verdicts(
    milters: dict[str, str], rcpt: str, verdict: str, reply: str
) -> None:
    result = probe(milters["actions"], MESSAGE, Envelope(rcpt_to=[f"{rcpt}@example.com"]))
    assert (result.verdict, result.smtp_reply, result.decided_at) == (verdict, reply, "eom")
    assert not result.delivered


def test_modifications_at_end_of_message(milters: dict[str, str]) -> None:
    env = Envelope(rcpt_to=["modify@example.com"])
    result = probe(milters["actions"], MESSAGE, env, timeout=5)
    assert result.verdict == "accept"
    assert result.quarantine == "suspicious attachment"
    assert result.header_edits == [
        HeaderEdit(EditKind.ADD, "X-Added", "added value"),
        HeaderEdit(EditKind.INSERT, "X-Top", "at the top", 0),
        HeaderEdit(EditKind.CHANGE, "Subject", "changed subject", 1),
        HeaderEdit(EditKind.DELETE, "X-Remove", "", 1),
    ]
    assert result.recipient_changes == [
        RecipientChange("add", "<added@example.org>"),
        RecipientChange("add", "<param@example.org>", "NOTIFY=NEVER"),
        RecipientChange("delete", "<modify@example.com>"),
    ]
    assert result.sender_change == SenderChange("<bounce@example.org>", "BODY=8BITMIME")
    headers, _ = parse_message(MESSAGE)
    final = apply_header_edits(headers, result.header_edits)
    assert [name for name, _ in final] == [
        "X-Top", "From", "To", "Subject", "X-Tab", "X-Two", "X-Added",
    ]  # fmt: skip
    assert dict(final)["Subject"] == b" changed subject"
    assert dict(final)["X-Top"] == b" at the top"


def test_replaced_body_is_collected_from_all_chunks(milters: dict[str, str]) -> None:
    result = probe(milters["actions"], MESSAGE, Envelope(rcpt_to=["replbody@example.com"]))
    assert result.replaced_body == b"replaced line\r\n" * 14000
    assert result.verdict == "accept"


def test_progress_keeps_the_client_waiting(milters: dict[str, str]) -> None:
    # Three 0.3 s pauses each ended by SMFIR_PROGRESS: longer in total than the
    # 0.6 s read timeout, but no single wait is.
    env = Envelope(rcpt_to=["progress@example.com"])
    result = probe(milters["actions"], MESSAGE, env, timeout=0.6)
    assert result.verdict == "accept"
    assert stage(result, "eom")[0].elapsed_ms >= 900


def test_skip_stops_the_body_chunks(milters: dict[str, str]) -> None:
    message = b"Subject: skip\r\n\r\n" + b"x" * 200_000 + b"\r\n"
    result = probe(milters["actions"], message, Envelope(rcpt_to=["skipbody@example.com"]))
    (body,) = stage(result, "body")
    assert body.action == "skip"
    assert HeaderEdit(EditKind.ADD, "X-Body-Chunks", "1") in result.header_edits


def test_negotiated_away_steps_and_no_reply_steps(milters: dict[str, str]) -> None:
    env = Envelope(rcpt_to=["x@example.com", "y@example.com"])
    result = probe(milters["noreply"], MESSAGE, env, timeout=2)
    proto = result.negotiated.protocol
    for flag in (ProtocolFlag.NOCONNECT, ProtocolFlag.NOHELO, ProtocolFlag.NODATA,
                 ProtocolFlag.NOBODY, ProtocolFlag.NR_RCPT, ProtocolFlag.NR_HDR,
                 ProtocolFlag.NR_EOH):  # fmt: skip
        assert flag in proto, flag
    assert not any(s.sent for s in result.stages if s.stage in ("connect", "helo", "data"))
    assert not stage(result, "body")[0].sent
    assert all(not s.replied for s in result.stages if s.stage in ("rcpt", "header", "eoh"))
    assert result.header_edits == [
        HeaderEdit(
            EditKind.ADD, "X-Seen", "rcpts=<x@example.com>,<y@example.com> headers=6 eoh=True"
        )
    ]
    assert result.elapsed_ms < 2000


# -- failures --------------------------------------------------------------------


def test_a_hanging_milter_times_out(milters: dict[str, str]) -> None:
    env = Envelope(rcpt_to=["hang@example.com"])
    started = time.monotonic()
    with pytest.raises(MilterTimeout, match=r"did not answer rcpt within 0\.5 s"):
        probe(milters["actions"], MESSAGE, env, timeout=0.5)
    assert time.monotonic() - started < 5


def test_a_milter_that_dies_mid_dialogue(start_milter_process: Callable[..., Any]) -> None:
    port = free_port()
    argv = [sys.executable, str(MILTERS_DIR / "crash.py"), str(port)]
    start_milter_process(argv, port)
    message = b"Subject: x\r\nX-Crash: now\r\n\r\nbody\r\n"
    with pytest.raises(MilterClosed, match=r"closed the connection .* reply to header"):
        probe(f"inet:{port}@127.0.0.1", message, timeout=5)


def test_no_recipient_is_a_usage_error(milters: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="no recipient"):
        probe(milters["recorder"], MESSAGE, Envelope(rcpt_to=[]), timeout=5)


def test_nothing_listening() -> None:
    with pytest.raises(MilterUnavailable, match="cannot connect to milter"):
        probe(f"inet:{free_port()}@127.0.0.1", MESSAGE, timeout=2)


# -- scripted fakes for what libmilter never sends ---------------------------------


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def read_packet(conn: socket.socket) -> tuple[bytes, bytes]:
    (length,) = struct.unpack(">I", _recv_exact(conn, 4))
    packet = _recv_exact(conn, length)
    return packet[:1], packet[1:]


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


def optneg(version: int = 6, actions: int = 0x1FF, protocol: int = 0) -> bytes:
    return packet(b"O", struct.pack(">III", version, actions, protocol))


Script = Callable[["FakeMilter", socket.socket], None]


class FakeMilter:
    """A one-connection scripted milter on a thread (inet, or unix with `path`)."""

    def __init__(self, script: Script, path: Path | None = None) -> None:
        if path is None:
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.spec = f"inet:127.0.0.1:{self.listener.getsockname()[1]}"
        else:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(str(path))
            self.listener.listen(1)
            self.spec = f"unix:{path}"
        self.received: list[tuple[bytes, bytes]] = []
        self.script = script
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn, contextlib.suppress(EOFError, OSError):
            self.script(self, conn)

    def until(self, conn: socket.socket, cmd: bytes) -> bytes:
        """Read packets up to and including the first `cmd`; its data."""
        while True:
            got = read_packet(conn)
            self.received.append(got)
            if got[0] == cmd:
                return got[1]

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=5)


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeMilter]]:
    made: list[FakeMilter] = []

    def make(script: Script, path: Path | None = None) -> FakeMilter:
        made.append(FakeMilter(script, path))
        return made[-1]

    yield make
    for f in made:
        f.close()


def responder(protocol: int) -> Script:
    """A fake that negotiates `protocol` and answers CONTINUE (ACCEPT at end of
    message) to every command that expects a reply, until QUIT."""

    def script(f: FakeMilter, conn: socket.socket) -> None:
        f.until(conn, b"O")
        conn.sendall(optneg(protocol=protocol))
        no_reply = {b"D", b"A"} | ({b"L"} if protocol & 0x80 else set())
        while True:
            cmd, data = read_packet(conn)
            f.received.append((cmd, data))
            if cmd == b"Q":
                return
            if cmd not in no_reply:
                conn.sendall(packet(b"a" if cmd == b"E" else b"c"))

    return script


def test_optneg_offers_what_postfix_offers(fake: Any) -> None:
    def script(f: FakeMilter, conn: socket.socket) -> None:
        f.until(conn, b"O")
        conn.sendall(optneg(protocol=0x27F))  # takes no envelope or content steps
        f.until(conn, b"E")
        conn.sendall(packet(b"c"))
        f.until(conn, b"Q")

    f = fake(script)
    result = probe(f.spec, MESSAGE, timeout=2)
    f.thread.join(timeout=5)
    version, actions, proto = struct.unpack(">III", f.received[0][1])
    assert (version, actions, proto) == (6, 0x1FF, 0x1FFFFF)
    assert ActionFlag(actions) == ActionFlag(0x1FF)
    assert result.verdict == "continue"
    # Envelope stages negotiated away still get their macros (milter8.c).
    cmds = [c for c, _ in f.received]
    assert cmds == [b"O", b"D", b"D", b"D", b"D", b"D", b"D", b"E", b"A", b"Q"]
    assert [d[:1] for c, d in f.received if c == b"D"] == [b"C", b"H", b"M", b"R", b"T", b"E"]


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (packet(b"Z"), "unknown reply code b'Z' in reply to connect"),
        (packet(b"O", b"\0" * 12), "unexpected reply SMFIC_OPTNEG to connect"),
        (packet(b"c", b"junk"), "SMFIR_CONTINUE to connect carries 4 unexpected data bytes"),
        (packet(b"h", b"X-A\0b\0"), "SMFIR_ADDHEADER in reply to connect"),
        (packet(b"y", b"hello\0"), "malformed REPLYCODE 'hello'"),
        (struct.pack(">I", 0), "bad packet length 0"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "unreasonable packet length"),
    ],
)
def test_malformed_replies_raise_protocol_error(fake: Any, reply: bytes, error: str) -> None:
    def script(f: FakeMilter, conn: socket.socket) -> None:
        f.until(conn, b"O")
        conn.sendall(optneg())
        f.until(conn, b"C")
        conn.sendall(reply)
        time.sleep(0.5)

    f = fake(script)
    with pytest.raises(ProtocolError, match=error.replace("(", r"\(")) as info:
        probe(f.spec, MESSAGE, timeout=2)
    assert f.spec.removeprefix("inet:") in str(info.value)


def test_wire_sequence_of_two_messages(fake: Callable[..., FakeMilter]) -> None:
    f = fake(responder(protocol=0x1 | 0x2 | 0x80))  # NOCONNECT NOHELO NR_HDR
    message = b"A: 1\r\nB: 2\r\n\r\nbody\r\n"
    with MilterSession(f.spec, timeout=2) as session:
        session.connect(Envelope(queue_id="QQQQQQQQQQ"))
        session.helo()
        for _ in range(2):
            assert run_transaction(session, message).verdict == "accept"
    f.thread.join(timeout=5)
    wire = [c.decode() + (d[:1].decode() if c == b"D" else "") for c, d in f.received]
    one = ["DM", "M", "DR", "R", "DT", "T", "DL", "L", "DL", "L", "DN", "N", "DB", "B",
           "DE", "E", "A"]  # fmt: skip
    assert wire == ["O", "DC", "DH", *one, *one, "Q"]
    header_macros = [d for c, d in f.received if c == b"D" and d[:1] == b"L"]
    assert header_macros[0] == b"Li\0QQQQQQQQQQ\0"
    headers = [d for c, d in f.received if c == b"L"]
    assert headers[:2] == [b"A\x001\0", b"B\x002\0"]
    assert next(d for c, d in f.received if c == b"B") == b"body\r\n"


def test_unix_socket(fake: Callable[..., FakeMilter], tmp_path: Path) -> None:
    f = fake(responder(protocol=0), tmp_path / "milter.sock")
    result = probe(f.spec, MESSAGE, timeout=2)
    assert result.verdict == "accept"
    assert [s.stage for s in result.stages if s.replied] == [
        "connect", "helo", "mail", "rcpt", "data", *["header"] * 6, "eoh", "body", "eom",
    ]  # fmt: skip


def test_malformed_modification_raises_protocol_error(fake: Any) -> None:
    def script(f: FakeMilter, conn: socket.socket) -> None:
        f.until(conn, b"O")
        conn.sendall(optneg(protocol=0x27F))
        f.until(conn, b"E")
        conn.sendall(packet(b"m", b"\0\0"))  # CHGHEADER without its index

    with pytest.raises(ProtocolError, match="SMFIR_CHGHEADER packet too short"):
        probe(fake(script).spec, MESSAGE, timeout=2)


def test_newer_protocol_version_is_refused(fake: Any) -> None:
    def script(f: FakeMilter, conn: socket.socket) -> None:
        f.until(conn, b"O")
        conn.sendall(optneg(version=7))

    with pytest.raises(ProtocolError, match="unsupported milter protocol version 7"):
        probe(fake(script).spec, MESSAGE, timeout=2)


def test_quarantine_and_replycode_at_connect(fake: Any) -> None:
    def script(f: FakeMilter, conn: socket.socket) -> None:
        f.until(conn, b"O")
        conn.sendall(optneg())
        f.until(conn, b"C")
        conn.sendall(packet(b"p") + packet(b"q", b"held\0") + packet(b"y", b"554 5.7.1 go away\0"))
        time.sleep(0.5)

    result = probe(fake(script).spec, MESSAGE, timeout=2)
    assert (result.verdict, result.decided_at) == ("reject", "connect")
    assert result.smtp_reply == "554 5.7.1 go away"
    assert result.quarantine == "held"
    assert [s.stage for s in result.stages] == ["connect"]


# -- pure helpers --------------------------------------------------------------------


def test_parse_message_lf_and_edge_cases() -> None:
    headers, body = parse_message(b"A: 1\nB:2\n\tcont\n\nx\ny")
    assert headers == [("A", b" 1"), ("B", b"2\n\tcont")]
    assert body == b"x\r\ny\r\n"
    assert parse_message(b"A: 1\r\n") == ([("A", b" 1")], b"")
    assert parse_message(b"A: 1\r\n\r\n") == ([("A", b" 1")], b"")
    # A line that is no header field starts the body.
    assert parse_message(b"A: 1\r\nnot a header\r\n") == ([("A", b" 1")], b"not a header\r\n")
    assert parse_message(b"Name : v\r\n")[0] == [("Name", b" v")]


def test_apply_header_edits_follows_postfix() -> None:
    headers = [("Received", b" one"), ("Subject", b" s"), ("Received", b" two")]
    edits = [
        HeaderEdit(EditKind.CHANGE, "received", "second", 2),
        HeaderEdit(EditKind.DELETE, "Received", "", 1),
        HeaderEdit(EditKind.CHANGE, "X-New", "appended", 1),  # missing: appended
        HeaderEdit(EditKind.DELETE, "X-Missing", "", 1),  # missing: nothing
        HeaderEdit(EditKind.INSERT, "X-Far", "end", 99),  # past the end: appended
        HeaderEdit(EditKind.CHANGE, "Subject", "zero means first", 0),
    ]
    assert apply_header_edits(headers, edits) == [
        ("Subject", b" zero means first"),
        ("received", b" second"),
        ("X-New", b" appended"),
        ("X-Far", b" end"),
    ]
    assert apply_header_edits([], [HeaderEdit(EditKind.ADD, "A", " x")], leading_space=True) == [
        ("A", b" x")
    ]


def test_envelope_from_message() -> None:
    env = Envelope.from_message(
        b"From: A <a@example.com>\r\nTo: b@example.net, C <c@example.org>\r\n"
        b"Cc: d@example.com\r\n\r\n"
    )
    assert env.mail_from == "a@example.com"
    assert env.rcpt_to == ["b@example.net", "c@example.org", "d@example.com"]
    assert Envelope.from_message(b"From: a@x\r\n\r\n", mail_from="").mail_from == ""


def test_format_probe_and_json(milters: dict[str, str]) -> None:
    env = Envelope(rcpt_to=["modify@example.com", "blocked@example.com"])
    result = probe(milters["actions"], MESSAGE, env, timeout=5)
    text = format_probe(result)
    for expected in (
        f"milter {result.spec}: protocol version 6",
        "verdict:  ACCEPT at eom",
        "recipient blocked@example.com rejected: 550 5.7.1 Recipient blocked by test policy",
        "quarantine (Postfix hold queue): suspicious attachment",
        "insert   at 0: X-Top: at the top",
        "delete   X-Remove[1]",
        "sender -> <bounce@example.org> BODY=8BITMIME",
        "recipient + <param@example.org> NOTIFY=NEVER",
    ):
        assert expected in text, (expected, text)
    data = json.loads(result.to_json())
    assert data["verdict"] == "accept"
    assert data["quarantine"] == "suspicious attachment"
    assert data["rejected_recipients"] == {
        "blocked@example.com": "550 5.7.1 Recipient blocked by test policy"
    }
    assert "CHGHDRS" in data["negotiated"]["actions"]
    assert data["stages"][0]["stage"] == "connect"


# -- the suite's own filters ---------------------------------------------------------


def test_start_filter_runs_a_suite_filter(start_filter: Callable[..., str]) -> None:
    try:
        from milters import registry
    except ImportError as e:  # the CLI and registry are being written alongside
        pytest.skip(f"milters.registry not importable yet: {e}")
    if "checks" not in registry.FILTERS:
        pytest.skip("no checks filter registered yet")
    spec = start_filter("checks", "")
    result = probe(spec, MESSAGE, timeout=10)
    assert result.verdict in ("accept", "continue")
