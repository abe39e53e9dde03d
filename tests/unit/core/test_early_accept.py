"""ACCEPT at CONNECT for internal clients (issue 13): which filters may, and when
they must not (the filter that applies the holds handed on to it)."""

from __future__ import annotations

from typing import Any

import pytest

from milters import registry
from milters.core.chain import ChainPipeline
from milters.core.model import Connection
from milters.core.pipeline import Pipeline

INTERNAL = Connection(client_addr="10.1.2.3", client_name="pc.corp.example")
LOCAL = Connection(client_addr="")  # sendmail: no client address
OUTSIDE = Connection(client_addr="198.51.100.7", client_name="mx.outside.example")


def config(**tables: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, Any] = {
        "global": {"internal_networks": ["10.0.0.0/8"]},
        "dmarc": {"history": ""},
    }
    for name, values in tables.items():
        base.setdefault(name, {}).update(values)
    return base


def accepted(cfg: dict[str, Any], name: str, conn: Connection) -> bool:
    runtime = registry.build_runtime(registry.load_from_mapping(cfg), name)
    fresh = Connection(client_addr=conn.client_addr, client_name=conn.client_name)
    return Pipeline(runtime, fresh).accepted_at_connect()


def alone(name: str, **tables: dict[str, Any]) -> dict[str, Any]:
    """`name` the only filter enabled, as a site runs it behind Postfix alone."""
    others = {n: {"enabled": False} for n in ("dkim", "spf", "dmarc", "clamav", "checks")
              if n != name}
    return config(**others, **tables)


@pytest.mark.parametrize("name", ["spf", "dmarc"])
def test_spf_and_dmarc_accept_an_internal_client_at_connect(name: str) -> None:
    assert accepted(alone(name), name, INTERNAL)
    assert accepted(alone(name), name, LOCAL)
    assert not accepted(alone(name), name, OUTSIDE)
    # In the full chain spf too (dmarc follows it); dmarc is not last there either.
    assert accepted(config(), name, INTERNAL)


def test_dmarc_with_always_check_domains_waits_for_the_from_field() -> None:
    cfg = alone("dmarc", dmarc={"always_check_domains": ["bank.example"]})
    assert not accepted(cfg, "dmarc", INTERNAL)


def test_clamav_only_when_it_skips_internal_mail() -> None:
    assert not accepted(alone("clamav"), "clamav", INTERNAL)  # skip_internal = false
    assert accepted(alone("clamav", clamav={"skip_internal": True}), "clamav", INTERNAL)


def test_the_filter_that_applies_the_holds_sees_every_message() -> None:
    """clamav last after dmarc: a hold dmarc hands on (core/hold.py) is asked for by
    clamav, so clamav must not leave the session early."""
    cfg = config(clamav={"skip_internal": True}, checks={"enabled": False})
    runtime = registry.build_runtime(registry.load_from_mapping(cfg), "clamav")
    assert runtime.applies_holds
    assert not runtime.accepts_early
    cfg = config(clamav={"skip_internal": True})  # checks follows: clamav may
    assert registry.build_runtime(registry.load_from_mapping(cfg), "clamav").accepts_early


def test_dkim_and_checks_never_accept_early() -> None:
    cfg = config()
    for name in ("dkim", "checks"):
        assert not accepted(cfg, name, INTERNAL), name


def test_chain_mode_drops_the_steps_that_skip_the_client() -> None:
    cfg = registry.load_from_mapping(config(chain={"enabled": True}))
    chain = registry.build_chain(cfg)
    pipe = ChainPipeline(chain, Connection(client_addr="10.1.2.3"))
    assert not pipe.accepted_at_connect()  # dkim (signs) and checks still run
    assert [p.name for p in pipe.steps] == ["dkim", "clamav", "checks"]
    outside = ChainPipeline(chain, Connection(client_addr="198.51.100.7"))
    assert not outside.accepted_at_connect()
    assert [p.name for p in outside.steps] == ["dkim", "spf", "dmarc", "clamav", "checks"]
    # The last step applies the holds handed on to it: it stays (clamav here).
    cfg = registry.load_from_mapping(config(chain={"enabled": True},
                                            clamav={"skip_internal": True},
                                            dkim={"enabled": False}, checks={"enabled": False}))
    pipe = ChainPipeline(registry.build_chain(cfg), Connection(client_addr="10.9.9.9"))
    assert not pipe.accepted_at_connect()
    assert [p.name for p in pipe.steps] == ["clamav"]
    # Every step skips the client: the whole session is accepted at CONNECT.
    only = registry.load_from_mapping(alone("spf", chain={"enabled": True}))
    assert ChainPipeline(registry.build_chain(only),
                         Connection(client_addr="10.9.9.9")).accepted_at_connect()
