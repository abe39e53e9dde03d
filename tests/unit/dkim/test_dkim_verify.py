"""Verification decisions with keys from the loopback DNS: one AR result per
signature, RFC 8301, key record flags, bad input, and the On-* actions."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import dkim
import pytest

from milters.core.verdict import Action, AuthResult, EditKind, Verdict
from milters.dkim.keys import load_private_key
from tests.support.dkim import MESSAGE, outgoing, transaction
from tests.support.dns import LoopbackDNS
from tests.unit.dkim.conftest import DOMAIN, FilterFactory, TestKeys

OURS = {"client": "127.0.0.1"}


def signed(make: FilterFactory, raw: bytes = MESSAGE, **settings: object) -> bytes:
    """`raw` signed by our filter as mail that is ours."""
    verdict = make(**settings).check(transaction(raw, **OURS))  # type: ignore[arg-type]
    assert [e.name for e in verdict.header_edits].count("DKIM-Signature") >= 1, verdict
    return outgoing(raw, verdict)


def results(make: FilterFactory, raw: bytes, **settings: object) -> list[AuthResult]:
    return dkim_of(make(**settings).check(transaction(raw)))


def dkim_of(v: Verdict) -> list[AuthResult]:
    """The dkim= results of a verdict (arc= has its own tests, test_arc_verify.py)."""
    return [r for r in v.results if r.method == "dkim"]


def props(r: AuthResult) -> dict[str, str]:
    return {name: value for _, name, value in r.properties}


def test_rsa_and_ed25519_signatures_each_get_a_result(dkim_filter: FilterFactory) -> None:
    rs = results(dkim_filter, signed(dkim_filter))
    assert [r.result for r in rs] == ["pass", "pass"]
    assert {props(r)["a"] for r in rs} == {"rsa-sha256", "ed25519-sha256"}
    p = props(rs[0])
    assert p["d"] == DOMAIN and p["i"] == "@" + DOMAIN and p["s"] in ("rsa", "ed")
    assert len(p["b"]) == 8


@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple", "relaxed/simple",
                                   "simple/relaxed"])
def test_canonicalizations_verify_with_dkimpy_too(dkim_filter: FilterFactory, keys: TestKeys,
                                                   canon: str) -> None:
    raw = signed(dkim_filter, canonicalization=canon)
    assert [r.result for r in results(dkim_filter, raw)] == ["pass", "pass"]

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        value = keys.records.get(name.decode().rstrip("."))
        return value.encode() if value else None

    assert dkim.verify(raw, dnsfunc=lookup)


def test_no_signature_is_none(dkim_filter: FilterFactory) -> None:
    assert [(r.method, r.result) for r in results(dkim_filter, MESSAGE)] == [("dkim", "none")]


def test_changed_body_and_changed_header_fail(dkim_filter: FilterFactory) -> None:
    raw = signed(dkim_filter)
    body_changed = raw.replace(b"second line", b"second  LINE")
    assert {r.result for r in results(dkim_filter, body_changed)} == {"fail"}
    assert "body hash" in results(dkim_filter, body_changed)[0].reason
    subject_changed = raw.replace(b"hello   there", b"goodbye there")
    assert {r.result for r in results(dkim_filter, subject_changed)} == {"fail"}


def test_added_from_breaks_the_oversigned_signature(dkim_filter: FilterFactory) -> None:
    raw = signed(dkim_filter)
    forged = raw.replace(b"\r\n\r\n", b"\r\nFrom: mallory@evil.example\r\n\r\n", 1)
    assert {r.result for r in results(dkim_filter, forged)} == {"fail"}


def _dkimpy_sign(raw: bytes, key: bytes, selector: bytes = b"old", **kw: object) -> bytes:
    sig = dkim.sign(raw, selector, DOMAIN.encode(), key, **kw)  # type: ignore[arg-type]
    return bytes(sig) + raw


def _openssl_rsa(bits: int, tmp_path: Path) -> bytes:
    out = subprocess.run(["openssl", "genrsa", "-traditional", str(bits)], capture_output=True,
                         check=True)
    return out.stdout


def test_rsa_sha1_is_policy_not_pass(dkim_filter: FilterFactory, keys: TestKeys,
                                     dns: LoopbackDNS) -> None:
    pem = keys.rsa.read_bytes()
    raw = dkim.sign(MESSAGE, b"rsa", DOMAIN.encode(), pem,
                    signature_algorithm=b"rsa-sha1") + MESSAGE  # type: ignore[operator]
    [r] = results(dkim_filter, raw)
    assert r.result == "policy" and "RFC 8301" in r.reason


def test_short_rsa_key_is_policy(dkim_filter: FilterFactory, dns: LoopbackDNS,
                                 tmp_path: Path) -> None:
    """RFC 8301 §3.2 leaves the key length to verifier policy (under 1024 bits: never
    valid): RFC 8601 `policy`, as for rsa-sha1 and as OpenDKIM writes it
    (tests/protocol/test_dkim_opendkim_mutations.py sig-key-short); the message is
    then treated as unsigned, not as badly signed."""
    pem = _openssl_rsa(768, tmp_path)
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa

    pk = dkim.crypto.parse_pem_private_key(pem)
    spki = crypto_rsa.RSAPublicNumbers(pk["publicExponent"], pk["modulus"]).public_key() \
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    p = base64.b64encode(spki).decode()
    dns.txt(f"short._domainkey.{DOMAIN}", f"v=DKIM1; k=rsa; p={p}")
    [r] = results(dkim_filter, _dkimpy_sign(MESSAGE, pem, b"short"))
    assert r.result == "policy" and "768 bits" in r.reason
    verdict = dkim_filter(on_bad_signature="reject").check(
        transaction(_dkimpy_sign(MESSAGE, pem, b"short")))
    assert verdict.action is not Action.REJECT


def _publish_variant(dns: LoopbackDNS, keys: TestKeys, selector: str, record_edit: str) -> None:
    base = keys.records[f"rsa._domainkey.{DOMAIN}"]
    dns.txt(f"{selector}._domainkey.{DOMAIN}", record_edit.format(base=base))


def test_key_record_flags(dkim_filter: FilterFactory, keys: TestKeys, dns: LoopbackDNS) -> None:
    pem = keys.rsa.read_bytes()
    _publish_variant(dns, keys, "testing", "{base}; t=y")
    sha1only = keys.records[f"rsa._domainkey.{DOMAIN}"].replace("h=sha256", "h=sha1")
    dns.txt(f"sha1only._domainkey.{DOMAIN}", sha1only)
    dns.txt(f"revoked._domainkey.{DOMAIN}", "v=DKIM1; k=rsa; p=")
    dns.txt(f"notb64._domainkey.{DOMAIN}", "v=DKIM1; k=rsa; p=!!not*base64!!")
    dns.txt(f"junk._domainkey.{DOMAIN}", "this is not a key record")
    cases = {
        "testing": ("pass", ""),
        "sha1only": ("permerror", "hash algorithm not allowed"),
        "revoked": ("permerror", "key revoked"),
        "notb64": ("permerror", "not base64"),
        "junk": ("permerror", "malformed"),
        "missing": ("permerror", "no key"),
    }
    for selector, (result, reason) in cases.items():
        [r] = results(dkim_filter, _dkimpy_sign(MESSAGE, pem, selector.encode()))
        assert (r.result, reason in r.reason) == (result, True), (selector, r)
    # t=y: a failing signature is reported as neutral and is not acted on.
    broken = _dkimpy_sign(MESSAGE, pem, b"testing").replace(b"second line", b"changed")
    v = dkim_filter(on_bad_signature="reject").check(transaction(broken))
    assert [r.result for r in dkim_of(v)] == ["neutral"] and v.action is Action.ACCEPT


def test_body_length_tag_is_honoured(dkim_filter: FilterFactory, keys: TestKeys) -> None:
    raw = _dkimpy_sign(MESSAGE, keys.rsa.read_bytes(), b"rsa", length=True)
    appended = raw + b"appended by a mailing list\r\n"
    assert [r.result for r in results(dkim_filter, appended)] == ["pass"]
    cut = raw.replace(b"second line\r\n", b"")
    assert [r.result for r in results(dkim_filter, cut)] == ["fail"]


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda v: v.replace(b"v=1; ", b"v=1; v=1; "), "malformed"),        # duplicate tag
    (lambda v: re.sub(rb"(?<=[;\s])b=[\w+/=]*(?:\r\n[ \t]+[\w+/=]+)*", b"", v), "missing b="),
    (lambda v: v.replace(b"a=rsa-sha256", b"a=rsa-md5"), "unknown signature algorithm"),
    (lambda v: v.replace(b"v=1; ", b"v=1; ===; "), "malformed"),           # broken tag
    (lambda v: v.replace(b"d=example.com", b"d=exa;mple.com"), "malformed"),
    (lambda v: v.replace(b"h=", b"h=to:"), ""),                            # still parses
])
def test_malformed_signatures(dkim_filter: FilterFactory, keys: TestKeys, edit: object,
                              reason: str) -> None:
    raw = _dkimpy_sign(MESSAGE, keys.rsa.read_bytes(), b"rsa")
    head, _, rest = raw.partition(b"\r\n\r\n")
    broken = edit(head) + b"\r\n\r\n" + rest  # type: ignore[operator]
    [r] = results(dkim_filter, broken)
    assert r.result in ("permerror", "fail") and reason in r.reason, r


def test_signature_without_from_is_permerror(dkim_filter: FilterFactory, keys: TestKeys) -> None:
    raw = dkim.sign(MESSAGE, b"rsa", DOMAIN.encode(), keys.rsa.read_bytes(),
                    include_headers=[b"from"]) + MESSAGE  # type: ignore[operator]
    raw = raw.replace(b"h=from", b"h=subject", 1)
    [r] = results(dkim_filter, raw)
    assert r.result == "permerror" and "From" in r.reason


def test_dns_timeout_is_temperror(dkim_filter: FilterFactory, dns: LoopbackDNS) -> None:
    raw = signed(dkim_filter)
    dns.clear()
    dns.set_delay(0.6)
    started = time.monotonic()
    v = dkim_filter(timeout=0.3, on_dns_error="tempfail").check(transaction(raw))
    assert time.monotonic() - started < 5
    assert v.action is Action.TEMPFAIL and v.reply is not None and v.reply.code == "451"
    assert {r.result for r in dkim_of(v)} <= {"temperror"}
    dns.set_delay(0)
    dns.set_fail(True)
    assert {r.result for r in dkim_of(dkim_filter().check(transaction(raw)))} == {"temperror"}


def test_ten_megabyte_body(dkim_filter: FilterFactory) -> None:
    body = (b"x" * 998 + b"\r\n") * 10_500
    raw = MESSAGE + body
    started = time.monotonic()
    out = signed(dkim_filter, raw)
    assert [r.result for r in results(dkim_filter, out)] == ["pass", "pass"]
    assert time.monotonic() - started < 20


def test_fifty_signatures_verifies_up_to_the_limit(dkim_filter: FilterFactory,
                                                   keys: TestKeys) -> None:
    raw = MESSAGE
    pem = keys.rsa.read_bytes()
    for _ in range(50):
        raw = _dkimpy_sign(raw, pem, b"rsa")
    v = dkim_filter(max_signatures=10).check(transaction(raw))
    assert len(dkim_of(v)) == 10 and all(r.result == "pass" for r in dkim_of(v))
    assert any("40 signature(s) beyond" in n for n in v.log_notes)


def test_ignore_domains(dkim_filter: FilterFactory) -> None:
    raw = signed(dkim_filter)
    assert [(r.method, r.result) for r in results(dkim_filter, raw,
                                                  ignore_domains=(DOMAIN,))] == [("dkim", "none")]
    assert len(results(dkim_filter, raw, ignore_domains=(".com",))) == 1


@pytest.mark.parametrize(("action", "expect"), [
    ("accept", (Action.ACCEPT, "", "")),
    ("tag", (Action.ACCEPT, "", "X-Milters-DKIM")),
    ("quarantine", (Action.ACCEPT, "dkim: bad signature", "")),
    ("reject", (Action.REJECT, "", "")),
    ("tempfail", (Action.TEMPFAIL, "", "")),
])
def test_on_bad_signature(dkim_filter: FilterFactory, action: str,
                          expect: tuple[Action, str, str]) -> None:
    raw = signed(dkim_filter).replace(b"second line", b"changed")
    v = dkim_filter(on_bad_signature=action).check(transaction(raw))
    tag = next((e.name for e in v.header_edits if e.kind is EditKind.ADD), "")
    assert (v.action, v.quarantine, tag) == expect
    if action == "reject":
        assert v.reply is not None and str(v.reply).startswith("550 5.7.20")


def test_on_no_signature_and_a_pass_is_never_acted_on(dkim_filter: FilterFactory) -> None:
    v = dkim_filter(on_no_signature="reject").check(transaction(MESSAGE))
    assert v.action is Action.REJECT
    # One good and one broken signature: the good one wins.
    raw = signed(dkim_filter)
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    first_b = next(i for i, line in enumerate(lines) if line.startswith(b"\tbh="))
    lines[first_b] = lines[first_b].replace(b"bh=", b"bh=AAAA", 1)
    mixed = b"\r\n".join(lines) + b"\r\n\r\n" + rest
    v = dkim_filter(on_bad_signature="reject").check(transaction(mixed))
    assert sorted(r.result for r in dkim_of(v))[0] in ("fail", "permerror")
    assert "pass" in {r.result for r in dkim_of(v)} and v.action is Action.ACCEPT


def test_verify_off_and_peer_hosts(dkim_filter: FilterFactory) -> None:
    assert dkim_filter(verify=False).check(transaction(MESSAGE)).results == ()
    v = dkim_filter(peer_hosts=("198.51.100.0/24",)).check(transaction(MESSAGE))
    assert v.results == () and "peer host" in v.reason


def test_external_host_claiming_our_domain_is_logged(dkim_filter: FilterFactory) -> None:
    v = dkim_filter().check(transaction(MESSAGE))
    assert any("tried to send mail as example.com" in n for n in v.log_notes)
    v = dkim_filter(external_ignore=("198.51.100.7/32",)).check(transaction(MESSAGE))
    assert not any("tried to send" in n for n in v.log_notes)


def test_loaded_key_matches_published_record(keys: TestKeys) -> None:
    key = load_private_key(str(keys.rsa), False)
    assert key.dns_record() == keys.records[f"rsa._domainkey.{DOMAIN}"]
