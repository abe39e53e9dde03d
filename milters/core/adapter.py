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
import socket
import types
from collections.abc import Callable
from typing import Any

import Milter
import milter

from milters.core import authresults
from milters.core.filter import Stage
from milters.core.model import Connection, Header, Transaction, unbracket
from milters.core.pipeline import Pipeline
from milters.core.runtime import Runtime, SessionCounter
from milters.core.verdict import ABOVE_RECEIVED, Action, EditKind, HeaderEdit, Verdict

# Macros Postfix can send (postconf milter_*_macros); we ask for each at the stage
# Postfix sends it and remember it from there on (`i` only arrives late by default).
CONNECT_MACROS = ("j", "_", "{daemon_name}", "{daemon_addr}", "{daemon_port}", "v",
                  "{client_addr}", "{client_name}", "{client_port}", "{client_ptr}")
HELO_MACROS = ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}")
MAIL_MACROS = ("i", "{auth_type}", "{auth_authen}", "{auth_author}", "{mail_addr}",
               "{mail_host}", "{mail_mailer}")
RCPT_MACROS = ("{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}")
EOM_MACROS = ("i", "{msg_id}")

_MILTER_RESULT = types.MappingProxyType({
    Action.REJECT: Milter.REJECT,
    Action.TEMPFAIL: Milter.TEMPFAIL,
    Action.DISCARD: Milter.DISCARD,
})


class Session(Milter.Base):  # type: ignore[misc]
    """Callbacks for one SMTP connection. Subclassed per filter by `adapter_class`."""

    runtime: Runtime
    sessions: SessionCounter
    actions: int  # action_flags(runtime), once per class, not per connection

    def __init__(self) -> None:
        self.conn = Connection()
        self.pipeline = Pipeline(self.runtime, self.conn)
        self.tx: Transaction | None = None
        self.sessions.opened()
        self._counted = True

    def negotiate(self, opts: list[int]) -> int:
        # pymilter hands back every action the MTA offers; declare only ours.
        rc = int(super().negotiate(opts))
        opts[0] &= self.actions
        self._actions = opts[0]
        return rc

    def _macros(self, names: tuple[str, ...], into: dict[str, str]) -> None:
        for name in names:
            value = self.getsymval(name)
            if value:
                into[name] = value

    def _answer(self, refused: Verdict | None) -> int:
        if refused is None or refused.action is Action.ACCEPT:
            return int(Milter.CONTINUE)
        r = refused.reply
        if r is not None and refused.action in (Action.REJECT, Action.TEMPFAIL):
            # libmilter silently drops a reply with a lone '%': double them.
            self.setreply(r.code, r.xcode or None, r.text.replace("%", "%%"))
        return int(_MILTER_RESULT[refused.action])

    # -- callbacks (copied onto the per-filter class as needed) -------------

    def _connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self.conn.client_name = hostname or ""
        if family in (socket.AF_INET, socket.AF_INET6) and isinstance(hostaddr, tuple):
            self.conn.client_addr = str(hostaddr[0])
            self.conn.client_port = int(hostaddr[1])
        self._macros(CONNECT_MACROS, self.conn.macros)
        return self._answer(self.pipeline.connect())

    def _hello(self, helo: str) -> int:
        self.conn.helo = helo
        self._macros(HELO_MACROS, self.conn.macros)
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
        if self.tx is None:  # not reachable with a conforming MTA
            return int(Milter.CONTINUE)
        self._macros(RCPT_MACROS, self.tx.macros)
        address = unbracket(rcpt.decode("utf-8", "surrogateescape"))
        return self._answer(self.pipeline.rcpt(self.tx, address))

    def _data(self) -> int:
        # Answered on purpose (not @noreply): Postfix then waits for our reply
        # instead of leaving its small macro packet unacknowledged, which costs
        # a 40 ms delayed-ACK stall per message (shared/notes/milter-latency.md).
        return int(Milter.CONTINUE)

    def _header(self, name: str, value: bytes) -> int:
        if self.tx is not None:
            self.tx.headers.append(Header(name, value))
        return int(Milter.CONTINUE)

    def _eoh(self) -> int:
        # Answered, like data(): Postfix flushes the headers it buffered (they
        # need no reply) in one write and waits for us; no small write is left
        # waiting for a delayed ACK.
        return int(Milter.CONTINUE)

    def _body(self, chunk: bytes) -> int:
        if self.tx is not None:
            self.tx.body.write(chunk)
        return int(Milter.CONTINUE)

    def _eom(self) -> int:
        tx = self.tx
        if tx is None:
            return int(Milter.CONTINUE)
        self._macros(EOM_MACROS, tx.macros)
        outcome = self.pipeline.end_of_message(tx)
        verdict = outcome.verdict
        try:
            rc = self._carry_out(tx, verdict)
        except Exception:  # the MTA refused an action: on_error, keep serving
            verdict = self.pipeline.failed(tx, "carrying out the verdict failed")
            rc = self._answer(verdict) if verdict.action is not Action.ACCEPT else Milter.ACCEPT
        self.pipeline.log("eom", tx, verdict, outcome.ms)
        self._drop_tx()
        return int(rc)

    def _carry_out(self, tx: Transaction, verdict: Verdict) -> int:
        if verdict.action is not Action.ACCEPT:
            return self._answer(verdict)
        rt = self.runtime
        leadspc = bool(self._protocol & Milter.P_HDR_LEADSPC)
        # Positional inserts first, bottom-up (a stable sort keeps the order of equal
        # positions), so earlier positions stay valid.
        inserts = sorted((e for e in verdict.header_edits if e.kind is EditKind.INSERT),
                         key=lambda e: e.index, reverse=True)
        for e in inserts:
            self._insert(e, leadspc)
        # Changes and deletions by occurrence, highest first per name, merged with
        # the removal of forged Authentication-Results fields. Postfix counts
        # occurrences in the header as already edited: inserted fields of the
        # same name above a target move it down.
        forged = authresults.forged_fields(
            tx.headers, rt.env.global_.authserv_id, rt.strip_all_forged, rt.filter.ar_methods
        )
        changes = [e for e in verdict.header_edits if e.kind in (EditKind.CHANGE, EditKind.DELETE)]
        changes += [HeaderEdit(EditKind.DELETE, authresults.FIELD_NAME, index=i) for i in forged]
        for e in sorted(changes, key=lambda e: (e.name.lower(), -e.index)):
            value = None if e.kind is EditKind.DELETE else _value(e.value, leadspc)
            self.chgheader(e.name, _shifted(tx, e, inserts), value)
        for e in verdict.header_edits:
            if e.kind is EditKind.ADD:
                self.addheader(e.name, _value(e.value, leadspc))
        for rcpt in verdict.del_rcpts:
            self.delrcpt(f"<{rcpt}>")
        for rcpt in verdict.add_rcpts:
            self.addrcpt(f"<{rcpt}>")
        if verdict.replace_body is not None:
            body = verdict.replace_body
            for i in range(0, max(len(body), 1), 65535):
                self.replacebody(body[i : i + 65535])
        if verdict.results:
            # RFC 8601 §5: at the very top, above the Received field Postfix adds.
            # Last, after the forged fields of the same name are gone, so that it
            # shifts no occurrence number above.
            value = authresults.fold(
                authresults.format_value(rt.env.global_.authserv_id, verdict.results)
            )
            self._insert(HeaderEdit(EditKind.INSERT, authresults.FIELD_NAME, value,
                                    ABOVE_RECEIVED), leadspc)
        if verdict.quarantine:
            self.quarantine(verdict.quarantine)
        return int(Milter.ACCEPT)

    def _insert(self, edit: HeaderEdit, leadspc: bool) -> None:
        # Postfix counts its own hidden Received field as position 0: "before the
        # field we saw at 0-based position p" is index p + 1, ABOVE_RECEIVED (-1) is 0.
        self.addheader(edit.name, _value(edit.value, leadspc), edit.index + 1)

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
        if self.tx is not None:
            self.tx.close()
        self.tx = None


