"""A real clamd on loopback with a signature database the tests write.

No signatures can be downloaded here (freshclam never runs), so the database
holds only test signatures: the EICAR test file's MD5 (an `.hdb` line, which
matches the file whole or a decoded attachment) and a body signature (`.ndb`)
for the EICAR string anywhere, e.g. inside a text body. Loading two signatures
takes clamd about 0.05 s.

clamd runs in the foreground as the user running the tests (no `User` line: it
owns every file it needs), with a TCP socket on a free loopback port and a
local socket in its own temporary directory. Readiness is `zPING` answered
with PONG, polled; teardown is SIGKILL.

Tests use the session fixture `clamd` from tests/support/clamd_plugin.py (load
it with `pytest_plugins = ("tests.support.clamd_plugin",)` in the test module);
the bench uses `running_clamd()` directly.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from milters.clamav.clamd import parse_backend, ping
from tests.support.processes import ManagedProcess, free_port

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_MD5_LINE = "44d88612fea8a8f36de82e1278abb02f:68:Eicar-Test-Signature"
BODY_SIGNATURE = "Eicar-Test-Body"
STREAM_MAX_LENGTH = 1024 * 1024  # small, so the tests can exceed it cheaply
READY_TIMEOUT = 20.0


def clamd_binary() -> str | None:
    return shutil.which("clamd") or next(
        (p for p in ("/usr/sbin/clamd", "/usr/bin/clamd") if os.access(p, os.X_OK)), None)


@dataclass(frozen=True)
class Clamd:
    """A running test clamd."""

    port: int
    unix_path: str
    directory: Path
    stream_max_length: int
    process: ManagedProcess

    @property
    def tcp(self) -> str:
        """Its TCP socket as a [clamav] clamd_sockets entry."""
        return f"tcp:127.0.0.1:{self.port}"

    @property
    def unix(self) -> str:
        return f"unix:{self.unix_path}"

    def log(self) -> str:
        return (self.directory / "clamd.log").read_text(errors="replace")


def write_database(db: Path) -> None:
    db.mkdir(parents=True, exist_ok=True)
    (db / "test.hdb").write_text(EICAR_MD5_LINE + "\n")
    (db / "test.ndb").write_text(f"{BODY_SIGNATURE}:0:*:{EICAR.hex()}\n")


@contextmanager
def running_clamd(stream_max_length: int = STREAM_MAX_LENGTH) -> Iterator[Clamd]:
    """Start clamd with test signatures only; yield once it answers PING."""
    binary = clamd_binary()
    if binary is None:
        raise RuntimeError("clamd is not installed: run packaging/dev/bootstrap.sh "
                           "(Debian package clamav-daemon)")
    # Short path: a unix socket path must fit in 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="milters-clamd-"))
    try:
        write_database(directory / "db")
        (directory / "tmp").mkdir()
        port = free_port()
        unix_path = str(directory / "clamd.sock")
        conf = directory / "clamd.conf"
        conf.write_text(
            "Foreground yes\n"
            f"TCPSocket {port}\nTCPAddr 127.0.0.1\n"
            f"LocalSocket {unix_path}\n"
            f"DatabaseDirectory {directory / 'db'}\n"
            f"TemporaryDirectory {directory / 'tmp'}\n"
            f"LogFile {directory / 'clamd.log'}\n"
            f"StreamMaxLength {stream_max_length}\n"
            "MaxThreads 8\n"
            "SelfCheck 0\n"  # the database never changes under a test
        )
        proc = ManagedProcess([binary, "-c", str(conf)], None)
        try:
            backend = parse_backend(f"tcp:127.0.0.1:{port}")
            deadline = time.monotonic() + READY_TIMEOUT
            while not ping(backend, timeout=1.0):
                if proc.proc.poll() is not None or time.monotonic() > deadline:
                    log = (directory / "clamd.log")
                    text = log.read_text(errors="replace") if log.exists() else ""
                    raise RuntimeError(f"clamd did not answer PING on port {port}; "
                                       f"output:\n{proc.output()}\nlog:\n{text}")
                time.sleep(0.02)
            yield Clamd(port, unix_path, directory, stream_max_length, proc)
        finally:
            proc.cleanup()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- messages -----------------------------------------------------------------


def message(body: bytes = b"Hello, just text.\r\n", headers: str = "",
            subject: str = "test") -> bytes:
    """A plain message; `headers` are extra CRLF-ended header lines."""
    return (
        "From: sender@sender.example\r\nTo: user@test.example\r\n"
        f"Subject: {subject}\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
        "Message-ID: <clamav-test@sender.example>\r\n" + headers + "\r\n"
    ).encode() + body


def eicar_in_body() -> bytes:
    return message(b"Please look at this:\r\n" + EICAR + b"\r\nBye.\r\n", subject="body")


def with_attachment(payload: bytes, filename: str, content_type: str) -> bytes:
    """multipart/mixed: a text part and `payload` as a base64 attachment."""
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    body = (
        b"--BOUNDARY\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        b"See the attachment.\r\n"
        b"--BOUNDARY\r\n"
        b"Content-Type: " + content_type.encode() + b"; name=\"" + filename.encode() + b"\"\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=\"" + filename.encode() + b"\"\r\n\r\n"
        + encoded + b"--BOUNDARY--\r\n"
    )
    # An unknown field first, as a filter later in the chain may add one: clamd
    # must still see a mail (the filter's mbox line takes care of that).
    headers = ('MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="BOUNDARY"\r\n')
    return b"X-First: unknown field\r\n" + message(body, headers, subject=filename)


def eicar_attachment() -> bytes:
    return with_attachment(EICAR, "eicar.com", "application/octet-stream")


def eicar_zip() -> bytes:
    """EICAR inside a zip file, attached base64-encoded."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("readme.txt", "nothing to see\n")
        zf.writestr("eicar.com", EICAR)
    return with_attachment(buf.getvalue(), "files.zip", "application/zip")
