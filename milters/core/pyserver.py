"""A milter server core in Python: the same adapter, without libmilter's threads.

pymilter and libmilter cost about 0.65 ms of CPU per message before any filter
work (bench/core_eval.py; a Python protocol loop does the same dialogue for
0.35 ms): each callback is a hand-off from a libmilter thread into the
interpreter, and our macros have to be read out of libmilter's memory. With
`[global] milter_core = "python"` a worker reads the milter protocol itself,
one thread per MTA connection, and drives the very Session class the adapter
makes for pymilter (core/adapter.py): negotiation, callbacks, the backstop and
the actions are the adapter's, only the context under them is ours. Actions
are queued as protocol packets and sent with the reply of the callback that
made them, as libmilter sends them.

The listening socket is the worker's inherited fd, polled by its number, so the
runner's drain and descriptor gate (runner.ListenerGate swaps that fd for a
pipe) work as they do for libmilter.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import threading
import time
import types
from collections.abc import Callable
from typing import Any

from milters.core import protocol
from milters.core.adapter import (
    _ST_CONN,
    _ST_HDRS,
    _ST_HELO,
    CODE_REPLIES,
    CONTINUE,
    NOREPLY,
    REFUSALS,
    Session,
    adapter_class,
)
from milters.core.errors import NeedsThread
from milters.core.macroreader import Macros, normalize
from milters.core.runtime import Runtime, SessionCounter
from milters.core.sockets import kernel_timeval, set_timeouts

log = logging.getLogger(__name__)

_HEAD = struct.Struct(">I")
_OPTNEG = struct.Struct(">III")
_INDEX = struct.Struct(">I")
# Packets larger than this are not from an MTA (Postfix sends a header field whole,
# up to header_size_limit, 100 KB by default; body chunks are 64 KB).
MAX_PACKET = 1024 * 1024
_FAMILIES = types.MappingProxyType(
    {b"4": socket.AF_INET, b"6": socket.AF_INET6, b"L": socket.AF_UNIX})
# The no-reply bits of the steps the core may answer itself (_continue_unless).
_NR_CONN = int(protocol.ProtocolFlag.NR_CONN)
_NR_HELO = int(protocol.ProtocolFlag.NR_HELO)
_NR_HDR = int(protocol.ProtocolFlag.NR_HDR)
# libmilter's ctx_state names for the stages whose arguments may not decode.
_ST_MAIL = 4


class ConnectionClosed(Exception):
    """The MTA closed the connection, or sent what no MTA sends."""


def _packet(cmd: bytes, data: bytes = b"") -> bytes:
    return _HEAD.pack(len(data) + 1) + cmd + data


def _text(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


class Context:
    """What pymilter's context object is to Milter.Base, for one MTA connection:
    the actions of the callback running now, as packets, and the macros."""

    def __init__(self) -> None:
        self.actions: list[bytes] = []
        self.reply: bytes | None = None
        # Macro packets by the command they precede, parsed only when read: most
        # are never read (the adapter reads at connect, MAIL and end of message).
        self.macros: dict[bytes, bytes] = {}
        self._last = b""  # the stage of the last packet (the end of `macros`)
        # The merged view so far: how many stages (the first of `macros`) are in it,
        # their values and their odd lists.
        self._merged = 0
        self._values: dict[str, str] = {}
        self._odd: list[str] = []
        # The adapter reads the macros several times a message (connect, MAIL,
        # end of message): each packet is parsed once, and the merged view is
        # made again only after a new packet.
        self.parsed: Macros | None = None
        self.state = 0
        self._priv: Any = None

    # -- Milter.Base calls these -------------------------------------------------

    def getpriv(self) -> Any:
        return self._priv

    def setpriv(self, priv: Any) -> None:
        self._priv = priv

    def getsymval(self, name: str) -> str | None:
        return self.read_macros().values.get(normalize(name))

    def setsymlist(self, stage: int, macros: str) -> None:
        return None  # Postfix sends its configured lists; we read what comes

    def setreply(self, rcode: str, xcode: str | None, msg: str | None, *lines: str) -> None:
        # As smfi_setreply builds it; the '%%' the adapter doubles for libmilter
        # stay doubled, as libmilter sends them.
        text = " ".join(x for x in (rcode, xcode, msg) if x)
        self.reply = _packet(protocol.SMFIR_REPLYCODE, _text(text) + b"\0")

    def addheader(self, field: str, value: str | bytes, idx: int = -1) -> None:
        data = _text(field) + b"\0" + _text(value) + b"\0"
        if idx < 0:
            self.actions.append(_packet(protocol.SMFIR_ADDHEADER, data))
        else:
            self.actions.append(_packet(protocol.SMFIR_INSHEADER, _INDEX.pack(idx) + data))

    def chgheader(self, field: str, idx: int, value: str | bytes | None) -> None:
        data = _INDEX.pack(idx) + _text(field) + b"\0" + _text(value or "") + b"\0"
        self.actions.append(_packet(protocol.SMFIR_CHGHEADER, data))

    def addrcpt(self, rcpt: str, params: str | None = None) -> None:
        if params:
            self.actions.append(_packet(protocol.SMFIR_ADDRCPT_PAR,
                                        _text(rcpt) + b"\0" + _text(params) + b"\0"))
        else:
            self.actions.append(_packet(protocol.SMFIR_ADDRCPT, _text(rcpt) + b"\0"))

    def delrcpt(self, rcpt: str) -> None:
        self.actions.append(_packet(protocol.SMFIR_DELRCPT, _text(rcpt) + b"\0"))

    def replacebody(self, chunk: bytes) -> None:
        self.actions.append(_packet(protocol.SMFIR_REPLBODY, _text(chunk)))

    def quarantine(self, reason: str) -> None:
        self.actions.append(_packet(protocol.SMFIR_QUARANTINE, _text(reason) + b"\0"))

    # -- for the macro reader ----------------------------------------------------

    def add_macros(self, stage: bytes, data: bytes) -> None:
        """A macro packet for `stage`; a resent stage replaces its values and moves
        to the end (later stages win). Postfix resends the same packet before each
        header: that one changes nothing and keeps what was parsed."""
        if stage == self._last and self.macros[stage] == data:
            return
        if stage in self.macros:
            del self.macros[stage]
            self._merged = 0  # a stage went back: merge again from the start
        self.macros[stage] = data
        self._last = stage
        self.parsed = None

    def read_macros(self) -> Macros:
        if self.parsed is None:
            # Stages only ever add at the end (add_macros), so what was merged
            # stays merged: only the stages sent since the last read are parsed.
            if not self._merged:
                self._values = {}
                self._odd = []
            stages = list(self.macros)
            for stage in stages[self._merged:]:
                values, odd = _parse_stage(self.macros[stage])
                if odd:
                    self._odd.append(stage.decode("ascii", "replace"))
                self._values.update(values)
            self._merged = len(stages)
            self.parsed = Macros(dict(self._values), tuple(self._odd))
        return self.parsed


# A one-letter name in braces ("{i}"), which smfi_getsymval takes for "i" (normalize);
# it may also match a value, which only costs the slower path.
_BRACED_LETTER = re.compile(rb"\{[^\0]\}\0")


def _parse_stage(data: bytes) -> tuple[dict[str, str], bool]:
    """One stage's macro packet: its values, and whether the list was odd."""
    # Decoded once, then split (the same strings: NUL is one byte in UTF-8 and
    # surrogateescape maps each undecodable byte on its own).
    strings = data.decode("utf-8", "surrogateescape").split("\0")
    if strings and strings[-1] == "":
        strings.pop()
    odd = len(strings) % 2 == 1
    if odd:
        strings.pop()
    names = strings[-2::-2]  # last pair first: within one list the first one wins,
    values = strings[::-2]  # as smfi_getsymval stops at it (and core/macroreader.py)
    if _BRACED_LETTER.search(data):
        names = [normalize(n) for n in names]
    return dict(zip(names, values, strict=True)), odd


