"""`MilterSession`: one MTA-side connection to a milter, step by step, as Postfix
3.7's milter client (src/milter/milter8.c) has it.

- OPTNEG offers protocol version 6, every action and every protocol bit
  Postfix offers with `milter_protocol = 6`; the milter's answer is honoured: a
  step it negotiated away (SMFIP_NO*) is not sent, a reply it said it will not
  send (SMFIP_NR_*) is not waited for, and macro lists it asked for
  (SMFIR_SETSYMLIST data after the OPTNEG reply) replace the defaults per stage.
- Before each event an SMFIC_MACRO packet carries that stage's macros (Postfix's
  `milter_*_macros` defaults, core/macros.py), also for envelope events the
  milter negotiated away, as Postfix does; header events carry the
  end-of-header list and body chunks the end-of-data list.
- Header values are sent as Postfix sends them: the bytes after the colon with
  folded lines joined by "\\n", one leading space removed unless the milter
  negotiated SMFIP_HDR_LEADSPC. The body follows with CRLF line ends in
  SMFIC_BODY chunks of at most 65535 bytes, then an empty SMFIC_BODYEOB.
- After every transaction that got as far as MAIL FROM an SMFIC_ABORT is sent
  (Postfix's smtpd calls milter_abort() from mail_reset()), so several
  messages can share one connection; SMFIC_QUIT ends the session.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import NoReturn

from milters.client import wire
from milters.client.errors import (
    MilterClientError,
    MilterClosed,
    MilterTimeout,
    MilterUnavailable,
    ProtocolError,
)
from milters.client.replies import Modification, StageReply
from milters.client.wire import (
    ALL_ACTIONS,
    LEADSPC_BIT,
    MAX_PACKET,
    MILTER_CHUNK_SIZE,
    MOD_REPLIES,
    PACKET_HEAD,
    PACKET_LENGTH,
    POSTFIX_PROTOCOL,
    POSTFIX_VERSION_MACRO,
    SMFIC_ABORT,
    SMFIC_MACRO,
    SMFIC_OPTNEG,
    SMFIC_QUIT,
    SMFIR_PROGRESS,
    SMFIR_QUARANTINE,
    SMFIR_REPLBODY,
    ActionFlag,
    Event,
    Negotiated,
    ProtocolFlag,
    cstr,
    cstrings,
    reply_name,
)
from milters.core import model
from milters.core.envelope import Envelope
from milters.core.macros import DEFAULT_MACRO_LISTS
from milters.core.sockets import SocketSpec, parse_socket


def _bracket(address: str) -> str:
    return address if address.startswith("<") and address.endswith(">") else f"<{address}>"


def _unbracket(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        return address[1:-1]
    return address


def _domain(address: str) -> str:
    return address.rpartition("@")[2] if "@" in address else ""


class MilterSession:
    """One MTA-side connection to a milter; a context manager.

    Entering opens the socket and negotiates (OPTNEG); then call the SMTP stages
    in order: connect, helo, mail, rcpt..., data, header..., eoh, body, eom,
    abort (after each transaction), and finally quit. Each returns a StageReply.
    Stages the milter negotiated away come back with `sent=False`; replies it
    said it would not send are not waited for. Any protocol failure raises a
    MilterClientError subclass and leaves the session closed.
    """

    def __init__(
        self,
        spec: str | SocketSpec,
        *,
        timeout: float = 10.0,
        connect_timeout: float | None = None,
        actions: ActionFlag = ALL_ACTIONS,
        protocol: ProtocolFlag = POSTFIX_PROTOCOL,
        macro_lists: Mapping[str, Sequence[str]] | None = None,
        tcp_nodelay: bool = True,
    ) -> None:
        self.spec = spec if isinstance(spec, SocketSpec) else parse_socket(spec)
        self.timeout = timeout
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self.offer_actions = actions
        self.offer_protocol = protocol
        self.tcp_nodelay = tcp_nodelay
        self._lists = {k: tuple(v) for k, v in DEFAULT_MACRO_LISTS.items()}
        if macro_lists:
            self._lists.update({k: tuple(v) for k, v in macro_lists.items()})
        self.envelope = Envelope()
        self._sock: socket.socket | None = None
        self._rbuf = bytearray()
        self._out: list[bytes] = []
        self._negotiated: Negotiated | None = None
        self._skip_event: bytes | None = None  # after SMFIR_SKIP (milter8.c skip_event_type)
        self._not_in_version = 0  # SMFIP_NO* bits of events the milter's version lacks
        self._proto = 0  # the negotiated SMFIP_* bits as a plain int
        self._macro_cache: dict[tuple[bytes, str, str, bool, bool], bytes] = {}
        self._in_transaction = False
        self._queue_id_known = False  # Postfix opens the queue file after the 1st RCPT
        self._sender = ""
        self._rcpt = ""

    # -- context manager -------------------------------------------------

    def __enter__(self) -> MilterSession:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None and self._sock is not None:
            try:
                self.quit()
            except MilterClientError:
                self.close()
        else:
            self.close()

    # -- connection ------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    @property
    def negotiated(self) -> Negotiated:
        if self._negotiated is None:
            raise MilterClientError(f"milter {self.spec}: not negotiated yet (call open())")
        return self._negotiated

    def open(self) -> Negotiated:
        """Connect and negotiate (SMFIC_OPTNEG)."""
        if self._sock is not None:
            return self.negotiated
        self._sock = self._connect_socket()
        self._queue(SMFIC_OPTNEG, wire.optneg_payload(self.offer_actions, self.offer_protocol))
        self._flush("negotiation")
        cmd, data = self._read_packet("negotiation")
        if cmd != SMFIC_OPTNEG:
            self._fail(ProtocolError, f"answered {reply_name(cmd)} to option negotiation")
        try:
            negotiated, not_in_version = wire.parse_optneg(data, self.offer_actions)
        except ProtocolError as exc:
            self._fail(ProtocolError, str(exc))
        self._not_in_version |= not_in_version
        self._negotiated = negotiated
        self._proto = int(negotiated.protocol)
        return negotiated

    def _connect_socket(self) -> socket.socket:
        spec = self.spec
        try:
            if spec.family == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.connect_timeout)
                try:
                    sock.connect(spec.path)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((spec.host, spec.port), self.connect_timeout)
                # Each of our writes is a whole batch of packets: don't let Nagle
                # hold it back waiting for the milter's delayed ACK. (Postfix sets
                # no TCP_NODELAY; tcp_nodelay=False reproduces its stalls.)
                if self.tcp_nodelay:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except TimeoutError:
            raise MilterUnavailable(
                f"cannot connect to milter {spec}: no answer within {self.connect_timeout:g} s"
            ) from None
        except OSError as e:
            raise MilterUnavailable(f"cannot connect to milter {spec}: {e.strerror or e}") from None
        sock.settimeout(self.timeout)
        return sock

    def close(self) -> None:
        """Close the socket without a word (what Postfix does after a connect-level
        accept or reject: libmilter closes its side on its own)."""
        sock, self._sock = self._sock, None
        self._out.clear()
        self._rbuf.clear()
        if sock is not None:
            sock.close()

    def disconnect(self) -> None:
        """Drop the connection abruptly (mid-message, no ABORT, no QUIT), for tests."""
        sock, self._sock = self._sock, None
        self._out.clear()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def quit(self) -> None:
        """SMFIC_QUIT, then close; the milter's close callback runs."""
        if self._sock is None:
            return
        try:
            self._queue(SMFIC_QUIT, b"")
            self._flush("quit")
        finally:
            self.close()

    def abort(self) -> None:
        """SMFIC_ABORT: end the current transaction (no reply); Postfix sends it after
        every transaction that reached MAIL FROM, including delivered ones."""
        self._queue(SMFIC_ABORT, b"")
        self._flush("abort")
        self._in_transaction = False
        self._queue_id_known = False
        self._sender = self._rcpt = ""

    def send_raw(self, cmd: bytes, data: bytes = b"") -> None:
        """Write one packet as is (tests of milter robustness)."""
        self._queue(cmd, data)
        self._flush("raw packet")

    # -- SMTP stages -----------------------------------------------------

    def connect(self, envelope: Envelope | None = None) -> StageReply:
        """SMFIC_CONNECT with the client's name, family, port and address."""
        if envelope is not None:
            self.envelope = envelope
        self._macro_cache.clear()
        env = self.envelope
        name = env.client_name or "unknown"
        if name == "unknown" and env.client_ip:
            # milter8.c: Postfix's "unknown" becomes Sendmail's "[addr]".
            name = f"[{env.client_ip}]"
        payload = wire.connect_payload(name, env.client_ip, env.client_port)
        return self._event(wire.CONNECT, payload, argument=f"{name} {env.client_ip}".strip())

    def helo(self, name: str | None = None) -> StageReply:
        helo = self.envelope.helo if name is None else name
        return self._event(wire.HELO, cstr(helo), argument=helo)

    def mail(self, sender: str | None = None, params: Sequence[str] | None = None) -> StageReply:
        """SMFIC_MAIL; an open transaction is aborted first (Postfix's mail_reset)."""
        if self._in_transaction:
            self.abort()
        self._macro_cache.clear()  # a new transaction, maybe a new envelope
        sender = self.envelope.mail_from if sender is None else _unbracket(sender)
        params = self.envelope.mail_params if params is None else params
        self._sender = sender
        self._in_transaction = True
        argv = [_bracket(sender), *params]
        return self._event(wire.MAIL, cstrings(argv), argument=argv[0])

    def rcpt(self, recipient: str, params: Sequence[str] = ()) -> StageReply:
        self._rcpt = _unbracket(recipient)
        argv = [_bracket(self._rcpt), *params]
        reply = self._event(wire.RCPT, cstrings(argv), argument=argv[0])
        if not reply.final:
            self._queue_id_known = True
        self._rcpt = ""
        return reply

    def data(self) -> StageReply:
        self._queue_id_known = True
        reply = self._event(wire.DATA, b"")
        # Postfix's smtpd hands the milter socket to cleanup here (milter8_send
        # flushes), so whatever DATA queued leaves now, on its own.
        self._flush("data")
        return reply

    def unknown(self, command: str) -> StageReply:
        return self._event(wire.UNKNOWN, cstr(command), argument=command)

    def header(self, name: str, value: bytes) -> StageReply:
        """SMFIC_HEADER; `value` is every byte after the colon, folded lines joined
        with "\\n". One leading space goes unless the milter asked for
        SMFIP_HDR_LEADSPC (milter8.c: Sendmail eats one space, not a tab)."""
        if not self._proto & LEADSPC_BIT and value[:1] == b" ":
            value = value[1:]
        return self._event(wire.HEADER, wire.header_payload(name, value), argument=name)

    def eoh(self) -> StageReply:
        return self._event(wire.EOH, b"")

    def body(self, body: bytes) -> StageReply:
        """SMFIC_BODY in chunks of at most 65535 bytes; stops at the first final
        answer or after SMFIR_SKIP. Returns the last answer."""
        reply = StageReply("body", sent=False, note="empty body")
        view = memoryview(body)
        for start in range(0, len(body), MILTER_CHUNK_SIZE):
            reply = self._event(wire.BODY, bytes(view[start : start + MILTER_CHUNK_SIZE]))
            if reply.final or reply.action == "skip" or not reply.sent:
                break
        return reply

    def eom(self) -> StageReply:
        """SMFIC_BODYEOB; collects the end-of-message modifications and the verdict."""
        return self._event(wire.EOM, b"")

    def message(self, message: bytes) -> list[StageReply]:
        """Header fields, end of header, body and end of message, as Postfix's
        cleanup sends them; stops at the first answer that ends the transaction."""
        headers, body = model.parse_message(message)
        replies: list[StageReply] = []
        for h in headers:
            reply = self.header(h.name, h.value)
            replies.append(reply)
            if reply.final:
                return replies
            if not reply.sent or reply.action == "skip":
                break  # negotiated away or SKIP: no further header goes out
        for step in (self.eoh, lambda: self.body(body)):
            reply = step()
            replies.append(reply)
            if reply.final:
                return replies
        replies.append(self.eom())
        return replies

    # -- core ------------------------------------------------------------

    def _event(self, ev: Event, payload: bytes, argument: str = "") -> StageReply:
        neg = self.negotiated
        if self._sock is None:
            raise MilterClientError(f"milter {self.spec}: session is closed")
        # Plain ints: enum.IntFlag arithmetic costs more than the rest of an event.
        proto = self._proto
        if ev.no_bit & self._not_in_version:
            return StageReply(
                ev.name,
                argument=argument,
                sent=False,
                note=f"not in protocol version {neg.version}",
            )
        if self._skip_event is not None:
            if self._skip_event == ev.cmd:
                return StageReply(ev.name, argument=argument, sent=False, note="skipped after SKIP")
            self._skip_event = None
        negotiated_away = bool(ev.no_bit & proto)
        if negotiated_away and not ev.macros_when_skipped:
            return StageReply(ev.name, argument=argument, sent=False, note="negotiated away")
        self._queue(SMFIC_MACRO, self._macro_payload(ev))
        if negotiated_away:
            return StageReply(ev.name, argument=argument, sent=False, note="negotiated away")
        self._queue(ev.cmd, payload)
        if ev.nr_bit & proto:
            return StageReply(ev.name, argument=argument, replied=False)
        started = time.perf_counter()
        self._flush(ev.name)
        return self._read_reply(ev, argument, started)

    def _macro_payload(self, ev: Event) -> bytes:
        """SMFIC_MACRO data: the event's command letter, then name/value pairs."""
        # Every header of a message carries the same macros: build them once.
        key = (ev.cmd, self._sender, self._rcpt, self._queue_id_known, self._in_transaction)
        cached = self._macro_cache.get(key)
        if cached is not None:
            return cached
        if len(self._macro_cache) > 64:
            self._macro_cache.clear()
        names = self.negotiated.macro_lists.get(ev.macros) or self._lists.get(ev.macros, ())
        data = ev.cmd + self._macro_pairs(names) if names else ev.cmd
        self._macro_cache[key] = data
        return data

    def _macro_pairs(self, names: Sequence[str]) -> bytes:
        values = self._macro_values()
        out = bytearray()
        for name in names:
            key = name[1:-1] if name.startswith("{") and name.endswith("}") else name
            value = values.get(key)
            if value is not None:
                out += cstr(name) + cstr(value)
        return bytes(out)

    def _macro_values(self) -> dict[str, str]:
        """Values Postfix's smtpd_milter_eval() would give at this point."""
        env = self.envelope
        name = env.client_name or "unknown"
        values = {
            "j": env.daemon_name,
            "daemon_name": env.daemon_name,
            "daemon_addr": env.daemon_addr,
            "daemon_port": str(env.daemon_port),
            "v": POSTFIX_VERSION_MACRO,
            "_": f"{name} [{env.client_ip}]" if env.client_ip else name,
            "client_addr": env.client_ip,
            "client_port": str(env.client_port),
            "client_name": name,
            "client_ptr": name,
            "client_resolve": "OK" if name != "unknown" else "FAIL",
        }
        if self._queue_id_known:
            values["i"] = env.queue_id
        if env.auth_user:
            values["auth_type"] = env.auth_type
            values["auth_authen"] = env.auth_user
        if self._in_transaction:
            sender = self._sender
            values["mail_addr"] = sender
            # The resolver's next hop and transport; for a remote address that is
            # its domain and "smtp", for the null sender the local machine.
            values["mail_host"] = _domain(sender) or env.daemon_name
            values["mail_mailer"] = "smtp" if _domain(sender) else "local"
        if self._rcpt:
            values["rcpt_addr"] = self._rcpt
            values["rcpt_host"] = _domain(self._rcpt) or env.daemon_name
            values["rcpt_mailer"] = "smtp" if _domain(self._rcpt) else "local"
        for key, value in env.macros.items():
            values[key[1:-1] if key.startswith("{") and key.endswith("}") else key] = value
        return values

    def _read_reply(self, ev: Event, argument: str, started: float) -> StageReply:
        quarantine = ""
        mods: list[Modification] = []
        body_chunks: list[bytes] | None = None
        is_eom = ev is wire.EOM
        while True:
            cmd, data = self._read_packet(ev.name)
            if cmd == SMFIR_PROGRESS:
                try:
                    wire.expect_empty(cmd, data, ev.name)
                except ProtocolError as exc:
                    self._fail(ProtocolError, str(exc))
                continue  # still working: keep waiting, each read with a fresh timeout
            if cmd == SMFIR_QUARANTINE:
                # milter8.c: no state change; the final answer still follows.
                quarantine = wire.text(data.rstrip(b"\0"))
                continue
            if cmd == SMFIR_REPLBODY and is_eom:
                if body_chunks is None:
                    body_chunks = []
                body_chunks.append(data)
                continue
            if cmd in MOD_REPLIES:
                if not is_eom:
                    self._fail(
                        ProtocolError,
                        f"sent {reply_name(cmd)} in reply to {ev.name} "
                        "(modifications are allowed only at end of message)",
                    )
                try:
                    mods.append(wire.parse_modification(cmd, data))
                except ProtocolError as exc:
                    self._fail(ProtocolError, str(exc))
                continue
            try:
                action, text, custom = wire.final_action(cmd, data, ev.name)
            except ProtocolError as exc:
                self._fail(ProtocolError, str(exc))
            if action == "skip":
                self._skip_event = ev.cmd
            return StageReply(
                ev.name,
                action=action,
                smtp_reply=text,
                argument=argument,
                custom_reply=custom,
                quarantine=quarantine,
                modifications=tuple(mods),
                replaced_body=None if body_chunks is None else b"".join(body_chunks),
                elapsed_ms=(time.perf_counter() - started) * 1000.0,
            )

    # -- wire ------------------------------------------------------------

    def _queue(self, cmd: bytes, data: bytes) -> None:
        if self._sock is None:
            raise MilterClientError(f"milter {self.spec}: session is closed")
        self._out.append(PACKET_HEAD.pack(len(data) + 1, cmd[0]))
        if data:
            self._out.append(data)

    def _flush(self, stage: str) -> None:
        if not self._out or self._sock is None:
            return
        payload = b"".join(self._out)
        self._out.clear()
        try:
            self._sock.sendall(payload)
        except TimeoutError:
            self._fail(MilterTimeout, f"did not take our {stage} data within {self.timeout:g} s")
        except OSError as e:
            self._fail(MilterClosed, f"connection lost while sending {stage}: {e.strerror or e}")

    def _read_packet(self, stage: str) -> tuple[bytes, bytes]:
        (length,) = PACKET_LENGTH.unpack(self._read_exact(4, stage))
        if length < 1:
            self._fail(ProtocolError, f"bad packet length {length} in reply to {stage}")
        if length > MAX_PACKET:
            self._fail(
                ProtocolError,
                f"unreasonable packet length {length} in reply to {stage} (is this a milter?)",
            )
        packet = self._read_exact(length, stage)
        return packet[:1], packet[1:]

    def _read_exact(self, n: int, stage: str) -> bytes:
        buf = self._rbuf
        sock = self._sock
        while len(buf) < n:
            if sock is None:
                raise MilterClientError(f"milter {self.spec}: session is closed")
            try:
                chunk = sock.recv(max(65536, n - len(buf)))
            except TimeoutError:
                self._fail(MilterTimeout, f"did not answer {stage} within {self.timeout:g} s")
            except OSError as e:
                self._fail(
                    MilterClosed,
                    f"connection lost waiting for the reply to {stage}: {e.strerror or e}",
                )
            if not chunk:
                self._fail(
                    MilterClosed, f"closed the connection while we waited for the reply to {stage}"
                )
            buf += chunk
        data = bytes(buf[:n])
        del buf[:n]
        return data

    def _fail(self, kind: type[MilterClientError], message: str) -> NoReturn:
        self.close()
        raise kind(f"milter {self.spec}: {message}")
