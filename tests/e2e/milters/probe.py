"""A scriptable pymilter filter that records what Postfix sends it.

Run as a subprocess (libmilter allows one main loop per process):

    python probe.py --port PORT --record FILE [--name NAME] [--leadspc]
                    [--actions JSON | --actions-file PATH]

Every callback appends one JSON line to FILE: the event, its arguments and the value
of every macro in MACROS that getsymval() returns at that point. Header values are
recorded byte-exact (`@Milter.decode("bytes")`), as latin-1 text so JSON keeps them.

At end of message the probe performs the actions (a JSON list, read from
--actions-file at each message when given, so one process can serve many scenarios):

    {"op": "addheader", "name": "X-A", "value": "1", "idx": -1}   (idx >= 0: insheader)
    {"op": "chgheader", "name": "X-A", "idx": 1, "value": ""}       ("" deletes)
    {"op": "addrcpt", "rcpt": "<a@b>"}   {"op": "delrcpt", "rcpt": "<a@b>"}
    {"op": "quarantine", "reason": "why"}
    {"op": "reply", "code": "550", "xcode": "5.7.1", "text": "go away"}
    {"op": "result", "value": "accept" | "continue" | "reject" | "tempfail" | "discard"}

With --leadspc the probe negotiates SMFIP_HDR_LEADSPC (header values arrive with the
space after the colon).
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path
from typing import Any

import Milter

MACROS = (
    "j", "_", "v", "i",
    "{daemon_name}", "{daemon_addr}", "{daemon_port}", "{if_name}", "{if_addr}",
    "{client_name}", "{client_addr}", "{client_port}", "{client_ptr}",
    "{client_connections}", "{client_resolve}",
    "{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}",
    "{auth_type}", "{auth_authen}", "{auth_author}",
    "{mail_addr}", "{mail_host}", "{mail_mailer}",
    "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}",
)  # fmt: skip

RESULTS = {
    "accept": Milter.ACCEPT,
    "continue": Milter.CONTINUE,
    "reject": Milter.REJECT,
    "tempfail": Milter.TEMPFAIL,
    "discard": Milter.DISCARD,
}


class Options:
    """Process-wide settings from the command line (read-only after start)."""

    name = "probe"
    record = Path("/dev/null")
    actions: list[dict[str, Any]] = []  # noqa: RUF012 - set once before the loop starts
    actions_file: Path | None = None


_write_lock = threading.Lock()  # libmilter calls back from one thread per connection


def _text(value: bytes | str | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value


class Probe(Milter.Base):
    """Records every callback; performs the scripted actions at end of message."""

    def __init__(self) -> None:
        self.connection_id = id(self)

    def _record(self, event: str, **data: Any) -> None:
        macros = {}
        for name in MACROS:
            value = self.getsymval(name)
            if value is not None:
                macros[name] = value
        entry = {"milter": Options.name, "conn": self.connection_id, "event": event,
                 "macros": macros, **data}  # fmt: skip
        line = json.dumps(entry) + "\n"
        with _write_lock, Options.record.open("a") as f:
            f.write(line)

    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self._record("connect", hostname=hostname, family=family, hostaddr=list(hostaddr or ()))
        return Milter.CONTINUE

    def hello(self, helo: str) -> int:
        self._record("helo", helo=helo)
        return Milter.CONTINUE

    def envfrom(self, mail_from: str, *params: str) -> int:
        self._record("envfrom", mail_from=mail_from, params=list(params))
        return Milter.CONTINUE

    def envrcpt(self, rcpt: str, *params: str) -> int:
        self._record("envrcpt", rcpt=rcpt, params=list(params))
        return Milter.CONTINUE

    def data(self) -> int:
        # Defined (not negotiated away) so Postfix waits for a reply here: avoids a
        # 40 ms delayed-ACK stall (see the milter-latency notes).
        self._record("data")
        return Milter.CONTINUE

    @Milter.decode("bytes")
    def header(self, name: str, value: bytes) -> int:
        self._record("header", name=name, value=_text(value))
        return Milter.CONTINUE

    def eoh(self) -> int:
        self._record("eoh")
        return Milter.CONTINUE

    def body(self, chunk: bytes) -> int:
        self._record("body", chunk=_text(chunk))
        return Milter.CONTINUE

    def eom(self) -> int:
        self._record("eom")
        actions = Options.actions
        if Options.actions_file is not None and Options.actions_file.exists():
            actions = json.loads(Options.actions_file.read_text())
        result = Milter.ACCEPT
        for action in actions:
            op = action["op"]
            if op == "addheader":
                self.addheader(action["name"], action["value"], action.get("idx", -1))
            elif op == "chgheader":
                self.chgheader(action["name"], action["idx"], action["value"])
            elif op == "addrcpt":
                self.addrcpt(action["rcpt"])
            elif op == "delrcpt":
                self.delrcpt(action["rcpt"])
            elif op == "quarantine":
                self.quarantine(action["reason"])
            elif op == "reply":
                self.setreply(action["code"], action.get("xcode"), action.get("text"))
            elif op == "result":
                result = RESULTS[action["value"]]
            else:
                raise ValueError(f"unknown op {op!r}")
        self._record("eom-done", actions=actions)
        return result

    def abort(self) -> int:
        self._record("abort")
        return Milter.CONTINUE

    def close(self) -> int:
        self._record("close")
        return Milter.CONTINUE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--name", default="probe")
    parser.add_argument("--leadspc", action="store_true")
    parser.add_argument("--actions", default="[]")
    parser.add_argument("--actions-file", type=Path)
    args = parser.parse_args()
    Options.name = args.name
    Options.record = args.record
    Options.actions = json.loads(args.actions)
    Options.actions_file = args.actions_file
    cls: type[Probe] = Probe
    if args.leadspc:
        cls = Milter.header_leading_space(type("ProbeLeadspc", (Probe,), {}))
    Milter.factory = cls
    Milter.runmilter(args.name, f"inet:{args.port}@127.0.0.1", timeout=60)


if __name__ == "__main__":
    main()
