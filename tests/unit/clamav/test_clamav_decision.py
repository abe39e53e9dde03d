"""The clamav filter's decision, called directly, against a real clamd with test signatures.

Also the failure cases with no clamd at all (a refused port), one that never
answers (a socket that accepts and stays silent), and a clamd that is really
there behind a dead one (failover).
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from milters.clamav import ClamavFilter, ClamavSettings
from milters.clamav.filter import MBOX_LINE
from milters.core.config import GlobalSettings
from milters.core.filter import Env
from milters.core.model import Connection, Transaction, parse_message
from milters.core.verdict import Action, EditKind, HeaderEdit, Verdict
from tests.support.clamd import (
    EICAR,
    Clamd,
    eicar_attachment,
    eicar_in_body,
    eicar_zip,
    message,
    with_attachment,
)
from tests.support.processes import free_port

pytest_plugins = ("tests.support.clamd_plugin",)

FilterFactory = Callable[..., ClamavFilter]


@pytest.fixture
def clamav(clamd: Clamd) -> FilterFactory:
    """clamav(**settings): a filter whose only back end is the test clamd by default."""

    def make(**settings: Any) -> ClamavFilter:
        settings.setdefault("clamd_sockets", (clamd.tcp,))
        settings.setdefault("connect_timeout", 2.0)
        settings.setdefault("scan_timeout", 5.0)
        env = Env(GlobalSettings(authserv_id="mx.test.example"))
        return ClamavFilter(ClamavSettings(**settings), env)

    return make


def tx_of(raw: bytes, client_addr: str = "198.51.100.7", **macros: str) -> Transaction:
    conn = Connection(client_addr=client_addr, client_name="mail.sender.example",
                      macros=dict(macros))
    tx = Transaction(conn, mail_from="sender@sender.example", rcpt_to=["user@test.example"])
    tx.headers, body = parse_message(raw)
    tx.body.write(body)
    return tx


def status(v: Verdict) -> str:
    values = [e.value for e in v.header_edits
              if e.name == "X-Virus-Status" and e.kind in (EditKind.ADD, EditKind.INSERT)]
    assert len(values) == 1, v.header_edits
    return values[0]


# --- what clamd finds ---------------------------------------------------------


def test_clean_message_accepted_with_headers(clamav: FilterFactory, clamd: Clamd) -> None:
    v = clamav().check(tx_of(message()))
    assert v.action is Action.ACCEPT and not v.quarantine
    assert status(v) == "Clean"
    scanned = [e for e in v.header_edits if e.name == "X-Virus-Scanned"]
    assert [e.value for e in scanned] == [f"milters-clamav {_version()} at mx.test.example"]
    # The scan in the message's one log line; no line of its own.
    assert re.fullmatch(rf"clean clamd={re.escape(clamd.tcp)} bytes=\d+ scan_ms=[\d.]+",
                        v.reason), v.reason
    assert v.log_notes == ()


def _version() -> str:
    from milters import __version__

    return __version__


@pytest.mark.parametrize("raw", [eicar_in_body(), eicar_attachment(), eicar_zip()],
                         ids=["text-body", "base64-attachment", "zip-attachment"])
def test_eicar_rejected_with_the_virus_named(clamav: FilterFactory, clamd: Clamd,
                                             raw: bytes) -> None:
    v = clamav().check(tx_of(raw))
    assert v.action is Action.REJECT
    assert v.reply is not None and (v.reply.code, v.reply.xcode) == ("550", "5.7.1")
    assert v.reply.text.startswith("message rejected: virus Eicar-Test-")
    assert v.reply.text.endswith(".UNOFFICIAL found")
    assert v.reason.startswith("virus=Eicar-Test-") and f"clamd={clamd.tcp}" in v.reason


def test_attachment_found_even_when_no_known_field_comes_first(clamav: FilterFactory) -> None:
    """Without the mbox line the filter sends first, clamd would not see a mail here
    (only an X- field and Content-Type) and would not decode the attachment."""
    raw = eicar_attachment()
    _, _, mime = raw.partition(b"Subject: eicar.com\r\n")
    headers_and_body = b"X-Only: field\r\n" + mime.split(b"MIME-Version: 1.0\r\n", 1)[1]
    assert EICAR not in headers_and_body
    assert clamav().check(tx_of(headers_and_body)).action is Action.REJECT
    assert MBOX_LINE.startswith(b"From ")


def test_spooled_large_body_is_streamed(clamav: FilterFactory) -> None:
    """A body past the spool threshold (in a temp file) still reaches clamd whole."""
    body = b"filler line of text\r\n" * 30000 + EICAR + b"\r\n"  # ~600 KB
    tx = tx_of(message(body))
    assert tx.body.spooled
    assert clamav().check(tx).action is Action.REJECT


# --- on_virus -------------------------------------------------------------------


def test_reject_reply_template(clamav: FilterFactory) -> None:
    v = clamav(reject_reply="554 5.7.0 Virus %v is not welcome").check(tx_of(eicar_in_body()))
    assert v.reply is not None
    assert str(v.reply) == "554 5.7.0 Virus Eicar-Test-Body.UNOFFICIAL is not welcome"


def test_quarantine_holds_and_tags(clamav: FilterFactory) -> None:
    v = clamav(on_virus="quarantine").check(tx_of(eicar_in_body()))
    assert v.action is Action.ACCEPT
    assert v.quarantine == "virus Eicar-Test-Body.UNOFFICIAL"
    assert status(v) == "Infected (Eicar-Test-Body.UNOFFICIAL)"


def test_discard(clamav: FilterFactory) -> None:
    v = clamav(on_virus="discard").check(tx_of(eicar_in_body()))
    assert v.action is Action.DISCARD and v.reason.startswith("virus=")


def test_tag_delivers_with_infected_status(clamav: FilterFactory) -> None:
    v = clamav(on_virus="tag").check(tx_of(eicar_zip()))
    assert v.action is Action.ACCEPT and not v.quarantine
    assert status(v).startswith("Infected (Eicar-Test-")


def test_tag_writes_status_even_with_add_headers_no(clamav: FilterFactory) -> None:
    v = clamav(on_virus="tag", add_headers="no").check(tx_of(eicar_in_body()))
    assert status(v) == "Infected (Eicar-Test-Body.UNOFFICIAL)"


# --- headers ----------------------------------------------------------------------


def test_replace_removes_incoming_virus_headers(clamav: FilterFactory) -> None:
    forged = "X-Virus-Status: Clean\r\nX-Virus-Scanned: by a liar\r\nX-Virus-Status: Clean\r\n"
    v = clamav(on_virus="tag").check(tx_of(eicar_in_body().replace(b"Subject:", forged.encode()
                                                                     + b"Subject:", 1)))
    deletes = {(e.name, e.index) for e in v.header_edits if e.kind is EditKind.DELETE}
    assert deletes == {("X-Virus-Status", 1), ("X-Virus-Status", 2), ("X-Virus-Scanned", 1)}
    assert status(v).startswith("Infected")


def test_add_mode_inserts_at_the_top_and_keeps_incoming(clamav: FilterFactory) -> None:
    raw = message(headers="X-Virus-Status: Clean\r\n")
    v = clamav(add_headers="add").check(tx_of(raw))
    assert all(e.kind is EditKind.INSERT and e.index == 0 for e in v.header_edits)
    assert [e.name for e in v.header_edits] == ["X-Virus-Status", "X-Virus-Scanned"]


def test_no_headers_on_clean_mail_when_off(clamav: FilterFactory) -> None:
    v = clamav(add_headers="no", report_hostname="scanner.example").check(tx_of(message()))
    assert v.action is Action.ACCEPT and v.header_edits == ()


def test_report_hostname(clamav: FilterFactory) -> None:
    v = clamav(report_hostname="scanner.example").check(tx_of(message()))
    assert HeaderEdit(EditKind.ADD, "X-Virus-Scanned",
                      f"milters-clamav {_version()} at scanner.example") in v.header_edits


# --- size ---------------------------------------------------------------------------


def test_oversize_accepted_not_scanned(clamav: FilterFactory) -> None:
    v = clamav(max_scan_size=10_000).check(tx_of(message(EICAR + b"\r\n" + b"x" * 20_000)))
    assert v.action is Action.ACCEPT
    assert status(v) == "Not scanned (message too large)"
    assert "over max_scan_size 10000" in v.reason
    assert [e.name for e in v.header_edits if e.kind is not EditKind.DELETE] == [
        "X-Virus-Status"]  # X-Virus-Scanned would claim a scan that did not happen


def test_oversize_tempfail(clamav: FilterFactory) -> None:
    v = clamav(max_scan_size=10_000, on_oversize="tempfail").check(
        tx_of(message(b"x" * 20_000)))
    assert v.action is Action.TEMPFAIL
    assert v.reply is not None and v.reply.code == "451" and v.reply.xcode == "4.3.4"


def test_oversize_truncate_scans_the_beginning(clamav: FilterFactory) -> None:
    early = message(EICAR + b"\r\n" + b"x" * 20_000)
    late = message(b"x" * 20_000 + EICAR + b"\r\n")
    flt = clamav(max_scan_size=10_000, on_oversize="truncate")
    assert flt.check(tx_of(early)).action is Action.REJECT
    v = flt.check(tx_of(late))
    assert v.action is Action.ACCEPT and status(v) == "Clean"
    assert v.reason.endswith(" truncated")


def test_over_clamd_stream_max_length_is_oversize(clamav: FilterFactory, clamd: Clamd) -> None:
    """max_scan_size above clamd's StreamMaxLength: clamd's refusal is not a failure."""
    raw = message(b"y" * (clamd.stream_max_length + 10_000))
    v = clamav(max_scan_size=clamd.stream_max_length * 4).check(tx_of(raw))
    assert v.action is Action.ACCEPT and status(v) == "Not scanned (message too large)"
    assert any("StreamMaxLength" in n for n in v.log_notes)
    v = clamav(max_scan_size=clamd.stream_max_length * 4, on_oversize="tempfail").check(
        tx_of(raw))
    assert v.action is Action.TEMPFAIL


# --- failures and failover ---------------------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server that accepts connections and never answers: a hung clamd."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(conn)  # read nothing, say nothing

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"tcp:127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for c in held:
        c.close()
    listener.close()


def dead_backend() -> str:
    return f"tcp:127.0.0.1:{free_port()}"  # nothing listens: connection refused


def test_clamd_down_tempfails(clamav: FilterFactory) -> None:
    dead = dead_backend()
    v = clamav(clamd_sockets=(dead,)).check(tx_of(eicar_in_body()))
    assert v.action is Action.TEMPFAIL
    assert v.reply is not None and str(v.reply).startswith("451 4.3.0")
    assert any(f"clamd={dead} failed" in n for n in v.log_notes)


def test_clamd_down_accept_tags(clamav: FilterFactory) -> None:
    v = clamav(clamd_sockets=(dead_backend(),), on_fail="accept").check(tx_of(message()))
    assert v.action is Action.ACCEPT
    assert status(v) == "Not scanned (scanner unavailable)"


def test_unix_socket_missing_is_a_failure(clamav: FilterFactory, clamd: Clamd) -> None:
    v = clamav(clamd_sockets=(f"unix:{clamd.directory}/no-such.sock",)).check(tx_of(message()))
    assert v.action is Action.TEMPFAIL


def test_unix_socket_works(clamav: FilterFactory, clamd: Clamd) -> None:
    v = clamav(clamd_sockets=(clamd.unix,)).check(tx_of(eicar_zip()))
    assert v.action is Action.REJECT and f"clamd={clamd.unix}" in v.reason


def test_clamd_that_never_answers_times_out(clamav: FilterFactory, silent_server: str) -> None:
    started = time.monotonic()
    v = clamav(clamd_sockets=(silent_server,), scan_timeout=0.5).check(tx_of(message()))
    assert time.monotonic() - started < 3
    assert v.action is Action.TEMPFAIL
    assert any("did not answer within 0.5 s" in n for n in v.log_notes)
    v = clamav(clamd_sockets=(silent_server,), scan_timeout=0.5, on_fail="accept").check(
        tx_of(message()))
    assert v.action is Action.ACCEPT and status(v).startswith("Not scanned")


def test_failover_from_dead_and_hung_to_live(clamav: FilterFactory, clamd: Clamd,
                                             silent_server: str) -> None:
    dead = dead_backend()
    flt = clamav(clamd_sockets=(dead, silent_server, clamd.tcp), scan_timeout=0.5)
    v = flt.check(tx_of(eicar_in_body()))
    assert v.action is Action.REJECT and f"clamd={clamd.tcp}" in v.reason
    assert any(f"clamd={dead} failed" in n for n in v.log_notes)
    assert any(f"clamd={silent_server} failed" in n for n in v.log_notes)
    # Both failed ones are now tried last: the next message goes straight to clamd.
    started = time.monotonic()
    v = flt.check(tx_of(message()))
    assert time.monotonic() - started < 0.4
    assert v.reason.startswith(f"clean clamd={clamd.tcp} ") and v.log_notes == ()


def test_garbage_answer_is_a_failure(clamav: FilterFactory) -> None:
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"what is this\0")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    v = clamav(clamd_sockets=(f"tcp:127.0.0.1:{port}",)).check(tx_of(message()))
    thread.join(5)
    listener.close()
    assert v.action is Action.TEMPFAIL
    assert any("answered 'what is this'" in n for n in v.log_notes)


# --- skips ---------------------------------------------------------------------------------


def test_skip_authenticated(clamav: FilterFactory) -> None:
    raw = eicar_in_body()
    assert clamav().check(tx_of(raw, **{"{auth_authen}": "alice"})).action is Action.REJECT
    v = clamav(skip_authenticated=True).check(tx_of(raw, **{"{auth_authen}": "alice"}))
    assert v.action is Action.ACCEPT and v.header_edits == ()
    assert v.reason == "not scanned: authenticated as alice"


def test_skip_internal(clamav: FilterFactory) -> None:
    raw = eicar_in_body()
    flt = clamav(skip_internal=True)
    assert flt.check(tx_of(raw, client_addr="127.0.0.1")).action is Action.ACCEPT
    assert flt.check(tx_of(raw, client_addr="")).action is Action.ACCEPT  # sendmail
    assert flt.check(tx_of(raw)).action is Action.REJECT


# --- odd input -------------------------------------------------------------------------------


def test_empty_message_and_binary_junk(clamav: FilterFactory) -> None:
    flt = clamav()
    tx = Transaction(Connection(client_addr="198.51.100.7"))
    assert flt.check(tx).action is Action.ACCEPT
    junk = bytes(range(256)) * 64
    v = flt.check(tx_of(b"X-Junk: \xff\xfe\r\n\r\n" + junk))
    assert v.action is Action.ACCEPT and status(v) == "Clean"


def test_virus_in_a_nested_message(clamav: FilterFactory) -> None:
    inner = eicar_attachment()
    outer = with_attachment(inner, "forward.eml", "message/rfc822")
    assert clamav().check(tx_of(outer)).action is Action.REJECT
