"""Test milter: answers according to the recipient's local part.

Usage: actions.py PORT

MAIL FROM reject-mail@... is refused with a custom 550 text; accept-mail@...
is accepted at MAIL. Recipients: blocked@ (550 custom), plainreject@ (REJECT),
tempfail-rcpt@ (TEMPFAIL), hang@ (sleeps 60 s); at end of message: tempfail@
(TEMPFAIL), greylist@ (451 custom), discard@, modify@ (header and envelope
edits, quarantine, ACCEPT), replbody@ (a 200 KB replacement body), progress@
(0.3 s pauses with PROGRESS three times, then ACCEPT), percent@ (550 with a doubled '%'), skipbody@
(SKIP at the first body chunk; reports the chunks seen).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import Milter

REPLACEMENT = b"replaced line\r\n" * 14000  # 210 000 bytes: several REPLBODY packets


class Actions(Milter.Base):  # type: ignore[misc]
    def __init__(self) -> None:
        self.rcpts: list[str] = []
        self.chunks = 0

    def envfrom(self, sender: str, *params: str) -> int:
        self.rcpts = []
        self.chunks = 0
        if "reject-mail@" in sender:
            self.setreply("550", "5.7.1", "Sender refused by test")
            return Milter.REJECT
        if "accept-mail@" in sender:
            return Milter.ACCEPT
        return Milter.CONTINUE

    def envrcpt(self, rcpt: str, *params: str) -> int:
        local = rcpt.strip("<>").partition("@")[0]
        if local == "blocked":
            self.setreply("550", "5.7.1", "Recipient blocked by test policy")
            return Milter.REJECT
        if local == "plainreject":
            return Milter.REJECT
        if local == "tempfail-rcpt":
            return Milter.TEMPFAIL
        if local == "hang":
            time.sleep(60)
        self.rcpts.append(local)
        return Milter.CONTINUE

    def body(self, chunk: bytes) -> int:
        self.chunks += 1
        if "skipbody" in self.rcpts:
            return Milter.SKIP
        return Milter.CONTINUE

    def eom(self) -> int:
        r = set(self.rcpts)
        if "tempfail" in r:
            return Milter.TEMPFAIL
        if "greylist" in r:
            self.setreply("451", "4.7.1", "Greylisted, try again later")
            return Milter.TEMPFAIL
        if "discard" in r:
            return Milter.DISCARD
        if "percent" in r:
            self.setreply("550", "5.7.1", "100%% spam")
            return Milter.REJECT
        if "modify" in r:
            self.addheader("X-Added", "added value")
            self.addheader("X-Top", "at the top", 0)
            self.chgheader("Subject", 1, "changed subject")
            self.chgheader("X-Remove", 1, None)
            self.addrcpt("<added@example.org>")
            self.addrcpt("<param@example.org>", "NOTIFY=NEVER")
            self.delrcpt("<modify@example.com>")
            self.chgfrom("<bounce@example.org>", "BODY=8BITMIME")
            self.quarantine("suspicious attachment")
            return Milter.ACCEPT
        if "replbody" in r:
            self.replacebody(REPLACEMENT)
            return Milter.ACCEPT
        if "progress" in r:
            for _ in range(3):
                time.sleep(0.3)
                self.progress()
            return Milter.ACCEPT
        if "skipbody" in r:
            self.addheader("X-Body-Chunks", str(self.chunks))
        return Milter.CONTINUE


def main(port: str) -> Any:
    Milter.factory = Actions
    Milter.runmilter("actions", f"inet:{port}@127.0.0.1", timeout=120)


if __name__ == "__main__":
    main(sys.argv[1])