class ContextMacros:
    """The adapter's macro source (core/macroreader.MacroSource) for our contexts."""

    def read(self, ctx_object: Any) -> Macros:
        assert isinstance(ctx_object, Context)
        return ctx_object.read_macros()

    def state(self, ctx_object: Any) -> int:
        assert isinstance(ctx_object, Context)
        return ctx_object.state


class Connection:
    """One MTA connection: packets in, the Session's answers out."""

    def __init__(self, sock: socket.socket, klass: type[Session], timeval: bytes,
                 quick_ack: bool = False) -> None:
        self.sock = sock
        self.klass = klass
        # TCP: acknowledge each read at once (adapter_class quick_ack; take()).
        self.quick_ack = quick_ack
        self.sends = 0  # replies written: whether a read's ACK went out with one
        self.timeval = timeval  # the filter's timeout as a struct timeval (kernel_timeval)
        self.buf = b""  # what was read and not yet run: the start of a packet
        self.ctx = Context()
        self.session: Session | None = None
        self.protocol = 0
        self.in_transaction = False  # between MAIL and end of message or abort

    def serve(self) -> None:
        """Serve the connection to its end in this thread (from its start, or
        from where the event loop handed it over: core/eventloop.py)."""
        # The kernel's timeouts: settimeout()'s polls were a third of this loop's
        # system calls.
        set_timeouts(self.sock, self.timeval)
        try:
            if not self.buf or self.feed(b""):
                self._loop()
        except (ConnectionClosed, OSError):
            pass
        except Exception:  # a bug here must not pass silently, nor kill the worker
            log.exception("milter connection ended by an error in the protocol loop")
        finally:
            self.close()

    def close(self) -> None:
        self._end()
        self.sock.close()

    def _loop(self) -> None:
        recv = self.sock.recv
        while True:
            chunk = recv(65536)
            if not chunk:
                raise ConnectionClosed("closed by the MTA")
            if not self.take(chunk):
                return

    def take(self, chunk: bytes) -> bool:
        """feed(chunk), then ACK it at once unless a reply of ours already did.

        A read we answer needs nothing more: the reply carries the ACK. A read we
        do not answer (the steps negotiated without a reply) would leave the ACK
        delayed, and Postfix's next small write waiting for it (Nagle) for 40 ms:
        TCP_QUICKACK sends the pending ACK now. It holds only until the kernel
        falls back to delayed ACKs, so it is set after each such read (a system
        call per read saved where a reply went out, most reads of a message).
        Without `quick_ack` (a unix socket) there is no ACK to hurry: just feed.
        """
        if not self.quick_ack:
            return self.feed(chunk)
        sends = self.sends
        try:
            return self.feed(chunk)
        finally:
            if self.sends == sends:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    def feed(self, chunk: bytes) -> bool:
        """Run every whole packet `chunk` completes; False: the connection ends.

        Postfix writes several packets per step (macros, then the command; the
        headers in one flush), so one read usually brings several: they are taken
        by offset from one buffer, which is cut once per read, not per packet.
        A step that raises NeedsThread (only in the event loop) is left at the
        head of the buffer, to run again in a thread.
        """
        handlers = _HANDLERS
        unpack_from = _HEAD.unpack_from
        buf = self.buf + chunk if self.buf else chunk
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            size = unpack_from(buf, pos)[0]
            if size == 0 or size > MAX_PACKET:
                raise ConnectionClosed(f"packet of {size} bytes")
            after = pos + 4 + size
            if after > end:
                break
            cmd = buf[pos + 4:pos + 5]
            handler = handlers.get(cmd)
            if handler is None:
                raise ConnectionClosed(f"unknown command {cmd!r}")
            try:
                if not handler(self, buf[pos + 5:after]):
                    return False
            except NeedsThread:
                # End of body took its last chunk before the check began: only
                # the check runs again.
                again = _packet(cmd) if cmd == protocol.SMFIC_BODYEOB else buf[pos:after]
                self.buf = again + buf[after:]
                raise
            pos = after
        self.buf = buf[pos:] if pos else buf
        return True

    def _send(self, rc: int) -> None:
        ctx = self.ctx
        if rc == NOREPLY:
            if not ctx.actions:
                return
            out = b"".join(ctx.actions)
        else:
            reply = ctx.reply if rc in REFUSALS else None
            code = CODE_REPLIES.get(rc, protocol.SMFIR_TEMPFAIL)
            out = b"".join(ctx.actions) + (reply or _packet(code))
        ctx.actions = []
        ctx.reply = None
        if out:
            self.sock.sendall(out)
            self.sends += 1

    # -- one method per command; each returns False to end the connection -------

    def _session(self) -> Session:
        session = self.session
        if session is None:
            raise ConnectionClosed("command before negotiation")
        return session

    def _on_macro(self, data: bytes) -> bool:
        if not data:
            raise ConnectionClosed("empty macro packet")
        self.ctx.add_macros(data[:1], data[1:])
        return True

    def _on_connect(self, data: bytes) -> bool:
        session = self._session()
        self.ctx.state = _ST_CONN
        host, family, hostaddr = _connect_args(data)
        name = self._decoded(host, session)
        if name is None:
            self._continue_unless(_NR_CONN)
        else:
            self._send(session.connect(name, family, hostaddr))
        return True

    def _on_helo(self, data: bytes) -> bool:
        session = self._session()
        self.ctx.state = _ST_HELO
        helo = self._decoded(data.split(b"\0", 1)[0], session)
        if helo is None:
            self._continue_unless(_NR_HELO)
        else:
            self._send(session.hello(helo))
        return True

    def _on_mail(self, data: bytes) -> bool:
        session = self._session()
        self.ctx.state = _ST_MAIL
        self.in_transaction = True
        self._send(session.envfrom(*_args(data)))
        return True

    # Commands that only follow MAIL: libmilter's state machine (engine.c) drops
    # one that cannot follow the current state, without a reply, before any
    # callback (the `in_transaction` tests below).

    def _on_rcpt(self, data: bytes) -> bool:
        session = self._session()
        if self.in_transaction:
            self._send(session.envrcpt(*_args(data)))
        return True

    def _on_data(self, data: bytes) -> bool:
        session = self._session()
        if self.in_transaction:
            self._send(session.data())
        return True

    def _on_header(self, data: bytes) -> bool:
        session = self._session()
        if not self.in_transaction:
            return True
        self.ctx.state = _ST_HDRS
        raw_name, sep, rest = data.partition(b"\0")
        if not sep or not rest.endswith(b"\0"):
            raise ConnectionClosed("header without its value")
        name = self._decoded(raw_name, session)
        if name is None or session.take_header(name, rest[:-1]):
            self._continue_unless(_NR_HDR)
        else:
            self._send(session.header(name, rest[:-1]))
        return True

    def _on_eoh(self, data: bytes) -> bool:
        session = self._session()
        if self.in_transaction:
            self._send(session.eoh())
        return True

    def _on_body(self, data: bytes) -> bool:
        session = self._session()
        if self.in_transaction:
            self._send(session.body(data))
        return True

    def _on_eob(self, data: bytes) -> bool:
        session = self._session()
        if not self.in_transaction:
            return True
        if data:
            session.body(data)
            self.ctx.actions = []
        rc = session.eom()  # may raise NeedsThread (feed), so the state changes after
        self.in_transaction = False
        self._send(rc)
        return True

    def _on_abort(self, data: bytes) -> bool:
        session = self._session()
        self.in_transaction = False
        session.abort()
        self.ctx.actions = []
        return True

    def _on_quit(self, data: bytes) -> bool:
        self._session()
        return False

    def _on_quit_nc(self, data: bytes) -> bool:
        self._session()
        self._end()  # a new SMTP session follows on this connection
        return True

    def _on_unknown(self, data: bytes) -> bool:
        self._session()
        self._send(CONTINUE)
        return True

    def _continue_unless(self, no_reply: int) -> None:
        """CONTINUE, unless the step was negotiated to take no reply at all: for a
        callback pymilter could not call (as its exception policy answers), and for
        a header field the session took without its callback (take_header)."""
        if not self.protocol & no_reply:
            self._send(CONTINUE)

    def _decoded(self, raw: bytes, session: Session) -> str | None:
        """`raw` as pymilter would give it (strict UTF-8). When it is not, pymilter
        calls no callback and answers CONTINUE, and the session hears of the bytes
        through its excepthook (Session.undecodable): the same here."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            session.undecodable(raw)
            return None

    def _on_optneg(self, data: bytes) -> bool:
        if len(data) < 12:
            raise ConnectionClosed("short option negotiation")
        _, actions, offered = _OPTNEG.unpack_from(data)
        self._end()
        self.ctx = Context()
        session = self.klass()
        session._setctx(self.ctx)
        self.ctx.setpriv(session)
        opts = [actions, offered, 0, 0]
        session.negotiate(opts)
        self.session = session
        self.protocol = opts[1]
        self.sends += 1
        self.sock.sendall(_packet(protocol.SMFIC_OPTNEG, _OPTNEG.pack(
            protocol.PROTOCOL_VERSION, opts[0] & actions, opts[1] & offered)))
        return True

    def _end(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            session.close()
            session._setctx(None)


# What each MTA connection runs, by command (each handler returns False to end it).
_HANDLERS: types.MappingProxyType[bytes, Callable[[Connection, bytes], bool]] = (
    types.MappingProxyType({
        protocol.SMFIC_MACRO: Connection._on_macro,
        protocol.SMFIC_OPTNEG: Connection._on_optneg,
        protocol.SMFIC_CONNECT: Connection._on_connect,
        protocol.SMFIC_HELO: Connection._on_helo,
        protocol.SMFIC_MAIL: Connection._on_mail,
        protocol.SMFIC_RCPT: Connection._on_rcpt,
        protocol.SMFIC_DATA: Connection._on_data,
        protocol.SMFIC_HEADER: Connection._on_header,
        protocol.SMFIC_EOH: Connection._on_eoh,
        protocol.SMFIC_BODY: Connection._on_body,
        protocol.SMFIC_BODYEOB: Connection._on_eob,
        protocol.SMFIC_ABORT: Connection._on_abort,
        protocol.SMFIC_QUIT: Connection._on_quit,
        protocol.SMFIC_QUIT_NC: Connection._on_quit_nc,
        protocol.SMFIC_UNKNOWN: Connection._on_unknown,
    }))


def _args(data: bytes) -> list[bytes]:
    """MAIL or RCPT arguments; none at all is not from an MTA (libmilter closes)."""
    parts = data.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    if not parts:
        raise ConnectionClosed("MAIL or RCPT without an address")
    return parts


def _connect_args(data: bytes) -> tuple[bytes, int, Any]:
    """(host name bytes, family, address) as pymilter passes them; what libmilter
    refuses (no NUL, an unknown family, an address that does not parse) closes."""
    host, sep, rest = data.partition(b"\0")
    if not sep or not rest:
        raise ConnectionClosed("connect without its family")
    family = rest[:1]
    if family == protocol.SMFIA_UNKNOWN:
        return host, 0, None
    if family not in _FAMILIES or len(rest) < 4 or not rest.endswith(b"\0"):
        raise ConnectionClosed(f"connect with family {family!r}")
    port = _INDEX.unpack(b"\0\0" + rest[1:3])[0]
    address = rest[3:-1].decode("ascii", "replace")
    if family == protocol.SMFIA_UNIX:
        return host, socket.AF_UNIX, address
    try:
        socket.inet_pton(_FAMILIES[family], address)
    except OSError:
        raise ConnectionClosed(f"connect with address {address!r}") from None
    return host, _FAMILIES[family], (address, port)


# A thread blocked in accept() on the shared listener wakes every this many
# seconds (SO_RCVTIMEO), so that it sees the runner's ListenerGate put a pipe on
# the listening fd: a drain waits this long before counting open sessions.
ACCEPT_WAKE_SECONDS = 0.25
# Idle threads kept waiting in accept() per worker; more are started on demand
# (up to the connection limit) and the extra ones end once idle again.
SPARE_THREADS = 4


class Acceptors:
    """Threads that each accept a connection and serve it themselves.

    Each idle thread waits in a blocking accept() on the shared listener. The
    kernel wakes one waiter per connection (an exclusive wait, across the
    workers too, which spreads sequential connections over them), and the
    thread that accepted serves the connection: no hand-off from an accepting
    thread to a pool, which cost a thread switch and a queue per connection.
    The last idle thread to accept starts another, so one always waits while
    there is room under the limit.
    """

    def __init__(self, listener: socket.socket, serve: Callable[[socket.socket], None],
                 limit: int, name: str) -> None:
        self.listener = listener
        self.serve = serve
        self.limit = limit
        self.name = name
        self._lock = threading.Lock()
        self._idle = 0
        self._threads = 0
        self._saturated = False  # every thread busy, the limit reached (logged once)
        # Read once: socket.accept() and .family cost more Python than the
        # accept itself (an enum conversion each).
        self._kind = (listener.family, listener.type, listener.proto)
        self._tcp = listener.family in (socket.AF_INET, socket.AF_INET6)

    def start(self) -> None:
        with self._lock:
            self._spawn()

    def _spawn(self) -> None:
        """Start one more accepting thread (the lock is held)."""
        self._threads += 1
        self._idle += 1
        threading.Thread(target=self._run, name="milter", daemon=True).start()

    def _run(self) -> None:
        while True:
            conn = self._accept()
            with self._lock:
                self._idle -= 1
                if self._idle == 0:
                    if self._threads < self.limit:
                        self._spawn()
                    else:
                        self._saturated = True
                        # Connections now wait in the listen backlog: say so, as the
                        # descriptor gate does (held, never negotiated connections
                        # can do this; the connection limit cannot see them).
                        log.warning("filter %s: all %d connection threads busy; not "
                                    "accepting connections until one ends (held "
                                    "connections? see max_connections)",
                                    self.name, self._threads)
            self.serve(conn)  # Connection.serve logs its own errors and never raises
            with self._lock:
                if self._saturated:
                    self._saturated = False
                    log.info("filter %s: a connection thread is free; accepting "
                             "connections again", self.name)
                if self._idle >= SPARE_THREADS:
                    self._threads -= 1
                    return
                self._idle += 1

    def _accept(self) -> socket.socket:
        while True:
            try:
                fd, _ = self.listener._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                continue  # woke for the gate (ACCEPT_WAKE_SECONDS), or a signal
            except OSError as exc:
                # Out of descriptors (EMFILE), or the gate's pipe on the fd
                # (ENOTSOCK) while paused or retired: do not spin on it.
                log.debug("filter %s: accept failed: %s", self.name, exc)
                time.sleep(0.1)
                continue
            conn = socket.socket(*self._kind, fileno=fd)
            if self._tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return conn


def serve_forever(runtime: Runtime, sessions: SessionCounter, max_connections: int,
                  listen_fd: int) -> None:
    """Accept on the worker's listening fd (by its number: see the module docstring)
    and serve each MTA connection in the thread that accepted it."""
    timeout = float(runtime.config.filters[runtime.filter.name].timeout)
    klass = adapter_class(runtime, sessions, ContextMacros(), max_connections,
                          quick_ack=True)
    listener = socket.socket(fileno=listen_fd)
    listener.setblocking(True)
    set_timeouts(listener, kernel_timeval(ACCEPT_WAKE_SECONDS))
    timeval = kernel_timeval(timeout)
    tcp = listener.family in (socket.AF_INET, socket.AF_INET6)

    def serve(conn: socket.socket) -> None:
        Connection(conn, klass, timeval, quick_ack=tcp).serve()

    # Room beyond max_connections so that the session over the limit is answered
    # 451 by the adapter, not left waiting for a thread.
    Acceptors(listener, serve, max_connections + 16, runtime.filter.name).start()
    try:
        threading.Event().wait()  # the threads serve; a drain or stop ends the process
    finally:
        listener.detach()  # the fd belongs to the runner (ListenerGate)
