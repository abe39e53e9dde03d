"""Test milter: records everything the MTA sent and reports it at end of message.

Usage: recorder.py PORT [--leadspc] [--symlist]

At end of message it adds an `X-Record` header holding base64 JSON of what this
message looked like from the milter's side (connect data, HELO, envelope,
macros per stage, header fields as received, body), then accepts. `--leadspc`
asks for SMFIP_HDR_LEADSPC; `--symlist` asks for reduced macro lists.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from typing import Any

import Milter

LEADSPC = "--leadspc" in sys.argv
SYMLIST = "--symlist" in sys.argv

ASKED = {
    "connect": ["j", "{daemon_name}", "{daemon_addr}", "{daemon_port}", "v", "_"],
    "helo": ["{tls_version}", "{cipher}"],
    "mail": ["i", "{auth_type}", "{auth_authen}", "{auth_author}", "{mail_addr}",
             "{mail_host}", "{mail_mailer}"],
    "rcpt": ["i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"],
    "data": ["i"],
    "eoh": ["i"],
    "eom": ["i"],
}  # fmt: skip


class Recorder(Milter.Base):  # type: ignore[misc]
    def __init__(self) -> None:
        self.conn: dict[str, Any] = {"aborts": 0, "messages": 0, "macros": {}}
        self.msg: dict[str, Any] = {}

    def negotiate(self, opts: list[int]) -> Any:
        rc = super().negotiate(opts)
        if SYMLIST:
            # pymilter 1.0.5's Base.setsymlist passes bytes where its C module
            # wants str (TypeError), so call the context directly.
            self._ctx.setsymlist(Milter.M_CONNECT, "j")
            self._ctx.setsymlist(Milter.M_ENVFROM, "{mail_addr}")
        return rc

    def _macros(self, stage: str) -> dict[str, str]:
        found = {}
        for name in ASKED[stage]:
            value = self.getsymval(name)
            if value is not None:
                found[name] = value
        return found

    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self.conn.update(hostname=hostname, family=int(family), hostaddr=hostaddr)
        self.conn["macros"]["connect"] = self._macros("connect")
        return Milter.CONTINUE

    def hello(self, name: str) -> int:
        self.conn["helo"] = name
        self.conn["macros"]["helo"] = self._macros("helo")
        return Milter.CONTINUE

    def envfrom(self, sender: str, *params: str) -> int:
        self.conn["messages"] += 1
        self.msg = {"mail": [sender, *params], "rcpt": [], "headers": [], "chunks": [],
                    "body": b"", "macros": {"mail": self._macros("mail"), "rcpt": []}}  # fmt: skip
        return Milter.CONTINUE

    def envrcpt(self, rcpt: str, *params: str) -> int:
        self.msg["rcpt"].append([rcpt, *params])
        self.msg["macros"]["rcpt"].append(self._macros("rcpt"))
        return Milter.CONTINUE

    def data(self) -> int:
        self.msg["macros"]["data"] = self._macros("data")
        return Milter.CONTINUE

    @Milter.decode("bytes")  # type: ignore[misc]
    def header(self, name: str, value: bytes) -> int:
        self.msg["headers"].append([name, value.decode("latin-1")])
        return Milter.CONTINUE

    def eoh(self) -> int:
        self.msg["macros"]["eoh"] = self._macros("eoh")
        return Milter.CONTINUE

    def body(self, chunk: bytes) -> int:
        self.msg["chunks"].append(len(chunk))
        self.msg["body"] += chunk
        return Milter.CONTINUE

    def eom(self) -> int:
        self.msg["macros"]["eom"] = self._macros("eom")
        body: bytes = self.msg.pop("body")
        self.msg["body_sha256"] = hashlib.sha256(body).hexdigest()
        self.msg["body_len"] = len(body)
        self.msg["body"] = body.decode("latin-1") if len(body) < 4096 else None
        record = {"conn": self.conn, "msg": self.msg}
        blob = base64.b64encode(json.dumps(record).encode()).decode()
        self.addheader("X-Record", blob)
        return Milter.ACCEPT

    def abort(self) -> int:
        self.conn["aborts"] += 1
        return Milter.CONTINUE


if __name__ == "__main__":
    if LEADSPC:
        Recorder = Milter.header_leading_space(Recorder)
    Milter.factory = Recorder
    Milter.runmilter("recorder", f"inet:{sys.argv[1]}@127.0.0.1", timeout=60)