def _shifted(tx: Transaction, edit: HeaderEdit, inserts: list[HeaderEdit]) -> int:
    """The occurrence number of `edit`'s target once `inserts` are in place."""
    name = edit.name.lower()
    seen = 0
    position = len(tx.headers)
    for i, h in enumerate(tx.headers):
        if h.name.lower() == name:
            seen += 1
            if seen == edit.index:
                position = i
                break
    above = sum(1 for e in inserts if e.name.lower() == name and e.index <= position)
    return edit.index + above


def _value(value: str, leadspc: bool) -> str:
    # With SMFIP_HDR_LEADSPC negotiated Postfix takes values verbatim, so the
    # space after the colon is ours to write.
    return " " + value if leadspc and not value.startswith((" ", "\t")) else value


def adapter_class(runtime: Runtime, sessions: SessionCounter) -> type[Session]:
    """A Session subclass with exactly the callbacks this filter needs."""
    needed = runtime.needed
    bypass = bool(runtime.policy.bypass_recipients)
    ns: dict[str, Any] = {"runtime": runtime, "sessions": sessions,
                          "actions": action_flags(runtime)}

    def cb(name: str, impl: Callable[..., int], reply: bool, raw: bool = False) -> None:
        def method(self: Session, *args: Any) -> int:
            return impl(self, *args)

        method.__name__ = name
        wrapped: Any = method if reply else Milter.noreply(method)
        if raw:
            # Values as bytes: DKIM needs them byte-exact, and non-UTF-8 junk
            # must reach the filter rather than be mangled.
            wrapped = Milter.decode("bytes")(wrapped)
        ns[name] = wrapped

    cb("connect", Session._connect, Stage.CONNECT in needed)
    # HELO is always taken (for the log line), answered only when a filter decides on it.
    cb("hello", Session._hello, Stage.HELO in needed)
    cb("envfrom", Session._envfrom, Stage.MAIL in needed, raw=True)
    cb("envrcpt", Session._envrcpt, Stage.RCPT in needed or bypass, raw=True)
    cb("data", Session._data, True)
    # Headers also for the removal of forged Authentication-Results fields.
    removes_forged = runtime.strip_all_forged or bool(runtime.filter.ar_methods)
    if needed & (Stage.HEADER | Stage.BODY) or removes_forged:
        cb("header", Session._header, False, raw=True)
        cb("eoh", Session._eoh, True)
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
    if f.may_quarantine:
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


def serve_forever(runtime: Runtime, sessions: SessionCounter) -> None:
    """libmilter's accept loop, until it is told to stop (SIGTERM)."""
    # pymilter makes each session from this one module attribute; it is set once
    # per worker process, before any thread exists.
    Milter.factory = adapter_class(runtime, sessions)
    milter.main()
