"""Hostile bytes on the milter socket, against the real filters (issue 9).

spf, checks, dmarc and dkim run as `milters run NAME` with one worker each, so
"the same process keeps serving" is observable. Every case sends what no
conforming MTA sends (malformed, truncated, oversized or out-of-order packets,
odd macro lists, 8-bit where pymilter wants UTF-8) and then checks:

- a defined answer (or a clean close), within seconds;
- no worker died: the same worker pid is still the only child, nothing restarted;
- no traceback and no "pymilter: untrapped exception" in the filter's output;
- a normal message on another connection is answered meanwhile (the hostile
  connection is still open when it is sent, where the case leaves it open).

Most cases use a raw socket that offers no SMFIP_NR_*/NO* bits, so every command
but MACRO/ABORT/QUIT gets exactly one reply; the UTF-8 cases also run through the
project's client with Postfix's offer, where filters take most steps without a
reply and must still answer at the next step that has one.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from milters.client.errors import MilterClientError
from milters.client.probe import ProbeResult, probe
from milters.client.replies import StageReply
from milters.client.session import MilterSession
from milters.core.envelope import Envelope
from tests.support.dns import LoopbackDNS, dns_server
from tests.support.processes import ManagedProcess, ProcessFactory, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
FILTERS = ("spf", "checks", "dmarc", "dkim")
# The byte-level battery runs against a filter that answers early (spf) and one
# that takes the whole message (dkim); the adapter under test is the same.
RAW_FILTERS = ("spf", "dkim")
FILTER_TIMEOUT = 5
AUTHSERV = "mx.test.example"
VIOLATION = "451 4.7.0 malformed milter data, try again later"
ANSWER_TIMEOUT = 5.0


@dataclass
class Running:
    name: str
    proc: ManagedProcess
    port: int
    worker: int

    @property
    def spec(self) -> str:
        return f"inet:{self.port}@127.0.0.1"

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()]


@pytest.fixture(scope="module")
def dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        server.txt("example.com", "v=spf1 ip4:192.0.2.0/24 -all")
        server.txt("_dmarc.example.com", "v=DMARC1; p=reject")
        yield server


@pytest.fixture(scope="module", params=["libmilter", "python"])
def filters(request: pytest.FixtureRequest, dns: LoopbackDNS,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Running]]:
    """The filters under each milter core (`milter_core`): libmilter, and our own
    protocol loop (core/pyserver.py), which must answer every case the same way."""
    d = tmp_path_factory.mktemp(f"hostile-{request.param}")
    with ProcessFactory() as factory:
        running: dict[str, Running] = {}
        for name in FILTERS:
            port = free_port()
            extra = f'history = "{d}/history.sqlite"\n' if name == "dmarc" else ""
            config = d / f"{name}.toml"
            config.write_text(
                f'[global]\nauthserv_id = "{AUTHSERV}"\ninternal_networks = []\n'
                f'milter_core = "{request.param}"\n{dns.toml()}'
                f'[{name}]\nsocket = "inet:{port}@127.0.0.1"\nworkers = 1\n'
                f"timeout = {FILTER_TIMEOUT}\n{extra}"
            )
            argv = [sys.executable, "-m", "milters", "run", name, "--config", str(config)]
            proc = factory.start(argv, port, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
            path = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            assert wait_until(lambda p=path: len(p.read_text().split()) == 1, 10)  # type: ignore[misc]
            running[name] = Running(name, proc, port, int(path.read_text().split()[0]))
        yield running


# -- a raw MTA side ---------------------------------------------------------


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">IB", len(data) + 1, cmd[0]) + data


def connect_payload(host: bytes = b"mail.example.net", family: bytes = b"4",
                    port: int = 25, addr: bytes = b"192.0.2.1") -> bytes:
    return host + b"\0" + family + struct.pack(">H", port) + addr + b"\0"


MODIFICATIONS = {"+", "-", "h", "i", "m", "e", "b", "q", "2", "f", "p"}


class Raw:
    """A milter connection driven byte by byte; offers no NR/NO bits by default,
    so each command but MACRO, ABORT and QUIT gets exactly one reply."""

    def __init__(self, port: int, protocol: int = 0,
                 reply_timeout: float = ANSWER_TIMEOUT) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT)
        self.sock.sendall(packet(b"O", struct.pack(">III", 6, 0x1FF, protocol)))
        assert self.reply().startswith("O")
        self.sock.settimeout(reply_timeout)

    def send(self, cmd: bytes, data: bytes = b"") -> None:
        self.sock.sendall(packet(cmd, data))

    def ask(self, cmd: bytes, data: bytes = b"") -> str:
        try:
            self.send(cmd, data)
        except OSError:
            return "closed"
        return self.reply()

    def reply(self) -> str:
        """The next answer: its letter (and text for 'y'), 'closed' or 'timeout';
        end-of-message modifications and progress packets are skipped."""
        while True:
            answer = self._packet()
            if answer not in MODIFICATIONS:
                return answer

    def _packet(self) -> str:
        try:
            head = self._exact(4)
            (length,) = struct.unpack(">I", head)
            body = self._exact(length)
        except TimeoutError:
            return "timeout"
        except (ConnectionError, EOFError):
            return "closed"
        cmd, data = body[:1].decode(), body[1:]
        text = data.rstrip(b"\0").decode("utf-8", "replace")
        return f"y:{text}" if cmd == "y" else cmd

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def close(self) -> None:
        self.sock.close()


MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: u@test.example\r\nSubject: hi\r\n"
           b"\r\nhello\r\n")


def normal_message(f: Running) -> ProbeResult:
    env = Envelope(client_ip="192.0.2.7", client_name="mail.example.net",
                   helo="mail.example.net", mail_from="bounce@example.com",
                   rcpt_to=["u@test.example"])
    return probe(f.spec, MESSAGE, env, timeout=ANSWER_TIMEOUT * 3)


def assert_unharmed(f: Running) -> None:
    """The same single worker serves a normal message; nothing crashed or leaked
    a traceback."""
    result = normal_message(f)
    assert result.verdict in ("accept", "continue", "reject", "tempfail"), result
    assert not any("pymilter" in r.smtp_reply for r in result.stages), result
    assert f.children() == [f.worker], f"{f.name}: worker restarted\n{f.proc.output()}"
    out = f.proc.output()
    assert "Traceback" not in out, out
    assert "untrapped exception" not in out, out
    assert " died: " not in out, out


# -- the battery -----------------------------------------------------------

Step = tuple[bytes, bytes]
FINAL = {"t", "r", "a", "d", "closed", "timeout"}


def conversation(r: Raw, steps: list[Step]) -> list[str]:
    """Send `steps` in order (macro packets get no reply) until a final answer."""
    answers: list[str] = []
    for cmd, data in steps:
        if cmd == b"D":
            r.send(cmd, data)
            continue
        answers.append(r.ask(cmd, data))
        if answers[-1] in FINAL or answers[-1].startswith("y:"):
            break
    return answers


CONNECT: Step = (b"C", connect_payload())
HELO: Step = (b"H", b"helo.example\0")
MAIL: Step = (b"M", b"<bounce@example.com>\0")
RCPT: Step = (b"R", b"<u@test.example>\0")
MESSAGE_STEPS: list[Step] = [(b"T", b""), (b"L", b"From\0 alice@example.com\0"),
                             (b"L", b"Subject\0 hi\0"), (b"N", b""), (b"B", b"hello\r\n"),
                             (b"E", b"")]
TRANSACTION: list[Step] = [MAIL, RCPT, *MESSAGE_STEPS]


def churn_then_odd() -> list[Step]:
    # The crash of issue 9: buffers of one size freed, then an odd list whose
    # argv reuses one of them, so smfi_getsymval walked into stale pointers.
    steps: list[Step] = []
    for size in range(24, 80, 8):
        steps += [(b"D", b"C" + b"a" * 7 + b"\0" + b"b" * (size - 10) + b"\0"),
                  (b"D", b"C" + b"j\0mx\0nul\0"), (b"D", b"C" + b"j\0mx\0nul\0")]
    return steps


VIOLATION_ANSWER = f"y:{VIOLATION}"
# libmilter's state machine (engine.c) drops a command that cannot follow the
# current state, without a reply and before any callback; the connection stays
# open for the next command (Postfix never sends these).
IGNORED = "ignored"

# name: (steps, the answer that must end the conversation)
CASES: dict[str, tuple[list[Step], str]] = {
    "odd macro list before connect": (
        [*churn_then_odd(), CONNECT, HELO, *TRANSACTION], VIOLATION_ANSWER),
    "odd macro list at MAIL": (
        [CONNECT, HELO, (b"D", b"M{mail_addr}\0a@example.com\0with\0nul\0i\0"),
         *TRANSACTION], VIOLATION_ANSWER),
    "odd macro list at RCPT": (
        [CONNECT, HELO, MAIL, (b"D", b"R{rcpt_addr}\0u\0x\0"), RCPT, *MESSAGE_STEPS],
        VIOLATION_ANSWER),
    "odd macro list at end of message": (
        [CONNECT, HELO, MAIL, RCPT, *MESSAGE_STEPS[:-1], (b"D", b"Ei\0ABC\0x\0"),
         MESSAGE_STEPS[-1]], VIOLATION_ANSWER),
    # libmilter ignores a macro packet for a stage it does not know.
    "macro packet for an unknown stage": (
        [(b"D", b"Zj\0mx\0"), CONNECT, HELO, *TRANSACTION], "accept"),
    "empty macro packet": ([(b"D", b""), CONNECT], "closed"),
    "8-bit macro values": (
        [(b"D", b"Cj\0\xff\xfe\0{daemon_name}\0\xc3(\0"), CONNECT, HELO,
         (b"D", b"M{auth_authen}\0\xff\0{mail_addr}\0\x80@example.com\0"),
         *TRANSACTION], "accept"),
    "unknown command": ([CONNECT, (b"z", b"whatever\0")], "closed"),
    "body before MAIL": ([CONNECT, HELO, (b"B", b"body\r\n")], IGNORED),
    "end of message without MAIL": ([CONNECT, HELO, (b"E", b"")], IGNORED),
    "header before MAIL": ([CONNECT, HELO, (b"L", b"Subject\0 hi\0")], IGNORED),
    "RCPT before MAIL": ([CONNECT, HELO, RCPT], IGNORED),
    # libmilter moves on from its HELO state: the filter decides without a client.
    "MAIL before connect": ([MAIL, *TRANSACTION[1:]], "accept"),
    "connect with a bad family": ([(b"C", connect_payload(family=b"X"))], "closed"),
    "connect with a bad IPv4 address": (
        [(b"C", connect_payload(addr=b"999.1.2.3x"))], "closed"),
    "connect with a bad IPv6 address": (
        [(b"C", connect_payload(family=b"6", addr=b"::zz::1"))], "closed"),
    "connect without its NUL": ([(b"C", b"hostonly")], "closed"),
    "8-bit client host name": (
        [(b"C", connect_payload(host=b"h\xffst.example")), HELO, *TRANSACTION],
        VIOLATION_ANSWER),
    "8-bit header name": (
        [CONNECT, HELO, MAIL, RCPT, (b"T", b""), (b"L", b"X-\xff\xfe\0 v\0"),
         *MESSAGE_STEPS[1:]], VIOLATION_ANSWER),
    "header without a value": (
        [CONNECT, HELO, MAIL, RCPT, (b"T", b""), (b"L", b"Subject")], "closed"),
    "empty MAIL": ([CONNECT, HELO, (b"M", b"")], "closed"),
}


def ended_as(answers: list[str], expected: str) -> bool:
    last = answers[-1] if answers else ""
    if expected == "accept":  # the filter's own decision on a whole message
        return last in ("a", "c", "t", "r") and len(answers) > 3
    if expected == IGNORED:
        return last == "timeout"
    return last == expected


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", RAW_FILTERS)
def test_hostile_packets(filters: dict[str, Running], name: str, case: str) -> None:
    f = filters[name]
    steps, expected = CASES[case]
    # An ignored command shows as no reply within a second (a reply, when one
    # comes, takes milliseconds).
    raw = Raw(f.port, reply_timeout=1.0 if expected == IGNORED else ANSWER_TIMEOUT)
    try:
        answers = conversation(raw, steps)
        # Meanwhile, with the hostile connection still open: a normal message.
        assert_unharmed(f)
    finally:
        raw.close()
    assert "timeout" not in answers[:-1], (case, answers)
    assert ended_as(answers, expected), (case, answers)
    assert_unharmed(f)


BAD_FRAMES = {
    "oversized length": struct.pack(">I", 0xFFFFFFF0) + b"L" + b"x" * 100,
    "length over libmilter's 1 MB limit": struct.pack(">I", 2 * 1024 * 1024) + b"B" * 4096,
    "zero length": struct.pack(">I", 0),
    "truncated packet": struct.pack(">I", 100) + b"Hshort",
    "truncated length": b"\0\0",
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
@pytest.mark.parametrize("name", RAW_FILTERS)
def test_bad_frames_close_cleanly(filters: dict[str, Running], name: str, case: str) -> None:
    f = filters[name]
    raw = Raw(f.port)
    try:
        raw.ask(*CONNECT)
        raw.sock.sendall(BAD_FRAMES[case])
        if case not in ("oversized length", "length over libmilter's 1 MB limit"):
            # libmilter waits for the rest of a frame; the peer then gives up.
            raw.sock.shutdown(socket.SHUT_WR)
        answer = raw.reply()
        assert_unharmed(f)
    finally:
        raw.close()
    assert answer == "closed", (case, answer)
    assert_unharmed(f)


# -- 8-bit where pymilter wants UTF-8, through the client (Postfix's offer) ---


def envelope(**overrides: object) -> Envelope:
    values: dict[str, object] = {
        "client_ip": "192.0.2.7", "client_name": "mail.example.net",
        "helo": "mail.example.net", "mail_from": "bounce@example.com",
        "rcpt_to": ["u@test.example"],
    }
    values.update(overrides)
    return Envelope(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", FILTERS)
def test_invalid_utf8_helo_gets_a_filter_answer(filters: dict[str, Running], name: str) -> None:
    f = filters[name]
    r = probe(f.spec, MESSAGE, envelope(helo="h\udcffst.example"), timeout=15)
    # A final answer: "continue" at end of message would mean a reply out of step
    # (one sent for a step negotiated to take none).
    assert r.verdict in ("accept", "reject", "tempfail"), r
    assert not any("pymilter" in x.smtp_reply or "malformed" in x.smtp_reply
                   for x in r.stages), r
    assert_unharmed(f)


@pytest.mark.parametrize("name", FILTERS)
def test_invalid_utf8_mail_from_gets_a_filter_answer(filters: dict[str, Running],
                                                     name: str) -> None:
    f = filters[name]
    r = probe(f.spec, MESSAGE, envelope(mail_from="b\udcffunce@example.com"),
              timeout=15)
    assert r.verdict in ("accept", "continue", "reject", "tempfail"), r
    assert not any("pymilter" in x.smtp_reply for x in r.stages), r
    assert_unharmed(f)


@pytest.mark.parametrize("name", FILTERS)
def test_utf8_header_name_is_answered(filters: dict[str, Running], name: str) -> None:
    f = filters[name]
    # (An invalid UTF-8 name is not a header field to the client, as to Postfix:
    # the raw battery sends that one.)
    r = probe(f.spec, "X-Tëst: v\r\n".encode() + MESSAGE, envelope(), timeout=15)
    assert r.verdict in ("accept", "continue", "reject", "tempfail"), r
    assert not any("pymilter" in x.smtp_reply for x in r.stages), r
    assert_unharmed(f)


@pytest.mark.parametrize("name", FILTERS)
def test_odd_macro_list_with_postfix_offer(filters: dict[str, Running], name: str) -> None:
    """With the NR bits Postfix offers, a violation seen where no reply goes is
    answered at the next step that has one."""
    f = filters[name]
    replies: list[StageReply] = []
    with MilterSession(f.spec, timeout=ANSWER_TIMEOUT) as s:
        # After MAIL: libmilter clears the lists of later stages at each stage.
        steps: list[Callable[[], StageReply | list[StageReply]]] = [
            lambda: s.connect(envelope()), lambda: s.helo("mail.example.net"),
            lambda: s.mail("bounce@example.com"),
            lambda: [s.send_raw(b"D", b"M{mail_addr}\0odd\0one\0"), s.rcpt("u@test.example")][1],
            lambda: s.message(MESSAGE)]
        for step in steps:
            got = step()
            replies += got if isinstance(got, list) else [got]
            if replies[-1].final:
                break
    refusals = [x for x in replies if x.final]
    assert refusals and refusals[0].smtp_reply == VIOLATION, replies
    assert_unharmed(f)


# -- held connections ------------------------------------------------------


def accepted(f: Running) -> bool:
    try:
        return normal_message(f).verdict == "accept"
    except MilterClientError:
        return False


def worker_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_limited(tmp_path: Path, factory: ProcessFactory, extra: str,
                  open_files: int | None = None, core: str = "libmilter") -> Running:
    port = free_port()
    config = tmp_path / "limited.toml"
    config.write_text(f'[global]\nauthserv_id = "{AUTHSERV}"\nmilter_core = "{core}"\n'
                      f'[checks]\nsocket = "inet:{port}@127.0.0.1"\nworkers = 1\n{extra}')
    argv = [sys.executable, "-m", "milters", "run", "checks", "--config", str(config)]
    if open_files is not None:
        argv = ["prlimit", f"--nofile={open_files}:{open_files}", *argv]
    proc = factory.start(argv, port, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
    path = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    assert wait_until(lambda: len(path.read_text().split()) == 1, 10)
    return Running("checks", proc, port, int(path.read_text().split()[0]))


@pytest.mark.parametrize("core", ["libmilter", "python"])
def test_connection_limit_answers_tempfail_and_logs(tmp_path: Path, core: str) -> None:
    with ProcessFactory() as factory:
        f = start_limited(tmp_path, factory, "max_connections = 2\n", core=core)
        held = [MilterSession(f.spec, timeout=ANSWER_TIMEOUT) for _ in range(2)]
        for s in held:
            s.open()
            s.connect(envelope())
        with MilterSession(f.spec, timeout=ANSWER_TIMEOUT) as extra:
            refused = extra.connect(envelope())
        assert refused.action == "tempfail"
        assert refused.smtp_reply == "451 4.3.2 filter busy, try again later"
        assert wait_until(lambda: "limit max_connections = 2" in f.proc.output(), 5)
        for s in held:
            s.quit()
        # Once the held connections close, a new message is answered as usual.
        assert wait_until(lambda: accepted(f), 15, interval=0.5)
        assert f.children() == [f.worker]
        assert "Traceback" not in f.proc.output()


@pytest.mark.parametrize("core", ["libmilter", "python"])
def test_held_connections_do_not_make_the_listener_spin(tmp_path: Path, core: str) -> None:
    """Connections accepted and never negotiated use up the open files; libmilter's
    accept() then failed with EMFILE in a busy loop. The worker stops accepting
    instead, and serves again when they close."""
    limit = 128
    with ProcessFactory() as factory:
        f = start_limited(tmp_path, factory, "", open_files=limit, core=core)
        held = []
        for _ in range(limit + 40):
            held.append(socket.create_connection(("127.0.0.1", f.port), timeout=5))
        try:
            assert wait_until(lambda: "not accepting connections" in f.proc.output(), 10)
            before, started = worker_cpu_seconds(f.worker), time.monotonic()
            time.sleep(2.0)
            busy = (worker_cpu_seconds(f.worker) - before) / (time.monotonic() - started)
            # A spinning listener burns a whole core (about 1.0); an idle one ~0.
            assert busy < 0.5, busy
        finally:
            for s in held:
                s.close()
        assert wait_until(lambda: "accepting connections again" in f.proc.output(), 10)
        assert wait_until(lambda: accepted(f), 20, interval=0.5)
        assert f.children() == [f.worker]
        assert "Traceback" not in f.proc.output()
