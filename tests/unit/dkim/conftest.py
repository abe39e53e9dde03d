"""Factories for the dkim tests: keys made once per session, the loopback DNS
publishing them, filters built from settings, transactions from raw messages."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from milters.dkim import DkimFilter, DkimSettings
from milters.dkim.keytools import genkey
from tests.support.dkim import env_for
from tests.support.dns import LoopbackDNS, dns_server

DOMAIN = "example.com"


@dataclass(frozen=True)
class TestKeys:
    """Key files for example.com: selectors rsa and ed; `records` maps DNS names."""

    __test__ = False
    directory: Path
    rsa: Path
    ed: Path
    records: dict[str, str]


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> TestKeys:
    d = tmp_path_factory.mktemp("dkimkeys")
    rsa = genkey(DOMAIN, "rsa", "rsa", 2048, str(d))
    ed = genkey(DOMAIN, "ed", "ed25519", 0, str(d))
    return TestKeys(d, rsa.private_path, ed.private_path, {
        f"rsa._domainkey.{DOMAIN}": rsa.key.dns_record(),
        f"ed._domainkey.{DOMAIN}": ed.key.dns_record(),
    })


@pytest.fixture(scope="session")
def session_dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        yield server


@pytest.fixture
def dns(session_dns: LoopbackDNS, keys: TestKeys) -> LoopbackDNS:
    """The loopback DNS with only the test keys published (reset for each test)."""
    session_dns.clear()
    for name, value in keys.records.items():
        session_dns.txt(name, value)
    return session_dns


FilterFactory = Callable[..., DkimFilter]


@pytest.fixture
def dkim_filter(dns: LoopbackDNS, keys: TestKeys) -> FilterFactory:
    """dkim_filter(**settings): the simple case (example.com, rsa + ed keys) unless
    settings say otherwise."""

    def make(**settings: Any) -> DkimFilter:
        base: dict[str, Any] = {"domain": (DOMAIN,), "selector": "rsa",
                                "key_file": str(keys.rsa), "ed25519_selector": "ed",
                                "ed25519_key_file": str(keys.ed)}
        base.update(settings)
        return DkimFilter(DkimSettings(**base), env_for(dns, settings.pop("timeout", 1.0)))

    return make


