"""The dkim filter as an administrator runs it: `milters run dkim` with key files and
the loopback DNS, driven over the milter protocol; signing and verifying under
concurrent load (libmilter's pooled threads), key rotation on SIGHUP."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from milters.client.edits import apply_header_edits, parse_message
from milters.client.errors import MilterClientError
from milters.client.probe import probe
from milters.core.envelope import Envelope
from milters.dkim.keys import load_private_key
from milters.dkim.keytools import genkey
from tests.support.dns import LoopbackDNS, dns_server
from tests.support.processes import (
    ManagedProcess,
    ProcessFactory,
    free_port,
    others_disabled,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = "example.com"
MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\n"
           b"Subject: protocol   test\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
           b"Message-ID: <p@example.com>\r\n\r\nHello  world \r\n")


@pytest.fixture(scope="module")
def dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        yield server


@pytest.fixture(scope="module")
def running(dns: LoopbackDNS, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[str, ManagedProcess, Path]]:
    d = tmp_path_factory.mktemp("dkimrun")
    for sel, alg in (("rsa", "rsa"), ("ed", "ed25519")):
        made = genkey(DOMAIN, sel, alg, 2048, str(d))
        dns.txt(f"{sel}._domainkey.{DOMAIN}", made.key.dns_record())
    port = free_port()
    spec = f"inet:{port}@127.0.0.1"
    config = d / "milters.toml"
    config.write_text(
        f'[global]\nauthserv_id = "mx.test.example"\ninternal_networks = ["127.0.0.0/8"]\n'
        f"{dns.toml(timeout=2.0)}\n"
        f'[dkim]\nsocket = "{spec}"\ndomain = "{DOMAIN}"\nselector = "rsa"\n'
        f'key_file = "{d}/rsa.private"\ned25519_selector = "ed"\n'
        f'ed25519_key_file = "{d}/ed.private"\nworkers = 2\n'
        + others_disabled("dkim")
    )
    factory = ProcessFactory()
    argv = [sys.executable, "-m", "milters", "run", "dkim", "--config", str(config)]
    proc = factory.start(argv, port, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
    yield spec, proc, d
    factory.close()


def sign(spec: str, message: bytes = MESSAGE) -> bytes:
    env = Envelope(client_ip="203.0.113.9", client_name="laptop.example.net",
                   mail_from="alice@example.com", rcpt_to=["bob@example.net"],
                          auth_user="alice")
    r = probe(spec, message, env, timeout=30)
    assert r.verdict == "accept", r.smtp_reply
    headers, body = parse_message(message)
    edited = apply_header_edits(headers, r.header_edits,
                                leading_space=r.negotiated.leading_space)
    return b"".join(n.encode() + b":" + v.replace(b"\n", b"\r\n") + b"\r\n"
                    for n, v in edited) + b"\r\n" + body


def verify(spec: str, message: bytes) -> list[str]:
    env = Envelope(client_ip="198.51.100.7", client_name="mail.example.net",
                   mail_from="alice@example.com", rcpt_to=["bob@example.net"])
    r = probe(spec, message, env, timeout=30)
    ar = " ".join(e.value for e in r.header_edits if e.name == "Authentication-Results")
    return re.findall(r"dkim=(\w+)", ar)


def test_signs_authenticated_submission_and_verifies_it_inbound(running: tuple) -> None:
    spec = running[0]
    signed = sign(spec)
    assert signed.count(b"DKIM-Signature:") == 2
    assert verify(spec, signed) == ["pass", "pass"]
    assert verify(spec, signed.replace(b"Hello", b"Jello")) == ["fail", "fail"]
    assert verify(spec, MESSAGE) == ["none"]


def test_ar_fields_as_opendkim_writes_them(running: tuple) -> None:
    spec = running[0]
    env = Envelope(client_ip="198.51.100.7", mail_from="alice@example.com")
    r = probe(spec, sign(spec), env, timeout=30)
    [ar] = [e for e in r.header_edits if e.name == "Authentication-Results"]
    value = " ".join(ar.value.split())
    assert value.startswith("mx.test.example;")
    for prop in ("header.d=example.com", "header.i=@example.com", "header.s=rsa",
                 "header.a=rsa-sha256", "header.s=ed", "header.a=ed25519-sha256"):
        assert prop in value, value
    assert re.search(r"header\.b=\S{8}", value)


def test_concurrent_signing_and_verifying(running: tuple) -> None:
    """4 threads x 50 messages, each signed then verified: libmilter's pooled
    threads must neither crash nor mix up messages."""
    spec = running[0]
    errors: list[str] = []

    def worker(n: int) -> None:
        for i in range(50):
            msg = MESSAGE.replace(b"Hello", f"Hello {n}-{i}".encode())
            try:
                got = verify(spec, sign(spec, msg))
            except MilterClientError as exc:
                errors.append(f"{n}-{i}: {exc}")
                continue
            if got != ["pass", "pass"]:
                errors.append(f"{n}-{i}: {got}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    assert running[1].proc.poll() is None, running[1].output()


def test_sighup_rotates_keys(running: tuple, dns: LoopbackDNS) -> None:
    spec, proc, d = running
    (d / "rsa.private").unlink()
    (d / "rsa.txt").unlink()
    made = genkey(DOMAIN, "rsa", "rsa", 2048, str(d))
    dns.clear()
    dns.txt(f"rsa._domainkey.{DOMAIN}", made.key.dns_record())
    ed = load_private_key(str(d / "ed.private"), False)
    dns.txt(f"ed._domainkey.{DOMAIN}", ed.dns_record())
    os.kill(proc.pid, signal.SIGHUP)
    assert wait_until(lambda: "configuration reloaded" in proc.output(), 20)
    # Workers started before the reload may still serve a connection or two.
    assert wait_until(lambda: verify(spec, sign(spec)) == ["pass", "pass"], 20)


def test_insecure_key_refuses_to_start(tmp_path: Path) -> None:
    import subprocess

    made = genkey(DOMAIN, "loose", "ed25519", 0, str(tmp_path))
    os.chmod(made.private_path, 0o640)
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[dkim]\nsocket = "inet:{free_port()}@127.0.0.1"\ndomain = "{DOMAIN}"\n'
                   f'selector = "loose"\nkey_file = "{made.private_path}"\n')
    out = subprocess.run([sys.executable, "-m", "milters", "run", "dkim", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 78
    assert f"{made.private_path} is readable by group or others" in out.stderr
