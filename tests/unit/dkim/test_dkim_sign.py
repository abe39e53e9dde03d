"""Signing decisions: who is ours, which keys sign, the header set, folding of long
lines, key files and tables, and the key tools."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from milters.core.errors import ConfigError
from milters.core.verdict import EditKind
from milters.dkim import keytools
from milters.dkim.keys import load_private_key
from milters.dkim.keytools import genkey, zone_strings
from milters.dkim.message import fold_value
from tests.support.dkim import MESSAGE, dkim_results, outgoing, transaction
from tests.support.dns import LoopbackDNS
from tests.unit.dkim.conftest import DOMAIN, FilterFactory, TestKeys, env_for


def signatures(verdict: object) -> list[str]:
    return [e.value for e in verdict.header_edits  # type: ignore[attr-defined]
            if e.kind is EditKind.INSERT and e.name == "DKIM-Signature"]


def tags(value: str) -> dict[str, str]:
    flat = "".join(value.split())
    return dict(t.split("=", 1) for t in flat.split(";") if t)


@pytest.mark.parametrize(("who", "signs"), [
    ({"client": "127.0.0.1"}, True),                       # internal network
    ({"auth": "alice"}, True),                             # SASL login
    ({"daemon": "ORIGINATING"}, True),                     # submission service
    ({}, False),                                           # inbound: verified instead
])
def test_only_our_mail_is_signed(dkim_filter: FilterFactory, who: dict[str, str],
                                 signs: bool) -> None:
    v = dkim_filter().check(transaction(MESSAGE, **who))
    assert bool(signatures(v)) is signs
    assert bool(v.results) is not signs


def test_internal_hosts_and_sign_off(dkim_filter: FilterFactory) -> None:
    tx = transaction(MESSAGE, client="192.0.2.9")
    assert signatures(dkim_filter(internal_hosts=("192.0.2.0/24",)).check(tx))
    assert not signatures(dkim_filter(sign=False).check(transaction(MESSAGE, auth="a")))


def test_rsa_and_ed25519_side_by_side_with_rfc_tags(dkim_filter: FilterFactory) -> None:
    sigs = signatures(dkim_filter(signature_ttl=3600).check(transaction(MESSAGE, auth="a")))
    got = {tags(s)["a"]: tags(s) for s in sigs}
    assert set(got) == {"rsa-sha256", "ed25519-sha256"}
    t = got["rsa-sha256"]
    assert t["c"] == "relaxed/relaxed" and t["d"] == DOMAIN and t["s"] == "rsa"
    assert "l" not in t and int(t["x"]) - int(t["t"]) == 3600
    h = t["h"].split(":")
    # Over-signed: present fields once more than present, absent ones once.
    assert h.count("from") == 2 and h.count("subject") == 2 and h.count("to") == 2
    assert h.count("cc") == 1 and "received" not in h
    assert all(len(line) < 80 for s in sigs for line in s.split("\n"))


def test_no_key_for_the_domain_passes_unsigned(dkim_filter: FilterFactory) -> None:
    raw = MESSAGE.replace(b"alice@example.com", b"alice@other.example")
    v = dkim_filter().check(transaction(raw, auth="a"))
    assert not signatures(v) and "no key for alice@other.example" in v.log_notes[0]
    two_from = MESSAGE.replace(b"To:", b"From: x@example.com\r\nTo:")
    assert not signatures(dkim_filter().check(transaction(two_from, auth="a")))


def test_sub_domains_and_sender_fallback(dkim_filter: FilterFactory) -> None:
    raw = MESSAGE.replace(b"alice@example.com", b"alice@mail.example.com")
    assert not signatures(dkim_filter().check(transaction(raw, auth="a")))
    sigs = signatures(dkim_filter(sub_domains=True).check(transaction(raw, auth="a")))
    assert {tags(s)["d"] for s in sigs} == {DOMAIN}
    other = MESSAGE.replace(b"alice@example.com", b"alice@other.example").replace(
        b"To:", b"Sender: list@example.com\r\nTo:")
    assert not signatures(dkim_filter().check(transaction(other, auth="a")))
    assert signatures(dkim_filter(sender_header_fallback=True).check(
        transaction(other, auth="a")))


def test_long_header_line_is_folded_before_signing(dkim_filter: FilterFactory) -> None:
    long_to = ", ".join(f"user{i}@example.net" for i in range(80)).encode()
    unbroken = b"X-Token: " + b"z" * 1500
    raw = MESSAGE.replace(b"To: bob@example.net", b"To: " + long_to) \
        .replace(b"\r\n\r\n", b"\r\n" + unbroken + b"\r\n\r\n", 1)
    v = dkim_filter().check(transaction(raw, auth="a"))
    changes = [e for e in v.header_edits if e.kind is EditKind.CHANGE]
    assert {e.name for e in changes} == {"To", "X-Token"}
    out = outgoing(raw, v)
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    # What Postfix sends verifies: every line is already within its limit.
    assert [r.result for r in dkim_results(dkim_filter().check(transaction(out)))] \
        == ["pass", "pass"]


def test_long_body_line_is_broken_before_signing(dkim_filter: FilterFactory) -> None:
    """Postfix breaks body lines over 998 bytes on the way out (smtp_line_length_limit);
    we hand it the broken body and sign that, so the body hash survives."""
    raw = MESSAGE + b"q" * 2500 + b"\r\nend\r\n"
    v = dkim_filter().check(transaction(raw, auth="a"))
    assert v.replace_body is not None
    assert max(len(line) for line in v.replace_body.split(b"\r\n")) <= 998
    assert v.replace_body.replace(b"\r\n ", b"").endswith(b"q" * 2500 + b"\r\nend\r\n")
    out = outgoing(raw, v)
    assert [r.result for r in dkim_results(dkim_filter().check(transaction(out)))] \
        == ["pass", "pass"]
    assert dkim_filter().check(transaction(MESSAGE, auth="a")).replace_body is None


def test_fold_value() -> None:
    assert fold_value("Subject", b" short") is None
    folded = fold_value("X", b" " + b"a" * 3000)
    assert folded is not None
    assert all(len(line) <= 998 for line in (b"X:" + folded).split(b"\n"))
    assert folded.replace(b"\n ", b"") == b" " + b"a" * 3000


def test_key_file_permissions(keys: TestKeys, tmp_path: Path, dns: LoopbackDNS) -> None:
    loose = tmp_path / "loose.private"
    loose.write_bytes(keys.rsa.read_bytes())
    os.chmod(loose, 0o644)
    with pytest.raises(ConfigError, match=f"{loose} is readable by group or others"):
        load_private_key(str(loose), False)
    assert load_private_key(str(loose), True).bits == 2048
    assert stat.S_IMODE(keys.rsa.stat().st_mode) == 0o600


def test_bad_key_files_are_config_errors(tmp_path: Path) -> None:
    for name, data in (("junk", b"not a key"), ("pem", b"-----BEGIN RSA PRIVATE KEY-----\n"
                                                       b"AAAA\n-----END RSA PRIVATE KEY-----\n")):
        p = tmp_path / name
        p.write_bytes(data)
        os.chmod(p, 0o600)
        with pytest.raises(ConfigError, match=str(p)):
            load_private_key(str(p), False)
    with pytest.raises(ConfigError, match="cannot read"):
        load_private_key(str(tmp_path / "missing"), False)


def test_key_table_and_signing_table(keys: TestKeys, tmp_path: Path,
                                     dkim_filter: FilterFactory) -> None:
    kt = tmp_path / "KeyTable"
    kt.write_text(f"# OpenDKIM format\nrsakey example.com:rsa:{keys.rsa}\n"
                  f"edkey example.com:ed:{keys.ed}\nanykey %:rsa:{keys.rsa}\n")
    st = tmp_path / "SigningTable"
    st.write_text("*@example.com rsakey\n*@example.com edkey\n*.example.com rsakey\n"
                  "boss@other.example anykey\n")
    make = lambda **kw: dkim_filter(domain=(), selector="", key_file="",  # noqa: E731
                                    ed25519_selector="", ed25519_key_file="",
                                    key_table=f"refile:{kt}", signing_table=f"refile:{st}", **kw)
    sigs = signatures(make().check(transaction(MESSAGE, auth="a")))
    assert sorted(tags(s)["s"] for s in sigs) == ["ed", "rsa"]
    sub = MESSAGE.replace(b"alice@example.com", b"alice@eu.example.com")
    assert [tags(s)["d"] for s in signatures(make().check(transaction(sub, auth="a")))] \
        == [DOMAIN]
    boss = MESSAGE.replace(b"alice@example.com", b"boss@other.example")
    assert [tags(s)["d"] for s in signatures(make().check(transaction(boss, auth="a")))] \
        == ["other.example"]
    st.write_text("*@example.com nosuchkey\n")
    with pytest.raises(ConfigError, match="no key named nosuchkey"):
        make()


def test_simple_case_needs_all_three(dkim_filter: FilterFactory) -> None:
    with pytest.raises(ConfigError, match="go together"):
        dkim_filter(selector="")


def test_genkey_and_testkey(tmp_path: Path, dns: LoopbackDNS) -> None:
    made = genkey("example.org", "sel", "rsa", 2048, str(tmp_path))
    assert stat.S_IMODE(made.private_path.stat().st_mode) == 0o600
    assert made.private_path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    quoted = [line.strip().strip("( )").split('"')[1] for line in made.zone.splitlines()
              if '"' in line]
    assert all(len(s) <= 255 for s in quoted) and len(quoted) == 2
    assert "".join(quoted) == made.key.dns_record()
    assert zone_strings("x" * 600) == ["x" * 255, "x" * 255, "x" * 90]
    result = keytools.testkey("example.org", "sel", str(made.private_path), env_for(dns).resolver)
    assert not result.ok and "no TXT record" in result.message
    dns.txt("sel._domainkey.example.org", made.key.dns_record())
    resolver = env_for(dns).resolver  # a fresh cache: the NXDOMAIN above is cached
    result = keytools.testkey("example.org", "sel", str(made.private_path), resolver)
    assert result.ok, result.message
    other = genkey("example.org", "other", "ed25519", 0, str(tmp_path))
    assert not keytools.testkey("example.org", "sel", str(other.private_path), resolver).ok
    with pytest.raises(Exception, match="exists"):
        genkey("example.org", "sel", "rsa", 2048, str(tmp_path))
