"""The RFC 7208 test suite (openspf.org release 2014.04, as pyspf ships it) through our path.

Each scenario's zone data is served by the loopback DNS server and every test
calls core.spf_eval.check_host() with a fresh Resolver pointed at it: pyspf's
parsing and limits, our DNS. The suite's driver conventions (pyspf's
test/testspf.py) are kept: an SPF (type 99) record is also published as TXT
unless the name has TXT data of its own (`TXT: NONE` says it has none), and
TIMEOUT makes queries of the types listed before it answer, the others time out.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from milters.core.config import DnsSettings
from milters.core.resolver import Resolver
from milters.core.spf_eval import check_host
from tests.support.dns import LoopbackDNS, dns_server

SUITE = Path(__file__).with_name("rfc7208-tests.yml")
TIMEOUT = 0.3  # seconds: how long a TIMEOUT entry makes the client wait

# The explanation the suite's driver sets as the default for fail ("DEFAULT"),
# which for us is pyspf's own default.
DEFAULT_EXPLANATION = "SPF fail - not authorized"

# Tests whose expectation our path cannot meet, each with the reason. Empty
# when every test passes.
SKIPS: dict[str, str] = {}


@dataclass(frozen=True)
class Case:
    scenario: int
    name: str
    host: str
    mailfrom: str
    helo: str
    results: tuple[str, ...]
    explanation: str | None
    spec: str


def _load() -> tuple[list[dict[str, Any]], list[Case]]:
    scenarios = [s for s in yaml.safe_load_all(SUITE.read_text(encoding="utf-8")) if s]
    cases = []
    for i, scenario in enumerate(scenarios):
        for name, t in scenario["tests"].items():
            result = t["result"]
            cases.append(Case(
                scenario=i, name=name, host=str(t["host"]), mailfrom=str(t.get("mailfrom", "")),
                helo=str(t.get("helo", "")),
                results=tuple(result) if isinstance(result, list) else (result,),
                explanation=t.get("explanation"), spec=str(t.get("spec", "")),
            ))
    return scenarios, cases


SCENARIOS, CASES = _load()


def _strings(value: Any) -> list[bytes]:
    values = value if isinstance(value, list) else [value]
    # A TXT record of no strings at all (null-text) cannot be sent: RFC 1035
    # §3.3.14 wants one or more, and dnspython drops such an answer as
    # malformed. One empty string is the nearest record a server can hold.
    return [str(v).encode("utf-8") for v in values] or [b""]


def publish(dns: LoopbackDNS, zonedata: dict[str, list[Any]]) -> None:
    """Load one scenario's zone data the way pyspf's test driver reads it."""
    for name, entries in zonedata.items():
        has_txt = any(isinstance(e, dict) and "TXT" in e for e in entries)
        for entry in entries:
            if entry == "TIMEOUT":
                dns.timeout(name)
                continue
            ((rtype, value),) = entry.items()
            if value == "NONE":
                continue
            if rtype == "SPF":
                dns.spf(name, b"".join(_strings(value)))
                if not has_txt:
                    dns.txt_strings(name, _strings(value))
            elif rtype == "TXT":
                dns.txt_strings(name, _strings(value))
            elif rtype == "A":
                dns.a(name, str(value))
            elif rtype == "AAAA":
                dns.aaaa(name, str(value))
            elif rtype == "MX":
                preference, exchange = value
                dns.mx(name, int(preference), str(exchange))
            elif rtype == "PTR":
                dns.ptr(name, str(value))
            elif rtype == "CNAME":
                dns.cname(name, str(value))
            else:
                raise AssertionError(f"record type {rtype} at {name} is not served")


@pytest.fixture(scope="module")
def suite_dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        server.loaded = None  # type: ignore[attr-defined]
        yield server


@pytest.fixture
def zone(suite_dns: LoopbackDNS, request: pytest.FixtureRequest) -> LoopbackDNS:
    case: Case = request.node.callspec.params["case"]
    if suite_dns.loaded != case.scenario:  # type: ignore[attr-defined]
        suite_dns.clear()
        publish(suite_dns, SCENARIOS[case.scenario].get("zonedata") or {})
        suite_dns.loaded = case.scenario  # type: ignore[attr-defined]
    return suite_dns


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rfc7208(case: Case, zone: LoopbackDNS) -> None:
    if case.name in SKIPS:
        pytest.skip(SKIPS[case.name])
    resolver = Resolver(DnsSettings(nameservers=(zone.address,), port=zone.port,
                                    timeout=TIMEOUT))
    outcome = check_host(case.host, case.mailfrom, case.helo, resolver)
    assert outcome.result in case.results, (
        f"{case.name} (RFC 7208 {case.spec}): {outcome.result}, expected "
        f"{' or '.join(case.results)}; {outcome.explanation}"
    )
    if case.explanation is not None:
        expected = DEFAULT_EXPLANATION if case.explanation == "DEFAULT" else case.explanation
        assert outcome.explanation == expected


def test_suite_is_whole() -> None:
    # release 2014.04: every scenario and test read, none lost to a parse slip
    assert len(SCENARIOS) >= 15
    assert len(CASES) >= 190
