"""The Python milter core's packet handling (core/pyserver.py) without a socket:
connect arguments as pymilter passes them, macros as libmilter keeps them, and
actions encoded as libmilter sends them. Over real sockets the core runs the
hostile-protocol battery and the adapter tests (tests/protocol)."""

from __future__ import annotations

import socket
import struct

import pytest

from milters.core import protocol
from milters.core.pyserver import ConnectionClosed, Context, _args, _connect_args


def connect_data(host: bytes, family: bytes, port: int = 25, addr: bytes = b"") -> bytes:
    return host + b"\0" + family + struct.pack(">H", port) + addr + b"\0"


def test_connect_arguments_as_pymilter_passes_them() -> None:
    assert _connect_args(connect_data(b"mx.example", b"4", 2525, b"192.0.2.1")) == (
        b"mx.example", socket.AF_INET, ("192.0.2.1", 2525))
    assert _connect_args(connect_data(b"mx", b"6", 25, b"2001:db8::1")) == (
        b"mx", socket.AF_INET6, ("2001:db8::1", 25))
    assert _connect_args(b"localhost\0U") == (b"localhost", 0, None)


@pytest.mark.parametrize("data", [
    b"hostonly",  # no NUL
    b"host\0",  # no family
    connect_data(b"h", b"X", 25, b"192.0.2.1"),  # unknown family
    connect_data(b"h", b"4", 25, b"999.1.2.3"),  # not an address
    connect_data(b"h", b"6", 25, b"::zz::1"),
])
def test_what_libmilter_refuses_closes(data: bytes) -> None:
    with pytest.raises(ConnectionClosed):
        _connect_args(data)


def test_mail_arguments_and_an_empty_mail() -> None:
    assert _args(b"<a@example.com>\0SIZE=10\0") == [b"<a@example.com>", b"SIZE=10"]
    with pytest.raises(ConnectionClosed):
        _args(b"")


def unpack(packet: bytes) -> tuple[bytes, bytes]:
    (size,) = struct.unpack(">I", packet[:4])
    assert size == len(packet) - 4
    return packet[4:5], packet[5:]


def test_actions_are_encoded_as_libmilter_sends_them() -> None:
    ctx = Context()
    ctx.addheader("X-A", " one")
    ctx.addheader("Authentication-Results", " mx; none", 0)
    ctx.chgheader("Subject", 1, " new")
    ctx.chgheader("X-Gone", 2, None)
    ctx.addrcpt("<b@example.com>")
    ctx.delrcpt("<c@example.com>")
    ctx.replacebody(b"body\r\n")
    ctx.quarantine("held")
    got = [unpack(p) for p in ctx.actions]
    assert got == [
        (protocol.SMFIR_ADDHEADER, b"X-A\0 one\0"),
        (protocol.SMFIR_INSHEADER, b"\0\0\0\0Authentication-Results\0 mx; none\0"),
        (protocol.SMFIR_CHGHEADER, b"\0\0\0\1Subject\0 new\0"),
        (protocol.SMFIR_CHGHEADER, b"\0\0\0\2X-Gone\0\0"),  # empty value: delete
        (protocol.SMFIR_ADDRCPT, b"<b@example.com>\0"),
        (protocol.SMFIR_DELRCPT, b"<c@example.com>\0"),
        (protocol.SMFIR_REPLBODY, b"body\r\n"),
        (protocol.SMFIR_QUARANTINE, b"held\0"),
    ]
    ctx.setreply("550", "5.7.1", "no 100%% way")
    assert unpack(ctx.reply or b"") == (protocol.SMFIR_REPLYCODE, b"550 5.7.1 no 100%% way\0")


def test_macros_later_stages_win_and_odd_lists_are_named() -> None:
    ctx = Context()
    ctx.macros[b"C"] = b"j\0mx.example\0_\0client\0"
    ctx.macros[b"M"] = b"{i}\0ABC123\0j\0other\0"
    ctx.macros[b"R"] = b"{rcpt_addr}\0u@example.com\0x\0"
    macros = ctx.read_macros()
    assert macros.get("{i}") == "ABC123" and macros.get("j") == "other"
    assert macros.odd_lists == ("R",)
    assert ctx.getsymval("_") == "client"


