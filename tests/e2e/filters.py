"""What the e2e fixtures hand to tests: running milters and the factory types.

Kept out of conftest.py so test modules can import these names for type hints
(importing a conftest module by name would load it a second time).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.processes import ManagedProcess

PROBE_SCRIPT = Path(__file__).resolve().parent / "milters" / "probe.py"

MilterProcess = Callable[..., ManagedProcess]


@dataclass
class ProbeMilter:
    """A running tests/e2e/milters/probe.py and what it recorded."""

    name: str
    port: int
    record: Path
    actions_file: Path
    process: ManagedProcess

    @property
    def socket(self) -> str:
        """The spec for smtpd_milters / non_smtpd_milters."""
        return f"inet:127.0.0.1:{self.port}"

    def set_actions(self, actions: list[dict[str, Any]]) -> None:
        """What to do at the end of the next messages (read at each message)."""
        self.actions_file.write_text(json.dumps(actions))

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        """Recorded callbacks in order, all or only those named `event`."""
        if not self.record.exists():
            return []
        # The probe may be writing a line (the close event comes after Postfix's
        # answer): only lines it has finished, those ending in a newline, are read.
        text = self.record.read_text()
        complete = text[: text.rfind("\n") + 1]
        entries = [json.loads(line) for line in complete.splitlines() if line]
        return [e for e in entries if event is None or e["event"] == event]

    def headers(self) -> list[tuple[str, bytes]]:
        """(name, raw value bytes) of every header callback so far, in order."""
        return [(e["name"], e["value"].encode("latin-1")) for e in self.events("header")]

    def clear(self) -> None:
        self.record.unlink(missing_ok=True)


ProbeFactory = Callable[..., ProbeMilter]


@dataclass
class RunningFilter:
    """`milters run NAME` as a subprocess, listening on a free loopback port."""

    name: str
    port: int
    config_path: Path
    process: ManagedProcess

    @property
    def socket(self) -> str:
        """The spec for smtpd_milters / non_smtpd_milters."""
        return f"inet:127.0.0.1:{self.port}"

    def output(self) -> str:
        """What the filter wrote to stdout/stderr (its log lines)."""
        return self.process.output()


StartFilter = Callable[..., RunningFilter]
