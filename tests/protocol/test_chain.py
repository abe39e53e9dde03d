"""Chain mode (`milters run chain`, one dialogue for every enabled filter) and the
live chain of `milters test`, over real sockets with the project's milter client
and the loopback DNS server.

What the chain must keep from the five-socket deployment: signing after every
edit (a checks REPLACE of Subject is covered by our signature), forged
Authentication-Results removed before dmarc reads them, the first refusal wins,
a hold applied by the last step."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from milters.client.edits import edited_message
from milters.client.probe import ProbeResult, probe
from milters.core.envelope import Envelope
from milters.dkim.keytools import genkey
from tests.support.dns import LoopbackDNS, dns_server
from tests.support.processes import ProcessFactory, free_port

ROOT = Path(__file__).resolve().parents[2]
OURS = "ours.example"
BANK = "bank.example"  # p=reject, no key of ours
HELD = "held.example"  # p=quarantine
AUTHSERV_ID = "mx.test.example"
# As in Postfix, the first rule that matches a field decides it.
RULES = (
    "/^Subject:.*win a prize/ REJECT 5.7.1 no prizes here\n"
    "/^Subject: (.*)/ REPLACE Subject: [tagged] ${1}\n"
)


@pytest.fixture(scope="module")
def dns() -> Iterator[LoopbackDNS]:
    with dns_server() as server:
        yield server


def config(d: Path, dns: LoopbackDNS, chain_port: int) -> Path:
    (d / "header_checks").write_text(RULES)
    path = d / "milters.toml"
    path.write_text(
        f'[global]\nauthserv_id = "{AUTHSERV_ID}"\ninternal_networks = ["127.0.0.0/8"]\n'
        f"{dns.toml(timeout=2.0)}\n"
        f'[dkim]\ndomain = ["{OURS}"]\nselector = "rsa"\nkey_file = "{d}/rsa.private"\n'
        f'[dmarc]\nreject_failures = true\nhistory = "{d}/history.sqlite"\n'
        "[clamav]\nenabled = false\n"
        f'[checks]\nheader_checks = ["regexp:{d}/header_checks"]\n'
        f'[chain]\nenabled = true\nsocket = "inet:{chain_port}@127.0.0.1"\nworkers = 1\n'
    )
    return path


@pytest.fixture(scope="module")
def chain(dns: LoopbackDNS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    d = tmp_path_factory.mktemp("chain")
    made = genkey(OURS, "rsa", "rsa", 2048, str(d))
    dns.txt(f"rsa._domainkey.{OURS}", made.key.dns_record())
    dns.txt(f"_dmarc.{OURS}", "v=DMARC1; p=reject")
    dns.txt(f"_dmarc.{BANK}", "v=DMARC1; p=reject")
    dns.txt(f"_dmarc.{HELD}", "v=DMARC1; p=quarantine")
    port = free_port()
    cfg = config(d, dns, port)
    with ProcessFactory() as factory:
        argv = [sys.executable, "-m", "milters", "run", "chain", "--config", str(cfg)]
        factory.start(argv, port, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
        yield f"inet:{port}@127.0.0.1", cfg


def message(sender: str, subject: str, extra: str = "") -> bytes:
    return (f"{extra}From: <{sender}>\r\nTo: <bob@example.net>\r\n"
            f"Subject: {subject}\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@x>\r\n\r\nHello world\r\n").encode()


def send(spec: str, raw: bytes, sender: str, auth: str = "") -> ProbeResult:
    env = Envelope(client_ip="198.51.100.7", client_name="mail.example.net",
                   mail_from=sender, rcpt_to=["bob@example.net"], auth_user=auth)
    return probe(spec, raw, env, timeout=30)


def delivered(raw: bytes, r: ProbeResult) -> bytes:
    """The message as Postfix would store it after the chain's edits."""
    return edited_message(raw, r.header_edits, leading_space=r.negotiated.leading_space)


def results(r: ProbeResult) -> str:
    return " ".join(" ".join(e.value.split()) for e in r.header_edits
                    if e.name == "Authentication-Results")


def test_signature_covers_the_checks_edit(chain: tuple[str, Path]) -> None:
    spec, _ = chain
    raw = message(f"alice@{OURS}", "quarterly figures")
    out = send(spec, raw, f"alice@{OURS}", auth="alice")
    assert out.verdict == "accept", out.smtp_reply
    signed = delivered(raw, out)
    assert b"Subject: [tagged] quarterly figures" in signed
    assert signed.count(b"DKIM-Signature:") == 1
    # In again from outside: dkim verifies first, on the message as received.
    back = send(spec, signed, f"alice@{OURS}")
    assert back.verdict == "accept", back.smtp_reply
    assert "dkim=pass" in results(back) and "dmarc=pass" in results(back), results(back)


def test_forged_result_is_removed_before_dmarc_reads_it(chain: tuple[str, Path]) -> None:
    spec, _ = chain
    forged = f"Authentication-Results: {AUTHSERV_ID}; dkim=pass header.d={BANK}\r\n"
    out = send(spec, message(f"ceo@{BANK}", "pay now", forged), f"ceo@{BANK}")
    assert out.verdict == "reject" and "5.7.1" in out.smtp_reply, out.smtp_reply


def test_first_refusal_wins(chain: tuple[str, Path]) -> None:
    spec, _ = chain
    out = send(spec, message(f"alice@{OURS}", "win a prize"), f"alice@{OURS}", auth="alice")
    assert out.verdict == "reject" and "no prizes here" in out.smtp_reply


def test_hold_is_applied_once_at_the_end(chain: tuple[str, Path]) -> None:
    spec, _ = chain
    raw = message(f"news@{HELD}", "monthly")
    out = send(spec, raw, f"news@{HELD}")
    assert out.verdict == "accept" and "dmarc" in out.quarantine, out
    # The hand-off mark dmarc leaves is removed again by the last step.
    stored = delivered(raw, out)
    assert b"X-Milters-Hold" not in stored
    assert b"Subject: [tagged] monthly" in stored  # checks ran on the held mail


def test_milters_test_runs_the_live_chain(chain: tuple[str, Path], tmp_path: Path) -> None:
    """`milters test` on the forged field: the chain refuses, as Postfix does; dmarc
    alone on the message as given (--filter) believes the field, which is why the
    default is the chain."""
    _, cfg = chain
    forged = f"Authentication-Results: {AUTHSERV_ID}; dkim=pass header.d={BANK}\r\n"
    eml = tmp_path / "forged.eml"
    eml.write_bytes(message(f"ceo@{BANK}", "pay now", forged))
    argv = [sys.executable, "-m", "milters", "test", str(eml), "--config", str(cfg),
            "--client-ip", "198.51.100.7", "--from", f"ceo@{BANK}", "--rcpt", "bob@example.net"]
    live = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert live.returncode == 1, live.stdout + live.stderr
    assert re.search(r"\[chain\] final verdict: reject 550 5\.7\.1", live.stdout), live.stdout
    assert "delete Authentication-Results[1]" in live.stdout
    alone = subprocess.run([*argv, "--filter", "dmarc"], capture_output=True, text=True,
                           cwd=ROOT, timeout=60)
    assert "dmarc=pass" in alone.stdout, alone.stdout
