"""The only module that imports pymilter: milter callbacks -> Pipeline -> milter actions.

One adapter serves every filter. For each filter a class is made that defines
only the callbacks the filter's stages need, so pymilter negotiates the rest
away (an SPF filter never receives the body). Per-connection state lives on the
Session (and its Pipeline), per-message state in a Transaction made at MAIL
FROM and dropped at end of message or abort; process-wide state in the Runtime.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import socket
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

import Milter
import milter

from milters.core import protocol
from milters.core.chain import ChainFilter, ChainPipeline
from milters.core.filter import Stage
from milters.core.macroreader import LayoutError, MacroReader, Macros, MacroSource
from milters.core.macros import CONNECT_MACROS, EOM_MACROS, MAIL_MACROS
from milters.core.model import Connection, Header, Transaction, unbracket
from milters.core.pipeline import Pipeline
from milters.core.plan import OpKind, Plan
from milters.core.runtime import Runtime, SessionCounter
from milters.core.verdict import Action, Reply, Verdict

log = logging.getLogger(__name__)

# libmilter's ctx_state while a callback runs (engine.c ST_*).
_ST_CONN = 2
_ST_HELO = 3
_ST_HDRS = 7

_MILTER_RESULT = types.MappingProxyType({
    Action.REJECT: Milter.REJECT,
    Action.TEMPFAIL: Milter.TEMPFAIL,
    Action.DISCARD: Milter.DISCARD,
})

# The callbacks' return codes as protocol replies, for the Python core
# (core/pyserver.py), which drives these same Session classes without pymilter's C.
CONTINUE = int(Milter.CONTINUE)
NOREPLY = int(Milter.NOREPLY)  # a @noreply callback's code: nothing is sent
REFUSALS = frozenset({int(Milter.REJECT), int(Milter.TEMPFAIL)})  # may carry a reply code
CODE_REPLIES = types.MappingProxyType({
    int(Milter.CONTINUE): protocol.SMFIR_CONTINUE,
    int(Milter.REJECT): protocol.SMFIR_REJECT,
    int(Milter.ACCEPT): protocol.SMFIR_ACCEPT,
    int(Milter.DISCARD): protocol.SMFIR_DISCARD,
    int(Milter.TEMPFAIL): protocol.SMFIR_TEMPFAIL,
    int(Milter.SKIP): protocol.SMFIR_SKIP,
})

# Named replies for what the adapter itself refuses (never exception text).
REPLY_PROTOCOL_VIOLATION = Reply("451", "4.7.0", "malformed milter data, try again later")
REPLY_TOO_MANY_CONNECTIONS = Reply("451", "4.3.2", "filter busy, try again later")
REPLY_MACROS_UNREADABLE = Reply("451", "4.3.0", "temporary local problem, please try again later")

# Seconds between two log lines about refused connections (per worker).
REFUSAL_LOG_INTERVAL = 10.0


class ProtocolViolation(Exception):
    """The MTA side sent something no MTA sends; the connection is refused."""


class Session(Milter.Base):  # type: ignore[misc]
    """Callbacks for one SMTP connection. Subclassed per filter by `adapter_class`."""

    runtime: Runtime
    pipeline_class: type[Pipeline]  # ChainPipeline for the chain's one socket
    sessions: SessionCounter
    actions: int  # action_flags(runtime), once per class, not per connection
    macro_reader: MacroSource
    max_connections: int
    takes_headers = False  # the class has the header callback (adapter_class)
    # pymilter gives every connection its own Python thread state (miltermodule.c
    # _get_context), and threading.local lives in the thread state: so this is
    # per connection. It lets the excepthook (see `undecodable`) find the session
    # whose arguments pymilter could not decode.
    current: threading.local

    def __init__(self) -> None:
        self.conn = Connection()
        self.pipeline = self.pipeline_class(self.runtime, self.conn)
        self.tx: Transaction | None = None
        # A refusal for the rest of the connection (protocol violation, limit),
        # and one for the rest of the message (an error where no answer could go).
        self._refusal: Verdict | None = None
        self._pending: Verdict | None = None
        self._helo_late = False
        self.sessions.opened()
        self._counted = True
        self.current.session = self

    def negotiate(self, opts: list[int]) -> int:
        # What Milter.Base.negotiate does for a class without @symlist (the
        # protocol steps our callbacks leave out are skipped, cached on the
        # class by pymilter), but declaring only our actions, not every one
        # the MTA offers.
        opts[0] &= self.actions
        self._actions = opts[0]
        opts[1] = self._protocol = opts[1] & ~self.protocol_mask()
        opts[2] = opts[3] = 0
        if self.sessions.open > self.max_connections:
            # Over the limit: have connect answered (even by a filter that takes
            # it without a reply) so that we can refuse there; Postfix defers.
            opts[1] &= ~Milter.P_NR_CONN
            self._protocol = opts[1]
            self._refusal = Verdict(Action.TEMPFAIL, reply=REPLY_TOO_MANY_CONNECTIONS,
                                    reason="connection limit")
            refused = self.sessions.refused(REFUSAL_LOG_INTERVAL)
            if refused:
                log.warning("filter %s: %d open connections reached this worker's limit "
                            "max_connections = %d; refused %d connection(s) with %s",
                            self.runtime.filter.name, self.sessions.open - 1,
                            self.max_connections, refused, REPLY_TOO_MANY_CONNECTIONS)
        return CONTINUE

    def _macros(self, names: tuple[str, ...], into: dict[str, str]) -> None:
        # The names are as the macro readers key them (core/macros.py: no "{i}"
        # forms), so no Macros.get and its normalize per name.
        values = self._read_macros().values
        for name in names:
            value = values.get(name)
            if value:
                into[name] = value

    def _read_macros(self) -> Macros:
        try:
            macros = self.macro_reader.read(self._ctx)
        except LayoutError as exc:
            # Fail closed: without {auth_authen} or {daemon_name} a filter would
            # decide wrongly (an unsigned outgoing message, an SPF reject of our
            # own user), and guessing at memory is what we set out not to do.
            self._refusal = Verdict(Action.TEMPFAIL, reply=REPLY_MACROS_UNREADABLE,
                                    reason="macros unreadable")
            raise ProtocolViolation(
                f"cannot read libmilter's macros safely ({exc}); this libmilter build "
                "does not match the layout in core/macroreader.py"
            ) from None
        if macros.odd_lists:
            raise ProtocolViolation(
                f"macro list with an odd number of strings at {', '.join(macros.odd_lists)}"
            )
        return macros

    def _answer(self, refused: Verdict | None) -> int:
        if refused is None or refused.action is Action.ACCEPT:
            return int(Milter.CONTINUE)
        r = refused.reply
        if r is not None and refused.action in (Action.REJECT, Action.TEMPFAIL):
            # libmilter silently drops a reply with a lone '%': double them.
            self.setreply(r.code, r.xcode or None, _wire(r.text).replace("%", "%%"))
        return int(_MILTER_RESULT[refused.action])

    # -- the backstop -------------------------------------------------------

    def _guard(self, name: str, impl: Callable[..., int], args: tuple[Any, ...],
               can_answer: bool) -> int:
        """One try per callback: nothing raises into pymilter, every failure is
        answered (now, or at the next callback that can answer), never silence."""
        try:
            if name == "envfrom":
                self._pending = None  # a new message starts clean
            refusal = self._refusal or self._pending
            if refusal is None and self._helo_late and name not in ("hello", "abort", "close"):
                # The HELO pymilter could not decode, decided now (see undecodable).
                self._helo_late = False
                refusal = self._pending = self.pipeline.helo()
            if refusal is None:
                return impl(self, *args)
        except ProtocolViolation as exc:
            if self._refusal is None:
                self._refusal = Verdict(Action.TEMPFAIL, reply=REPLY_PROTOCOL_VIOLATION,
                                        reason="protocol violation")
            log.warning("queue_id=%s filter=%s stage=%s protocol violation: %s; answering %s",
                        self.pipeline.queue_id(self.tx), self.runtime.filter.name, name, exc,
                        self._refusal.reply)
            refusal = self._refusal
        except Exception:  # the backstop, by design: logged with its traceback
            refusal = self.pipeline.failed(self.tx, f"error in the {name} callback")
            if refusal.action is Action.ACCEPT:
                # on_error = accept: let this message through untouched.
                self._drop_tx()
                return int(Milter.ACCEPT) if can_answer else int(Milter.CONTINUE)
            self._pending = refusal
        if name in ("abort", "close"):
            if name == "close":
                self._close()
            else:
                self._abort()
            return int(Milter.CONTINUE)
        if not can_answer:
            return int(Milter.CONTINUE)  # the next callback that answers says it
        return self._answer(refusal)

    def undecodable(self, raw: bytes) -> None:
        """pymilter could not decode an argument of the callback now running (it
        builds connect's host name, HELO and header names as strict UTF-8 in C,
        before any of our code runs). libmilter's state tells which it was."""
        try:
            state = self.macro_reader.state(self._ctx)
        except LayoutError:
            state = -1
        text = raw.decode("utf-8", "surrogateescape")
        if state == _ST_HELO:
            # RFC 5321 §4.1.1.1: HELO is a domain or an address literal; 8-bit
            # bytes (reachable from SMTP with smtputf8_enable = no) are the
            # filter's to judge, so hand it the bytes, escaped, at the next step.
            self.conn.helo = text
            self._helo_late = Stage.HELO in self.runtime.needed
            log.info("queue_id=%s filter=%s HELO is not UTF-8: %r",
                     self.pipeline.queue_id(self.tx), self.runtime.filter.name, raw[:100])
            return
        what = {_ST_CONN: "client host name", _ST_HDRS: "header field name"}.get(
            state, "callback argument")
        # RFC 5322 §2.2: a field name is printable US-ASCII; Postfix's host
        # names are validated ASCII. Only a broken or hostile client sends these.
        if self._refusal is None:
            self._refusal = Verdict(Action.TEMPFAIL, reply=REPLY_PROTOCOL_VIOLATION,
                                    reason="protocol violation")
        log.warning("queue_id=%s filter=%s protocol violation: %s is not UTF-8: %r; "
                    "answering %s", self.pipeline.queue_id(self.tx),
                    self.runtime.filter.name, what, raw[:100], self._refusal.reply)

    # -- callbacks (copied onto the per-filter class as needed) -------------

    def _connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self.conn.client_name = hostname or ""
        if family in (socket.AF_INET, socket.AF_INET6) and isinstance(hostaddr, tuple):
            self.conn.client_addr = str(hostaddr[0])
            self.conn.client_port = int(hostaddr[1])
        self._macros(CONNECT_MACROS, self.conn.macros)
        if self.pipeline.accepted_at_connect():
            return int(Milter.ACCEPT)  # Postfix calls us no more for this session
        return self._answer(self.pipeline.connect())

    def _hello(self, helo: str) -> int:
        self.conn.helo = helo
        return self._answer(self.pipeline.helo())

    def _envfrom(self, mail_from: bytes, *params: bytes) -> int:
        self._drop_tx()
        tx = Transaction(self.conn)
        tx.mail_from = unbracket(mail_from.decode("utf-8", "surrogateescape"))
        tx.mail_from_params = tuple(p.decode("utf-8", "surrogateescape") for p in params)
        self._macros(MAIL_MACROS, tx.macros)
        # {auth_authen} comes with MAIL FROM by default; it holds for the session.
        for name in ("{auth_type}", "{auth_authen}", "{auth_author}"):
            if name in tx.macros:
                self.conn.macros[name] = tx.macros[name]
        self.tx = tx
        return self._answer(self.pipeline.mail(tx))

    def _envrcpt(self, rcpt: bytes, *params: bytes) -> int:
        if self.tx is None:  # RCPT without MAIL: not from a conforming MTA
            raise ProtocolViolation("RCPT before MAIL")
        address = unbracket(rcpt.decode("utf-8", "surrogateescape"))
        return self._answer(self.pipeline.rcpt(self.tx, address))

    def _data(self) -> int:
        # Answered under libmilter (not @noreply): Postfix then waits for our reply
        # instead of leaving its small macro packet unacknowledged, which costs
        # a 40 ms delayed-ACK stall per message (shared/notes/milter-latency.md).
        # The Python core acks every read at once instead (adapter_class quick_ack).
        if self.tx is None:
            raise ProtocolViolation("DATA before MAIL")
        return int(Milter.CONTINUE)

    def _header(self, name: str, value: bytes) -> int:
        if self.tx is None:
            raise ProtocolViolation("header before MAIL")
        self.tx.headers.append(Header(name, value))
        return int(Milter.CONTINUE)

    def take_header(self, name: str, value: bytes) -> bool:
        """The header step of the Python core (core/pyserver.py) where `_guard`
        would call `_header` straight away and `_header` cannot fail (a transaction
        is open, no refusal or late HELO waits): without the wrappers around it
        (about half a filter's callbacks are header fields). False: take the full
        path."""
        if (self.tx is None or not self.takes_headers or self._refusal is not None
                or self._pending is not None or self._helo_late):
            return False
        self._header(name, value)
        return True

    def _eoh(self) -> int:
        # Answered under libmilter, like data(): Postfix flushes the headers it
        # buffered (they need no reply) in one write and waits for us; no small
        # write is left waiting for a delayed ACK.
        if self.tx is None:
            raise ProtocolViolation("end of header before MAIL")
        return int(Milter.CONTINUE)

    def _body(self, chunk: bytes) -> int:
        if self.tx is None:
            raise ProtocolViolation("body before MAIL")
        self.tx.body.write(chunk)
        return int(Milter.CONTINUE)

    def _eom(self) -> int:
        tx = self.tx
        if tx is None:
            raise ProtocolViolation("end of message before MAIL")
        if not tx.queue_id:
            # The queue id for the log line; a read costs tens of microseconds,
            # so only when MAIL did not already bring it.
            self._macros(EOM_MACROS, tx.macros)
        outcome = self.pipeline.end_of_message(tx)
        verdict = outcome.verdict
        try:
            rc = self._carry_out(verdict, outcome.plan)
        except Exception:  # the MTA refused an action: on_error, keep serving
            verdict = self.pipeline.failed(tx, "carrying out the verdict failed")
            rc = self._answer(verdict) if verdict.action is not Action.ACCEPT else Milter.ACCEPT
        self.pipeline.log("eom", tx, verdict, outcome.ms)
        self._drop_tx()
        return int(rc)

    def _carry_out(self, verdict: Verdict, plan: Plan) -> int:
        """Replay the plan the pipeline made (core/plan.py), operation by operation."""
        if verdict.action is not Action.ACCEPT:
            return self._answer(verdict)
        leadspc = bool(self._protocol & Milter.P_HDR_LEADSPC)
        for op in plan.header_ops:
            if op.kind is OpKind.INSERT:
                self.addheader(_wire(op.name), _value(op.value, leadspc), op.index)
            elif op.kind is OpKind.APPEND:
                self.addheader(_wire(op.name), _value(op.value, leadspc))
            else:
                value = None if op.kind is OpKind.DELETE else _value(op.value, leadspc)
                self.chgheader(_wire(op.name), op.index, value)
        for rcpt in plan.del_rcpts:
            self.delrcpt(_wire(f"<{rcpt}>"))
        for rcpt in plan.add_rcpts:
            self.addrcpt(_wire(f"<{rcpt}>"))
        if plan.replace_body is not None:
            body = plan.replace_body
            for i in range(0, max(len(body), 1), 65535):
                self.replacebody(body[i : i + 65535])
        if plan.quarantine:
            self.quarantine(_wire(plan.quarantine))
        return int(Milter.ACCEPT)

    def _abort(self) -> int:
        self._drop_tx()
        return int(Milter.CONTINUE)

    def _close(self) -> int:
        self._drop_tx()
        if self._counted:
            self._counted = False
            self.sessions.closed()
        return int(Milter.CONTINUE)

    def _drop_tx(self) -> None:
        # The end of a message ends what was pending for it.
        self._pending = None
        if self.tx is not None:
            self.tx.close()
        self.tx = None


