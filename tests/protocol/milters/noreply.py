"""Test milter: no connect, HELO, DATA or body callbacks; no replies for RCPT,
header and end of header (`@noreply`).

Usage: noreply.py PORT

At end of message it adds X-Seen: the recipients and the header count.
"""

from __future__ import annotations

import sys

import Milter


class NoReply(Milter.Base):  # type: ignore[misc]
    def __init__(self) -> None:
        self.rcpts: list[str] = []
        self.headers = 0
        self.eoh_seen = False

    def envfrom(self, sender: str, *params: str) -> int:
        self.rcpts = []
        self.headers = 0
        self.eoh_seen = False
        return Milter.CONTINUE

    @Milter.noreply  # type: ignore[misc]
    def envrcpt(self, rcpt: str, *params: str) -> int:
        self.rcpts.append(rcpt)
        return Milter.CONTINUE

    @Milter.noreply  # type: ignore[misc]
    def header(self, name: str, value: str) -> int:
        self.headers += 1
        return Milter.CONTINUE

    @Milter.noreply  # type: ignore[misc]
    def eoh(self) -> int:
        self.eoh_seen = True
        return Milter.CONTINUE

    def eom(self) -> int:
        seen = f"rcpts={','.join(self.rcpts)} headers={self.headers} eoh={self.eoh_seen}"
        self.addheader("X-Seen", seen)
        return Milter.ACCEPT


if __name__ == "__main__":
    Milter.factory = NoReply
    Milter.runmilter("noreply", f"inet:{sys.argv[1]}@127.0.0.1", timeout=60)