def test_macro_packets_are_kept_by_stage() -> None:
    from milters.core.adapter import Session
    from milters.core.pyserver import Connection
    from milters.core.sockets import kernel_timeval

    a, b = socket.socketpair()
    try:
        conn = Connection(a, Session, kernel_timeval(5.0))
        conn._on_macro(b"Cj\0mx.example\0{daemon_name}\0ORIGINATING\0")
        conn._on_macro(b"M{i}\0ABC\0{mail_addr}\0a@example.com\0x\0")  # odd: x dropped
        assert conn.ctx.read_macros().values == {
            "j": "mx.example", "{daemon_name}": "ORIGINATING", "i": "ABC",
            "{mail_addr}": "a@example.com"}
        assert conn.ctx.read_macros().odd_lists == ("M",)
        with pytest.raises(ConnectionClosed):
            conn._on_macro(b"")
    finally:
        a.close()
        b.close()


def test_a_silent_mta_is_timed_out_by_the_kernel() -> None:
    """The read timeout is the socket's SO_RCVTIMEO: a connection on which the MTA
    says nothing ends after it, and the socket is closed."""
    import threading

    from milters.core.adapter import Session
    from milters.core.pyserver import Connection
    from milters.core.sockets import kernel_timeval

    a, b = socket.socketpair()
    try:
        conn = Connection(a, Session, kernel_timeval(0.2))
        server = threading.Thread(target=conn.serve)
        server.start()
        server.join(30)
        assert not server.is_alive()
        assert a.fileno() == -1  # closed by serve()
        assert b.recv(10) == b""  # the MTA side sees the close
    finally:
        a.close()
        b.close()


def test_macros_are_parsed_again_only_after_a_new_packet() -> None:
    ctx = Context()
    ctx.macros[b"C"] = b"j\0mx.example\0"
    first = ctx.read_macros()
    assert ctx.read_macros() is first
    from milters.core.adapter import Session
    from milters.core.pyserver import Connection
    from milters.core.sockets import kernel_timeval

    a, b = socket.socketpair()
    try:
        conn = Connection(a, Session, kernel_timeval(5.0))
        conn.ctx = ctx
        conn._on_macro(b"M{mail_addr}\0a@example.com\0")
        assert ctx.read_macros() is not first
        assert ctx.read_macros().get("{mail_addr}") == "a@example.com"
    finally:
        a.close()
        b.close()


def test_a_resent_identical_macro_packet_keeps_the_parsed_view() -> None:
    ctx = Context()
    ctx.add_macros(b"C", b"j\0mx.example\0")
    ctx.add_macros(b"L", b"x\0header-stage\0")
    parsed = ctx.read_macros()
    ctx.add_macros(b"L", b"x\0header-stage\0")  # as Postfix resends before each header
    assert ctx.read_macros() is parsed
    # A resent earlier stage moves to the end: its values now win.
    ctx.add_macros(b"C", b"x\0connect-stage\0")
    assert ctx.read_macros().get("x") == "connect-stage"


def test_within_one_list_the_first_occurrence_wins_as_in_libmilter() -> None:
    """smfi_getsymval stops at the first name that matches (core/macroreader.py too);
    `{i}` and `i` are one name."""
    from milters.core.pyserver import _parse_stage

    assert _parse_stage(b"a\0one\0b\0two\0a\0three\0") == ({"a": "one", "b": "two"}, False)
    assert _parse_stage(b"{i}\0Q1\0i\0Q2\0") == ({"i": "Q1"}, False)
    assert _parse_stage(b"a\0one\0{b}\0") == ({"a": "one"}, True)


def test_the_adapter_reads_macros_by_their_normal_names() -> None:
    """The adapter looks names up in the readers' dicts directly (no normalize)."""
    from milters.core.macroreader import normalize
    from milters.core.macros import CONNECT_MACROS, EOM_MACROS, MAIL_MACROS

    for name in CONNECT_MACROS + MAIL_MACROS + EOM_MACROS:
        assert normalize(name) == name


def test_stages_read_in_steps_merge_as_one_read() -> None:
    steps = [(b"C", b"j\0mx\0_\0client\0"), (b"M", b"i\0Q1\0{mail_addr}\0a@b\0"),
             (b"R", b"{rcpt_addr}\0c@d\0i\0Q2\0"), (b"M", b"i\0Q3\0")]
    stepwise = Context()
    for stage, data in steps:
        stepwise.add_macros(stage, data)
        stepwise.read_macros()
    whole = Context()
    for stage, data in steps:
        whole.add_macros(stage, data)
    assert stepwise.read_macros() == whole.read_macros()
    # The resent M moved to the end: its i wins, its old {mail_addr} is gone.
    assert whole.read_macros().values == {"j": "mx", "_": "client", "{rcpt_addr}": "c@d",
                                          "i": "Q3"}