def _value(value: str, leadspc: bool) -> str:
    # With SMFIP_HDR_LEADSPC negotiated Postfix takes values verbatim, so the
    # space after the colon is ours to write.
    value = _wire(value)
    return " " + value if leadspc and not value.startswith((" ", "\t")) else value


def _wire(text: str) -> str:
    """Text pymilter can send: it encodes strict UTF-8, and a value we write may
    carry 8-bit bytes from the envelope as surrogate escapes (a HELO or MAIL FROM
    that is not UTF-8): each becomes '?' rather than an error at end of message."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def adapter_class(runtime: Runtime, sessions: SessionCounter, macro_reader: MacroSource,
                  max_connections: int, quick_ack: bool = False) -> type[Session]:
    """A Session subclass with exactly the callbacks this filter needs.

    `quick_ack`: the core acknowledges every read of a TCP connection at once
    (TCP_QUICKACK; the Python core does, libmilter cannot). Then DATA and end of
    header need no reply: Postfix's next write is never held by Nagle waiting for
    our delayed ACK (shared/notes/milter-latency.md), and it sends HELO to DATA
    in one write, the header and body with end of message in another: two round
    trips a message fewer.
    """
    needed = runtime.needed
    bypass = bool(runtime.policy.bypass_recipients)
    chain = isinstance(runtime.filter, ChainFilter)
    ns: dict[str, Any] = {"runtime": runtime, "sessions": sessions,
                          "pipeline_class": ChainPipeline if chain else Pipeline,
                          "actions": action_flags(runtime), "macro_reader": macro_reader,
                          "max_connections": max_connections, "current": threading.local()}

    def cb(name: str, impl: Callable[..., int], reply: bool, raw: bool = False) -> None:
        nr_bit = int(Milter.OPTIONAL_CALLBACKS.get(name, (0, 0))[0])

        def method(self: Session, *args: Any) -> int:
            # With @noreply negotiated there is no answer to give now (libmilter
            # answers CONTINUE itself to an MTA that wants one): a refusal waits
            # for the next callback that answers.
            can_answer = reply or not self._protocol & nr_bit
            return self._guard(name, impl, args, can_answer)

        method.__name__ = name
        wrapped: Any = method if reply else Milter.noreply(method)
        if raw:
            # Values as bytes: DKIM needs them byte-exact, and non-UTF-8 junk
            # must reach the filter rather than be mangled.
            wrapped = Milter.decode("bytes")(wrapped)
        ns[name] = wrapped

    cb("connect", Session._connect, Stage.CONNECT in needed or runtime.accepts_early)
    # HELO is always taken (for the log line), answered only when a filter decides on it.
    cb("hello", Session._hello, Stage.HELO in needed)
    cb("envfrom", Session._envfrom, Stage.MAIL in needed, raw=True)
    cb("envrcpt", Session._envrcpt, Stage.RCPT in needed or bypass, raw=True)
    cb("data", Session._data, not quick_ack)
    # Headers also for the removal of forged Authentication-Results fields.
    removes_forged = runtime.strip_all_forged or bool(runtime.filter.ar_methods)
    # ...and for the holds handed on to the last filter (core/hold.py).
    if needed & (Stage.HEADER | Stage.BODY) or removes_forged or runtime.applies_holds:
        cb("header", Session._header, False, raw=True)
        ns["takes_headers"] = True
        cb("eoh", Session._eoh, not quick_ack)
    if Stage.BODY in needed:
        cb("body", Session._body, False)
    cb("eom", Session._eom, True)
    cb("abort", Session._abort, True)
    cb("close", Session._close, True)
    klass: type[Session] = type(f"{runtime.filter.name.capitalize()}Session", (Session,), ns)
    # Header values with their leading space and folding exactly as received
    # (postfix-checks-semantics.md §7), and the same for fields we add.
    Milter.header_leading_space(klass)
    return klass


def action_flags(runtime: Runtime) -> int:
    """The milter actions this filter may use: declare no more than that."""
    f = runtime.filter
    flags = Milter.ADDHDRS | Milter.CHGHDRS
    if f.may_change_recipients:
        flags |= Milter.ADDRCPT | Milter.DELRCPT
    if f.may_replace_body:
        flags |= Milter.CHGBODY
    if f.may_quarantine or runtime.applies_holds:
        flags |= Milter.QUARANTINE
    return int(flags)


LibmilterError = milter.error


def open_socket(name: str, runtime: Runtime, conn: str, timeout: int) -> None:
    """Register the callbacks and open the listening socket (before any fork)."""
    milter.set_connect_callback(Milter.connect_callback)
    milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(Milter.close_callback)
    milter.set_flags(action_flags(runtime))
    # An argument pymilter cannot build (8-bit where it wants UTF-8) would
    # otherwise answer "451 pymilter: untrapped exception"; we answer it
    # ourselves at the next callback (see _excepthook).
    milter.set_exception_policy(Milter.CONTINUE)
    milter.register(
        name,
        data=lambda ctx: ctx.getpriv().data(),
        unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
        negotiate=Milter.negotiate_callback,
    )
    milter.setconn(conn)
    milter.settimeout(timeout)
    _raise_packet_limit()
    milter.opensocket(True)


# libmilter drops the connection on a packet over 64 KB by default, but Postfix
# sends a header field whole, up to header_size_limit (100 KB by default).
# pymilter does not expose smfi_setmaxdatasize, so call it in the library that
# pymilter itself linked (dlopen of the same soname returns the same handle).
MAX_PACKET = 1024 * 1024 - 1  # libmilter's MILTER_MDS_1M


def _raise_packet_limit() -> None:
    path = ctypes.util.find_library("milter")
    if path is None:
        return
    lib = ctypes.CDLL(path)
    lib.smfi_setmaxdatasize.argtypes = [ctypes.c_size_t]
    lib.smfi_setmaxdatasize.restype = ctypes.c_size_t
    lib.smfi_setmaxdatasize(MAX_PACKET)


def serve_forever(runtime: Runtime, sessions: SessionCounter, max_connections: int) -> None:
    """libmilter's accept loop, until it is told to stop (SIGTERM)."""
    timeout = int(runtime.config.filters[runtime.filter.name].timeout)
    reader = MacroReader(timeout)  # /proc/self/mem of this worker, after the fork
    klass = adapter_class(runtime, sessions, reader, max_connections)
    # pymilter makes each session from this one module attribute; it is set once
    # per worker process, before any thread exists.
    Milter.factory = klass
    # Process-wide, once per worker, before any thread exists: see _excepthook.
    sys.excepthook = functools.partial(_excepthook, klass)
    milter.main()


def _excepthook(klass: type[Session], kind: type[BaseException], exc: BaseException,
                tb: types.TracebackType | None) -> None:
    """What pymilter's C callbacks raise before our code runs.

    pymilter builds connect's host name, HELO and header names as strict UTF-8
    (Py_BuildValue "s"); on 8-bit bytes it prints the exception (PyErr_Print,
    which calls sys.excepthook) and answers with its exception policy, which we
    set to CONTINUE. Our own callbacks never raise (Session._guard). So an
    exception here is an undecodable argument: hand its bytes to the session of
    this thread state, which answers at its next callback.
    """
    session = getattr(klass.current, "session", None)
    if isinstance(exc, UnicodeDecodeError) and isinstance(session, Session):
        session.undecodable(bytes(exc.object))
        return
    log.error("unexpected error outside a callback: %s: %s", kind.__name__, exc)
