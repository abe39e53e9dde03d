"""smtpd_milters against the config's chain (milters/chaincheck.py), with the real
postconf reading a config directory made here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from milters import chaincheck, registry
from milters.core.errors import ConfigError

ALL = ["inet:127.0.0.1:8891", "inet:127.0.0.1:8892", "inet:127.0.0.1:8893",
       "inet:127.0.0.1:8894", "inet:127.0.0.1:8895"]


def test_the_default_chain_agrees_with_postfix_config_output() -> None:
    cfg = registry.load_from_mapping({})
    assert chaincheck.disagreements(cfg, ALL) == []
    # Postfix's other spellings of the same sockets, among other milters.
    assert chaincheck.disagreements(cfg, ["inet:localhost:9999", "inet:localhost:8891",
                                          *ALL[1:]]) == []


def test_a_filter_missing_from_postfix_is_named() -> None:
    cfg = registry.load_from_mapping({})
    [problem] = chaincheck.disagreements(cfg, [ALL[2], *ALL[3:]])[:1]
    assert "filter dkim is enabled" in problem and "enabled = false" in problem
    only_dmarc = chaincheck.disagreements(cfg, [ALL[2]])
    assert len(only_dmarc) == 4  # dkim, spf, clamav, checks


def test_the_wrong_order_is_named() -> None:
    cfg = registry.load_from_mapping({})
    problems = chaincheck.disagreements(cfg, [ALL[2], ALL[0], ALL[1], ALL[3], ALL[4]])
    assert problems == ["Postfix's smtpd_milters calls our filters in the order dmarc, dkim, "
                        "spf, clamav, checks; the chain order is dkim, spf, dmarc, clamav, "
                        "checks (`milters postfix-config` prints it)"]


def test_disabled_filters_need_not_be_listed() -> None:
    cfg = registry.load_from_mapping({n: {"enabled": False}
                                      for n in ("dkim", "spf", "dmarc", "checks")})
    assert chaincheck.disagreements(cfg, [ALL[3]]) == []


@pytest.mark.skipif(shutil.which("postconf") is None, reason="Postfix is not installed")
def test_postconf_groups_and_commas_are_read(tmp_path: Path) -> None:
    (tmp_path / "main.cf").write_text(
        "compatibility_level = 3.6\n"
        "smtpd_milters = inet:127.0.0.1:8891, { inet:127.0.0.1:8892, "
        "default_action=accept }\n inet:127.0.0.1:8893\n")
    out = subprocess.run(["postconf", "-c", str(tmp_path), "-h", "smtpd_milters"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip()
    fake = tmp_path / "postconf"
    fake.write_text(f"#!/bin/sh\nexec postconf -c {tmp_path} \"$@\"\n")
    fake.chmod(0o755)
    assert chaincheck.postfix_milters(str(fake)) == ALL[:3]


SIGNING = {"dkim": {"domain": ["ours.example"], "selector": "s", "key_file": "/k.pem"}}
SIGN = "inet:127.0.0.1:8896"


def test_the_signing_step_goes_last() -> None:
    cfg = registry.load_from_mapping(SIGNING)
    assert registry.chain_steps(cfg)[-1] == "dkim-sign"
    assert chaincheck.disagreements(cfg, [*ALL, SIGN]) == []
    [problem] = chaincheck.disagreements(cfg, [SIGN, *ALL])
    assert "the chain order is dkim, spf, dmarc, clamav, checks, dkim-sign" in problem
    [missing] = chaincheck.disagreements(cfg, ALL)
    assert "dkim-sign" in missing and '[dkim] sign_socket = ""' in missing


def test_no_signing_step_without_keys_followers_or_a_socket() -> None:
    assert "dkim-sign" not in registry.chain_steps(registry.load_from_mapping({}))
    alone = {**SIGNING, **{n: {"enabled": False} for n in ("spf", "dmarc", "clamav", "checks")}}
    assert registry.chain_steps(registry.load_from_mapping(alone)) == ("dkim",)
    here = {"dkim": {**SIGNING["dkim"], "sign_socket": ""}}
    assert "dkim-sign" not in registry.chain_steps(registry.load_from_mapping(here))


def test_the_signing_socket_must_be_its_own() -> None:
    clash = {"dkim": {**SIGNING["dkim"], "sign_socket": "inet:8895@127.0.0.1"}}
    with pytest.raises(ConfigError, match=r"sign_socket .* also the socket of \[checks\]"):
        registry.load_from_mapping(clash)


def test_chain_mode_is_one_socket() -> None:
    cfg = registry.load_from_mapping({**SIGNING, "chain": {"enabled": True}})
    assert registry.units(cfg) == ("chain",)
    assert registry.chain_steps(cfg) == ("dkim", "spf", "dmarc", "clamav", "checks", "dkim-sign")
    assert chaincheck.disagreements(cfg, ["inet:127.0.0.1:8890"]) == []
    [problem] = chaincheck.disagreements(cfg, ALL)
    assert "filter chain is enabled" in problem and "[chain] enabled = false" in problem
