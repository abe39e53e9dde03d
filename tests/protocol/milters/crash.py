"""Test milter: the process dies in the middle of the header (connection closed).

Usage: crash.py PORT
"""

from __future__ import annotations

import os
import sys

import Milter


class Crash(Milter.Base):  # type: ignore[misc]
    def header(self, name: str, value: str) -> int:
        if name.lower() == "x-crash":
            os._exit(3)
        return Milter.CONTINUE


if __name__ == "__main__":
    Milter.factory = Crash
    Milter.runmilter("crash", f"inet:{sys.argv[1]}@127.0.0.1", timeout=60)
