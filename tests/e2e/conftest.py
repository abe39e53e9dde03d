"""Fixtures for the end-to-end tier: one private Postfix per session, filters as
subprocesses on free loopback ports.

    dns              the suite's loopback DNS with its zones (tests/e2e/suite.py), per module
    postfix          the session's PostfixInstance, reset for this test (empty Maildir
                     and queue, no milters unless the test sets them, log marked)
    milter_process   factory: milter_process(argv, port) -> ManagedProcess, listening
    probe_milter     factory: probe_milter(actions=..., leadspc=...) -> ProbeMilter,
                     the scriptable recording milter in tests/e2e/milters/probe.py
    start_filter     factory: start_filter("checks", toml_text) -> RunningFilter,
                     `python -m milters run NAME --config FILE` on a free port

The whole tier is skipped, with the reason, only when it cannot run at all: not root,
or no /usr/sbin/postfix. CI runs as root with Postfix installed, so there it runs.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.filters import (
    PROBE_SCRIPT,
    MilterProcess,
    ProbeFactory,
    ProbeMilter,
    RunningFilter,
    StartFilter,
)
from tests.e2e.postfix import PostfixInstance, unavailable_reason
from tests.e2e.suite import factory, keys, suite_dns, workdir  # noqa: F401  (the suite tests' fixtures)
from tests.support.processes import (
    ManagedProcess,
    ProcessFactory,
    add_socket_to_config,
    free_port,
)

E2E_DIR = Path(__file__).resolve().parent
REPO_ROOT = E2E_DIR.parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test in this directory `e2e`, and skip them all if Postfix can't run."""
    reason = unavailable_reason()
    for item in items:
        if E2E_DIR not in Path(str(item.path)).resolve().parents:
            continue
        item.add_marker(pytest.mark.e2e)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def postfix_instance() -> Iterator[PostfixInstance]:
    """The session's Postfix, started once; stopped (never orphaned) at the end."""
    instance = PostfixInstance()
    try:
        instance.setup()
        yield instance
    finally:
        # MILTERS_E2E_KEEP=1 keeps the directory (config, log, queue) for a post-mortem.
        instance.destroy(keep=os.environ.get("MILTERS_E2E_KEEP") == "1")


@pytest.fixture
def postfix(postfix_instance: PostfixInstance) -> PostfixInstance:
    """The session's Postfix with no milters, an empty Maildir and queue, log marked."""
    # Reset first: a restart would re-queue a delivery in flight from the last test.
    postfix_instance.reset()
    postfix_instance.configure()
    return postfix_instance


@pytest.fixture
def processes() -> Iterator[ProcessFactory]:
    """Every process started through this factory is SIGKILLed after the test."""
    with ProcessFactory() as f:
        yield f


@pytest.fixture
def milter_process(processes: ProcessFactory) -> MilterProcess:
    """milter_process(argv, port, env=None) starts a milter and returns once it listens."""

    def start(argv: Sequence[str], port: int, env: dict[str, str] | None = None) -> ManagedProcess:
        return processes.start(argv, port, env=env, cwd=REPO_ROOT)

    return start


# --- the recording probe -----------------------------------------------------------


@pytest.fixture
def probe_milter(milter_process: MilterProcess, tmp_path: Path) -> ProbeFactory:
    """probe_milter(name="probe", actions=[...], leadspc=False) -> a listening ProbeMilter."""

    def start(
        name: str = "probe",
        actions: list[dict[str, Any]] | None = None,
        leadspc: bool = False,
    ) -> ProbeMilter:
        port = free_port()
        record = tmp_path / f"{name}.jsonl"
        actions_file = tmp_path / f"{name}-actions.json"
        actions_file.write_text(json.dumps(actions or []))
        argv = [sys.executable, str(PROBE_SCRIPT), "--port", str(port), "--name", name,
                "--record", str(record), "--actions-file", str(actions_file)]  # fmt: skip
        if leadspc:
            argv.append("--leadspc")
        proc = milter_process(argv, port)
        return ProbeMilter(name, port, record, actions_file, proc)

    return start


# --- the suite's own filters ----------------------------------------------------------


@pytest.fixture
def start_filter(processes: ProcessFactory, tmp_path: Path) -> StartFilter:
    """start_filter(name, config_text="") runs one of the suite's filters.

    `config_text` is TOML (any tables, [global] included); the fixture sets
    `socket = "inet:PORT@127.0.0.1"` in the [NAME] table, so the text must not.
    """

    def start(name: str, config_text: str = "", env: dict[str, str] | None = None) -> RunningFilter:
        port = free_port()
        config_path = tmp_path / f"{name}-{port}.toml"
        spec = f"inet:{port}@127.0.0.1"
        if name == "dkim-sign":  # dkim's signing step: [dkim] sign_socket
            config_path.write_text(add_socket_to_config(config_text, "dkim", spec, "sign_socket"))
        else:
            config_path.write_text(add_socket_to_config(config_text, name, spec))
        argv = [sys.executable, "-m", "milters", "run", name, "--config", str(config_path)]
        proc = processes.start(argv, port, env=env, cwd=REPO_ROOT)
        return RunningFilter(name, port, config_path, proc)

    return start
