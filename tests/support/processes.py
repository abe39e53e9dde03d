"""Start servers under test as subprocesses and wait until they listen.

Shared by tests/protocol and tests/e2e: each filter (and each tiny test milter) runs
in its own process because libmilter allows one main loop per process. Readiness
means the TCP port accepts a connection, polled against a deadline, never a fixed
sleep. Teardown uses SIGKILL: libmilter takes about 4.5 s to exit after SIGTERM
(its listener polls with a timeout) and these tests are not about graceful shutdown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

READY_TIMEOUT = 20.0
LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now.

    There is a small window before the caller binds it; libmilter and Postfix set
    SO_REUSEADDR, and on a test machine nothing else races for ephemeral ports.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_accepts(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """Whether a TCP connection to host:port succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.02) -> bool:
    """Poll `predicate()` until it is true or `timeout` seconds pass; say whether it was."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class ProcessStartError(RuntimeError):
    """A server process exited or never started listening."""


class ManagedProcess:
    """A subprocess whose stderr and stdout go to a file we can show on failure."""

    def __init__(
        self,
        argv: Sequence[str],
        port: int | None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.port = port
        # A file, not a pipe: a chatty process must never block on a full pipe buffer.
        fd, name = tempfile.mkstemp(prefix="milters-proc-", suffix=".log")
        self.output_path = Path(name)
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            full_env.update(env)
        with os.fdopen(fd, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                # Own process group, so a filter that forks workers is killed whole.
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = READY_TIMEOUT, host: str = LOOPBACK) -> None:
        """Poll until the port accepts; raise ProcessStartError with the output if not."""
        if self.port is None:
            raise ValueError("no port to wait for")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ProcessStartError(
                    f"{self.argv!r} exited with status {self.proc.returncode} before "
                    f"listening on port {self.port}; output:\n{self.output()}"
                )
            if port_accepts(self.port, host):
                return
            time.sleep(0.02)
        raise ProcessStartError(
            f"{self.argv!r} did not listen on {host}:{self.port} within {timeout:g} s; "
            f"output:\n{self.output()}"
        )

    def kill(self) -> None:
        """SIGKILL the process group and reap it; safe to call twice."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        # A process in uninterruptible sleep may outlive SIGKILL briefly; don't hang on it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def cleanup(self) -> None:
        self.kill()
        self.output_path.unlink(missing_ok=True)


class ProcessFactory:
    """Starts servers for one test and kills every one of them at teardown."""

    def __init__(self) -> None:
        self.processes: list[ManagedProcess] = []

    def start(
        self,
        argv: Sequence[str],
        port: int | None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        ready_timeout: float = READY_TIMEOUT,
    ) -> ManagedProcess:
        """Start `argv`; when `port` is given, return only once it accepts connections."""
        mp = ManagedProcess(argv, port, env=env, cwd=cwd)
        self.processes.append(mp)
        if port is not None:
            mp.wait_ready(ready_timeout)
        return mp

    def close(self) -> None:
        for mp in self.processes:
            mp.cleanup()
        self.processes.clear()

    def __enter__(self) -> ProcessFactory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def add_socket_to_config(config_text: str, table: str, socket_spec: str,
                         key: str = "socket") -> str:
    """Return TOML text whose [table] has `socket = socket_spec` (or `key = ...`).

    Inserted right after the table's header line when the text has one (keys right
    after a header belong to that table), else a new table is appended.
    """
    line = f'{key} = "{socket_spec}"'
    lines = config_text.splitlines()
    for i, text in enumerate(lines):
        if text.strip() == f"[{table}]":
            lines.insert(i + 1, line)
            return "\n".join(lines) + "\n"
    return config_text.rstrip("\n") + f"\n\n[{table}]\n{line}\n"


FILTER_TABLES = ("dkim", "spf", "dmarc", "clamav", "checks")


def others_disabled(name: str) -> str:
    """TOML that disables every filter but `name`: a filter run alone must be
    configured alone (its neighbours decide where it signs, whose results it
    trusts, who applies holds: core/filter.py Env.upstream/downstream)."""
    return "".join(f"[{n}]\nenabled = false\n" for n in FILTER_TABLES if n != name)
