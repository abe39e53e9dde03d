"""FILDES: a small message goes to a unix-socket clamd as a memfd descriptor.

Against the real test clamd: the same verdicts and byte counts as INSTREAM. Against
a small scripted clamd on a unix socket (a real clamd here cannot be made to
refuse a descriptor, as an AppArmor profile would): which command each message
is sent with, the fall-back to INSTREAM when the descriptor is refused, and that
a message refused both ways is a failure that does not stop descriptor passing.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from milters.clamav import ClamavFilter, ClamavSettings
from milters.clamav.clamd import (
    DESCRIPTOR_MAX,
    DescriptorRefused,
    parse_backend,
    scan,
    scan_descriptor,
    takes_descriptor,
)
from milters.core.config import GlobalSettings
from milters.core.filter import Env
from milters.core.model import Connection, Transaction, parse_message
from milters.core.verdict import Action
from tests.support.clamd import Clamd, eicar_in_body, eicar_zip, message

pytest_plugins = ("tests.support.clamd_plugin",)


def test_only_small_messages_to_unix_sockets_take_a_descriptor() -> None:
    unix = parse_backend("unix:/run/clamav/clamd.ctl")
    tcp = parse_backend("tcp:127.0.0.1:3310")
    assert takes_descriptor(unix, DESCRIPTOR_MAX)
    assert not takes_descriptor(unix, DESCRIPTOR_MAX + 1)
    assert not takes_descriptor(tcp, 100)


@pytest.mark.parametrize("raw", [message(), eicar_in_body(), eicar_zip()],
                         ids=["clean", "eicar-body", "eicar-zip"])
def test_descriptor_and_stream_agree_with_real_clamd(clamd: Clamd, raw: bytes) -> None:
    backend = parse_backend(clamd.unix)
    pieces = [b"From x\r\n", raw[:10], raw[10:]]
    by_fd = scan_descriptor(backend, pieces, 2.0, 5.0)
    streamed = scan(backend, pieces, 2.0, 5.0)
    assert by_fd == streamed
    assert by_fd.scanned == len(raw) + 8
    assert by_fd.infected is (raw != message())


class ScriptedClamd:
    """A unix socket server speaking enough of clamd: FILDES answered with
    `fildes_reply`, INSTREAM read to its end and answered `stream_reply`."""

    def __init__(self, path: str, fildes_reply: bytes, stream_reply: bytes) -> None:
        self.fildes_reply = fildes_reply
        self.stream_reply = stream_reply
        self.commands: list[str] = []
        self.sizes: list[int] = []
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                self._one(conn)

    def _one(self, conn: socket.socket) -> None:
        command = b""
        while not command.endswith(b"\0"):
            command += conn.recv(1)
        self.commands.append(command.rstrip(b"\0").decode())
        if command == b"zFILDES\0":
            fds = array.array("i")
            _, ancillary, _, _ = conn.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[:fds.itemsize])
            for fd in fds:
                self.sizes.append(os.fstat(fd).st_size)
                os.close(fd)
            conn.sendall(self.fildes_reply)
            return
        size = 0
        while True:
            head = b""
            while len(head) < 4:
                head += conn.recv(4 - len(head))
            (length,) = struct.unpack("!L", head)
            if not length:
                break
            left = length
            while left:
                left -= len(conn.recv(min(left, 65536)))
            size += length
        self.sizes.append(size)
        conn.sendall(self.stream_reply)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(timeout=2)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="milters-clamd-") as directory:
        yield Path(directory)


def _filter(spec: str) -> ClamavFilter:
    env = Env(GlobalSettings(authserv_id="mx.test.example"))
    return ClamavFilter(ClamavSettings(clamd_sockets=(spec,), connect_timeout=2.0,
                                       scan_timeout=5.0), env)


def _tx(raw: bytes) -> Transaction:
    tx = Transaction(Connection(client_addr="198.51.100.7"), mail_from="a@sender.example",
                     rcpt_to=["user@test.example"])
    tx.headers, body = parse_message(raw)
    tx.body.write(body)
    return tx


def test_small_message_goes_by_descriptor_large_one_streamed(socket_dir: Path) -> None:
    server = ScriptedClamd(str(socket_dir / "c.sock"), b"fd[9]: OK\0", b"stream: OK\0")
    try:
        flt = _filter(f"unix:{socket_dir / 'c.sock'}")
        assert flt.check(_tx(message())).action is Action.ACCEPT
        assert flt.check(_tx(message(b"x" * DESCRIPTOR_MAX))).action is Action.ACCEPT
        assert server.commands == ["zFILDES", "zINSTREAM"]
        # The descriptor holds the whole message as clamd is sent it.
        assert server.sizes[0] > len(message()) and server.sizes[1] > DESCRIPTOR_MAX
    finally:
        server.close()


def test_refused_descriptor_falls_back_to_stream_once_and_for_all(
        socket_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    refusal = b"fd[9]: File path check failure: Permission denied. ERROR\0"
    server = ScriptedClamd(str(socket_dir / "c.sock"), refusal,
                           b"stream: Eicar-Test-Signature FOUND\0")
    try:
        flt = _filter(f"unix:{socket_dir / 'c.sock'}")
        with caplog.at_level(logging.INFO, logger="milters.clamav.filter"):
            first = flt.check(_tx(message()))
            second = flt.check(_tx(message()))
        # The message refused as a descriptor is still scanned: streamed.
        assert first.action is Action.REJECT and second.action is Action.REJECT
        assert server.commands == ["zFILDES", "zINSTREAM", "zINSTREAM"]
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "streaming every message" in lines[0]
        assert "Permission denied" in lines[0]
    finally:
        server.close()


def test_refused_both_ways_is_a_failure_and_keeps_descriptors(socket_dir: Path) -> None:
    error = b"fd[9]: Can't allocate memory ERROR\0"
    server = ScriptedClamd(str(socket_dir / "c.sock"), error, b"stream: Can't allocate "
                           b"memory ERROR\0")
    try:
        flt = _filter(f"unix:{socket_dir / 'c.sock'}")
        assert flt.check(_tx(message())).action is Action.TEMPFAIL
        # clamd's trouble, not the descriptor's: the next message is passed one again.
        flt.check(_tx(message()))
        assert server.commands == ["zFILDES", "zINSTREAM", "zFILDES", "zINSTREAM"]
    finally:
        server.close()


def test_descriptor_refusal_is_its_own_error(socket_dir: Path) -> None:
    server = ScriptedClamd(str(socket_dir / "c.sock"), b"UNKNOWN COMMAND\0", b"")
    try:
        with pytest.raises(DescriptorRefused):
            scan_descriptor(parse_backend(f"unix:{socket_dir / 'c.sock'}"), [message()],
                            2.0, 5.0)
    finally:
        server.close()
