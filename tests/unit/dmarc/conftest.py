"""Factories for the dmarc tests: the loopback DNS (reset per test), a resolver
pointing at it, and transactions from raw messages."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from milters.core.resolver import Resolver
from tests.support.dkim import env_for
from tests.support.dns import LoopbackDNS, dns_server


@pytest.fixture(scope="session")
def session_dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        yield server


@pytest.fixture
def dns(session_dns: LoopbackDNS) -> LoopbackDNS:
    session_dns.clear()
    return session_dns


@pytest.fixture
def resolver(dns: LoopbackDNS) -> Resolver:
    return env_for(dns, timeout=0.5).resolver
