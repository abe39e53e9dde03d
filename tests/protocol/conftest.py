"""Fixture factories for milter-protocol tests: milters run as subprocesses on free ports.

libmilter allows one main loop per process, so every milter under test is its
own process (tests/support/processes.py does the starting: readiness by polling
the port, never a fixed sleep, with the process's output in the failure
message; teardown by SIGKILL, since libmilter takes about 4.5 s to exit on
SIGTERM and these tests do not test graceful shutdown).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.support.processes import (
    READY_TIMEOUT,
    ManagedProcess,
    ProcessFactory,
    add_socket_to_config,
)
from tests.support.processes import (
    free_port as find_free_port,
)

MILTERS_DIR = Path(__file__).parent / "milters"
ROOT = Path(__file__).resolve().parents[2]

StartProcess = Callable[..., ManagedProcess]


def spec_of(proc: ManagedProcess) -> str:
    """The libmilter socket spec of a process started with a port."""
    return f"inet:{proc.port}@127.0.0.1"


def script_argv(script: str, port: int, *args: str) -> list[str]:
    """argv to run one of the small pymilter test milters in tests/protocol/milters."""
    return [sys.executable, str(MILTERS_DIR / script), str(port), *args]


def _starter(factory: ProcessFactory) -> StartProcess:
    def start(
        argv: list[str],
        port: int,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> ManagedProcess:
        # ProcessFactory.start polls the port for up to READY_TIMEOUT (20 s) and
        # raises ProcessStartError with the process's output when it dies or stalls.
        return factory.start(argv, port, env=env, cwd=cwd, ready_timeout=READY_TIMEOUT)

    return start


@pytest.fixture
def free_port() -> Callable[[], int]:
    """free_port() -> a TCP port on 127.0.0.1 that nothing listens on right now."""
    return find_free_port


@pytest.fixture
def start_milter_process() -> Iterator[StartProcess]:
    """start_milter_process(argv, port, env=None, cwd=None): running once the port
    accepts; SIGKILLed after the test."""
    with ProcessFactory() as factory:
        yield _starter(factory)


@pytest.fixture(scope="module")
def start_module_milter() -> Iterator[StartProcess]:
    """Like start_milter_process, but the processes live until the module ends."""
    with ProcessFactory() as factory:
        yield _starter(factory)


@pytest.fixture(scope="module")
def start_test_milter(start_module_milter: StartProcess) -> Callable[..., str]:
    """start_test_milter("recorder.py", *args) -> socket spec; one process per call,
    living for the module."""

    def start(script: str, *args: str) -> str:
        port = find_free_port()
        return spec_of(start_module_milter(script_argv(script, port, *args), port))

    return start


@pytest.fixture
def start_filter(tmp_path: Path, start_milter_process: StartProcess) -> Callable[..., str]:
    """start_filter(name, config_text="") -> socket spec of `milters run NAME --config FILE`.

    The config is the caller's TOML with the filter's `socket` set to a free
    loopback port in its table (added when the text has no such table).
    """

    def start(name: str, config_text: str = "") -> str:
        port = find_free_port()
        spec = f"inet:{port}@127.0.0.1"
        config = tmp_path / f"{name}-{port}.toml"
        config.write_text(add_socket_to_config(config_text, name, spec))
        argv = [sys.executable, "-m", "milters", "run", name, "--config", str(config)]
        start_milter_process(argv, port, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
        return spec

    return start
