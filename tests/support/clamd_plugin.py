"""The session's test clamd as a pytest fixture (a plugin module, so that test
modules in every tier share one clamd: `pytest_plugins = ("tests.support.clamd_plugin",)`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.clamd import Clamd, clamd_binary, running_clamd


@pytest.fixture(scope="session")
def clamd() -> Iterator[Clamd]:
    """The session's clamd; the test fails, with the reason, if it cannot run.

    Skipped only where it cannot be installed: not root and no clamd. CI runs
    packaging/dev/bootstrap.sh as root, which installs it.
    """
    if clamd_binary() is None and os.geteuid() != 0:
        pytest.skip("clamd is not installed and installing it needs root "
                    "(packaging/dev/bootstrap.sh, Debian package clamav-daemon)")
    with running_clamd() as server:
        yield server
